"""Data: records from the hub or local files (through `datasets`), turned into token
examples for SFT, reward pairs and PPO prompts, with an explicit truncation policy.

Formats (data.format, or guessed from the first record's fields):
  text         {"text": ...}                              a plain document
  labelled     {"text": ..., "label": 0|1}                 e.g. IMDB; pairs come from the labels
  hh           {"chosen": ..., "rejected": ...}            Anthropic HH-RLHF transcripts, split
                                                           into prompt and response at the last
                                                           "\\n\\nAssistant:"
  instruction  {"instruction": ..., "input": ..., "output": ...}

Truncation keeps the end of a prompt (the question nearest the answer) and the start of a
response: the prompt keeps what the response leaves of max_length, and at least
max_prompt_length tokens; the response keeps its first tokens. A response that had to be
cut loses its EOS. A reward pair's two sides share one prompt, cut once, to what the longer
response leaves, so they differ only in their responses. Every truncated, empty or unusable
record is counted and reported; nothing is dropped silently, and a dataset left with no
example is an error.

A bad record is named by where it is in its source, whatever shuffling or splitting came
after: `load_records` gives every record a hidden column, ORIGIN ("train.jsonl:7": a JSON
line's 1-based line number; "train.json[3]": the index in a JSON array; "reviews.csv:5": the
line a CSV row starts on, the header being line 1; "t.txt:2"; "data.parquet row 3" and
"owner/name train row 3": 0-based row indices as loaded, before any shuffle). Nothing reads
it but the error messages (`_where`): the examples are built from the named fields only.
"""

from __future__ import annotations

import csv
import glob
import gzip
import json
import random
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .config import ConfigError, DataArgs, resolve_input
from .tokenizer import EOT_TOKEN

ASSISTANT = "\n\nAssistant:"
LOCAL_EXTENSIONS = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv", ".txt": "text"}
FORMAT_FIELDS = {"hh": ("chosen", "rejected"), "instruction": ("instruction", "output")}
ORIGIN = "__origin__"  # hidden column: where each record is in its source (see the module docstring)


class DataError(ValueError):
    """Bad data; the message names the file, line or field."""


# ------------------------------------------------------------------ loading records

def _extension(path: Path) -> str | None:
    suffixes = [s for s in path.suffixes if s != ".gz"]
    return suffixes[-1] if suffixes else None


def local_files(source: str, key: str) -> list[Path] | None:
    """The files a data source names, or None when it is a hub name."""
    files = []
    for part in [p.strip() for p in source.split(",") if p.strip()]:
        resolved = resolve_input(part)
        if any(c in part for c in "*?["):
            matches = sorted(glob.glob(resolved))
            if not matches:
                raise DataError(f"{key}: no file matches '{part}'")
            files += [Path(m) for m in matches]
        elif Path(resolved).exists():
            files.append(Path(resolved))
        elif _extension(Path(part)) in LOCAL_EXTENSIONS or part.startswith((".", "/", "~")):
            raise DataError(f"{key}: file not found: {part}")
        else:
            return None  # "owner/name": a hub dataset
    for f in files:
        if f.is_dir() or _extension(f) not in LOCAL_EXTENSIONS:
            raise DataError(f"{key}: {f}: expected a .json, .jsonl, .jsonl.gz, .parquet, .csv or .txt file")
    return files


def _open_text(path: Path):
    opener = gzip.open if path.suffix == ".gz" else open
    return opener(path, "rt", encoding="utf-8", newline="" if _extension(path) == ".csv" else None)


def check_json_lines(path: Path) -> list[str]:
    """Parse a JSON-lines file line by line, so that a malformed record is reported by file
    and line before `datasets` sees it (its own error names neither). Returns where each
    record is ("path:line", 1-based, blank lines skipped as `datasets` skips them; a JSON
    array: "path[index]")."""
    with _open_text(path) as f:
        try:
            first = f.read(1)
            f.seek(0)
            if first == "[":  # a JSON array (.json), not lines
                return [f"{path}[{k}]" for k in range(len(json.load(f)))]
            where = []
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as e:
                    raise DataError(f"{path}:{lineno}: malformed JSON ({e.msg} at column {e.colno})") from None
                if not isinstance(record, dict):
                    raise DataError(f"{path}:{lineno}: expected a JSON object, found {type(record).__name__}")
                where.append(f"{path}:{lineno}")
            return where
        except json.JSONDecodeError as e:
            raise DataError(f"{path}: malformed JSON ({e.msg} at line {e.lineno})") from None
        except (UnicodeDecodeError, OSError, EOFError) as e:
            raise DataError(f"{path}: cannot be read as {'gzip ' if path.suffix == '.gz' else ''}UTF-8 text ({e})") from None


