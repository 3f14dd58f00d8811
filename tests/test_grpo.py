"""The critic-free trainer (RLOO / GRPO, issue 18): group advantages and the k3 KL term
against hand-computed values, the invariants of the first update (KL 0 against the
reference, ratio 1), learning on a tiny task with both estimators, exact resume after
SIGKILL, and bad input."""

import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import kill_after_checkpoint, write_reviews
from test_ppo import SMALL, dollar_share, prompts, scalars, small_checkpoints

from gpt2rlhf.checkpoint import latest_checkpoint, load_model, load_trainer_state
from gpt2rlhf.config import ConfigError, GRPOConfig, GroupArgs, load_config
from gpt2rlhf.losses import kl_loss_k3
from gpt2rlhf.model import GPTConfig
from gpt2rlhf.stages import grpo
from gpt2rlhf.stages.grpo import advantages, group_advantages
from gpt2rlhf.stages.ppo import Rollouts

SRC = Path(__file__).resolve().parents[1] / "src"


def test_rloo_advantage_is_the_reward_minus_the_mean_of_the_others():
    rewards = torch.tensor([1.0, 2.0, 3.0, 6.0, 5.0, 5.0, 5.0, 5.0])
    adv = group_advantages(rewards, 4, "rloo")
    expected = [1 - 11 / 3, 2 - 10 / 3, 3 - 9 / 3, 6 - 6 / 3, 0, 0, 0, 0]
    assert adv.tolist() == pytest.approx(expected, abs=1e-6)
    # k/(k-1) times the deviation from the group mean: the same thing, said otherwise
    assert adv[:4].tolist() == pytest.approx([(4 / 3) * (r - 3) for r in (1, 2, 3, 6)], abs=1e-6)


def test_grpo_advantage_is_the_standardised_reward_of_the_group():
    rewards = torch.tensor([1.0, 2.0, 3.0, 6.0, 0.0, 1.0, 0.0, 1.0])
    std1 = math.sqrt((4 + 1 + 0 + 9) / 3)  # unbiased, as TRL's GRPOTrainer
    std2 = math.sqrt(4 * 0.25 / 3)
    adv = group_advantages(rewards, 4, "grpo")
    expected = [d / (std1 + 1e-4) for d in (-2, -1, 0, 3)] + [d / (std2 + 1e-4) for d in (-0.5, 0.5, -0.5, 0.5)]
    assert adv.tolist() == pytest.approx(expected, abs=1e-5)
    assert group_advantages(rewards, 4, "grpo", scale=False)[:4].tolist() == [-2, -1, 0, 3]  # Dr. GRPO
    assert group_advantages(torch.full((4,), 7.0), 4, "grpo").tolist() == [0, 0, 0, 0]  # a flat group: no signal
    assert group_advantages(rewards, 2, "rloo").tolist() == pytest.approx([-1, 1, -3, 3, -1, 1, -1, 1])


def test_k3_kl_loss_against_hand_values_and_nothing_from_padding():
    logp = torch.tensor([[-1.0, -2.0, -50.0]], requires_grad=True)
    ref = torch.tensor([[-1.5, -2.0, 0.0]])
    mask = torch.tensor([[1, 1, 0]])
    loss = kl_loss_k3(logp, ref, mask)
    assert float(loss.detach()) == pytest.approx((math.exp(-0.5) + 0.5 - 1) / 2, abs=1e-7)
    loss.backward()
    assert logp.grad[0, 2] == 0  # padding: no gradient, however far apart the two log-probs
    # d/dlogp of exp(ref - logp) - (ref - logp) - 1 = 1 - exp(ref - logp), over the 2 tokens
    assert float(logp.grad[0, 0]) == pytest.approx((1 - math.exp(-0.5)) / 2, abs=1e-7)
    assert float(kl_loss_k3(ref, ref, mask)) == 0.0


def toy_rollouts(score, logprobs, ref, mask):
    B, T = mask.shape
    return Rollouts(torch.zeros(B, 1, dtype=torch.long), torch.ones(B, 1, dtype=torch.long),
                    torch.zeros(B, T, dtype=torch.long), mask, logprobs=logprobs, ref_logprobs=ref,
                    raw_score=score, score=score)


def test_advantages_with_the_kl_in_the_reward_or_in_the_loss():
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    logprobs = torch.tensor([[-1.0, -1.0, 0.0], [-2.0, -1.0, -1.0]])
    ref = torch.tensor([[-1.5, -1.0, -9.0], [-2.0, -2.0, -1.0]])  # KL per response: 0.5 and 1.0
    score = torch.tensor([1.0, 1.0])
    beta = 0.2
    r, stats = advantages(toy_rollouts(score, logprobs, ref, mask), GroupArgs(estimator="rloo", group_size=2), beta)
    # RLOO: rewards 1 - 0.1 = 0.9 and 1 - 0.2 = 0.8; leave-one-out: +0.1 and -0.1 on every token
    assert torch.allclose(r.advantages, torch.tensor([[0.1, 0.1, 0], [-0.1, -0.1, -0.1]]), atol=1e-6)
    assert torch.allclose(r.rewards, torch.tensor([[0, 0.9, 0], [0, 0, 0.8]]), atol=1e-6)  # on the last token
    assert stats["objective/kl"] == pytest.approx(0.75) and stats["objective/reward"] == pytest.approx(0.85)
    r, _ = advantages(toy_rollouts(score, logprobs, ref, mask), GroupArgs(estimator="grpo", group_size=2), beta)
    assert torch.count_nonzero(r.advantages) == 0  # GRPO: the KL is in the loss, equal scores give nothing


