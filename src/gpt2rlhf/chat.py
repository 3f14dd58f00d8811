"""Multi-turn chat with a GPT-2 in the HH-RLHF transcript format the SFT preset trains on
(`\\n\\nHuman: ...\\n\\nAssistant: ...`), the conversation kept in a KV cache.

A DialoGPT-style bot feeds the whole history back for every reply; here the keys and values
of the conversation so far stay in one `KVCache` between turns, so a turn costs the forward
passes of its own tokens only (the human turn, then one per sampled token). When the history
plus the new turn plus the reply's `max_tokens` no longer fit the context, the oldest turns
are dropped and the cache is rebuilt from what is kept (the one time a turn costs more).

A reply stops at EOS, at the next "\\n\\nHuman:" (the model starting the user's next line:
never shown, never kept), or after `max_tokens`. `ChatSession.stats` counts the tokens each
turn fed through the model, which is what `/stats` prints and the tests check.
`run_terminal` is the command loop of src/chat.py.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field

import torch

from .generation import sample_rows
from .model import KVCache
from .tokenizer import EOT_TOKEN, TextStream

HUMAN = "\n\nHuman:"
ASSISTANT = "\n\nAssistant:"


def human_turn(text: str) -> str:
    """A user's message as the transcript's next turn, ending where the reply begins."""
    return f"{HUMAN} {text.strip()}{ASSISTANT}"


@dataclass
class Settings:
    temperature: float = 0.7
    top_p: float = 0.9
    max_tokens: int = 128
    top_k: int = 0


@dataclass
class TurnStats:
    prompt_tokens: int = 0  # tokens of the new human turn fed through the model
    rebuilt_tokens: int = 0  # history tokens fed again because old turns were dropped (0 on a normal turn)
    generated_tokens: int = 0  # tokens sampled for the reply
    dropped_turns: int = 0

    @property
    def processed(self) -> int:
        """Every token this turn fed through the model (a sampled token is fed to get the next)."""
        return self.prompt_tokens + self.rebuilt_tokens + self.generated_tokens


@dataclass
class ChatSession:
    """One conversation with `model`: the kept history as token ids per turn, mirrored by
    the KV cache (`cache.pos == len(history tokens)` between turns)."""

    model: torch.nn.Module
    enc: object
    settings: Settings = field(default_factory=Settings)
    seed: int = 0

    def __post_init__(self):
        self.device = next(self.model.parameters()).device
        self.generator = torch.Generator(self.device).manual_seed(self.seed)
        self.stats: list[TurnStats] = []
        self.reset()

    def reset(self):
        """Forget the conversation (the settings and the random stream go on)."""
        self.turns: list[list[int]] = []  # each kept turn: human tokens + reply tokens
        self.cache = KVCache(self.model.config, 1, self.model.config.block_size, device=self.device)

    @property
    def history(self) -> list[int]:
        return [t for turn in self.turns for t in turn]

    @property
    def transcript(self) -> str:
        return self.enc.decode(self.history)

    @torch.no_grad()
    def _feed(self, tokens: list[int]) -> torch.Tensor:
        """Run `tokens` through the model after what the cache holds; the last logits (V,)."""
        ids = torch.tensor([tokens], device=self.device)
        return self.model(ids, cache=self.cache, last_only=True)[0, -1]

    def _make_room(self, new: int, stats: TurnStats):
        """Drop the oldest turns until history + `new` tokens + the reply fit the context,
        then rebuild the cache from the kept turns (positions restart at 0)."""
        block = self.model.config.block_size
        if new + self.settings.max_tokens > block:
            raise ValueError(f"the message is {new} tokens; with max_tokens {self.settings.max_tokens} that exceeds "
                             f"the model's context ({block} tokens): shorten it or lower /max_tokens")
        if len(self.history) + new + self.settings.max_tokens <= block:
            return
        while self.turns and len(self.history) + new + self.settings.max_tokens > block:
            self.turns.pop(0)
            stats.dropped_turns += 1
        self.cache = KVCache(self.model.config, 1, block, device=self.device)
        if self.turns:
            self._feed(self.history)
            stats.rebuilt_tokens = len(self.history)

    @torch.no_grad()
    def reply(self, message: str, on_text=lambda text: None) -> str:
        """The model's reply to `message`, each piece of text passed to `on_text` as soon as
        it is safe to show; the turn is kept in the history (and the cache)."""
        stats = TurnStats()
        prompt = self.enc.encode(human_turn(message), disallowed_special=())  # '<|endoftext|>' typed is text
        self._make_room(len(prompt), stats)
        start = self.cache.pos
        logits = self._feed(prompt)
        stats.prompt_tokens = len(prompt)
        stream = TextStream(self.enc, [HUMAN], lstrip=False)
        s, generated, text = self.settings, [], []
        for _ in range(s.max_tokens):
            logits = logits[:self.enc.n_vocab]  # a vocabulary padded past the tokenizer's: never sampled
            token = int(sample_rows(logits[None], [s.temperature], [s.top_k], [s.top_p], [self.generator])[0])
            stats.generated_tokens += 1
            if token == EOT_TOKEN:
                break
            generated.append(token)
            text.append(stream.push(token))
            if text[-1]:
                on_text(text[-1])
            if stream.stopped:
                break
            if len(generated) < s.max_tokens:  # the last token is fed below, with any fix-up
                logits = self._feed([token])
        text.append(stream.flush())
        on_text(text[-1])
        reply = "".join(text)
        kept = self._kept_tokens(generated, reply)
        # The cache holds the prompt and the fed reply tokens; keep the part that agrees
        # with the kept reply (roll back over a stop string), then feed what it lacks.
        fed = self.cache.pos - start - len(prompt)
        same = next((i for i, (a, b) in enumerate(zip(generated[:fed], kept)) if a != b), min(fed, len(kept)))
        self.cache.pos = start + len(prompt) + same
        if kept[same:]:
            self._feed(kept[same:])
        self.turns.append(prompt + kept)
        self.stats.append(stats)
        return reply.strip()

    def _kept_tokens(self, generated: list[int], reply: str) -> list[int]:
        """The reply's tokens for the history: the sampled ones whose bytes are the start of
        the shown reply, then the rest of the reply's text encoded (a stop string may have
        cut a token in two)."""
        target, n = reply.encode(), 0
        while n < len(generated) and target.startswith(self.enc.decode_bytes(generated[:n + 1])):
            n += 1
        rest = target[len(self.enc.decode_bytes(generated[:n])):].decode("utf-8", errors="replace")
        return generated[:n] + (self.enc.encode(rest, disallowed_special=()) if rest else [])


HELP = """commands: /reset (forget the conversation), /temperature X, /top_p X, /max_tokens N,
/stats (tokens each turn fed through the model), /help, /quit (or Ctrl-D)"""


def command(session: ChatSession, line: str, out=None) -> bool:
    """Run one /command; False when it was /quit. A bad value is a message, not an exit."""
    out = out or sys.stdout
    name, _, value = line[1:].partition(" ")
    s, block = session.settings, session.model.config.block_size
    setters = {
        "temperature": (float, lambda v: v >= 0, "a number >= 0 (0: greedy)"),
        "top_p": (float, lambda v: 0 < v <= 1, "a number in (0, 1]"),
        "max_tokens": (int, lambda v: 1 <= v < block, f"a whole number from 1 to {block - 1}"),
    }
    if name in ("quit", "exit", "q"):
        return False
    if name == "reset":
        session.reset()
        print("(conversation forgotten)", file=out)
    elif name == "stats":
        for i, t in enumerate(session.stats, 1):
            print(f"turn {i}: processed {t.processed} tokens (prompt {t.prompt_tokens}, generated "
                  f"{t.generated_tokens}, rebuilt {t.rebuilt_tokens}, dropped turns {t.dropped_turns})", file=out)
        print(f"history: {len(session.history)} tokens in the cache (context {block})", file=out)
    elif name in setters:
        kind, ok, what = setters[name]
        try:
            v = kind(value)
            if not ok(v):
                raise ValueError
        except ValueError:
            print(f"/{name} needs {what}, got {value!r}", file=out)
            return True
        setattr(s, name, v)
        print(f"({name} = {v})", file=out)
    else:
        print(HELP, file=out)
    return True


def run_terminal(session: ChatSession, verbose: bool = False, inp=None, out=None):
    """The chat loop: read a line, stream the reply, until /quit or end of input."""
    inp, out = inp or sys.stdin, out or sys.stdout
    print(f"Chatting with a GPT-2 ({session.model.config.block_size}-token context). {HELP}", file=out)
    while True:
        print("\nYou: ", end="", file=out, flush=True)
        line = inp.readline()
        if not line:  # end of input
            print(file=out)
            return
        line = line.strip()
        if not line:
            continue
        if line.startswith("/"):
            if not command(session, line, out):
                return
            continue
        print("Assistant:", end="", file=out, flush=True)
        try:
            session.reply(line, lambda text: print(text, end="", file=out, flush=True))
        except ValueError as e:
            print(f"\n({e})", file=out)
            continue
        print(file=out)
        if verbose:
            t = session.stats[-1]
            print(f"[processed {t.processed} tokens: prompt {t.prompt_tokens}, generated {t.generated_tokens}, "
                  f"rebuilt {t.rebuilt_tokens}; cache {session.cache.pos}/{session.model.config.block_size}]",
                  file=out)
