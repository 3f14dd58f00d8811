"""Data parallelism under torchrun, on CPU with gloo: SFT and the reward model in 2
processes follow the 1-process loss curve with the same global batch, a 2-process
checkpoint resumes in 1 process, and bad launches end with a clear error on every rank."""

import re
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import TINY_ARGS, write_reviews

from gpt2rlhf.checkpoint import latest_checkpoint, load_model

SRC = Path(__file__).resolve().parents[1] / "src"
STAGES = {"sft": "training/train_sft.py", "rm": "training/train_rm.py", "ppo": "training/train_ppo.py"}


def launch(stage: str, args: list[str], nproc: int = 1, timeout: float = 300) -> subprocess.CompletedProcess:
    """The stage as a user starts it: plain python, or torchrun with `nproc` processes."""
    head = [sys.executable] if nproc == 1 else [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                                "--nproc_per_node", str(nproc)]
    return subprocess.run([*head, STAGES[stage], *args], cwd=SRC, capture_output=True, text=True, timeout=timeout,
                          env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})


def worker_traceback(stderr: str) -> bool:
    """Whether a worker died with a Python traceback through the project's code (torchrun's
    own summary of a failed child, which follows any error, does not count)."""
    return re.search(r'File "[^"]*(gpt2rlhf|training)/', stderr) is not None


def scalars(run_dir: Path, tag: str) -> list[float]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir))
    acc.Reload()
    return [e.value for e in acc.Scalars(tag)]


@pytest.fixture(scope="module")
def reviews(tmp_path_factory):
    return write_reviews(tmp_path_factory.mktemp("data") / "reviews.jsonl", n=64)


def common(reviews, out: Path, *extra) -> list[str]:
    # fp32 on CPU, no dropout; 1 process takes micro-batches of 2, so each of 2 processes
    # holds exactly one of its micro-batches: the same sums in the same groups
    return [*TINY_ARGS, "--data.train", reviews, "--run.out_dir", str(out), "--train.device", "cpu",
            "--train.dtype", "fp32", "--model.dropout", "0", "--train.micro_batch_size", "2", *extra]


def only_run(out: Path) -> Path:
    (run,) = [p for p in out.iterdir() if p.is_dir()]
    return run


@pytest.mark.parametrize("stage", ["sft", "rm"])
def test_two_processes_follow_the_one_process_loss_curve(tmp_path, reviews, stage):
    runs = {}
    for nproc in (1, 2):
        out = tmp_path / f"np{nproc}"
        done = launch(stage, common(reviews, out, "--train.max_steps", "5"), nproc)
        assert done.returncode == 0, done.stderr[-3000:]
        runs[nproc] = only_run(out)
    one, two = (scalars(runs[n], "loss/train") for n in (1, 2))
    assert len(one) == len(two) == 5
    assert max(abs(a - b) for a, b in zip(one, two)) <= 1e-5, (one, two)
    a = load_model(latest_checkpoint(runs[1] / "checkpoints"), "model").state_dict()
    b = load_model(latest_checkpoint(runs[2] / "checkpoints"), "model").state_dict()
    assert max(float((a[k] - b[k]).abs().max()) for k in a) <= 1e-5
    # rank 0 alone wrote the folder: one run, one event file, one log
    assert len(list(runs[2].glob("events.out.tfevents.*"))) == 1
    assert (runs[2] / "log.txt").read_text().count("run folder:") == 1


def test_a_two_process_checkpoint_resumes_in_one_process(tmp_path, reviews):
    whole = launch("sft", common(reviews, tmp_path / "whole", "--train.max_steps", "4"))
    assert whole.returncode == 0, whole.stderr[-3000:]
    first = launch("sft", common(reviews, tmp_path / "split", "--train.max_steps", "2"), nproc=2)
    assert first.returncode == 0, first.stderr[-3000:]
    run = only_run(tmp_path / "split")
    resumed = launch("sft", ["--resume", str(run), "--train.max_steps", "4"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert latest_checkpoint(run / "checkpoints").name == "step_00000004"
    a = load_model(latest_checkpoint(only_run(tmp_path / "whole") / "checkpoints"), "model").state_dict()
    b = load_model(latest_checkpoint(run / "checkpoints"), "model").state_dict()
    assert max(float((a[k] - b[k]).abs().max()) for k in a) <= 1e-5
    losses = scalars(run, "loss/train")
    assert len(losses) == 4


def test_a_batch_that_does_not_divide_is_a_clear_error(tmp_path, reviews):
    done = launch("sft", common(reviews, tmp_path / "runs", "-b", "3", "--train.micro_batch_size", "1",
                                "--train.max_steps", "2"), nproc=2, timeout=120)
    assert done.returncode != 0
    # each rank finds it; torchrun stops the others once the first has exited, so one or two print it
    assert done.stderr.count("must be divisible by the number of processes (2)") >= 1, done.stderr[-3000:]
    assert not worker_traceback(done.stderr), done.stderr[-3000:]


def test_cuda_on_a_machine_without_it_is_a_clear_error(tmp_path, reviews):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    done = launch("rm", common(reviews, tmp_path / "runs", "--train.device", "cuda", "--train.max_steps", "1"),
                  nproc=2, timeout=120)
    assert done.returncode != 0 and done.stderr.count("no CUDA GPU is available") >= 1, done.stderr[-3000:]
    assert not worker_traceback(done.stderr), done.stderr[-3000:]
