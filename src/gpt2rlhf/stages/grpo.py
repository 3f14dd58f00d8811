"""Critic-free policy gradient, RLOO or GRPO (grpo.estimator): several responses to each
prompt, and the group of responses to the same prompt is the baseline, so there is no
value model to train. One iteration, on the PPO stage's own phase functions:

    0. prompts      train.batch_size / k prompts, each repeated k times (one group each)
    1. rollout      ppo.rollout: k sampled responses per prompt (KV cache, cut at EOS)
    2. score        ppo.score: the reward model (or function), normalised and shaped
    3. logprobs     ppo.logprobs_and_values without a critic: the actor's and the
                    reference's log-probs of the sampled tokens
    4. advantages   group_advantages: each response's reward against its group's, the
                    same for all its tokens; with kl_penalty reward, the reward is the
                    score minus beta times the response's KL first (RLOO's form)
    5. update       ppo.ppo_update without a critic: the clipped surrogate over shuffled
                    minibatches (the ratio matters when ppo_epochs > 1 reuses a batch);
                    with kl_penalty loss, plus beta times the per-token k3 KL (GRPO's form)
    6. log          the PPO stage's statistics, the KL, the groups' spread; samples

The reference is the actor with its LoRA adapters off, or a frozen copy of the SFT model.
The loss is averaged over the valid tokens of a minibatch, as the PPO stage's (the
token-level average of DAPO, Yu et al. 2025; GRPO's paper averages each response first).
"""

from __future__ import annotations

import dataclasses
import math
import time
from pathlib import Path
from typing import Callable

import torch

from ..checkpoint import CheckpointError
from ..config import ConfigError, GroupArgs, GRPOConfig
from ..data import BatchStream, left_pad, prompt_examples, train_eval_records
from ..loading import load, load_reward_model
from ..model import set_dropout
from ..rewards import load_reward_function
from ..rl import AdaptiveKLController, FixedKLController, kl_estimators
from ..tokenizer import get_tokenizer
from .common import Run, Stepper, build_model, cli, is_due, open_run, restore_models, resume_step, save, tracked
from .ppo import (Rollouts, callable_reward, eos_id, iteration_stats, logprobs_and_values, model_reward,
                  model_sources, normalisation, ppo_update, rollout, samples_text, score)


def group_advantages(rewards: torch.Tensor, k: int, estimator: str, scale: bool = True,
                     eps: float = 1e-4) -> torch.Tensor:
    """(B,) advantages of (B,) rewards in consecutive groups of k (one prompt each).

    rloo: r_i minus the mean of the other k-1 rewards of its group (Ahmadian et al. 2024;
    Kool et al. 2019's leave-one-out baseline: unbiased, since r_i is not in its own
    baseline). grpo: (r_i - group mean) / (group standard deviation + eps) (Shao et al.
    2024; the unbiased std and eps 1e-4, as TRL's GRPOTrainer), or without the division
    when `scale` is off (Liu et al. 2025). A group whose rewards are all equal gets 0."""
    g = rewards.float().view(-1, k)
    if estimator == "rloo":
        return (g - (g.sum(1, keepdim=True) - g) / (k - 1)).view(-1)
    adv = g - g.mean(1, keepdim=True)
    if scale:
        adv = adv / (g.std(1, keepdim=True) + eps)
    return adv.view(-1)


def advantages(r: Rollouts, g: GroupArgs, beta: float) -> tuple[Rollouts, dict]:
    """Phase 4: the rollouts with kl (log pi - log pi_ref per token), rewards (the sequence
    reward on its last token, as PPO's) and advantages (each response's group advantage
    on all its tokens) filled in, and the phase's statistics."""
    mask = r.response_mask.float()
    kl = (r.logprobs - r.ref_logprobs) * mask
    kl_sum = kl.sum(1)
    reward = r.score - beta * kl_sum if not g.kl_in_loss else r.score  # RLOO: the KL in the reward
    adv = group_advantages(reward, g.group_size, g.estimator, g.scale_rewards)
    last = (mask.sum(1).long() - 1).clamp(min=0)
    rewards = torch.zeros_like(mask).scatter(1, last[:, None], reward[:, None]) * mask
    _, k3 = kl_estimators(r.logprobs * mask, r.ref_logprobs * mask)
    spread = r.raw_score.float().view(-1, g.group_size).std(1)
    r = dataclasses.replace(r, kl=kl, rewards=rewards, advantages=adv[:, None] * mask)
    return r, {"objective/kl": float(kl_sum.mean()), "objective/kl_k3": float((k3 * mask).sum(1).mean()),
               "objective/reward": float((r.score - beta * kl_sum).mean()),
               "val/advantage_std": float(adv.std()) if adv.numel() > 1 else 0.0,
               "val/group_score_std": float(spread.mean()),
               "val/flat_groups": float((spread == 0).float().mean())}


