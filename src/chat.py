"""Chat with a GPT-2 in the terminal, in the HH-RLHF transcript format the SFT preset trains
on ("\\n\\nHuman: ...\\n\\nAssistant:"). Replies stream as they are sampled; the conversation
stays in the model's KV cache, so a turn costs its own tokens only (gpt2rlhf.chat).

Usage (from src/, or from the repository root as `python src/chat.py ...`):
    python chat.py -p runs/sft_hh_<time>                    # our run folder or checkpoint
    python chat.py -p gpt2 --temperature 0.8 --max-tokens 64   # a hub name or Hugging Face folder
    python chat.py -p runs/ppo_hh_<time> --verbose          # tokens processed after each reply

In the chat: /reset, /temperature X, /top_p X, /max_tokens N, /stats, /help, /quit (or
Ctrl-D). Options are checked before anything is loaded; a bad one, or a missing or wrong
model, ends in one line `error: ...` with exit status 2, as the other commands do.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # src/, for runs without pip install

from gpt2rlhf.chat import ChatSession, Settings, run_terminal  # noqa: E402
from gpt2rlhf.config import ChatOptions, ConfigError, check_device, parse_options, resolve_input  # noqa: E402
from gpt2rlhf.loading import CheckpointError, load  # noqa: E402
from gpt2rlhf.tokenizer import TokenizerError, get_tokenizer  # noqa: E402


def check_options(args) -> None:
    """Every option in its range, before anything is loaded (else ConfigError naming it)."""
    rules = [
        ("--temperature", math.isfinite(args.temperature) and args.temperature >= 0, "must be a number >= 0 (0: greedy)"),
        ("--top-p", math.isfinite(args.top_p) and 0 < args.top_p <= 1, "must be in (0, 1] (1: off)"),
        ("--max-tokens", args.max_tokens >= 1, "must be >= 1"),
        ("--seed", 0 <= args.seed < 2 ** 63, "must be >= 0"),
    ]
    for flag, ok, problem in rules:
        if not ok:
            raise ConfigError(f"argument {flag}: {problem}, got {getattr(args, flag[2:].replace('-', '_'))!r}")
    if not args.pretrain:
        raise ConfigError("give -p/--pretrain: our checkpoint or run folder, a Hugging Face folder or a hub name")
    check_device(args.device)


def main(argv=None):
    try:
        args, _ = parse_options(ChatOptions, argv, __doc__, {"pretrain": "-p"})
        check_options(args)
        enc = get_tokenizer()
        model = load(resolve_input(args.pretrain), kind="lm")
        if args.max_tokens >= model.config.block_size:
            raise ConfigError(f"argument --max-tokens: must be below the model's context ({model.config.block_size} "
                              f"tokens), got {args.max_tokens}")
        model = model.to(args.device).eval()
    except (CheckpointError, ConfigError, TokenizerError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    session = ChatSession(model, enc, Settings(args.temperature, args.top_p, args.max_tokens), seed=args.seed)
    try:
        run_terminal(session, verbose=args.verbose)
    except KeyboardInterrupt:
        print()


if __name__ == "__main__":
    main()
