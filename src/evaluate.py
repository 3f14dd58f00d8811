"""Evaluate models: responses on one prompt set, offline metrics, and an LLM judge (ChatGPT,
or any OpenAI-compatible server) comparing the first model with each of the others.

Usage, from src/ (or from the repository root as python src/evaluate.py):
    python evaluate.py -m ../runs/ppo_hh_<time> -m ../runs/sft_hh_<time> --reward-model ../runs/rm_hh_<time>
    python evaluate.py -m A -m B --base-url http://127.0.0.1:8000/v1 --judge-model llama3
    python evaluate.py -m A -m B --dry-run          # a sample judging prompt and the request count
    python evaluate.py -m A -m B --no-judge         # offline metrics only
    python evaluate.py -m openai:http://127.0.0.1:8000/v1#ppo -m ../runs/sft_hh_<time> --no-judge  # a served model
    python evaluate.py --config ../configs/imdb/eval.yaml -m ../runs/ppo_imdb_<time> -m ../runs/sft_imdb_<time> \
        --reward-model ../runs/rm_imdb_<time> --no-judge    # the IMDB experiment's report

Models (-m, two or more): our checkpoints or run folders (a PPO run gives its actor), Hugging
Face folders or hub names, or a model behind an OpenAI-compatible server, written
openai:<base url>#<model name> (ours, python src/serve.py, or any other: llama.cpp, vLLM),
e.g. -m openai:http://127.0.0.1:8000/v1#sft; its key, if it wants one, from $SERVED_API_KEY.
A served model answers each prompt's text through /v1/completions with the same settings
(seed + the prompt's index) and its text is read back as GPT-2 tokens; its responses are
cached under its URL and name (delete responses_<label>.json after changing what it
serves). The metrics that need its token log-probs (KL to the reference) are left out for
it, as are KL and perplexity altogether when the reference would be a served model (give a
local --reference); the report says so. Prompts: --prompts (a file or hub dataset; HH-RLHF's test split by
default), --num-prompts N (a seeded subset). Each model samples with the same settings and
seed; responses are cached in the output folder. Judge: --judge-model, --base-url, the key
from OPENAI_API_KEY or --key-file (the original tool's openai.key JSON works; a local server
needs none), --concurrency, --timeout, --max-retries. Every judgement is appended to
judgements.jsonl at once: rerunning the same command asks only what is missing.
Sentiment: --sentiment-train (labelled reviews, e.g. IMDB train) fits an independent
TF-IDF + logistic-regression classifier that scores every response (share judged positive);
--sentiment-test reports its accuracy. --config FILE: a YAML mapping of these options
(names with _ or -), e.g. configs/imdb/eval.yaml; the command line wins over it.
Output (--out, default runs/eval_<time>/): report.md, win_rates.png, summary.json,
responses_*.json, judgements.jsonl, TensorBoard scalars. Every option (from the command line
or --config) is range-checked first, then the key, the prompts, the sentiment files and every
model source (it exists, is the right kind of model, fits the longest prompt plus
--max-new-tokens): the output folder is made only after that, so bad input leaves nothing
behind and ends in one line, exit status 2. --dry-run makes no folder.
"""

from __future__ import annotations

import json
import math
import sys
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # src/, for runs without pip install

import torch  # noqa: E402

from gpt2rlhf.loading import CheckpointError, load, load_reward_model  # noqa: E402
from gpt2rlhf.config import (ConfigError, DataArgs, EvalOptions, option_name, parse_options,  # noqa: E402
                             resolve_input, resolve_output)
from gpt2rlhf.data import DataError, load_records, prompt_examples  # noqa: E402
from gpt2rlhf.evaluation.metrics import (SamplingSettings, bar_chart, cached_responses, check_served,  # noqa: E402
                                 distinct_n, is_served, model_identity, parse_served, reward_scores, sample_table,
                                 served_responses, summed_logprobs)
from gpt2rlhf.evaluation.judge import Judge, JudgeError, JudgeSettings, resolve_api_key, win_rate  # noqa: E402
from gpt2rlhf.runs import run_of  # noqa: E402
from gpt2rlhf.tokenizer import EOT_TOKEN, TokenizerError, get_tokenizer, response_text  # noqa: E402

USER_ERRORS = (JudgeError, DataError, CheckpointError, ConfigError, TokenizerError, ValueError)


