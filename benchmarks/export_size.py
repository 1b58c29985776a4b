"""How small does a W4 student get on disk? `fraqat-export format=safetensors` against the teacher's own file.

Builds each family's diffusers transformer at a few million parameters (random weights: the size of
codes does not depend on their values) and the shipped toy teacher, quantizes it at 4 bits with each
granularity, exports it with the same code as `fraqat-export` (unquantized tensors in bf16, as the real
models ship), and prints bytes on disk against the teacher's file as it would ship: its state dict cast to
bf16 and saved as safetensors (and to float32). Layer selections: the transformer blocks or every layer
(`*`), and the layer kinds quantized: linear layers alone (the paper's) or with 1x1 convolutions too.

    python benchmarks/export_size.py            # the table (about two minutes on 2 cores)
    python benchmarks/export_size.py --smoke    # tiny models, seconds

Targets (issue 13): a per-channel W4 file with every linear layer and every 1x1 convolution quantized at most
0.30x the teacher's bf16 file for PixArt-, SD3- and FLUX-class models, 0.35x for the Sana-class toy.
GGUF (issue 23): every linear layer W4 per-group-32, written as `fraqat-export format=gguf` writes it (Q4_0
blocks, the rest BF16/F16), at most 0.30x the teacher's bf16 file for PixArt-, SD3- and FLUX-class models.
PixArt's row is a size only: diffusers has no GGUF loader for it (fraqat-export refuses it).
"""

from __future__ import annotations

import argparse
import copy
import tempfile
from pathlib import Path

import torch
from diffusers import FluxTransformer2DModel, PixArtTransformer2DModel, SanaTransformer2DModel, SD3Transformer2DModel

from fraqat_cli.export.safetensors_file import export_packed
from fraqat_cli.quant import QuantConfig, QuantSpec, layer_kind, quantize_model


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
SELECTIONS = {"blocks": ("*transformer_blocks.*",), "all": ("*",)}
KINDS = {"linear": ("linear",), "linear + 1x1 conv": ("linear", "pointwise_conv")}


def teacher_file_bytes(model: torch.nn.Module, dtype: torch.dtype, folder: Path) -> int:
    """The teacher's file as it would ship: every floating-point tensor of its state dict in `dtype`."""
    from safetensors.torch import save_file

    state = {k: (v.to(dtype) if v.is_floating_point() else v).contiguous().clone()
             for k, v in model.state_dict().items()}
    path = folder / f"teacher-{dtype}.safetensors"
    save_file(state, str(path))
    return path.stat().st_size


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--smoke", action="store_true", help="tiny models (width 64, 1 layer), one granularity")
    args = parser.parse_args()
    width, layers = (64, 1) if args.smoke else (args.width, args.layers)
    granularities = {"per_channel": GRANULARITIES["per_channel"]} if args.smoke else GRANULARITIES
    torch.manual_seed(0)
    print(f"W4 (4-bit symmetric weights, 8-bit activations, the rest bf16), width {width}, {layers} layers; "
          f"the toy is the shipped teacher\n")
    print("| model | params | layers | kinds | share of params | granularity | MiB | of teacher bf16 | of float32 |")
    print("|---|---|---|---|---|---|---|---|---|")
    candidates = models(width, layers)
    if not args.smoke:
        from fraqat_cli.models.toy import toy_transformer

        candidates = {"toy (Sana)": toy_transformer(), **candidates}
    with tempfile.TemporaryDirectory() as tmp:
        for name, model in candidates.items():
            bf16, fp32 = (teacher_file_bytes(model, dtype, Path(tmp)) for dtype in (torch.bfloat16, torch.float32))
            convs = any(layer_kind(m) == "pointwise_conv" for m in model.modules())
            for selection, include in SELECTIONS.items():
                for kinds, layer_kinds in KINDS.items():
                    if layer_kinds != ("linear",) and not convs:
                        continue  # no 1x1 convolution: the same rows as linear alone
                    for granularity, spec in granularities.items():
                        student = copy.deepcopy(model)
                        try:
                            summary = quantize_model(student, QuantConfig(weight=spec, weight_bits=4,
                                                                          include=include, layers=layer_kinds))
                        except ValueError as error:  # e.g. a group wider than a layer's input
                            print(f"| {name} | | {selection} | {kinds} | | {granularity} | - | - | - |  "
                                  f"({error})", flush=True)
                            continue
                        size = export_packed(student, Path(tmp) / "student.safetensors", {"model": name},
                                             dtype="bfloat16")
                        print(f"| {name} | {summary.total_params / 1e6:.2f} M | {selection} | {kinds} | "
                              f"{summary.quantized_fraction:.1%} | {granularity} | {size.file_bytes / 2**20:.2f} | "
                              f"{size.file_bytes / bf16:.3f} | {size.file_bytes / fp32:.3f} |", flush=True)
        gguf_rows(candidates, Path(tmp))
    real_size_rows()


