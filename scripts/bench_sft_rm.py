"""Benchmark: the IMDB SFT and reward-model stages on the real data, through their entry points.

Usage (needs ../shared/data/imdb, or pass --data-dir):
    python scripts/bench_sft_rm.py                 # configs/imdb/sft.yaml then configs/imdb/rm.yaml
    python scripts/bench_sft_rm.py --sft-steps 300 --rm-steps 300 --json out.json

It runs `python training/train_sft.py` and `python training/train_rm.py` from src/ as a user
would, then reports, from their run folders: the SFT model's eval loss against the unigram
baseline (cross-entropy of the eval tokens under the training set's token frequencies,
add-one smoothed), the reward model's pairwise accuracy on held-out test pairs, and the
wall time of each stage.
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from gpt2rlhf.config import SFTConfig, load_config  # noqa: E402
from gpt2rlhf.data import sft_examples, train_eval_records  # noqa: E402
from gpt2rlhf.tokenizer import get_tokenizer  # noqa: E402


def run_stage(script: str, args: list[str]) -> tuple[Path, float]:
    before = set((ROOT / "runs").glob("*"))
    t0 = time.perf_counter()
    res = subprocess.run([sys.executable, f"training/{script}", *args], cwd=ROOT / "src")
    seconds = time.perf_counter() - t0
    if res.returncode:
        sys.exit(f"{script} failed with exit status {res.returncode}")
    (run_dir,) = set((ROOT / "runs").glob("*")) - before
    return run_dir, seconds


def last_scalar(run_dir: Path, tag: str) -> float:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir))
    acc.Reload()
    return acc.Scalars(tag)[-1].value


def unigram_baseline(cfg) -> float:
    """Nats per eval target token under add-one smoothed training unigram frequencies."""
    enc = get_tokenizer()
    train_records, eval_records = train_eval_records(cfg.data, cfg.train.seed)
    train_ex, _ = sft_examples(train_records, cfg.data, enc, "data.train")
    eval_ex, _ = sft_examples(eval_records, cfg.data, enc, "data.eval")
    counts = Counter(t for e in train_ex for t in e["input_ids"])
    total, vocab = sum(counts.values()), enc.n_vocab
    nll, n = 0.0, 0
    for e in eval_ex:
        for t, m in zip(e["input_ids"][1:], e["loss_mask"][1:]):
            if m:
                nll -= math.log((counts[t] + 1) / (total + vocab))
                n += 1
    return nll / n


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", default="../shared/data/imdb", help="folder with imdb_train/test.jsonl.gz")
    p.add_argument("--sft-steps", type=int, default=None, help="default: the preset's")
    p.add_argument("--rm-steps", type=int, default=None, help="default: the preset's")
    p.add_argument("--json", help="also write the results here")
    args = p.parse_args()
    data = Path(args.data_dir)
    data = data if data.is_absolute() else (ROOT / data).resolve()
    if not (data / "imdb_train.jsonl.gz").is_file():
        sys.exit(f"no IMDB data at {data}: pass --data-dir")
    files = ["--data.train", str(data / "imdb_train.jsonl.gz"), "--data.eval", str(data / "imdb_test.jsonl.gz")]
    sft_args = ["--config", "../configs/imdb/sft.yaml", "-n", "bench", *files]
    if args.sft_steps:
        sft_args += ["--train.max_steps", str(args.sft_steps)]
    sft_dir, sft_s = run_stage("train_sft.py", sft_args)
    rm_args = ["--config", "../configs/imdb/rm.yaml", "-n", "bench", "-p", str(sft_dir), *files]
    if args.rm_steps:
        rm_args += ["--train.max_steps", str(args.rm_steps)]
    rm_dir, rm_s = run_stage("train_rm.py", rm_args)

    baseline = unigram_baseline(load_config(SFTConfig, str(sft_dir / "config.yaml")))
    res = {"sft_eval_loss": last_scalar(sft_dir, "loss/eval"), "unigram_baseline": baseline,
           "rm_eval_accuracy": last_scalar(rm_dir, "val/accuracy"), "sft_seconds": sft_s, "rm_seconds": rm_s,
           "sft_run": str(sft_dir.relative_to(ROOT)), "rm_run": str(rm_dir.relative_to(ROOT))}
    print(f"SFT: eval loss {res['sft_eval_loss']:.3f} nats/token (perplexity {math.exp(res['sft_eval_loss']):.0f}) vs "
          f"unigram baseline {baseline:.3f} (perplexity {math.exp(baseline):.0f}); {sft_s / 60:.1f} min")
    print(f"RM: held-out pairwise accuracy {res['rm_eval_accuracy']:.1%} (target >= 85%); {rm_s / 60:.1f} min")
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
