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
from .files import CheckpointError


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

    def agree(self, fn):
        """fn() on every rank; if it raised on any rank, the first such error (in rank order)
        raised on every rank, so that no rank goes on into a collective the failed one never
        reaches and every rank stops with the same message (a reward function that fails on
        the texts of one rank only)."""
        if self.size == 1:
            return fn()
        error = result = None
        try:
            result = fn()
        except Exception as e:  # shared with the other ranks below, then raised again
            error = e
        errors = [None] * self.size
        dist.all_gather_object(errors, None if error is None else (type(error), str(error)))
        first = next((e for e in errors if e is not None), None)
        if first is None:
            return result
        if error is not None and (type(error), str(error)) == first:
            raise error
        try:
            raised = first[0](first[1])
        except Exception:  # an exception class that takes other arguments
            raised = RuntimeError(f"{first[0].__name__}: {first[1]}")
        raise raised

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


# ------------------------------------------------------------------ FSDP2: sharded full fine-tuning

def shard(model: torch.nn.Module, world: World, device: torch.device, param_dtype: torch.dtype) -> torch.nn.Module:
    """Shard `model` in place across the processes with FSDP2 (`fully_shard`): each
    process keeps 1/N of every parameter, of its gradient and of the optimizer state;
    each transformer block's weights are gathered just before it runs and freed after
    (the root keeps the embeddings, the final norm and the heads). For full fine-tuning of
    the large sizes, where a whole copy per process (DDP) does not fit: gpt2-xl is 1.5B
    parameters, 24 GB with fp32 AdamW. Mixed precision: the gathered weights are cast to
    `param_dtype` for compute, gradients reduced in fp32. The optimizer must be made after."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mesh = init_device_mesh(device.type, (world.size,))
    policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)
    for block in model.transformer.h:
        fully_shard(block, mesh=mesh, mp_policy=policy)
    fully_shard(model, mesh=mesh, mp_policy=policy)
    return model


def is_sharded(model: torch.nn.Module) -> bool:
    """Whether `model` was sharded by shard() (its parameters are DTensors)."""
    from torch.distributed.tensor import DTensor

    return any(isinstance(p, DTensor) for p in model.parameters())


def full_value(x: torch.Tensor) -> torch.Tensor:
    """A DTensor's whole value (a collective), a plain tensor as it is."""
    from torch.distributed.tensor import DTensor

    return x.full_tensor() if isinstance(x, DTensor) else x


def full_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A sharded model's whole weights on rank 0's CPU, the other ranks getting {} (a
    collective: every rank calls it); for a checkpoint every tool can read on any number
    of processes."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True,
                                                                broadcast_from_rank0=False))


def save_optimizer_shards(model: torch.nn.Module, optimizer: torch.optim.Optimizer, folder) -> None:
    """The optimizer state with torch.distributed.checkpoint (DCP): each rank writes its
    own shard, rank 0 the metadata that lets any number of processes (one included) read
    it back resharded. A collective: every rank calls it with the same folder."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    from torch.distributed.checkpoint.api import CheckpointException

    try:
        dcp.save({"optimizer": get_optimizer_state_dict(model, optimizer)}, checkpoint_id=str(folder))
    except CheckpointException as e:  # a BaseException, raised alike on every rank
        raise dcp_error(e, "write", folder) from None


def dcp_error(e, what: str, folder) -> CheckpointError:
    """DCP's CheckpointException (a BaseException: past every `except Exception`) as the
    project's CheckpointError, naming the ranks that failed and why (a full disk)."""
    import errno

    failures = getattr(e, "failures", None) or {}
    causes = [f[0] if isinstance(f, tuple) else f for f in failures.values()]
    if any(getattr(c, "errno", None) == errno.ENOSPC for c in causes):
        why = "the disk is full"
    else:
        first = causes[0] if causes else e
        why = f"{type(first).__name__}: {(str(first).strip().splitlines() or [''])[0][:200]}"
    return CheckpointError(f"{folder}: could not {what} the optimizer shards (rank(s) {sorted(failures)}: {why})")


def missing_shards(folder) -> list[str]:
    """The files DCP's metadata in `folder` refers to that are not there (a process whose
    shard went to a disk the others do not see)."""
    from pathlib import Path

    from torch.distributed.checkpoint import FileSystemReader

    try:
        meta = FileSystemReader(str(folder)).read_metadata()
    except OSError:
        return [".metadata"]
    wanted = {info.relative_path for info in (meta.storage_data or {}).values()}
    return sorted(f for f in wanted if not (Path(folder) / f).is_file())


def load_optimizer(model: torch.nn.Module, optimizer: torch.optim.Optimizer, folder=None,
                   state: dict | None = None) -> None:
    """Load optimizer state saved by save_optimizer_shards (`folder`, on any number of
    processes) or by optimizer.state_dict() in one process (`state`), into the optimizer of
    a model that is sharded or not: DCP reshards the saved state onto this process's
    parameters."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_optimizer_state_dict,
                                                         set_optimizer_state_dict)

    if folder is not None:
        target = {"optimizer": get_optimizer_state_dict(model, optimizer)}
        from torch.distributed.checkpoint.api import CheckpointException

        try:
            dcp.load(target, checkpoint_id=str(folder))  # one process: DCP reads every shard
        except CheckpointException as e:
            raise dcp_error(e, "read", folder) from None
        set_optimizer_state_dict(model, optimizer, target["optimizer"])
        return
    # one process's optimizer.state_dict(): parameters numbered in the order of the param
    # groups, the order every process builds them in; by name, then sharded
    names = {id(p): n for n, p in model.named_parameters()}
    order = [names[id(p)] for g in optimizer.param_groups for p in g["params"]]
    by_name = {"state": {order[i]: s for i, s in state["state"].items()},
               "param_groups": [{**g, "params": [order[i] for i in g["params"]]} for g in state["param_groups"]]}
    set_optimizer_state_dict(model, optimizer, by_name, options=StateDictOptions(full_state_dict=True))
