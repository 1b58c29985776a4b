"""A student as a diffusers folder: `AutoModel.from_pretrained` loads it with torchao weights, no fraqat import.

The folder is what `save_pretrained` writes for a torchao-quantized transformer, built from the student's own
integer codes and scales rather than by torchao's quantizer (which would choose its own scales and re-round
the trained weights):

    <out>/transformer/config.json                        the transformer's config + a `quantization_config`
    <out>/transformer/diffusion_pytorch_model.safetensors codes and scales as `IntxUnpackedToInt8Tensor` parts
    <out>/model_index.json, vae/, text_encoder/, ...      the pipeline around it, when the teacher is local
    <out>/README.md                                       the model card (`fraqat_cli.export.model_card`)

Each quantized weight is an `IntxUnpackedToInt8Tensor`: int8 `qdata` holding the codes, one scale per
block (the student's granularity as torchao's `block_size`) and a zero zero-point; it dequantizes as
`qdata * scale`, which is the student's `codes * scale`. diffusers writes such tensors to safetensors through
torchao's `flatten_tensor_state_dict` (plain tensors plus JSON metadata naming classes from torchao's fixed
allow-list), and reads them back the same way: nothing is unpickled. What the format loses is the activation
quantizer: torchao's weight-only layers take their input as it comes, in bfloat16 (the backend's compute
dtype for integer weights).
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import diffusers
import torch
from diffusers import TorchAoConfig
from hydra.utils import get_class
from omegaconf import DictConfig, OmegaConf
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from fraqat_cli.export.deploy_checks import deployable_layers, layer_record
from fraqat_cli.export.example_inputs import relative_difference, student_prediction
from fraqat_cli.export.model_card import model_card
from fraqat_cli.export.safetensors_file import _config_of, _plain_state, size_report
from fraqat_cli.models.dtype_keyword import diffusers_dtype
from fraqat_cli.models.loading import load_pipeline
from fraqat_cli.quant import QuantizedLayer, set_activation_bits
from fraqat_cli.stored_config import check_transformer_class

TRANSFORMER = "transformer"  # the folder's subfolder holding the student, as in a pipeline repository
WEIGHTS = "diffusion_pytorch_model.safetensors"  # diffusers' own file name (SAFETENSORS_WEIGHTS_NAME)
TORCHAO_BITS = range(2, 9)  # IntxUnpackedToInt8Tensor keeps codes of torch.int1..int8 in int8; 1 bit is no student
COMPUTE_DTYPE = torch.bfloat16  # diffusers' torchao backend computes integer-weight models in bfloat16
FORMAT, FORMAT_KEY, INFO_KEY = "fraqat-diffusers-torchao/1", "fraqat_format", "fraqat_info"  # weights' metadata


def check_out_folder(out: Path) -> None:
    """An existing folder is never written into: a stale file of another export would survive beside ours."""
    if out.exists():
        raise ValueError(f"out={str(out)!r} already exists; format=diffusers writes a new folder: remove it or "
                         f"give another out=")


def check_student(student: nn.Module, source: str) -> dict[str, QuantizedLayer]:
    """The student's quantized layers, refused (ValueError naming what is allowed) where torchao's int formats
    cannot hold them exactly: codes wider than 8 bits, an asymmetric range's float offset (a float zero point
    would be rounded to bfloat16 at load), a depthwise group that is no block of the kernel."""
    layers = deployable_layers(student, source, target="format=diffusers")
    for name, layer in layers.items():
        spec, bits = layer.weight_quantizer.spec, int(layer.weight_bits)
        if bits not in TORCHAO_BITS:
            raise ValueError(f"{source}: {name} is at {bits} bits; format=diffusers holds "
                             f"{TORCHAO_BITS.start}-{TORCHAO_BITS.stop - 1} bit codes (torchao int2..int8); "
                             f"export format=safetensors for wider ones")
        if not spec.symmetric:
            raise ValueError(f"{source} has asymmetric weights (quantizer.symmetric=false): their float offset has "
                             f"no exact torchao form, whose zero points are integers or bfloat16; allowed: symmetric "
                             f"students; export format=safetensors (or format=gguf, Q4_1) for this one")
        block_size(tuple(layer.weight.shape), spec.granularity, spec.group_size, name)
    return layers


def block_size(shape: tuple[int, ...], granularity: str, group_size: int | None, name: str) -> list[int]:
    """torchao's `block_size` (elements sharing a scale, per dimension of the weight) for the student's scales,
    which are laid out over the weight's matrix view (output channel x the rest, flattened). A per-tensor scale
    is stored once per output channel (torchao's weight-only configs have no per-tensor granularity; repeating
    a scale changes no value). A group of a convolution's flattened kernel is a block only when it spans whole
    trailing dimensions times a divisor of the next."""
    rest = list(shape[1:])
    group = group_size if granularity == "per_group" else math.prod(rest)
    block, inner = [1] * len(shape), 1
    for dim in range(len(shape) - 1, 0, -1):
        if group % (inner * shape[dim]) == 0:
            block[dim], inner = shape[dim], inner * shape[dim]
            continue
        part = group // inner
        if group % inner == 0 and shape[dim] % part == 0:
            block[dim] = part
            return block
        break
    if inner != group:
        raise ValueError(f"{name}: a group of {group} weights of its {tuple(shape)} kernel is no block of it; "
                         f"format=diffusers needs group sizes that split the kernel's trailing dimensions")
    return block


def student_blocks(layer: QuantizedLayer, name: str) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """The layer's codes (int8, the weight's shape), float32 scales (one per block) and torchao block size."""
    spec, bits = layer.weight_quantizer.spec, int(layer.weight_bits)
    codes, scale, _ = layer.weight_codes(bits)
    shape = tuple(layer.weight.shape)
    block = block_size(shape, spec.granularity, spec.group_size, name)
    blocks = [size // b for size, b in zip(shape, block)]
    scale = scale.expand(shape[0]) if spec.granularity == "per_tensor" else scale
    return codes.reshape(shape).to(torch.int8), scale.reshape(blocks).contiguous(), block


def torchao_weight(layer: QuantizedLayer, dtype: torch.dtype, name: str):
    """The layer's weight as an `IntxUnpackedToInt8Tensor` of its own codes and float32 scales (diffusers casts
    the scales to the load's dtype; loaded in float32 they stay the student's exactly)."""
    from torchao.quantization import IntxUnpackedToInt8Tensor  # only its option (optim=adamw8bit, format=diffusers)

    codes, scale, block = student_blocks(layer, name)
    return IntxUnpackedToInt8Tensor(
        qdata=codes, scale=scale, zero_point=torch.zeros(scale.shape, dtype=torch.int8),
        target_dtype=getattr(torch, f"int{int(layer.weight_bits)}"), block_size=block, dtype=dtype,
        activation_quantization=None)


def stored_codes_match(folder: Path, layers: dict[str, QuantizedLayer]) -> bool:
    """Read back from the written file: every quantized layer's codes and scales are the student's, bit for bit."""

    with safe_open(str(folder / WEIGHTS), "pt") as f:
        for name, layer in layers.items():
            codes, scale, _ = student_blocks(layer, name)
            if not (torch.equal(f.get_tensor(f"{name}._weight_qdata"), codes)
                    and torch.equal(f.get_tensor(f"{name}._weight_scale"), scale)):
                return False
    return True


def torchao_config(layers: dict[str, QuantizedLayer], plain_linears: list[str]):
    """The `quantization_config` diffusers' torchao backend reads: what the weights are (torchao's own config of
    weight-only integer quantization at the student's bits and granularity; one per layer when they differ)
    and which linear layers stay in 16 bits (per-tensor scales are written per channel: `block_size`). At load
    it sets the dtype and memory estimate; the weights' own metadata says how each one dequantizes."""
    # only its option (optim=adamw8bit, format=diffusers)
    from torchao.quantization import FqnToConfig, IntxWeightOnlyConfig, MappingType, PerAxis, PerGroup

    def config_of(layer: QuantizedLayer):
        spec = layer.weight_quantizer.spec
        granularity = PerGroup(spec.group_size) if spec.granularity == "per_group" else PerAxis(0)
        return IntxWeightOnlyConfig(weight_dtype=getattr(torch, f"int{int(layer.weight_bits)}"),
                                    granularity=granularity, mapping_type=MappingType.SYMMETRIC)

    configs = {name: config_of(layer) for name, layer in layers.items()}
    distinct = {repr(c): c for c in configs.values()}
    quant_type = next(iter(distinct.values())) if len(distinct) == 1 else FqnToConfig(configs)
    return TorchAoConfig(quant_type, modules_to_not_convert=plain_linears or None)


