"""The README's main job, scripts/pipeline.sh, as a smoke run: a tiny model, a few steps per
stage, on small IMDB-shaped files; every stage's output must exist and load."""

import gzip
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import write_reviews

from gpt2rlhf.checkpoint import latest_checkpoint
from gpt2rlhf.loading import load
from gpt2rlhf.model import GPT, GPTScalar

ROOT = Path(__file__).resolve().parents[1]


COMMAND = ["bash", str(ROOT / "scripts" / "pipeline.sh"), "smoke", "--train.max_steps", "2", "-b", "4",
           "--train.device", "cpu"]
STAGE_ARGS = {
    "SFT_ARGS": "--model.n_layer 1 --model.n_head 2 --model.n_embd 32 --model.block_size 64 --data.max_length 48 "
                "--data.max_eval_examples 8",
    "RM_ARGS": "--data.max_eval_examples 8",
    "DPO_ARGS": "--data.max_eval_examples 8",
    "GRPO_ARGS": "--grpo.mini_batch_size 4 --grpo.normalization_samples 4 --grpo.max_new_tokens 6 "
                 "--grpo.min_new_tokens 2 --prompts.max_tokens 4 --data.eval_size 4",
    "PPO_ARGS": "--ppo.mini_batch_size 2 --ppo.normalization_samples 4 --ppo.max_new_tokens 6 --ppo.min_new_tokens 2 "
                "--prompts.max_tokens 4 --data.eval_size 4 --train.save_every 1",
    "EVAL_ARGS": "--num-prompts 6 --batch-size 6 --max-new-tokens 6 --min-new-tokens 2 --samples 2"}


def run_pipeline(tmp_path: Path, **env) -> subprocess.CompletedProcess:
    data = tmp_path / "imdb"
    if not data.exists():
        data.mkdir()
        for split, seed in (("train", 0), ("test", 1)):
            text = Path(write_reviews(tmp_path / f"{split}.jsonl", n=40, seed=seed)).read_bytes()
            (data / f"imdb_{split}.jsonl.gz").write_bytes(gzip.compress(text))
    env = {**os.environ, "IMDB_DIR": str(data), "OUT_DIR": str(tmp_path / "runs"), "OPENAI_API_KEY": "",
           **STAGE_ARGS, **env}
    res = subprocess.run(COMMAND, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    return res


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_pipeline_smoke(tmp_path):
    run_pipeline(tmp_path)
    runs = tmp_path / "runs"
    folders = {stage: sorted(runs.glob(f"{stage}_smoke_*")) for stage in ("sft", "rm", "ppo", "eval")}
    assert all(len(f) == 1 for f in folders.values()), folders
    sft, rm, ppo, ev = (folders[s][0] for s in ("sft", "rm", "ppo", "eval"))
    for run in (sft, rm, ppo):
        assert latest_checkpoint(run / "checkpoints") is not None and list(run.glob("events.out.tfevents.*")), run
    assert isinstance(load(str(sft), kind="lm"), GPT)
    assert isinstance(load(str(rm), kind="scalar"), GPTScalar)
    assert isinstance(load(str(ppo), kind="lm"), GPT)  # a PPO run gives its actor

    summary = json.loads((ev / "summary.json").read_text())
    for name in ("ppo", "sft"):
        assert {"positive_share", "rm_score", "kl_to_reference", "reference_perplexity", "distinct_2"} <= \
            set(summary["metrics"][name])
    assert summary["metrics"]["sft"]["kl_to_reference"] == pytest.approx(0.0, abs=1e-5)
    assert summary["sentiment_judge"]["fitted_on"] == 40
    assert "## Samples" in (ev / "report.md").read_text()
    assert (ev / "curves.png").stat().st_size > 1000
    times = (ev / "times.txt").read_text().splitlines()
    assert [t.split()[0] for t in times] == ["sft", "rm", "ppo", "evaluate", "total"]
    assert (ev / "runs.txt").read_text().split() == ["sft", str(sft), "rm", str(rm), "ppo", str(ppo)]

    # the curve script names a missing tag and lists what the run has
    res = subprocess.run([sys.executable, str(ROOT / "scripts" / "plot_curves.py"), str(ppo), "--tags", "objective/nope"],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode != 0 and "no scalar objective/nope" in res.stderr and "objective/kl" in res.stderr

    # ALGO=dpo: DPO in place of PPO, from the same SFT (RESUME=1: the finished SFT and RM return at once)
    run_pipeline(tmp_path, ALGO="dpo", RESUME="1")
    (dpo,) = runs.glob("dpo_smoke_*")
    assert isinstance(load(str(dpo), kind="lm"), GPT)
    ev = max(runs.glob("eval_smoke_*"))
    summary = json.loads((ev / "summary.json").read_text())
    assert {"rm_score", "kl_to_reference", "positive_share"} <= set(summary["metrics"]["dpo"])
    assert (ev / "runs.txt").read_text().split() == ["sft", str(sft), "rm", str(rm), "dpo", str(dpo)]
    assert [t.split()[0] for t in (ev / "times.txt").read_text().splitlines()] == \
        ["sft", "rm", "dpo", "evaluate", "total"]
    assert (ev / "curves.png").stat().st_size > 1000

    # ALGO=rloo: the critic-free trainer (its leave-one-out form) in place of PPO, from the same SFT and RM
    run_pipeline(tmp_path, ALGO="rloo", RESUME="1")
    (grpo,) = runs.glob("grpo_smoke_*")
    ev = max(runs.glob("eval_smoke_*"))
    assert "rloo" in json.loads((ev / "summary.json").read_text())["metrics"]
    assert (ev / "runs.txt").read_text().split() == ["sft", str(sft), "rm", str(rm), "rloo", str(grpo)]


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_pipeline_resumes(tmp_path):
    """RESUME=1 after a pipeline was killed during PPO: SFT and RM are not trained again,
    PPO continues its run from the last checkpoint, a new evaluation is written."""
    run_pipeline(tmp_path)
    runs = tmp_path / "runs"
    sft, rm, ppo = (next(runs.glob(f"{s}_smoke_*")) for s in ("sft", "rm", "ppo"))
    weights = {run: (latest_checkpoint(run / "checkpoints") / "model.safetensors").stat().st_mtime_ns
               for run in (sft, rm)}
    shutil.rmtree(ppo / "checkpoints" / "step_00000002")  # killed after PPO's first iteration
    run_pipeline(tmp_path, RESUME="1")
    assert sorted(runs.glob("*_smoke_*")) == sorted([sft, rm, ppo, *runs.glob("eval_smoke_*")])
    assert len(list(runs.glob("eval_smoke_*"))) == 2
    for run, mtime in weights.items():  # untouched: those stages had finished
        assert (latest_checkpoint(run / "checkpoints") / "model.safetensors").stat().st_mtime_ns == mtime
    assert latest_checkpoint(ppo / "checkpoints").name == "step_00000002"
    assert "at step 1 (" in (ppo / "log.txt").read_text()  # resumed after its first iteration
