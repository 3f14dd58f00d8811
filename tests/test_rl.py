"""PPO maths against plain reference computations."""

import math

import torch

from gpt2rlhf.losses import ppo_policy_loss, ppo_value_loss
from gpt2rlhf.rl import (AdaptiveKLController, gae, kl_estimators, logprobs_from_logits, masked_mean,
                         masked_whiten, per_token_rewards)


def reference_gae(rewards, values, lengths, gamma, lam):
    """Textbook GAE, one sequence at a time, in plain Python."""
    B, T = len(rewards), len(rewards[0])
    adv = [[0.0] * T for _ in range(B)]
    for b in range(B):
        last = 0.0
        for t in reversed(range(lengths[b])):
            next_v = values[b][t + 1] if t + 1 < lengths[b] else 0.0
            delta = rewards[b][t] + gamma * next_v - values[b][t]
            last = delta + gamma * lam * last
            adv[b][t] = last
    return adv


def test_gae_equals_a_plain_loop():
    torch.manual_seed(0)
    rewards, values = torch.randn(3, 6, dtype=torch.float64), torch.randn(3, 6, dtype=torch.float64)
    lengths = [6, 4, 1]
    mask = torch.tensor([[1] * n + [0] * (6 - n) for n in lengths])
    rewards = rewards * mask
    for gamma, lam in [(1.0, 0.95), (0.99, 0.9), (1.0, 1.0)]:
        adv, ret = gae(rewards, values, mask, gamma, lam)
        ref = torch.tensor(reference_gae(rewards.tolist(), values.tolist(), lengths, gamma, lam), dtype=torch.float64)
        assert torch.allclose(adv, ref, atol=1e-12)
        assert torch.allclose(ret, (ref + values) * mask, atol=1e-12)
        assert (adv[mask == 0] == 0).all()


def test_whitening_uses_valid_tokens_only():
    x = torch.tensor([[1.0, 2.0, 3.0, 100.0], [4.0, 5.0, -50.0, -50.0]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
    w = masked_whiten(x, mask)
    valid = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0])
    expected = (valid - valid.mean()) / valid.std()
    assert torch.allclose(w[mask.bool()], expected, atol=1e-6)
    assert (w[~mask.bool()] == 0).all()
    kept = masked_whiten(x, mask, shift_mean=False)
    assert math.isclose(masked_mean(kept, mask).item(), 3.0, rel_tol=1e-6)


def test_kl_penalty_on_every_token_and_the_score_on_the_last_real_one():
    logp = torch.tensor([[-1.0, -2.0, -1.5, -0.5], [-1.0, -1.0, 0.0, 0.0]])
    ref = torch.tensor([[-1.5, -1.0, -1.5, -0.7], [-2.0, -0.5, 0.0, 0.0]])
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]])  # row 1 ended with EOS at t=1
    rewards, kl = per_token_rewards(torch.tensor([10.0, 20.0]), logp, ref, mask, beta=0.1)
    assert torch.allclose(kl, (logp - ref) * mask)
    expected = -0.1 * (logp - ref) * mask
    expected[0, 3] += 10.0
    expected[1, 1] += 20.0  # on the EOS token, not the first padding after it
    assert torch.allclose(rewards, expected)


def test_kl_estimators():
    logp, ref = torch.tensor([-1.0, -2.0, -0.1]), torch.tensor([-1.0, -1.0, -0.5])
    k1, k3 = kl_estimators(logp, ref)
    assert torch.allclose(k1, logp - ref)
    r = torch.exp(ref - logp)
    assert torch.allclose(k3, (r - 1) - torch.log(r)) and (k3 >= 0).all() and k3[0] == 0


def test_logprobs_divide_the_logits_by_the_temperature():
    logits = torch.randn(2, 3, 7)
    tokens = torch.randint(0, 7, (2, 3))
    lp = logprobs_from_logits(logits, tokens, temperature=0.5)
    assert torch.allclose(lp, torch.log_softmax(logits * 2, -1).gather(-1, tokens[..., None]).squeeze(-1))


def test_policy_clipping_zeroes_the_gradient_outside_the_range():
    old = torch.zeros(4)
    # ratios 1.5 and 0.5 with positive / negative advantages: clipped on the side that helps
    logp = torch.log(torch.tensor([1.5, 0.5, 1.5, 0.5])).requires_grad_()
    adv = torch.tensor([1.0, -1.0, -1.0, 1.0])
    loss, stats = ppo_policy_loss(logp, old, adv, torch.ones(4), clip=0.2)
    loss.backward()
    assert logp.grad[0] == 0 and logp.grad[1] == 0  # r > 1+eps with A > 0, r < 1-eps with A < 0: clipped
    assert logp.grad[2] != 0 and logp.grad[3] != 0  # the pessimistic side keeps its gradient
    assert math.isclose(stats["clipfrac"].item(), 0.5) and math.isclose(stats["ratio_max"].item(), 1.5, rel_tol=1e-6)


def test_value_clipping():
    old = torch.tensor([0.0, 0.0])
    values = torch.tensor([1.0, 0.1], requires_grad=True)
    returns = torch.tensor([0.0, 0.0])
    loss, stats = ppo_value_loss(values, old, returns, torch.ones(2), clip=0.2)
    loss.backward()
    # v=1.0 moved past old+0.2 away from the return: the unclipped (larger) loss counts
    assert math.isclose(loss.item(), 0.5 * (1.0 + 0.01) / 2, rel_tol=1e-6)
    assert values.grad[0] > 0 and stats["vf_clipfrac"] == 0


def test_adaptive_beta_moves_the_right_way():
    high = AdaptiveKLController(0.1, target=6.0, horizon=10000)
    high.update(current_kl=12.0, n_steps=256)
    low = AdaptiveKLController(0.1, target=6.0, horizon=10000)
    low.update(current_kl=1.0, n_steps=256)
    assert high.value > 0.1 > low.value
    assert math.isclose(high.value, 0.1 * (1 + 0.2 * 256 / 10000))  # error clipped at +20%