def load_models(cfg: GRPOConfig, run: Run, sources: dict):
    """(actor, reference, reward model): the actor from the last checkpoint when resuming,
    else from the pinned SFT checkpoint; reference None means the actor with its LoRA
    adapters off; the reward model None when the reward is a function. No dropout."""
    actor = restore_models(run, {"actor": lambda: build_model(
        dataclasses.replace(cfg.actor, pretrain=sources["actor"]), "lm", cfg.lora, cfg.train.seed,
        what="actor.pretrain (-a)")})["actor"]
    reference = None
    if cfg.lora.r == 0:
        reference = load(sources["actor"], kind="lm").to(run.device).requires_grad_(False)
    reward = None
    if sources["reward"] is not None:
        try:
            reward = load_reward_model(sources["reward"]).to(run.device).requires_grad_(False)
        except CheckpointError as e:
            raise CheckpointError(f"reward (--reward): {e}; give a reward model trained by train_rm.py, or a function "
                                  f"(module:function, file.py:function)") from None
        if reward.config.vocab_size != actor.config.vocab_size:
            raise ConfigError(f"actor and reward model must share one vocabulary, got {actor.config.vocab_size} "
                              f"and {reward.config.vocab_size}")
    for m in (actor, reference, reward):
        if m is not None:
            set_dropout(m, 0.0).eval()
    return actor, reference, reward


