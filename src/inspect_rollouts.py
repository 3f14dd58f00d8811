"""Inspect a PPO run token by token: the rollouts it saved (every ppo.sample_every
iterations and after the first, in <run>/rollouts/) as one self-contained HTML page. Each
response token is coloured by a quantity (per-token KL, the critic's value, the advantage,
the reward, the update's probability ratio, the return, the log-prob); hovering a token
shows all of them, and a menu on the page switches the colouring.

Usage (from src/, or from the repository root as `python src/inspect_rollouts.py ...`):
    python inspect_rollouts.py ../runs/ppo_imdb_<time>                      # first, middle, last saved
    python inspect_rollouts.py ../runs/ppo_imdb_<time> --iterations 1,10,120 --color advantage
    python inspect_rollouts.py ../runs/ppo_imdb_<time> --iterations all --out /tmp/run.html
    python inspect_rollouts.py ../runs/ppo_imdb_<time> --screenshot page.png   # needs chromium + chromedriver

The page goes to <run>/inspector.html unless --out says otherwise. A folder that is not a
PPO run or saved no rollouts, an iteration that was not saved (the saved ones are listed),
an unknown quantity or bad option ends in one line, `error: ...`, with exit status 2, as
the other commands do.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # src/, for runs without pip install

from gpt2rlhf.inspector import (QUANTITIES, InspectorError, check_quantity, load_run, screenshot,  # noqa: E402
                                write_page)


class Parser(argparse.ArgumentParser):
    """argparse whose errors are one `error:` line like the rest of the command's."""

    def error(self, message):
        raise InspectorError(message)


def parse(argv):
    p = Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dir", type=Path, help="a PPO run folder")
    p.add_argument("--iterations", help="comma-separated saved iterations, or 'all' (default: first, middle, last)")
    p.add_argument("--color", default="kl", help=f"the quantity that colours the tokens: {', '.join(QUANTITIES)}")
    p.add_argument("--out", type=Path, help="the HTML file (default RUN_DIR/inspector.html)")
    p.add_argument("--screenshot", type=Path, metavar="FILE.png",
                   help="also save a PNG of the page's first sections, 1200 px wide (headless chromium)")
    return p.parse_args(argv)


def main(argv=None):
    try:
        args = parse(argv)
        check_quantity(args.color)
        records = load_run(args.run_dir, args.iterations)
        out = write_page(args.run_dir, records, args.color, args.out)
        tokens = sum(len(row["tokens"]) for r in records for row in r["rows"])
        print(f"wrote {out}: iterations {', '.join(str(r['iteration']) for r in records)}, "
              f"{sum(len(r['rows']) for r in records)} rows, {tokens} tokens")
        if args.screenshot:
            print(f"saved {screenshot(out, args.screenshot)}")
    except InspectorError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
