"""Evaluate one model: generate images for a seeded prompt set, then FID/KID and CLIP score.

Images are written one file per prompt, atomically, so an interrupted eval
resumes where it stopped. They are kept under a key of what made them, the evaluated model's content
included (`fraqat_cli.evaluate.content`): a student retrained in place gets new images, never the old
ones. The teacher's images for a prompt set and sampler are generated once and cached; they are the
paper's FID reference. A prompt set with ground-truth scenes adds FID against the rendered scenes
(`fid_val`) and attribute accuracy (`fraqat_cli.evaluate.ground_truth`).
"""

from __future__ import annotations

import json
import time
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from PIL import Image

from fraqat_cli.cache import cache_key
from fraqat_cli.cli import warn
from fraqat_cli.data.conditioning import prompt_conditioning
from fraqat_cli.evaluate.clip_score import CLIPImageFeatures, clip_score
from fraqat_cli.evaluate.content import content_digest
from fraqat_cli.evaluate.fid_features import PLUMBING, mark_plumbing
from fraqat_cli.evaluate.ground_truth import attribute_scores, scene_image_files
from fraqat_cli.evaluate.metrics import (
    fid_from_features,
    files_features,
    kid_from_features,
    load_reference_stats,
    stability_warning,
)
from fraqat_cli.evaluate.pair_grid import pair_grid
from fraqat_cli.evaluate.targets import EvalTarget
from fraqat_cli.export.exported_denoiser import load_deployed
from fraqat_cli.files import atomic_write
from fraqat_cli.models.conditioning import Conditioning
from fraqat_cli.models.generation import generate
from fraqat_cli.models.loading import LoadedModel, load_model, model_identity
from fraqat_cli.progress import Progress
from fraqat_cli.student.build import model_skeleton
from fraqat_cli.student.checkpoint import StudentCheckpoint
from fraqat_cli.student.rebuild import rebuild_student

IMAGE_NAME = "{:05d}.png"


def image_files(folder: Path, count: int) -> list[Path]:
    return [folder / IMAGE_NAME.format(i) for i in range(count)]


def ensure_images(model: LoadedModel, conditioning: Conditioning, seeds: list[int], folder: Path, batch_size: int,
                  what: str) -> list[Path]:
    """Generate the images of `folder` that are not there yet; return every image path in prompt order.

    Batches always cover the same prompts ([k * batch_size, (k + 1) * batch_size)), so a resumed run
    computes a missing image exactly as the interrupted one would have (bit-identical on CPU).
    """
    files = image_files(folder, len(seeds))
    chunks = [range(s, min(s + batch_size, len(seeds))) for s in range(0, len(seeds), batch_size)]
    todo = [chunk for chunk in chunks if not all(files[i].is_file() for i in chunk)]
    folder.mkdir(parents=True, exist_ok=True)
    if not todo:
        return files
    initial = len(files) - sum(len(chunk) for chunk in todo)
    with Progress(f"generating {what}", len(files), unit="images", initial=initial) as progress:
        for chunk in todo:
            rows = list(chunk)
            images = generate(model, conditioning.rows(rows), [seeds[i] for i in rows], batch_size=batch_size)
            for i, image in zip(rows, images):
                if not files[i].is_file():
                    atomic_write(files[i], lambda tmp, im=image: im.save(tmp, format="PNG"))
            progress.update(len(rows))
    return files


def load_student(target: EvalTarget, teacher: torch.nn.Module, device: torch.device | str | None = None
                 ) -> torch.nn.Module:
    """The student of `target.checkpoint`, in `teacher`'s inference dtype, on `device` (default: the
    teacher's), its quantized weights those it trained with (`rebuild_student(bake=True)`); or the deployed
    model in `target.artifact` (`fraqat_cli.export.exported_denoiser`). `teacher` may be a skeleton
    (`model_skeleton`): only its structure and dtype are used."""
    first = next(teacher.parameters())
    device = device or (first.device if not first.is_meta else "cpu")
    if target.artifact is not None:
        return load_deployed(target.artifact, teacher, first.dtype, device)
    stored = StudentCheckpoint.read(target.checkpoint, model=target.config.model)  # the model config it was read with
    return rebuild_student(stored, teacher, dtype=first.dtype, device=device, bake=True)