def parse(argv):
    """The options, each checked (from the command line or --config): one line `error: ...`
    and exit status 2 for the first bad one."""
    try:
        args, config_only = parse_options(EvalOptions, argv, __doc__, {"model": "-m"})
    except ConfigError as e:
        fail(str(e))
    if len(args.model) < 2:
        fail("give at least two models with -m")
    names = args.names.split(",") if args.names else default_names(args.model)
    if len(names) != len(args.model) or len(set(names)) != len(names) or not all(names):
        fail(f"argument --names: give {len(args.model)} distinct labels, one per -m, got {args.names!r}")
    args.labels = names
    for dest, problem in check_options(args):
        source = f" (from {resolve_input(args.config)})" if dest in config_only else ""
        fail(f"argument {option_name(dest)}: {problem}, got {getattr(args, dest)!r}{source}")
    if args.out and Path(args.out).exists() and not Path(args.out).is_dir():
        fail(f"argument --out: {args.out} exists and is not a folder")
    try:
        device = torch.device(args.device)
    except RuntimeError:
        fail(f"argument --device: not a device name, got {args.device!r} (cpu, cuda, cuda:1, mps)")
    if device.type == "cuda" and not torch.cuda.is_available():
        fail(f"argument --device: {args.device!r}, but no CUDA GPU is available")
    return args


def fail(message: str):
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(2)


def check_options(args) -> list[tuple[str, str]]:
    """(option, what is wrong) for each numeric option out of its range: every value is
    checked before anything is loaded, whether it came from the command line or --config."""
    def finite(x):
        return isinstance(x, (int, float)) and math.isfinite(x)

    rules = [
        ("num_prompts", args.num_prompts >= 0, "must be >= 0 (0: every prompt)"),
        ("prompt_max_tokens", args.prompt_max_tokens >= 1, "must be >= 1"),
        ("prompt_min_tokens", 0 <= args.prompt_min_tokens <= max(args.prompt_max_tokens, 0),
         f"must be between 0 and --prompt-max-tokens ({args.prompt_max_tokens})"),
        ("max_new_tokens", args.max_new_tokens >= 1, "must be >= 1"),
        ("min_new_tokens", 0 <= args.min_new_tokens <= max(args.max_new_tokens, 0),
         f"must be between 0 and --max-new-tokens ({args.max_new_tokens})"),
        ("temperature", finite(args.temperature) and args.temperature >= 0, "must be a number >= 0 (0: greedy)"),
        ("top_k", args.top_k >= 0, "must be >= 0 (0: off)"),
        ("top_p", finite(args.top_p) and 0 < args.top_p <= 1, "must be in (0, 1] (1: off)"),
        ("seed", 0 <= args.seed < 2 ** 63, "must be >= 0"),
        ("batch_size", args.batch_size >= 1, "must be >= 1"),
        ("samples", args.samples >= 0, "must be >= 0 (0: no sample table)"),
        ("concurrency", args.concurrency >= 1, "must be >= 1"),
        ("timeout", finite(args.timeout) and args.timeout > 0, "must be a number of seconds > 0"),
        ("max_retries", args.max_retries >= 0, "must be >= 0"),
    ]
    return [(dest, problem) for dest, ok, problem in rules if not ok]


def default_names(sources: list[str]) -> list[str]:
    """A label per model: its run folder's name (not step_*/checkpoints), made unique."""
    names = []
    for src in sources:
        base = parse_served(src)[1] if is_served(src) and "#" in src else run_of(Path(src.rstrip("/"))).name or src
        name, n = base, 2
        while name in names:
            name, n = f"{base}-{n}", n + 1
        names.append(name)
    return names


def load_source(source: str, option: str, kind: str = "lm"):
    """A model a user named (-m, --reference: a language model; --reward-model: a trained
    reward model), its errors prefixed with the option."""
    try:
        if kind == "reward":
            return load_reward_model(resolve_input(source))
        return load(resolve_input(source), kind=kind)
    except CheckpointError as e:
        text = str(e)
        starts = text.startswith((source.rstrip("/"), str(resolve_input(source)).rstrip("/")))
        raise CheckpointError(f"{option} {text}" if starts else f"{option} {source}: {text}") from None


