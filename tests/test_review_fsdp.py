"""Review of 96856f9 (train.parallel fsdp): what the sharded save and load do when
something goes wrong, on CPU with gloo.

One torchrun launch (2 processes) runs a tiny sharded model through stage_common.save and
records what happened on each rank; the tests below read those records:

- a sharded checkpoint resumes under DDP (a plain model in a process group);
- a failed optimizer-shard write (a full disk on one rank) must end as the project's
  CheckpointError on every rank, leaving no staging folder behind, like a failed write of
  any other checkpoint (it is DCP's CheckpointException, a BaseException, today);
- a checkpoint is never written without every rank's shard: with the run folder on a
  disk that is not shared (each node its own), rank 0 today writes a checkpoint that
  verifies as intact but cannot be resumed.

In one process: a missing optimizer shard is a CheckpointError when loaded, and a damaged
shard sends a resume back to the previous checkpoint."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from gpt2rlhf.checkpoint import CheckpointError, save_checkpoint, step_dir, verify_checkpoint
from gpt2rlhf.config import OptimArgs, SFTConfig, load_config
from gpt2rlhf.model import GPT, GPTConfig

SRC = Path(__file__).resolve().parents[1] / "src"

WORKER = r'''
import errno, json, sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint.filesystem as dcp_fs

from gpt2rlhf.checkpoint import CheckpointError
from gpt2rlhf.config import SFTConfig, load_config
from gpt2rlhf.distributed import World
from gpt2rlhf.model import GPT, GPTConfig
from gpt2rlhf.stages import common as sc

dist.init_process_group("gloo")
rank = dist.get_rank()
world = World(rank, 2)
root = Path(sys.argv[1])
out = {}
cfg = load_config(SFTConfig, overrides=["--model.n_layer", "1", "--train.parallel", "fsdp", "--train.device", "cpu",
                                        "--train.dtype", "fp32"])
config = GPTConfig(block_size=16, vocab_size=64, n_layer=2, n_head=2, n_embd=16)


def sharded_run(folder):
    run = sc.Run(folder, "sft", cfg, torch.device("cpu"), torch.float32, world=world, started=True)
    torch.manual_seed(0)
    model = GPT(config)
    sc.forward_fn(model, run)
    stepper = sc.Stepper(model, run, cfg.optim, cfg.train, 10, ddp=run.ddp[model])
    x = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(rank))
    for _ in range(2):
        stepper.step([x], lambda b: (model(b).logsumexp(-1).mean(), {}))
    return run, model, stepper


def error(e):
    return {"type": type(e).__name__, "checkpoint_error": isinstance(e, CheckpointError), "text": str(e)[:300]}


# 1. a sharded checkpoint, resumed by a plain (DDP) model on the same 2 processes
shared = root / "shared"
run, model, stepper = sharded_run(shared)
ckpt = sc.save(run, 2, {"model": model}, stepper, {"data_position": 0})
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict
full = get_optimizer_state_dict(model, stepper.optimizer, options=StateDictOptions(full_state_dict=True))
ddp_cfg = load_config(SFTConfig, overrides=["--model.n_layer", "1", "--train.device", "cpu", "--train.dtype", "fp32"])
ddp_run = sc.Run(shared, "sft", ddp_cfg, torch.device("cpu"), torch.float32, world=world, started=True)
plain = GPT(config)
plain_stepper = sc.Stepper(plain, ddp_run, cfg.optim, cfg.train, 10)
try:
    plain_stepper.load_state_dict(torch.load(ckpt / "trainer_state.pt", weights_only=True), shards=ckpt / "optimizer")
    names = {id(p): n for n, p in plain.named_parameters()}
    diff = 0.0
    for p, s in plain_stepper.optimizer.state.items():
        want = full["state"][names[id(p)]]
        diff = max([diff] + [float((s[k].float() - want[k].float()).abs().max()) for k in ("exp_avg", "exp_avg_sq", "step")])
    out["ddp_resume"] = {"max_diff": diff, "states": len(plain_stepper.optimizer.state),
                         "last_epoch": plain_stepper.scheduler.last_epoch}
except BaseException as e:  # DCP raises CheckpointException, a BaseException
    out["ddp_resume"] = error(e)

# 2. the disk fills up while rank 1 writes its optimizer shard
real_write = dcp_fs._write_item
if rank == 1:
    def full_disk(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")
    dcp_fs._write_item = full_disk
try:
    sc.save(run, 3, {"model": model}, stepper, {"data_position": 0})
    out["disk_full"] = {"type": None}
except BaseException as e:
    out["disk_full"] = error(e)
dcp_fs._write_item = real_write
world.barrier()
out["disk_full"]["left"] = sorted(p.name for p in (shared / "checkpoints").iterdir())

# 3. each rank's run folder on its own disk (two nodes, no shared filesystem): rank 1's
#    shard never reaches rank 0's checkpoint folder
own = root / ("node0" if rank == 0 else "node1") / "run"
run, model, stepper = sharded_run(own)
try:
    path = sc.save(run, 2, {"model": model}, stepper, {"data_position": 0})
    out["node_local"] = {"type": None}
    if rank == 0:
        from torch.distributed.checkpoint import FileSystemReader
        meta = FileSystemReader(str(path / "optimizer")).read_metadata()
        wanted = sorted({info.relative_path for info in meta.storage_data.values()})
        out["node_local"]["missing"] = [f for f in wanted if not (path / "optimizer" / f).is_file()]
except BaseException as e:
    out["node_local"] = error(e)

(root / f"rank{rank}.json").write_text(json.dumps(out))
dist.destroy_process_group()
'''


@pytest.fixture(scope="module")
def worker(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("review_fsdp")
    script = tmp / "worker.py"
    script.write_text(WORKER)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           str(script), str(tmp)], capture_output=True, text=True, timeout=240, env=env)
    files = [tmp / f"rank{r}.json" for r in (0, 1)]
    assert done.returncode == 0 and all(f.is_file() for f in files), done.stderr[-4000:]
    return tmp, [json.loads(f.read_text()) for f in files]


def test_a_sharded_checkpoint_resumes_under_ddp(worker):
    """FSDP 2 -> DDP 2 (not covered by test_fsdp.py): the shards load into a whole model."""
    _, results = worker
    for r in results:
        assert "max_diff" in r["ddp_resume"], r["ddp_resume"]
        assert r["ddp_resume"]["max_diff"] == 0.0 and r["ddp_resume"]["states"] > 0
        assert r["ddp_resume"]["last_epoch"] == 2


def test_a_failed_optimizer_shard_write_is_a_checkpoint_error_on_every_rank(worker):
    """A full disk on one rank during DCP's save: like any failed checkpoint write, a
    CheckpointError on every rank (the stage's one-line error, exit 2), the staging
    folder removed, the earlier checkpoint intact. Today: DCP's CheckpointException (a
    BaseException, past the stage's error handling: a traceback) and .step_00000003.shards-PID
    left in the checkpoints folder."""
    tmp, results = worker
    for rank, r in enumerate(results):
        assert r["disk_full"]["type"] is not None, "the save did not fail"
        assert r["disk_full"]["checkpoint_error"], f"rank {rank}: {r['disk_full']['type']}: {r['disk_full']['text']}"
    left = results[0]["disk_full"]["left"]
    assert left == ["step_00000002"], left
    verify_checkpoint(tmp / "shared" / "checkpoints" / "step_00000002")


def test_a_checkpoint_is_never_written_without_every_ranks_shard(worker):
    """Run folder not on a shared filesystem (multi-node, node-local disks): DDP's saves
    work there (rank 0 writes everything), FSDP's cannot. Either the save is a clear
    CheckpointError on every rank, or the checkpoint holds every file its optimizer
    metadata refers to. Today rank 0 writes a checkpoint without rank 1's shard that
    verify_checkpoint calls intact; its resume fails in DCP (FileNotFoundError inside a
    CheckpointException)."""
    _, results = worker
    if all(r["node_local"].get("checkpoint_error") for r in results):
        return
    assert results[0]["node_local"]["type"] is None, results
    assert results[0]["node_local"]["missing"] == [], (
        f"checkpoint written without {results[0]['node_local']['missing']}")


# ------------------------------------------------------------------ one process

def tiny_trained():
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=16, vocab_size=64, n_layer=1, n_head=2, n_embd=16))
    from gpt2rlhf.stages.common import make_optimizer

    optimizer = make_optimizer(model, OptimArgs(), torch.device("cpu"))
    model(torch.randint(0, 64, (2, 8))).logsumexp(-1).mean().backward()
    optimizer.step()
    optimizer.zero_grad()
    return model, optimizer


def test_a_missing_optimizer_shard_is_a_checkpoint_error_when_loaded(tmp_path):
    """distributed.load_optimizer(folder=...) with a shard gone (or unreadable, or from an
    incompatible DCP version): a CheckpointError naming the folder, not DCP's
    CheckpointException, which is a BaseException that no `except Exception` catches."""
    from gpt2rlhf.distributed import load_optimizer, save_optimizer_shards
    from gpt2rlhf.stages.common import make_optimizer

    model, optimizer = tiny_trained()
    save_optimizer_shards(model, optimizer, tmp_path / "optimizer")
    for f in (tmp_path / "optimizer").glob("*.distcp"):
        f.unlink()
    fresh = make_optimizer(model, OptimArgs(), torch.device("cpu"))
    try:
        load_optimizer(model, fresh, folder=tmp_path / "optimizer")
    except CheckpointError:
        return
    except BaseException as e:  # noqa: B036 - the point of the test
        pytest.fail(f"{type(e).__name__} (a {type(e).__mro__[1].__name__}), not CheckpointError")
    pytest.fail("a missing shard loaded without an error")


def test_a_damaged_optimizer_shard_falls_back_and_staging_leftovers_are_cleaned(tmp_path):
    """Guard (passes): a sharded checkpoint's optimizer files are digested, so a damaged
    shard sets the newest checkpoint aside and the previous one is used; a killed save's
    .step_X.shards-PID staging folder is removed."""
    from gpt2rlhf.distributed import save_optimizer_shards
    from gpt2rlhf.runs import checkpoints_of
    from gpt2rlhf.stages import common as sc

    model, optimizer = tiny_trained()
    run_dir = tmp_path / "run"
    folder = checkpoints_of(run_dir)
    for step in (1, 2):
        staging = folder / f".step_{step:08d}.shards-123"
        save_optimizer_shards(model, optimizer, staging / "optimizer")
        save_checkpoint(step_dir(folder, step), {"model": model}, {"step": step}, {"step": step},
                        folders={"optimizer": staging / "optimizer"})
    leftover = folder / ".step_00000003.shards-456" / "optimizer"
    save_optimizer_shards(model, optimizer, leftover)
    shard = next((step_dir(folder, 2) / "optimizer").glob("*.distcp"))
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    cfg = load_config(SFTConfig, overrides=["--model.n_layer", "1"])
    run = sc.Run(run_dir, "sft", cfg, torch.device("cpu"), torch.float32)
    ckpt, state = sc.resumable_checkpoint(run)
    assert ckpt == step_dir(folder, 1) and state["step"] == 1
    assert sorted(p.name for p in folder.iterdir()) == ["step_00000001", "step_00000002.damaged"]