def record_origins(files: list[Path], builder: str, json_origins: list[str] | None = None) -> list[str] | None:
    """Where each record `datasets` reads from `files` is, in its order (the files in turn);
    None when a file cannot be counted here (the messages then fall back to record indices)."""
    if builder == "json":
        return json_origins
    out: list[str] = []
    try:
        for path in files:
            if builder == "parquet":
                import pyarrow.parquet as pq

                out += [f"{path} row {k}" for k in range(pq.ParquetFile(path).metadata.num_rows)]
                continue
            with _open_text(path) as f:
                if builder == "text":  # every line is a record, empty ones too
                    out += [f"{path}:{lineno}" for lineno, _ in enumerate(f, 1)]
                else:  # csv: a row's first line (a quoted field may span lines); blank lines are skipped
                    reader, after, header = csv.reader(f), 0, True
                    for row in reader:
                        start, after = after + 1, reader.line_num
                        if row and not header:
                            out.append(f"{path}:{start}")
                        header = header and not row
    except (OSError, UnicodeDecodeError, EOFError, csv.Error, ValueError):
        return None
    return out


def load_records(source: str, key: str, split: str = "train", subset: str | None = None):
    """A `datasets.Dataset` of records from local files or a hub dataset."""
    import datasets

    files = local_files(source, key)
    if files is None:
        try:
            ds = datasets.load_dataset(source, data_dir=subset, split=split)
        except Exception as e:
            raise DataError(
                f"{key}: could not load the hub dataset '{source}' ({type(e).__name__}: {str(e)[:200]}). "
                f"With no network, pass local files instead, e.g. --{key} path/to/train.jsonl.gz"
            ) from None
        where = f"{source}{f'/{subset}' if subset else ''} {split} row"
        return with_origins(ds, [f"{where} {k}" for k in range(len(ds))])
    builders = {LOCAL_EXTENSIONS[_extension(f)] for f in files}
    if len(builders) > 1:
        raise DataError(f"{key}: mixed file types {sorted(builders)}; give files of one type")
    builder = builders.pop()
    json_origins = None
    if builder == "json":
        json_origins = [w for f in files for w in check_json_lines(f)]
        if not json_origins:
            raise DataError(f"{key}: {', '.join(map(str, files))} holds no records")
    try:
        ds = datasets.load_dataset(builder, data_files=[str(f) for f in files], split="train")
    except Exception as e:
        raise DataError(f"{key}: could not read {', '.join(map(str, files))} ({type(e).__name__}: {e})") from None
    if len(ds) == 0:
        raise DataError(f"{key}: {', '.join(map(str, files))} holds no records")
    return with_origins(ds, record_origins(files, builder, json_origins))


def with_origins(ds, origins: list[str] | None):
    """`ds` with the hidden ORIGIN column, when there is one location per record."""
    if origins is None or len(origins) != len(ds) or ORIGIN in ds.column_names:
        return ds
    return ds.add_column(ORIGIN, origins)


def detect_format(columns: list[str], key: str) -> str:
    cols = set(columns) - {ORIGIN}
    if {"chosen", "rejected"} <= cols:
        return "hh"
    if {"instruction", "output"} <= cols:
        return "instruction"
    if {"text", "label"} <= cols:
        return "labelled"
    if "text" in cols:
        return "text"
    raise DataError(f"{key}: cannot tell the format from the fields {sorted(cols)}; set data.format "
                    f"(text needs 'text', labelled 'text'+'label', hh 'chosen'+'rejected', "
                    f"instruction 'instruction'+'output')")


# ------------------------------------------------------------------ records -> text

