"""Sample text from a GPT-2: one of our checkpoints, a Hugging Face folder or a hub name.

Usage (from src/, or from the repository root as `python src/sample.py ...`):
    python sample.py -p runs/sft_imdb_20261124-1300 --prompt "This movie was"
    python sample.py -p path/to/hf-gpt2-folder --prompt "Hello" --num-samples 4 --temperature 0.8
    python sample.py --demo     # no weights needed: a tiny random GPT-2 is saved as a
                                # checkpoint under runs/, loaded back, exported, sampled

Prompts are left-padded into one batch and sampled with a KV cache (gpt2rlhf.generation).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

import torch  # noqa: E402

from gpt2rlhf.checkpoint import CheckpointError, load_pretrained, save_checkpoint, step_dir  # noqa: E402
from gpt2rlhf.generation import generate  # noqa: E402
from gpt2rlhf.hf import export_hf  # noqa: E402
from gpt2rlhf.model import GPT, GPTConfig  # noqa: E402
from gpt2rlhf.tokenizer import EOT_TOKEN, get_tokenizer  # noqa: E402


def left_pad(rows: list[list[int]], pad: int):
    T = max(len(r) for r in rows)
    ids = torch.full((len(rows), T), pad, dtype=torch.long)
    mask = torch.zeros(len(rows), T, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, T - len(r):], mask[i, T - len(r):] = torch.tensor(r), 1
    return ids, mask


def demo_model() -> Path:
    """A tiny random GPT-2 saved as our checkpoint (and exported for transformers)."""
    run = ROOT / "runs" / f"demo_{time.strftime('%Y%m%d-%H%M%S')}"
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=128, n_layer=2, n_head=2, n_embd=64))
    path = save_checkpoint(step_dir(run / "checkpoints", 0), {"model": model},
                           metadata={"stage": "demo", "step": 0})
    export_hf(model, run / "hf")
    print(f"saved a tiny random GPT-2 checkpoint to {path}\nexported it for transformers to {run / 'hf'}")
    return path


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-p", "--pretrain", help="our checkpoint or run folder, a Hugging Face folder, or a hub name")
    p.add_argument("--demo", action="store_true", help="sample from a tiny random model (no weights needed)")
    p.add_argument("--prompt", action="append", help="a prompt (repeat for a batch)")
    p.add_argument("--num-samples", type=int, default=1, help="samples per prompt")
    p.add_argument("--max-new-tokens", type=int, default=40)
    p.add_argument("--temperature", type=float, default=1.0, help="0 for greedy")
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args(argv)
    if not args.pretrain and not args.demo:
        p.error("give -p/--pretrain, or --demo")
    try:
        model = load_pretrained(demo_model() if args.demo else args.pretrain, kind="lm")
    except CheckpointError as e:
        sys.exit(f"error: {e}")
    model = model.to(args.device).eval()
    enc = get_tokenizer()
    prompts = args.prompt or ["The movie was", "Hello, my name is"]
    rows = [enc.encode(t) for t in prompts for _ in range(args.num_samples)]
    ids, mask = left_pad(rows, EOT_TOKEN)
    ids, mask = ids.to(args.device), mask.to(args.device)
    t0 = time.perf_counter()
    out = generate(model, ids, mask, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                   top_k=args.top_k, top_p=args.top_p, eos_token_id=EOT_TOKEN,
                   generator=torch.Generator(args.device).manual_seed(args.seed))
    seconds = time.perf_counter() - t0
    bold, plain = ("\033[1m", "\033[0m") if sys.stdout.isatty() else ("", "")
    for i, row in enumerate(rows):
        new = out.tokens[i][out.mask[i].bool()].tolist()
        print(f"--- sample {i}\n{enc.decode(row)}{bold}{enc.decode([t for t in new if t != EOT_TOKEN])}{plain}")
    n = int(out.mask.sum())
    print(f"--- {n} tokens in {seconds:.2f}s ({n / seconds:,.0f} tokens/s) on {args.device}")


if __name__ == "__main__":
    main()
