"""Rollout maths for PPO on language models: logprobs, KL, rewards, GAE, whitening, and
the KL controllers. Pure functions on (B, T) tensors over the response tokens, with a
mask that is 1 for real response tokens (up to and including EOS) and 0 after.

Sources: Ziegler et al. 2019 (lm-human-preferences: per-token KL penalty, adaptive KL
coefficient), Schulman et al. 2016 (GAE), Huang et al. 2022, "The N+ implementation
details of RLHF with PPO" (whitening over valid tokens, score at the last token).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def logprobs_from_logits(logits: torch.Tensor, tokens: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """log pi(token) under logits / temperature, the distribution the tokens were sampled
    from (DESIGN.md detail 9). logits (B, T, V), tokens (B, T) -> (B, T)."""
    logp = F.log_softmax(logits.float() / temperature, dim=-1)
    return logp.gather(-1, tokens[..., None]).squeeze(-1)


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim=None) -> torch.Tensor:
    mask = mask.to(x.dtype)
    if dim is None:
        return (x * mask).sum() / mask.sum().clamp(min=1)
    return (x * mask).sum(dim) / mask.sum(dim).clamp(min=1)


def masked_var(x: torch.Tensor, mask: torch.Tensor, unbiased: bool = True) -> torch.Tensor:
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
    n = mask.sum()
    return var * n / (n - 1) if unbiased and n > 1 else var


def masked_whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, eps: float = 1e-8) -> torch.Tensor:
    """(x - mean) / std over the valid tokens only; padding stays out of both statistics
    and is left at 0. With shift_mean=False the mean is added back (reward whitening)."""
    mean, var = masked_mean(x, mask), masked_var(x, mask)
    white = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        white = white + mean
    return white * mask.to(x.dtype)


def kl_estimators(logp: torch.Tensor, ref_logp: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token estimators of KL(pi || pi_ref) from samples of pi (Schulman, "Approximating
    KL divergence", 2020): k1 = log pi - log pi_ref (unbiased, noisy, can be negative) and
    k3 = (r - 1) - log r with r = pi_ref / pi (unbiased, always >= 0)."""
    log_ratio = logp - ref_logp
    return log_ratio, torch.expm1(-log_ratio) + log_ratio


def per_token_rewards(score: torch.Tensor, logp: torch.Tensor, ref_logp: torch.Tensor, mask: torch.Tensor,
                      beta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(rewards, kl): -beta * (log pi - log pi_ref) on every response token, plus the
    sequence's score on its last real token (the EOS, or the last token of a response cut
    at the length limit), never on padding (TRL issues #1893, #3750). score (B,), rest (B, T)."""
    kl = (logp - ref_logp) * mask
    rewards = -beta * kl
    last = (mask * torch.arange(mask.size(1), device=mask.device)).argmax(dim=1)  # (B,)
    rewards = rewards.scatter_add(1, last[:, None], score[:, None].to(rewards.dtype))
    return rewards * mask, kl


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0,
        lam: float = 0.95) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation (Schulman et al. 2016), backwards over the tokens;
    the value after the last real token is 0 (the episode ends there).
    Returns (advantages, returns = advantages + values), both 0 on padding. (B, T)."""
    mask = mask.to(values.dtype)
    values = values * mask
    lastgaelam = torch.zeros_like(values[:, 0])
    advantages = torch.zeros_like(values)
    for t in reversed(range(values.size(1))):
        next_value = values[:, t + 1] if t + 1 < values.size(1) else torch.zeros_like(lastgaelam)
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        lastgaelam = (delta + gamma * lam * lastgaelam) * mask[:, t]
        advantages[:, t] = lastgaelam
    return advantages, (advantages + values) * mask


class FixedKLController:
    """A constant KL coefficient beta."""

    def __init__(self, beta: float):
        self.value = beta

    def update(self, current_kl: float, n_steps: int):
        pass

    def state_dict(self) -> dict:
        return {"value": self.value}

    def load_state_dict(self, state: dict):
        self.value = state["value"]


class AdaptiveKLController(FixedKLController):
    """Adaptive beta (Ziegler et al. 2019, section 2.2): proportional control of the
    measured KL towards `target`, the error clipped to +-20%, over `horizon` samples."""

    def __init__(self, beta: float, target: float, horizon: int):
        super().__init__(beta)
        self.target, self.horizon = target, horizon

    def update(self, current_kl: float, n_steps: int):
        error = max(-0.2, min(0.2, current_kl / self.target - 1))
        self.value *= 1 + error * n_steps / self.horizon
