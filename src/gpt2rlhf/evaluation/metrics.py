"""Evaluation: responses of several models on one prompt set, offline metrics, and the
LLM judge's verdicts, written up as a report (markdown, PNG, TensorBoard).

    1. prompts      a dataset file or hub name (HH-RLHF test prompts by default)
    2. responses    each model samples with the same settings and seed; cached as JSONL
    3. metrics      mean response length, distinct-1/2, mean reward-model score, KL to a
                    reference model (k1, summed over the response), perplexity of the
                    responses under the reference, share judged positive by an
                    independent sentiment classifier (sentiment.py) - no API needed
    4. judge        the first model against each other one, both orders (judge.py)
    5. report       report.md, win_rates.png, TensorBoard scalars, summary.json
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from ..files import write_atomic
from ..data import left_pad, right_pad
from ..generation import generate
from ..rl import logprobs_from_logits
from ..tokenizer import EOT_TOKEN


@dataclass
class SamplingSettings:
    max_new_tokens: int = 128
    temperature: float = 0.7
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0
    batch_size: int = 16
    min_new_tokens: int = 0


def distinct_n(responses: list[list[int]], n: int) -> float:
    """Unique n-grams / all n-grams over every response (Li et al. 2016)."""
    grams = [tuple(r[i:i + n]) for r in responses for i in range(len(r) - n + 1)]
    return len(set(grams)) / len(grams) if grams else 0.0


@torch.no_grad()
def sample_responses(model, prompts: list[list[int]], s: SamplingSettings, device) -> list[list[int]]:
    """Response token ids for every prompt, in order; a response that stopped ends in EOS."""
    g = torch.Generator(device).manual_seed(s.seed)
    out = []
    for i in range(0, len(prompts), s.batch_size):
        ids, mask = left_pad(prompts[i:i + s.batch_size])
        gen = generate(model, ids.to(device), mask.to(device), max_new_tokens=s.max_new_tokens,
                       min_new_tokens=s.min_new_tokens, temperature=s.temperature, top_k=s.top_k, top_p=s.top_p,
                       eos_token_id=EOT_TOKEN, generator=g)
        for row, m in zip(gen.tokens.tolist(), gen.mask.tolist()):
            out.append([t for t, k in zip(row, m) if k])
    return out


def model_identity(source: str) -> str:
    """What a model source resolves to, for the response cache: the checkpoint folder a run
    folder currently points at (it moves on while a run trains) and a hash of the files its
    weights are loaded from (our checkpoint.json and every <name>.safetensors, e.g. a PPO
    checkpoint's actor and critic; a Hugging Face folder's config.json and weights), so
    weights rewritten in place are sampled again. A hub name stands for itself."""
    import hashlib

    from ..checkpoint import META_FILE, latest_checkpoint
    from ..hf import hf_weight_files
    from ..runs import checkpoints_of, is_run_folder

    p = Path(source)
    if is_run_folder(p):
        p = latest_checkpoint(checkpoints_of(p)) or p
    if not p.is_dir():
        return source
    if (p / META_FILE).is_file():
        files = [p / META_FILE] + sorted(p.glob("*.safetensors"))
    else:
        files = [p / "config.json"] + hf_weight_files(p)
    digest = hashlib.sha256()
    for f in files:
        if f.is_file():
            h = hashlib.sha256()
            with open(f, "rb") as fh:
                while chunk := fh.read(1 << 24):
                    h.update(chunk)
            digest.update(f"{f.name}:{h.hexdigest()}\n".encode())
    return f"{p.resolve()}@{digest.hexdigest()}"


def cached_responses(path: Path, label: str, load_model, prompts, s: SamplingSettings, device,
                     model_id: str = "", sampler=None) -> list[list[int]]:
    """Responses from `path` if the same model (model_id) made them with the same prompts and
    settings, else sampled (loading the model only then; or by `sampler()`, a served model)
    and written there, atomically. An unreadable cache (from an older version, or damaged)
    is sampled again, saying so."""
    key = {"model": model_id, "settings": asdict(s), "prompts": prompts}
    if path.is_file():
        try:
            cached = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            print(f"note: {path} is unreadable ({e}); sampling its responses again")
            cached = {}
        if isinstance(cached, dict) and cached.get("key") == key:
            return cached["responses"]
    if sampler is not None:
        responses = sampler()
    else:
        responses = sample_responses(load_model().to(device).eval(), prompts, s, device)
    write_atomic(path, json.dumps({"label": label, "key": key, "responses": responses}))
    return responses


# ------------------------------------------------------------------ models behind an OpenAI-compatible server

SERVED = "openai:"  # -m openai:<base url>#<model name>
SERVED_KEY_ENV = "SERVED_API_KEY"  # the served models' key, if their server wants one


class ServedModelError(ValueError):
    """A served model that cannot be reached or asked; the message names it."""


def is_served(source: str | None) -> bool:
    return bool(source) and str(source).startswith(SERVED)


def parse_served(source: str) -> tuple[str, str]:
    """`openai:http://127.0.0.1:8000/v1#name` -> (base url, model name)."""
    url, _, name = source[len(SERVED):].partition("#")
    if not url.startswith(("http://", "https://")) or not name:
        raise ServedModelError(f"{source}: a served model is written openai:<base url>#<model name>, e.g. "
                               f"openai:http://127.0.0.1:8000/v1#sft")
    return url, name


def served_client(source: str, timeout: float = 600.0):
    """An openai client for the server of `source` (the key from $SERVED_API_KEY, else none)."""
    import os

    import openai

    url, _ = parse_served(source)
    return openai.OpenAI(base_url=url, api_key=os.environ.get(SERVED_KEY_ENV) or "none", max_retries=2,
                         timeout=timeout)


def check_served(source: str, option: str = "-m") -> None:
    """The server answers and has the model: found before anything is sampled."""
    import openai

    url, name = parse_served(source)
    try:
        names = [m.id for m in served_client(source, timeout=30).models.list()]
    except openai.APIError as e:
        raise ServedModelError(f"{option} {source}: the server at {url} did not list its models "
                               f"({type(e).__name__}: {str(e)[:200]}); is it running (python src/serve.py)? "
                               f"A key goes in ${SERVED_KEY_ENV}") from None
    if name not in names:
        raise ServedModelError(f"{option} {source}: the server at {url} has no model `{name}`; it has "
                               f"{', '.join(names) or 'none'}")


def served_responses(source: str, prompts: list[list[int]], s: SamplingSettings, enc) -> list[list[int]]:
    """Responses of a served model, in the form sample_responses gives (GPT-2 token ids, EOS
    last when it stopped by itself): each prompt's text sent to /v1/completions with the same
    settings, seed + the prompt's index, `batch_size` requests in flight (our server decodes
    them in one batch). top_k and min_new_tokens travel as vLLM's `top_k` / `min_tokens`
    extensions; a server that does not know them ignores them."""
    from concurrent.futures import ThreadPoolExecutor

    import openai

    client, (url, name) = served_client(source), parse_served(source)
    extra = {k: v for k, v in (("top_k", s.top_k), ("min_tokens", s.min_new_tokens)) if v}

    def one(i: int) -> list[int]:
        r = client.completions.create(model=name, prompt=enc.decode(prompts[i]), max_tokens=s.max_new_tokens,
                                      temperature=s.temperature, top_p=s.top_p, seed=s.seed + i,
                                      extra_body=extra or None)
        choice = r.choices[0]
        return enc.encode(choice.text, disallowed_special=()) + ([EOT_TOKEN] if choice.finish_reason == "stop" else [])

    try:
        with ThreadPoolExecutor(max(1, s.batch_size)) as pool:
            return list(pool.map(one, range(len(prompts))))
    except openai.APIError as e:
        raise ServedModelError(f"-m {source}: a request failed ({type(e).__name__}: {str(e)[:300]})") from None


def _batches(prompts, responses, batch_size):
    """(prompt ids, prompt width, response ids, response mask, ids, mask) per batch: prompts
    left-padded, responses right-padded after them (an empty response scores as one EOS)."""
    for i in range(0, len(prompts), batch_size):
        P, R = prompts[i:i + batch_size], [r or [EOT_TOKEN] for r in responses[i:i + batch_size]]
        q, qm = left_pad(P)
        resp, resp_mask = right_pad(R)
        yield q.size(1), resp, resp_mask, torch.cat([q, resp], 1), torch.cat([qm, resp_mask], 1)


@torch.no_grad()
def reward_scores(rm, prompts, responses, device, batch_size: int = 16) -> list[float]:
    """The reward model's score of each (prompt, response), read at its last token."""
    out = []
    for _, _, _, ids, mask in _batches(prompts, responses, batch_size):
        out += rm.score_last(ids.to(device), mask.to(device)).float().tolist()
    return out


