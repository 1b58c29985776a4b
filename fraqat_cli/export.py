"""`fraqat-export`: turn a trained student checkpoint into deployable files (safetensors codes or ONNX QDQ).

`export(cfg)` does the work and returns its report; `main` is the thin Hydra entry point.
"""

from __future__ import annotations

import gc
import json
import os
import shutil
from contextlib import contextmanager
from pathlib import Path

import hydra
from omegaconf import DictConfig

from fraqat_cli.cli import quiet_console, run_reporting_errors

FORMATS = {"safetensors": ".safetensors", "onnx": ".onnx"}


def check_settings(cfg: DictConfig) -> None:
    if cfg.format not in FORMATS:
        raise ValueError(f"format={cfg.format!r} is not offered; allowed: {', '.join(FORMATS)}")
    if isinstance(cfg.example.batch_size, bool) or not isinstance(cfg.example.batch_size, int) \
            or cfg.example.batch_size < 1:
        raise ValueError(f"example.batch_size must be a positive integer; got {cfg.example.batch_size!r}")
    tolerance = cfg.tolerance.get(cfg.format)
    if isinstance(tolerance, bool) or not isinstance(tolerance, (int, float)) or not tolerance > 0:
        raise ValueError(f"tolerance.{cfg.format} must be a positive number; got {tolerance!r}")


def checkpoint_file(ckpt) -> Path:
    """The one checkpoint `ckpt` names (a file or a run folder); a sweep folder is refused."""
    from fraqat_cli.checkpointing import StudentCheckpoint

    files, sweep = StudentCheckpoint.locate(ckpt)
    if sweep is not None:
        raise ValueError(f"ckpt={str(ckpt)!r} is a sweep folder of {len(files)} runs; export one run at a time, "
                         f"e.g. ckpt={files[0].parent.parent}")
    return files[0]


def default_out(checkpoint: Path, fmt: str) -> Path:
    """<run>/export/student.<suffix> for last.ckpt; student-step-NNNNNN.<suffix> for a step checkpoint."""
    from fraqat_cli.checkpointing import LAST, StudentCheckpoint

    name = "student" if checkpoint.name == LAST else f"student-{checkpoint.stem}"
    return StudentCheckpoint.run_folder(checkpoint) / "export" / f"{name}{FORMATS[fmt]}"


def report_path(out: Path) -> Path:
    """student.safetensors -> student.safetensors.json: the two formats' reports sit side by side."""
    return out.with_name(out.name + ".json")


def export(cfg: DictConfig) -> dict:
    """Check, write and report, holding one model at a time: the student (its float32 weights mapped from
    the checkpoint, not copied) while writing, then only the written file while checking it."""
    from hydra.utils import instantiate

    from fraqat_cli.cache import atomic_write
    from fraqat_cli.checkpointing import StudentCheckpoint
    from fraqat_cli.export_example import example_inputs
    from fraqat_cli.models import load_pipeline
    from fraqat_cli.student import model_skeleton

    # 1. Everything named must exist and make sense before a model is built.
    check_settings(cfg)
    checkpoint = checkpoint_file(cfg.ckpt)
    stored = StudentCheckpoint.read(checkpoint)
    out = Path(str(cfg.out)).expanduser() if cfg.out else default_out(checkpoint, cfg.format)
    if out.suffix != FORMATS[cfg.format]:
        raise ValueError(f"out={str(out)!r} must end in {FORMATS[cfg.format]} for format={cfg.format}")
    model_cfg = stored.config.model
    family = instantiate(model_cfg.family)
    info = {"model": model_cfg.name, "schedule": stored.config.schedule.name,
            "granularity": stored.config.quantizer.granularity, "checkpoint": str(checkpoint), "step": stored.step,
            "teacher_dtype": model_cfg.dtype}

    # 2. Example inputs to trace and check with, and the transformer's structure (the teacher's weights go).
    pipe = load_pipeline(model_cfg, without=family.text_parts)
    example = example_inputs(model_cfg, pipe, cfg.example, cfg.cache_dir)
    skeleton = model_skeleton(pipe.transformer)
    del pipe

    # 3. The student as trained (float32 master weights mapped from the checkpoint), refused if it cannot
    #    deploy, and its output on the example: what the written file must reproduce.
    source = f"checkpoint {str(checkpoint)!r}"
    student, layers, expected = trained_student(stored, skeleton, family, example, source)

    # 4. Write into a staging folder beside the target, check, and only then move into place.
    with staging(out) as staged:
        report = write_format(cfg.format, student, family, example, staged, info, source)
        del student, stored  # the checkpoint's mapping closes: the check holds only the file it reloads
        gc.collect()
        report.update(info, format=cfg.format, file=str(out), layers=layers)
        if cfg.check:
            report["check"] = check_export(cfg, expected, family, example, staged)
    atomic_write(report_path(out), lambda t: Path(t).write_text(json.dumps(report, indent=2, default=str)))
    print_report(report)
    return report