@dataclass
class Stats:
    """What happened to the records of one dataset: reported, never silent."""

    name: str
    records: int = 0
    examples: int = 0
    empty: int = 0
    truncated: int = 0
    overlong: int = 0  # over twice max_length: truncation kept less than half
    unusable: dict = field(default_factory=dict)

    def skip(self, reason: str):
        self.unusable[reason] = self.unusable.get(reason, 0) + 1

    def report(self) -> str:
        parts = [f"{self.name}: {self.records} records -> {self.examples} examples",
                 f"{self.truncated} truncated ({self.overlong} to under half their length)",
                 f"{self.empty} empty (dropped)"]
        parts += [f"{n} {reason} (dropped)" for reason, n in self.unusable.items()]
        return ", ".join(parts)


def _where(record: dict, where: str) -> str:
    """Where a record is, for a message: "<name> record <i>" (its index in the dataset as it
    is now, perhaps shuffled) becomes "<name>: <file>:<line>" when the record knows its origin."""
    origin = record.get(ORIGIN) if isinstance(record, dict) else None
    if not origin or origin in where:
        return where
    return f"{where.rsplit(' record ', 1)[0]}: {origin}"


def text_field_of(record: dict, name: str, where: str) -> str:
    where = _where(record, where)
    if name not in record or record[name] is None:
        raise DataError(f"{where}: field '{name}' is missing")
    value = record[name]
    if not isinstance(value, str):
        raise DataError(f"{where}: field '{name}' should be text, found {type(value).__name__} ({str(value)[:40]!r})")
    return value


def label_of(record: dict, name: str, where: str) -> int:
    """A 0/1 label (1 = positive), or an error naming the record and field."""
    label = record.get(name)
    if label not in (0, 1, True, False):
        where = _where(record, where)
        raise DataError(f"{where}: field '{name}' should be 0 or 1, found {label!r}")
    return int(label)


def clean(text: str, args: DataArgs) -> str:
    return text.replace("<br />", "\n").replace("<br/>", "\n") if args.strip_html else text


def split_hh(transcript: str) -> tuple[str, str] | None:
    """HH-RLHF transcript -> (prompt ending in "\\n\\nAssistant:", the last response)."""
    i = transcript.rfind(ASSISTANT)
    if i < 0:
        return None
    return transcript[: i + len(ASSISTANT)], transcript[i + len(ASSISTANT):]


def prompt_response(record: dict, fmt: str, args: DataArgs, where: str) -> tuple[str, str] | None:
    """(prompt, response) of one record for SFT; None when it has no usable transcript."""
    if fmt in ("text", "labelled"):
        return "", clean(text_field_of(record, args.text_field, where), args)
    if fmt == "hh":
        return split_hh(text_field_of(record, "chosen", where))
    if fmt == "instruction":
        extra = record.get("input") or ""
        prompt = f"\n\nHuman: {text_field_of(record, 'instruction', where)}" + (f"\n\n{extra}" if extra else "") + ASSISTANT
        return prompt, " " + text_field_of(record, "output", where).lstrip()
    raise AssertionError(fmt)


def truncate(prompt: list[int], response: list[int], max_length: int, max_prompt_length: int):
    """(prompt, response, truncated): keep the end of the prompt, the start of the response."""
    if len(prompt) + len(response) <= max_length:
        return prompt, response, False
    keep_prompt = min(len(prompt), max(max_prompt_length, max_length - len(response)))
    keep_response = max_length - keep_prompt
    return prompt[len(prompt) - keep_prompt:], response[:keep_response], True


def encode_pairs(enc, items: list[tuple[str, str]], args: DataArgs, stats: Stats, truncate_long: bool = True):
    """[(prompt ids, response ids + EOS, truncated?, over twice max_length?)] cut to
    max_length, or None where a
    response is empty (counted). Tokenised in batches (tiktoken's threads)."""
    keep = [i for i, (_, r) in enumerate(items) if r.strip()]
    stats.empty += len(items) - len(keep)
    prompts = enc.encode_ordinary_batch([items[i][0] for i in keep])
    responses = enc.encode_ordinary_batch([items[i][1] for i in keep])
    out: list = [None] * len(items)
    for i, p, r in zip(keep, prompts, responses):
        r = r + [EOT_TOKEN]
        overlong = len(p) + len(r) > 2 * args.max_length
        out[i] = (*truncate(p, r, args.max_length, args.max_prompt_length), overlong) if truncate_long \
            else (p, r, False, False)
    return out


