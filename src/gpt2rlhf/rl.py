"""Rollout maths for PPO on language models: logprobs, KL, rewards, GAE, whitening, and
the KL controllers. Pure functions on (B, T) tensors over the response tokens, with a
mask that is 1 for real response tokens (up to and including EOS) and 0 after.

Sources: Ziegler et al. 2019 (lm-human-preferences: per-token KL penalty, adaptive KL
coefficient), Schulman et al. 2016 (GAE), Huang et al. 2022, "The N+ implementation
details of RLHF with PPO" (whitening over valid tokens, score at the last token).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def sampling_logits_(logits: torch.Tensor, temperature: float = 1.0, eos_token_id: int | None = None,
                     min_new_tokens: int = 0) -> torch.Tensor:
    """The logits of the distribution each response token was sampled from
    (lm-human-preferences divides by the temperature; masking EOS as sampling did is
    issue 11): logits / temperature, and EOS impossible at the response positions
    t < min_new_tokens, where generation forbade it. Scoring the unmasked logits instead
    biases every log-prob and the KL between two models whose EOS logits differ (issue 11).
    logits (B, T, V) over the response positions, column t predicting response token t
    -> (B, T, V) in fp32.

    IN PLACE when `logits` is already fp32: give it a tensor nothing else reads (a fresh
    LM-head output, as PPO does), or use sampling_logprobs. Autograd follows the in-place
    ops (the LM head's backward does not need its output). On 2 CPU cores a copy of the
    16 x 24 x 50,257 logits costs about as much as the softmax; at temperature 1 there is
    no division at all (x / 1 is x exactly, so the result is the same).

    The forbidden logit is set to the lowest finite float, not -inf: the distribution is
    the same (its probability is exactly 0), and entropy and gradients stay finite."""
    z = logits.float()
    if temperature != 1.0:
        z = z.div_(temperature)
    if eos_token_id is not None and min_new_tokens > 0:
        z[..., :min_new_tokens, eos_token_id] = torch.finfo(z.dtype).min
    return z


def sampling_logprobs(logits: torch.Tensor, temperature: float = 1.0, eos_token_id: int | None = None,
                      min_new_tokens: int = 0) -> torch.Tensor:
    """log-probabilities of the distribution each response token was sampled from (see
    sampling_logits_); `logits` is left as it is. (B, T, V) -> (B, T, V) in fp32."""
    z = logits.float()
    z = sampling_logits_(z.clone() if z is logits else z, temperature, eos_token_id, min_new_tokens)
    return F.log_softmax(z, dim=-1)


def logprobs_from_logits(logits: torch.Tensor, tokens: torch.Tensor, temperature: float = 1.0,
                         eos_token_id: int | None = None, min_new_tokens: int = 0) -> torch.Tensor:
    """log pi(token) under the sampling distribution (see sampling_logprobs).
    logits (B, T, V), tokens (B, T) -> (B, T)."""
    logp = sampling_logprobs(logits, temperature, eos_token_id, min_new_tokens)
    return logp.gather(-1, tokens[..., None]).squeeze(-1)


def entropy_from_logprobs(logp: torch.Tensor) -> torch.Tensor:
    """-sum p log p over the vocabulary. (B, T, V) -> (B, T)"""
    return -(logp.exp() * logp).sum(-1)


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


def explained_variance(values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor) -> float:
    """1 - Var(returns - values) / Var(returns) over valid tokens: 1 for a perfect critic,
    0 for one that predicts the mean, negative for a worse one (cleanrl's diagnostic)."""
    var = masked_var(returns, mask)
    return float(1 - masked_var(returns - values, mask) / var) if var > 0 else float("nan")


def reward_normalisation(raw: torch.Tensor) -> tuple[float, float, str | None]:
    """(gain, bias, warning) so that raw * gain + bias has mean 0 and std 1 over the
    starting policy's scores (lm-human-preferences). With fewer than two scores, or scores
    that are (nearly) constant, the std says nothing about the scale (a gain of 1e8 would
    blow up the first different score): the scores are then only centred (gain 1), and
    the warning says so."""
    raw = raw.double().flatten()
    mean = float(raw.mean())
    std = float(raw.std(correction=0)) if raw.numel() > 1 else float("nan")  # as lm-human-preferences
    if not math.isfinite(mean):
        raise ValueError(f"reward normalisation: the starting scores are not finite (mean {mean})")
    if not math.isfinite(std) or std <= 1e-6 * max(1.0, abs(mean)):
        return 1.0, -mean, (f"reward normalisation: {raw.numel()} starting score(s) with mean {mean:.6g} and std "
                            f"{std:.3g} say nothing about the scale; the scores are only centred (gain 1). "
                            f"Raise ppo.normalization_samples, or check the reward.")
    return 1.0 / std, -mean / std, None


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
