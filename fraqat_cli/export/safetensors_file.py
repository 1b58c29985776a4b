"""A quantized student as one safetensors file of integer codes, and the loader that runs it again.

Each quantized layer keeps `<layer>.weight.codes` (4-bit codes two to a byte,
wider ones as int8/int16), `<layer>.weight.scale` and, for the asymmetric range,
`<layer>.weight.offset` (the range's minimum: the paper's wide range starts at
min(x) itself, not at a code, so an integer zero point could not reproduce it).
Every other floating-point tensor is stored in the deployment's 16-bit dtype (what the
teacher ships: bf16 for the real models), or float32 on request. The metadata says how
to rebuild the transformer (class and config) and each layer's kind, bits, granularity
and activation quantizer, so the file alone is the model: no checkpoint, no hub.
"""

from __future__ import annotations

import json
import math
from contextlib import contextmanager
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import torch
from hydra.utils import get_class
from omegaconf import OmegaConf
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from fraqat_cli.export.deploy_checks import deployable_layers, layer_record
from fraqat_cli.files import atomic_write
from fraqat_cli.quant import PASS_THROUGH_BITS, QuantConv2d, QuantizedLayer, QuantLinear, QuantSpec
from fraqat_cli.quant.fake_quant import dequantize_codes
from fraqat_cli.quant.packing import pack_codes, storage_of, unpack_codes
from fraqat_cli.stored_config import check_transformer_class

# /2: unquantized tensors in a 16-bit dtype, 1x1 and depthwise convolutions, a record per layer kind.
FORMAT = "fraqat-packed/2"
QUANTIZER_PARTS = {"weight_quantizer", "input_quantizer"}  # their buffers are rebuilt from the metadata
PLAIN_DTYPES = ("bfloat16", "float16", "float32")


@dataclass(frozen=True)
class SizeReport:
    """Bytes on disk against the same model's every floating-point tensor in float32 and in 16 bits (the
    teacher's file as bf16/fp16 models ship: a safetensors header aside, half the float32 bytes)."""

    file_bytes: int
    float32_bytes: int
    quantized_params: int
    total_params: int
    plain_dtype: str = "float32"  # the dtype the file keeps its unquantized tensors in

    @property
    def of_float32(self) -> float:
        return self.file_bytes / self.float32_bytes

    @property
    def of_bfloat16(self) -> float:
        return self.file_bytes / (self.float32_bytes / 2)

    def as_dict(self) -> dict:
        return {"file_bytes": self.file_bytes, "float32_bytes": self.float32_bytes,
                "bfloat16_bytes": self.float32_bytes // 2, "of_float32": self.of_float32,
                "of_bfloat16": self.of_bfloat16, "quantized_params": self.quantized_params,
                "total_params": self.total_params, "plain_dtype": self.plain_dtype}

    def __str__(self) -> str:
        return (f"{self.file_bytes / 2**20:.2f} MiB on disk = {self.of_bfloat16:.3f} of the teacher in bfloat16 "
                f"({self.float32_bytes / 2**21:.2f} MiB), {self.of_float32:.3f} of float32; "
                f"{self.quantized_params:,}/{self.total_params:,} parameters quantized, the rest {self.plain_dtype}")


def _plain_state(student: nn.Module, layers: dict[str, QuantizedLayer]) -> dict[str, torch.Tensor]:
    """Every tensor of the student except the quantized weights and the quantizers' own buffers."""
    return {k: v.detach() for k, v in _plain_state_vars(student, layers).items()}


def _plain_state_vars(student: nn.Module, layers: dict[str, QuantizedLayer]) -> dict[str, torch.Tensor]:
    quantized_weights = {f"{name}.weight" for name in layers}
    return {k: v for k, v in student.state_dict(keep_vars=True).items()
            if k not in quantized_weights and not QUANTIZER_PARTS & set(k.split("."))}


def plain_dtype(name: str) -> torch.dtype:
    if name not in PLAIN_DTYPES:
        raise ValueError(f"dtype={name!r} is not offered for unquantized tensors; allowed: {', '.join(PLAIN_DTYPES)}")
    return getattr(torch, name)


@torch.no_grad()
def round_unquantized(student: nn.Module, dtype: str) -> nn.Module:
    """Round the unquantized floating-point tensors the file holds (the state dict's: tables computed at
    construction are not stored) through `dtype`, kept float32, in place: the model the file holds, so the
    check compares like with like. ValueError when a value overflows `dtype`."""
    target = plain_dtype(dtype)
    if target == torch.float32:
        return student
    layers = {name: m for name, m in student.named_modules() if isinstance(m, QuantizedLayer)}
    for name, tensor in _plain_state_vars(student, layers).items():
        if not tensor.is_floating_point():
            continue
        rounded = tensor.to(target)
        if bool(torch.isinf(rounded).any()) and not bool(torch.isinf(tensor).any()):
            raise ValueError(f"tensor {name!r} overflows {dtype} (max |value| {float(tensor.abs().max()):.3g}); "
                             f"export with dtype=bfloat16 or dtype=float32")
        tensor.data = rounded.to(tensor.dtype)
    return student


