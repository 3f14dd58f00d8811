"""Benchmark: PPO, DPO and the critic-free trainer (GRPO, RLOO) on the IMDB task, from the
same SFT model and reward model, judged the same way.

Usage (from the repository root; needs the IMDB files, ../shared/data/imdb or --data-dir):
    python scripts/bench_algorithms.py --sft runs/sft_imdb_<time> --rm runs/rm_imdb_<time>
    python scripts/bench_algorithms.py --sft ... --rm ... --algos ppo grpo --out runs/algos_test
    python scripts/bench_algorithms.py --reuse ppo=runs/ppo_imdb_<time> --sft ... --rm ...   # a finished run

Each algorithm trains with its preset (configs/imdb/<algo>.yaml; rloo is grpo.yaml with
--grpo.estimator rloo), through its real entry point, keeping every checkpoint. Then one
evaluate.py call (configs/imdb/eval.yaml, no LLM judge) samples every checkpoint and the SFT
model on the same 500 held-out test openings with the same seed, and reports for each: the
share the independent sentiment judge calls positive, the KL to SFT, distinct-2,
perplexity under SFT, the reward model's score. Output (--out): table.md (the final
checkpoints, with each stage's wall time), tradeoff.png (positive share against KL, every
checkpoint: the trade-off curve of the DPO paper), results.json, and the evaluation folder.
The wall times are only comparable when nothing else ran on the machine meanwhile.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from gpt2rlhf.checkpoint import list_checkpoints  # noqa: E402

PRESETS = {"ppo": ("train_ppo.py", "ppo.yaml", []), "dpo": ("train_dpo.py", "dpo.yaml", ["--train.save_every", "25"]),
           "grpo": ("train_grpo.py", "grpo.yaml", []),
           "rloo": ("train_grpo.py", "grpo.yaml", ["--grpo.estimator", "rloo"])}
LABELS = {"ppo": "PPO", "dpo": "DPO", "grpo": "GRPO", "rloo": "RLOO", "sft": "SFT"}


def stage_args(algo: str, sft: Path, rm: Path, data: Path) -> list[str]:
    """The stage's model and data options: PPO's actor, critic and reward; DPO's SFT model
    and preference pairs (the reward model's pairs: IMDB labels); the critic-free actor and
    reward."""
    train = ["--data.train", str(data / "imdb_train.jsonl.gz")]
    if algo == "ppo":
        return ["-a", str(sft), "-c", str(rm), *train]
    if algo == "dpo":
        return ["-p", str(sft), *train, "--data.eval", str(data / "imdb_test.jsonl.gz")]
    return ["-a", str(sft), "--reward", str(rm), *train]


def train(algo: str, args, out: Path) -> tuple[Path, float]:
    script, preset, extra = PRESETS[algo]
    runs = out / "runs"
    before = set(runs.glob("*")) if runs.exists() else set()
    cmd = [sys.executable, f"training/{script}", "--config", str(ROOT / "configs" / "imdb" / preset),
           "-n", f"bench_{algo}", "--run.out_dir", str(runs), "--train.keep_checkpoints", "0", *extra,
           *stage_args(algo, args.sft, args.rm, args.data_dir), *args.stage_args.get(algo, [])]
    print("===", " ".join(cmd), flush=True)
    t0 = time.perf_counter()
    done = subprocess.run(cmd, cwd=ROOT / "src")
    seconds = time.perf_counter() - t0
    if done.returncode:
        sys.exit(f"{algo} failed with exit status {done.returncode}")
    (run,) = set(runs.glob("*")) - before
    return run, seconds


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sft", type=Path, required=True, help="the SFT run (or checkpoint) every algorithm starts from")
    ap.add_argument("--rm", type=Path, required=True, help="the reward model run (PPO's critic and reward)")
    ap.add_argument("--algos", nargs="+", default=["ppo", "dpo", "grpo", "rloo"], choices=list(PRESETS))
    ap.add_argument("--reuse", nargs="*", default=[], metavar="ALGO=RUN", help="take a finished run instead")
    ap.add_argument("--data-dir", type=Path, default=ROOT.parent / "shared" / "data" / "imdb")
    ap.add_argument("--out", type=Path, default=ROOT / "runs" / f"algos_{time.strftime('%Y%m%d-%H%M%S')}")
    ap.add_argument("--every", type=int, default=1, help="evaluate every N-th checkpoint of each run (and the last)")
    args = ap.parse_args()
    args.sft, args.rm, args.data_dir, args.out = (args.sft.resolve(), args.rm.resolve(), args.data_dir.resolve(),
                                                 args.out.resolve())
    args.stage_args = {}
    args.out.mkdir(parents=True, exist_ok=True)
    results = {"runs": {}, "seconds": {}}
    reused = dict(item.split("=", 1) for item in args.reuse)
    for algo in args.algos:
        if algo in reused:
            results["runs"][algo], results["seconds"][algo] = str(Path(reused[algo]).resolve()), None
            continue
        run, seconds = train(algo, args, args.out)
        results["runs"][algo], results["seconds"][algo] = str(run), round(seconds, 1)
        (args.out / "results.json").write_text(json.dumps(results, indent=2) + "\n")

    models, names = [str(args.sft)], ["sft"]
    for algo, run in results["runs"].items():
        ckpts = list_checkpoints(Path(run) / "checkpoints")
        keep = [c for i, c in enumerate(ckpts) if (i + 1) % args.every == 0 or c == ckpts[-1]]
        for c in keep:
            models.append(str(c))
            names.append(f"{algo}@{int(c.name.split('_')[1])}")
    ev = args.out / "eval"
    cmd = [sys.executable, "evaluate.py", "--config", str(ROOT / "configs" / "imdb" / "eval.yaml"),
           "--prompts", str(args.data_dir / "imdb_test.jsonl.gz"),
           "--sentiment-train", str(args.data_dir / "imdb_train.jsonl.gz"),
           "--sentiment-test", str(args.data_dir / "imdb_test.jsonl.gz"), "--no-judge", "--samples", "3",
           "--reference", str(args.sft), "--reward-model", str(args.rm), "--names", ",".join(names), "--out", str(ev)]
    for m in models:
        cmd += ["-m", m]
    print("=== evaluate", len(models), "models", flush=True)
    if subprocess.run(cmd, cwd=ROOT / "src").returncode:
        sys.exit("evaluate.py failed")
    metrics = json.loads((ev / "summary.json").read_text())["metrics"]
    results["metrics"] = metrics
    (args.out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    report(results, args.out)


def report(results: dict, out: Path):
    metrics = results["metrics"]
    finals = {"sft": "sft"}
    for name in metrics:
        algo = name.split("@")[0]
        if algo != "sft" and (algo not in finals or int(name.split("@")[1]) > int(finals[algo].split("@")[1])):
            finals[algo] = name
    lines = ["| model | judged positive | KL to SFT (nats / response) | distinct-2 | perplexity under SFT | "
             "RM score | wall time |", "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for algo, name in finals.items():
        m = metrics[name]
        secs = results["seconds"].get(algo)
        wall = "-" if algo == "sft" else (f"{secs / 60:.1f} min" if secs else "(reused run)")
        lines.append(f"| {LABELS[algo]} ({name}) | {100 * m['positive_share']:.1f}% | {m['kl_to_reference']:.2f} | "
                     f"{m['distinct_2']:.3f} | {m['reference_perplexity']:.0f} | {m['rm_score']:.2f} | {wall} |")
    (out / "table.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    sft = metrics["sft"]
    for algo in [a for a in LABELS if a != "sft" and a in finals]:
        pts = sorted((int(n.split("@")[1]), m) for n, m in metrics.items() if n.split("@")[0] == algo)
        xs = [sft["kl_to_reference"]] + [m["kl_to_reference"] for _, m in pts]
        ys = [100 * sft["positive_share"]] + [100 * m["positive_share"] for _, m in pts]
        ax.plot(xs, ys, marker="o", ms=3, label=LABELS[algo])
    ax.scatter([sft["kl_to_reference"]], [100 * sft["positive_share"]], color="black", zorder=5, label="SFT")
    ax.set_xlabel("KL to SFT (nats per response)")
    ax.set_ylabel("judged positive (%)")
    ax.set_title("IMDB: positive share against KL, every checkpoint")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "tradeoff.png", dpi=120)
    print(f"table: {out / 'table.md'}\nplot: {out / 'tradeoff.png'}")


if __name__ == "__main__":
    main()
