"""Evaluate models: responses on one prompt set, offline metrics, and an LLM judge (ChatGPT,
or any OpenAI-compatible server) comparing the first model with each of the others.

Usage, from src/ (or from the repository root as python src/evaluate.py):
    python evaluate.py -m ../runs/ppo_hh_<time> -m ../runs/sft_hh_<time> --reward-model ../runs/rm_hh_<time>
    python evaluate.py -m A -m B --base-url http://127.0.0.1:8000/v1 --judge-model llama3
    python evaluate.py -m A -m B --dry-run          # a sample judging prompt and the request count
    python evaluate.py -m A -m B --no-judge         # offline metrics only

Models (-m, two or more): our checkpoints or run folders (a PPO run gives its actor), Hugging
Face folders or hub names. Prompts: --prompts (a file or hub dataset; HH-RLHF's test split by
default), --num-prompts N (a seeded subset). Each model samples with the same settings and
seed; responses are cached in the output folder. Judge: --judge-model, --base-url, the key
from OPENAI_API_KEY or --key-file (the original tool's openai.key JSON works; a local server
needs none), --concurrency, --timeout, --max-retries. Every judgement is appended to
judgements.jsonl at once: rerunning the same command asks only what is missing.
Output (--out, default runs/eval_<time>/): report.md, win_rates.png, summary.json,
responses_*.json, judgements.jsonl, TensorBoard scalars.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # src/, for runs without pip install

import torch  # noqa: E402

from gpt2rlhf.checkpoint import CheckpointError, load_pretrained  # noqa: E402
from gpt2rlhf.config import DataArgs, resolve_input, resolve_output  # noqa: E402
from gpt2rlhf.data import DataError, load_records, prompt_examples  # noqa: E402
from gpt2rlhf.evaluation import (SamplingSettings, bar_chart, cached_responses, distinct_n,  # noqa: E402
                                 sequence_scores, text_of)
from gpt2rlhf.judge import Judge, JudgeError, JudgeSettings, resolve_api_key, win_rate  # noqa: E402
from gpt2rlhf.tokenizer import EOT_TOKEN, get_tokenizer  # noqa: E402


def parse(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-m", "--model", action="append", required=True, help="a model to evaluate (give two or more)")
    p.add_argument("--names", help="comma-separated labels for the models (default: folder names)")
    p.add_argument("--prompts", default="Anthropic/hh-rlhf", help="prompt file or hub dataset")
    p.add_argument("--prompts-split", default="test")
    p.add_argument("--prompts-subset", default=None, help="hub data_dir, e.g. harmless-base")
    p.add_argument("--num-prompts", type=int, default=200)
    p.add_argument("--prompt-min-tokens", type=int, default=0, help="text prompts: the first k tokens, k >= this")
    p.add_argument("--prompt-max-tokens", type=int, default=256)
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.7)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--reward-model", help="a reward-model checkpoint: mean RM score per model")
    p.add_argument("--reference", help="the model KL is measured against (default: the last -m)")
    p.add_argument("--judge-model", default="gpt-4o-mini")
    p.add_argument("--base-url", default=None, help="an OpenAI-compatible server (default: OpenAI)")
    p.add_argument("--key-file", default=None, help="a file with the API key (JSON {\"api_key\": ...} or plain)")
    p.add_argument("--concurrency", type=int, default=4)
    p.add_argument("--timeout", type=float, default=60.0)
    p.add_argument("--max-retries", type=int, default=5)
    p.add_argument("--no-judge", action="store_true", help="offline metrics only")
    p.add_argument("--dry-run", action="store_true", help="print a sample judging prompt and the request count")
    p.add_argument("--out", default=None, help="output folder (default runs/eval_<time>)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args(argv)
    if len(args.model) < 2:
        p.error("give at least two models with -m")
    return args


def default_names(sources: list[str]) -> list[str]:
    """A label per model: its run folder's name (not step_*/checkpoints), made unique."""
    names = []
    for src in sources:
        p = Path(src.rstrip("/"))
        while (p.name.startswith("step_") or p.name == "checkpoints") and p.parent != p:
            p = p.parent
        name, n = p.name or src, 2
        while name in names:
            name, n = f"{p.name}-{n}", n + 1
        names.append(name)
    return names


