"""Export a trained model as a standard Hugging Face GPT-2 folder.

Usage (from src/, or from the repository root as `python src/export.py ...`):
    python export.py ../runs/ppo_imdb_<time> ../exported/ppo_imdb     # a PPO run: its actor
    python export.py ../runs/sft_hh_<time>/checkpoints/step_00004000 ../exported/sft_hh

The source is anything the stages accept as a model: a run folder (its latest checkpoint),
one of our checkpoints, a Hugging Face folder. LoRA adapters are merged. The folder gets
config.json (GPT2LMHeadModel), model.safetensors, GPT-2's tokenizer files (vocab.json,
merges.txt, tokenizer_config.json, special_tokens_map.json) and generation_config.json:
what transformers, vLLM, verl and OpenRLHF load with no hub access, e.g.
    transformers: AutoModelForCausalLM.from_pretrained(folder), AutoTokenizer.from_pretrained(folder)
    vLLM:         vllm serve <folder>    or    LLM(model=<folder>)
    OpenRLHF / verl: the folder as the actor's (or reference's) pretrain path
A bad source or an output folder that is not empty ends in one line, `error: ...`, exit status 2.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # src/, for runs without pip install

from gpt2rlhf.checkpoint import CheckpointError  # noqa: E402
from gpt2rlhf.config import resolve_input  # noqa: E402
from gpt2rlhf.hf import export_hf  # noqa: E402
from gpt2rlhf.loading import load  # noqa: E402


def main(argv=None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("source", help="a run folder, one of our checkpoints, or a Hugging Face folder")
    parser.add_argument("out", help="the folder to write (new, or empty)")
    args = parser.parse_args(argv)
    out = Path(args.out)
    try:
        if out.exists() and (not out.is_dir() or any(out.iterdir())):
            raise CheckpointError(f"{out}: exists and is not an empty folder; give a new one")
        model = load(resolve_input(args.source), kind="lm")
        export_hf(model, out)
    except (CheckpointError, ValueError, TypeError) as e:
        sys.stderr.write(f"error: {e}\n")
        raise SystemExit(2) from None
    print(f"exported {args.source} to {out}: {', '.join(sorted(p.name for p in out.iterdir()))}")
    return out


if __name__ == "__main__":
    main()
