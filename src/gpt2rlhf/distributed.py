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

    def gather(self, value: torch.Tensor) -> torch.Tensor:
        """Every rank's `value` (the same shape on each) concatenated along dim 0 in rank
        order: with contiguous shares, the global batch's rows in their 1-process order."""
        if self.size == 1:
            return value
        parts = [torch.empty_like(value) for _ in range(self.size)]
        dist.all_gather(parts, value.contiguous())
        return torch.cat(parts)

    def all(self, flags: torch.Tensor) -> bool:
        """Whether `flags` are all true on every rank (one small all-reduce)."""
        if self.size == 1:
            return bool(flags.all())
        return not bool(self.max((~flags).any().to(torch.int32)))

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

    def on_main(self, fn):
        """fn() on rank 0 alone, the others waiting: its result on rank 0, and its error, if
        it raised one, raised again on every rank (the same message everywhere, no rank
        left waiting in a collective that rank 0 never reaches)."""
        if self.size == 1:
            return fn()
        error = result = None
        if self.main:
            try:
                result = fn()
            except Exception as e:  # shared with the other ranks below, then raised again here too
                error = e
        kind, message = self.broadcast((None, None) if error is None else (type(error), str(error)))
        if error is not None:
            raise error
        if kind is not None:
            raise kind(message)
        return result


def launched_world() -> World:
    """The world torchrun describes in the environment; one process without it."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size <= 1:
        return World()
    missing = [k for k in ("RANK", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
    if missing:
        raise ConfigError(f"WORLD_SIZE is {size} but {', '.join(missing)} is not set: start several processes "
                          f"with torchrun (e.g. torchrun --standalone --nproc_per_node {size} ...), or unset WORLD_SIZE")
    if not dist.is_available():
        raise ConfigError("this torch build has no torch.distributed: run one process (unset WORLD_SIZE)")
    return World(int(os.environ["RANK"]), size, int(os.environ.get("LOCAL_RANK", "0")))


def init(world: World, device: torch.device, timeout_s: float = 600.0) -> None:
    """Join the process group of a multi-process run (once per process): NCCL on CUDA, gloo
    on CPU. The timeout bounds every collective, so a rank that died or diverged ends the
    others with an error instead of a hang."""
    if world.size == 1 or dist.is_initialized():
        return
    if timeout_s <= 0:
        raise ConfigError(f"train.dist_timeout must be > 0 seconds, got {timeout_s}")
    backend = "nccl" if device.type == "cuda" else "gloo"
    if backend == "nccl" and not dist.is_nccl_available():
        raise ConfigError("train.device is CUDA but this torch build has no NCCL; use --train.device cpu (gloo)")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s),
                            device_id=device if device.type == "cuda" else None)


COLLECTIVE_ERRORS = (dist.DistError, RuntimeError) if dist.is_available() else ()


def lost_peer(error: BaseException, world: World) -> bool:
    """Whether `error` is a collective that failed because another process died or stopped
    answering (gloo's "Connection closed by peer", a timeout, NCCL's errors)."""
    if world.size == 1 or not isinstance(error, COLLECTIVE_ERRORS):
        return False
    text = str(error).lower()
    return isinstance(error, dist.DistError) or any(w in text for w in (
        "timed out", "timeout", "connection closed", "connection reset", "peer", "nccl", "gloo"))


def close() -> None:
    """Leave the process group (at the end of a stage, or after an error on this rank)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
