"""Training curves as a PNG, read from a run's TensorBoard logs.

    python scripts/plot_curves.py runs/ppo_imdb_<time> --out curves.png
    python scripts/plot_curves.py runs/ppo_imdb_<time> --tags objective/raw_score objective/kl

One panel per tag (default: PPO's reward-model score, KL to the reference and beta), the
per-step values and a moving average. An unknown tag is an error that lists the run's tags.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

DEFAULT_TAGS = ["objective/raw_score", "objective/kl", "objective/kl_coef"]
LABELS = {"objective/raw_score": "reward-model score (raw)", "objective/kl": "KL to SFT (nats per response)",
          "objective/kl_coef": "KL coefficient beta", "loss/train": "training loss", "loss/eval": "eval loss",
          "val/accuracy": "held-out pairwise accuracy"}


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


def plot(run_dir: Path, tags: list[str], out: Path, title: str | None = None, window: int = 5) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    scalars = read_scalars(run_dir)
    missing = [t for t in tags if t not in scalars]
    if missing:
        raise SystemExit(f"error: {run_dir}: no scalar {', '.join(missing)}; it has: {', '.join(sorted(scalars))}")
    fig, axes = plt.subplots(1, len(tags), figsize=(4.2 * len(tags), 3.2), squeeze=False)
    for ax, tag in zip(axes[0], tags):
        steps, values = zip(*scalars[tag])
        ax.plot(steps, values, color="#90caf9", lw=1, label="per step")
        ax.plot(steps, moving_average(list(values), window), color="#1565c0", lw=2, label=f"mean of {window}")
        ax.set_title(LABELS.get(tag, tag), fontsize=10)
        ax.set_xlabel("iteration" if tag.startswith("objective/") else "step")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.suptitle(title or run_dir.name, fontsize=10)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run", help="a run folder with TensorBoard event files")
    p.add_argument("--tags", nargs="+", default=DEFAULT_TAGS)
    p.add_argument("--out", default=None, help="PNG path (default: <run>/curves.png)")
    p.add_argument("--title", default=None)
    p.add_argument("--window", type=int, default=5, help="moving-average window")
    args = p.parse_args(argv)
    run = Path(args.run)
    if not run.is_dir():
        raise SystemExit(f"error: {run}: not a folder")
    print(plot(run, args.tags, Path(args.out) if args.out else run / "curves.png", args.title, args.window))


if __name__ == "__main__":
    sys.exit(main())
