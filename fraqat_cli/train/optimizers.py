"""The optimizers `conf/optim/` offers, each a factory `(params, **settings) -> torch.optim.Optimizer`.

Hydra builds them as partials (`_partial_: true`): the config holds the settings, the distillation module
passes the trainable parameters later. AdamW keeps two float32 moments per trained parameter (8 bytes);
AdamW8bit keeps them as 8-bit codes with a float32 scale per block of 256 (about 2.03 bytes), torchao's
low-bit optimizer, which runs on the CPU as on CUDA.
"""

from __future__ import annotations

import logging
import warnings

import torch
from hydra.utils import get_class, get_method

from fraqat_cli.train.sharding import BlockShardedFSDP


def _plain(params, betas) -> tuple[list, tuple[float, float]]:
    """A list of parameters, and betas as a tuple of floats: a ListConfig pickled into an optimizer's
    param_groups would make the checkpoint unreadable with weights_only."""
    return list(params), (float(betas[0]), float(betas[1]))


def adamw(params, lr: float, weight_decay: float = 0.0, betas=(0.9, 0.999)):
    """torch's AdamW (its multi-tensor `foreach` step on CUDA). Not the fused kernel the paper names: Lightning
    refuses to clip the gradients of an optimizer that unscales them itself, and trainer=gpu clips (found on
    an H200: every trainer=gpu run stopped at its first step)."""
    params, betas = _plain(params, betas)
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, betas=betas)


def adamw8bit(params, lr: float, weight_decay: float = 0.0, betas=(0.9, 0.999), block_size: int = 256):
    """torchao's AdamW8bit: moments as signed/unsigned 8-bit codes with a scale per `block_size` values
    (tensors under 4,096 values, or not a multiple of the block, keep float32 moments, as bitsandbytes does).
    Its update is compiled with torch.compile, which on the CPU needs a C++ compiler."""

    # Notices about torchao's own internals, not about the run: torch's pytree logs a deprecation per enum
    # torchao registers on import, and AOT autograd warns that the 8-bit state class has no cache hash.
    pytree_log = logging.getLogger("torch.utils._pytree")
    level = pytree_log.level
    pytree_log.setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", message=r"OptimState8bit does not implement _stable_hash_for_caching")
    try:
        from torchao.optim import AdamW8bit  # only its option (optim=adamw8bit, format=diffusers)
    except ImportError as error:
        raise ValueError("optim=adamw8bit needs torchao, which is not installed: pip install 'torchao>=0.10', "
                         "or choose optim=adamw") from error
    finally:
        pytree_log.setLevel(level)
    params, betas = _plain(params, betas)
    return AdamW8bit(params, lr=lr, weight_decay=weight_decay, betas=betas, block_size=block_size)


CODE_BOOK_BYTES = 256 * 4  # torchao's 8-bit code book: 256 float32 values, stored with every 8-bit moment


def state_bytes(optim_cfg, param: torch.Tensor) -> tuple[int, int]:
    """(bytes, stored tensors) of the state `optim_cfg`'s optimizer keeps for `param` once it has stepped, as
    `last.ckpt` holds it. AdamW: two moments in the parameter's dtype and a float32 step count. AdamW8bit: the
    same, but a tensor of at least 4,096 values in whole blocks keeps each moment as uint8 codes, a float32
    scale per block and the code book (torchao's rule, as bitsandbytes'). Another optimizer counts as AdamW."""
    n = param.numel()
    if is_adamw8bit(optim_cfg):
        block = int(optim_cfg.get("block_size", 256))
        if n >= 4096 and n % block == 0:
            return 2 * (n + n // block * 4 + CODE_BOOK_BYTES) + 4, 2 * 3 + 1  # codes, scales, code book; step
    return 2 * n * param.element_size() + 4, 3


def optimizer_name(optim_cfg) -> str:
    return "8-bit AdamW" if is_adamw8bit(optim_cfg) else "AdamW"


def is_adamw8bit(optim_cfg) -> bool:
    """Whether `optim_cfg` (an `optim` group entry, or None) builds `adamw8bit`."""

    return optim_cfg is not None and get_method(optim_cfg._target_) is adamw8bit


def check_optimizer(optim_cfg, trainer_cfg) -> None:
    """Refuse, before any model is built, an optimizer whose state a sharded run cannot checkpoint: FSDP
    gathers AdamW8bit's 8-bit moments as AsyncCollectiveTensor wrappers, which no safe load can read, so
    the run would train for hours and then be unable to resume (seen on the CPU rehearsal, torchao 0.18)."""

    strategy = trainer_cfg.get("strategy")
    target = strategy.get("_target_") if hasattr(strategy, "get") else None
    if target is None or not is_adamw8bit(optim_cfg):
        return

    if issubclass(get_class(target), BlockShardedFSDP):
        raise ValueError("optim=adamw8bit cannot be checkpointed under trainer=fsdp (its sharded 8-bit moments "
                         "are not gathered into a readable file); allowed: optim=adamw8bit with trainer=ddp, gpu "
                         "or cpu, or trainer=fsdp with optim=adamw")
