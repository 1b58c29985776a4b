"""Load a model family's diffusers pipeline from `conf/model/*`: real weights or a tiny random twin.

Real models come from `path` (a local diffusers folder) or the hub (`hub_id` at
`revision`), in the config's dtype. Tiny twins (`components:` in the config) are
built from the same classes with tiny configs and weights drawn from `init_seed`,
so the same config always yields the same teacher.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from hydra.utils import get_class, instantiate
from omegaconf import DictConfig, OmegaConf

from fraqat_cli.errors import ExpectedFailure
from fraqat_cli.models.dtype_keyword import diffusers_dtype
from fraqat_cli.models.families import Family

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class ModelLoadError(RuntimeError, ExpectedFailure):
    """A real model could not be loaded; the message says how to point at local weights."""


def model_dtype(model_cfg: DictConfig) -> torch.dtype:
    if model_cfg.dtype not in DTYPES:
        raise ValueError(f"model.dtype={model_cfg.dtype!r} is not supported; allowed: {', '.join(DTYPES)}")
    return DTYPES[model_cfg.dtype]


DENOISER_PARTS = ("transformer", "vae")


@dataclass(frozen=True)
class LoadedModel:
    """A model as the stages use it, the three things that always travel together: its diffusers pipeline
    (whose transformer is the teacher, or the student put in its place), its family's conventions, and the
    `conf/model` entry it was built from (resolution, sampler, sequence length)."""

    pipe: object
    family: Family
    config: DictConfig

    @property
    def transformer(self) -> torch.nn.Module:
        return self.pipe.transformer


def family_of(model_cfg: DictConfig) -> Family:
    """The `Family` the model config names (`family: {_target_: ...}`)."""
    return instantiate(model_cfg.family)


def load_model(model_cfg: DictConfig, without: tuple[str, ...] | None = None) -> LoadedModel:
    """The model's pipeline, family and config. `without` None leaves out the text encoders (the stages
    read prompts' conditioning from the cache, `fraqat_cli.data.conditioning`)."""
    family = family_of(model_cfg)
    return LoadedModel(load_pipeline(model_cfg, family.text_parts if without is None else without), family, model_cfg)


def load_pipeline(model_cfg: DictConfig, without: tuple[str, ...] = ()):
    """Build the family's pipeline, leaving out the named components (e.g. the text encoders once
    their outputs are cached, or the transformer and VAE when only prompts are encoded)."""
    pipeline_cls = get_class(model_cfg.pipeline)
    dtype = model_dtype(model_cfg)
    skipped = {name: None for name in without}
    if model_cfg.get("components"):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(model_cfg.init_seed)
            parts = {
                name: (None if name in skipped else instantiate(spec)) for name, spec in model_cfg.components.items()
            }
        pipe = pipeline_cls(**parts)
    else:
        pipe = _from_pretrained(pipeline_cls, model_cfg, dtype, skipped)
    for part in pipe.components.values():  # tiny twins come out float32 and in training mode: every model part
        if isinstance(part, torch.nn.Module):  # in the config's dtype and in eval mode, as from_pretrained gives
            part.eval()
            if part.dtype != dtype:
                part.to(dtype)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _from_pretrained(pipeline_cls, model_cfg: DictConfig, dtype: torch.dtype, skipped: dict):
    if model_cfg.path:
        source = Path(model_cfg.path).expanduser()
        if not source.is_dir():
            raise ModelLoadError(
                f"model.path={str(source)!r} is not a folder; give the folder of a diffusers pipeline "
                f"(one with model_index.json), e.g. a download of {model_cfg.hub_id}"
            )
        source, revision = str(source), None
    else:
        source, revision = model_cfg.hub_id, model_cfg.revision
    try:
        return pipeline_cls.from_pretrained(source, revision=revision, **diffusers_dtype(dtype), **skipped)
    except Exception as error:  # hub or file errors come as many types; all mean "not loadable here"
        raise ModelLoadError(
            f"could not load model {model_cfg.name!r} from {source!r} ({type(error).__name__}: {error}). "
            f"Without network access, download it where you have one "
            f"(`hf download {model_cfg.hub_id} --revision {model_cfg.revision} --local-dir DIR`) "
            f"and run with model.path=DIR"
        ) from error


def model_identity(model_cfg: DictConfig) -> dict:
    """What determines a model's outputs, for cache keys."""

    keys = ("name", "pipeline", "hub_id", "revision", "path", "dtype", "init_seed", "components", "max_sequence_length")
    return {
        k: OmegaConf.to_container(model_cfg[k]) if OmegaConf.is_config(model_cfg[k]) else model_cfg[k] for k in keys
    }