def encode_reward_pairs(enc, pairs: list[tuple[str, str, str]], args: DataArgs, stats: Stats):
    """[(prompt ids, chosen ids + EOS, rejected ids + EOS, truncated?, over twice max_length?)]
    cut to max_length, or None where a response is empty (each empty side counted). The
    prompt is tokenised and cut once, to what the longer response leaves (truncate's
    policy), so the reward model compares two responses to the same prompt tokens; each
    response then keeps its start up to what remains."""
    keep = [i for i, (_, c, r) in enumerate(pairs) if c.strip() and r.strip()]
    stats.empty += sum(not c.strip() for _, c, _ in pairs) + sum(not r.strip() for _, _, r in pairs)
    prompts = enc.encode_ordinary_batch([pairs[i][0] for i in keep])
    chosen = enc.encode_ordinary_batch([pairs[i][1] for i in keep])
    rejected = enc.encode_ordinary_batch([pairs[i][2] for i in keep])
    out: list = [None] * len(pairs)
    for i, p, c, r in zip(keep, prompts, chosen, rejected):
        c, r = c + [EOT_TOKEN], r + [EOT_TOKEN]
        longer = c if len(c) >= len(r) else r
        overlong = len(p) + len(longer) > 2 * args.max_length
        p, _, cut = truncate(p, longer, args.max_length, args.max_prompt_length)
        room = args.max_length - len(p)
        out[i] = (p, c[:room], r[:room], cut, overlong)
    return out


def _records(ds, limit, seed):
    """All records, or `limit` of them, a seeded random subset (files are often sorted by label)."""
    if limit is None or limit >= len(ds):
        return ds
    return ds.shuffle(seed=seed).select(range(limit)).flatten_indices()


# ------------------------------------------------------------------ SFT

def sft_examples(ds, args: DataArgs, enc, name: str) -> tuple[list[dict], Stats]:
    """Examples {"input_ids", "loss_mask"}: loss on response tokens (and EOS) only, or on
    every token with loss_on=all. With packing, whole examples are concatenated and cut
    into rows of max_length (nothing truncated away); otherwise each is truncated."""
    fmt = args.format if args.format != "auto" else detect_format(ds.column_names, name)
    stats = Stats(name, records=len(ds))
    items = []
    for i, record in enumerate(ds):
        pr = prompt_response(record, fmt, args, f"{name} record {i}")
        if pr is None:
            stats.skip(f"without '{ASSISTANT.strip()}'")
        else:
            items.append(pr)
    examples = []
    for ids in encode_pairs(enc, items, args, stats, truncate_long=not args.packing):
        if ids is None:
            continue
        p, r, cut, overlong = ids
        stats.truncated += cut
        stats.overlong += overlong
        mask = ([1] * len(p) if args.loss_on == "all" else [0] * len(p)) + [1] * len(r)
        examples.append({"input_ids": p + r, "loss_mask": mask})
    stats.examples = len(examples)
    if args.packing and examples:
        examples = pack(examples, args.max_length)
    _require(examples, stats, args)
    return examples, stats


def pack(examples: list[dict], length: int) -> list[dict]:
    """Concatenate examples into rows of exactly `length` tokens (the last row may be
    shorter). Each example ends in EOS, which separates it from the next."""
    ids = [t for e in examples for t in e["input_ids"]]
    mask = [m for e in examples for m in e["loss_mask"]]
    return [{"input_ids": ids[i:i + length], "loss_mask": mask[i:i + length]} for i in range(0, len(ids), length)]


def _require(examples, stats: Stats, args: DataArgs):
    """No example left, or every one over-long: stop before training, saying why."""
    if not examples:
        raise DataError(f"{stats.report()}: no usable example is left")
    if stats.overlong == stats.examples and not args.openings_only:
        # truncation is a policy; losing over half of every example is a mistake unless meant
        raise DataError(f"{stats.report()}: every example is over twice data.max_length={args.max_length}; "
                        f"raise data.max_length" + (" or set data.packing true" if "chosen" not in examples[0] else "")
                        + " (or set data.openings_only true if training on the beginnings is intended)")