def export_packed(student: nn.Module, path: Path, info: dict, source: str = "the student",
                  dtype: str = "float32") -> SizeReport:
    """Write `student` (a diffusers transformer with quantized layers) to `path` atomically, its
    unquantized floating-point tensors in `dtype` (bfloat16, float16 or float32).

    `info`: JSON-able facts stored in the metadata (model name, schedule, checkpoint).
    """
    target = plain_dtype(dtype)
    layers = deployable_layers(student, source)
    tensors: dict[str, torch.Tensor] = {}
    records = {}
    with torch.no_grad():
        for name, layer in layers.items():
            record = layer_record(layer)
            spec = layer.weight_quantizer.spec
            codes, scale, offset = layer.weight_codes(record["bits"])
            tensors[f"{name}.weight.codes"] = pack_codes(codes, record["bits"], spec.symmetric)
            tensors[f"{name}.weight.scale"] = scale
            if offset is not None:
                tensors[f"{name}.weight.offset"] = offset
            records[name] = {**record, "storage": storage_of(record["bits"], spec.symmetric)}
    seen: set[int] = set()
    for key, value in _plain_state(student, layers).items():
        value = value.detach().cpu()
        value = (value.to(target) if value.is_floating_point() else value).contiguous()
        tensors[key] = value.clone() if value.data_ptr() in seen else value  # safetensors refuses shared memory
        seen.add(value.data_ptr())
    cls = type(student)
    metadata = {
        "format": FORMAT,
        "fraqat_version": _version(),
        "plain_dtype": dtype,
        "transformer_class": f"{cls.__module__}.{cls.__qualname__}",
        "transformer_config": json.dumps(_config_of(student)),
        "layers": json.dumps(records),
        "info": json.dumps(info, default=str),
    }

    atomic_write(Path(path), lambda tmp: save_file(tensors, tmp, metadata=metadata))
    return size_report(student, Path(path).stat().st_size, dtype)


def _version() -> str:
    try:
        return version("fraqat-cli")
    except PackageNotFoundError:
        return "unknown"


def size_report(student: nn.Module, file_bytes: int, dtype: str = "float32") -> SizeReport:
    """`file_bytes` against the student's every floating-point tensor (parameters and buffers) in float32."""
    quantized = sum(m.weight.numel() for m in student.modules()
                    if isinstance(m, QuantizedLayer) and m.weight_bits < PASS_THROUGH_BITS)
    float32_bytes = 4 * sum(v.numel() for v in _plain_state(student, {}).values() if v.is_floating_point())
    total = sum(p.numel() for p in student.parameters())
    return SizeReport(file_bytes, float32_bytes, quantized, total, dtype)


def _config_of(model: nn.Module) -> dict:
    """The diffusers config that rebuilds `model`, as plain JSON (tiny models built by Hydra carry ListConfigs)."""

    config = getattr(model, "config", None)
    if config is None or not hasattr(model, "from_config"):
        raise ValueError(f"{type(model).__name__} is not a diffusers model (no config to rebuild it from)")
    plain = lambda value: OmegaConf.to_container(value) if OmegaConf.is_config(value) else str(value)  # noqa: E731
    return json.loads(json.dumps(dict(config), default=plain))


@dataclass
class PackedStudent:
    """A loaded export: the transformer (float32, computing what the fake-quantized student computed),
    the per-layer records and the stored facts."""

    transformer: nn.Module
    layers: dict[str, dict]
    info: dict


def read_metadata(path: Path) -> dict[str, str]:
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(
            f"{str(path)!r} does not exist; give a file written by fraqat-export format=safetensors")
    try:
        with safe_open(str(path), "pt") as f:
            metadata = f.metadata() or {}
    except Exception as error:
        raise ValueError(f"{str(path)!r} is not a safetensors file ({type(error).__name__}: {error})") from error
    written = metadata.get("format")
    if written is not None and written.startswith("fraqat-packed/") and written != FORMAT:
        raise ValueError(f"{str(path)!r} was written by another fraqat version (format {written!r}, fraqat "
                         f"{metadata.get('fraqat_version', 'before 0.2')}); this one reads {FORMAT!r}: export the "
                         f"checkpoint again with this fraqat-export")
    if written != FORMAT:
        raise ValueError(f"{str(path)!r} is not a fraqat export (format {written!r}, "
                         f"expected {FORMAT!r}); write one with fraqat-export format=safetensors")
    return metadata


