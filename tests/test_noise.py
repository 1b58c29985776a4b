"""Training noise is drawn on the sigmas each family's pipeline samples with."""

from __future__ import annotations

import pytest
import torch
from diffusers import DPMSolverMultistepScheduler, FlowMatchEulerDiscreteScheduler
from hydra.utils import instantiate
from omegaconf import OmegaConf

from fraqat_cli.models.noise import DDPMNoise, FlowMatchingNoise

# The real pipelines' scheduler_config.json values (hub ids as in conf/model/*.yaml).
REAL_SAMPLERS = {
    "sana": DPMSolverMultistepScheduler(  # Efficient-Large-Model/Sana_600M_512px_diffusers
        flow_shift=3.0, use_flow_sigmas=True, prediction_type="flow_prediction", solver_order=2,
        algorithm_type="dpmsolver++", num_train_timesteps=1000,
    ),
    "pixart_sigma": DPMSolverMultistepScheduler(  # PixArt-alpha/PixArt-Sigma-XL-2-1024-MS
        beta_schedule="linear", beta_start=0.0001, beta_end=0.02, num_train_timesteps=1000,
        prediction_type="epsilon", solver_order=2, algorithm_type="dpmsolver++",
    ),
    "sd35_medium": FlowMatchEulerDiscreteScheduler(shift=3.0),  # stabilityai/stable-diffusion-3.5-medium
    "flux_schnell": FlowMatchEulerDiscreteScheduler(  # black-forest-labs/FLUX.1-schnell
        shift=1.0, use_dynamic_shifting=False, base_shift=0.5, max_shift=1.15,
    ),
}
TINY = ["tiny_sana", "tiny_pixart", "tiny_sd3", "tiny_flux", "toy"]


def sampler_of(name: str):
    if name in REAL_SAMPLERS:
        return REAL_SAMPLERS[name]
    return instantiate(OmegaConf.load(f"conf/model/{name}.yaml").components.scheduler)


def training_noise(name: str):
    return instantiate(OmegaConf.load(f"conf/model/{name}.yaml").noise).bind(sampler_of(name).config)


def unshifted(sampler):
    """The same sampler with its shift undone: its sigmas are then the evenly spaced positions u."""
    return type(sampler).from_config(sampler.config, shift=1.0, flow_shift=1.0)


@pytest.mark.parametrize("name", [*REAL_SAMPLERS, *TINY])
def test_training_noise_uses_the_pipelines_sigmas(name):
    """At every position u of the sampler's schedule, the training grid holds the sigma the sampler uses."""
    sampler, noise = sampler_of(name), training_noise(name)
    if isinstance(noise, DDPMNoise):  # same beta schedule, so the same x_t for every timestep
        torch.testing.assert_close(noise.scheduler.alphas_cumprod, sampler.alphas_cumprod)
        return
    plain = unshifted(sampler)
    sampler.set_timesteps(20)
    plain.set_timesteps(20)
    grid = noise.scheduler.sigmas  # training sigmas, descending; FlowMatchingNoise draws index = u' * 1000
    for u, sigma in zip(plain.sigmas[:-1].tolist(), sampler.sigmas[:-1].tolist()):
        index = min(round((1 - u) * noise.scheduler.config.num_train_timesteps), len(grid) - 1)
        assert float(grid[index]) == pytest.approx(sigma, abs=1e-2), (name, u)  # diffusers shifts sigma_min twice


def test_noisy_latents_mix_at_the_shifted_sigma():
    noise = training_noise("sana")
    x0, eps = torch.zeros(4096, 1, 1, 1), torch.ones(4096, 1, 1, 1)
    noisy, timesteps = noise(x0, eps, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(noisy.flatten(), timesteps.float() / 1000, atol=1e-6, rtol=0)
    assert noisy.median() > 0.6  # logit-normal around u = 0.5, shifted by 3: sigma 0.75 (unshifted: 0.5)


def test_a_size_dependent_shift_is_refused():
    with pytest.raises(ValueError, match="use_dynamic_shifting"):
        FlowMatchingNoise().bind(FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True).config)
