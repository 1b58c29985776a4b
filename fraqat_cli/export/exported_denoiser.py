"""The deployed artifact itself as a pipeline's denoiser: a `fraqat-export` file evaluated, not the checkpoint.

`fraqat-eval ckpt=<run>/export/student.safetensors` (or `.onnx`, or the `diffusers` folder) reads what to build
from the file's own metadata (the model config the export stored) and puts the file's model where the
pipeline's transformer goes: the safetensors codes dequantized (`load_packed`), an onnxruntime session of the
graph (QDQ or MatMulNBits) behind the transformer's call signature, or the folder's transformer as diffusers
loads it (torchao weights). FID of the deployed model is then measured, not assumed equal to the student's.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from fraqat_cli.export.diffusers_folder import is_diffusers_folder, load_folder, stored_info
from fraqat_cli.export.safetensors_file import load_packed, read_metadata
from fraqat_cli.quant import FakeQuantizer
from fraqat_cli.stored_config import check_transformer_class

SUFFIXES = (".safetensors", ".onnx")
# Transformer keyword -> the exported graph's input (fraqat_cli.export.onnx_graph.DenoiserGraph's signature) for the
# families whose `transformer_kwargs` pass the conditioning through unchanged (Sana, PixArt, SD3).
GRAPH_INPUTS = {"hidden_states": "latents", "timestep": "timestep", "encoder_hidden_states": "prompt_embeds",
                "encoder_attention_mask": "prompt_attention_mask", "pooled_projections": "pooled_prompt_embeds"}
IGNORED = {"return_dict", "attention_kwargs", "added_cond_kwargs", "joint_attention_kwargs"}


def is_artifact(entry) -> bool:
    """A fraqat-export file (by suffix) or a `format=diffusers` folder."""

    return isinstance(entry, (str, Path)) and (str(entry).endswith(SUFFIXES) or is_diffusers_folder(Path(entry)))


def artifact_info(path: Path) -> dict:
    """The facts `fraqat-export` stored in `path` (model config, schedule, granularity, step, ...)."""

    path = Path(path).expanduser()
    if not path.is_file() and not is_diffusers_folder(path):
        raise FileNotFoundError(f"ckpt={str(path)!r} does not exist; give a file written by fraqat-export")
    if path.is_dir():
        info, fmt = _json_record(stored_info(path), path), "diffusers"
    elif path.suffix == ".safetensors":
        metadata = read_metadata(path)
        check_transformer_class(metadata.get("transformer_class"), f"{str(path)!r}")  # before anything is built
        info, fmt = _json_record(metadata.get("info", "{}"), path), "safetensors"
    else:
        import onnx  # format=onnx/onnx_nbits only

        try:
            props = {p.key: p.value for p in onnx.load(str(path), load_external_data=False).metadata_props}
        except Exception as error:
            raise ValueError(f"{str(path)!r} is not an ONNX file ({type(error).__name__}: {error})") from error
        if "fraqat_info" not in props:
            raise ValueError(f"{str(path)!r} is not a fraqat export (no fraqat_info metadata); write one with "
                             f"fraqat-export format=onnx or format=onnx_nbits")
        info, fmt = _json_record(props["fraqat_info"], path), props.get("fraqat_format")
    if "model_config" not in info:
        raise ValueError(f"{str(path)!r} was written by an older fraqat-export without its model config; "
                         f"export the checkpoint again to evaluate the file")
    return {**info, "format": fmt}


def _json_record(text: str, path: Path) -> dict:
    """The export's JSON record, which must be an object whose model config (if any) is one too."""
    try:
        info = json.loads(text)
    except json.JSONDecodeError as error:
        raise ValueError(f"{str(path)!r} holds fraqat metadata that is not JSON ({error})") from error
    if not isinstance(info, dict) or not isinstance(info.get("model_config", {}), dict):
        raise ValueError(f"{str(path)!r} holds fraqat metadata of the wrong shape; export the checkpoint again")
    return info


