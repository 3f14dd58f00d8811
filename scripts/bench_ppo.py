"""Benchmark: seconds per PPO iteration and peak GPU memory, gpt2-medium + LoRA.

Usage (a GPU run; on CPU pass --size tiny):
    python scripts/bench_ppo.py --prompts ../shared/data/hh-rlhf/harmless-base-test.jsonl.gz
    python scripts/bench_ppo.py --size tiny --iterations 3 --device cpu

Actor and reward model are random gpt2-medium weights saved as our checkpoints (no
pretrained weights here: speed and memory do not depend on them), then the real PPO
stage runs with configs/hh/ppo.yaml: batch 16 prompts (HH-RLHF prompts when --prompts is
given, else random tokens), 128 new tokens (EOS held back, so every response is 128
tokens), 4 PPO epochs, LoRA r=16 on actor and critic, bf16 autocast. It prints the
median time per iteration, split into generation, scoring and update, and the peak GPU
memory allocated.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from gpt2rlhf.checkpoint import save_checkpoint  # noqa: E402
from gpt2rlhf.config import PPOConfig, load_config  # noqa: E402
from gpt2rlhf.model import GPT, PRESETS, GPTConfig, GPTScalar  # noqa: E402
from gpt2rlhf.stages import ppo  # noqa: E402

SIZES = {"gpt2-xl": PRESETS["gpt2-xl"], "gpt2-medium": PRESETS["gpt2-medium"], "gpt2": PRESETS["gpt2"],
         "tiny": dict(n_layer=2, n_head=2, n_embd=64)}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", default="gpt2-medium", choices=SIZES)
    p.add_argument("--prompts", help="HH-RLHF jsonl(.gz) for the prompts; default: random tokens")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--iterations", type=int, default=6)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--json")
    args = p.parse_args()
    tmp = Path(tempfile.mkdtemp())
    config = GPTConfig(**SIZES[args.size])
    torch.manual_seed(0)
    actor = save_checkpoint(tmp / "sft" / "step_00000000", {"model": GPT(config)})
    critic = save_checkpoint(tmp / "rm" / "step_00000000", {"model": GPTScalar(config)})
    overrides = ["-a", str(actor), "-c", str(critic), "-b", str(args.batch_size), "--train.device", args.device,
                 "--ppo.max_new_tokens", str(args.new_tokens), "--ppo.min_new_tokens", str(args.new_tokens),
                 "--ppo.mini_batch_size", str(min(16, args.batch_size)), "--train.micro_batch_size", "8",
                 "--ppo.normalization_samples", str(args.batch_size), "--train.max_steps", str(args.iterations),
                 "--train.save_every", "0", "--ppo.sample_every", "0", "--run.out_dir", str(tmp / "runs"),
                 "--run.exp_name", "bench"]
    prompts = None
    if args.prompts:
        overrides += ["--data.train", args.prompts]
    else:
        g = torch.Generator().manual_seed(0)
        prompts = [torch.randint(0, 50000, (64,), generator=g).tolist() for _ in range(256)]
    cfg = load_config(PPOConfig, str(ROOT / "configs" / "hh" / "ppo.yaml"), overrides)
    if args.device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    run_dir = ppo.train(cfg, prompts=prompts)
    peak = torch.cuda.max_memory_allocated() / 2**30 if args.device.startswith("cuda") else float("nan")

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir))
    acc.Reload()
    times = {tag: statistics.median(e.value for e in acc.Scalars(f"time/{tag}")[1:])
             for tag in ("iteration", "generation", "scoring", "update")}
    name = torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu"
    print(f"{name}, torch {torch.__version__}: {args.size} + LoRA r={cfg.lora.r}, batch {args.batch_size}, "
          f"{args.new_tokens} new tokens, {cfg.ppo.ppo_epochs} PPO epochs, "
          f"{'bf16 autocast' if args.device.startswith('cuda') else 'fp32'}")
    print(f"seconds per iteration (median of {args.iterations - 1} after the first): {times['iteration']:.2f} "
          f"(generation {times['generation']:.2f}, scoring {times['scoring']:.2f}, update {times['update']:.2f}); "
          f"peak GPU memory allocated {peak:.2f} GiB")
    if args.json:
        Path(args.json).write_text(json.dumps({"device": name, "size": args.size, "peak_gib": peak, **times}, indent=2))


if __name__ == "__main__":
    main()
