"""A model config's transformer as data: built on the meta device, or with random weights, without the hub.

Every `conf/model/*` names its `transformer_class` and the `block_classes` that
FSDP and activation checkpointing treat as one unit each. The constructor
arguments come from `architecture` (real models: the hub's config.json values,
kept in the config so the real architecture is known offline; a `_target_`
node may load them, as the toy's does from its shipped config.json) or, when
`architecture` is null, from `components.transformer` (the tiny twins).

On the meta device a model has shapes but no memory, so a 12 B FLUX is counted,
quantized and inspected in a fraction of a second; with random weights on a
real device it stands in for the real model in rehearsals.
"""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path

import torch
from hydra.utils import get_class, instantiate
from omegaconf import DictConfig, OmegaConf
from torch import nn

# Keys counting blocks; `layers=N` sets each one present (FLUX has both kinds).
LAYER_KEYS = ("num_layers", "num_single_layers")


def packaged_config(path: str) -> dict:
    """A config.json shipped inside the package (`path` relative to `fraqat_cli/`), as constructor arguments."""
    package = Path(str(resources.files("fraqat_cli"))).resolve()
    file = (package / str(path)).resolve()
    if not file.is_relative_to(package / "assets"):  # a stored config is data: it reads nothing outside the assets
        raise ValueError(f"architecture file {path!r} is not under the package's assets/; allowed: the shipped "
                         f"config.json files, e.g. assets/toy/transformer/config.json")
    if not file.is_file():
        raise FileNotFoundError(f"architecture file {path!r} is not in the fraqat_cli package; reinstall fraqat-cli")
    return _constructor_arguments(json.loads(file.read_text()))


def _constructor_arguments(config: dict) -> dict:
    """Drop the bookkeeping keys diffusers writes into config.json (`_class_name`, `_diffusers_version`, ...)."""
    return {key: value for key, value in config.items() if not key.startswith("_")}


def transformer_class(model_cfg: DictConfig) -> type[nn.Module]:
    return _resolve(model_cfg.transformer_class, "transformer_class", model_cfg.name)


def block_classes(model_cfg: DictConfig) -> tuple[type[nn.Module], ...]:
    """The transformer block classes of `block_classes`, resolved; each names one unit to wrap or checkpoint."""
    names = model_cfg.get("block_classes")
    if not names:
        raise ValueError(f"model {model_cfg.name!r} names no block_classes; give the dotted names of its block classes")
    return tuple(_resolve(name, "block_classes", model_cfg.name) for name in names)


def _resolve(dotted: str, key: str, model_name: str) -> type[nn.Module]:
    try:
        cls = get_class(dotted)
    except Exception as error:  # Hydra wraps import errors in several types
        raise ValueError(
            f"model {model_name!r}: {key} entry {dotted!r} does not resolve to a class ({error})"
        ) from error
    if not issubclass(cls, nn.Module):
        raise ValueError(f"model {model_name!r}: {key} entry {dotted!r} is not a torch.nn.Module class")
    return cls


def transformer_kwargs(model_cfg: DictConfig) -> dict:
    """The transformer's constructor keyword arguments, from `architecture` or else `components.transformer`."""
    arch = model_cfg.get("architecture")
    if arch is not None:
        kwargs = instantiate(arch) if "_target_" in arch else OmegaConf.to_container(arch, resolve=True)
        return dict(kwargs)
    spec = (model_cfg.get("components") or {}).get("transformer")
    if spec is None:
        raise ValueError(
            f"model {model_cfg.name!r} has neither `architecture` nor `components.transformer`; "
            f"give the transformer's config.json values as `architecture`"
        )
    spec = OmegaConf.to_container(spec, resolve=True)
    target = spec.pop("_target_")
    if get_class(target) is not transformer_class(model_cfg):
        raise ValueError(
            f"model {model_cfg.name!r}: components.transformer builds {target!r} "
            f"but transformer_class is {model_cfg.transformer_class!r}; allowed: the same class"
        )
    return spec


def build_transformer(
    model_cfg: DictConfig,
    device: str | torch.device = "meta",
    dtype: torch.dtype | None = None,
    layers: int | None = None,
    seed: int = 0,
) -> nn.Module:
    """The config's transformer: on the meta device (shapes only, no memory, the default) or with random
    weights drawn from `seed` on `device` in `dtype`. `layers` keeps the width but builds N blocks of each kind.

    Random weights are drawn in float32 and then cast, so peak memory is the float32 size.
    """
    kwargs = transformer_kwargs(model_cfg)
    if layers is not None:
        if isinstance(layers, bool) or not isinstance(layers, int) or layers < 1:
            raise ValueError(f"layers={layers!r} is not allowed; allowed: a whole number of blocks >= 1")
        kwargs.update({key: layers for key in LAYER_KEYS if key in kwargs})
    cls = transformer_class(model_cfg)
    with torch.random.fork_rng(devices=[]), torch.device(device):
        torch.manual_seed(seed)
        model = cls(**kwargs)
    return model.to(dtype) if dtype is not None else model


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
