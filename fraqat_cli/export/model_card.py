"""The model card (README.md) of an exported folder: what the Hub shows and indexes, and how to load the student.

`model_card(fmt, info, layers, ...)` returns the card's text for `fmt` ("diffusers": a torchao folder;
"gguf": a GGUF file beside it). The YAML header is the Hub's metadata (`base_model_relation: quantized` files
the model under its base model's quantizations); the body is the recipe, the student's `fraqat-eval` results
when an evaluation of this checkpoint exists in its run folder, and copy-paste loading code. The folder then
uploads as it is (`hf upload <repo> <folder>`); fraqat has no upload code.
"""

from __future__ import annotations

import json
from pathlib import Path

FORMAT_TAGS = {"diffusers": ["torchao"], "gguf": ["gguf"]}
EVAL_METRICS = ("fid", "kid", "clip_score", "clip_fid", "fid_val", "attribute_accuracy")  # as fraqat-eval's summary


def model_card(fmt: str, info: dict, layers: dict[str, dict], *, checkpoint: Path | None = None,
               pipeline: bool = False, file_name: str | None = None, layout: str | None = None) -> str:
    """The card for an export of format `fmt` ("diffusers" or "gguf"). `info`: the export's facts (model,
    schedule, granularity, step, weight_bits, model_config); `layers`: the deployed layers' records
    (`deployable.layer_record`); `checkpoint`: where to look for the student's evaluations; `pipeline`: the
    folder holds the whole pipeline (diffusers); `file_name` and `layout`: the GGUF file and its key layout."""
    if fmt not in FORMAT_TAGS:
        raise ValueError(f"no model card for format {fmt!r}; allowed: {', '.join(FORMAT_TAGS)}")
    model_cfg = info.get("model_config") or {}
    base = model_cfg.get("hub_id")
    bits = sorted({r["bits"] for r in layers.values()})
    title = f"{info.get('model')} student, W{'/'.join(map(str, bits))}, trained with fraqat"
    sections = [
        _metadata(fmt, base, model_cfg, bits),
        f"# {title}\n",
        _summary(fmt, base, info, layers),
        _recipe(info, layers),
        _evaluation(checkpoint),
        _loading(fmt, base, model_cfg, pipeline, file_name, layout),
    ]
    return "\n".join(s for s in sections if s)


def _metadata(fmt: str, base: str | None, model_cfg: dict, bits: list[int]) -> str:
    tags = ["fraqat", "quantization-aware-training", "text-to-image", *FORMAT_TAGS[fmt],
            *(f"int{b}" for b in bits), _short_class(model_cfg.get("transformer_class"))]
    lines = ["---", "library_name: diffusers", "pipeline_tag: text-to-image"]
    if base:  # the Hub's model tree wants a repository id; a local or tiny teacher has none
        lines += [f"base_model: {base}", "base_model_relation: quantized"]
    lines.append("tags:")
    lines += [f"- {tag}" for tag in dict.fromkeys(t for t in tags if t)]
    return "\n".join([*lines, "---", ""])


def _short_class(dotted: str | None) -> str | None:
    return dotted.rpartition(".")[2] if dotted else None


def _summary(fmt: str, base: str | None, info: dict, layers: dict[str, dict]) -> str:
    what = {"diffusers": "a diffusers folder whose transformer weights are torchao `IntxUnpackedToInt8Tensor`s "
                         "(weight-only integer codes, one scale per block)",
            "gguf": "a GGUF file of the transformer (llama.cpp block types, dequantized on the fly by the loader)"}
    teacher = f"[{base}](https://huggingface.co/{base})" if base else f"the `{info.get('model')}` teacher"
    activations = {r.get("activation", {}).get("bits") for r in layers.values()} - {None}
    dropped = (f" Training also quantized the layers' input activations (to {'/'.join(map(str, sorted(activations)))} "
               f"bits); this weight-only format computes them in 16 bits." if activations else "")
    return (f"A quantization-aware-trained (QAT) student of {teacher}, distilled from it with fraqat (fractional-bit "
            f"QAT) and exported as {what[fmt]}. The weights are the student's own trained codes and scales, written "
            f"as they are: no post-training quantizer re-rounded them.{dropped}\n")


def _recipe(info: dict, layers: dict[str, dict]) -> str:
    first = next(iter(layers.values()), {})
    activation = first.get("activation", {})
    rows = [("teacher", info.get("model")), ("schedule", info.get("schedule")),
            ("weight bits", ", ".join(str(b) for b in sorted({r["bits"] for r in layers.values()}))),
            ("granularity", info.get("granularity")), ("group size", first.get("group_size")),
            ("symmetric", first.get("symmetric")), ("rounding", first.get("rounding")),
            ("activation bits (training)", activation.get("bits")),
            ("quantized layers", f"{len(layers)} ({', '.join(sorted({r['kind'] for r in layers.values()}))})"),
            ("training steps", info.get("step")), ("unquantized tensors", info.get("plain_dtype"))]
    table = "\n".join(f"| {k} | {v} |" for k, v in rows if v is not None)
    return f"## Recipe\n\n| | |\n|---|---|\n{table}\n"


