"""`fraqat-export`: turn a trained student checkpoint into deployable files: safetensors codes, an ONNX QDQ
graph, an ONNX graph whose 4-bit layers onnxruntime runs packed (MatMulNBits), a GGUF file, or a diffusers
folder (torchao weights, `fraqat_cli.export.diffusers_folder`).

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
import torch
from omegaconf import DictConfig, OmegaConf

from fraqat_cli.checks import positive_int, positive_number
from fraqat_cli.cli import quiet_console, run_reporting_errors
from fraqat_cli.export.deploy_checks import deployable_layers, layer_record
from fraqat_cli.export.diffusers_folder import check_out_folder, folder_prediction, write_diffusers_folder
from fraqat_cli.export.example_inputs import example_inputs, relative_difference, student_prediction
from fraqat_cli.export.gguf import load_gguf, write_card, write_gguf
from fraqat_cli.export.onnx_graph import export_onnx, run_onnxruntime
from fraqat_cli.export.onnx_nbits import check_runtime, export_nbits
from fraqat_cli.export.safetensors_file import PLAIN_DTYPES, export_packed, load_packed, round_unquantized, size_report
from fraqat_cli.files import atomic_write
from fraqat_cli.models.loading import family_of, load_model
from fraqat_cli.student.build import model_skeleton
from fraqat_cli.student.checkpoint import LAST, StudentCheckpoint
from fraqat_cli.student.rebuild import rebuild_student

FORMATS = {"safetensors": ".safetensors", "onnx": ".onnx", "onnx_nbits": ".onnx",
           "gguf": ".gguf", "diffusers": ""}  # format -> file suffix ("": a folder)
DEFAULT_NAMES = {"safetensors": "student", "onnx": "student", "onnx_nbits": "student.nbits", "gguf": "student",
                 "diffusers": "diffusers"}
SIXTEEN_BITS = ("bfloat16", "float16")


def check_settings(cfg: DictConfig) -> None:
    if cfg.format not in FORMATS:
        raise ValueError(f"format={cfg.format!r} is not offered; allowed: {', '.join(FORMATS)}")
    if cfg.dtype != "auto" and cfg.dtype not in PLAIN_DTYPES:
        raise ValueError(f"dtype={cfg.dtype!r} is not offered for unquantized tensors; allowed: auto, "
                         f"{', '.join(PLAIN_DTYPES)}")
    if cfg.format == "onnx_nbits":
        check_runtime(cfg.runtime.block_size, cfg.runtime.accuracy_level)
    if cfg.format == "gguf" and cfg.get("layout") not in ("diffusers", "original"):
        raise ValueError(f"layout={cfg.get('layout')!r} is not offered for format=gguf; allowed: diffusers, original")
    positive_int("example.batch_size", cfg.example.batch_size)
    positive_number(f"tolerance.{cfg.format}", cfg.tolerance.get(cfg.format))


def checkpoint_file(ckpt) -> Path:
    """The one checkpoint `ckpt` names (a file or a run folder); a sweep folder is refused."""

    files, sweep = StudentCheckpoint.locate(ckpt)
    if sweep is not None:
        raise ValueError(f"ckpt={str(ckpt)!r} is a sweep folder of {len(files)} runs; export one run at a time, "
                         f"e.g. ckpt={files[0].parent.parent}")
    return files[0]


def default_out(checkpoint: Path, fmt: str) -> Path:
    """<run>/export/student.<suffix> for last.ckpt; student-step-NNNNNN.<suffix> for a step checkpoint."""

    name = DEFAULT_NAMES[fmt] if checkpoint.name == LAST else f"{DEFAULT_NAMES[fmt]}-{checkpoint.stem}"
    return StudentCheckpoint.run_folder(checkpoint) / "export" / f"{name}{FORMATS[fmt]}"


def deployed_dtype(requested: str, fmt: str, model_dtype: str) -> str:
    """The dtype of the file's unquantized tensors. `auto`: the teacher's own when it is 16-bit (bf16 for the
    real models, as they ship); float16 for a model computed in float32 (the toy, whose weights ship as
    float16, and the tiny twins). ONNX graphs keep float32 (their float ops take float32 initializers)."""
    if fmt not in ("safetensors", "gguf", "diffusers"):
        return "float32"
    if requested != "auto":
        return requested
    if fmt == "diffusers":
        return "bfloat16"  # diffusers' torchao backend computes integer-weight models in bfloat16
    return model_dtype if model_dtype in SIXTEEN_BITS else "float16"


def report_path(out: Path) -> Path:
    """student.safetensors -> student.safetensors.json: the two formats' reports sit side by side."""
    return out.with_name(out.name + ".json")


