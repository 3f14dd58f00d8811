"""GPT-2, written by hand, read top to bottom (after nanoGPT's model.py).

GPTConfig -> CausalSelfAttention -> MLP -> Block -> GPTBackbone -> GPT (LM head) and
GPTScalar (reward / value head). Parameter names follow Hugging Face's GPT-2
(`transformer.h.0.attn.c_attn.weight`, ...) so that import and export (hf.py) are a
rename-free copy, with the Conv1D weights transposed.

Padding: pass `attention_mask` (B, T), 1 for real tokens, 0 for padding. Position ids are
derived from it (cumsum - 1), so a left-padded sequence gets exactly the logits it gets
alone. Generation passes a KVCache, which keeps the mask of every token it has seen.
"""

from __future__ import annotations

import difflib
import math
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from .files import from_known_fields

# (n_layer, n_head, n_embd) of the four released GPT-2 sizes; the rest is shared.
PRESETS = {
    "gpt2": dict(n_layer=12, n_head=12, n_embd=768),  # 124M
    "gpt2-medium": dict(n_layer=24, n_head=16, n_embd=1024),  # 350M
    "gpt2-large": dict(n_layer=36, n_head=20, n_embd=1280),  # 774M
    "gpt2-xl": dict(n_layer=48, n_head=25, n_embd=1600),  # 1558M
}


@dataclass
class GPTConfig:
    """Architecture of a GPT-2 model. `GPTConfig.from_name("gpt2-medium")` for a preset."""

    block_size: int = 1024
    """Context length: the number of learned position embeddings."""
    vocab_size: int = 50257
    """Number of token embeddings (50257 for the GPT-2 tokenizer)."""
    n_layer: int = 12
    """Number of transformer blocks."""
    n_head: int = 12
    """Attention heads per block; must divide n_embd."""
    n_embd: int = 768
    """Width of the residual stream."""
    dropout: float = 0.0
    """Dropout on embeddings, attention weights and residual branches. RLHF wants 0."""
    bias: bool = True
    """Biases in linear layers and layer norms (GPT-2 has them)."""
    layer_norm_epsilon: float = 1e-5
    """Epsilon of every layer norm (GPT-2: 1e-5)."""
    tie_word_embeddings: bool = True
    """The LM head shares the token-embedding matrix (GPT-2 does)."""

    def __post_init__(self):
        for name in ("block_size", "vocab_size", "n_layer", "n_head", "n_embd"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"GPTConfig.{name} must be a positive integer, got {value!r}")
        if self.n_embd % self.n_head != 0:
            raise ValueError(
                f"GPTConfig.n_embd ({self.n_embd}) must be divisible by GPTConfig.n_head ({self.n_head})"
            )
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"GPTConfig.dropout must be in [0, 1), got {self.dropout!r}")

    @classmethod
    def from_name(cls, name: str, **overrides) -> "GPTConfig":
        """A released GPT-2 size by name, with optional field overrides (e.g. dropout)."""
        if name not in PRESETS:
            close = difflib.get_close_matches(name, PRESETS, n=1)
            hint = f" Did you mean '{close[0]}'?" if close else ""
            raise ValueError(f"unknown GPT-2 preset '{name}'; choose from {', '.join(PRESETS)}.{hint}")
        return cls(**{**PRESETS[name], **overrides})

    @classmethod
    def from_dict(cls, d: dict, source: str = "model config") -> "GPTConfig":
        """Build from a dict (a checkpoint's JSON), naming unknown fields instead of a TypeError."""
        return from_known_fields(cls, d, source)

    def to_dict(self) -> dict:
        return asdict(self)