def student_evaluations(checkpoint: Path | None) -> list[dict]:
    """The `fraqat-eval` results of `checkpoint` found in its run folder (`<run>/eval/*/results.json`, where
    fraqat-eval writes a student's), newest first; read as data, only the metrics kept."""
    if checkpoint is None:
        return []
    run = Path(checkpoint).parent.parent  # <run>/checkpoints/<name>.ckpt
    found = []
    for path in sorted(run.glob("eval/*/results.json"), key=lambda p: p.stat().st_mtime, reverse=True):
        try:
            results = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if isinstance(results, dict) and Path(str(results.get("checkpoint"))).name == Path(checkpoint).name:
            found.append(results)
    return found


def _evaluation(checkpoint: Path | None) -> str:
    results = student_evaluations(checkpoint)
    if not results:
        return ("## Evaluation\n\nNo `fraqat-eval` result of this checkpoint was found beside it; run "
                "`fraqat-eval ckpt=<run>` and export again to include it.\n")
    metrics = [m for m in EVAL_METRICS if any(isinstance(r.get(m), (int, float)) for r in results)]
    header = "| images | reference | " + " | ".join(metrics) + " |"
    lines = [header, "|" + "---|" * (2 + len(metrics))]
    for r in results[:1]:  # the newest evaluation of this checkpoint
        values = " | ".join(f"{r[m]:.4g}" if isinstance(r.get(m), (int, float)) else "-" for m in metrics)
        lines.append(f"| {r.get('num_images')} | {r.get('reference')} | {values} |")
    return ("## Evaluation\n\nThe student (fake-quantized, as trained) by `fraqat-eval`, against its teacher's "
            "images for the same prompts and seeds (FID, KID: lower is closer):\n\n" + "\n".join(lines) + "\n")


def _loading(fmt: str, base: str | None, model_cfg: dict, pipeline: bool, file_name: str | None,
             layout: str | None) -> str:
    pipeline_cls = _short_class(model_cfg.get("pipeline")) or "DiffusionPipeline"
    transformer_cls = _short_class(model_cfg.get("transformer_class")) or "AutoModel"
    if fmt == "diffusers":
        code = ["import torch", f"from diffusers import {'' if pipeline else 'AutoModel, '}DiffusionPipeline", ""]
        if pipeline:
            code.append('pipe = DiffusionPipeline.from_pretrained("<this folder or repo>", torch_dtype=torch.bfloat16)')
        else:
            code += ['transformer = AutoModel.from_pretrained("<this folder or repo>", subfolder="transformer",',
                     "                                        torch_dtype=torch.bfloat16)",
                     f'pipe = DiffusionPipeline.from_pretrained("{base or "<the teacher>"}", transformer=transformer,',
                     "                                         torch_dtype=torch.bfloat16)"]
        code.append('image = pipe("a red circle on a blue background").images[0]')
        notes = ("Needs `pip install diffusers torchao`. diffusers' torchao backend computes integer weights in "
                 "bfloat16; the weights dequantize on every forward, and torchao's int kernels are faster than "
                 "bfloat16 only under `torch.compile` on a GPU. Loaded with `torch_dtype=torch.float32` the layers "
                 "compute the student's weights exactly.")
        return "## Use it\n\n```python\n" + "\n".join(code) + f"\n```\n\n{notes}\n"
    name = file_name or "<file>.gguf"
    code = ["import torch", f"from diffusers import {pipeline_cls}, {transformer_cls}, GGUFQuantizationConfig", "",
            f'transformer = {transformer_cls}.from_single_file(',
            f'    "<this folder>/{name}", config="{base or "<the teacher folder>"}", subfolder="transformer",',
            "    quantization_config=GGUFQuantizationConfig(compute_dtype=torch.bfloat16), torch_dtype=torch.bfloat16)",
            f'pipe = {pipeline_cls}.from_pretrained("{base or "<the teacher>"}", transformer=transformer,',
            "                                 torch_dtype=torch.bfloat16)"]
    comfy = (f"ComfyUI: put `{name}` in `models/unet/` and load it with the *Unet Loader (GGUF)* node of "
             f"[ComfyUI-GGUF](https://github.com/city96/ComfyUI-GGUF)"
             + (" (this file uses the original checkpoint's key names, as that loader expects)."
                if layout == "original" else "; it expects `layout=original` files (the original checkpoint's key "
                                             "names): export with that layout for ComfyUI."))
    return "## Use it\n\n```python\n" + "\n".join(code) + f"\n```\n\n{comfy}\n"
