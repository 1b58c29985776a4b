"""How each model family is trained: which timesteps, and how noise mixes into clean latents.

Distillation feeds teacher and student the same noisy input, drawn the way the
family was pre-trained, so the student learns where the teacher is used.
Both use diffusers' own schedulers and timestep densities.
"""

from __future__ import annotations

import inspect

import torch
from diffusers import DDPMScheduler, FlowMatchEulerDiscreteScheduler
from diffusers.training_utils import compute_density_for_timestep_sampling


def _training_scheduler(cls, sampler_config, **overrides):
    """`cls` built from the settings it shares with the pipeline's sampler config (the sampler's own
    options, e.g. DPM-Solver's order, are not the training scheduler's business)."""
    accepted = inspect.signature(cls.__init__).parameters
    return cls(**{k: v for k, v in dict(sampler_config).items() if k in accepted and k not in overrides}, **overrides)


class FlowMatchingNoise:
    """Rectified flow (Sana, SD3, FLUX): x_t = (1 - sigma) x0 + sigma * noise, timestep = 1000 sigma.

    Timesteps follow the SD3 recipe: a `logit_normal` (or `uniform`, `mode`)
    density over the scheduler's shifted sigmas.
    """

    def __init__(self, weighting: str = "logit_normal", logit_mean: float = 0.0, logit_std: float = 1.0,
                 mode_scale: float = 1.29) -> None:
        self.weighting, self.logit_mean, self.logit_std, self.mode_scale = weighting, logit_mean, logit_std, mode_scale
        self.scheduler = None

    def bind(self, scheduler_config) -> FlowMatchingNoise:
        """Train on the sigmas the pipeline samples with: its scheduler's shift. Sana's pipeline samples with
        DPM-Solver, which names the same shift `flow_shift`; read as a flow-matching config it would
        silently fall back to shift 1 (mid-schedule sigma 0.5 instead of 0.75 at shift 3)."""
        shift = scheduler_config.get("shift", scheduler_config.get("flow_shift", 1.0))
        self.scheduler = _training_scheduler(FlowMatchEulerDiscreteScheduler, scheduler_config, shift=shift)
        if self.scheduler.config.get("use_dynamic_shifting"):
            raise ValueError(
                "the pipeline's scheduler shifts its sigmas by image size (use_dynamic_shifting=true); "
                "training noise supports a fixed shift only: set the scheduler's use_dynamic_shifting to false"
            )
        return self

    def __call__(self, x0: torch.Tensor, noise: torch.Tensor, generator: torch.Generator | None = None):
        """Return (noisy latents, timesteps) for clean latents `x0` (B, C, H, W)."""
        u = compute_density_for_timestep_sampling(
            self.weighting, x0.shape[0], self.logit_mean, self.logit_std, self.mode_scale, generator=generator
        )
        index = (u * self.scheduler.config.num_train_timesteps).long().clamp_max(len(self.scheduler.timesteps) - 1)
        sigma = self.scheduler.sigmas[index].to(x0.device, torch.float32).view(-1, 1, 1, 1)  # (B, 1, 1, 1)
        noisy = (1.0 - sigma) * x0.float() + sigma * noise.float()
        return noisy.to(x0.dtype), self.scheduler.timesteps[index].to(x0.device)


class DDPMNoise:
    """DDPM (PixArt): x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) noise, t uniform over the training steps."""

    def __init__(self) -> None:
        self.scheduler = None

    def bind(self, scheduler_config) -> DDPMNoise:
        self.scheduler = _training_scheduler(DDPMScheduler, scheduler_config)
        return self

    def __call__(self, x0: torch.Tensor, noise: torch.Tensor, generator: torch.Generator | None = None):
        steps = self.scheduler.config.num_train_timesteps
        t = torch.randint(0, steps, (x0.shape[0],), generator=generator).to(x0.device)
        return self.scheduler.add_noise(x0, noise, t), t
