"""Shard the student one transformer block at a time (FSDP2), on GPUs or, for rehearsal, on the CPU.

Lightning's `strategy: fsdp` wraps the whole student as one unit, so every step
all-gathers all of it (FLUX: 24 GB beside a 24 GB teacher), and it refuses the
CPU. Here each instance of the model's block classes (`model.block_classes`) is
its own `fully_shard` unit, then the rest of the student; one block is gathered
at a time. The teacher is not a registered submodule, so it is never sharded:
each rank holds it whole, in its inference dtype.
"""

from __future__ import annotations

from hydra.utils import get_class
from lightning.pytorch.strategies import ModelParallelStrategy
from torch import nn
from torch.distributed.fsdp import fully_shard


class BlockShardedFSDP(ModelParallelStrategy):
    """Pure data-parallel FSDP2 (no tensor parallelism) with a unit per block of `block_classes` (dotted names).

    Checkpoints are gathered into one file on rank 0 (`save_distributed_checkpoint=False`), so `fraqat-eval`
    and `fraqat-export` read them without FSDP. A sharded student's forward is a collective: sample grids
    are drawn on every rank (`samples_on_every_rank`) and saved by rank 0.
    """

    samples_on_every_rank = True

    def __init__(self, block_classes: list[str], reshard_after_forward: bool = True, **kwargs) -> None:
        if not block_classes:
            raise ValueError("trainer=fsdp needs model.block_classes: the transformer block classes to shard by")
        self.block_classes = tuple(get_class(name) for name in block_classes)
        self.reshard_after_forward = reshard_after_forward
        super().__init__(tensor_parallel_size=1, save_distributed_checkpoint=False, **kwargs)

    def setup_environment(self) -> None:
        self._data_parallel_size = self.num_nodes * self.num_processes  # every device holds a shard
        super().setup_environment()

    def shard(self, student: nn.Module) -> None:
        """Called from the LightningModule's `configure_model`: blocks first, then the student's remainder."""

        mesh = self.device_mesh["data_parallel"]
        blocks = [m for m in student.modules() if isinstance(m, self.block_classes)]
        if not blocks:
            raise ValueError(f"model.block_classes {[c.__name__ for c in self.block_classes]} match no module of "
                             f"{type(student).__name__}; name its transformer block classes")
        for block in blocks:
            fully_shard(block, mesh=mesh, reshard_after_forward=self.reshard_after_forward)
        fully_shard(student, mesh=mesh, reshard_after_forward=self.reshard_after_forward)