def collate_sft(batch: list[dict]) -> dict:
    """Right-padded (B, T) input_ids, attention_mask and loss_mask."""
    ids, attn = right_pad([e["input_ids"] for e in batch])
    loss, _ = right_pad([e["loss_mask"] for e in batch], pad=0)
    return {"input_ids": ids, "attention_mask": attn, "loss_mask": loss}


# ------------------------------------------------------------------ reward pairs

def pair_examples(ds, args: DataArgs, enc, name: str, seed: int = 0) -> tuple[list[dict], Stats]:
    """Examples {"chosen", "rejected"} (token ids, prompt included) and "prompt_len" (the
    prompt tokens both start with; 0 for labelled text), from HH-style records or, for
    labelled text, from (positive, negative) records paired at random."""
    fmt = args.format if args.format != "auto" else detect_format(ds.column_names, name)
    stats = Stats(name, records=len(ds))
    pairs: list[tuple[str, str, str]] = []
    if fmt == "hh":
        for i, record in enumerate(ds):
            where = f"{name} record {i}"
            c, r = split_hh(text_field_of(record, "chosen", where)), split_hh(text_field_of(record, "rejected", where))
            if c is None or r is None:
                stats.skip(f"without '{ASSISTANT.strip()}'")
            elif c[0] != r[0]:
                stats.skip("with different prompts for chosen and rejected")
            else:
                pairs.append((c[0], c[1], r[1]))
    elif fmt == "labelled":
        pos, neg = [], []
        for i, record in enumerate(ds):
            where = f"{name} record {i}"
            (pos if label_of(record, args.label_field, where) else neg).append(
                clean(text_field_of(record, args.text_field, where), args))
        rng = random.Random(seed)
        rng.shuffle(pos), rng.shuffle(neg)
        n = min(len(pos), len(neg))
        if len(pos) != len(neg):
            side = "positive" if len(pos) > n else "negative"
            stats.unusable[f"{side} records without a partner"] = abs(len(pos) - len(neg))
        pairs = [("", pos[i], neg[i]) for i in range(n)]
    else:
        raise DataError(f"{name}: reward pairs need the hh (chosen/rejected) or labelled (text/label) format, not {fmt}")
    examples = []
    for ids in encode_reward_pairs(enc, pairs, args, stats):
        if ids is None:
            continue
        p, c, r, cut, overlong = ids
        stats.truncated += cut
        stats.overlong += overlong
        if c == r:  # truncation cut away all that told them apart
            stats.skip("pairs identical after truncation")
            continue
        examples.append({"chosen": p + c, "rejected": p + r, "prompt_len": len(p)})
    stats.examples = len(examples)
    _require(examples, stats, args)
    return examples, stats


def collate_pairs(batch: list[dict]) -> dict:
    """Chosen rows then rejected rows in one right-padded (2B, T) batch: one forward pass
    scores both; the reward is read at each row's last real token."""
    ids, attn = right_pad([e["chosen"] for e in batch] + [e["rejected"] for e in batch])
    return {"input_ids": ids, "attention_mask": attn}


def collate_dpo(batch: list[dict]) -> dict:
    """collate_pairs' batch (chosen rows, then rejected rows) and a loss_mask that is 1 on
    each row's response tokens: after its prompt_len prompt tokens, before the padding.

    Labelled pairs (IMDB) have no shared prompt: two different reviews, each one whole
    response, so every token of the text is its response except the first, which nothing
    predicts (there is no BOS token; adding one would give DPO other inputs than the
    reward model reads). Position 0 is never in the mask for that reason."""
    out = collate_pairs(batch)
    prompt = torch.tensor([e.get("prompt_len", 0) for e in batch] * 2)  # (2B,)
    cols = torch.arange(out["input_ids"].size(1))
    out["loss_mask"] = out["attention_mask"] * (cols[None] >= prompt.clamp(min=1)[:, None])
    return out


# ------------------------------------------------------------------ PPO prompts

