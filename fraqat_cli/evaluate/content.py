"""What was evaluated, as a digest of its content rather than of where its file lies or when it was written.

Evaluation results (images, features, the `results.csv` row) are keyed by this digest: a run retrained in place
(same folder, same step, another learning rate) or a file re-exported over the old one is another model, and is
evaluated anew; two copies of one checkpoint are one model. The digest is computed once per evaluated target.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from omegaconf import OmegaConf

from fraqat_cli.cache import cache_key
from fraqat_cli.evaluate.targets import EvalTarget
from fraqat_cli.models.loading import model_identity
from fraqat_cli.student.checkpoint import StudentCheckpoint, release_pages

DIGEST_CHARS = 20  # as `cache_key`: 80 bits, far past any collision among one user's checkpoints
# The stored config sections that change the student rebuilt from the same tensors (`rebuild_student`); the
# model's own identity is part of every eval key already.
REBUILD_SECTIONS = ("quantizer", "selection")


def content_digest(target: EvalTarget) -> str:
    """The digest of `target`'s model: its student tensors (a checkpoint), its bytes (an exported file), or,
    for a teacher, which is rebuilt from its model config, that config's identity."""
    if target.artifact is not None:
        return files_digest(artifact_files(target.artifact))
    if target.checkpoint is not None:
        return checkpoint_digest(StudentCheckpoint.read(target.checkpoint, model=target.config.model))
    return cache_key({"teacher": model_identity(target.config.model)})


def checkpoint_digest(checkpoint: StudentCheckpoint) -> str:
    """sha256 over the student's tensors in name order (name, dtype, shape, then the raw bytes) and the config
    sections that rebuild it. A memory-mapped checkpoint is streamed: each tensor's pages are let go once
    hashed, so a checkpoint larger than memory is digested in one pass."""
    digest = hashlib.sha256()
    sections = {k: checkpoint.config.get(k) for k in REBUILD_SECTIONS}
    digest.update(json.dumps(OmegaConf.to_container(OmegaConf.create(sections)), sort_keys=True).encode())
    for name in sorted(checkpoint.state):
        tensor = checkpoint.state[name].detach()
        digest.update(json.dumps([name, str(tensor.dtype), list(tensor.shape)]).encode())
        raw = tensor.contiguous().reshape(-1).view(torch.uint8)  # bytes as stored, whatever the dtype
        digest.update(memoryview(raw.numpy()))
        if checkpoint.mapped and raw.data_ptr() == tensor.data_ptr():
            release_pages(tensor)
    return digest.hexdigest()[:DIGEST_CHARS]


def files_digest(paths: list[Path]) -> str:
    """sha256 over the bytes of `paths`, in order, each prefixed by its size, read in chunks."""
    digest = hashlib.sha256()
    for path in paths:
        digest.update(str(path.stat().st_size).encode() + b"\0")
        with open(path, "rb") as f:
            digest.update(hashlib.file_digest(f, "sha256").digest())
    return digest.hexdigest()[:DIGEST_CHARS]


def artifact_files(path: Path) -> list[Path]:
    """An exported file and, for an ONNX graph past protobuf's 2 GiB, its tensors' side file (`<file>.data`);
    for a `format=diffusers` folder, its transformer's files (the pipeline's other parts are the teacher's)."""
    path = Path(path).expanduser()
    if path.is_dir():
        folder = path / "transformer" if (path / "transformer").is_dir() else path
        return sorted(p for p in folder.iterdir() if p.is_file())
    side = path.with_name(path.name + ".data")
    return [path, side] if path.suffix == ".onnx" and side.is_file() else [path]
