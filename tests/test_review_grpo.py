"""Review of commit 8500269 (the critic-free trainer, RLOO / GRPO): tests of the review's
findings (the first ones in this file fail until the fix) and of what the commit's own
tests leave open (the grouping of rows end to end, the reference being exactly the SFT
model after a resume, with LoRA the adapters-off actor being the SFT model)."""

from pathlib import Path

import torch
from test_grpo import grpo_cfg
from test_ppo import dollar_share, prompts, scalars

from gpt2rlhf.checkpoint import latest_checkpoint, load_model
from gpt2rlhf.lora import adapters_disabled
from gpt2rlhf.stages import grpo
from gpt2rlhf.stages.common import open_run
from gpt2rlhf.stages.ppo import Rollouts, model_sources, response_logprobs

ROOT = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------ findings (fail until fixed)

def test_header_names_a_reward_function_passed_in(tmp_path):
    """PPO's header ends "reward dollar_share (a Python function)" when train(reward_fn=...)
    gives the reward; the critic-free trainer's header names only the actor, so log.txt
    does not say what the run was rewarded by."""
    cfg = grpo_cfg(tmp_path, "--train.max_steps", "1", "--grpo.mini_batch_size", "32",
                   "--grpo.normalize_reward", "false")
    run = grpo.train(cfg, reward_fn=dollar_share, prompts=prompts())
    header = next(line for line in (run / "log.txt").read_text().splitlines() if line.startswith("starting from"))
    assert "dollar_share" in header, header


def test_readme_documents_train_grpo():
    """README lists every entry point (status table, usage, the src/training/ layout line);
    train_grpo.py appears in none of them."""
    readme = (ROOT / "README.md").read_text()
    assert "train_grpo.py" in readme
    layout = next(line for line in readme.splitlines() if line.startswith("src/training/"))
    assert "train_grpo.py" in layout, layout


# ------------------------------------------------------------------ coverage (pass)

def by_prompt(texts, prompts):
    """A reward that depends on the prompt only: every group of k rows of one prompt is flat."""
    return [float(sum(map(ord, p)) % 97) for p in prompts]


def test_each_group_is_k_consecutive_rows_of_one_prompt(tmp_path):
    """End to end: with a reward that is a function of the prompt, every group is flat
    (val/flat_groups 1), so every advantage is 0; a grouping that mixed prompts (strided
    rows, a reordering in left_pad or generate) would give non-flat groups."""
    cfg = grpo_cfg(tmp_path, "--train.max_steps", "2", "--grpo.mini_batch_size", "32",
                   "--grpo.normalize_reward", "false", "--grpo.estimator", "rloo")
    run = grpo.train(cfg, reward_fn=by_prompt, prompts=prompts())
    assert scalars(run, "val/flat_groups") == [1.0, 1.0]
    # every advantage 0 and the KL 0 at the first step: the update cannot move the actor there
    assert scalars(run, "loss/policy")[0] == 0.0


def test_reference_is_exactly_the_sft_model_after_a_resume(tmp_path):
    """Full fine-tuning: a resumed run's reference is the pinned SFT checkpoint, not the
    actor it resumes (which has moved)."""
    cfg = grpo_cfg(tmp_path, "--train.max_steps", "2", "--train.save_every", "1", "--grpo.normalize_reward", "false")
    run_dir = grpo.train(cfg, reward_fn=dollar_share, prompts=prompts())
    run = open_run(cfg, "grpo", run_dir)
    sources = model_sources(cfg, run, function_given=True)
    actor, reference, _ = grpo.load_models(cfg, run, sources)
    sft = load_model(Path(sources["actor"])).state_dict()
    ref = reference.state_dict()
    assert sft.keys() == ref.keys() and all(torch.equal(sft[k], ref[k]) for k in sft)
    trained = load_model(latest_checkpoint(run_dir / "checkpoints"), "actor").state_dict()
    assert any(not torch.equal(sft[k], trained[k]) for k in sft)  # the actor did move
    assert all(not p.requires_grad for p in reference.parameters())


def test_lora_reference_is_the_actor_with_adapters_off(tmp_path):
    """LoRA: no second copy; the actor with its adapters off gives the SFT model's log-probs
    exactly, while with them on (after training) it does not."""
    cfg = grpo_cfg(tmp_path, "--train.max_steps", "2", "--train.save_every", "1", "--lora.r", "4",
                   "--grpo.normalize_reward", "false")
    run_dir = grpo.train(cfg, reward_fn=dollar_share, prompts=prompts())
    run = open_run(cfg, "grpo", run_dir)
    sources = model_sources(cfg, run, function_given=True)
    actor, reference, _ = grpo.load_models(cfg, run, sources)
    assert reference is None
    sft = load_model(Path(sources["actor"])).eval()
    q = torch.tensor([[1, 2, 3], [4, 5, 6]])
    r = Rollouts(q, torch.ones_like(q), torch.tensor([[7, 8, 9, 10], [11, 12, 13, 14]]), torch.ones(2, 4, dtype=torch.long))
    with torch.no_grad():
        want = response_logprobs(sft, r, cfg.grpo)[0]
        with adapters_disabled(actor):
            off = response_logprobs(actor, r, cfg.grpo)[0]
        on = response_logprobs(actor, r, cfg.grpo)[0]
    assert torch.equal(off, want)
    assert not torch.equal(on, want)