def prompt_examples(ds, args: DataArgs, min_tokens: int, max_tokens: int, enc, name: str,
                    seed: int = 0) -> tuple[list[list[int]], Stats]:
    """Prompt token ids for rollouts. HH-style records: the transcript up to its last
    "\n\nAssistant:". Text records: the first k tokens, k drawn in [min_tokens, max_tokens]
    (the sentiment task's "start of a review"), or the whole text when min_tokens is 0.
    A prompt longer than max_tokens keeps its end, and is counted."""
    fmt = args.format if args.format != "auto" else detect_format(ds.column_names, name)
    stats = Stats(name, records=len(ds))
    texts = []
    for i, record in enumerate(ds):
        where = f"{name} record {i}"
        if fmt == "hh":
            pr = split_hh(text_field_of(record, "chosen", where))
            if pr is None:
                stats.skip(f"without '{ASSISTANT.strip()}'")
                continue
            texts.append(pr[0])
        elif fmt == "instruction":
            texts.append(prompt_response(record, fmt, args, where)[0])
        else:
            texts.append(clean(text_field_of(record, args.text_field, where), args))
    rng = random.Random(seed)
    prompts = []
    for ids in enc.encode_ordinary_batch(texts):
        if fmt in ("text", "labelled") and min_tokens > 0:
            ids = ids[: rng.randint(min_tokens, max_tokens)]
        if not ids:
            stats.empty += 1
            continue
        if len(ids) > max_tokens:
            ids = ids[-max_tokens:]
            stats.truncated += 1
        prompts.append(ids)
    stats.examples = len(prompts)
    if not prompts:
        raise DataError(f"{stats.report()}: no usable prompt is left")
    return prompts, stats


def pad_rows(rows: list[list[int]], pad: int = EOT_TOKEN, left: bool = False,
             width: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, T) ids and attention mask of rows of token ids: right-padded (every row starts at
    the first column), or left-padded (every row ends at the last column: prompts to sample
    from). T is the longest row, or `width` if that is more."""
    T = max([len(r) for r in rows] + [width or 0])
    ids = torch.full((len(rows), T), pad, dtype=torch.long)
    mask = torch.zeros(len(rows), T, dtype=torch.long)
    for i, r in enumerate(rows):
        if r:
            cols = slice(T - len(r), T) if left else slice(0, len(r))
            ids[i, cols] = torch.tensor(r)
            mask[i, cols] = 1
    return ids, mask


def left_pad(rows: list[list[int]], pad: int = EOT_TOKEN, width: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    return pad_rows(rows, pad, left=True, width=width)


def right_pad(rows: list[list[int]], pad: int = EOT_TOKEN) -> tuple[torch.Tensor, torch.Tensor]:
    return pad_rows(rows, pad)


# ------------------------------------------------------------------ the stages' datasets

def train_eval_records(args: DataArgs, seed: int):
    """(train records, eval records) as the config says: a separate eval source, or a
    held-out slice of train (a seeded shuffle, so it is the same slice on resume)."""
    if not args.train:
        raise ConfigError("data.train is not set: give a hub dataset name or local files")
    train = load_records(args.train, "data.train", args.train_split, args.hub_subset)
    if args.eval:
        evals = load_records(args.eval, "data.eval", args.eval_split, args.hub_subset)
    else:
        if len(train) <= args.eval_size:
            raise DataError(f"data.train has {len(train)} records, not more than data.eval_size={args.eval_size}; "
                            f"lower data.eval_size or give data.eval")
        split = train.train_test_split(test_size=args.eval_size, seed=seed, shuffle=True)
        train, evals = split["train"], split["test"]
    return _records(train, args.max_examples, seed), _records(evals, args.max_eval_examples, seed)


class BatchStream:
    """Which examples each step reads: epoch e is a permutation seeded by (seed, e), and
    step s reads samples s*B ... s*B+B-1 of the endless stream of epochs. A function of
    the step alone, so a resumed run reads exactly what the uninterrupted run would."""

    def __init__(self, n: int, batch_size: int, seed: int):
        self.n, self.batch_size, self.seed = n, batch_size, seed
        self._epoch, self._perm = -1, None

    def _permutation(self, epoch: int):
        if epoch != self._epoch:
            g = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
            self._epoch, self._perm = epoch, torch.randperm(self.n, generator=g).tolist()
        return self._perm

    def indices(self, step: int) -> list[int]:
        start = step * self.batch_size
        return [self._permutation(i // self.n)[i % self.n] for i in range(start, start + self.batch_size)]

    def position(self, step: int) -> dict:
        consumed = step * self.batch_size
        return {"samples": consumed, "epoch": consumed // self.n, "offset": consumed % self.n}