def export(cfg: DictConfig) -> dict:
    """Check, write and report, holding one model at a time: the student (its float32 weights mapped from
    the checkpoint, not copied) while writing, then only the written file while checking it."""

    # 1. Everything named must exist and make sense before a model is built.
    check_settings(cfg)
    checkpoint = checkpoint_file(cfg.ckpt)
    stored = StudentCheckpoint.read(checkpoint, model=cfg.get("model"))  # model=: the user's, not the file's
    out = Path(str(cfg.out)).expanduser() if cfg.out else default_out(checkpoint, cfg.format)
    if FORMATS[cfg.format] and out.suffix != FORMATS[cfg.format]:
        raise ValueError(f"out={str(out)!r} must end in {FORMATS[cfg.format]} for format={cfg.format}")
    if cfg.format == "diffusers":
        check_out_folder(out)
    model_cfg = stored.config.model
    family = family_of(model_cfg)
    dtype = deployed_dtype(cfg.dtype, cfg.format, model_cfg.dtype)
    info = {"model": model_cfg.name, "schedule": stored.config.schedule.name,
            "granularity": stored.config.quantizer.granularity, "checkpoint": str(checkpoint), "step": stored.step,
            "weight_bits": stored.weight_bits, "teacher_dtype": model_cfg.dtype, "plain_dtype": dtype,
            "model_config": OmegaConf.to_container(model_cfg, resolve=True)}  # fraqat-eval rebuilds the pipeline

    # 2. Example inputs to trace and check with, and the transformer's structure (the teacher's weights go).
    pipe = load_model(model_cfg).pipe
    example = example_inputs(model_cfg, pipe, cfg.example, cfg.cache_dir)
    skeleton = model_skeleton(pipe.transformer)
    del pipe

    # 3. The student as trained (float32 master weights mapped from the checkpoint), refused if it cannot
    #    deploy, and its output on the example: what the written file must reproduce.
    source = f"checkpoint {str(checkpoint)!r}"
    student, layers, expected, rounding = trained_student(stored, skeleton, family, example, source, dtype)

    # 4. Write into a staging folder beside the target, check, and only then move into place.
    with staging(out) as staged:
        report = write_format(cfg, student, family, example, staged, info, source, dtype)
        expected = report.pop("expected", expected)  # gguf: the student as the file holds it (no activation quant)
        del student, stored  # the checkpoint's mapping closes: the check holds only the file it reloads
        gc.collect()
        report.update({k: v for k, v in info.items() if k != "model_config"}, format=cfg.format, file=str(out),
                      layers=layers)
        if cfg.check:
            report["check"] = {**check_export(cfg, expected, family, example, staged),
                               "unquantized_rounding": rounding}
        # staged beside the file: `staging` moves it in last, so no report ever sits beside a file it does not describe
        atomic_write(report_path(staged), lambda t: Path(t).write_text(json.dumps(report, indent=2, default=str)))
    print_report(report)
    return report


def trained_student(stored, skeleton, family, example: dict, source: str, dtype: str = "float32"):
    """(student as deployed, its deployable layers' records, its output on `example`, how far rounding its
    unquantized tensors to `dtype` moved that output from the float32 student's); ValueError when it cannot
    deploy. The deployed student is the file's model: what the check must reproduce exactly."""

    student = rebuild_student(stored, skeleton)  # a LoRA-QAT student's updates come merged (lora.merge_lora_state)
    layers = {name: layer_record(m) for name, m in deployable_layers(student, source).items()}
    with torch.no_grad():
        float32_output = student_prediction(student, family, example)
        round_unquantized(student, dtype)
        expected = student_prediction(student, family, example) if dtype != "float32" else float32_output
    return student, layers, expected, relative_difference(expected, float32_output)


@contextmanager
def staging(out: Path):
    """Yield a path inside a fresh folder beside `out`; on success move what was written there into place
    (side files first, then `out`, its report last, the old report removed first), on failure remove it all: no
    half-written export is ever visible, and a kill part-way leaves the old file and report, or a file without
    a report, never a report of another file. A folder left by a killed export is removed first."""
    stage, report = out.parent / f".{out.name}.partial", report_path(out)
    shutil.rmtree(stage, ignore_errors=True)
    made = not out.parent.exists()  # a refusal removes the folder it made, too
    stage.mkdir(parents=True)
    try:
        yield stage / out.name
        report.unlink(missing_ok=True)
        for file in sorted(stage.iterdir(), key=lambda f: (f.name == report.name, f.name == out.name)):
            os.replace(file, out.parent / file.name)
        made = False
    finally:
        shutil.rmtree(stage, ignore_errors=True)
        if made and not any(out.parent.iterdir()):
            out.parent.rmdir()