def check_sources(args, prompts: list[list[int]], enc) -> None:
    """Every model source (-m, --reference, --reward-model) exists, is the right kind of
    model, shares the GPT-2 tokenizer and has room for the longest prompt plus
    --max-new-tokens: found before the output folder is made or anything is sampled. The
    models are built on the meta device (no memory, no initialisation) from their real
    files, so this costs about the reading of each file once."""
    longest = max(len(p) for p in prompts)
    sources = [("-m", src, "lm") for src in args.model]
    if args.reference:
        sources.append(("--reference", args.reference, "lm"))
    if args.reward_model:
        sources.append(("--reward-model", args.reward_model, "reward"))
    seen = set()
    for option, src, kind in sources:
        if (src, kind) in seen:
            continue
        seen.add((src, kind))
        if is_served(src):  # its server checks the lengths; here: it answers and has the model
            if option != "-m":
                raise ValueError(f"{option} {src}: must be a local model (its token scores are needed); "
                                 f"a served model can only be a -m")
            check_served(src)
            continue
        with torch.device("meta"), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "copying ... to a meta parameter ... is a no-op"
            try:
                model = load_source(src, option, kind)
            except CheckpointError:
                raise
            except Exception:  # noqa: BLE001 - something the meta device cannot do: the real load will tell
                continue
        cfg = model.config
        if cfg.vocab_size != enc.n_vocab:
            raise ValueError(f"{option} {src} has a vocabulary of {cfg.vocab_size} tokens, not the GPT-2 "
                             f"tokenizer's {enc.n_vocab}: the models must share one tokenizer")
        if longest + args.max_new_tokens > cfg.block_size:
            raise ValueError(f"{option} {src}: the longest prompt ({longest} tokens, --prompt-max-tokens "
                             f"{args.prompt_max_tokens}) plus --max-new-tokens {args.max_new_tokens} exceed the "
                             f"model's context (block_size {cfg.block_size}); lower one of them")


def run(args) -> Path:
    enc = get_tokenizer()
    names = getattr(args, "labels", None) or (args.names.split(",") if args.names else default_names(args.model))
    if len(names) != len(args.model) or len(set(names)) != len(names):
        raise ValueError(f"--names must give {len(args.model)} distinct labels, got {names}")
    out = Path(args.out) if args.out else resolve_output(f"runs/eval_{time.strftime('%Y%m%d-%H%M%S')}")
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

    # the sentiment judge and every model source before any sampling, so that a bad file is
    # found at once; the output folder only once they are known to be good
    sentiment_judge = fit_sentiment(args) if args.sentiment_train else None
    check_sources(args, prompts, enc)
    out.mkdir(parents=True, exist_ok=True)

    # 2. responses, one model in memory at a time
    s = SamplingSettings(max_new_tokens=args.max_new_tokens, min_new_tokens=args.min_new_tokens,
                         temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed,
                         batch_size=args.batch_size)
    def loader(source, name):
        def load():
            model = load_source(source, "-m")
            if model.config.vocab_size != enc.n_vocab:
                raise ValueError(f"{name} ({source}) has a vocabulary of {model.config.vocab_size} tokens, not the "
                                 f"GPT-2 tokenizer's {enc.n_vocab}: the models must share one tokenizer")
            return model
        return load

    def sampler(src):
        return (lambda: served_responses(src, prompts, s, enc)) if is_served(src) else None

    responses = {name: cached_responses(out / f"responses_{name}.json", name, loader(src, name), prompts, s,
                                        args.device, src if is_served(src) else model_identity(resolve_input(src)),
                                        sampler(src))
                 for name, src in zip(names, args.model)}

    # 3. offline metrics
    metrics = {name: {"mean_length": sum(len([t for t in r if t != EOT_TOKEN]) for r in rs) / len(rs),
                      "distinct_1": distinct_n(rs, 1), "distinct_2": distinct_n(rs, 2),
                      "no_eos_share": sum(1 for r in rs if not r or r[-1] != EOT_TOKEN) / len(rs)}
               for name, rs in responses.items()}
    if args.reward_model:
        rm = load_source(args.reward_model, "--reward-model", "reward").to(args.device).eval()
        for name, rs in responses.items():
            scores = reward_scores(rm, prompts, rs, args.device, args.batch_size)
            metrics[name]["rm_score"] = sum(scores) / len(scores)
        del rm
    ref_source = args.reference or args.model[-1]
    if not is_served(ref_source):
        kl_and_perplexity(args, names, prompts, responses, metrics, s, ref_source)
    sentiment = None
    if sentiment_judge is not None:
        sentiment = sentiment_scores(*sentiment_judge, args, prompts, responses, enc, metrics)

    # 4. judge: the first model against each other one
    comparisons = {}
    if judge_settings is not None:
        judge = Judge(judge_settings, out / "judgements.jsonl")
        first = names[0]
        for other in names[1:]:
            items = [(f"{first}|{other}|{i}", enc.decode(p), response_text(enc, responses[first][i]),
                      response_text(enc, responses[other][i])) for i, p in enumerate(prompts)]
            outcomes, failed = judge.judge(items)
            if failed and not outcomes:
                raise JudgeError(f"every judge request failed ({type(judge.last_error).__name__}: "
                                 f"{judge.last_error}); is --base-url {args.base_url or 'OpenAI'} reachable?")
            unjudged = len(items) - len(outcomes)  # prompts with a failed request in either order
            if unjudged:
                print(f"warning: {unjudged} of {len(items)} prompts of {first} vs {other} are not judged ({failed} "
                      f"requests failed: {type(judge.last_error).__name__}); rerun the same command to ask only those",
                      file=sys.stderr)
            comparisons[f"{first} vs {other}"] = {**win_rate(list(outcomes.values())), "failed": unjudged,
                                                  "failed_requests": failed}

    # 5. report
    samples = None
    if args.samples > 0:
        notes = {n: [f"{p:.2f}" for p in probs] for n, probs in sentiment["positive"].items()} if sentiment else None
        samples = sample_table([enc.decode(p) for p in prompts],
                               {n: [response_text(enc, r) for r in rs] for n, rs in responses.items()}, notes, args.samples)
    write_report(out, names, metrics, comparisons, args, samples, sentiment)
    print((out / "report.md").read_text())
    return out