def transformer_state(student: nn.Module, layers: dict[str, QuantizedLayer], dtype: torch.dtype) -> dict:
    """The student's state dict as diffusers names it: torchao weights for the quantized layers, every other
    floating-point tensor in `dtype` (the quantizers' own buffers are training state and stay behind)."""

    state = {}
    for key, value in _plain_state(student, layers).items():
        value = value.detach().cpu()
        state[key] = (value.to(dtype) if value.is_floating_point() else value).contiguous().clone()
    with torch.no_grad():
        for name, layer in layers.items():
            state[f"{name}.weight"] = torchao_weight(layer, dtype, name)
    return state


def diffusers_config(student: nn.Module, quantization_config) -> dict:
    """config.json as `save_pretrained` writes it: the model's config, its class, the diffusers version, and
    the quantization config that makes `from_pretrained` expect torchao weights."""

    config = {k: v for k, v in _config_of(student).items() if k not in ("_use_default_values", "_name_or_path")}
    return {**config, "_class_name": type(student).__name__, "_diffusers_version": diffusers.__version__,
            "quantization_config": quantization_config.to_dict()}


def write_transformer(student: nn.Module, layers: dict[str, QuantizedLayer], folder: Path, dtype: torch.dtype,
                      info: dict) -> None:
    """`folder`/config.json and the safetensors file of torchao parts, as diffusers' `save_pretrained` writes
    them (torchao's `flatten_tensor_state_dict`: the same call diffusers makes). The export's facts (`info`:
    model config, schedule, step) ride in the file's metadata as JSON, where fraqat-eval reads them; diffusers
    and torchao read only the keys `tensor_names` lists."""
    # only its option (optim=adamw8bit, format=diffusers)
    from torchao.prototype.safetensors.safetensors_support import flatten_tensor_state_dict

    quantized = set(layers)
    plain_linears = sorted(name for name, m in student.named_modules()
                           if isinstance(m, nn.Linear) and name not in quantized)
    folder.mkdir(parents=True)
    config = diffusers_config(student, torchao_config(layers, plain_linears))
    (folder / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    tensors, metadata = flatten_tensor_state_dict(transformer_state(student, layers, dtype))
    facts = {"format": "pt", INFO_KEY: json.dumps(info, default=str), FORMAT_KEY: FORMAT}
    save_file(tensors, str(folder / WEIGHTS), metadata={**metadata, **facts})


def write_pipeline(model_cfg: DictConfig, out: Path, transformer_class: str) -> bool:
    """The pipeline around the student in `out` (model_index.json and every other component), when the teacher's
    parts are at hand: copied from a local diffusers folder (`model.path`), or saved from the parts a tiny twin
    or shipped toy builds (`components:`). False for a hub-only teacher: its card loads the rest from the hub."""
    if model_cfg.get("path"):
        source = Path(model_cfg.path).expanduser()
        index = json.loads((source / "model_index.json").read_text())
        for name, entry in index.items():
            if name != TRANSFORMER and isinstance(entry, list) and entry[0] is not None and (source / name).is_dir():
                shutil.copytree(source / name, out / name)
    elif model_cfg.get("components"):
        pipe = load_pipeline(model_cfg, without=(TRANSFORMER,))
        for part in pipe.components.values():  # parts built by Hydra carry ListConfigs, which JSON cannot write
            config = getattr(part, "config", None)
            if hasattr(part, "register_to_config") and config is not None:
                part.register_to_config(**{k: OmegaConf.to_container(v) for k, v in config.items()
                                           if OmegaConf.is_config(v)})
        pipe.save_pretrained(str(out))
        index = json.loads((out / "model_index.json").read_text())
        del pipe
    else:
        return False
    index[TRANSFORMER] = ["diffusers", transformer_class]
    (out / "model_index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    return True


@torch.no_grad()
def weight_only_prediction(student: nn.Module, family, example: dict):
    """The student's output with its activation quantizers off: what a weight-only format computes."""

    saved = [(m, m.input_quantizer.current_bits) for m in student.modules() if isinstance(m, QuantizedLayer)]
    set_activation_bits(student, None)
    try:
        return student_prediction(student, family, example)
    finally:
        for layer, bits in saved:
            layer.input_quantizer.set_bits(bits)


def write_diffusers_folder(student: nn.Module, family, example: dict, path: Path, info: dict, source: str,
                           dtype: str) -> dict:
    """Write the folder `path` (transformer, pipeline when local, model card); the report's format part, with
    how far dropping the activation quantizers moves the student (`activation_quantizer_dropped`, relative L2
    on the example: 0 for a student trained without them)."""

    layers = check_student(student, source)
    with torch.no_grad():
        as_trained = student_prediction(student, family, example)
    weight_only = weight_only_prediction(student, family, example)
    path.mkdir(parents=True)
    write_transformer(student, layers, path / TRANSFORMER, getattr(torch, dtype), info)
    model_cfg = OmegaConf.create(info["model_config"])
    pipeline = write_pipeline(model_cfg, path, type(student).__name__)
    records = {name: layer_record(m) for name, m in layers.items()}
    checkpoint = Path(info["checkpoint"]) if info.get("checkpoint") else None
    card = model_card("diffusers", {**info, "plain_dtype": dtype}, records, checkpoint=checkpoint, pipeline=pipeline)
    (path / "README.md").write_text(card)
    size = size_report(student, sum(f.stat().st_size for f in (path / TRANSFORMER).iterdir()), dtype).as_dict()
    return {"files": sorted(str(f.relative_to(path)) for f in path.rglob("*") if f.is_file()), "size": size,
            "pipeline": pipeline, "compute_dtype": str(COMPUTE_DTYPE).removeprefix("torch."),
            "tensor_types": ["IntxUnpackedToInt8Tensor"],
            "weights_exact": stored_codes_match(path / TRANSFORMER, layers),
            "activation_quantizer_dropped": relative_difference(weight_only, as_trained),
            "expected": weight_only}  # what the check compares the folder with (export pops it)


def is_diffusers_folder(path: Path) -> bool:
    """Whether `path` looks like a folder `fraqat-export format=diffusers` writes (its transformer's weights)."""
    return (Path(path) / TRANSFORMER / WEIGHTS).is_file()


def stored_info(path: Path) -> str:
    """The export's facts (JSON text) from the folder's weights metadata, the transformer class its config.json
    names checked first; ValueError for a folder fraqat did not write."""

    config = json.loads((Path(path) / TRANSFORMER / "config.json").read_text())
    check_transformer_class(f"diffusers.{config.get('_class_name')}", f"{str(path)!r}")
    with safe_open(str(Path(path) / TRANSFORMER / WEIGHTS), "pt") as f:
        metadata = f.metadata() or {}
    if metadata.get(FORMAT_KEY) != FORMAT:
        raise ValueError(f"{str(path)!r} is not a fraqat export (weights format {metadata.get(FORMAT_KEY)!r}, "
                         f"expected {FORMAT!r}); write one with fraqat-export format=diffusers")
    return metadata.get(INFO_KEY, "{}")


def load_folder(path: Path, dtype: torch.dtype = COMPUTE_DTYPE) -> nn.Module:
    """The folder's transformer as diffusers loads it (torchao weights), in `dtype`. The class config.json names
    is used only if it is one fraqat's model configs name (a folder cannot choose what is imported)."""

    config = Path(path) / TRANSFORMER / "config.json"
    if not config.is_file():
        raise FileNotFoundError(f"{str(path)!r} holds no {TRANSFORMER}/config.json; give a folder written by "
                                f"fraqat-export format=diffusers")
    name = json.loads(config.read_text()).get("_class_name")
    cls = get_class(check_transformer_class(f"diffusers.{name}", f"{str(config)!r}"))
    return cls.from_pretrained(str(path), subfolder=TRANSFORMER, **diffusers_dtype(dtype)).eval()


@torch.no_grad()
def folder_prediction(path: Path, family, example: dict) -> torch.Tensor:
    """One denoiser step of the folder's transformer in diffusers, bfloat16 as users run it (float32 out). The
    timesteps stay float32: a pipeline rounds them to its dtype, which is the runtime's choice, not the file's."""

    model = load_folder(path)
    inputs = {k: v.to(COMPUTE_DTYPE) if v.is_floating_point() and k != "timestep" else v for k, v in example.items()}
    return student_prediction(model, family, inputs).float()
