"""Serve a GPT-2 behind an OpenAI-compatible API, with a web chat page at /.

Usage (from src/, or from the repository root as `python src/serve.py ...`):
    python serve.py -p runs/sft_hh_<time>                 # http://127.0.0.1:8000/ : the chat page
    python serve.py -p runs/ppo_hh_<time> --model-name ppo --api-key secret --port 8001
    python serve.py -p gpt2 --max-batch 16                 # a hub name or Hugging Face folder

Then any OpenAI client: base_url http://127.0.0.1:8000/v1, the model named by --model-name
(default: the folder or hub name of -p), `/v1/completions` and `/v1/chat/completions`
(stream, temperature, top_p, max_tokens, stop, n, seed). Chat messages are turned into the
HH-RLHF transcript ("\\n\\nHuman: ...\\n\\nAssistant:"). Concurrent requests are decoded
together in shared batches (gpt2rlhf.serving). It listens on 127.0.0.1 unless --host says
otherwise; --api-key requires `Authorization: Bearer <key>`. Options are checked before
anything is loaded; a bad one, or a missing or wrong model, ends in one line `error: ...`
with exit status 2, as the other commands do.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # src/, for runs without pip install

from gpt2rlhf.config import ConfigError, check_device, ServeOptions, parse_options, resolve_input  # noqa: E402
from gpt2rlhf.loading import CheckpointError, load  # noqa: E402
from gpt2rlhf.runs import run_of  # noqa: E402
from gpt2rlhf.tokenizer import TokenizerError, get_tokenizer  # noqa: E402


def check_options(args) -> None:
    """Every option in its range, before anything is loaded (else ConfigError naming it)."""
    rules = [
        ("--port", 0 <= args.port <= 65535, "must be a port number (0 to 65535)"),
        ("--max-batch", args.max_batch >= 1, "must be >= 1"),
        ("--batch-wait", math.isfinite(args.batch_wait) and args.batch_wait >= 0, "must be a number of seconds >= 0"),
        ("--max-concurrent", args.max_concurrent >= 1, "must be >= 1"),
        ("--max-tokens-limit", args.max_tokens_limit >= 1, "must be >= 1"),
        ("--max-prompt-tokens", args.max_prompt_tokens >= 0, "must be >= 0 (0: the model's context)"),
        ("--max-body-bytes", args.max_body_bytes >= 1, "must be >= 1"),
    ]
    for flag, ok, problem in rules:
        if not ok:
            raise ConfigError(f"argument {flag}: {problem}, got {getattr(args, flag[2:].replace('-', '_'))!r}")
    if not args.pretrain:
        raise ConfigError("give -p/--pretrain: our checkpoint or run folder, a Hugging Face folder or a hub name")
    if args.api_key is not None and not args.api_key:
        raise ConfigError("argument --api-key: give a non-empty key (or leave the option out)")
    check_device(args.device)


def default_name(source: str) -> str:
    """A run folder's name (not step_*/checkpoints), a folder's name, or the hub name."""
    p = Path(source.rstrip("/"))
    return run_of(p).name if p.exists() else source


def main(argv=None):
    try:
        args, _ = parse_options(ServeOptions, argv, __doc__, {"pretrain": "-p"})
        check_options(args)
        import uvicorn

        from gpt2rlhf.serving import ServerSettings, build_app

        enc = get_tokenizer()
        source = resolve_input(args.pretrain)
        model = load(source, kind="lm").to(args.device).eval()
    except (CheckpointError, ConfigError, TokenizerError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    settings = ServerSettings(model_name=args.model_name or default_name(source), api_key=args.api_key,
                              max_batch=args.max_batch, batch_wait=args.batch_wait,
                              max_concurrent=args.max_concurrent, max_tokens_limit=args.max_tokens_limit,
                              max_prompt_tokens=args.max_prompt_tokens, max_body_bytes=args.max_body_bytes)
    if args.host not in ("127.0.0.1", "localhost", "::1") and not args.api_key:
        print(f"warning: listening on {args.host}, reachable from other machines, without --api-key", file=sys.stderr)
    print(f"serving {source} as model `{settings.model_name}` at http://{args.host}:{args.port}/ "
          f"(API: http://{args.host}:{args.port}/v1)", flush=True)
    uvicorn.run(build_app(model, enc, settings), host=args.host, port=args.port, log_level="warning")


if __name__ == "__main__":
    main()