def gguf_bytes(model: torch.nn.Module, folder: Path) -> tuple[int, float]:
    """(bytes of the GGUF file `fraqat-export format=gguf` writes for `model` quantized W4 per-group-32 on every
    linear layer, the quantized share of its parameters), its unquantized tensors from bf16."""
    from fraqat_cli.export.deploy_checks import deployable_layers
    from fraqat_cli.export.gguf import stored_tensors, write_file
    from fraqat_cli.export.safetensors_file import round_unquantized

    student = copy.deepcopy(model)
    summary = quantize_model(student, QuantConfig(weight=QuantSpec("per_group", 32, scale_dtype="float16"),
                                                  weight_bits=4, include=("*",)))
    round_unquantized(student, "bfloat16")
    stored, _, _ = stored_tensors(student, deployable_layers(student, "the benchmark"), "bfloat16")
    write_file(str(folder / "student.gguf"), "bench", stored, {}, {})
    return (folder / "student.gguf").stat().st_size, summary.quantized_fraction


def gguf_rows(candidates: dict[str, torch.nn.Module], folder: Path) -> None:
    print("\n| model (GGUF) | params | W4 per-group-32, every linear layer | MiB | of teacher bf16 | target |")
    print("|---|---|---|---|---|---|")
    for name, model in candidates.items():
        bf16 = teacher_file_bytes(model, torch.bfloat16, folder)
        size, share = gguf_bytes(model, folder)
        params = sum(p.numel() for p in model.parameters())
        target = "<= 0.30" if name in ("pixart_sigma", "sd35", "flux") else ""
        print(f"| {name} | {params / 1e6:.2f} M | {share:.1%} of params in Q4_0 | {size / 2**20:.2f} | "
              f"{size / bf16:.3f} | {target} |", flush=True)


def gguf_bytes_of_shapes(model: torch.nn.Module) -> tuple[int, int]:
    """(GGUF bytes, teacher bf16 bytes) of a full-size model on the meta device, from its shapes alone: Q4_0 blocks
    (18 bytes per 32 weights, ggml's block_q4_0) for every linear weight whose width 32 divides, 2 bytes a value
    for the rest (BF16/F16, as `plain_tensor` stores a bf16 model's). File headers (a few KiB) are left out."""
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    block, block_bytes = GGML_QUANT_SIZES[GGMLQuantizationType.Q4_0]
    quantized = {f"{n}.weight" for n, m in model.named_modules()
                 if isinstance(m, torch.nn.Linear) and m.in_features % block == 0}
    state = {k: v for k, v in model.state_dict().items() if v.is_floating_point()}
    teacher = sum(2 * v.numel() for v in state.values())
    return sum(v.numel() // block * block_bytes if k in quantized else 2 * v.numel() for k, v in state.items()), teacher


def real_size_rows() -> None:
    """The real PixArt-Sigma, SD3.5-Medium and FLUX.1-schnell transformers (their configs in conf/model), on the
    meta device."""
    from omegaconf import OmegaConf

    from fraqat_cli.models.architecture import build_transformer

    conf = Path(__file__).resolve().parents[1] / "conf" / "model"
    print("\n| real config (GGUF, from shapes) | params | MiB | of teacher bf16 | target |")
    print("|---|---|---|---|---|")
    for name in ("pixart_sigma", "sd35_medium", "flux_schnell"):
        model = build_transformer(OmegaConf.load(conf / f"{name}.yaml"))
        size, teacher = gguf_bytes_of_shapes(model)
        params = sum(p.numel() for p in model.parameters())
        print(f"| {name} | {params / 1e9:.3f} B | {size / 2**20:.0f} | {size / teacher:.3f} | <= 0.30 |", flush=True)


if __name__ == "__main__":
    main()
