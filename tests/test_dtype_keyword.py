"""Models load with the dtype keyword the installed diffusers/transformers take, without their deprecation."""

from __future__ import annotations

import warnings

import pytest
import torch
from hydra import compose, initialize_config_module

from fraqat_cli.models.dtype_keyword import _diffusers_takes_dtype, diffusers_dtype
from fraqat_cli.models.loading import load_model


def dtype_warnings(load) -> list[str]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        load()
    return [str(w.message) for w in caught if "torch_dtype" in str(w.message)]


@pytest.mark.parametrize("model", ["toy", "tiny_sana"])
def test_loading_a_model_raises_no_torch_dtype_deprecation(model):
    with initialize_config_module(config_module="fraqat_cli.conf", version_base="1.3"):
        cfg = compose(config_name="train", overrides=[f"model={model}"])
    assert dtype_warnings(lambda: load_model(cfg.model)) == []


def test_the_old_keyword_is_the_one_that_warns_where_dtype_is_taken(tmp_path):
    """The check above can fail: a pipeline loaded with `torch_dtype=` warns where diffusers takes `dtype`."""
    from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel

    unet = UNet2DModel(sample_size=8, block_out_channels=(8, 8), norm_num_groups=8, layers_per_block=1,
                       down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"))
    DDPMPipeline(unet=unet, scheduler=DDPMScheduler()).save_pretrained(tmp_path)
    assert dtype_warnings(lambda: DDPMPipeline.from_pretrained(tmp_path, **diffusers_dtype(torch.float32))) == []
    if _diffusers_takes_dtype():
        assert dtype_warnings(lambda: DDPMPipeline.from_pretrained(tmp_path, torch_dtype=torch.float32)) != []
