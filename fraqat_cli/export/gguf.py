"""`fraqat-export format=gguf`: the student's own codes in GGUF blocks, for diffusers' `from_single_file` and
ComfyUI's GGUF loader.

Quantized linear weights go into blocks packed from the student's codes and scales (`gguf_blocks`), never
through gguf's quantizer (its Q4_0 scale is max/-8, the student's max|w|/7: re-quantizing would change the
trained codes). GGUF scales are fp16: a student trained with `quantizer.scale_dtype=float16` is stored exactly;
otherwise the report says how far fp16 scales moved its output. GGUF keeps no activation quantizer, so the
file's model is the student with full-precision activations; the report says how far that moved it too.
Unquantized tensors keep the export's 16-bit dtype where diffusers' loader can take it: BF16 only for linear
weights (its GGUF linear layer dequantizes them; any other module would receive BF16's raw bytes); the rest of
a bf16 model as F16, which holds bf16 values exactly down to F16's smallest normal, 6.1e-5 (below it, to within
3e-8), or as F32 where a value exceeds F16's range.
Quantized 1x1 and depthwise convolutions have no GGUF linear type: they are stored dequantized, in 16 bits, and
listed in the report.
"""

from __future__ import annotations

import json
import logging
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import diffusers
import numpy as np
import torch
from gguf import GGMLQuantizationType, GGUFReader, GGUFWriter
from torch import nn

from fraqat_cli.export.deploy_checks import deployable_layers, layer_record
from fraqat_cli.export.example_inputs import relative_difference, student_prediction
from fraqat_cli.export.gguf_blocks import BLOCK, block_type, block_view, check_group_size, pack_blocks
from fraqat_cli.export.gguf_keys import TABLES, original_layout
from fraqat_cli.export.model_card import model_card
from fraqat_cli.export.safetensors_file import QUANTIZER_PARTS, _config_of
from fraqat_cli.files import atomic_write
from fraqat_cli.models.dtype_keyword import diffusers_dtype
from fraqat_cli.quant import set_activation_bits

Q = GGMLQuantizationType
# The diffusers classes whose GGUF files `from_single_file` loads, by the GGUF architecture name written for them
# (ComfyUI-GGUF reads "flux" and "sd3" from general.architecture). PixArt has no GGUF loader in diffusers.
ARCHITECTURES = {"FluxTransformer2DModel": "flux", "SD3Transformer2DModel": "sd3", "SanaTransformer2DModel": "sana"}
LAYOUTS = ("diffusers", "original")
CONFIG_KEY = "fraqat.transformer_config"  # the transformer's diffusers config, JSON: what `config=` needs
# diffusers' convert_flux_transformer_checkpoint_to_diffusers hard-codes inner_dim = 3072 (FLUX.1's width).
FLUX_WIDTH = 3072


@dataclass
class Stored:
    """One tensor as the file holds it: blocks (uint8, rows x bytes) or plain values, and its GGUF type."""

    array: np.ndarray
    qtype: GGMLQuantizationType


def gguf_architecture(student: nn.Module, layout: str) -> str:
    """The GGUF architecture of `student`'s class; ValueError for a class or layout no loader takes."""
    name = type(student).__name__
    if name == "PixArtTransformer2DModel":
        raise ValueError("PixArt has no GGUF loader in diffusers (from_single_file does not read PixArt GGUFs); "
                         "export format=diffusers (a folder from_pretrained loads) or format=safetensors")
    if name not in ARCHITECTURES:
        raise ValueError(f"{name} has no GGUF loader in diffusers; format=gguf is offered for FLUX, SD3 and Sana")
    if layout not in LAYOUTS:
        raise ValueError(f"layout={layout!r} is not offered; allowed: {', '.join(LAYOUTS)}")
    arch = ARCHITECTURES[name]
    if layout == "original" and arch not in TABLES:
        raise ValueError(f"layout=original is offered for {', '.join(TABLES)} (the original checkpoints ComfyUI "
                         f"loads), not {arch}; use layout=diffusers")
    width = student.config.num_attention_heads * student.config.attention_head_dim
    if layout == "original" and arch == "flux" and width != FLUX_WIDTH:
        raise ValueError(f"layout=original needs FLUX.1's width {FLUX_WIDTH} (diffusers' converter assumes it when "
                         f"it splits the fused single-block tensors); this FLUX is {width} wide: use layout=diffusers")
    return arch