def load_packed(path: Path | str) -> PackedStudent:
    """Rebuild the transformer from an `export_packed` file: codes dequantized exactly, activations
    fake-quantized as in training, unquantized tensors widened from the file's dtype to float32. Tensors
    are read one at a time into a model built without weights, so the peak is the float32 model itself."""

    path = Path(path).expanduser()
    metadata = read_metadata(path)
    # a file names its class; only a transformer class a model config of fraqat's names is ever imported
    cls = get_class(check_transformer_class(metadata.get("transformer_class"), f"{str(path)!r}"))
    with parameters_on_meta():
        model = cls.from_config(json.loads(metadata["transformer_config"]))
    records = json.loads(metadata["layers"])
    state = {}
    with safe_open(str(path), "pt") as f:
        keys = set(f.keys())
        get = lambda key: _stored_tensor(f, keys, key, path)  # noqa: E731
        for key in keys:
            if not key.endswith((".weight.codes", ".weight.scale", ".weight.offset")):
                value = f.get_tensor(key)
                state[key] = value.float() if value.is_floating_point() else value
        for layer_name, record in records.items():
            spec = QuantSpec(record["granularity"], record["group_size"], record["symmetric"], record["rounding"])
            shape = tuple(record["shape"])
            matrix = (shape[0], math.prod(shape[1:]))  # codes and scales are laid out over the matrix view
            codes = unpack_codes(get(f"{layer_name}.weight.codes"), record["bits"], spec.symmetric, matrix)
            offset = get(f"{layer_name}.weight.offset") if not spec.symmetric else None
            weight = dequantize_codes(codes, get(f"{layer_name}.weight.scale"), offset, spec)
            state[f"{layer_name}.weight"] = weight.reshape(shape)
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    if missing:
        raise ValueError(f"{str(path)!r} lacks tensor {missing[0]!r} of {metadata['transformer_class']}"
                         + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else "")
                         + "; the file is incomplete: export it again")
    if unexpected:
        raise ValueError(f"{str(path)!r} holds tensor {unexpected[0]!r}, which {metadata['transformer_class']} "
                         f"built from the file's config does not have; the file does not match its metadata")
    info = json.loads(metadata.get("info", "{}"))
    _round_tables_as_trained(model, state.keys(), info.get("teacher_dtype"))
    for layer_name, record in records.items():
        _swap_in(model, layer_name, record)
    return PackedStudent(model.eval(), records, info)


def _round_tables_as_trained(model: nn.Module, stored, teacher_dtype: str | None) -> None:
    """Tables computed at construction (positional embeddings: no file holds them) as the student had them.
    The student was copied from a teacher in `teacher_dtype`, so its tables passed through that dtype once;
    a freshly built float32 table would differ by that rounding (1e-3 relative for a bf16 PixArt)."""
    dtype = getattr(torch, teacher_dtype) if teacher_dtype else None
    if dtype is None or dtype == torch.float32:
        return
    with torch.no_grad():
        for name, buffer in model.named_buffers():
            if name not in stored and buffer.is_floating_point() and buffer.dtype == torch.float32:
                buffer.copy_(buffer.to(dtype).to(torch.float32))


@contextmanager
def parameters_on_meta():
    """Build modules whose parameters live on the meta device (no memory, initialisation a no-op) while
    buffers are made as usual: tables computed at construction (positional embeddings), which no file
    holds, stay real. The trick accelerate's `init_empty_weights` uses; accelerate is not a dependency."""
    register = nn.Module.register_parameter

    def register_on_meta(module, name, param):
        register(module, name, param)
        if param is not None:
            module._parameters[name] = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)

    nn.Module.register_parameter = register_on_meta
    try:
        yield
    finally:
        nn.Module.register_parameter = register


def _stored_tensor(f, keys: set[str], key: str, path: Path) -> torch.Tensor:
    if key not in keys:
        raise ValueError(f"{str(path)!r} lacks tensor {key!r}, which its layer records need; the file is "
                         f"incomplete: export it again")
    return f.get_tensor(key)


def _swap_in(model: nn.Module, name: str, record: dict) -> None:
    """Put a quantized layer of the record's kind at `name` whose weight is used as loaded (already on the
    grid) and whose input is quantized as the record says."""
    act = record["activation"]
    settings = dict(
        weight_bits=None, activation_bits=act["bits"],
        activation_spec=QuantSpec(act["granularity"], act["group_size"], act["symmetric"], act["rounding"]),
        static_activations=act["static"],
    )
    plain = model.get_submodule(name)
    layer = (QuantLinear.from_linear(plain, **settings) if record.get("kind", "linear") == "linear"
             else QuantConv2d.from_conv(plain, **settings))
    if act["range"] is not None:
        layer.input_quantizer.range_min.fill_(act["range"][0])
        layer.input_quantizer.range_max.fill_(act["range"][1])
    model.set_submodule(name, layer)
