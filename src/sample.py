"""Sample text from a GPT-2: one of our checkpoints, a Hugging Face folder or a hub name.

Usage (from src/, or from the repository root as `python src/sample.py ...`):
    python sample.py -p runs/sft_imdb_20261124-1300 --prompt "This movie was"
    python sample.py -p path/to/hf-gpt2-folder --prompt "Hello" --num-samples 4 --temperature 0.8
    python sample.py --demo     # no weights needed: a tiny random GPT-2 is saved as a
                                # checkpoint under runs/, loaded back, exported, sampled

Prompts are left-padded into one batch and sampled with a KV cache (gpt2rlhf.generation).
Options are checked before anything is loaded (or --demo saves its model); a bad option, a
missing or wrong model, or a prompt that leaves no room for --max-new-tokens in the model's
context ends in one line, `error: ...`, with exit status 2, as the other commands do.
"""

from __future__ import annotations

import math
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

import torch  # noqa: E402

from gpt2rlhf.checkpoint import save_checkpoint, step_dir  # noqa: E402
from gpt2rlhf.loading import CheckpointError, load  # noqa: E402
from gpt2rlhf.config import ConfigError, check_device, SampleOptions, parse_options, resolve_input  # noqa: E402
from gpt2rlhf.generation import generate  # noqa: E402
from gpt2rlhf.hf import export_hf  # noqa: E402
from gpt2rlhf.model import GPT, GPTConfig  # noqa: E402
from gpt2rlhf.data import left_pad  # noqa: E402
from gpt2rlhf.tokenizer import EOT_TOKEN, TokenizerError, get_tokenizer, response_text  # noqa: E402


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


def check_options(args) -> None:
    """Every option in its range, before anything is loaded (else ConfigError naming it)."""
    rules = [
        ("--num-samples", args.num_samples >= 1, "must be >= 1"),
        ("--max-new-tokens", args.max_new_tokens >= 1, "must be >= 1"),
        ("--temperature", math.isfinite(args.temperature) and args.temperature >= 0, "must be a number >= 0 (0: greedy)"),
        ("--top-k", args.top_k >= 0, "must be >= 0 (0: off)"),
        ("--top-p", math.isfinite(args.top_p) and 0 < args.top_p <= 1, "must be in (0, 1] (1: off)"),
        ("--seed", 0 <= args.seed < 2 ** 63, "must be >= 0"),
    ]
    for flag, ok, problem in rules:
        if not ok:
            raise ConfigError(f"argument {flag}: {problem}, got {getattr(args, flag[2:].replace('-', '_'))!r}")
    for i, prompt in enumerate(args.prompt or []):
        if not prompt:
            raise ConfigError(f"argument --prompt: prompt {i + 1} is empty; give some text to continue")
    check_device(args.device)


def main(argv=None):
    try:
        args, _ = parse_options(SampleOptions, argv, __doc__, {"pretrain": "-p"})
        if not args.pretrain and not args.demo:
            raise ConfigError("give -p/--pretrain, or --demo")
        check_options(args)
        sample(args)
    except (CheckpointError, ConfigError, TokenizerError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None


def sample(args):
    enc = get_tokenizer()
    prompts = args.prompt or ["The movie was", "Hello, my name is"]
    encoded = [enc.encode(t) for t in prompts]
    model = load(demo_model() if args.demo else resolve_input(args.pretrain), kind="lm")
    longest = max(range(len(encoded)), key=lambda i: len(encoded[i]))
    if len(encoded[longest]) + args.max_new_tokens > model.config.block_size:
        which = f"--prompt {longest + 1} " if len(prompts) > 1 else "--prompt "
        raise ValueError(f"{which}is {len(encoded[longest])} tokens; with --max-new-tokens {args.max_new_tokens} "
                         f"that exceeds the model's context (block_size {model.config.block_size}); shorten the "
                         f"prompt or lower --max-new-tokens")
    model = model.to(args.device).eval()
    rows = [ids for ids in encoded for _ in range(args.num_samples)]
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
        print(f"--- sample {i}\n{enc.decode(row)}{bold}{response_text(enc, new)}{plain}")
    n = int(out.mask.sum())
    print(f"--- {n} tokens in {seconds:.2f}s ({n / seconds:,.0f} tokens/s) on {args.device}")


if __name__ == "__main__":
    main()
