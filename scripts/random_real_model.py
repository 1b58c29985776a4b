"""Write a diffusers pipeline folder with a real model's transformer, random weights: a stand-in for rehearsals.

The transformer is the real architecture (`architecture:` of `conf/model/<model>.yaml`, random weights in
`--dtype`); the other parts come from the config's `rehearsal:` entry: text encoders shrunk to one layer but
with the real output widths, tokenizers trained in memory, a narrow VAE with the real latent channels, scaling
and shift factors and downsampling, and the real scheduler. The folder loads as the real model does:

    python scripts/random_real_model.py --model pixart_sigma --out /data/pixart_random --check-resolution 256
    fraqat-train model=pixart_sigma model.path=/data/pixart_random ...

`--layers N` keeps the real width with N blocks of each kind (quick rehearsals; SD3.5-M and FLUX at full
size need 9 and 48 GB in float32 to build). `--check-resolution R` loads the folder back through
`fraqat_cli.models.loading.load_pipeline` and runs one transformer forward at R px, batch 1, on `--device`.
"""

from __future__ import annotations

import argparse
import gc
import os
import resource
import shutil
import sys
import time
from importlib import resources
from pathlib import Path

import torch
from hydra.utils import get_class, instantiate
from omegaconf import DictConfig, OmegaConf

from fraqat_cli.cli import run_reporting_errors
from fraqat_cli.models.architecture import build_transformer, count_parameters
from fraqat_cli.models.loading import DTYPES, family_of, load_pipeline


def real_model_config(name: str) -> DictConfig:
    """`conf/model/<name>.yaml`, which must have a `rehearsal:` entry (the real models do)."""
    folder = resources.files("fraqat_cli.conf") / "model"
    configs = {f.name.removesuffix(".yaml"): f for f in folder.iterdir() if f.name.endswith(".yaml")}
    allowed = sorted(key for key, f in configs.items() if OmegaConf.load(f).get("rehearsal"))
    if name not in allowed:
        raise ValueError(f"--model {name!r} has no rehearsal parts; allowed: {', '.join(allowed)}")
    return OmegaConf.load(configs[name])


def build_pipeline(model_cfg: DictConfig, dtype: torch.dtype, layers: int | None, seed: int):
    """The real transformer (random, `dtype`) with the config's rehearsal parts, as the model's pipeline class."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        parts = {name: instantiate(spec, _convert_="all") for name, spec in model_cfg.rehearsal.items()}
    for part in parts.values():
        if isinstance(part, torch.nn.Module):
            part.to(dtype)
    parts["transformer"] = build_transformer(model_cfg, device="cpu", dtype=dtype, layers=layers, seed=seed)
    return get_class(model_cfg.pipeline)(**parts)


def write_folder(pipe, out: Path) -> None:
    """Save into a hidden folder beside `out`, then rename it: `out` appears only when complete."""
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.parent / f".{out.name}.partial-{os.getpid()}"
    try:
        pipe.save_pretrained(str(partial), safe_serialization=True)
        partial.rename(out)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise


@torch.no_grad()
def check_forward(model_cfg: DictConfig, out: Path, dtype_name: str, resolution: int, device: str) -> dict:
    """Load `out` as `model=<name> model.path=out` does and run one transformer forward, batch 1."""
    cfg = OmegaConf.merge(model_cfg, {"path": str(out), "dtype": dtype_name})
    family = family_of(cfg)
    start = time.perf_counter()
    pipe = load_pipeline(cfg)
    loaded_s = time.perf_counter() - start
    pipe.to(device)
    cond = family.encode_prompts(pipe, ["a red circle on a blue background"], cfg.max_sequence_length)
    channels, side = pipe.vae.config.latent_channels, resolution // pipe.vae_scale_factor
    latents = torch.randn(1, channels, side, side, device=device, dtype=pipe.transformer.dtype)  # (B, C, H, W)
    start = time.perf_counter()
    output = pipe.transformer(**family.transformer_kwargs(latents, torch.tensor([500.0], device=device), cond))[0]
    forward_s = time.perf_counter() - start
    if not torch.isfinite(output.float()).all():
        raise RuntimeError("the transformer forward gave non-finite values")
    return {"load_s": loaded_s, "forward_s": forward_s, "latents": tuple(latents.shape), "output": tuple(output.shape)}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="a real model of conf/model/ (sana, pixart_sigma, ...)")
    parser.add_argument("--out", required=True, type=Path, help="the pipeline folder to write (must not exist)")
    parser.add_argument("--dtype", default="bfloat16", choices=sorted(DTYPES))
    parser.add_argument("--layers", type=int, default=None, help="N blocks of each kind, real width (default: all)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--check-resolution", type=int, default=None, help="then one forward at this many px")
    parser.add_argument("--device", default="cpu", help="device of the check forward")
    return parser.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)

    def work():
        model_cfg = real_model_config(args.model)
        if args.out.exists():
            raise ValueError(f"--out {str(args.out)!r} already exists; allowed: a path that does not exist yet")
        if args.check_resolution is not None and args.check_resolution < 32:
            raise ValueError(f"--check-resolution {args.check_resolution} is too small; allowed: >= 32 px")
        start = time.perf_counter()
        pipe = build_pipeline(model_cfg, DTYPES[args.dtype], args.layers, args.seed)
        params = count_parameters(pipe.transformer)
        write_folder(pipe, args.out)
        del pipe
        gc.collect()
        size = sum(f.stat().st_size for f in args.out.rglob("*") if f.is_file())
        print(
            f"{args.model}: wrote {args.out} in {time.perf_counter() - start:.0f} s, transformer {params:,} "
            f"parameters ({args.dtype}), folder {size / 2**30:.2f} GiB"
        )
        if args.check_resolution is not None:
            result = check_forward(model_cfg, args.out, args.dtype, args.check_resolution, args.device)
            print(
                f"check: loaded in {result['load_s']:.1f} s; forward at {args.check_resolution} px, latents "
                f"{result['latents']} -> {result['output']} in {result['forward_s']:.1f} s"
            )
        print(f"peak memory (RSS): {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB")

    run_reporting_errors("random_real_model", work)


if __name__ == "__main__":
    sys.exit(main())
