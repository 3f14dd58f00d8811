"""Benchmark: our GPT-2 against transformers' GPT2LMHeadModel, same weights, same machine.

Usage:
    python scripts/bench_model.py                    # CPU: tiny and gpt2 (124M), fp32
    python scripts/bench_model.py --device cuda      # GPU: bf16, adds model FLOPs utilisation
    python scripts/bench_model.py --sizes tiny --rounds 2 --json out.json

For each size it builds a random transformers GPT-2, saves it with save_pretrained and
loads our model from that folder (so both hold the same weights), then measures, rounds
interleaved so that both see the same machine state:
  train: forward + backward tokens/s (cross-entropy on next tokens, batch x seq_len);
  generate: batched sampling tokens/s (batch 16, prompt 32, 64 new tokens, KV cache,
            temperature 1, no top-k, EOS held back so every row makes all 64 tokens).
It prints the median of each and the ratio ours / transformers.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from gpt2rlhf.generation import generate  # noqa: E402
from gpt2rlhf.hf import from_pretrained  # noqa: E402

SIZES = {
    "tiny": dict(n_layer=4, n_head=4, n_embd=128),
    "gpt2": dict(n_layer=12, n_head=12, n_embd=768),
    "gpt2-medium": dict(n_layer=24, n_head=16, n_embd=1024),
}
PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12}  # dense bf16 FLOP/s, datasheets


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device, iters):
    sync(device)
    t0 = time.perf_counter()
    for _ in range(iters):
        fn()
    sync(device)
    return (time.perf_counter() - t0) / iters


def build_pair(size: str, device, tmp: Path):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = GPT2Config(**SIZES[size], n_positions=1024, vocab_size=50257, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    theirs = GPT2LMHeadModel(cfg)
    theirs.save_pretrained(tmp / size)
    ours = from_pretrained(tmp / size)
    return ours.to(device), theirs.to(device)


def bench_train(ours, theirs, device, batch, seq_len, iters, rounds, amp):
    x = torch.randint(0, 50257, (batch, seq_len + 1), device=device)
    inp, tgt = x[:, :-1], x[:, 1:]

    def step(model, hf):
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            logits = model(inp).logits if hf else model(inp)
            loss = F.cross_entropy(logits.float().view(-1, logits.size(-1)), tgt.reshape(-1))
        loss.backward()
        model.zero_grad(set_to_none=True)

    for m in (ours, theirs):
        m.train()
        step(m, m is theirs)  # warm-up
    res = {"ours": [], "theirs": []}
    for _ in range(rounds):
        res["ours"].append(batch * seq_len / timed(lambda: step(ours, False), device, iters))
        res["theirs"].append(batch * seq_len / timed(lambda: step(theirs, True), device, iters))
    return {k: statistics.median(v) for k, v in res.items()}


@torch.no_grad()
def bench_generate(ours, theirs, device, batch, prompt_len, new_tokens, rounds, dtype):
    ours.eval().to(dtype)
    theirs.eval().to(dtype)
    prompt = torch.randint(0, 50000, (batch, prompt_len), device=device)
    mask = torch.ones_like(prompt)

    def run_ours(cuda_graph=None):
        out = generate(ours, prompt, mask, max_new_tokens=new_tokens, min_new_tokens=new_tokens, temperature=1.0,
                       cuda_graph=cuda_graph)
        assert out.tokens.shape == (batch, new_tokens)

    def run_theirs():
        out = theirs.generate(prompt, attention_mask=mask, do_sample=True, top_k=0, top_p=1.0, temperature=1.0,
                              max_new_tokens=new_tokens, min_new_tokens=new_tokens, pad_token_id=50256)
        assert out.shape == (batch, prompt_len + new_tokens)

    run_ours(), run_theirs()  # warm-up
    res = {"ours": [], "theirs": []}
    if device.type == "cuda":  # also ours without CUDA graphs, to show what they bring
        res["ours_no_graph"] = []
        run_ours(False)
    for _ in range(rounds):
        res["ours"].append(batch * new_tokens / timed(run_ours, device, 1))
        res["theirs"].append(batch * new_tokens / timed(run_theirs, device, 1))
        if "ours_no_graph" in res:
            res["ours_no_graph"].append(batch * new_tokens / timed(lambda: run_ours(False), device, 1))
    ours.float(), theirs.float()
    return {k: statistics.median(v) for k, v in res.items()}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--sizes", default="tiny,gpt2")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--train-batch", type=int, default=None, help="default: 4 on CPU, 16 on GPU")
    p.add_argument("--seq-len", type=int, default=None, help="default: 128 on CPU, 1024 on GPU")
    p.add_argument("--train-iters", type=int, default=None, help="default: 3 on CPU, 10 on GPU")
    p.add_argument("--gen-batch", type=int, default=16)
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--json", help="also write the results to this file")
    args = p.parse_args()
    device = torch.device(args.device)
    gpu = device.type == "cuda"
    batch = args.train_batch or (16 if gpu else 4)
    seq_len = args.seq_len or (1024 if gpu else 128)
    iters = args.train_iters or (10 if gpu else 3)
    if gpu:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    machine = torch.cuda.get_device_name(device) if gpu else f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"
    import transformers

    print(f"machine: {machine}; torch {torch.__version__}; transformers {transformers.__version__}; "
          f"precision: {'bf16' if gpu else 'fp32'}")
    results = {"machine": machine, "torch": torch.__version__, "transformers": transformers.__version__, "sizes": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for size in args.sizes.split(","):
            ours, theirs = build_pair(size, device, Path(tmp))
            results["transformers_attention"] = theirs.config._attn_implementation
            train = bench_train(ours, theirs, device, batch, seq_len, iters, args.rounds, amp=gpu)
            gen = bench_generate(ours, theirs, device, args.gen_batch, args.prompt_len, args.new_tokens, args.rounds,
                                 torch.bfloat16 if gpu else torch.float32)
            row = {"train_tok_s": train, "gen_tok_s": gen,
                   "train_ratio": train["ours"] / train["theirs"], "gen_ratio": gen["ours"] / gen["theirs"],
                   "train_shape": [batch, seq_len]}
            peak = next((v for k, v in PEAK_BF16.items() if k in machine), None)
            if gpu and peak:
                row["mfu_ours"] = ours.flops_per_token(seq_len) * train["ours"] / peak
                row["mfu_theirs"] = ours.flops_per_token(seq_len) * train["theirs"] / peak
            results["sizes"][size] = row
            print(f"{size:>12}  transformers attention implementation: {theirs.config._attn_implementation}")
            mfu = f"  MFU ours {row['mfu_ours']:.1%} / transformers {row['mfu_theirs']:.1%}" if "mfu_ours" in row else ""
            print(f"{size:>12}  train {batch}x{seq_len}: ours {train['ours']:,.0f} tok/s, transformers "
                  f"{train['theirs']:,.0f} tok/s, ratio {row['train_ratio']:.2f}x{mfu}")
            eager = f" (without CUDA graphs {gen['ours_no_graph']:,.0f})" if "ours_no_graph" in gen else ""
            print(f"{'':>12}  generate {args.gen_batch}x{args.new_tokens}: ours {gen['ours']:,.0f} tok/s{eager}, "
                  f"transformers {gen['theirs']:,.0f} tok/s, ratio {row['gen_ratio']:.2f}x", flush=True)
            del ours, theirs
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
