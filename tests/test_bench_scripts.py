"""The issue-14 benchmark scripts run (they time nothing here): bench_gpu.py's CPU smoke
mode, and bench_ppo_vs_trl.py's own side on a tiny model (TRL is not installed in the test
environment; its side runs only in .venv-trl). The shared reward counts review words."""

import json
import subprocess
import sys
from pathlib import Path

import torch
from conftest import write_reviews

from gpt2rlhf.checkpoint import save_checkpoint
from gpt2rlhf.model import GPT, GPTConfig

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"
sys.path.insert(0, str(SCRIPTS))


def test_the_shared_reward_counts_positive_minus_negative_words():
    from ppo_bench_task import reward

    assert reward(["A great, GREAT film; boring though.", "", "no sentiment here"]) == [1.0, 0.0, 0.0]


def test_bench_gpu_smoke_runs_every_part_on_cpu(tmp_path):
    out = tmp_path / "gpu.json"
    res = subprocess.run([sys.executable, str(SCRIPTS / "bench_gpu.py"), "--smoke", "--json", str(out)],
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    rows = json.loads(out.read_text())["rows"]
    assert {r["part"] for r in rows} == {"sft", "decode", "ppo", "ppo-xl"}
    assert all(r["tokens_per_s"] > 0 for r in rows if r["part"] in ("sft", "decode") and "error" not in r)


def test_bench_ppo_vs_trl_runs_our_side(tmp_path):
    torch.manual_seed(0)
    sft = save_checkpoint(tmp_path / "sft" / "step_00000001",
                          {"model": GPT(GPTConfig(block_size=64, vocab_size=50257, n_layer=1, n_head=2, n_embd=16))})
    data = write_reviews(tmp_path / "reviews.jsonl", n=64)
    out = tmp_path / "result.json"
    res = subprocess.run([sys.executable, str(SCRIPTS / "bench_ppo_vs_trl.py"), "--sft", str(sft), "--data", data,
                          "--only", "ours", "--iterations", "3", "--seeds", "0", "--prompt-records", "64",
                          "--work", str(tmp_path / "work"), "--json", str(out)],
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    result = json.loads(out.read_text())
    ours = result["results"]["ours"][0]
    assert len(ours["iterations"]) == 3 and result["summary"]["ours"]["iteration"] > 0
    task = json.loads((tmp_path / "work" / "task_0.json").read_text())
    assert (Path(task["hf_dir"]) / "vocab.json").exists() and (Path(task["hf_dir"]) / "merges.txt").exists()
    assert all(2 <= len(p) <= 8 for batch in task["batches"] for p in batch)
