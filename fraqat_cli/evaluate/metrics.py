"""FID, KID and CLIP score, computed with clean-fid and torchmetrics.

Features come from clean-fid's own folder pipeline ("clean" resizing), so our
FID is clean-fid's FID; we only keep the features so that KID and stored
reference statistics reuse them instead of running Inception again.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import torch
from cleanfid import fid

from fraqat_cli.files import atomic_write
from fraqat_cli.progress import Progress

# FID's covariance is 2048 x 2048: with fewer images than features it is singular and the
# figure swings from one draw of images to the next.
ADVISED_FID_IMAGES = 2048


def folder_features(folder: str | Path, extractor, device: torch.device, batch_size: int = 32,
                    verbose: bool = False) -> np.ndarray:
    """(N, D) features of every image in `folder`, through clean-fid's "clean" pipeline (the extractor's own
    `resize`, when it has one, in place of clean-fid's 299 x 299: CLIP's)."""

    return fid.get_folder_features(str(folder), extractor, num_workers=0, batch_size=batch_size, device=device,
                                   mode="clean", verbose=verbose, custom_fn_resize=getattr(extractor, "resize", None))


def files_features(files: list[Path], extractor, device: torch.device, batch_size: int = 32,
                   label: str | None = None) -> np.ndarray:
    """(N, D) features of exactly `files`, in order, through the same clean-fid pipeline as `folder_features`:
    a folder that also holds other files (cached features beside the images) counts only these. Computed a
    batch at a time (each image's features are its own), so `label` names a progress line (`Progress`)."""

    chunks = []
    with Progress(label or "features", len(files), unit="images", enabled=label is not None) as progress:
        for start in range(0, len(files), batch_size):
            batch = [str(f) for f in files[start:start + batch_size]]
            chunks.append(fid.get_files_features(batch, extractor, num_workers=0, batch_size=batch_size,
                                                 device=device, mode="clean", verbose=False,
                                                 custom_fn_resize=getattr(extractor, "resize", None)))
            progress.update(len(batch))
    return np.concatenate(chunks)


def feature_stats(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return np.mean(features, axis=0), np.cov(features, rowvar=False)


def fid_from_features(features: np.ndarray, reference: np.ndarray | tuple) -> float:
    """FID between features and reference features (or reference (mu, sigma)).

    With both feature sets in hand and fewer images than feature dimensions (the usual case below 2048
    images), the trace of sqrtm(sigma1 sigma2) is computed exactly as the sum of the singular values of
    A1 A2^T (sigma = A^T A, A the centred features / sqrt(n - 1)): the nonzero eigenvalues of
    sigma1 sigma2 are those of (A1 A2^T)(A1 A2^T)^T. That agrees with clean-fid's sqrtm to ~1e-6
    (relative) and takes milliseconds instead of its ~20 s single-threaded 2048 x 2048 square root.
    """

    if not isinstance(reference, tuple) and max(len(features), len(reference)) <= features.shape[1]:
        return _low_rank_fid(features, reference)
    mu, sigma = feature_stats(features)
    ref_mu, ref_sigma = reference if isinstance(reference, tuple) else feature_stats(reference)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # scipy's singular-matrix warnings; we warn once about the count instead
        return float(fid.frechet_distance(mu, sigma, ref_mu, ref_sigma))


def _low_rank_fid(features: np.ndarray, reference: np.ndarray) -> float:
    a, b = (np.asarray(x, dtype=np.float64) for x in (features, reference))
    mu_a, mu_b = a.mean(axis=0), b.mean(axis=0)
    a_c, b_c = (a - mu_a) / np.sqrt(len(a) - 1), (b - mu_b) / np.sqrt(len(b) - 1)  # sigma = x_c^T x_c
    trace_sqrt = np.linalg.svd(a_c @ b_c.T, compute_uv=False).sum()
    return float(np.sum((mu_a - mu_b) ** 2) + np.sum(a_c**2) + np.sum(b_c**2) - 2 * trace_sqrt)


def kid_from_features(features: np.ndarray, reference: np.ndarray) -> float:
    """KID (unbiased MMD with a cubic kernel), clean-fid's estimator."""

    return float(fid.kernel_distance(features, reference, num_subsets=100, max_subset_size=1000))


def save_reference_stats(path: str | Path, features: np.ndarray, meta: dict) -> None:
    """Store mu, sigma and the features (for KID) in one .npz, atomically."""
    mu, sigma = feature_stats(features)

    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:
            np.savez(f, mu=mu, sigma=sigma, features=features, meta=np.array(repr(sorted(meta.items()))))

    atomic_write(Path(path), write)


def load_reference_stats(path: str | Path) -> dict:
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(
            f"reference statistics {str(path)!r} do not exist; make them with "
            f"`python scripts/coco_reference.py --images DIR --out {path}`"
        )
    with np.load(path, allow_pickle=False) as data:
        return {k: data[k] for k in data.files}


def stability_warning(count: int, what: str) -> str | None:
    if count >= ADVISED_FID_IMAGES:
        return None
    return (f"{what}: FID from {count} images is unstable (the 2048-d covariance is singular below "
            f"{ADVISED_FID_IMAGES} images); at least {ADVISED_FID_IMAGES} are advised, 10k+ for published figures")
