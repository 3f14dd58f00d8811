"""Review of the torchrun data parallelism (issue 16, part 1): the cases the first tests
leave out. Each test says the behaviour it expects; on CPU with gloo, tiny models, 1-4 steps.

Some tests start the stage through a small harness (HARNESS) that changes one thing on one
rank (a save that fails, a save that never returns) or looks inside (the RNG state at the
first dropout, whether the process group is still open after train())."""

import io
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import write_reviews
from test_distributed import SRC, common, launch, only_run

from gpt2rlhf.checkpoint import latest_checkpoint, load_model
from gpt2rlhf.config import ConfigError, SFTConfig, TrainArgs
from gpt2rlhf.distributed import World

HARNESS = '''
import hashlib, os, sys, time
sys.path.insert(0, {src!r})
import torch
mode, rank = os.environ["REVIEW_MODE"], int(os.environ.get("RANK", "0"))
import gpt2rlhf.stages.common as common
from gpt2rlhf.checkpoint import CheckpointError
if mode == "save_fails_on_rank0" and rank == 0:
    def failing_save(path, *args, **kwargs):
        raise CheckpointError(f"{{path}}: could not write this checkpoint (simulated: the disk is full)")
    common.save_checkpoint = failing_save
if mode == "save_stalls_on_rank0" and rank == 0:
    def stalling_save(*args, **kwargs):
        time.sleep(3600)
    common.save_checkpoint = stalling_save
if mode == "dropout_rng":
    original, seen = torch.nn.Dropout.forward, []
    def forward(self, x):
        if self.training and self.p > 0 and not seen:
            seen.append(1)
            state = hashlib.sha256(torch.get_rng_state().numpy().tobytes()).hexdigest()
            print(f"RNG rank{{rank}} {{state}}", flush=True)
        return original(self, x)
    torch.nn.Dropout.forward = forward
from gpt2rlhf.stages import sft
if mode == "direct_train":
    import torch.distributed as dist
    from gpt2rlhf.config import SFTConfig, load_config, parse_cli
    yaml_path, overrides, _ = parse_cli(SFTConfig, sys.argv[1:])
    sft.train(load_config(SFTConfig, yaml_path, overrides))
    print(f"GROUP rank{{rank}} initialized={{dist.is_initialized()}}", flush=True)
else:
    sft.main(sys.argv[1:])
'''


def launch_harness(tmp_path: Path, mode: str, args: list[str], nproc: int = 2,
                   timeout: float = 180) -> subprocess.CompletedProcess:
    script = tmp_path / "harness.py"
    script.write_text(HARNESS.format(src=str(SRC)))
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
                           str(nproc), str(script), *args], cwd=SRC, capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, "OMP_NUM_THREADS": "1", "REVIEW_MODE": mode})


def error_lines(stderr: str) -> int:
    """The "error: ..." messages in a torchrun's stderr, counted even when two ranks' lines
    were glued together."""
    return len(re.findall(r"(?<![A-Za-z_])error: ", stderr))


def worker_tracebacks(stderr: str) -> list[str]:
    """Uncaught exceptions in the workers (torch prefixes their lines with [rankN]:)."""
    return re.findall(r"\[rank\d+\]: \w*(?:Error|Exception)\b[^\n]*", stderr)


@pytest.fixture(scope="module")
def reviews(tmp_path_factory):
    return write_reviews(tmp_path_factory.mktemp("data") / "reviews.jsonl", n=64)


@pytest.fixture(scope="module")
def split_run(tmp_path_factory, reviews):
    """A 2-process SFT run of 2 steps with both checkpoints kept (copy it before resuming)."""
    out = tmp_path_factory.mktemp("split")
    done = launch("sft", common(reviews, out, "--train.max_steps", "2", "--train.save_every", "1",
                                "--train.keep_checkpoints", "0"), nproc=2)
    assert done.returncode == 0, done.stderr[-3000:]
    return only_run(out)


def copy_run(run: Path, tmp_path: Path) -> Path:
    target = tmp_path / "runs" / run.name
    shutil.copytree(run, target)
    return target


# ------------------------------------------------------------------ resume on several processes

def test_a_damaged_latest_checkpoint_falls_back_on_every_rank(tmp_path, reviews, split_run):
    """Resume on 2 processes with the latest checkpoint damaged: rank 0 sets it aside, every
    rank continues from the one before (open_run's barrier order), and the result is the
    uninterrupted 1-process run's. (Coverage of the resume barrier; expected to pass.)"""
    run = copy_run(split_run, tmp_path)
    (run / "checkpoints" / "step_00000002" / "model.safetensors").write_bytes(b"damaged")
    resumed = launch("sft", ["--resume", str(run), "--train.max_steps", "3"], nproc=2)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert resumed.stdout.count("resuming run folder") == 1, resumed.stdout  # announced by rank 0 alone
    assert (run / "checkpoints" / "step_00000002.damaged").is_dir()
    assert latest_checkpoint(run / "checkpoints").name == "step_00000003"
    whole = launch("sft", common(reviews, tmp_path / "whole", "--train.max_steps", "3"))
    assert whole.returncode == 0, whole.stderr[-3000:]
    a = load_model(latest_checkpoint(only_run(tmp_path / "whole") / "checkpoints"), "model").state_dict()
    b = load_model(latest_checkpoint(run / "checkpoints"), "model").state_dict()
    assert max(float((a[k] - b[k]).abs().max()) for k in a) <= 1e-5