def trained_student(stored, skeleton, family, example: dict, source: str):
    """(student, its deployable layers' records, its output on `example`); ValueError when it cannot deploy."""
    import torch

    from fraqat_cli.deployable import deployable_layers, layer_record
    from fraqat_cli.export_example import student_prediction
    from fraqat_cli.student import rebuild_student

    student = rebuild_student(stored, skeleton)
    layers = {name: layer_record(m) for name, m in deployable_layers(student, source).items()}
    with torch.no_grad():
        expected = student_prediction(student, family, example)
    return student, layers, expected


@contextmanager
def staging(out: Path):
    """Yield a path inside a fresh folder beside `out`; on success move what was written there into place
    (side files first, `out` last), on failure remove it all: no half-written export is ever visible."""
    stage = out.parent / f".{out.name}.partial"
    shutil.rmtree(stage, ignore_errors=True)
    stage.mkdir(parents=True)
    try:
        yield stage / out.name
        for file in sorted(stage.iterdir(), key=lambda f: f.name == out.name):
            os.replace(file, out.parent / file.name)
    finally:
        shutil.rmtree(stage, ignore_errors=True)


def write_format(fmt: str, student, family, example: dict, path: Path, info: dict, source: str) -> dict:
    """Write `student` to `path` in `fmt`; returns the report's format-specific part (size, graph inputs)."""
    from fraqat_cli.packed import export_packed, size_report

    if fmt == "safetensors":
        export_packed(student, path, info, source)
        report = {}
    else:
        from fraqat_cli.onnx_export import export_onnx

        report = {"inputs": export_onnx(student, family, example, path, info, source)["inputs"]}
    files = sorted(path.parent.iterdir())
    report["files"] = [f.name for f in files]
    report["size"] = size_report(student, sum(f.stat().st_size for f in files)).as_dict()
    return report


def check_export(cfg: DictConfig, expected, family, example: dict, path: Path) -> dict:
    """Run the written file (reloaded, or in onnxruntime) on `example`; ValueError when it differs from the
    student's output `expected` by more than the format's tolerance."""
    import torch

    from fraqat_cli.export_example import relative_difference, student_prediction

    with torch.no_grad():
        if cfg.format == "safetensors":
            from fraqat_cli.packed import load_packed

            got, against = student_prediction(load_packed(path).transformer, family, example), "PyTorch student"
        else:
            from fraqat_cli.onnx_export import run_onnxruntime

            got, against = run_onnxruntime(path, example), "PyTorch student (onnxruntime CPU)"
    difference, tolerance = relative_difference(got, expected), cfg.tolerance[cfg.format]
    if not difference <= tolerance:
        raise ValueError(f"the exported {cfg.format} model differs from the student by {difference:.3g} "
                         f"(relative L2) > tolerance.{cfg.format}={tolerance:g}; nothing written")
    return {"relative_difference": difference, "tolerance": tolerance, "against": against}


def print_report(report: dict) -> None:
    layers = report.get("layers")
    bits = sorted({r["bits"] for r in layers.values()}) if layers else None
    print(f"fraqat-export: {report['format']} -> {report['file']}")
    s = report["size"]
    print(f"  size: {s['file_bytes'] / 2**20:.2f} MiB = {s['of_float32']:.3f} of float32 "
          f"({s['float32_bytes'] / 2**20:.2f} MiB), {s['of_bfloat16']:.3f} of bfloat16; "
          f"{s['quantized_params']:,}/{s['total_params']:,} parameters quantized")
    if bits:
        print(f"  {len(layers)} quantized layers at {bits} bits, {report['granularity']}")
    if "check" in report:
        c = report["check"]
        print(f"  check against the {c['against']}: relative difference {c['relative_difference']:.2e} "
              f"(tolerance {c['tolerance']:g})")


@hydra.main(config_path="pkg://fraqat_cli.conf", config_name="export", version_base="1.3")
def main(cfg: DictConfig) -> None:
    quiet_console()
    run_reporting_errors("fraqat-export", lambda: export(cfg))


if __name__ == "__main__":
    main()
