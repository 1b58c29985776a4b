"""fraqat: quantization-aware training with fractional bits for diffusion transformers."""

__version__ = "0.1.0"

import logging as _logging

# Notices about libraries' own internals that they log while being imported, before an entry point's
# `quiet_console` runs: torch's pytree deprecation for each enum torchao registers, and diffusers' "Unable to
# import `torchao` Tensor objects" (an optional torchao class our torchao version no longer has). Set before
# torch, torchao or diffusers is imported, which keep a level set on their loggers.
for _name in ("torch.utils._pytree", "diffusers.quantizers.torchao.torchao_quantizer"):
    _logging.getLogger(_name).setLevel(_logging.ERROR)