@torch.no_grad()
def summed_logprobs(model, prompts, responses, device, batch_size: int = 16, temperature: float = 1.0,
                      min_new_tokens: int = 0):
    """(summed log pi(y|x) per response, token count per response) under `model` sampling at
    `temperature` with EOS forbidden before `min_new_tokens`, the distribution the responses
    were sampled from (scoring the unmasked logits biases the KL between models whose EOS
    logits differ): the KL estimate is the difference of two models' sums (k1), the
    perplexity exp(-sum / count) over all responses."""
    eos = EOT_TOKEN if model.config.vocab_size > EOT_TOKEN else None
    sums, counts = [], []
    for width, resp, resp_mask, ids, mask in _batches(prompts, responses, batch_size):
        hidden = model.transformer(ids.to(device), attention_mask=mask.to(device))[:, width - 1:-1]
        lp = logprobs_from_logits(model.fp32_logits(hidden), resp.to(device), temperature, eos, min_new_tokens)
        sums += (lp * resp_mask.to(device)).sum(1).tolist()
        counts += resp_mask.sum(1).tolist()
    return sums, counts


def sample_table(prompts: list[str], texts: dict[str, list[str]], notes: dict[str, list[str]] | None = None,
                 n: int = 8) -> list[str]:
    """Markdown rows: the first n prompts, each model's response (with a note such as its
    sentiment score) side by side."""
    def cell(t: str) -> str:
        return " ".join(t.split()).replace("|", "\\|") or "(empty)"
    names = list(texts)
    lines = ["| prompt | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
    for i in range(min(n, len(prompts))):
        row = [cell(prompts[i])] + [cell(texts[m][i]) + (f" ({notes[m][i]})" if notes and m in notes else "")
                                    for m in names]
        lines.append("| " + " | ".join(row) + " |")
    return lines



def bar_chart(path: Path, comparisons: dict[str, dict]):
    """Stacked win / tie / loss bars, one per comparison."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 0.9 + 0.6 * len(comparisons)))
    for y, (name, c) in enumerate(comparisons.items()):
        n = max(1, c["win"] + c["tie"] + c["loss"])
        left = 0.0
        for part, color in (("win", "#2e7d32"), ("tie", "#9e9e9e"), ("loss", "#c62828")):
            ax.barh(y, c[part] / n, left=left, color=color, label=part if y == 0 else None)
            left += c[part] / n
        ax.text(1.01, y, f"{c['win_rate']:.0%} [{c['ci_low']:.0%}, {c['ci_high']:.0%}]", va="center")
    ax.set_yticks(range(len(comparisons)), list(comparisons))
    ax.set_xlim(0, 1)
    ax.set_xlabel("share of judged prompts (both orders agreeing; disagreement = tie)")
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
