"""A config read from a file is data: nothing it names is built or imported unless fraqat's own `conf/` names it.

Checkpoints keep the resolved training config, exports keep the model config and the transformer's class.
Read back, those configs are `instantiate`d (family, components, noise, quantizer) and their class names
imported (pipeline, transformer, blocks). A stranger's file could name any callable there, and chains of
harmless-looking ones (write a file, then `numpy.load` it with pickles allowed) run code. So every such
name in a stored config must be one the packaged `conf/` itself uses at a key of the same name: the model
families, their diffusers and transformers classes, fraqat's quantizer, and so on. Anything else is refused
in one line naming the key, the value and what is allowed there. A user who trusts an unusual file passes
its model config on the command line (`model=NAME`), which then stands in for the stored one.
"""

from __future__ import annotations

import functools
from collections import defaultdict
from importlib import resources

import yaml
from hydra.utils import get_class
from omegaconf import DictConfig, OmegaConf

TARGET = "_target_"
CLASS_KEYS = ("pipeline", "transformer_class", "block_classes")  # plain strings that name a class to import
# Nodes of a training config that only training reads: dropped from a stored config before anything else, so a
# run with a callback or logger of the user's own still evaluates and exports, and nothing is built from them.
TRAINING_ONLY = ("callbacks", "logger")


class UntrustedConfig(ValueError):
    """A stored config names something fraqat's conf/ does not: refused, never built."""


@functools.cache
def known_names() -> dict[str, frozenset[str]]:
    """What the packaged conf/ names, by where: `family` -> the family classes' `_target_`s, `transformer_class`
    -> the diffusers transformer classes, and so on. A group file's top-level `_target_` counts under the
    group's name (conf/quantizer/*.yaml's under `quantizer`)."""
    found: defaultdict[str, set[str]] = defaultdict(set)
    root = resources.files("fraqat_cli.conf")
    for file in _yaml_files(root):
        group = file.parent.name if file.parent != root else None
        _collect(yaml.safe_load(file.read_text()) or {}, group, found)
    return {where: frozenset(names) for where, names in found.items()}


def _yaml_files(folder):
    for entry in folder.iterdir():
        if entry.is_dir():
            yield from _yaml_files(entry)
        elif entry.name.endswith(".yaml"):
            yield entry


def _collect(node, where: str | None, found: defaultdict[str, set[str]]) -> None:
    if isinstance(node, dict):
        for key, value in node.items():
            if key == TARGET and isinstance(value, str) and where is not None:
                found[where].add(value)
            elif key in CLASS_KEYS:  # an interpolation (`${model.block_classes}`) names nothing itself
                found[key].update(v for v in (value if isinstance(value, list) else [value])
                                  if isinstance(v, str) and "${" not in v)
            else:
                _collect(value, str(key), found)
    elif isinstance(node, list):
        for item in node:
            _collect(item, where, found)


@functools.cache
def known_transformer_classes() -> frozenset[str]:
    """The diffusers transformer classes the model configs name, as they name them (`diffusers.
    FluxTransformer2DModel`) and by their defining module (what an export records). Resolving them imports
    only diffusers classes of our own conf/, never a name from a file."""

    named = known_names()["transformer_class"]
    defined = {f"{cls.__module__}.{cls.__qualname__}" for cls in map(get_class, named)}
    return frozenset(named | defined)


def check_transformer_class(name, source: str) -> str:
    """`name`, if it is a transformer class a model config names; UntrustedConfig otherwise."""
    allowed = known_transformer_classes()
    if name not in allowed:
        raise UntrustedConfig(f"{source}: transformer_class={name!r} is not a transformer class fraqat knows; "
                              f"a file cannot choose what is imported. Allowed: {', '.join(sorted(allowed))}")
    return name


def check_stored_config(config, source: str, path: str = "") -> None:
    """Refuse `config` (plain dicts and lists, as stored) if any `_target_` or class name in it is not one
    fraqat's conf/ uses at a key of that name, or if it holds an interpolation (a stored config is resolved)."""
    if isinstance(config, dict):
        for key, value in config.items():
            where = f"{path}.{key}" if path else str(key)
            if key == TARGET or key in CLASS_KEYS:
                parent = path.rsplit(".", 1)[-1] if key == TARGET else key
                for name in value if isinstance(value, list) else [value]:
                    _check_name(name, parent, where, source)
            else:
                check_stored_config(value, source, where)
    elif isinstance(config, list):
        for index, item in enumerate(config):
            check_stored_config(item, source, f"{path}[{index}]")
    elif isinstance(config, str) and "${" in config:
        raise UntrustedConfig(f"{source}: {path}={config!r} is an interpolation; a stored config is resolved "
                              f"when written, so this file was not written by fraqat")


def trusted_config(stored: dict, source: str, model: DictConfig | None = None) -> DictConfig:
    """A stored training config as a DictConfig, once every name in it is one fraqat's conf/ uses; `model`
    (given by the user) stands in for the stored model config, whose name it must share."""
    if not isinstance(stored, dict):
        raise ValueError(f"{source} holds no config record a fraqat file has; write it again with fraqat")
    stored = {key: value for key, value in stored.items() if key not in TRAINING_ONLY}
    if model is not None:
        stored_name = (stored.get("model") or {}).get("name") if isinstance(stored.get("model"), dict) else None
        if stored_name != model.name:
            raise ValueError(f"{source} holds a student of model {stored_name!r}, not of model={model.name!r}; "
                             f"drop model= or pick a file of that model")
        stored = {**stored, "model": OmegaConf.to_container(model, resolve=True)}
    check_stored_config(stored, source)
    return OmegaConf.create(stored)


def _check_name(name, parent: str, where: str, source: str) -> None:
    allowed = known_names().get(parent.split("[")[0], frozenset())
    if isinstance(name, str) and name in allowed:
        return
    choices = ", ".join(sorted(allowed)) if allowed else "nothing (no fraqat config names a class there)"
    raise UntrustedConfig(
        f"{source}: {where}={name!r} is not a name fraqat's own conf/ uses there, and nothing a file names is "
        f"built or imported; allowed: {choices}. If you trust the file, give its model config on the command "
        f"line (model=NAME), which replaces the stored one")
