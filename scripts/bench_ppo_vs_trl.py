"""Benchmark: our PPO against TRL 0.11's classic PPOTrainer, the same task from the same weights.

    python scripts/bench_ppo_vs_trl.py --setup-trl          # once: TRL into .venv-trl/ (PyPI only)
    python scripts/bench_ppo_vs_trl.py --sft runs/sft_imdb_<time> \\
        --data ../shared/data/imdb/imdb_train.jsonl.gz [--iterations 30] [--seeds 0 1 2]

The task (both sides): our IMDB SFT model, exported to a Hugging Face folder that TRL
loads with its value head; prompts = the first 2-8 tokens of IMDB training reviews,
the same batch for both sides at every iteration; 16-24 new tokens (EOS forbidden
before 16), temperature 1, no top-k/top-p; batch 16, minibatch 16, 4 PPO epochs,
Adam lr 1e-4 (betas 0.9/0.999, no weight decay, no clipping, constant), gamma 1,
lambda 0.95, clip 0.2 / value clip 0.2, adaptive KL from 0.2 towards 6 nats with horizon
10,000 (TRL's defaults), raw rewards (no normalisation), advantages whitened; the reward
is scripts/ppo_bench_task.py (positive minus negative review words in the response).

Where the two libraries differ (no setting makes them equal): TRL's value head shares
the actor's backbone (one loss, vf_coef 0.1, one optimizer) where our critic is a
separate copy of the SFT model with a new head and its own optimizer at the same lr;
TRL's value head applies dropout 0.1 while training (its default; the exported model has
none, like ours); TRL's log-probs ignore that EOS was forbidden before 16 tokens, ours
use the distribution sampled from (issue 11).

Each side runs in its own process (ours in this interpreter, TRL in --trl-python),
one after the other and alternating which goes first per seed, with the same number of
torch threads; nothing else should run on the machine. Printed per side, median over
iterations after the first: seconds per iteration, generation, everything after it
(scoring + PPO update; TRL's step()), peak resident memory; and the reward curve: mean
reward of the first and last 5 iterations and the least-squares slope (reward gained
per iteration), averaged over seeds. Ratios are ours / TRL from the same invocation.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = ROOT / "scripts"
TRL_PINS = ["trl==0.11.4", "transformers==4.46.3", "accelerate==1.0.1", "datasets<3.2"]

SETTINGS = dict(batch_size=16, mini_batch_size=16, ppo_epochs=4, lr=1e-4, kl_coef=0.2, adaptive_kl=True,
                target_kl=6.0, kl_horizon=10000, gamma=1.0, lam=0.95, clip_range=0.2, clip_range_value=0.2,
                vf_coef=0.1, min_new_tokens=16, max_new_tokens=24, min_prompt=2, max_prompt=8)


def setup_trl(venv: Path):
    """TRL 0.11.4 (the last release with the classic PPOTrainer) and the transformers of its
    time into their own virtual environment, with the same CPU torch as ours."""
    import torch

    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "-q"]
    subprocess.run(pip + [f"torch=={torch.__version__.split('+')[0]}"], check=True)
    subprocess.run(pip + TRL_PINS, check=True)
    print(f"TRL installed in {venv}")


# ------------------------------------------------------------------ the task

def prepare(args, work: Path) -> list[Path]:
    """The HF export (with GPT-2's tokenizer files) and one task file per seed."""
    sys.path.insert(0, str(ROOT / "src"))
    from gpt2rlhf.config import DataArgs
    from gpt2rlhf.data import BatchStream, load_records, prompt_examples
    from gpt2rlhf.hf import export_hf
    from gpt2rlhf.loading import load
    from gpt2rlhf.tokenizer import _local_files, get_tokenizer

    hf = work / "sft_hf"
    if hf.exists():
        shutil.rmtree(hf)
    export_hf(load(args.sft, kind="lm"), hf)
    files = _local_files()  # vocab.bpe / encoder.json = merges.txt / vocab.json, checked against tiktoken's sums
    shutil.copy(files["encoder.json"], hf / "vocab.json")
    shutil.copy(files["vocab.bpe"], hf / "merges.txt")
    records = load_records(args.data, "--data").select(range(args.prompt_records))
    data_args = DataArgs(train=args.data, format="text", strip_html=True)
    pool, _ = prompt_examples(records, data_args, SETTINGS["min_prompt"], SETTINGS["max_prompt"], get_tokenizer(),
                              "--data", seed=0)
    tasks = []
    for seed in args.seeds:
        stream = BatchStream(len(pool), SETTINGS["batch_size"], seed)  # the order our trainer reads with this seed
        batches = [[pool[i] for i in stream.indices(it)] for it in range(args.iterations)]
        task = {"seed": seed, "hf_dir": str(hf), "sft": str(Path(args.sft).resolve()), "settings": SETTINGS,
                "pool": pool, "batches": batches, "work": str(work)}
        path = work / f"task_{seed}.json"
        path.write_text(json.dumps(task))
        tasks.append(path)
    return tasks


# ------------------------------------------------------------------ our side

def run_ours(task_path: Path, out: Path):
    sys.path.insert(0, str(ROOT / "src"))
    sys.path.insert(0, str(SCRIPTS))
    import torch
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from gpt2rlhf.config import PPOConfig, load_config
    from gpt2rlhf.stages import ppo
    from ppo_bench_task import reward

    task = json.loads(task_path.read_text())
    s = task["settings"]
    start = time.perf_counter()
    optim = ["--lr", str(s["lr"]), "--warmup_steps", "0", "--schedule", "constant", "--weight_decay", "0",
             "--beta2", "0.999", "--grad_clip", "0"]
    overrides = (["-a", task["sft"], "-c", task["sft"], "--critic_new_head", "true", "-b", str(s["batch_size"]),
                  "--train.max_steps", str(len(task["batches"])), "--train.seed", str(task["seed"]),
                  "--train.save_every", "0", "--train.log_every", "1", "--train.device", "cpu",
                  "--ppo.mini_batch_size", str(s["mini_batch_size"]), "--ppo.ppo_epochs", str(s["ppo_epochs"]),
                  "--ppo.min_new_tokens", str(s["min_new_tokens"]), "--ppo.max_new_tokens", str(s["max_new_tokens"]),
                  "--ppo.kl_coef", str(s["kl_coef"]), "--ppo.adaptive_kl", str(s["adaptive_kl"]).lower(),
                  "--ppo.target_kl", str(s["target_kl"]), "--ppo.kl_horizon", str(s["kl_horizon"]),
                  "--ppo.gamma", str(s["gamma"]), "--ppo.lam", str(s["lam"]), "--ppo.clip_range", str(s["clip_range"]),
                  "--ppo.clip_range_value", str(s["clip_range_value"]), "--ppo.normalize_reward", "false",
                  "--ppo.sample_every", "0", "--run.out_dir", str(Path(task["work"]) / "runs"),
                  "--run.exp_name", f"vs_trl_{task['seed']}"]
                 + [f"--optim.{o[2:]}" if o.startswith("--") else o for o in optim]
                 + [f"--critic_optim.{o[2:]}" if o.startswith("--") else o for o in optim])
    cfg = load_config(PPOConfig, str(ROOT / "configs" / "imdb" / "ppo.yaml"), overrides)
    loaded = time.perf_counter() - start
    run_dir = ppo.train(cfg, reward_fn=reward, prompts=task["pool"])
    acc = EventAccumulator(str(run_dir))
    acc.Reload()
    series = {tag: [e.value for e in acc.Scalars(tag)] for tag in
              ("objective/raw_score", "objective/kl", "objective/response_length", "time/generation",
               "time/scoring", "time/update", "time/iteration")}
    rows = [{"iteration": i + 1, "reward": series["objective/raw_score"][i], "kl": series["objective/kl"][i],
             "response_length": series["objective/response_length"][i],
             "generation": series["time/generation"][i],
             "update": series["time/scoring"][i] + series["time/update"][i], "total": series["time/iteration"][i]}
            for i in range(len(series["time/iteration"]))]
    out.write_text(json.dumps({
        "side": "ours", "versions": {"torch": torch.__version__}, "threads": torch.get_num_threads(),
        "load_seconds": loaded, "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "iterations": rows}, indent=1))


# ------------------------------------------------------------------ the report

def slope(ys: list[float]) -> float:
    xs = range(len(ys))
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)


def summary(results: list[dict]) -> dict:
    """Medians of the per-iteration times (after the first) over all seeds; the reward
    curve averaged over seeds."""
    its = [row for r in results for row in r["iterations"][1:]]
    n = min(len(r["iterations"]) for r in results)
    slopes = [slope([row["reward"] for row in r["iterations"][:n]]) for r in results]
    se = statistics.stdev(slopes) / len(slopes) ** 0.5 if len(slopes) > 1 else float("nan")
    curve = [statistics.fmean(r["iterations"][i]["reward"] for r in results) for i in range(n)]
    kl = [statistics.fmean(r["iterations"][i]["kl"] for r in results) for i in range(n)]
    return {"iteration": statistics.median(x["total"] for x in its),
            "generation": statistics.median(x["generation"] for x in its),
            "update": statistics.median(x["update"] for x in its),
            "peak_rss_mib": max(r["peak_rss_mib"] for r in results),
            "reward_first5": statistics.fmean(curve[:5]), "reward_last5": statistics.fmean(curve[-5:]),
            "reward_slope": slope(curve), "reward_slope_se": se, "reward_slopes": slopes,
            "kl_last5": statistics.fmean(kl[-5:]),
            "response_length": statistics.fmean(x["response_length"] for x in its),
            "curve": curve, "seeds": len(results)}


def report(ours: dict, trl: dict, meta: dict) -> str:
    rows = [("seconds per iteration", "iteration", "{:.2f} s", True),
            ("  generation (16 x 16-24 tokens)", "generation", "{:.2f} s", True),
            ("  scoring + PPO update (TRL: step())", "update", "{:.2f} s", True),
            ("peak resident memory", "peak_rss_mib", "{:,.0f} MiB", True),
            ("mean reward, first 5 iterations", "reward_first5", "{:.3f}", False),
            ("mean reward, last 5 iterations", "reward_last5", "{:.3f}", False),
            ("reward gained per iteration (slope)", "reward_slope", "{:+.4f}", False),
            ("KL to the SFT model, last 5 (nats)", "kl_last5", "{:.2f}", False),
            ("mean response length (tokens)", "response_length", "{:.1f}", False)]
    lines = [f"{meta['machine']}; torch {meta['torch']}, {meta['threads']} threads; TRL {meta['trl']}, "
             f"transformers {meta['transformers']}; {meta['iterations']} iterations x {len(meta['seeds'])} seeds "
             f"({', '.join(map(str, meta['seeds']))})", "",
             "| | ours | TRL | ours / TRL |", "| --- | ---: | ---: | ---: |"]
    for name, key, fmt, speed in rows:
        a, b = ours[key], trl[key]
        ratio = (f"**{b / a:.2f}x faster**" if a < b else f"**{a / b:.2f}x slower**") if speed and key != "peak_rss_mib" \
            else (f"{a / b:.2f}x" if b else "")
        if key == "reward_slope":  # the seeds' spread: what "the same reward gain" can mean here
            a, b = f"{fmt.format(a)} ± {ours['reward_slope_se']:.4f}", f"{fmt.format(b)} ± {trl['reward_slope_se']:.4f}"
        else:
            a, b = fmt.format(a), fmt.format(b)
        lines.append(f"| {name} | {a} | {b} | {ratio} |")
    lines.append(f"\n± is the standard error of the per-seed slopes ({len(ours['reward_slopes'])} seeds); per seed, ours "
                 + ", ".join(f"{x:+.4f}" for x in ours["reward_slopes"]) + "; TRL "
                 + ", ".join(f"{x:+.4f}" for x in trl["reward_slopes"]) + ".")
    return "\n".join(lines)


def machine() -> str:
    cpu = "cpu"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{os.cpu_count()} cores ({cpu})"


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sft", help="our SFT run folder or checkpoint (both sides start from it)")
    ap.add_argument("--data", help="IMDB reviews (jsonl/jsonl.gz with a 'text' field) for the prompts")
    ap.add_argument("--iterations", type=int, default=30)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--prompt-records", type=int, default=4000, help="reviews the prompt pool is cut from")
    ap.add_argument("--trl-python", default=str(ROOT / ".venv-trl" / "bin" / "python"))
    ap.add_argument("--setup-trl", action="store_true", help="install TRL into .venv-trl/ and stop")
    ap.add_argument("--only", choices=["ours", "trl"], help="run one side (no ratios)")
    ap.add_argument("--trl-kept-memory", action="store_true",
                    help="also run TRL with malloc keeping freed memory, as ours does on CPU (src/gpt2rlhf/allocator.py), "
                         "through glibc's environment variables: how much of the gap is the allocator")
    ap.add_argument("--work", default=str(ROOT / "runs" / "bench_ppo_vs_trl"))
    ap.add_argument("--json", help="write both sides' results here")
    ap.add_argument("--side", choices=["ours"], help=argparse.SUPPRESS)
    ap.add_argument("--task", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.side == "ours":
        return run_ours(Path(args.task), Path(args.out))
    if args.setup_trl:
        return setup_trl(Path(args.trl_python).parents[1])
    if not args.sft or not args.data:
        ap.error("--sft and --data are needed")
    if args.only != "ours" and not Path(args.trl_python).exists():
        ap.error(f"{args.trl_python} not found: run with --setup-trl first (or give --trl-python)")
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    tasks = prepare(args, work)
    sides = {"ours": [sys.executable, str(Path(__file__).resolve()), "--side", "ours"],
             "trl": [args.trl_python, str(SCRIPTS / "trl_ppo_side.py")]}
    if args.only:
        sides = {args.only: sides[args.only]}
    env = {"ours": None, "trl": None}
    if args.trl_kept_memory and args.only != "ours":
        sides["trl_kept_memory"] = sides["trl"]
        env["trl_kept_memory"] = {**os.environ, "MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": str(2**31 - 1)}
    results: dict[str, list[dict]] = {k: [] for k in sides}
    for n, (seed, task) in enumerate(zip(args.seeds, tasks)):
        order = list(sides) if n % 2 == 0 else list(reversed(sides))
        for side in order:
            out = work / f"result_{side}_{seed}.json"
            print(f"seed {seed}: {side} ...", flush=True)
            t = time.perf_counter()
            subprocess.run(sides[side] + ["--task", str(task), "--out", str(out)], check=True, env=env[side],
                           stdout=subprocess.DEVNULL if side == "ours" else None)
            results[side].append(json.loads(out.read_text()))
            print(f"seed {seed}: {side} done in {time.perf_counter() - t:.0f} s", flush=True)
    summaries = {side: summary(rs) for side, rs in results.items()}
    trl_versions = results["trl"][0]["versions"] if "trl" in results else {"trl": "-", "transformers": "-"}
    first = next(iter(results.values()))[0]
    meta = {"machine": machine(), "torch": first["versions"]["torch"], "threads": first["threads"],
            "trl": trl_versions["trl"], "transformers": trl_versions["transformers"],
            "iterations": args.iterations, "seeds": args.seeds, "date": time.strftime("%Y-%m-%d")}
    for side, s in summaries.items():
        print(f"{side}: {s['iteration']:.2f} s/iteration (generation {s['generation']:.2f}, update "
              f"{s['update']:.2f}), peak RSS {s['peak_rss_mib']:.0f} MiB, reward {s['reward_first5']:.3f} -> "
              f"{s['reward_last5']:.3f} (slope {s['reward_slope']:+.4f}/iteration), KL {s['kl_last5']:.2f}")
    if "ours" in summaries and "trl" in summaries:
        print(report(summaries["ours"], summaries["trl"], meta))
    if "ours" in summaries and "trl_kept_memory" in summaries:
        print("\nTRL with malloc keeping freed memory (MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=2^31-1):")
        print(report(summaries["ours"], summaries["trl_kept_memory"], meta))
    if args.json:
        Path(args.json).write_text(json.dumps({"meta": meta, "summary": summaries, "results": results}, indent=1))


if __name__ == "__main__":
    main()