def quantized_tensor(layer, name: str) -> tuple[Stored, torch.Tensor]:
    """A quantized linear layer's blocks, and the float32 weight they hold (codes x fp16 scale, + fp16 offset)."""
    record = layer_record(layer)
    spec = layer.weight_quantizer.spec
    check_group_size(spec.group_size)
    qtype = block_type(record["bits"], spec.symmetric, name)
    codes, scale, offset = layer.weight_codes(record["bits"])
    rows, cols = codes.shape
    scale = block_view(scale, spec, rows, cols, name).half().float()  # (rows, cols / 32) fp16 scales
    offset = block_view(offset, spec, rows, cols, name).half().float() if offset is not None else None
    blocks = pack_blocks(codes, scale, offset, qtype)
    weight = codes.float().reshape(rows, -1, BLOCK).mul(scale.unsqueeze(-1))  # (rows, blocks, 32)
    if offset is not None:
        weight = weight.add(offset.unsqueeze(-1))
    return Stored(blocks, qtype), weight.reshape(layer.weight.shape)


def plain_tensor(value: torch.Tensor, dtype: str, linear_weight: bool) -> Stored:
    """An unquantized tensor in the export's dtype (BF16 only for linear weights: see the module docstring)."""
    value = value.detach().cpu()
    if not value.is_floating_point():
        return Stored(value.numpy(), Q.I64 if value.dtype == torch.int64 else Q.I32)
    if dtype == "bfloat16" and linear_weight:
        return Stored(value.to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16), Q.BF16)
    if dtype == "bfloat16":  # F16 has 3 more mantissa bits than bf16 but less range: F32 past F16's largest value
        dtype = "float16" if value.numel() == 0 or bool(value.abs().max() <= torch.finfo(torch.float16).max) \
            else "float32"
    qtype = Q.F16 if dtype == "float16" else Q.F32
    return Stored(value.to(torch.float16 if qtype == Q.F16 else torch.float32).numpy(), qtype)


def stored_tensors(student: nn.Module, layers: dict, dtype: str) -> tuple[dict[str, Stored], dict, list[str]]:
    """Every tensor of the student's state dict as stored (diffusers names, state-dict order), the float32
    weights the file holds for its quantized layers, and the quantized layers stored dequantized."""
    linear_weights = {f"{n}.weight" for n, m in student.named_modules() if isinstance(m, nn.Linear)}
    stored, weights, dequantized = {}, {}, []
    for key, value in student.state_dict(keep_vars=True).items():
        if QUANTIZER_PARTS & set(key.split(".")):
            continue
        name = key.removesuffix(".weight")
        if name in layers and layers[name].kind == "linear":
            stored[key], weights[name] = quantized_tensor(layers[name], name)
        elif name in layers:  # a quantized convolution (no GGUF type): its dequantized weight, in 16 bits
            with torch.no_grad():
                weight = layers[name].quantize_weight()
            stored[key] = plain_tensor(weight, "float32" if dtype == "float32" else "float16", False)
            weights[name] = torch.from_numpy(stored[key].array).float()
            dequantized.append(name)
        else:
            stored[key] = plain_tensor(value, dtype, key in linear_weights)
    return stored, weights, dequantized


def fused(stored: dict[str, Stored], arch: str, num_layers: int) -> dict[str, Stored]:
    """`stored` under the original checkpoint's names: q/k/v (and FLUX's MLP input) rows concatenated."""
    out = {}
    for tensor in original_layout(list(stored), arch, num_layers):
        parts = [stored[p] for p in tensor.parts]
        if len({p.qtype for p in parts}) > 1:
            kinds = ", ".join(f"{name} as {p.qtype.name}" for name, p in zip(tensor.parts, parts))
            raise ValueError(f"layout=original fuses {kinds} into {tensor.name!r}; quantize all of them at the "
                             f"same bits or none (quantizer selection), or use layout=diffusers")
        array = np.concatenate([p.array for p in parts], axis=0)
        if tensor.swap_halves:
            first, second = np.split(array, 2, axis=0)
            array = np.concatenate([second, first], axis=0)
        out[tensor.name] = Stored(np.ascontiguousarray(array), parts[0].qtype)
    return out


