"""Reward functions for PPO's --reward, in place of a reward-model checkpoint:

    python training/train_ppo.py --config ../configs/imdb/ppo.yaml -a ../runs/sft_imdb_<time> \
        -c ../runs/sft_imdb_<time> --critic_new_head true --reward ../examples/rewards.py:hf_sentiment

Each takes the response texts of a rollout batch (and, if it has a `prompts` parameter,
the prompt texts) and returns one finite number per response.
"""

from __future__ import annotations

import os
import re

_pipeline = None


def hf_sentiment(texts: list[str]) -> list[float]:
    """The classic recipe (TRL's gpt2-sentiment notebook): a Hugging Face
    `text-classification` pipeline over the responses, the raw logit of its POSITIVE label
    as the reward (function_to_apply="none": a logit, not a probability, so the reward keeps
    growing with confidence instead of saturating at 1). The model comes from
    $HF_SENTIMENT_MODEL: a local folder (air-gapped), or a hub name such as
    lvwerra/distilbert-imdb where the hub can be reached. Needs `pip install transformers`."""
    global _pipeline
    if _pipeline is None:
        from transformers import pipeline

        _pipeline = pipeline("text-classification", model=os.environ.get("HF_SENTIMENT_MODEL", "lvwerra/distilbert-imdb"),
                             device=0 if os.environ.get("HF_SENTIMENT_DEVICE") == "cuda" else -1)
    outputs = _pipeline(list(texts), top_k=None, function_to_apply="none", batch_size=16, truncation=True)
    return [next(o["score"] for o in out if o["label"].upper() in ("POSITIVE", "LABEL_1")) for out in outputs]


EXCLAMATION = re.compile(r"!")


def exclamations(texts: list[str]) -> list[float]:
    """A regex reward: the number of exclamation marks (a toy target that PPO learns fast)."""
    return [float(len(EXCLAMATION.findall(t))) for t in texts]


def length_target(texts: list[str], prompts: list[str], words: int = 20) -> list[float]:
    """A length target: 0 at exactly `words` words, down by 1 per `words` words away.
    It also receives the prompts (unused here): a reward can depend on them."""
    return [-abs(len(t.split()) - words) / words for t in texts]