def run(args) -> Path:
    enc = get_tokenizer()
    names = args.names.split(",") if args.names else default_names(args.model)
    if len(names) != len(args.model) or len(set(names)) != len(names):
        raise ValueError(f"--names must give {len(args.model)} distinct labels, got {names}")
    out = Path(args.out) if args.out else resolve_output(f"runs/eval_{time.strftime('%Y%m%d-%H%M%S')}")
    out.mkdir(parents=True, exist_ok=True)
    judge_settings = None
    if not args.no_judge:  # before any work: a missing key is found now, not after generation
        judge_settings = JudgeSettings(model=args.judge_model, base_url=args.base_url,
                                       api_key=resolve_api_key(args.key_file, args.base_url),
                                       concurrency=args.concurrency, timeout=args.timeout,
                                       max_retries=args.max_retries)

    # 1. prompts
    records = load_records(resolve_input(args.prompts), "--prompts", args.prompts_split, args.prompts_subset)
    if args.num_prompts and args.num_prompts < len(records):
        records = records.shuffle(seed=args.seed).select(range(args.num_prompts)).flatten_indices()
    prompts, stats = prompt_examples(records, DataArgs(), args.prompt_min_tokens, args.prompt_max_tokens, enc,
                                     "--prompts", seed=args.seed)
    print(stats.report())
    if args.dry_run:
        sample = Judge(judge_settings or JudgeSettings(), out / "judgements.jsonl", client=object()).messages(
            enc.decode(prompts[0]), f"<response of {names[0]}>", f"<response of {names[1]}>")
        print("--- a judging prompt:\n" + "\n\n".join(f"[{m['role']}]\n{m['content']}" for m in sample))
        print(f"--- {2 * len(prompts) * (len(names) - 1)} judge requests ({len(prompts)} prompts x "
              f"{len(names) - 1} comparisons x 2 orders), fewer if judgements.jsonl already holds some")
        return out

    # 2. responses, one model in memory at a time
    s = SamplingSettings(args.max_new_tokens, args.temperature, args.top_k, args.top_p, args.seed, args.batch_size)
    def loader(source, name):
        def load():
            model = load_pretrained(resolve_input(source), kind="lm")
            if model.config.vocab_size != enc.n_vocab:
                raise ValueError(f"{name} ({source}) has a vocabulary of {model.config.vocab_size} tokens, not the "
                                 f"GPT-2 tokenizer's {enc.n_vocab}: the models must share one tokenizer")
            return model
        return load

    responses = {name: cached_responses(out / f"responses_{name}.json", name, loader(src, name), prompts, s,
                                        args.device) for name, src in zip(names, args.model)}

    # 3. offline metrics
    metrics = {name: {"mean_length": sum(len([t for t in r if t != EOT_TOKEN]) for r in rs) / len(rs),
                      "distinct_1": distinct_n(rs, 1), "distinct_2": distinct_n(rs, 2),
                      "no_eos_share": sum(1 for r in rs if not r or r[-1] != EOT_TOKEN) / len(rs)}
               for name, rs in responses.items()}
    if args.reward_model:
        rm = load_pretrained(resolve_input(args.reward_model), kind="scalar").to(args.device).eval()
        for name, rs in responses.items():
            scores = sequence_scores(rm, prompts, rs, args.device, args.batch_size)
            metrics[name]["rm_score"] = sum(scores) / len(scores)
        del rm
    ref_source = args.reference or args.model[-1]
    reference = load_pretrained(resolve_input(ref_source), kind="lm").to(args.device).eval()
    for name, src in zip(names, args.model):
        model = load_pretrained(resolve_input(src), kind="lm").to(args.device).eval()
        if model.config.vocab_size != reference.config.vocab_size:
            raise ValueError(f"{name} and the reference {ref_source} have different vocabularies "
                             f"({model.config.vocab_size} vs {reference.config.vocab_size}): not the same tokenizer")
        kl = sequence_scores(model, prompts, responses[name], args.device, args.batch_size, reference, s.temperature)
        metrics[name]["kl_to_reference"] = sum(kl) / len(kl)
        del model

    # 4. judge: the first model against each other one
    comparisons = {}
    if judge_settings is not None:
        judge = Judge(judge_settings, out / "judgements.jsonl")
        first = names[0]
        for other in names[1:]:
            items = [(f"{first}|{other}|{i}", enc.decode(p), text_of(enc, responses[first][i]),
                      text_of(enc, responses[other][i])) for i, p in enumerate(prompts)]
            outcomes, failed = judge.judge(items)
            if failed and not outcomes:
                raise JudgeError(f"every judge request failed ({type(judge.last_error).__name__}: "
                                 f"{judge.last_error}); is --base-url {args.base_url or 'OpenAI'} reachable?")
            comparisons[f"{first} vs {other}"] = {**win_rate(list(outcomes.values())), "failed": failed}

    # 5. report
    write_report(out, names, metrics, comparisons, args)
    print((out / "report.md").read_text())
    return out


def write_report(out: Path, names, metrics, comparisons, args):
    from torch.utils.tensorboard import SummaryWriter

    (out / "summary.json").write_text(json.dumps({"metrics": metrics, "comparisons": comparisons}, indent=2))
    cols = ["mean_length", "distinct_1", "distinct_2", "no_eos_share", "rm_score", "kl_to_reference"]
    lines = ["# Evaluation", "", f"{args.num_prompts} prompts from `{args.prompts}`; sampling: temperature "
             f"{args.temperature}, top-k {args.top_k}, top-p {args.top_p}, up to {args.max_new_tokens} new tokens, "
             f"seed {args.seed}.", "", "| model | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for name in names:
        lines.append(f"| {name} | " + " | ".join(f"{metrics[name][c]:.4f}" if c in metrics[name] else "-"
                                               for c in cols) + " |")
    if comparisons:
        lines += ["", f"Judge: `{args.judge_model}` at {args.base_url or 'OpenAI'}; each prompt judged in both "
                  "orders, a verdict counts only when both agree (else tie); ties count half in the win rate.", "",
                  "| comparison | win | tie | loss | invalid | failed | win rate [95% CI] |", "|---|---|---|---|---|---|---|"]
        for name, c in comparisons.items():
            lines.append(f"| {name} | {c['win']} | {c['tie']} | {c['loss']} | {c['invalid']} | {c['failed']} | "
                         f"{c['win_rate']:.3f} [{c['ci_low']:.3f}, {c['ci_high']:.3f}] |")
        bar_chart(out / "win_rates.png", comparisons)
        lines += ["", "![win rates](win_rates.png)"]
    (out / "report.md").write_text("\n".join(lines) + "\n")
    writer = SummaryWriter(str(out))
    for name, m in metrics.items():
        for k, v in m.items():
            writer.add_scalar(f"eval/{name}/{k}", v, 0)
    for name, c in comparisons.items():
        writer.add_scalar(f"judge/{name.replace(' ', '_')}/win_rate", c["win_rate"], 0)
    writer.close()


def main(argv=None):
    args = parse(argv)
    try:
        run(args)
    except (JudgeError, DataError, CheckpointError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