def test_no_intact_checkpoint_is_an_error_on_every_rank(tmp_path, split_run):
    """open_run: rank 0 alone checks the checkpoints while the others wait at a barrier; when
    none is intact rank 0 raises CheckpointError before its barrier, and rank 1 dies inside
    dist.barrier() with gloo's "Connection closed by peer" traceback (or is SIGTERMed by
    torchrun). Expected: rank 0's outcome is shared (e.g. broadcast), so every rank prints
    the same "error: ... no intact checkpoint" line and no rank has a traceback."""
    run = copy_run(split_run, tmp_path)
    for step in ("step_00000001", "step_00000002"):
        (run / "checkpoints" / step / "model.safetensors").write_bytes(b"damaged")
    done = launch("sft", ["--resume", str(run), "--train.dist_timeout", "30"], nproc=2, timeout=180)
    assert done.returncode != 0
    # the same line on every rank still running (torchrun stops the rest once one has exited)
    assert done.stderr.count("no intact checkpoint to resume from") >= 1, done.stderr[-3000:]
    assert not worker_tracebacks(done.stderr), worker_tracebacks(done.stderr)


# ------------------------------------------------------------------ a rank that fails

def test_a_save_that_fails_on_rank0_is_an_error_on_every_rank(tmp_path, reviews):
    """save(): rank 0 writes while the others wait at the barrier after it; a CheckpointError
    on rank 0 (a full disk) skips rank 0's barrier, and rank 1 dies in dist.barrier() with
    gloo's "Connection closed by peer" traceback or is SIGTERMed. Expected: the failure is
    shared, every rank prints an "error:" line naming the checkpoint, no worker traceback."""
    done = launch_harness(tmp_path, "save_fails_on_rank0",
                          common(reviews, tmp_path / "runs", "--train.max_steps", "1", "--train.dist_timeout", "30"))
    assert done.returncode != 0
    assert done.stderr.count("could not write this checkpoint") >= 1, done.stderr[-3000:]
    assert not worker_tracebacks(done.stderr), worker_tracebacks(done.stderr)


def test_a_rank_that_stops_responding_ends_the_others_with_a_clear_error(tmp_path, reviews):
    """A rank that hangs (here rank 0 inside save) must not hang the run: the process group's
    timeout (train.dist_timeout) ends rank 1 (this already holds, after ~5 s), but with a raw
    gloo RuntimeError traceback ("Timed out waiting 5000ms for recv operation"). Expected: a
    clear "error:" line that names train.dist_timeout (cli turning torch.distributed's
    DistError/timeout into a user error), and no worker traceback."""
    done = launch_harness(tmp_path, "save_stalls_on_rank0",
                          common(reviews, tmp_path / "runs", "--train.max_steps", "1", "--train.dist_timeout", "5"),
                          timeout=150)
    assert done.returncode != 0
    assert "error:" in done.stderr and "dist_timeout" in done.stderr, done.stderr[-3000:]
    assert not worker_tracebacks(done.stderr), worker_tracebacks(done.stderr)


def test_cli_writes_each_error_line_in_one_write(monkeypatch):
    """Under torchrun every rank's stderr is the same pipe, and print(msg, file=sys.stderr)
    writes the message and its newline separately (with PYTHONUNBUFFERED, as in this
    environment, each goes straight to the pipe): two ranks' errors come out glued as
    "error: A...error: A...\\n\\n". This makes test_distributed.py's
    test_a_batch_that_does_not_divide_is_an_error_on_every_rank flaky (it failed 2 times in
    6 runs here). Expected: the whole line, newline included, in one write."""
    from gpt2rlhf.stages.common import cli

    writes = []

    class Recorder(io.StringIO):
        def write(self, s):
            writes.append(s)
            return super().write(s)

    monkeypatch.setattr(sys, "stderr", Recorder())

    def train(cfg, resume=None):
        raise ConfigError("something the user can fix")

    with pytest.raises(SystemExit):
        cli(SFTConfig, "sft", train, ["--train.device", "cpu"], "")
    assert "error: something the user can fix\n" in writes, writes


# ------------------------------------------------------------------ randomness across ranks

