"""Losses against direct computations."""

import math

import torch
import torch.nn.functional as F

from gpt2rlhf.losses import lm_loss, pairwise_loss


def test_lm_loss_counts_only_masked_targets():
    torch.manual_seed(0)
    logits = torch.randn(2, 5, 11)
    ids = torch.randint(0, 11, (2, 5))
    mask = torch.tensor([[0, 0, 1, 1, 0], [1, 1, 1, 1, 1]])
    expected, n = 0.0, 0
    for b in range(2):
        for t in range(4):
            if mask[b, t + 1]:
                expected += -F.log_softmax(logits[b, t], -1)[ids[b, t + 1]].item()
                n += 1
    assert math.isclose(lm_loss(logits, ids, mask).item(), expected / n, rel_tol=1e-5)
    assert math.isclose(lm_loss(logits, ids, mask, reduction="sum").item(), expected, rel_tol=1e-5)


def test_pairwise_loss_is_bradley_terry_and_pushes_the_right_way():
    chosen = torch.tensor([2.0, 0.0, -1.0], requires_grad=True)
    rejected = torch.tensor([0.0, 0.0, 1.0], requires_grad=True)
    loss = pairwise_loss(chosen, rejected)
    expected = sum(math.log1p(math.exp(-(c - r))) for c, r in [(2, 0), (0, 0), (-1, 1)]) / 3
    assert math.isclose(loss.item(), expected, rel_tol=1e-6)
    loss.backward()
    assert (chosen.grad < 0).all() and (rejected.grad > 0).all()  # descent raises chosen, lowers rejected
    assert torch.isfinite(pairwise_loss(torch.tensor([-1e4]), torch.tensor([1e4])))
