"""`layout=original`: diffusers parameter names as the original FLUX and SD3 checkpoints name them.

The original checkpoints (what ComfyUI's GGUF loader and diffusers' `from_single_file` converters read) fuse
q, k and v (and, in FLUX's single blocks, the MLP input) into one matrix by concatenating rows, and keep the
final adaLN projection as (shift, scale) where diffusers has (scale, shift). Both are row operations, so a
quantized weight's blocks move whole and its codes stay exact. The tables below are the inverses of
diffusers' `convert_flux_transformer_checkpoint_to_diffusers` and `convert_sd3_transformer_checkpoint_to_diffusers`
(diffusers/loaders/single_file_utils.py); tests/test_export_gguf.py runs those converters on this layout.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

W = r"(weight|bias)"  # a linear layer's tensors keep their suffix

# (diffusers name pattern, original name template, rows swapped in halves?) -- "last": only in the last block.
FLUX_RENAMES = [
    (rf"time_text_embed\.timestep_embedder\.linear_1\.{W}", "time_in.in_layer.{0}", False),
    (rf"time_text_embed\.timestep_embedder\.linear_2\.{W}", "time_in.out_layer.{0}", False),
    (rf"time_text_embed\.text_embedder\.linear_1\.{W}", "vector_in.in_layer.{0}", False),
    (rf"time_text_embed\.text_embedder\.linear_2\.{W}", "vector_in.out_layer.{0}", False),
    (rf"time_text_embed\.guidance_embedder\.linear_1\.{W}", "guidance_in.in_layer.{0}", False),
    (rf"time_text_embed\.guidance_embedder\.linear_2\.{W}", "guidance_in.out_layer.{0}", False),
    (rf"context_embedder\.{W}", "txt_in.{0}", False),
    (rf"x_embedder\.{W}", "img_in.{0}", False),
    (rf"transformer_blocks\.(\d+)\.norm1\.linear\.{W}", "double_blocks.{0}.img_mod.lin.{1}", False),
    (rf"transformer_blocks\.(\d+)\.norm1_context\.linear\.{W}", "double_blocks.{0}.txt_mod.lin.{1}", False),
    (r"transformer_blocks\.(\d+)\.attn\.norm_q\.weight", "double_blocks.{0}.img_attn.norm.query_norm.scale", False),
    (r"transformer_blocks\.(\d+)\.attn\.norm_k\.weight", "double_blocks.{0}.img_attn.norm.key_norm.scale", False),
    (r"transformer_blocks\.(\d+)\.attn\.norm_added_q\.weight", "double_blocks.{0}.txt_attn.norm.query_norm.scale",
     False),
    (r"transformer_blocks\.(\d+)\.attn\.norm_added_k\.weight", "double_blocks.{0}.txt_attn.norm.key_norm.scale", False),
    (rf"transformer_blocks\.(\d+)\.ff\.net\.0\.proj\.{W}", "double_blocks.{0}.img_mlp.0.{1}", False),
    (rf"transformer_blocks\.(\d+)\.ff\.net\.2\.{W}", "double_blocks.{0}.img_mlp.2.{1}", False),
    (rf"transformer_blocks\.(\d+)\.ff_context\.net\.0\.proj\.{W}", "double_blocks.{0}.txt_mlp.0.{1}", False),
    (rf"transformer_blocks\.(\d+)\.ff_context\.net\.2\.{W}", "double_blocks.{0}.txt_mlp.2.{1}", False),
    (rf"transformer_blocks\.(\d+)\.attn\.to_out\.0\.{W}", "double_blocks.{0}.img_attn.proj.{1}", False),
    (rf"transformer_blocks\.(\d+)\.attn\.to_add_out\.{W}", "double_blocks.{0}.txt_attn.proj.{1}", False),
    (rf"single_transformer_blocks\.(\d+)\.norm\.linear\.{W}", "single_blocks.{0}.modulation.lin.{1}", False),
    (r"single_transformer_blocks\.(\d+)\.attn\.norm_q\.weight", "single_blocks.{0}.norm.query_norm.scale", False),
    (r"single_transformer_blocks\.(\d+)\.attn\.norm_k\.weight", "single_blocks.{0}.norm.key_norm.scale", False),
    (rf"single_transformer_blocks\.(\d+)\.proj_out\.{W}", "single_blocks.{0}.linear2.{1}", False),
    (rf"proj_out\.{W}", "final_layer.linear.{0}", False),
    (rf"norm_out\.linear\.{W}", "final_layer.adaLN_modulation.1.{0}", True),
]
# (diffusers name pattern whose group 2 names the part, the parts in row order, original name template)
FLUX_FUSIONS = [
    (rf"transformer_blocks\.(\d+)\.attn\.to_(q|k|v)\.{W}", ["q", "k", "v"], "double_blocks.{0}.img_attn.qkv.{2}"),
    (rf"transformer_blocks\.(\d+)\.attn\.add_(q|k|v)_proj\.{W}", ["q", "k", "v"],
     "double_blocks.{0}.txt_attn.qkv.{2}"),
    (rf"single_transformer_blocks\.(\d+)\.(attn\.to_q|attn\.to_k|attn\.to_v|proj_mlp)\.{W}",
     ["attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"], "single_blocks.{0}.linear1.{2}"),
]

SD3_RENAMES = [
    (r"pos_embed\.pos_embed", "pos_embed", False),
    (rf"pos_embed\.proj\.{W}", "x_embedder.proj.{0}", False),
    (rf"time_text_embed\.timestep_embedder\.linear_1\.{W}", "t_embedder.mlp.0.{0}", False),
    (rf"time_text_embed\.timestep_embedder\.linear_2\.{W}", "t_embedder.mlp.2.{0}", False),
    (rf"context_embedder\.{W}", "context_embedder.{0}", False),
    (rf"time_text_embed\.text_embedder\.linear_1\.{W}", "y_embedder.mlp.0.{0}", False),
    (rf"time_text_embed\.text_embedder\.linear_2\.{W}", "y_embedder.mlp.2.{0}", False),
    (r"transformer_blocks\.(\d+)\.attn\.norm_q\.weight", "joint_blocks.{0}.x_block.attn.ln_q.weight", False),
    (r"transformer_blocks\.(\d+)\.attn\.norm_k\.weight", "joint_blocks.{0}.x_block.attn.ln_k.weight", False),
    (r"transformer_blocks\.(\d+)\.attn\.norm_added_q\.weight", "joint_blocks.{0}.context_block.attn.ln_q.weight",
     False),
    (r"transformer_blocks\.(\d+)\.attn\.norm_added_k\.weight", "joint_blocks.{0}.context_block.attn.ln_k.weight",
     False),
    (rf"transformer_blocks\.(\d+)\.attn\.to_out\.0\.{W}", "joint_blocks.{0}.x_block.attn.proj.{1}", False),
    (rf"transformer_blocks\.(\d+)\.attn\.to_add_out\.{W}", "joint_blocks.{0}.context_block.attn.proj.{1}", False),
    (r"transformer_blocks\.(\d+)\.attn2\.norm_q\.weight", "joint_blocks.{0}.x_block.attn2.ln_q.weight", False),
    (r"transformer_blocks\.(\d+)\.attn2\.norm_k\.weight", "joint_blocks.{0}.x_block.attn2.ln_k.weight", False),
    (rf"transformer_blocks\.(\d+)\.attn2\.to_out\.0\.{W}", "joint_blocks.{0}.x_block.attn2.proj.{1}", False),
    (rf"transformer_blocks\.(\d+)\.norm1\.linear\.{W}", "joint_blocks.{0}.x_block.adaLN_modulation.1.{1}", False),
    (rf"transformer_blocks\.(\d+)\.norm1_context\.linear\.{W}", "joint_blocks.{0}.context_block.adaLN_modulation.1.{1}",
     "last"),  # the last block's context norm is AdaLayerNormContinuous: (shift, scale) in the original
    (rf"transformer_blocks\.(\d+)\.ff\.net\.0\.proj\.{W}", "joint_blocks.{0}.x_block.mlp.fc1.{1}", False),
    (rf"transformer_blocks\.(\d+)\.ff\.net\.2\.{W}", "joint_blocks.{0}.x_block.mlp.fc2.{1}", False),
    (rf"transformer_blocks\.(\d+)\.ff_context\.net\.0\.proj\.{W}", "joint_blocks.{0}.context_block.mlp.fc1.{1}",
     False),
    (rf"transformer_blocks\.(\d+)\.ff_context\.net\.2\.{W}", "joint_blocks.{0}.context_block.mlp.fc2.{1}", False),
    (rf"proj_out\.{W}", "final_layer.linear.{0}", False),
    (rf"norm_out\.linear\.{W}", "final_layer.adaLN_modulation.1.{0}", True),
]
SD3_FUSIONS = [
    (rf"transformer_blocks\.(\d+)\.attn\.to_(q|k|v)\.{W}", ["q", "k", "v"], "joint_blocks.{0}.x_block.attn.qkv.{2}"),
    (rf"transformer_blocks\.(\d+)\.attn\.add_(q|k|v)_proj\.{W}", ["q", "k", "v"],
     "joint_blocks.{0}.context_block.attn.qkv.{2}"),
    (rf"transformer_blocks\.(\d+)\.attn2\.to_(q|k|v)\.{W}", ["q", "k", "v"], "joint_blocks.{0}.x_block.attn2.qkv.{2}"),
]
TABLES = {"flux": (FLUX_RENAMES, FLUX_FUSIONS), "sd3": (SD3_RENAMES, SD3_FUSIONS)}


@dataclass(frozen=True)
class OriginalTensor:
    """One tensor of the original checkpoint: the diffusers tensors whose rows it concatenates, in order, and
    whether its two row halves are swapped ((scale, shift) -> (shift, scale))."""

    name: str
    parts: tuple[str, ...]
    swap_halves: bool = False


def original_layout(names: list[str], arch: str, num_layers: int) -> list[OriginalTensor]:
    """The original checkpoint's tensors for a diffusers state dict's `names` (in the order first met);
    `num_layers`: the transformer's joint blocks (SD3's last one differs). ValueError for a name no table knows."""
    if arch not in TABLES:
        raise ValueError(f"layout=original is offered for {', '.join(TABLES)} (the original checkpoints ComfyUI "
                         f"loads); {arch!r} has no original layout here: use layout=diffusers")
    renames, fusions = TABLES[arch]
    out: dict[str, OriginalTensor | dict] = {}
    for name in names:
        target = _renamed(name, renames, num_layers) or _fused_part(name, fusions)
        if target is None:
            raise ValueError(f"tensor {name!r} has no name in the original {arch} checkpoint layout; use "
                             f"layout=diffusers")
        if isinstance(target, OriginalTensor):
            out[target.name] = target
        else:
            original, order, part = target
            out.setdefault(original, {"order": order, "parts": {}})["parts"][part] = name
    return [_complete(name, value) if isinstance(value, dict) else value for name, value in out.items()]


def _renamed(name: str, renames, num_layers: int) -> OriginalTensor | None:
    for pattern, template, swap in renames:
        match = re.fullmatch(pattern, name)
        if match:
            last = bool(match.groups()) and match.group(1).isdigit() and int(match.group(1)) == num_layers - 1
            return OriginalTensor(template.format(*match.groups()), (name,), swap is True or (swap == "last" and last))
    return None


def _fused_part(name: str, fusions):
    for pattern, order, template in fusions:
        match = re.fullmatch(pattern, name)
        if match:
            return template.format(*match.groups()), order, match.group(2)
    return None


def _complete(name: str, fused: dict) -> OriginalTensor:
    missing = [part for part in fused["order"] if part not in fused["parts"]]
    if missing:
        raise ValueError(f"the original tensor {name!r} fuses {', '.join(fused['order'])}, but {', '.join(missing)} "
                         f"is missing; use layout=diffusers")
    return OriginalTensor(name, tuple(fused["parts"][part] for part in fused["order"]))