def test_ranks_draw_different_dropout_masks(tmp_path, reviews):
    """Every rank seeds torch with the same train.seed (build_model) and, on resume, sets the
    same saved RNG state, so with dropout > 0 rank 1 starts its first micro-batch from rank
    0's RNG state: the same dropout masks wherever the shapes agree (always, with equal-length
    rows). nanoGPT offsets the seed by the rank for this reason. Expected: the ranks' RNG
    states differ at their first training dropout."""
    done = launch_harness(tmp_path, "dropout_rng",
                          common(reviews, tmp_path / "runs", "--train.max_steps", "1", "--model.dropout", "0.1"))
    assert done.returncode == 0, done.stderr[-3000:]
    states = dict(re.findall(r"RNG (rank\d) (\w+)", done.stdout))
    assert set(states) == {"rank0", "rank1"}, done.stdout
    assert states["rank0"] != states["rank1"]


# ------------------------------------------------------------------ the process group's lifetime

def test_train_called_directly_leaves_no_process_group(tmp_path, reviews):
    """distributed.init() runs in open_run(), but only cli() closes the group: a stage's
    train() called directly under torchrun (a script, a notebook, several stages in one
    process) returns with the process group still open (and a later open_run() silently
    reuses it, ignoring its train.dist_timeout). Expected: train() leaves the group as it
    found it (closed)."""
    done = launch_harness(tmp_path, "direct_train", common(reviews, tmp_path / "runs", "--train.max_steps", "1"))
    assert done.returncode == 0, done.stderr[-3000:]
    assert sorted(re.findall(r"GROUP rank\d initialized=(\w+)", done.stdout)) == ["False", "False"], done.stdout


# ------------------------------------------------------------------ launch and device checks

def test_an_explicit_cuda_index_is_not_shared_by_every_rank(monkeypatch):
    """pick_device maps "cuda" to cuda:LOCAL_RANK but keeps "cuda:0" as is, so under
    torchrun every rank takes GPU 0 and NCCL fails later ("Duplicate GPU detected").
    Expected: a ConfigError now, or this rank's own GPU."""
    from gpt2rlhf.stages.common import pick_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    try:
        device = pick_device("cuda:0", World(rank=1, size=2, local_rank=1))
    except ConfigError:
        return
    assert device != torch.device("cuda", 0)


def test_more_processes_than_gpus_is_a_clear_error(monkeypatch):
    """--nproc_per_node 2 on a 1-GPU machine: pick_device returns cuda:1, and
    torch.cuda.set_device fails in distributed.init with CUDA's "invalid device ordinal".
    Expected: a ConfigError naming the GPUs and the processes."""
    from gpt2rlhf.stages.common import pick_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(ConfigError, match="GPU"):
        pick_device("auto", World(rank=1, size=2, local_rank=1))


def test_world_size_without_a_rendezvous_is_a_clear_error(tmp_path, reviews):
    """WORLD_SIZE set without torchrun's rendezvous (no MASTER_ADDR/MASTER_PORT, e.g. a stray
    environment variable): init_process_group raises ValueError with a traceback. Expected:
    one "error:" line (exit status 2) that says to start the stage with torchrun."""
    env = {k: v for k, v in os.environ.items() if k not in ("MASTER_ADDR", "MASTER_PORT")}
    env.update({"WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "0", "OMP_NUM_THREADS": "1"})
    done = subprocess.run([sys.executable, "training/train_sft.py",
                           *common(reviews, tmp_path / "runs", "--train.max_steps", "1")],
                          cwd=SRC, capture_output=True, text=True, timeout=120, env=env)
    assert done.returncode == 2, done.stderr[-3000:]
    assert done.stderr.startswith("error:") or "\nerror:" in done.stderr, done.stderr[-3000:]
    assert "Traceback" not in done.stderr, done.stderr[-3000:]


def test_dist_timeout_must_be_positive():
    """train.dist_timeout 0 (or negative) makes every collective fail at once; like the
    other train.* values it should be refused by TrainArgs."""
    with pytest.raises(ConfigError, match="dist_timeout"):
        TrainArgs(dist_timeout=0)


def test_a_torch_build_without_distributed_still_runs_one_process(monkeypatch):
    """cli() now ends every run, torchrun or not, with distributed.close(), which calls
    dist.is_initialized(); a torch built without distributed support (USE_DISTRIBUTED=0:
    dist.is_available() is False and is_initialized is not defined) then fails every plain
    1-process run with AttributeError. Expected: the 1-process path never touches
    torch.distributed (close() checks dist.is_available() first)."""
    import torch.distributed as dist

    from gpt2rlhf.stages.common import cli

    monkeypatch.setattr(dist, "is_available", lambda: False)
    monkeypatch.delattr(dist, "is_initialized")
    assert cli(SFTConfig, "sft", lambda cfg, resume=None: "trained", ["--train.device", "cpu"], "") == "trained"
