"""Training curves as a PNG, read from runs' TensorBoard logs.

    python scripts/plot_curves.py runs/ppo_imdb_<time> --out curves.png
    python scripts/plot_curves.py runs/ppo_imdb_<time> --tags objective/raw_score objective/kl
    python scripts/plot_curves.py runs/ppo_a runs/ppo_b --labels healthy,"lr 10x" --tags ... --out cmp.png

One panel per tag (default: PPO's reward-model score, KL to the reference and beta). One
run: the per-step values and a moving average; several runs: each run's moving average in
its own colour over its faint per-step values, for comparing runs side by side. An unknown
tag is an error that lists the run's tags.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

DEFAULT_TAGS = ["objective/raw_score", "objective/kl", "objective/kl_coef"]
LABELS = {"objective/raw_score": "reward-model score (raw)", "objective/kl": "KL to SFT (nats per response)",
          "objective/kl_coef": "KL coefficient beta", "loss/train": "training loss", "loss/eval": "eval loss",
          "val/accuracy": "held-out pairwise accuracy", "policy/clipfrac": "clipfrac (share of clipped ratios)",
          "policy/approxkl": "approxkl (policy change per update)", "policy/ratio_max": "largest ratio pi/pi_old",
          "objective/entropy": "entropy per token (nats)", "val/explained_variance": "explained variance (critic)",
          "loss/value": "value loss", "objective/rewards_margin": "implicit reward margin (DPO)",
          "objective/rewards_accuracy": "implicit reward accuracy (DPO)"}
COLOURS = ["#1565c0", "#c62828", "#2e7d32", "#ef6c00", "#6a1b9a", "#00838f"]


def read_scalars(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar tag of a run folder's event files: tag -> [(step, value)], sorted by step;
    where a resumed run logged a step twice, the later value wins."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    files = sorted(run_dir.glob("events.out.tfevents.*"))
    if not files:
        raise SystemExit(f"error: {run_dir}: no TensorBoard event files (events.out.tfevents.*)")
    out: dict[str, dict[int, float]] = {}
    for f in files:
        acc = EventAccumulator(str(f), size_guidance={"scalars": 0})
        acc.Reload()
        for tag in acc.Tags()["scalars"]:
            for e in acc.Scalars(tag):
                out.setdefault(tag, {})[e.step] = e.value
    return {tag: sorted(v.items()) for tag, v in out.items()}


def moving_average(values: list[float], window: int) -> list[float]:
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v - (values[i - window] if i >= window else 0.0)
        out.append(total / min(i + 1, window))
    return out


def plot(run_dir: Path | list[Path], tags: list[str], out: Path, title: str | None = None, window: int = 5,
         labels: list[str] | None = None, columns: int | None = None) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = [run_dir] if isinstance(run_dir, Path) else list(run_dir)
    labels = labels or [r.name for r in runs]
    if len(labels) != len(runs):
        raise SystemExit(f"error: {len(labels)} labels for {len(runs)} runs")
    every = [read_scalars(r) for r in runs]
    for r, scalars in zip(runs, every):
        missing = [t for t in tags if t not in scalars]
        if missing:
            raise SystemExit(f"error: {r}: no scalar {', '.join(missing)}; it has: {', '.join(sorted(scalars))}")
    columns = min(columns or len(tags), len(tags))
    rows = -(-len(tags) // columns)
    fig, axes = plt.subplots(rows, columns, figsize=(4.2 * columns, 3.2 * rows), squeeze=False)
    for i, tag in enumerate(tags):
        ax = axes[i // columns][i % columns]
        for k, (label, scalars) in enumerate(zip(labels, every)):
            steps, values = zip(*scalars[tag])
            if len(runs) == 1:
                ax.plot(steps, values, color="#90caf9", lw=1, label="per step")
                ax.plot(steps, moving_average(list(values), window), color="#1565c0", lw=2, label=f"mean of {window}")
            else:
                colour = COLOURS[k % len(COLOURS)]
                ax.plot(steps, values, color=colour, lw=0.6, alpha=0.25)
                ax.plot(steps, moving_average(list(values), window), color=colour, lw=1.8, label=label)
        ax.set_title(LABELS.get(tag, tag), fontsize=10)
        ax.set_xlabel("iteration" if tag.split("/")[0] in ("objective", "policy", "val") else "step")
        ax.grid(alpha=0.3)
    for j in range(len(tags), rows * columns):
        axes[j // columns][j % columns].axis("off")
    axes[0][0].legend(fontsize=8)
    fig.suptitle(title or ", ".join(r.name for r in runs), fontsize=10)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run", nargs="+", help="run folders with TensorBoard event files (several: drawn together)")
    p.add_argument("--tags", nargs="+", default=DEFAULT_TAGS)
    p.add_argument("--labels", default=None, help="comma-separated names of the runs (default: their folder names)")
    p.add_argument("--out", default=None, help="PNG path (default: <first run>/curves.png)")
    p.add_argument("--title", default=None)
    p.add_argument("--window", type=int, default=5, help="moving-average window")
    p.add_argument("--columns", type=int, default=None, help="panels per row (default: all in one row)")
    args = p.parse_args(argv)
    runs = [Path(r) for r in args.run]
    for run in runs:
        if not run.is_dir():
            raise SystemExit(f"error: {run}: not a folder")
    labels = args.labels.split(",") if args.labels else None
    out = Path(args.out) if args.out else runs[0] / "curves.png"
    print(plot(runs if len(runs) > 1 else runs[0], args.tags, out, args.title, args.window, labels, args.columns))


if __name__ == "__main__":
    sys.exit(main())
