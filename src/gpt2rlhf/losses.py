"""Losses of the stages: masked LM loss, pairwise reward loss, PPO's policy and value
losses, and DPO's (with its IPO and conservative variants)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def lm_loss(logits: torch.Tensor, input_ids: torch.Tensor, loss_mask: torch.Tensor,
            reduction: str = "mean") -> torch.Tensor:
    """Next-token cross-entropy where loss_mask is 1. Position t predicts token t+1, so the
    mask of the *target* token decides. logits (B, T, V), ids and mask (B, T).
    reduction "mean": over counted tokens; "sum": the sum (for token-weighted averages)."""
    logits = logits[:, :-1].float()  # (B, T-1, V)
    targets = input_ids[:, 1:]
    mask = loss_mask[:, 1:].float()
    nll = F.cross_entropy(logits.reshape(-1, logits.size(-1)), targets.reshape(-1), reduction="none")
    total = (nll * mask.reshape(-1)).sum()
    return total if reduction == "sum" else total / mask.sum().clamp(min=1)


def pairwise_loss(chosen: torch.Tensor, rejected: torch.Tensor) -> torch.Tensor:
    """-log sigmoid(r_chosen - r_rejected), the Bradley-Terry loss of InstructGPT's reward
    model (Ouyang et al. 2022, eq. 1). logsigmoid is stable for large margins."""
    return -F.logsigmoid(chosen.float() - rejected.float()).mean()


DPO_LOSSES = ("sigmoid", "ipo")


def dpo_loss(policy_chosen_logps: torch.Tensor, policy_rejected_logps: torch.Tensor,
             ref_chosen_logps: torch.Tensor, ref_rejected_logps: torch.Tensor, beta: float,
             label_smoothing: float = 0.0, loss_type: str = "sigmoid") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss, chosen rewards, rejected rewards) of a batch of preference pairs, from the
    log-probabilities of each response under the policy and the reference, all (B,).

    The implicit reward of a response is beta * (log pi(y|x) - log pi_ref(y|x)) (Rafailov
    et al. 2023, eq. 5), and h = (pc - rc) - (pr - rr) is how much more the policy prefers
    the chosen response than the reference does.
      sigmoid  DPO (eq. 7): -log sigmoid(beta * h). With label_smoothing eps, conservative
               DPO (Mitchell 2023, "A note on DPO with noisy preferences", eq. 3): each label
               is taken as wrong with probability eps, -(1 - eps) log sigmoid(beta h) - eps
               log sigmoid(-beta h), whose optimum is a finite margin, not an ever larger one.
      ipo      IPO (Azar et al. 2023, eq. 17): (h - 1 / (2 beta))^2, a squared loss that
               regresses h to a fixed target instead of pushing it to infinity; here beta
               is the paper's tau. The paper's h is built from sequence log-likelihoods;
               like TRL, callers pass the mean log-prob per response token for IPO (so
               that 1 / (2 beta) is a per-token margin whatever the response lengths).
    label_smoothing is for the sigmoid loss only (IPO has its own regulariser). The
    rewards are detached: they are for logging."""
    if loss_type not in DPO_LOSSES:
        raise ValueError(f"loss_type must be one of {DPO_LOSSES}, got {loss_type!r}")
    chosen_ratio = policy_chosen_logps.float() - ref_chosen_logps.float()
    rejected_ratio = policy_rejected_logps.float() - ref_rejected_logps.float()
    h = chosen_ratio - rejected_ratio
    if loss_type == "ipo":
        losses = (h - 1 / (2 * beta)) ** 2
    else:
        logits = beta * h
        losses = -(1 - label_smoothing) * F.logsigmoid(logits) - label_smoothing * F.logsigmoid(-logits)
    return losses.mean(), beta * chosen_ratio.detach(), beta * rejected_ratio.detach()


def ppo_policy_loss(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
                    clip: float = 0.2) -> tuple[torch.Tensor, dict]:
    """PPO's clipped surrogate (Schulman et al. 2017, eq. 7), averaged over valid tokens:
    max(-A r, -A clip(r, 1-eps, 1+eps)). Outside the clip range on the side that would
    increase the objective, the gradient is zero. Returns (pg_loss, stats)."""
    m = mask.float()
    n = m.sum().clamp(min=1)
    log_ratio = (logp - old_logp) * m
    ratio = torch.exp(log_ratio)
    pg_losses = -advantages * ratio
    pg_losses2 = -advantages * torch.clamp(ratio, 1.0 - clip, 1.0 + clip)
    pg_loss = (torch.max(pg_losses, pg_losses2) * m).sum() / n
    with torch.no_grad():
        stats = {"clipfrac": ((pg_losses2 > pg_losses).float() * m).sum() / n,
                 "approxkl": 0.5 * (log_ratio ** 2).sum() / n,  # lm-human-preferences' estimator
                 "ratio_mean": (ratio * m).sum() / n,
                 # the share of tokens whose ratio left [1 - eps, 1 + eps], whatever the
                 # advantage's sign (clipfrac counts only those where the clip is active)
                 "ratio_outside_clip": (((ratio - 1).abs() > clip).float() * m).sum() / n,
                 "ratio_max": torch.where(m.bool(), ratio, torch.zeros_like(ratio)).max()}
    return pg_loss, stats


def ppo_value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor,
                   clip: float = 0.2) -> tuple[torch.Tensor, dict]:
    """Clipped value loss: 0.5 * max((v - R)^2, (clip(v, v_old +- eps) - R)^2) over valid
    tokens (the value clipping of OpenAI's baselines PPO2). Returns (vf_loss, stats)."""
    m = mask.float()
    n = m.sum().clamp(min=1)
    clipped = old_values + torch.clamp(values - old_values, -clip, clip)
    vf_losses = (values - returns) ** 2
    vf_losses2 = (clipped - returns) ** 2
    vf_loss = 0.5 * (torch.max(vf_losses, vf_losses2) * m).sum() / n
    with torch.no_grad():
        stats = {"vf_clipfrac": ((vf_losses2 > vf_losses).float() * m).sum() / n}
    return vf_loss, stats


def kl_loss_k3(logp: torch.Tensor, ref_logp: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """KL(pi || pi_ref) as a loss term, per token with the k3 estimator
    exp(ref - logp) - (ref - logp) - 1 (>= 0, unbiased for tokens sampled from pi; John
    Schulman's note on KL approximations), averaged over the valid tokens: GRPO's KL term
    (Shao et al. 2024, DeepSeekMath, eq. 4). Its gradient moves pi towards pi_ref."""
    m = mask.float()
    d = (ref_logp - logp) * m  # padding out before the exp
    return ((torch.exp(d) - d - 1) * m).sum() / m.sum().clamp(min=1)
