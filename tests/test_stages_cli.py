"""The stage entry points as a user runs them: subprocesses from src/, their run folders,
TensorBoard files read back by TensorBoard, and exact resume after SIGKILL."""

import subprocess
import sys
from pathlib import Path

import pytest
from conftest import TINY_ARGS, kill_after_checkpoint, write_reviews

from gpt2rlhf.checkpoint import latest_checkpoint, load_model, load_trainer_state, read_meta

SRC = Path(__file__).resolve().parents[1] / "src"


def stage(script, *args, timeout=300):
    return subprocess.run([sys.executable, f"training/{script}", *args], cwd=SRC, capture_output=True,
                          text=True, timeout=timeout)


def only_run(out: Path, prefix: str) -> Path:
    (run,) = sorted(out.glob(f"{prefix}*_*"))
    return run


def scalars(run_dir: Path) -> dict:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir))
    acc.Reload()
    return {tag: [e.value for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


@pytest.fixture(scope="module")
def reviews(tmp_path_factory):
    return write_reviews(tmp_path_factory.mktemp("data") / "reviews.jsonl", n=64)


def test_train_sft_then_train_rm_from_src(tmp_path, reviews):
    out = tmp_path / "runs"
    common = [*TINY_ARGS, "--data.train", reviews, "--run.out_dir", str(out), "-n", "cli",
              "--train.max_steps", "4", "--train.eval_every", "2", "--train.save_every", "2"]
    res = stage("train_sft.py", *common)
    assert res.returncode == 0, res.stderr[-2000:]
    sft_run = only_run(out, "sft_cli")
    assert (sft_run / "config.yaml").read_text().count("exp_name: cli") == 1
    ckpt = latest_checkpoint(sft_run / "checkpoints")
    assert ckpt.name == "step_00000004" and read_meta(ckpt)["config"]["train"]["max_steps"] == 4
    assert load_model(ckpt, kind="lm").config.n_embd == 32
    tags = scalars(sft_run)
    for tag in ("loss/train", "loss/eval", "val/perplexity", "optim/lr", "optim/grad_norm", "time/tokens_per_sec"):
        assert tag in tags, tag
    assert len(tags["loss/train"]) == 4 and len(tags["loss/eval"]) == 2

    res = stage("train_rm.py", *common, "-p", str(sft_run))
    assert res.returncode == 0, res.stderr[-2000:]
    rm_run = only_run(out, "rm_cli")
    assert load_model(latest_checkpoint(rm_run / "checkpoints"), kind="scalar")
    tags = scalars(rm_run)
    for tag in ("loss/train", "objective/accuracy", "objective/margin", "objective/reward_mean",
                "objective/reward_std", "val/accuracy", "loss/eval"):
        assert tag in tags, tag


def test_bad_input_ends_in_one_clear_line(tmp_path, reviews):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine", "label": 1}\n{"text": oops}\n')
    res = stage("train_sft.py", *TINY_ARGS, "--data.train", str(bad), "--run.out_dir", str(tmp_path))
    assert res.returncode == 2 and "bad.jsonl:2: malformed JSON" in res.stderr and "Traceback" not in res.stderr
    res = stage("train_rm.py", *TINY_ARGS, "--data.train", reviews, "--optim.lrr", "1")
    assert res.returncode == 2 and "did you mean 'optim.lr'" in res.stderr


def weights(path):
    return load_model(path).state_dict()


@pytest.mark.parametrize("script", ["train_sft.py", "train_rm.py"])
def test_sigkill_then_resume_ends_with_the_same_weights(tmp_path, reviews, script):
    steps = 40
    args = [*TINY_ARGS, "--data.train", reviews, "--model.dropout", "0.1", "--train.max_steps", str(steps),
            "--train.save_every", "4", "--train.eval_every", "0", "--train.keep_checkpoints", "0"]
    whole = stage(script, *args, "--run.out_dir", str(tmp_path / "whole"))
    assert whole.returncode == 0, whole.stderr[-2000:]
    reference = weights(latest_checkpoint(only_run(tmp_path / "whole", "").joinpath("checkpoints")))

    out = tmp_path / "killed"
    run_dir = kill_after_checkpoint([sys.executable, f"training/{script}", *args, "--run.out_dir", str(out)], SRC, out, 8)
    killed_at = load_trainer_state(latest_checkpoint(run_dir / "checkpoints"))["step"]
    assert 8 <= killed_at < steps, "the kill should land in the middle of the run"

    resumed = stage(script, "--resume", str(run_dir))
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resumed from" in resumed.stdout + resumed.stderr
    final = latest_checkpoint(run_dir / "checkpoints")
    assert final.name == f"step_{steps:08d}"
    diff = max((reference[k] - v).abs().max().item() for k, v in weights(final).items())
    assert diff <= 1e-6
