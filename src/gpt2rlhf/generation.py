"""Batched sampling with a KV cache.

Prompts come left-padded (B, T) with their attention mask, so every row's next token is
predicted at the same column. One prefill pass fills the cache, then one token per step.
A row that has emitted EOS is finished: its later slots hold `pad_token_id`, mask 0,
logprob 0. The loop stops as soon as every row is finished.

The logprob returned for each token is log softmax(logits / temperature), before top-k /
top-p filtering: the same quantity PPO recomputes under the policy (lm-human-preferences: logits / temperature).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from .model import KVCache


@dataclass
class Generation:
    tokens: torch.Tensor  # (B, N) new tokens; pad after a row's EOS
    mask: torch.Tensor  # (B, N) 1 for generated tokens up to and including EOS
    logprobs: torch.Tensor  # (B, N) log-probability of each token; 0 where mask is 0


def filter_logits(logits: torch.Tensor, top_k: int = 0, top_p: float | torch.Tensor = 1.0) -> torch.Tensor:
    """Set to -inf every logit outside the top k, then outside the smallest set whose
    probability reaches top_p (nucleus sampling, Holtzman et al. 2019). (B, V) -> (B, V).
    top_p may be a (B, 1) tensor, one value per row (the server's batch)."""
    if top_k and top_k < logits.size(-1):
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if torch.is_tensor(top_p) or top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        drop = cum - sorted_logits.softmax(-1) >= top_p  # the mass before this token already reaches top_p
        logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    return logits


def sample(probs: torch.Tensor, generator: torch.Generator | None = None,
           rows: tuple[int, int] | None = None) -> torch.Tensor:
    """One token per row of (B, V) probabilities, by inverse-CDF sampling: a uniform draw
    located in the running sum. torch.multinomial draws V exponentials per row instead,
    which was 60% of a tiny model's generation time on CPU (scripts/bench_model.py).
    `rows` (first, total): these B rows are rows first..first+B-1 of a batch of `total`
    split across processes; each process draws the whole batch's uniforms and keeps its
    own, so N processes sample what one process does from the same random state."""
    cdf = probs.cumsum(dim=-1)  # (B, V)
    first, total = rows if rows is not None else (0, probs.size(0))
    u = torch.rand(total, 1, device=probs.device, generator=generator)[first:first + probs.size(0)] * cdf[:, -1:]
    # first index whose cdf exceeds u: a token of probability 0 is never picked
    return torch.searchsorted(cdf, u, right=True).squeeze(1).clamp_(max=probs.size(-1) - 1)


class GraphDecoder:
    """One decode step captured once as a CUDA graph and replayed for every token.

    A GPT-2 decode step is a few hundred small kernels: on a GPU their launch cost, not
    the arithmetic, bounds decoding (OpenRLHF: generation is 80% of PPO's time). Replaying
    a captured graph launches them all at once. The step runs with fixed shapes
    (KVCache.index, GPTBackbone._forward_static); inputs and outputs are static buffers."""

    def __init__(self, model, cache: KVCache, positions: torch.Tensor):
        B, device = positions.size(0), positions.device
        self.cache = cache
        self.token = torch.zeros(B, 1, dtype=torch.long, device=device)
        self.positions = positions.clone()  # (B, 1) position id of the next token of each row
        cache.index = torch.full((1,), cache.pos, dtype=torch.long, device=device)
        self.model, self.graph = model, None
        if device.type != "cuda":  # the same fixed-shape step, run eagerly (tests it on CPU)
            return
        # Warm-up and capture write into slot cache.pos, which the first real step overwrites.
        stream = torch.cuda.Stream(device)
        stream.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(stream):
            model(self.token, position_ids=self.positions, cache=cache)
        torch.cuda.current_stream(device).wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.logits = model(self.token, position_ids=self.positions, cache=cache)[:, -1]  # (B, V)

    def step(self, token: torch.Tensor) -> torch.Tensor:
        """Logits after `token` (B, 1); valid until the next step."""
        self.token.copy_(token)
        if self.graph is None:
            self.logits = self.model(self.token, position_ids=self.positions, cache=self.cache)[:, -1]
        else:
            self.graph.replay()
        self.cache.index += 1
        self.positions += 1
        return self.logits


@torch.no_grad()
def generate(
    model,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    *,
    max_new_tokens: int,
    min_new_tokens: int = 0,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    eos_token_id: int | None = 50256,
    pad_token_id: int | None = None,
    generator: torch.Generator | None = None,
    cuda_graph: bool | None = None,
    all_finished: Callable[[torch.Tensor], bool] | None = None,
    rows: tuple[int, int] | None = None,
) -> Generation:
    """Sample up to `max_new_tokens` for each row of a left-padded batch.

    temperature 0 is greedy decoding. EOS cannot be sampled before `min_new_tokens`.
    The model's train/eval mode is left as the caller set it (RLHF wants eval: no dropout).
    `cuda_graph` (default: on for CUDA tensors) replays decode steps as a CUDA graph; on
    CPU it runs the same fixed-shape step without capture.
    `all_finished(finished)` says when to stop early, given this batch's finished rows
    (default: when they are all finished). Processes that decode in lockstep pass one
    that asks every process (distributed.World.all): a process whose rows all ended keeps
    stepping, padding, until every process is done, so each runs the same number of
    forward passes (a sharded model gathers its weights in every one: a process that
    stopped early would leave the others waiting in that collective) and every process's
    responses have the same width. `rows` (first, total): this batch's place in a batch
    split across processes (see sample()).
    """
    if max_new_tokens < 1 or min_new_tokens < 0 or min_new_tokens > max_new_tokens:
        raise ValueError(f"need 0 <= min_new_tokens ({min_new_tokens}) <= max_new_tokens ({max_new_tokens}), max >= 1")
    if temperature < 0 or not 0.0 < top_p <= 1.0 or top_k < 0:
        raise ValueError(f"bad sampling settings: temperature={temperature}, top_k={top_k}, top_p={top_p}")
    B, T = input_ids.shape
    device = input_ids.device
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    if (attention_mask[:, -1] == 0).any():
        raise ValueError("generate() needs left-padded prompts: some row ends with padding")
    pad = pad_token_id if pad_token_id is not None else (eos_token_id if eos_token_id is not None else 0)

    cache = KVCache(model.config, B, T + max_new_tokens, device=device)
    logits = model(input_ids, attention_mask=attention_mask, cache=cache, last_only=True)[:, -1]  # (B, V)
    tokens = torch.full((B, max_new_tokens), pad, dtype=torch.long, device=device)
    logprobs = torch.zeros(B, max_new_tokens, device=device)
    mask = torch.zeros(B, max_new_tokens, dtype=torch.long, device=device)
    finished = torch.zeros(B, dtype=torch.bool, device=device)
    step_mask = torch.ones(B, 1, dtype=torch.long, device=device)
    use_graph = device.type == "cuda" if cuda_graph is None else cuda_graph
    decoder = None
    if use_graph and max_new_tokens > 1:
        decoder = GraphDecoder(model, cache, attention_mask.sum(-1, keepdim=True))

    for t in range(max_new_tokens):
        logits = logits.float()
        if eos_token_id is not None and t < min_new_tokens:
            logits[:, eos_token_id] = float("-inf")
        if temperature == 0:
            logp = F.log_softmax(logits, dim=-1)
            next_token = logits.argmax(dim=-1)
        else:
            logp = F.log_softmax(logits / temperature, dim=-1)
            filtered = top_k > 0 or top_p < 1.0
            probs = F.softmax(filter_logits(logp, top_k, top_p), dim=-1) if filtered else logp.exp()
            next_token = sample(probs, generator, rows)
        alive = ~finished
        tokens[:, t] = torch.where(alive, next_token, pad)
        logprobs[:, t] = torch.where(alive, logp.gather(1, next_token[:, None]).squeeze(1), 0.0)
        mask[:, t] = alive.long()
        if eos_token_id is not None:
            finished |= next_token == eos_token_id
            if all_finished(finished) if all_finished is not None else bool(finished.all()):
                break
        if t + 1 < max_new_tokens:
            if decoder is not None:
                logits = decoder.step(tokens[:, t : t + 1])
            else:
                logits = model(tokens[:, t : t + 1], attention_mask=step_mask, cache=cache)[:, -1]
    n = t + 1
    return Generation(tokens[:, :n], mask[:, :n], logprobs[:, :n])


def sample_rows(logits: torch.Tensor, temperatures: list[float], top_ks: list[int], top_ps: list[float],
                generators: list[torch.Generator | None]) -> torch.Tensor:
    """One next token per row of logits (B, V), each row with its own settings and random
    generator: the rows of a server's batch belong to different requests, and a request's
    `seed` must give the same sample whoever else shares its batch. Temperature 0 is greedy.
    Same sampler as `generate` (softmax(logits / T), top-k, top-p, inverse-CDF draw), run on
    all sampled rows at once (one softmax, one sort for the top-p rows); only the uniform
    draws are per row, each from its row's generator."""
    logits = logits.float()
    tokens = logits.argmax(dim=-1)
    rows = [i for i, t in enumerate(temperatures) if t > 1e-5]  # below: greedy (vLLM's _SAMPLING_EPS)
    if not rows:
        return tokens
    index = torch.tensor(rows, device=logits.device)
    temps = torch.tensor([temperatures[i] for i in rows], device=logits.device)[:, None]
    logp = F.log_softmax(logits[index] / temps, dim=-1)  # (R, V)
    for r, i in enumerate(rows):
        if top_ks[i] > 0:
            logp[r:r + 1] = filter_logits(logp[r:r + 1], top_k=top_ks[i])
    nucleus = [r for r, i in enumerate(rows) if top_ps[i] < 1.0]
    if nucleus:
        top_p = torch.tensor([top_ps[rows[r]] for r in nucleus], device=logits.device)[:, None]
        logp[nucleus] = filter_logits(logp[nucleus], top_p=top_p)
    probs = F.softmax(logp, dim=-1)
    cdf = probs.cumsum(dim=-1)
    u = torch.cat([torch.rand(1, device=logits.device, generator=generators[i]) for i in rows])[:, None]
    picked = torch.searchsorted(cdf, u * cdf[:, -1:], right=True).squeeze(1).clamp_(max=probs.size(-1) - 1)
    tokens[index] = picked
    return tokens
