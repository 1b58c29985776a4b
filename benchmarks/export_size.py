"""How small does a W4 student get on disk? `fraqat-export format=safetensors` file size against float32 and bf16.

Builds each family's diffusers transformer at a few million parameters (random weights: the size of
codes does not depend on their values), quantizes it at 4 bits with each granularity, exports it with
the same code as `fraqat-export`, and prints bytes on disk / float32 bytes. Two layer selections: the
models' default (`*transformer_blocks.*`, the paper's) and every linear layer (`*`).

    python benchmarks/export_size.py            # the table (about a minute on 2 cores)
    python benchmarks/export_size.py --smoke    # tiny models, seconds

Target (issue 6): a per-channel W4 file at most 0.14 of the float32 one on a model of a few M parameters.
Only linear layers are quantized, so a model whose feed-forward is convolutions (Sana) keeps those in full
precision and cannot reach it; the table says how much of each model is quantized.
"""

from __future__ import annotations

import argparse
import copy
import tempfile
from pathlib import Path

import torch
from diffusers import FluxTransformer2DModel, PixArtTransformer2DModel, SanaTransformer2DModel, SD3Transformer2DModel

from fraqat_cli.packed import export_packed
from fraqat_cli.quant import QuantConfig, QuantSpec, quantize_model


def models(width: int, layers: int) -> dict[str, torch.nn.Module]:
    """Each family's transformer with `layers` blocks of `width` channels (heads of 32)."""
    heads = width // 32
    return {
        "sana": SanaTransformer2DModel(
            in_channels=32, out_channels=32, num_attention_heads=heads, attention_head_dim=32, num_layers=layers,
            num_cross_attention_heads=heads, cross_attention_head_dim=32, cross_attention_dim=width,
            caption_channels=width, sample_size=16, patch_size=1),
        "pixart_sigma": PixArtTransformer2DModel(
            num_attention_heads=heads, attention_head_dim=32, in_channels=4, out_channels=8, num_layers=layers,
            cross_attention_dim=width, sample_size=16, patch_size=2, caption_channels=width),
        "sd35": SD3Transformer2DModel(
            sample_size=16, patch_size=2, in_channels=16, num_layers=layers, attention_head_dim=32,
            num_attention_heads=heads, joint_attention_dim=width, caption_projection_dim=width,
            pooled_projection_dim=width, out_channels=16, pos_embed_max_size=32),
        "flux": FluxTransformer2DModel(
            patch_size=1, in_channels=64, num_layers=max(layers // 3, 1), num_single_layers=layers - layers // 3,
            attention_head_dim=32, num_attention_heads=heads, joint_attention_dim=width,
            pooled_projection_dim=width, axes_dims_rope=[8, 12, 12]),
    }


GRANULARITIES = {"per_tensor": QuantSpec("per_tensor"), "per_channel": QuantSpec("per_channel"),
                 "per_group 64": QuantSpec("per_group", 64)}
SELECTIONS = {"blocks": ("*transformer_blocks.*",), "all linears": ("*",)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--smoke", action="store_true", help="tiny models (width 64, 1 layer), one granularity")
    args = parser.parse_args()
    width, layers = (64, 1) if args.smoke else (args.width, args.layers)
    granularities = {"per_channel": GRANULARITIES["per_channel"]} if args.smoke else GRANULARITIES
    torch.manual_seed(0)
    print(f"W4 (4-bit symmetric weights, 8-bit activations), width {width}, {layers} layers\n")
    print("| model | params | layers quantized | share of params | granularity | MiB | of float32 | of bf16 |")
    print("|---|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for name, model in models(width, layers).items():
            for selection, include in SELECTIONS.items():
                for granularity, spec in granularities.items():
                    student = copy.deepcopy(model)
                    summary = quantize_model(student, QuantConfig(weight=spec, weight_bits=4, include=include))
                    size = export_packed(student, Path(tmp) / "student.safetensors", {"model": name})
                    print(f"| {name} | {summary.total_params / 1e6:.2f} M | {selection} | "
                          f"{summary.quantized_fraction:.1%} | {granularity} | {size.file_bytes / 2**20:.2f} | "
                          f"{size.of_float32:.3f} | {size.of_bfloat16:.3f} |", flush=True)


if __name__ == "__main__":
    main()