class KVCache:
    """Keys and values of every layer, preallocated for `max_len` tokens, plus the padding
    mask of every cached token. Writing into a fixed buffer (no torch.cat per step) keeps
    each decode step's cost independent of how many steps came before.

    Two ways to write: by default the new tokens go at `pos` and attention reads the
    filled part only. With `index` set (a device tensor holding the slot of the one new
    token), every shape is fixed: the token is written at `index` and attention reads the
    whole buffer, unfilled slots masked out; this is what CUDA-graph decoding replays."""

    def __init__(self, config: GPTConfig, batch_size: int, max_len: int, device=None):
        if max_len > config.block_size:
            raise ValueError(
                f"a sequence of {max_len} tokens exceeds the model's context (block_size={config.block_size})"
            )
        self.n_layer, self.max_len = config.n_layer, max_len
        self.k: list[torch.Tensor | None] = [None] * config.n_layer
        self.v: list[torch.Tensor | None] = [None] * config.n_layer
        self.mask = torch.zeros(batch_size, max_len, dtype=torch.bool, device=device)
        self.pos = 0  # number of tokens already cached
        self.index: torch.Tensor | None = None  # (1,) slot of the next token, for static-shape decoding

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        """Store k, v (B, nh, T, hs) after the cached tokens; return all keys and values so far."""
        if self.k[layer] is None:  # allocated on first use, in the dtype autocast produced
            B, nh, _, hs = k.shape
            # zeros, not empty: a masked slot still enters the product with v (weight 0),
            # and 0 * NaN from uninitialised memory would be NaN
            self.k[layer] = k.new_zeros(B, nh, self.max_len, hs)
            self.v[layer] = v.new_zeros(B, nh, self.max_len, hs)
        if self.index is not None:
            self.k[layer].index_copy_(2, self.index, k)
            self.v[layer].index_copy_(2, self.index, v)
            return self.k[layer], self.v[layer]
        end = self.pos + k.size(2)
        self.k[layer][:, :, self.pos : end] = k
        self.v[layer][:, :, self.pos : end] = v
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)  # q, k, v
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.resid_dropout = nn.Dropout(config.dropout)
        self.n_head, self.n_embd, self.dropout = config.n_head, config.n_embd, config.dropout

    def forward(self, x, attn_mask=None, cache: KVCache | None = None, layer: int = 0):
        B, T, C = x.size()
        q, k, v = self.c_attn(x).split(self.n_embd, dim=2)
        hs = C // self.n_head
        q = q.view(B, T, self.n_head, hs).transpose(1, 2)  # (B, nh, T, hs)
        k = k.view(B, T, self.n_head, hs).transpose(1, 2)  # (B, nh, T, hs)
        v = v.view(B, T, self.n_head, hs).transpose(1, 2)  # (B, nh, T, hs)
        if cache is not None:
            k, v = cache.update(layer, k, v)  # (B, nh, S, hs), S = cached + T
        dropout_p = self.dropout if self.training else 0.0
        if attn_mask is None:  # plain causal attention over the whole sequence: flash kernels
            y = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=True)
        else:  # attn_mask: (B, 1, T, S) bool, True where a query may look
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # (B, T, C)
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        # GPT-2's "gelu_new" is the tanh approximation of GELU.
        return self.dropout(self.c_proj(F.gelu(self.c_fc(x), approximate="tanh")))


class Block(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon, bias=config.bias)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon, bias=config.bias)
        self.mlp = MLP(config)

    def forward(self, x, attn_mask=None, cache=None, layer=0):
        x = x + self.attn(self.ln_1(x), attn_mask, cache, layer)
        return x + self.mlp(self.ln_2(x))


def build_attn_mask(key_mask: torch.Tensor, past: int, T: int) -> torch.Tensor:
    """(B, 1, T, past+T) bool: causal, minus padded keys. Every query also sees itself, so a
    padding query never has an all-masked row (which would make SDPA return NaN)."""
    S = past + T
    q_pos = torch.arange(past, S, device=key_mask.device)[:, None]  # (T, 1)
    k_pos = torch.arange(S, device=key_mask.device)[None, :]  # (1, S)
    allowed = (k_pos <= q_pos)[None] & key_mask[:, None, :]  # (B, T, S)
    allowed |= (k_pos == q_pos)[None]
    return allowed[:, None]  # (B, 1, T, S)


def last_token_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """Index of the last real (mask 1) token of each row: T-1 with left padding, len-1 with
    right padding. (B, T) -> (B,)."""
    T = attention_mask.size(1)
    positions = torch.arange(T, device=attention_mask.device).expand_as(attention_mask)
    return torch.where(attention_mask.bool(), positions, -1).max(dim=1).values.clamp(min=0)