def write_file(path: str, arch: str, stored: dict[str, Stored], config: dict, info: dict) -> None:
    logging.getLogger("gguf.gguf_writer").setLevel(logging.WARNING)  # its INFO lines would join the report
    writer = GGUFWriter(path, arch)
    writer.add_quantization_version(2)  # GGML_QNT_VERSION: the block layouts of ggml-common.h
    writer.add_string(CONFIG_KEY, json.dumps(config))
    writer.add_string("fraqat.info", json.dumps(info, default=str))
    for name, tensor in stored.items():
        writer.add_tensor(name, tensor.array, raw_dtype=tensor.qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def write_gguf(student: nn.Module, family, example: dict, path: Path, layout: str, dtype: str, info: dict,
               source: str) -> dict:
    """Write `student` to `path` as GGUF; returns the report's part, with `expected`: the output of the model
    the file holds (the student as stored, activations in full precision), which the check must reproduce."""
    arch = gguf_architecture(student, layout)
    layers = deployable_layers(student, source)
    stored, weights, dequantized = stored_tensors(student, layers, dtype)
    if layout == "original":
        stored = fused(stored, arch, student.config.num_layers)
    config = _config_of(student)
    atomic_write(Path(path), lambda tmp: write_file(tmp, arch, stored, config, info))
    expected, movement = file_model_output(student, family, example, layers, weights)
    types = sorted({t.qtype.name for t in stored.values()})
    return {"expected": expected, "layout": layout, "architecture": arch, "tensor_types": types,
            "dequantized_16bit": dequantized, **movement}


def write_card(path: Path, student: nn.Module, info: dict, layout: str, source: str) -> Path:
    """The Hub's model card beside the file (`README.md` of its folder): recipe, evaluation, loading lines."""

    records = {name: layer_record(m) for name, m in deployable_layers(student, source).items()}
    checkpoint = Path(info["checkpoint"]) if info.get("checkpoint") else None
    card = model_card("gguf", info, records, checkpoint=checkpoint, file_name=Path(path).name, layout=layout)
    readme = Path(path).parent / "README.md"
    atomic_write(readme, lambda tmp: Path(tmp).write_text(card))
    return readme


@torch.no_grad()
def file_model_output(student: nn.Module, family, example: dict, layers: dict, weights: dict):
    """The output of the model the file holds, and how far each thing GGUF cannot keep moved the student's:
    its activation quantizer, and its float32 scales (0 and exact weights when trained on the fp16 grid)."""
    full = student_prediction(student, family, example)
    with stored_weights(student, layers, weights, weights_too=False):
        weight_only = student_prediction(student, family, example)
    with stored_weights(student, layers, weights):
        as_file = student_prediction(student, family, example)
    exact = all(torch.equal(weights[name], layer.quantize_weight()) for name, layer in layers.items()
                if layer.kind == "linear")  # the blocks; convolutions are stored dequantized, rounded to 16 bits
    return as_file, {"weights_exact": exact,
                     "fp16_scales_moved": relative_difference(as_file, weight_only),
                     "activation_quantizer_dropped": relative_difference(weight_only, full)}


@contextmanager
def stored_weights(student: nn.Module, layers: dict, weights: dict, weights_too: bool = True):
    """Inside: the student with full-precision activations and (`weights_too`) its quantized layers holding
    the file's weights as they are (weight quantizers off); everything restored on the way out."""
    saved = {name: (layer.weight.data, layer.weight_bits, layer.input_quantizer.current_bits)
             for name, layer in layers.items()}
    set_activation_bits(student, None)
    if weights_too:
        for name, layer in layers.items():
            layer.weight.data = weights[name].reshape(layer.weight.shape).to(layer.weight.dtype)
            layer.weight_quantizer.set_bits(None)
    try:
        yield student
    finally:
        for name, (weight, bits, activation_bits) in saved.items():
            layers[name].weight.data = weight
            layers[name].weight_quantizer.set_bits(bits)
            layers[name].input_quantizer.set_bits(activation_bits)


def read_string(reader: GGUFReader, key: str) -> str:
    field = reader.fields[key]
    return bytes(field.parts[field.data[0]]).decode("utf-8")


def load_gguf(path: Path, compute_dtype: torch.dtype = torch.float32) -> nn.Module:
    """The transformer as diffusers' own `from_single_file` loads the file (GGUFLinear layers). The class comes
    from the file's architecture through `ARCHITECTURES` (nothing named inside the file is imported); the
    config from the file's metadata, written to a temporary folder as `config=` expects."""

    reader = GGUFReader(str(path))
    arch = read_string(reader, "general.architecture")
    classes = {a: c for c, a in ARCHITECTURES.items()}
    if arch not in classes:
        raise ValueError(f"{str(path)!r} is a GGUF of architecture {arch!r}; fraqat loads {', '.join(classes)}")
    config = json.loads(read_string(reader, CONFIG_KEY))
    del reader
    cls = getattr(diffusers, classes[arch])
    with tempfile.TemporaryDirectory() as folder:
        (Path(folder) / "transformer").mkdir()
        (Path(folder) / "transformer" / "config.json").write_text(json.dumps({**config, "_class_name": cls.__name__}))
        quantization = diffusers.GGUFQuantizationConfig(compute_dtype=compute_dtype)
        model = cls.from_single_file(str(path), config=folder, subfolder="transformer",
                                     quantization_config=quantization, **diffusers_dtype(compute_dtype))
    return model.eval()