def kl_and_perplexity(args, names, prompts, responses, metrics, s, ref_source):
    """KL to the reference (each local model's log-probs of its responses against the
    reference's) and the responses' perplexity under the reference, into `metrics`; a
    served model gets the perplexity only (its log-probs are not ours to compute)."""
    reference = load_source(ref_source, "--reference" if args.reference else "-m").to(args.device).eval()
    ref_lp = {}  # at the sampling temperature (for KL) and at 1 (for perplexity); EOS masked as in sampling
    for temp in {s.temperature, 1.0}:
        ref_lp[temp] = {name: summed_logprobs(reference, prompts, rs, args.device, args.batch_size, temp,
                                                s.min_new_tokens)
                        for name, rs in responses.items()}
    for name, src in zip(names, args.model):
        ref_sum, _ = ref_lp[s.temperature][name]
        nll, count = ref_lp[1.0][name]
        metrics[name]["reference_perplexity"] = math.exp(-sum(nll) / max(1, sum(count)))
        if is_served(src):
            continue
        if resolve_input(src) == resolve_input(ref_source):  # the reference itself: its log-probs are known
            lp = ref_sum
        else:
            model = load_source(src, "-m").to(args.device).eval()
            if model.config.vocab_size != reference.config.vocab_size:
                raise ValueError(f"{name} and the reference {ref_source} have different vocabularies "
                                 f"({model.config.vocab_size} vs {reference.config.vocab_size}): not the same tokenizer")
            lp, _ = summed_logprobs(model, prompts, responses[name], args.device, args.batch_size, s.temperature,
                                      s.min_new_tokens)
            del model
        metrics[name]["kl_to_reference"] = sum(a - b for a, b in zip(lp, ref_sum)) / len(lp)
    del reference


def fit_sentiment(args):
    """The independent sentiment judge fitted on --sentiment-train, with its accuracy on
    --sentiment-test (whole reviews and 18-word snippets): (judge, info)."""
    from gpt2rlhf.evaluation.sentiment import fit_sentiment_judge, labelled_texts, snippets

    t0 = time.perf_counter()
    texts, labels = labelled_texts(load_records(resolve_input(args.sentiment_train), "--sentiment-train"),
                                   "--sentiment-train")
    judge = fit_sentiment_judge(texts, labels)
    info = {"fitted_on": len(texts), "fit_seconds": round(time.perf_counter() - t0, 1), "input": args.sentiment_input}
    if args.sentiment_test:
        texts, labels = labelled_texts(load_records(resolve_input(args.sentiment_test), "--sentiment-test", "test"),
                                       "--sentiment-test")
        info.update(test_reviews=len(texts), test_accuracy=judge.accuracy(texts, labels),
                    snippet_accuracy=judge.accuracy(snippets(texts), labels))
    print("sentiment judge: " + ", ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}"
                                          for k, v in info.items()))
    return judge, info