class GPTBackbone(nn.Module):
    """Embeddings, blocks and final layer norm: Hugging Face's GPT2Model."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        self.wpe = nn.Embedding(config.block_size, config.n_embd)
        self.drop = nn.Dropout(config.dropout)
        self.h = nn.ModuleList([Block(config) for _ in range(config.n_layer)])
        self.ln_f = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon, bias=config.bias)

    def forward(self, idx, attention_mask=None, position_ids=None, cache: KVCache | None = None):
        B, T = idx.size()
        if cache is not None and cache.index is not None:
            return self._forward_static(idx, position_ids, cache)
        past = cache.pos if cache is not None else 0
        if past + T > self.config.block_size:
            raise ValueError(f"sequence of {past + T} tokens exceeds block_size={self.config.block_size}")
        if cache is not None:  # the cache remembers which of its tokens are padding
            cache.mask[:, past : past + T] = True if attention_mask is None else attention_mask.bool()
            key_mask = cache.mask[:, : past + T]  # (B, S)
        else:
            key_mask = None if attention_mask is None else attention_mask.bool()
        if position_ids is None:
            if key_mask is None:
                position_ids = torch.arange(T, device=idx.device)[None]  # (1, T)
            else:  # count real tokens only, so padding does not shift positions
                position_ids = (key_mask.long().cumsum(-1) - 1).clamp(min=0)[:, past:]  # (B, T)
        attn_mask = None if key_mask is None else build_attn_mask(key_mask, past, T)
        x = self.drop(self.wte(idx) + self.wpe(position_ids))  # (B, T, C)
        for i, block in enumerate(self.h):
            x = block(x, attn_mask, cache, i)
        if cache is not None:
            cache.pos += T
        return self.ln_f(x)  # (B, T, C)

    def _forward_static(self, idx, position_ids, cache: KVCache):
        """One decode step with fixed shapes and no host sync, for CUDA-graph capture: the
        token goes to slot cache.index, and attention reads the whole cache, whose mask is
        False on every slot not yet written."""
        if idx.size(1) != 1 or position_ids is None:
            raise ValueError("static-shape decoding takes one token per row and explicit position_ids")
        cache.mask.index_fill_(1, cache.index, True)
        attn_mask = cache.mask[:, None, None, :]  # (B, 1, 1, max_len)
        x = self.drop(self.wte(idx) + self.wpe(position_ids))  # (B, 1, C)
        for i, block in enumerate(self.h):
            x = block(x, attn_mask, cache, i)
        return self.ln_f(x)


def _init_weights(module: nn.Module, n_layer: int):
    """GPT-2 initialisation: N(0, 0.02), residual projections scaled by 1/sqrt(2 n_layer)
    (GPT-2 paper, section 2.3)."""
    for name, p in module.named_parameters():
        if name.endswith("c_proj.weight"):
            nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * n_layer))
        elif name.endswith(".weight") and p.dim() == 2:
            nn.init.normal_(p, mean=0.0, std=0.02)
        elif name.endswith(".bias"):
            nn.init.zeros_(p)


class GPT(nn.Module):
    """GPT-2 language model: backbone plus an LM head tied to the token embeddings."""

    kind = "lm"

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        self.transformer = GPTBackbone(config)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        _init_weights(self, config.n_layer)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.transformer.wte.weight

    def forward(self, idx, attention_mask=None, position_ids=None, cache=None, last_only=False):
        """Logits (B, T, vocab), or (B, 1, vocab) at the last position when `last_only` (the
        prefill of generation, where the other positions' logits are never read)."""
        x = self.transformer(idx, attention_mask, position_ids, cache)  # (B, T, C)
        if last_only:
            x = x[:, -1:]  # left padding puts every row's last real token here
        return self.lm_head(x)

    def fp32_logits(self, x: torch.Tensor) -> torch.Tensor:
        """The LM head on hidden states x (B, T, C) in full precision, outside autocast. PPO
        scores log-probs this way: under bf16 autocast the head's logits would be rounded
        to bf16 (8 bits of mantissa) before the softmax, adding noise to the ratio and KL."""
        with torch.autocast(x.device.type, enabled=False):
            # contiguous: on a slice of positions, matmul folds (B, T) into one mm only when the
            # weight needs a gradient; a frozen head (the reference, a LoRA actor's, evaluation)
            # got a bmm over the weight broadcast to every row, slower on CPU
            return self.lm_head(x.float().contiguous())

    def untie_lm_head(self):
        """Give the LM head its own copy of the embedding matrix (needed to merge LoRA into it)."""
        if self.config.tie_word_embeddings:
            self.lm_head.weight = nn.Parameter(self.lm_head.weight.detach().clone())
            self.config.tie_word_embeddings = False

    def num_params(self, non_embedding: bool = True) -> int:
        """Parameter count; tied weights counted once, position embeddings left out by default."""
        n = sum(p.numel() for p in self.parameters())  # parameters() yields a tied weight once
        return n - self.transformer.wpe.weight.numel() if non_embedding else n

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token (forward + backward): 6N + 12 L C T (PaLM paper, appendix B)."""
        c = self.config
        return 6 * self.num_params() + 12 * c.n_layer * c.n_embd * seq_len


class GPTScalar(nn.Module):
    """GPT-2 with a scalar head: a reward model, or a critic with per-token values.

    forward() gives a value at every position (B, T); score() reads the value at the last
    real token of each row, so padding never enters a reward (the older GPT-2 RLHF code averaged over padding; TRL issues #1893, #3750)."""

    kind = "scalar"

    def __init__(self, config: GPTConfig, zero_init_head: bool = False):
        super().__init__()
        self.config = config
        self.transformer = GPTBackbone(config)
        self.score = nn.Linear(config.n_embd, 1, bias=True)
        _init_weights(self, config.n_layer)
        if zero_init_head:  # a critic that starts by predicting 0 (lm-human-preferences' value head)
            nn.init.zeros_(self.score.weight)
        else:  # lm-human-preferences' reward head: std 1/sqrt(n_embd + 1)
            nn.init.normal_(self.score.weight, std=1.0 / math.sqrt(config.n_embd + 1))

    def forward(self, idx, attention_mask=None, position_ids=None):
        x = self.transformer(idx, attention_mask, position_ids)  # (B, T, C)
        return self.score(x).squeeze(-1)  # (B, T)

    def score_last(self, idx, attention_mask=None):
        """One scalar per row, read at its last real token. (B, T) -> (B,)"""
        values = self(idx, attention_mask)  # (B, T)
        if attention_mask is None:
            return values[:, -1]
        return values.gather(1, last_token_index(attention_mask)[:, None]).squeeze(1)


MODEL_CLASSES = {"lm": GPT, "scalar": GPTScalar}


def set_dropout(model: nn.Module, p: float) -> nn.Module:
    """Set every dropout of a built model (embeddings, attention, residual) to p."""
    model.config.dropout = p
    for m in model.modules():
        if isinstance(m, nn.Dropout):
            m.p = p
        elif isinstance(m, CausalSelfAttention):
            m.dropout = p
    return model