def load_deployed(path: Path, like: nn.Module, dtype: torch.dtype, device) -> nn.Module:
    """The denoiser in `path`, standing where `like` (the teacher or its skeleton) stood in the pipeline. A
    diffusers folder is loaded by diffusers in the pipeline's dtype: in float32, its torchao layers compute the
    student's weights exactly, with no activation quantizer (the weight-only deployment's own model)."""
    path = Path(path).expanduser()
    if path.is_dir():
        return load_folder(path, dtype).to(device)
    if path.suffix == ".safetensors":
        model = load_packed(path).transformer.to(device=device, dtype=dtype)
        for module in model.modules():  # quantizer state stays float32, as the evaluated checkpoints' does
            if isinstance(module, FakeQuantizer):
                module.float()
        return model
    return OnnxDenoiser(path, like.config)


class OnnxDenoiser(nn.Module):
    """An onnxruntime session (CPU) called as the diffusers transformer it was exported from. The graph was
    traced at a fixed batch; larger batches run in chunks of it, the last one padded with copies of its
    last row (rows do not interact)."""

    def __init__(self, path: Path, config) -> None:
        super().__init__()
        try:
            import onnxruntime  # format=onnx/onnx_nbits only
        except ImportError as error:
            raise ModuleNotFoundError(
                f"evaluating {str(path)!r} needs onnxruntime, which is not installed; run "
                f"`pip install onnxruntime` (or `pip install -e .`, which lists it)") from error
        self.session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        self.inputs = {i.name: i for i in self.session.get_inputs()}
        self.config = config
        self.batch = self.inputs["latents"].shape[0]
        self.register_buffer("_anchor", torch.zeros(()), persistent=False)  # .device and .dtype for the pipeline

    @property
    def dtype(self) -> torch.dtype:
        return torch.float32

    @property
    def device(self) -> torch.device:
        return torch.device("cpu")

    def feeds(self, kwargs: dict) -> dict[str, torch.Tensor]:
        unknown = sorted(k for k, v in kwargs.items() if k not in GRAPH_INPUTS and k not in IGNORED and v is not None)
        if unknown:
            raise ValueError(f"the pipeline passes {unknown} to its transformer, which the exported graph does not "
                             f"take; ONNX evaluation covers families whose graph inputs are "
                             f"{', '.join(GRAPH_INPUTS.values())} (Sana, PixArt, SD3)")
        feeds = {GRAPH_INPUTS[k]: v for k, v in kwargs.items() if k in GRAPH_INPUTS and v is not None}
        missing = sorted(self.inputs.keys() - feeds.keys())
        if missing:
            raise ValueError(f"the exported graph needs inputs {missing} that the pipeline did not pass")
        batch = feeds["latents"].shape[0]
        if feeds["timestep"].dim() == 0:
            feeds["timestep"] = feeds["timestep"].expand(batch)
        return feeds

    @torch.no_grad()
    def forward(self, hidden_states: torch.Tensor, return_dict: bool = False, **kwargs):
        kwargs["hidden_states"] = hidden_states
        feeds = self.feeds(kwargs)
        total = feeds["latents"].shape[0]
        outputs = []
        for start in range(0, total, self.batch):
            rows = torch.arange(start, start + self.batch).clamp_max(total - 1)
            chunk = {name: self._numpy(name, value[rows]) for name, value in feeds.items()}
            outputs.append(torch.from_numpy(self.session.run(None, chunk)[0])[: total - start])
        prediction = torch.cat(outputs)[:total].to(kwargs["hidden_states"].device)
        return (prediction,) if not return_dict else {"sample": prediction}

    def _numpy(self, name: str, value: torch.Tensor):
        kind = self.inputs[name].type  # e.g. tensor(float), tensor(int64)
        dtype = {"tensor(float)": torch.float32, "tensor(int64)": torch.int64, "tensor(int32)": torch.int32,
                 "tensor(bool)": torch.bool, "tensor(float16)": torch.float16}.get(kind, torch.float32)
        return value.detach().cpu().to(dtype).contiguous().numpy()