class Evaluator:
    """Holds what every target of one `fraqat-eval` run shares: prompts, feature extractor, CLIP, settings.

    `scenes`, when the prompt set has them, are the ground truth of the prompts (scene i for prompt i).
    """

    def __init__(
        self, cfg: DictConfig, prompts: list[str], device: torch.device, extractor, extractor_name: str, clip=None,
        scenes: list | None = None,
    ) -> None:
        if scenes is not None and len(scenes) != len(prompts):
            raise ValueError(f"{len(scenes)} ground-truth scenes for {len(prompts)} prompts; give one per prompt")
        self.cfg, self.device = cfg, device
        self.extractor, self.extractor_name, self.clip = extractor, extractor_name, clip
        self.prompts, self.scenes = prompts, scenes
        self.seeds = [cfg.seed + i for i in range(len(self.prompts))]
        self.warnings: list[str] = []
        self.clip_features = None  # CLIP-FID's extractor: the CLIP weights of clip.model, when given
        if clip is not None:
            self.clip_features = CLIPImageFeatures(*clip).to(device)

    def features(self, folder: Path, files: list[Path], clip: bool = False, what: str = "images") -> np.ndarray:
        """Inception (or, `clip`, CLIP image) features of a folder's images, cached beside them per extractor
        and per set of files as they are on disk (names, sizes, modification times: an image replaced in a
        reference folder is a new set). A cache file that cannot serve is named and recomputed. `what` names the
        images in the progress line."""
        name = f"clip {self.cfg.clip.model}" if clip else self.extractor_name
        extractor = self.clip_features if clip else self.extractor
        stats = [(f.name, st.st_size, st.st_mtime_ns) for f in files for st in [f.stat()]]
        cache = folder / f"features-{cache_key({'x': name, 'n': len(files), 'files': stats})}.npy"
        if cache.is_file() and (cached := cached_features(cache, len(files))) is not None:
            return cached
        label = f"{'CLIP' if clip else 'Inception'} features of {what}"
        features = files_features(files, extractor, self.device, self.cfg.fid.batch_size, label=label)

        def write(tmp: str) -> None:
            with open(tmp, "wb") as f:
                np.save(f, features)

        atomic_write(cache, write)
        return features

    def evaluate(self, target: EvalTarget) -> dict:
        cfg, model_cfg = self.cfg, target.config.model
        started = time.time()
        digest = content_digest(target)  # once per target: what its images, features and CSV row belong to
        conditioning = prompt_conditioning(model_cfg, self.prompts, cfg.cache_dir, device=self.device)
        model = load_model(model_cfg)
        pipe = model.pipe.to(self.device)
        draw = lambda folder, what: ensure_images(  # noqa: E731
            model, conditioning, self.seeds, folder, cfg.batch_size, what)

        # 1. The teacher's images: the paper's reference, generated once per model, prompts and sampler.
        teacher_dir = Path(cfg.cache_dir).expanduser() / "teacher-images" / self.image_key(model_cfg)
        teacher_files = draw(teacher_dir, "teacher images")
        # 2. The evaluated model's images (the teacher's own, for a teacher target).
        if target.is_teacher:
            out_dir, files = Path(cfg.out_dir) / target.label, teacher_files
        else:
            home = target.artifact.parent if target.artifact else StudentCheckpoint.run_folder(target.checkpoint)
            out_dir = home / "eval" / self.image_key(model_cfg, digest)
            skeleton = model_skeleton(pipe.transformer)
            pipe.transformer = None  # the teacher's weights go before the student's arrive
            pipe.transformer = load_student(target, skeleton, self.device)
            files = draw(out_dir / "images", f"{target.label} images")
        out_dir.mkdir(parents=True, exist_ok=True)
        images = [Image.open(f).convert("RGB") for f in files]
        shown = min(cfg.grid_size, len(images))
        columns = [("teacher", [Image.open(f) for f in teacher_files[:shown]])]
        if not target.is_teacher:
            columns.append((f"student ({target.label})", images[:shown]))
        grid = pair_grid(columns, self.prompts[:shown])
        atomic_write(out_dir / "grid.png", lambda tmp: grid.save(tmp, format="PNG"))
        # 3. Metrics, and what they were measured on.
        results = {**self.metrics(files, teacher_dir, teacher_files, images, target.label),
                   **self.description(target, files, out_dir), "digest": digest,
                   "seconds": round(time.time() - started, 1)}
        atomic_write(out_dir / "results.json", lambda tmp: Path(tmp).write_text(json.dumps(results, indent=2)))
        return results

    def image_key(self, model_cfg: DictConfig, student: str | None = None) -> str:
        """What a folder of images depends on: model, sampler, seeds, prompts, and for a student the digest of
        its content (`content_digest`), not its file's path or step: retrained in place, it is another model."""
        parts = {"model": model_identity(model_cfg), "sampler": OmegaConf.to_container(model_cfg.sampler),
                 "seeds": self.seeds, "prompts": self.prompts}
        return cache_key(parts if student is None else {"student": student, **parts})

    def description(self, target: EvalTarget, files: list[Path], out_dir: Path) -> dict:
        return {
            "label": target.label,
            "model": target.config.model.name,
            "schedule": None if target.is_teacher else target.config.schedule.name,
            "granularity": None if target.is_teacher else target.config.quantizer.granularity,
            "weight_bits": target.weight_bits,
            "checkpoint": str(target.source) if target.source else None,
            "num_images": len(files),
            "seed": self.cfg.seed,
            "prompt_set": OmegaConf.to_container(self.cfg.prompts),
            "protocol": self.protocol(target.config.model, len(files)),
            "images_dir": str(files[0].parent),
            "grid": str(out_dir / "grid.png"),
            "results_json": str(out_dir / "results.json"),
            "train_seed": None if target.is_teacher else target.config.get("seed"),
            "versions": package_versions(),
        }

    def protocol(self, model_cfg: DictConfig, count: int) -> str:
        """A key of how a model was measured (prompts, seeds, image count, sampler, reference, feature
        networks): with the model's digest, it says which `results.csv` row a result replaces."""
        cfg = self.cfg
        return cache_key({"prompts": OmegaConf.to_container(cfg.prompts), "seed": cfg.seed, "images": count,
                          "sampler": OmegaConf.to_container(model_cfg.sampler), "reference": cfg.reference,
                          "reference_stats": cfg.reference_stats, "reference_dir": cfg.reference_dir,
                          "fid": self.extractor_name, "clip": cfg.clip.model})

    def metrics(self, files, teacher_dir, teacher_files, images, what: str = "images") -> dict:
        cfg, results = self.cfg, {}
        features = self.features(files[0].parent, files, what=f"{what} images")
        if cfg.reference == "teacher" and files == teacher_files:
            count = len(files)
            results["fid"] = results["kid"] = 0.0  # the teacher against its own images: zero by construction
        elif cfg.reference == "teacher":
            reference, count = self.features(teacher_dir, teacher_files, what="teacher images"), len(teacher_files)
            results["fid"] = fid_from_features(features, reference)
            results["kid"] = kid_from_features(features, reference)
        elif cfg.reference_stats:
            stats = load_reference_stats(cfg.reference_stats)
            count = len(stats["features"])
            results["fid"] = fid_from_features(features, (stats["mu"], stats["sigma"]))
            results["kid"] = kid_from_features(features, stats["features"])
        else:
            reference_dir, reference_files = self.reference_images()
            reference, count = self.features(reference_dir, reference_files, what="reference images"), \
                len(reference_files)
            results["fid"] = fid_from_features(features, reference)
            results["kid"] = kid_from_features(features, reference)
        results["reference"] = cfg.reference
        results["fid_feature_extractor"] = self.extractor_name
        # The generated set's count is in the comparison's notes; a reference of another size is said here.
        warning = None if cfg.reference == "teacher" else stability_warning(count, "reference set")
        if warning is not None and warning not in self.warnings:
            self.warnings.append(warning)
        if self.clip is not None:
            results["clip_score"] = clip_score(*self.clip, images, self.prompts, cfg.batch_size)
            results.update(self.clip_fid(files, teacher_dir, teacher_files, what))
        if self.scenes is not None:
            results.update(self.ground_truth_metrics(features, images))
        return mark_plumbing(results) if self.extractor_name == PLUMBING else results

    def reference_images(self) -> tuple[Path, list[Path]]:
        """`reference_dir` and its images (png, jpg), in name order."""
        folder = Path(str(self.cfg.reference_dir)).expanduser()
        return folder, sorted(p for p in folder.glob("*") if p.suffix.lower() in (".png", ".jpg", ".jpeg"))

    def clip_fid(self, files: list[Path], teacher_dir: Path, teacher_files: list[Path], what: str = "images"
                 ) -> dict:
        """FID in CLIP's image space against the same reference images as `fid` (the paper reports both);
        stored reference statistics hold Inception features only, so they give no CLIP-FID."""
        if self.cfg.reference == "teacher" and files == teacher_files:
            return {"clip_fid": 0.0}  # the teacher against its own images: zero by construction
        if self.cfg.reference == "teacher":
            reference_dir, reference_files = teacher_dir, teacher_files
        elif self.cfg.reference_dir:
            reference_dir, reference_files = self.reference_images()
        else:
            return {}
        features = self.features(files[0].parent, files, clip=True, what=f"{what} images")
        reference = self.features(reference_dir, reference_files, clip=True, what="reference images")
        return {"clip_fid": fid_from_features(features, reference)}

    def ground_truth_metrics(self, features: np.ndarray, images: list[Image.Image]) -> dict:
        """`fid_val`: FID against the rendered scenes (same Inception and clean-fid path as `fid`), and
        attribute accuracy; `features` are the evaluated images' Inception features."""
        files = scene_image_files(self.scenes, self.cfg.cache_dir)
        reference = self.features(files[0].parent, files, what="ground-truth scenes")
        return {"fid_val": fid_from_features(features, reference), **attribute_scores(images, self.scenes)}


def cached_features(path: Path, rows: int) -> np.ndarray | None:
    """The (rows, D) float features stored in `path`, or None, with a warning naming the file, when it cannot
    serve (cut short by a full disk or a copy, another array, or not an array at all: never unpickled)."""
    try:
        features = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError) as error:
        problem = f"it cannot be read ({(str(error).strip().splitlines() or [type(error).__name__])[0]})"
    else:
        if hasattr(features, "close"):  # an .npz archive under the name: not ours
            features.close()
        if isinstance(features, np.ndarray) and features.ndim == 2 and len(features) == rows \
                and np.issubdtype(features.dtype, np.floating):
            return features
        shape = getattr(features, "shape", type(features).__name__)
        problem = f"it holds {shape} {getattr(features, 'dtype', '')} values, not ({rows}, features) floats"
    warn(f"cache entry {str(path)!r}: {problem}; recomputing it")
    return None


def package_versions() -> dict:
    versions = {}
    for name in ("fraqat-cli", "torch", "diffusers", "transformers", "clean-fid", "torchmetrics"):
        try:
            versions[name] = version(name)
        except PackageNotFoundError:
            versions[name] = None
    return versions
