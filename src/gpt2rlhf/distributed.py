"""Several processes, one code path: PyTorch's own distributed engine (torchrun,
torch.distributed, DistributedDataParallel). A stage started without torchrun is the
world-size-1 case of the same code: no process group, nothing reduced, nothing wrapped.

Under `torchrun --nproc_per_node N` every process runs the whole stage; torchrun's
environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT) says which one it is.
Each takes its share of every global batch (`-b` stays the global batch), DDP averages the
gradients, and rank 0 alone writes the run folder, logs, TensorBoard and checkpoints.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from .config import ConfigError


@dataclass(frozen=True)
class World:
    """This process's place among the stage's processes (rank 0 of 1 without torchrun)."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        """Rank 0: the one process that writes files and prints."""
        return self.rank == 0

    def share(self, items: list, what: str = "train.batch_size (-b)") -> list:
        """This rank's contiguous share of a global batch; the batch must divide evenly, so
        that every rank's gradient counts as much as one process's would."""
        if self.size == 1:
            return items
        if len(items) % self.size:
            raise ConfigError(f"{what} ({len(items)}) must be divisible by the number of processes ({self.size})")
        n = len(items) // self.size
        return items[self.rank * n:(self.rank + 1) * n]

    def sum(self, value: torch.Tensor) -> torch.Tensor:
        """The sum of `value` over the ranks (itself with one process)."""
        if self.size > 1:
            value = value.clone()
            dist.all_reduce(value, op=dist.ReduceOp.SUM)
        return value

    def max(self, value: torch.Tensor) -> torch.Tensor:
        if self.size > 1:
            value = value.clone()
            dist.all_reduce(value, op=dist.ReduceOp.MAX)
        return value

    def broadcast(self, obj):
        """Rank 0's `obj` on every rank (a picklable object)."""
        if self.size == 1:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def barrier(self):
        if self.size > 1:
            dist.barrier()


def launched_world() -> World:
    """The world torchrun describes in the environment; one process without it."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size <= 1:
        return World()
    return World(int(os.environ["RANK"]), size, int(os.environ.get("LOCAL_RANK", "0")))


def init(world: World, device: torch.device, timeout_s: float = 600.0) -> None:
    """Join the process group of a multi-process run (once per process): NCCL on CUDA, gloo
    on CPU. The timeout bounds every collective, so a rank that died or diverged ends the
    others with an error instead of a hang."""
    if world.size == 1 or dist.is_initialized():
        return
    backend = "nccl" if device.type == "cuda" else "gloo"
    if backend == "nccl" and not dist.is_nccl_available():
        raise ConfigError("train.device is CUDA but this torch build has no NCCL; use --train.device cpu (gloo)")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s),
                            device_id=device if device.type == "cuda" else None)


def close() -> None:
    """Leave the process group (at the end of a stage, or after an error on this rank)."""
    if dist.is_initialized():
        dist.destroy_process_group()