def grpo_cfg(tmp_path, *extra):
    actor, critic = small_checkpoints(tmp_path)
    return load_config(GRPOConfig, overrides=[
        "-a", actor, "--reward", critic, "--run.out_dir", str(tmp_path / "runs"), "-b", "32",
        "--grpo.mini_batch_size", "16", "--grpo.max_new_tokens", "8", "--grpo.kl_coef", "0.01",
        "--grpo.normalization_samples", "64", "--optim.lr", "1e-2", "--train.save_every", "0",
        "--prompts.max_tokens", "4", *extra])


def test_the_first_update_starts_from_the_reference_with_ratio_one(tmp_path):
    """One minibatch of the whole batch, one epoch: the first step's ratios are exactly 1,
    the KL to the reference (a frozen copy of the SFT model) exactly 0, the k3 loss term 0."""
    cfg = grpo_cfg(tmp_path, "--train.max_steps", "2", "--grpo.mini_batch_size", "32", "--grpo.ppo_epochs", "1")
    run = grpo.train(cfg, reward_fn=dollar_share, prompts=prompts())
    assert scalars(run, "objective/kl")[0] == 0.0
    assert scalars(run, "policy/ratio_mean")[0] == 1.0 and scalars(run, "policy/ratio_max")[0] == 1.0
    assert scalars(run, "policy/clipfrac")[0] == 0.0 and scalars(run, "policy/kl_loss")[0] == 0.0
    assert scalars(run, "objective/kl")[1] != 0.0  # it moved
    assert load_model(latest_checkpoint(run / "checkpoints"), "actor")


@pytest.mark.parametrize("estimator", ["grpo", "rloo"])
def test_both_estimators_raise_a_programmatic_reward(tmp_path, estimator):
    cfg = grpo_cfg(tmp_path, "--train.max_steps", "20", "--grpo.estimator", estimator)
    run = grpo.train(cfg, reward_fn=dollar_share, prompts=prompts())
    score = scalars(run, "objective/raw_score")
    before, after = sum(score[:3]) / 3, sum(score[-3:]) / 3
    print(f"{estimator}: share of '$' {before:.3f} -> {after:.3f}")
    assert before < 0.15 and after > before + 0.2, (before, after)


def test_sigkill_then_resume_continues_exactly(tmp_path):
    config = GPTConfig(block_size=48, vocab_size=50257, n_layer=1, n_head=2, n_embd=32)
    actor, critic = small_checkpoints(tmp_path, config)
    data = write_reviews(tmp_path / "reviews.jsonl", n=40)
    args = ["training/train_grpo.py", "-a", actor, "--reward", critic, "--data.train", data, "--data.eval_size", "4",
            "-b", "8", "--grpo.group_size", "2", "--grpo.mini_batch_size", "4", "--grpo.max_new_tokens", "6",
            "--prompts.min_tokens", "2", "--prompts.max_tokens", "6", "--grpo.normalization_samples", "16",
            "--grpo.ppo_epochs", "2", "--grpo.adaptive_kl", "true", "--train.max_steps", "12", "--train.save_every", "2",
            "--train.keep_checkpoints", "0", "--optim.lr", "1e-3"]
    whole = subprocess.run([sys.executable, *args, "--run.out_dir", str(tmp_path / "whole")], cwd=SRC,
                           capture_output=True, text=True, timeout=300)
    assert whole.returncode == 0, whole.stderr[-2000:]
    (ref_run,) = (tmp_path / "whole").iterdir()
    reference = latest_checkpoint(ref_run / "checkpoints")
    out = tmp_path / "killed"
    run_dir = kill_after_checkpoint([sys.executable, *args, "--run.out_dir", str(out)], SRC, out, 4)
    assert 4 <= load_trainer_state(latest_checkpoint(run_dir / "checkpoints"))["step"] < 12
    resumed = subprocess.run([sys.executable, "training/train_grpo.py", "--resume", str(run_dir)], cwd=SRC,
                             capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    final = latest_checkpoint(run_dir / "checkpoints")
    assert final.name == "step_00000012"
    a, b = load_model(reference, "actor").state_dict(), load_model(final, "actor").state_dict()
    assert max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-6


def test_bad_input_is_one_clear_error(tmp_path):
    with pytest.raises(ConfigError, match="multiple of grpo.group_size"):
        load_config(GRPOConfig, overrides=["-a", "x", "-b", "30", "--grpo.group_size", "4"])
    with pytest.raises(ConfigError, match="rloo or grpo"):
        load_config(GRPOConfig, overrides=["-a", "x", "--grpo.estimator", "ppo"])
    with pytest.raises(ConfigError, match="group_size must be >= 2"):
        load_config(GRPOConfig, overrides=["-a", "x", "--grpo.group_size", "1", "-b", "4"])
    actor, _ = small_checkpoints(tmp_path)
    done = subprocess.run([sys.executable, "training/train_grpo.py", "-a", actor, "--run.out_dir",
                           str(tmp_path / "runs"), "--data.train", "x.jsonl"], cwd=SRC, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 2 and done.stderr.startswith("error: ") and "--reward" in done.stderr, done.stderr
    assert not (tmp_path / "runs").exists()
    # an SFT checkpoint is not a reward model
    done = subprocess.run([sys.executable, "training/train_grpo.py", "-a", actor, "--reward", actor, "--run.out_dir",
                           str(tmp_path / "runs"), "--data.train", "x.jsonl"], cwd=SRC, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 2 and "reward (--reward)" in done.stderr and done.stderr.count("\n") == 1, done.stderr
    assert SMALL.vocab_size == 16
