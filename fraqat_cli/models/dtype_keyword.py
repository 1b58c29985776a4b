"""`from_pretrained`'s dtype keyword: `dtype=` where the installed library takes it, else `torch_dtype=`.

diffusers and transformers renamed `torch_dtype` to `dtype` and warn at every load that still passes the old
name; the older releases pyproject.toml allows (diffusers 0.32, transformers 4.46) know only `torch_dtype`.
"""

from __future__ import annotations

import functools

import transformers
from diffusers.utils import deprecation_utils
from packaging.version import Version


def diffusers_dtype(dtype) -> dict:
    """The keyword argument for diffusers' `from_pretrained` / `from_single_file`."""
    return {"dtype" if _diffusers_takes_dtype() else "torch_dtype": dtype}


def transformers_dtype(dtype) -> dict:
    """The keyword argument for transformers' `from_pretrained` (`dtype` since transformers 4.56)."""
    return {"dtype" if _transformers_takes_dtype() else "torch_dtype": dtype}


@functools.cache
def _diffusers_takes_dtype() -> bool:
    # the release that added `dtype` resolves the two names in one helper; no such helper, no `dtype`

    return hasattr(deprecation_utils, "_resolve_dtype")


@functools.cache
def _transformers_takes_dtype() -> bool:
    return Version(transformers.__version__) >= Version("4.56")
