"""Benchmark on one GPU (issue 14): how close each stage comes to what the hardware can do.

    python scripts/bench_gpu.py                         # every part, on cuda
    python scripts/bench_gpu.py --parts sft decode      # some of them
    python scripts/bench_gpu.py --smoke                 # tiny sizes on CPU: the script runs (no figures)

Parts (random weights throughout: speed does not depend on the values; no pretrained GPT-2 here):
  sft     one SFT training step through the real Stepper and lm_loss, gpt2 and gpt2-medium,
          bf16 autocast, sequence 1024, fused AdamW, eager and with train.compile
          (torch.compile): tokens/s and model FLOPs utilisation,
          MFU = (6N + 12 L C T) FLOPs per token (PaLM, appendix B) x tokens/s / peak bf16.
  decode  gpt2 in bf16, batch 256, 128 prompt + 128 new tokens (EOS held back), our
          generate() (CUDA-graph decode steps) against transformers' generate with a
          static cache and torch.compile; and against the roofline: the prefill at peak
          FLOP/s plus, per decode step, the weights and the KV cache read at HBM bandwidth.
  ppo     the real PPO stage on gpt2 at the scale of TRL's IMDB example: 100 iterations x 256
          rollouts, prompts of 2-8 tokens, 16-24 new tokens, 4 epochs, minibatch 64, a
          programmatic reward (scripts/ppo_bench_task.py), bf16: wall time, generation share.
  ppo-xl  gpt2-xl + LoRA r=16 (actor, critic; reference = adapters off; reward model):
          scripts/bench_ppo.py --size gpt2-xl, seconds per iteration and peak memory.

Device peaks (datasheets, dense bf16 / HBM): H100 SXM 989 TFLOP/s, 3.35 TB/s; H100 PCIe
756, 2.0; H200 989, 4.8; override with --peak-tflops / --hbm-tbps. Results are printed and,
with --json, written for BENCHMARKS.md (which names the device, torch version and date).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "scripts"))

from gpt2rlhf.config import OptimArgs, SFTConfig, TrainArgs, load_config  # noqa: E402
from gpt2rlhf.generation import generate  # noqa: E402
from gpt2rlhf.losses import lm_loss  # noqa: E402
from gpt2rlhf.model import GPT, PRESETS, GPTConfig  # noqa: E402
from gpt2rlhf.stages.common import Run, Stepper  # noqa: E402

TINY = dict(n_layer=2, n_head=2, n_embd=64)
PEAKS = [("H200", 989e12, 4.8e12), ("H100 PCIe", 756e12, 2.0e12), ("H100", 989e12, 3.35e12)]


def device_peaks(args) -> tuple[str, float, float]:
    name = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    flops, bw = float("nan"), float("nan")
    for key, f, b in PEAKS:
        if all(part in name for part in key.split()):
            flops, bw = f, b
            break
    return name, (args.peak_tflops * 1e12 if args.peak_tflops else flops), (args.hbm_tbps * 1e12 if args.hbm_tbps else bw)


def sync(device: str):
    if device == "cuda":
        torch.cuda.synchronize()


def n_params(model) -> int:
    return sum(p.numel() for p in model.parameters())


def flops_per_token(c: GPTConfig, n: int, T: int) -> float:
    return 6 * n + 12 * c.n_layer * c.n_embd * T


# ------------------------------------------------------------------ sft

def bench_sft(args, peak: float) -> list[dict]:
    out = []
    sizes = ["tiny"] if args.smoke else ["gpt2", "gpt2-medium"]
    for size in sizes:
        for compiled in (False, True):
            if args.smoke and compiled:
                continue
            T = 64 if args.smoke else 1024
            B = 2 if args.smoke else args.sft_batch
            c = GPTConfig(block_size=T, **(TINY if size == "tiny" else PRESETS[size]))
            torch.manual_seed(0)
            model = GPT(c).to(args.device)
            cfg = load_config(SFTConfig, overrides=["--train.device", args.device, "--train.compile", str(compiled).lower()])
            dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
            run = Run(Path(tempfile.mkdtemp()), "sft", cfg, torch.device(args.device), dtype)
            stepper = Stepper(model, run, OptimArgs(lr=1e-4, warmup_steps=0), TrainArgs(), 10_000)
            forward = torch.compile(model) if compiled else model
            ids = torch.randint(0, c.vocab_size, (B, T), device=args.device)
            mask = torch.ones_like(ids)

            def loss_fn(batch):
                return lm_loss(forward(batch, attention_mask=mask), batch, mask), {}

            steps = 2 if args.smoke else args.steps
            for _ in range(1 if args.smoke else 5):  # warm-up (and compilation)
                stepper.step([ids], loss_fn)
            sync(args.device)
            t = time.perf_counter()
            for _ in range(steps):
                stepper.step([ids], loss_fn)
            sync(args.device)
            dt = (time.perf_counter() - t) / steps
            tps = B * T / dt
            n = n_params(model)
            mfu = flops_per_token(c, n, T) * tps / peak
            row = {"part": "sft", "size": size, "compile": compiled, "batch": B, "seq": T, "params": n,
                   "tokens_per_s": tps, "step_s": dt, "mfu": mfu,
                   "peak_mem_gib": torch.cuda.max_memory_allocated() / 2**30 if args.device == "cuda" else None}
            print(f"sft {size} {'compiled' if compiled else 'eager'}: {tps:,.0f} tokens/s, {dt * 1000:.0f} ms/step, "
                  f"MFU {mfu:.1%} (goal >= 50% at gpt2)", flush=True)
            out.append(row)
            del model, stepper, forward
            if args.device == "cuda":
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()
    return out


# ------------------------------------------------------------------ decode

def decode_roofline(c: GPTConfig, n: int, B: int, P: int, N: int, flops: float, bw: float, bytes_per=2) -> float:
    """Seconds of the best possible generate(): the prefill at peak FLOP/s, then each
    decode step reading every weight once plus the KV cache written so far."""
    prefill = 2 * n * B * P / flops
    kv_row = 2 * c.n_layer * c.n_embd * bytes_per  # K and V of one token, every layer
    decode = sum(n * bytes_per + B * (P + t) * kv_row for t in range(N)) / bw
    return prefill + decode


def bench_decode(args, flops: float, bw: float) -> list[dict]:
    B, P, N = (4, 8, 8) if args.smoke else (256, 128, 128)
    c = GPTConfig(block_size=P + N, **(TINY if args.smoke else PRESETS["gpt2"]))
    dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    torch.manual_seed(0)
    ours = GPT(c).to(args.device, dtype).eval()
    n = n_params(ours)
    ids = torch.randint(0, 50000, (B, P), device=args.device)
    mask = torch.ones_like(ids)

    def run_ours():
        generate(ours, ids, mask, max_new_tokens=N, min_new_tokens=N, temperature=1.0)

    rows = [{"part": "decode", "impl": "ours", **timed_tokens(run_ours, args, B * N)}]
    try:
        rows.append({"part": "decode", "impl": "transformers static cache + compile",
                     **timed_tokens(hf_generate(c, args, ids, mask, N, dtype), args, B * N)})
    except Exception as e:  # a version without static-cache generate: say so, keep our figure
        rows.append({"part": "decode", "impl": "transformers static cache + compile", "error": f"{type(e).__name__}: {e}"})
    best = decode_roofline(c, n, B, P, N, flops, bw)
    for r in rows:
        r.update(batch=B, prompt=P, new=N, roofline_tokens_per_s=B * N / best)
        if "tokens_per_s" in r:
            r["share_of_roofline"] = r["tokens_per_s"] / r["roofline_tokens_per_s"]
            print(f"decode {r['impl']}: {r['tokens_per_s']:,.0f} tokens/s = {r['share_of_roofline']:.1%} of the "
                  f"roofline {r['roofline_tokens_per_s']:,.0f} (goal >= 50%)", flush=True)
        else:
            print(f"decode {r['impl']}: {r['error']}", flush=True)
    if len(rows) == 2 and "tokens_per_s" in rows[1]:
        rows[0]["vs_transformers"] = rows[0]["tokens_per_s"] / rows[1]["tokens_per_s"]
        print(f"decode ours / transformers: {rows[0]['vs_transformers']:.2f}x (goal >= 1.5x)")
    return rows


def hf_generate(c: GPTConfig, args, ids, mask, N: int, dtype):
    from transformers import GPT2Config, GPT2LMHeadModel

    hf = GPT2LMHeadModel(GPT2Config(n_layer=c.n_layer, n_head=c.n_head, n_embd=c.n_embd, n_positions=c.block_size,
                                    vocab_size=c.vocab_size)).to(args.device, dtype).eval()
    if not args.smoke:
        hf.forward = torch.compile(hf.forward, mode="reduce-overhead", fullgraph=True)

    def run():
        with torch.no_grad():
            hf.generate(ids, attention_mask=mask, do_sample=True, top_k=0, max_new_tokens=N, min_new_tokens=N,
                        cache_implementation="static", pad_token_id=0)
    return run


def timed_tokens(fn, args, tokens: int) -> dict:
    for _ in range(1 if args.smoke else 3):  # warm-up: CUDA-graph capture, compilation
        fn()
    times = []
    for _ in range(1 if args.smoke else 5):
        sync(args.device)
        t = time.perf_counter()
        fn()
        sync(args.device)
        times.append(time.perf_counter() - t)
    return {"seconds": statistics.median(times), "tokens_per_s": tokens / statistics.median(times)}


# ------------------------------------------------------------------ ppo

def bench_ppo(args) -> list[dict]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from gpt2rlhf.checkpoint import save_checkpoint
    from gpt2rlhf.config import PPOConfig
    from gpt2rlhf.model import GPTScalar
    from gpt2rlhf.stages import ppo
    from ppo_bench_task import reward

    tmp = Path(tempfile.mkdtemp())
    c = GPTConfig(block_size=64, **(TINY if args.smoke else PRESETS["gpt2"]))
    torch.manual_seed(0)
    actor = save_checkpoint(tmp / "sft" / "step_00000000", {"model": GPT(c)})
    rm = save_checkpoint(tmp / "rm" / "step_00000000", {"model": GPTScalar(c)})
    iterations, batch = (2, 8) if args.smoke else (100, 256)
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, 50000, (int(torch.randint(2, 9, (1,), generator=g)),), generator=g).tolist()
               for _ in range(4096)]
    cfg = load_config(PPOConfig, str(ROOT / "configs" / "imdb" / "ppo.yaml"), [
        "-a", str(actor), "-c", str(rm), "--critic_new_head", "true", "-b", str(batch),
        "--train.device", args.device, "--train.max_steps", str(iterations), "--train.save_every", "0",
        "--ppo.mini_batch_size", str(min(64, batch)), "--ppo.forward_batch_size", str(min(64, batch)),
        "--ppo.normalize_reward", "false", "--ppo.sample_every", "0", "--run.out_dir", str(tmp / "runs"),
        "--run.exp_name", "bench_gpu"])
    if args.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t = time.perf_counter()
    run_dir = ppo.train(cfg, reward_fn=reward, prompts=prompts)
    wall = time.perf_counter() - t
    acc = EventAccumulator(str(run_dir))
    acc.Reload()
    total = {tag: sum(e.value for e in acc.Scalars(f"time/{tag}")) for tag in ("generation", "scoring", "update")}
    row = {"part": "ppo", "size": "tiny" if args.smoke else "gpt2", "iterations": iterations, "batch": batch,
           "wall_s": wall, **{f"{k}_s": v for k, v in total.items()},
           "generation_share": total["generation"] / wall,
           "peak_mem_gib": torch.cuda.max_memory_allocated() / 2**30 if args.device == "cuda" else None}
    print(f"ppo {row['size']}, {iterations} x {batch} rollouts: {wall / 60:.2f} min wall (goal <= 3 min), generation "
          f"{row['generation_share']:.0%}, scoring {total['scoring'] / wall:.0%}, update {total['update'] / wall:.0%}",
          flush=True)
    return [row]


def bench_ppo_xl(args) -> list[dict]:
    size, extra = ("tiny", ["--iterations", "2", "--new-tokens", "8", "--batch-size", "8"]) if args.smoke else ("gpt2-xl", [])
    out = Path(tempfile.mkdtemp()) / "ppo_xl.json"
    subprocess.run([sys.executable, str(ROOT / "scripts" / "bench_ppo.py"), "--size", size, "--device", args.device,
                    "--json", str(out), *extra], check=True)
    row = {"part": "ppo-xl", **json.loads(out.read_text())}
    print(f"ppo {size} + LoRA: {row['iteration']:.2f} s/iteration, peak {row['peak_gib']:.2f} GiB", flush=True)
    return [row]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--parts", nargs="+", default=["sft", "decode", "ppo", "ppo-xl"],
                    choices=["sft", "decode", "ppo", "ppo-xl"])
    ap.add_argument("--smoke", action="store_true", help="tiny sizes on CPU, a step or two each: checks the script")
    ap.add_argument("--steps", type=int, default=20, help="timed SFT steps")
    ap.add_argument("--sft-batch", type=int, default=16, help="SFT rows of 1024 tokens per step")
    ap.add_argument("--peak-tflops", type=float, help="dense bf16 peak, if the device is not in the table")
    ap.add_argument("--hbm-tbps", type=float, help="memory bandwidth, if the device is not in the table")
    ap.add_argument("--json", help="write every figure here")
    args = ap.parse_args()
    args.device = "cpu" if args.smoke else "cuda"
    if not args.smoke and not torch.cuda.is_available():
        ap.error("no CUDA device: this benchmark is for a GPU (use --smoke to check it on CPU)")
    name, flops, bw = device_peaks(args)
    if args.smoke:
        flops, bw = 1e11, 1e10  # placeholders: the smoke run checks the code, not the figures
    meta = {"device": name, "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"), "peak_flops": flops,
            "hbm_bytes_per_s": bw}
    print(f"{name}, torch {torch.__version__}, peak {flops / 1e12:.0f} TFLOP/s bf16, {bw / 1e12:.2f} TB/s")
    rows = []
    for part in args.parts:
        rows += {"sft": lambda: bench_sft(args, flops), "decode": lambda: bench_decode(args, flops, bw),
                 "ppo": lambda: bench_ppo(args), "ppo-xl": lambda: bench_ppo_xl(args)}[part]()
    if args.json:
        Path(args.json).write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