def write_format(cfg: DictConfig, student, family, example: dict, path: Path, info: dict, source: str,
                 dtype: str) -> dict:
    """Write `student` to `path` in `cfg.format`; returns the report's format-specific part (size, inputs)."""

    if cfg.format == "safetensors":
        export_packed(student, path, info, source, dtype)
        report = {}
    elif cfg.format == "onnx":
        report = {"inputs": export_onnx(student, family, example, path, info, source)["inputs"]}
    elif cfg.format == "diffusers":
        return write_diffusers_folder(student, family, example, path, info, source, dtype)
    elif cfg.format == "gguf":
        report = write_gguf(student, family, example, path, cfg.layout, dtype, info, source)
    else:
        written = export_nbits(student, family, example, path, info, source, cfg.runtime.block_size,
                               cfg.runtime.accuracy_level)
        report = {"inputs": written["inputs"], "runtime": OmegaConf.to_container(cfg.runtime)}
    files = sorted(path.parent.iterdir())
    report["files"] = [f.name for f in files]
    report["size"] = size_report(student, sum(f.stat().st_size for f in files), dtype).as_dict()
    if cfg.format == "gguf":  # the Hub's model card beside the file (not part of the model's size)

        report["files"].append(write_card(path, student, info, cfg.layout, source).name)
    return report


def check_export(cfg: DictConfig, expected, family, example: dict, path: Path) -> dict:
    """Run the written file (reloaded, or in onnxruntime) on `example`; ValueError when it differs from the
    student's output `expected` by more than the format's tolerance."""

    with torch.no_grad():
        if cfg.format == "safetensors":
            got, against = student_prediction(load_packed(path).transformer, family, example), "PyTorch student"
        elif cfg.format == "diffusers":
            got = folder_prediction(path, family, example)
            against = "PyTorch student, activations unquantized (diffusers from_pretrained, torchao, bfloat16)"
        elif cfg.format == "gguf":
            got = student_prediction(load_gguf(path), family, example)
            against = "PyTorch student as stored, activations unquantized (diffusers from_single_file)"
        else:
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
    print(f"  size: {s['file_bytes'] / 2**20:.2f} MiB = {s['of_bfloat16']:.3f} of the teacher in bfloat16 "
          f"({s['bfloat16_bytes'] / 2**20:.2f} MiB), {s['of_float32']:.3f} of float32; "
          f"{s['quantized_params']:,}/{s['total_params']:,} parameters quantized, the rest {s['plain_dtype']}")
    if bits:
        print(f"  {len(layers)} quantized layers at {bits} bits, {report['granularity']}")
    if "activation_quantizer_dropped" in report:  # a weight-only format (gguf): what it could not keep
        kept = ("the student's weights kept exactly" if report["weights_exact"] else
                f"fp16 scales moved the output {report['fp16_scales_moved']:.2e} (train with quantizer.scale_dtype="
                f"float16 to keep it exactly)")
        print(f"  {'/'.join(report['tensor_types'])} tensors; {kept}; no activation quantizer: the output moved "
              f"{report['activation_quantizer_dropped']:.2e} (relative)")
        if report.get("dequantized_16bit"):
            print(f"  {len(report['dequantized_16bit'])} quantized convolutions stored dequantized in 16 bits "
                  f"(GGUF has no quantized convolution)")
    if "check" in report:
        c = report["check"]
        print(f"  check against the {c['against']}: relative difference {c['relative_difference']:.2e} "
              f"(tolerance {c['tolerance']:g})")
        if c.get("unquantized_rounding"):
            print(f"  unquantized tensors in {s['plain_dtype']}: the deployed student is "
                  f"{c['unquantized_rounding']:.2e} (relative) from the float32 student")


@hydra.main(config_path="pkg://fraqat_cli.conf", config_name="export", version_base="1.3")
def main(cfg: DictConfig) -> None:
    quiet_console()
    run_reporting_errors("fraqat-export", lambda: export(cfg))


if __name__ == "__main__":
    main()
