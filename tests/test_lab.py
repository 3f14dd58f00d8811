"""The step-by-step PPO API (PPOLab): the same run as train(), phase by phase, with every
intermediate tensor readable, its invariants, resume, and the rollouts saved for the
inspector."""

import pytest
import torch
from test_ppo import dollar_share, prompts, small_cfg

from gpt2rlhf.checkpoint import latest_checkpoint, load_model
from gpt2rlhf.stages import ppo
from gpt2rlhf.stages.ppo import PPOLab


def same_weights(model, checkpoint, name):
    a, b = model.state_dict(), load_model(checkpoint, name).state_dict()
    return all(torch.equal(a[k], b[k]) for k in a)


def by_hand(lab: PPOLab, iterations: int):
    """Every phase called one by one, as a notebook does, reading tensors in between."""
    for _ in range(iterations):
        lab.sample_prompts()
        lab.rollout()
        lab.score()
        lab.logprobs_and_values()
        lab.advantages()
        lab.update()
        lab.log()


def test_phase_by_phase_gives_the_weights_train_ppo_gives(tmp_path):
    args = ("--train.max_steps", "4", "--ppo.adaptive_kl", "true", "--ppo.sample_every", "2")
    run_dir = ppo.train(small_cfg(tmp_path / "a", *args), reward_fn=dollar_share, prompts=prompts())
    final = latest_checkpoint(run_dir / "checkpoints")
    with PPOLab(small_cfg(tmp_path / "b", *args), reward_fn=dollar_share, prompts=prompts()) as lab:
        by_hand(lab, 4)
        assert lab.iteration == 4
        assert same_weights(lab.actor, final, "actor") and same_weights(lab.critic, final, "critic")
        saved = lab.save()
    assert saved.name == "step_00000004"


def test_a_lab_checkpoint_resumes_exactly(tmp_path):
    args = ("--train.max_steps", "4", "--ppo.adaptive_kl", "true")
    whole = latest_checkpoint(ppo.train(small_cfg(tmp_path / "a", *args), reward_fn=dollar_share,
                                        prompts=prompts()) / "checkpoints")
    cfg = small_cfg(tmp_path / "b", *args)
    with PPOLab(cfg, reward_fn=dollar_share, prompts=prompts()) as lab:
        by_hand(lab, 2)
        lab.save()
        run_dir = lab.run.dir
    with PPOLab(cfg, resume=run_dir, reward_fn=dollar_share, prompts=prompts()) as lab:
        assert lab.iteration == 2
        while lab.iteration < 4:
            lab.step()
        assert same_weights(lab.actor, whole, "actor") and same_weights(lab.critic, whole, "critic")


def test_invariants_of_the_first_iteration(tmp_path):
    """Before any update the actor is its own reference and the rollout policy: the KL is
    exactly 0, every ratio exactly 1 on real tokens and 0 on padding; the per-token
    rewards add up to the score minus beta times the KL."""
    with PPOLab(small_cfg(tmp_path, "--train.max_steps", "2"), reward_fn=dollar_share, prompts=prompts()) as lab:
        q, m = lab.sample_prompts()
        assert q.shape == m.shape and q.size(0) == 32
        r = lab.rollout()
        assert r.response.shape == r.response_mask.shape and r.logprobs is None
        lab.score()
        r = lab.logprobs_and_values()
        assert torch.equal(r.logprobs, r.ref_logprobs)
        assert torch.equal(lab.ratios(), r.response_mask.float())
        r = lab.advantages()
        assert torch.count_nonzero(r.kl) == 0
        mask = r.response_mask.float()
        assert torch.allclose(r.rewards.sum(1), r.score - lab.beta * r.kl.sum(1))
        for name in ("rewards", "advantages", "returns", "kl"):
            assert torch.count_nonzero(getattr(r, name) * (1 - mask)) == 0, name  # nothing on padding
        assert lab.logs["objective/kl"] == 0.0
        lab.update()
        moved = lab.ratios()
        assert torch.count_nonzero(moved * (1 - mask)) == 0 and not torch.equal(moved, mask)
        logs = lab.log()
        assert logs["objective/kl"] == 0.0 and logs["policy/ratio_max"] >= 1.0


def test_phases_out_of_order_are_an_error(tmp_path):
    with PPOLab(small_cfg(tmp_path, "--train.max_steps", "2"), reward_fn=dollar_share, prompts=prompts()) as lab:
        with pytest.raises(RuntimeError, match=r"call lab.sample_prompts\(\) first"):
            lab.rollout()
        lab.sample_prompts()
        lab.rollout()
        with pytest.raises(RuntimeError, match=r"call lab.score\(\) first"):
            lab.logprobs_and_values()
        with pytest.raises(RuntimeError, match=r"call lab.score\(\) first"):
            lab.advantages()
        lab.score()
        with pytest.raises(RuntimeError, match=r"lab.score\(\) already ran in this iteration; next is "
                                               r"lab.logprobs_and_values\(\)"):
            lab.score()
        lab.logprobs_and_values()
        lab.advantages()
        with pytest.raises(RuntimeError, match=r"call lab.update\(\) first"):
            lab.log()
        with pytest.raises(RuntimeError, match=r"between iterations only"):
            lab.save()


def test_sampled_iterations_save_what_the_inspector_shows(tmp_path):
    cfg = small_cfg(tmp_path, "--train.max_steps", "3", "--ppo.sample_every", "2")
    with PPOLab(cfg, reward_fn=dollar_share, prompts=prompts()) as lab:
        lab.step()  # iteration 1 is always sampled
        r, first_ratio = lab.rollouts, None
        record = torch.load(lab.run.dir / "rollouts" / "iteration_000001.pt", weights_only=True)
        assert record["iteration"] == 1 and len(record["rows"]) == ppo.INSPECT_ROWS
        first_ratio = lab.ratios()
        for i, row in enumerate(record["rows"]):
            n = int(r.response_mask[i].sum())
            assert row["response_ids"] == r.response[i, :n].tolist()
            assert "".join(row["tokens"]) == lab.enc.decode(row["response_ids"])
            for name in ("kl", "values", "rewards", "advantages", "returns", "logprobs", "ref_logprobs"):
                assert torch.equal(row[name], getattr(r, name)[i, :n].float()), name
            assert torch.allclose(row["ratio"], first_ratio[i, :n])
            assert row["raw_score"] == float(r.raw_score[i])
        assert record["scalars"]["objective/kl"] == lab.logs["objective/kl"]
        lab.step()
        lab.step()
    assert sorted(p.name for p in (lab.run.dir / "rollouts").iterdir()) == ["iteration_000001.pt",
                                                                          "iteration_000002.pt"]


def test_from_checkpoints_with_texts_and_a_new_value_head(tmp_path):
    from test_ppo import small_checkpoints

    actor, _ = small_checkpoints(tmp_path)
    lab = PPOLab.from_checkpoints(actor, reward=dollar_share, prompts=["!", "#", "&", "%"] * 6, overrides={
        "run.out_dir": tmp_path / "runs", "train.batch_size": 8, "ppo.mini_batch_size": 4,
        "ppo.max_new_tokens": 6, "ppo.normalize_reward": False, "prompts.max_tokens": 4})
    assert lab.cfg.critic_new_head and lab.sources["reward"] is None
    logs = lab.step()
    lab.close()
    assert lab.iteration == 1 and "loss/value" in logs
    assert lab.query.size(0) == 8