def sentiment_scores(judge, info, args, prompts, responses, enc, metrics) -> dict:
    """Every model's responses scored by the sentiment judge: share judged positive
    (P > 0.5) and mean P(positive), into `metrics`."""
    positive = {}
    for name, rs in responses.items():
        inputs = [(enc.decode(p) if args.sentiment_input == "prompt+response" else "") + response_text(enc, r)
                  for p, r in zip(prompts, rs)]
        positive[name] = judge.positive(inputs)
        metrics[name]["positive_share"] = sum(p > 0.5 for p in positive[name]) / len(inputs)
        metrics[name]["positive_prob"] = sum(positive[name]) / len(inputs)
    return {"judge": info, "positive": positive}


def write_report(out: Path, names, metrics, comparisons, args, samples=None, sentiment=None):
    from torch.utils.tensorboard import SummaryWriter

    summary = {"metrics": metrics, "comparisons": comparisons}
    if sentiment:
        summary["sentiment_judge"] = sentiment["judge"]
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    cols = ["positive_share", "positive_prob", "rm_score", "kl_to_reference", "reference_perplexity", "distinct_1",
            "distinct_2", "mean_length", "no_eos_share"]
    cols = [c for c in cols if any(c in m for m in metrics.values())]
    lines = ["# Evaluation", "", f"{args.num_prompts} prompts from `{args.prompts}`; sampling: temperature "
             f"{args.temperature}, top-k {args.top_k}, top-p {args.top_p}, {args.min_new_tokens} to {args.max_new_tokens} "
             f"new tokens, seed {args.seed}. " + kl_note(args), "", "| model | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for name in names:
        lines.append(f"| {name} | " + " | ".join(f"{metrics[name][c]:.4f}" if c in metrics[name] else "-"
                                               for c in cols) + " |")
    if sentiment:
        j = sentiment["judge"]
        lines += ["", f"Sentiment judge: TF-IDF (word 1-2-grams) + logistic regression fitted on {j['fitted_on']} "
                  f"reviews of `{args.sentiment_train}`, independent of the reward model; it reads the "
                  f"{j['input']}; positive means P(positive) > 0.5."]
        if "test_accuracy" in j:
            lines[-1] += (f" Accuracy on {j['test_reviews']} reviews of `{args.sentiment_test}`: "
                          f"{j['test_accuracy']:.1%} whole, {j['snippet_accuracy']:.1%} on 18-word snippets.")
    if comparisons:
        lines += ["", f"Judge: `{args.judge_model}` at {args.base_url or 'OpenAI'}; each prompt judged in both "
                  "orders, a verdict counts only when both agree (else tie); ties count half in the win rate; "
                  "failed: prompts not judged because a request failed (rerunning asks only those).", "",
                  "| comparison | win | tie | loss | invalid | failed | win rate [95% CI] |", "|---|---|---|---|---|---|---|"]
        for name, c in comparisons.items():
            lines.append(f"| {name} | {c['win']} | {c['tie']} | {c['loss']} | {c['invalid']} | {c['failed']} | "
                         f"{c['win_rate']:.3f} [{c['ci_low']:.3f}, {c['ci_high']:.3f}] |")
        bar_chart(out / "win_rates.png", comparisons)
        lines += ["", "![win rates](win_rates.png)"]
    if samples:
        lines += ["", "## Samples", "", "The first prompts, each model's response"
                  + (" (its P(positive))" if sentiment else "") + ":", ""] + samples
    (out / "report.md").write_text("\n".join(lines) + "\n")
    writer = SummaryWriter(str(out))
    for name, m in metrics.items():
        for k, v in m.items():
            writer.add_scalar(f"eval/{name}/{k}", v, 0)
    for name, c in comparisons.items():
        writer.add_scalar(f"judge/{name.replace(' ', '_')}/win_rate", c["win_rate"], 0)
    writer.close()


def kl_note(args) -> str:
    """What the report says about KL and perplexity, served models included."""
    ref = args.reference or args.model[-1]
    served = [n for n, src in zip(getattr(args, "labels", None) or default_names(args.model), args.model)
              if is_served(src)]
    if is_served(ref):
        return (f"KL and perplexity are not measured: the reference `{ref}` is a served model (its token "
                f"log-probs are not available here); give a local --reference to have them.")
    note = f"KL (nats per response, k1) and perplexity are measured against `{ref}`."
    if served:
        note += (f" Served models ({', '.join(served)}): no KL (it needs their token log-probs); their responses "
                 f"are their text read back as GPT-2 tokens.")
    return note


def main(argv=None):
    args = parse(argv)
    try:
        run(args)
    except USER_ERRORS as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
