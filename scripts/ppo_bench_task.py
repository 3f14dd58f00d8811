"""The task of scripts/bench_ppo_vs_trl.py, shared by both sides: a programmatic
sentiment reward on response texts. Plain Python (no torch, no project import), so the
TRL side, which runs in its own virtual environment, imports exactly the same function.

reward(text) = (positive words - negative words) in the response, from two short lists
of review words: a count, so a response with two positive words scores 2 (the range of
a sentiment classifier's logit, as in TRL's IMDB example)."""

from __future__ import annotations

import re

POSITIVE = frozenset("""good great best excellent wonderful amazing love loved lovely beautiful brilliant perfect
fun funny enjoy enjoyed enjoyable fantastic superb nice favorite favourite masterpiece recommend
awesome touching hilarious fine strong well""".split())
NEGATIVE = frozenset("""bad worst awful terrible boring waste poor horrible stupid dull worse
annoying lame weak mess disappointing disappointed ridiculous pointless fails failed""".split())
WORD = re.compile(r"[a-z]+")


def reward_of(text: str) -> float:
    words = WORD.findall(text.lower())
    return float(sum(w in POSITIVE for w in words) - sum(w in NEGATIVE for w in words))


def reward(texts: list[str]) -> list[float]:
    return [reward_of(t) for t in texts]
