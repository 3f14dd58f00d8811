"""Losses of the three stages: masked LM loss, pairwise reward loss (PPO's come with it)."""

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
