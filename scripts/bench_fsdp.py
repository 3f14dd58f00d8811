"""Benchmark: peak memory per process of full fine-tuning with DDP against FSDP2
(train.parallel ddp | fsdp), through the real SFT entry point under torchrun.

Usage:
    python scripts/bench_fsdp.py                                  # gpt2-medium, 2 CPU processes (gloo)
    python scripts/bench_fsdp.py --preset gpt2-large --nproc 8 --device cuda --dtype bf16   # a GPU node (NCCL)
    python scripts/bench_fsdp.py --modes single fsdp --preset gpt2-large --nproc 1 --device cuda  # one GPU

Each mode trains --steps steps of a randomly initialised --preset (block size --seq) on
synthetic text, one sequence per process per step, and saves a checkpoint at the end (the
whole weights gathered, the optimizer state in shards: part of the peak). "single" is one
plain process (no torchrun), the baseline a single device holds. Every process reports its
own peak: resident memory (CPU) or torch.cuda.max_memory_allocated (GPU); the table shows
the largest over the processes, and the training loss of the last step (the modes must
agree). Nothing else should run on the machine meanwhile.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

WRAPPER = '''
import os, resource, sys
sys.path.insert(0, {src!r})
import torch
from gpt2rlhf.stages.sft import main
try:
    main(sys.argv[1:])
finally:
    gib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20
    cuda = torch.cuda.max_memory_allocated() / 2 ** 30 if torch.cuda.is_available() else 0.0
    print(f"PEAK rank {{os.environ.get('RANK', '0')}} rss_gib {{gib:.3f}} cuda_gib {{cuda:.3f}}", flush=True)
'''


def synthetic_data(path: Path, n: int = 256, words: int = 400):
    import random

    rng = random.Random(0)
    vocab = "the a film movie story actor scene good bad great plot ending music long short".split()
    with open(path, "w") as f:
        for _ in range(n):
            f.write(json.dumps({"text": " ".join(rng.choice(vocab) for _ in range(words))}) + "\n")


def run(mode: str, args, data: Path, out: Path) -> dict:
    script = out / "wrapper.py"
    script.write_text(WRAPPER.format(src=str(ROOT / "src")))
    nproc = 1 if mode == "single" else args.nproc
    head = [sys.executable] if mode == "single" else [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                                       "--nproc_per_node", str(nproc)]
    cmd = [*head, str(script), "--model.preset", args.preset, "--model.block_size", str(args.seq),
           "--data.train", str(data), "--data.format", "text", "--data.loss_on", "all", "--data.packing", "true", "--data.max_length", str(args.seq),
           "--data.eval_size", "4", "--train.eval_batches", "1", "-b", str(nproc), "--train.max_steps",
           str(args.steps), "--train.log_every", "1", "--train.save_every", "0", "--train.device", args.device,
           "--train.dtype", args.dtype, "--run.out_dir", str(out / mode), "--optim.warmup_steps", "1"]
    if mode != "single":
        cmd += ["--train.parallel", mode]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    t0 = time.perf_counter()
    res = subprocess.run(cmd, cwd=ROOT / "src", capture_output=True, text=True, env=env)
    seconds = time.perf_counter() - t0
    if res.returncode:
        sys.exit(f"{mode} failed:\n{res.stderr[-3000:]}")
    peaks = [tuple(map(float, m)) for m in re.findall(r"PEAK rank \d+ rss_gib ([\d.]+) cuda_gib ([\d.]+)", res.stdout)]
    losses = re.findall(r"loss=([\d.]+)", res.stderr + res.stdout)
    return {"mode": mode, "processes": nproc, "peak_rss_gib": max(p[0] for p in peaks),
            "peak_cuda_gib": max(p[1] for p in peaks), "last_loss": float(losses[-1]) if losses else None,
            "seconds": round(seconds, 1)}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="gpt2-medium")
    ap.add_argument("--modes", nargs="+", default=["ddp", "fsdp"], choices=["single", "ddp", "fsdp"])
    ap.add_argument("--nproc", type=int, default=2)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="fp32")
    ap.add_argument("--threads", type=int, default=1, help="OMP threads per process")
    ap.add_argument("--json", help="also write the results here")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        synthetic_data(tmp / "text.jsonl")
        results = [run(mode, args, tmp / "text.jsonl", tmp) for mode in args.modes]
    print(f"{args.preset}, block {args.seq}, {args.device} {args.dtype}, {args.steps} steps, one sequence per "
          f"process per step, checkpoint at the end")
    print(f"{'mode':<8}{'processes':>10}{'peak RSS GiB':>14}{'peak CUDA GiB':>15}{'last loss':>11}{'seconds':>9}")
    for r in results:
        print(f"{r['mode']:<8}{r['processes']:>10}{r['peak_rss_gib']:>14.2f}{r['peak_cuda_gib']:>15.2f}"
              f"{r['last_loss'] if r['last_loss'] is not None else float('nan'):>11.4f}{r['seconds']:>9}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