def train(cfg: GRPOConfig, resume: str | Path | None = None, reward_fn: Callable | None = None,
          prompts: list[list[int]] | None = None) -> Path:
    """Run the critic-free trainer until train.max_steps iterations. `reward_fn` (texts ->
    scores) replaces cfg.reward; `prompts` (token ids) replace the prompt dataset."""
    run = open_run(cfg, "grpo", resume)
    if run.world.size > 1:
        raise ConfigError("the critic-free trainer runs in one process for now (SFT, RM and PPO run under torchrun)")
    g, t = cfg.grpo, cfg.train
    k, n_prompts = g.group_size, t.batch_size // g.group_size
    if not cfg.actor.pretrain or (cfg.reward is None and reward_fn is None):
        raise ConfigError("grpo needs -a/--actor (an SFT checkpoint) and --reward (a reward model, or a "
                          "function module:function / file.py:function)")
    enc = get_tokenizer()
    sources = model_sources(cfg, run, function_given=reward_fn is not None)
    if reward_fn is None and sources.get("reward_fn"):
        reward_fn = load_reward_function(sources["reward_fn"])
    actor, reference, reward_model = load_models(cfg, run, sources)
    score_fn = model_reward(reward_model, g.forward_batch_size) if reward_fn is None else callable_reward(reward_fn, enc)
    if actor.config.block_size < cfg.prompts.max_tokens + g.max_new_tokens:
        raise ConfigError(f"prompts.max_tokens + grpo.max_new_tokens ({cfg.prompts.max_tokens} + "
                          f"{g.max_new_tokens}) exceed the actor's context ({actor.config.block_size})")
    if prompts is None:
        records, _ = train_eval_records(cfg.data, t.seed)
        prompts, stats = prompt_examples(records, cfg.data, cfg.prompts.min_tokens, cfg.prompts.max_tokens, enc,
                                         "data.train", seed=t.seed)
        run.print(stats.report(), log=run.checkpoint is None)

    def groups_of(step: int, stream: BatchStream) -> tuple[torch.Tensor, torch.Tensor]:
        """Iteration `step`'s prompts, each repeated k times in a row: (B, Tq) left-padded."""
        q, m = left_pad([prompts[i] for i in stream.indices(step) for _ in range(k)], pad=eos_id(actor) or 0)
        return q.to(run.device), m.to(run.device)

    updates_per_iter = g.ppo_epochs * math.ceil(t.batch_size / g.mini_batch_size)
    stepper = Stepper(actor, run, cfg.optim, t, t.max_steps * updates_per_iter)
    stream = BatchStream(len(prompts), n_prompts, t.seed)
    kl_ctl = (AdaptiveKLController(g.kl_coef, g.target_kl, g.kl_horizon) if g.adaptive_kl
              else FixedKLController(g.kl_coef))
    if run.checkpoint is not None:
        gain, bias = run.state["reward_gain"], run.state["reward_bias"]
        kl_ctl.load_state_dict(run.state["kl_ctl"])
    elif g.normalize_reward:
        sampler = BatchStream(len(prompts), n_prompts, t.seed + 1)
        with run.autocast():
            gain, bias, n, warning = normalisation(actor, score_fn, (groups_of(i, sampler) for i in range(
                math.ceil(g.normalization_samples / t.batch_size))), g)
        run.print(f"reward normalisation from {n} rollouts: gain {gain:.4f}, bias {bias:.4f}"
                  + (f"\nwarning: {warning}" if warning else ""))
    else:
        gain, bias = 1.0, 0.0
    start = resume_step(run, {"actor_": stepper})
    kl_where = "a loss term (k3 per token)" if g.kl_in_loss else "a penalty in the reward (k1 summed)"
    header = (f"device {run.device}, {str(run.dtype).replace('torch.', '')}; {g.estimator}, {k} responses per "
              f"prompt, {n_prompts} prompts per iteration, KL to the reference as {kl_where}, beta {g.kl_coef}"
              f"{f' adapting to {g.target_kl} nats' if g.adaptive_kl else ''}; "
              f"{sum(p.numel() for p in stepper.params):,} trainable parameters; iterations {start}..{t.max_steps}"
              f"\nstarting from " + ", ".join(f"{a} {b}" for a, b in sources.items() if b is not None)
              + ("" if reward_model is not None or sources.get("reward_fn") else
                 f", reward {score_fn.name} (a Python function)"))
    with tracked(run, start, header) as tracker:
        for it in range(start, t.max_steps):
            seconds, t0 = {}, time.perf_counter()
            query, query_mask = groups_of(it, stream)                        # 0. prompts, k each
            with run.autocast():
                r = rollout(actor, query, query_mask, g)                       # 1. rollout
            seconds["generation"], t0 = time.perf_counter() - t0, time.perf_counter()
            with torch.no_grad(), run.autocast():
                raw, shaped = score(r, score_fn, g, gain, bias, it)          # 2. score
                r = dataclasses.replace(r, raw_score=raw, score=shaped)
                r, logs = logprobs_and_values(r, actor, reference, None, g)  # 3. logprobs
            beta = kl_ctl.value
            r, adv_stats = advantages(r, g, beta)                              # 4. advantages
            logs.update(adv_stats)
            seconds["scoring"], t0 = time.perf_counter() - t0, time.perf_counter()
            logs.update(ppo_update(actor, None, r, g, stepper, None, t.micro_batch_size or g.mini_batch_size,
                                   kl_loss_coef=beta if g.kl_in_loss else 0.0))  # 5. update
            seconds["update"] = time.perf_counter() - t0
            done = it + 1                                                     # 6. log
            kl_ctl.update(logs["objective/kl"], t.batch_size)
            logs.update(iteration_stats(r, beta, seconds), **{"optim/skipped_steps": stepper.skipped})
            tracker.scalars(done, logs)
            tracker.progress(1, score=logs["objective/raw_score"], kl=logs["objective/kl"])
            if g.sample_every and (done % g.sample_every == 0 or done == 1):
                run.print(samples_text(done, r, logs, enc))
            if is_due(done, t.save_every, t.max_steps):
                save(run, done, {"actor": actor}, {"actor_": stepper},
                     {"reward_gain": gain, "reward_bias": bias, "sources": sources, "kl_ctl": kl_ctl.state_dict(),
                      "data_position": stream.position(done)})
    return run.dir


def main(argv=None, usage: str = __doc__):
    cli(GRPOConfig, "grpo", train, argv, usage)
