"""Rewards as Python functions: PPO's `--reward module:function` or
`--reward path/to/file.py:function`, in place of a reward-model checkpoint.

A reward function takes the response texts of one rollout batch and returns one number
per response: `fn(texts: list[str]) -> list[float]`. Given a parameter named `prompts`
(or **kwargs, or a second positional one), it is also given the prompt texts, in the same
order. It
is called once per iteration (and on the reward-normalisation batches); whatever it
returns is checked: the count, and that every score is a finite number.

The functions here are the project's own: `sentiment`, the independent scikit-learn
judge of the IMDB experiment as a reward. The classic recipe with a Hugging Face
`text-classification` pipeline is in examples/rewards.py.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import inspect
import os
import re
import sys
from pathlib import Path
from typing import Callable

from .config import ConfigError, resolve_input

IDENTIFIER = r"[A-Za-z_][A-Za-z0-9_]*"
SPEC = re.compile(rf"^(?:(?P<file>(?:[A-Za-z]:)?[^:]+\.py)|(?P<module>{IDENTIFIER}(?:\.{IDENTIFIER})*)):{IDENTIFIER}$")


def is_reward_spec(value: str | None) -> bool:
    """Whether `value` names a Python function (`module:function`, `path/file.py:function`,
    a Windows drive allowed) rather than a reward-model checkpoint: a dotted module name or
    a .py file, a colon, an identifier. A value that names an existing path is a checkpoint."""
    if not value or not SPEC.match(value):
        return False
    return not Path(resolve_input(value)).exists()


class RewardFunction:
    """A loaded reward function: call it with (texts, prompts); it passes the prompts only
    when the function asks for them. `name` is the spec it was loaded from, for messages."""

    def __init__(self, fn: Callable, name: str):
        self.fn, self.name = fn, name
        try:
            sig = inspect.signature(fn)
        except (TypeError, ValueError):  # a builtin without a signature: try it with the texts alone
            self.with_prompts = False
            return
        params = sig.parameters
        by_name = ("prompts" in params and params["prompts"].kind is not inspect.Parameter.POSITIONAL_ONLY
                   or any(p.kind is p.VAR_KEYWORD for p in params.values()))
        self.with_prompts, self.positional = by_name, False
        try:
            if by_name:
                sig.bind([], prompts=[])
            else:
                try:
                    sig.bind([])
                except TypeError:
                    sig.bind([], [])  # fn(texts, prompts) under other names, or positional-only
                    self.with_prompts = self.positional = True
        except TypeError as e:
            raise ConfigError(f"reward {name}: wrong signature {sig}: it must take the response texts "
                              f"(fn(texts) or fn(texts, prompts)) ({e})") from None

    def __call__(self, texts: list[str], prompts: list[str] | None = None):
        if not self.with_prompts:
            return self.fn(texts)
        prompts = prompts if prompts is not None else [""] * len(texts)
        return self.fn(texts, prompts) if self.positional else self.fn(texts, prompts=prompts)

    def __repr__(self):
        return f"RewardFunction({self.name})"


def load_reward_function(spec: str) -> RewardFunction:
    """The function `module:function` or `path/to/file.py:function` names, checked: an
    import error, a missing name, something that is not callable or takes the wrong
    arguments is a ConfigError that names the spec."""
    target, _, name = spec.rpartition(":")
    what = f"reward {spec}"
    if target.endswith(".py"):
        path = Path(resolve_input(target))
        if not path.is_file():
            raise ConfigError(f"{what}: no file {target}")
        path = path.resolve()
        # a stable name (the same in every process, so its functions pickle) and the file's
        # folder importable, as `python file.py` has it, for helpers beside it
        module_name = "gpt2rlhf_reward_" + hashlib.sha1(str(path).encode()).hexdigest()[:12]
        if str(path.parent) not in sys.path:
            sys.path.insert(0, str(path.parent))
        try:
            module_spec = importlib.util.spec_from_file_location(module_name, path)
            module = importlib.util.module_from_spec(module_spec)
            sys.modules[module_name] = module
            module_spec.loader.exec_module(module)
        except Exception as e:  # the user's file: any error in it is theirs to see, in one line
            sys.modules.pop(module_name, None)
            raise ConfigError(f"{what}: importing {path} failed: {type(e).__name__}: {one_line(e)}") from None
    else:
        if os.getcwd() not in sys.path:  # the user's own module in the working folder (as uvicorn's module:app)
            sys.path.append(os.getcwd())
        try:
            module = importlib.import_module(target)
        except Exception as e:
            raise ConfigError(f"{what}: cannot import module {target}: {type(e).__name__}: {one_line(e)}") from None
    fn = getattr(module, name, None)
    if fn is None:
        raise ConfigError(f"{what}: {target} has no {name}")
    if not callable(fn):
        raise ConfigError(f"{what}: {target}.{name} is a {type(fn).__name__}, not a function")
    return RewardFunction(fn, spec)


def one_line(error: BaseException) -> str:
    """The first line of an error's message: the command line reports every failure in one."""
    text = str(error).strip()
    return text.splitlines()[0] if text else ""


# ------------------------------------------------------------------ the project's own rewards

_judge = None


def sentiment(texts: list[str]) -> list[float]:
    """P(positive) of each text by the IMDB experiment's independent judge (TF-IDF +
    logistic regression, gpt2rlhf.evaluation.sentiment), fitted once per process on the
    labelled reviews in $GPT2RLHF_SENTIMENT_TRAIN (default: imdb_train.jsonl.gz in $IMDB_DIR,
    else ../shared/data/imdb). For experiments: a policy trained on the judge is no longer
    judged independently by it (evaluate.py then needs another judge)."""
    global _judge
    if _judge is None:
        from .data import load_records
        from .evaluation.sentiment import fit_sentiment_judge, labelled_texts

        default = Path(os.environ.get("IMDB_DIR", "../shared/data/imdb")) / "imdb_train.jsonl.gz"
        path = resolve_input(os.environ.get("GPT2RLHF_SENTIMENT_TRAIN") or str(default))
        if not Path(path).is_file():
            raise ConfigError(f"reward gpt2rlhf.rewards:sentiment: no labelled reviews at {path}; set "
                              f"GPT2RLHF_SENTIMENT_TRAIN to a JSONL file of {{text, label}} records")
        _judge = fit_sentiment_judge(*labelled_texts(load_records(path, "GPT2RLHF_SENTIMENT_TRAIN"), path))
    return _judge.positive(texts)
