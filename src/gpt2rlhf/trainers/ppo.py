"""PPO (actor-critic) RLHF against a reward model, one numbered phase per function:

    1. rollout      sample responses to a batch of left-padded prompts (KV cache), cut at EOS
    2. score        the reward model's score at the EOS / last real token (or a Python
                    callable on the texts); optional missing-EOS penalty, normalisation, clip
    3. logprobs     of the sampled tokens under actor and reference (logits / temperature)
    4. advantages   per-token KL penalty + score on the last token, critic values, GAE,
                    advantages whitened over valid tokens
    5. update       ppo_epochs passes over shuffled minibatches: clipped policy loss for the
                    actor, clipped value loss for the critic, each through the shared Stepper
    6. log          scores, KL (k1 and k3), beta, losses, clipfrac, approxkl, ratios,
                    entropy, advantage/return statistics, lengths, time per phase

The reference policy is the actor with its LoRA adapters switched off (no second copy),
or a frozen copy of the SFT model for full fine-tuning. Dropout is off in all four models.
"""

from __future__ import annotations

import math
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from ..checkpoint import load_pretrained
from ..config import ConfigError, PPOArgs, PPOConfig, resolve_input
from ..data import BatchStream, left_pad, prompt_examples, train_eval_records
from ..generation import generate
from ..lora import adapters_disabled
from ..losses import ppo_policy_loss, ppo_value_loss
from ..model import set_dropout
from ..rl import (AdaptiveKLController, FixedKLController, gae, kl_estimators, logprobs_from_logits, masked_mean,
                  masked_whiten, per_token_rewards)
from ..tokenizer import EOT_TOKEN, get_tokenizer
from ..tracking import Tracker
from .common import RewardError, Run, Stepper, build_model, cli, open_run, restore_models, resume_step, save


@dataclass
class Rollouts:
    """One iteration's experience; (B, Tq) prompts, (B, Tr) responses and per-token data."""

    query: torch.Tensor
    query_mask: torch.Tensor
    response: torch.Tensor
    response_mask: torch.Tensor
    logprobs: torch.Tensor | None = None
    values: torch.Tensor | None = None
    advantages: torch.Tensor | None = None
    returns: torch.Tensor | None = None

    def sequences(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Prompt + response ids and mask: [pad.. prompt | response ..pad]."""
        return torch.cat([self.query, self.response], 1), torch.cat([self.query_mask, self.response_mask], 1)

    def select(self, idx: torch.Tensor) -> "Rollouts":
        return Rollouts(*(None if v is None else v[idx] for v in vars(self).values()))


# ------------------------------------------------------------------ 1. rollout

def eos_id(model) -> int | None:
    """GPT-2's EOS, when the model's vocabulary has it (tiny test vocabularies do not)."""
    return EOT_TOKEN if model.config.vocab_size > EOT_TOKEN else None


@torch.no_grad()
def rollout(actor, query, query_mask, p: PPOArgs) -> Rollouts:
    eos = eos_id(actor)
    out = generate(actor, query, query_mask, max_new_tokens=p.max_new_tokens, min_new_tokens=p.min_new_tokens,
                   temperature=p.temperature, top_k=p.top_k, top_p=p.top_p, eos_token_id=eos,
                   pad_token_id=eos if eos is not None else 0)
    return Rollouts(query, query_mask, out.tokens, out.mask)


# ------------------------------------------------------------------ 2. score

def model_reward(reward_model) -> Callable[[Rollouts], torch.Tensor]:
    """Scores from a reward model, read at each sequence's last real token (its EOS, or
    the last token of a response cut at the length limit), never on padding."""
    @torch.no_grad()
    def score(r: Rollouts) -> torch.Tensor:
        ids, mask = r.sequences()
        return reward_model.score_last(ids, mask).float()
    return score


def callable_reward(fn: Callable[[list[str]], list[float]], enc) -> Callable[[Rollouts], torch.Tensor]:
    """Scores from a Python function of the response texts; its answer is checked."""
    def score(r: Rollouts) -> torch.Tensor:
        texts = [enc.decode([t for t, m in zip(row.tolist(), mask.tolist()) if m and t != EOT_TOKEN])
                 for row, mask in zip(r.response, r.response_mask)]
        values = list(fn(texts))
        if len(values) != len(texts):
            raise RewardError(f"the reward function returned {len(values)} scores for {len(texts)} responses")
        scores = torch.tensor([float(v) for v in values], device=r.response.device)
        bad = (~torch.isfinite(scores)).nonzero().flatten().tolist()
        if bad:
            raise RewardError(f"the reward function returned non-finite scores for responses {bad[:5]}: "
                              f"e.g. {texts[bad[0]]!r} -> {values[bad[0]]}")
        return scores
    return score


def shape_scores(raw: torch.Tensor, r: Rollouts, p: PPOArgs, gain: float, bias: float) -> torch.Tensor:
    """Normalise (gain, bias), penalise a response without EOS, clip."""
    score = raw * gain + bias
    if p.missing_eos_penalty is not None:
        score = score - p.missing_eos_penalty * (~has_eos(r)).float()
    if p.reward_clip > 0:
        score = score.clamp(-p.reward_clip, p.reward_clip)
    return score


def has_eos(r: Rollouts) -> torch.Tensor:
    return ((r.response == EOT_TOKEN) & r.response_mask.bool()).any(1)


# ------------------------------------------------------------------ 3. logprobs, values

def response_logprobs(model, r: Rollouts, temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(logprobs, logits) of the response tokens: position Tq-1+t predicts response token t."""
    ids, mask = r.sequences()
    logits = model(ids, attention_mask=mask)[:, r.query.size(1) - 1: -1]  # (B, Tr, V)
    return logprobs_from_logits(logits, r.response, temperature), logits


def response_values(critic, r: Rollouts) -> torch.Tensor:
    """V(prompt + response[:t]) for every response token t. (B, Tr)"""
    ids, mask = r.sequences()
    return critic(ids, attention_mask=mask)[:, r.query.size(1) - 1: -1].float()


# ------------------------------------------------------------------ 4. advantages

def advantages(r: Rollouts, score, ref_logprobs, beta: float, p: PPOArgs) -> dict:
    """Per-token rewards (KL penalty, score at the end), GAE, whitened advantages."""
    mask = r.response_mask.float()
    rewards, kl = per_token_rewards(score, r.logprobs, ref_logprobs, mask, beta)
    if p.whiten_rewards:
        rewards = masked_whiten(rewards, mask, shift_mean=False)
    adv, returns = gae(rewards, r.values, mask, p.gamma, p.lam)
    r.advantages, r.returns = masked_whiten(adv, mask), returns
    k1, k3 = kl_estimators(r.logprobs, ref_logprobs)
    return {"objective/kl": float((k1 * mask).sum(1).mean()), "objective/kl_k3": float((k3 * mask).sum(1).mean()),
            "objective/reward": float(rewards.sum(1).mean()), "val/advantage_mean": float(masked_mean(adv, mask)),
            "val/advantage_std": float(masked_mean((adv - masked_mean(adv, mask)) ** 2, mask).sqrt()),
            "val/return_mean": float(masked_mean(returns, mask)), "val/value_mean": float(masked_mean(r.values, mask))}


# ------------------------------------------------------------------ 5. update

def ppo_update(actor, critic, r: Rollouts, p: PPOArgs, actor_stepper: Stepper, critic_stepper: Stepper,
               micro_batch_size: int) -> dict:
    """ppo_epochs passes over the rollouts in shuffled minibatches; in each, one actor and
    one critic optimizer step (with gradient accumulation over micro-batches)."""
    B = r.query.size(0)
    stats: dict[str, list[float]] = {}

    def policy_loss(mb: Rollouts):
        logprobs, logits = response_logprobs(actor, mb, p.temperature)
        mask = mb.response_mask
        pg_loss, s = ppo_policy_loss(logprobs, mb.logprobs, mb.advantages, mask, p.clip_range)
        probs = torch.softmax(logits.float() / p.temperature, -1)
        entropy = masked_mean(-(probs * torch.log(probs.clamp_min(1e-12))).sum(-1), mask)
        return pg_loss - p.entropy_coef * entropy, {**s, "entropy": entropy.detach()}

    def value_loss(mb: Rollouts):
        vf_loss, s = ppo_value_loss(response_values(critic, mb), mb.values, mb.returns, mb.response_mask,
                                    p.clip_range_value)
        return p.vf_coef * vf_loss, {**s, "vf_loss": vf_loss.detach()}

    for _ in range(p.ppo_epochs):
        order = torch.randperm(B, device=r.query.device)
        for start in range(0, B, p.mini_batch_size):
            idx = order[start:start + p.mini_batch_size]
            micro = [r.select(idx[i:i + micro_batch_size]) for i in range(0, len(idx), micro_batch_size)]
            a = actor_stepper.step(micro, policy_loss)
            c = critic_stepper.step(micro, value_loss)
            for k, v in {"loss/policy": a["loss"], "loss/value": c["vf_loss"], "policy/clipfrac": a["clipfrac"],
                         "policy/approxkl": a["approxkl"], "policy/entropy": a["entropy"],
                         "policy/ratio_mean": a["ratio_mean"], "policy/ratio_max": a["ratio_max"],
                         "val/vf_clipfrac": c["vf_clipfrac"], "optim/actor_grad_norm": a["grad_norm"],
                         "optim/critic_grad_norm": c["grad_norm"], "optim/lr": a["lr"]}.items():
                stats.setdefault(k, []).append(v)
    out = {k: sum(v) / len(v) for k, v in stats.items()}
    out["policy/ratio_max"] = max(stats["policy/ratio_max"])
    return out


# ------------------------------------------------------------------ the stage

def load_models(cfg: PPOConfig, run: Run, with_reward_model: bool = True):
    """(actor, critic, reference, reward model): actor and critic from the last checkpoint
    when resuming, else from the SFT and RM checkpoints; dropout off everywhere."""
    if not cfg.actor.pretrain or not cfg.critic.pretrain:
        raise ConfigError("ppo needs -a/--actor (an SFT checkpoint) and -c/--critic (a reward-model checkpoint)")
    models = restore_models(run, {
        "actor": lambda: build_model(cfg.actor, "lm", cfg.lora, cfg.train.seed),
        "critic": lambda: build_model(cfg.critic, "scalar", cfg.critic_lora, cfg.train.seed)})
    actor, critic = models["actor"], models["critic"]
    if cfg.lora.r > 0:
        reference = None  # the actor with adapters off
    else:
        reference = load_pretrained(resolve_input(cfg.actor.pretrain), kind="lm").to(run.device)
        reference.requires_grad_(False)
    reward = None
    if with_reward_model:
        reward = load_pretrained(resolve_input(cfg.reward or cfg.critic.pretrain), kind="scalar").to(run.device)
        reward.requires_grad_(False)
    for m in (actor, critic, reference, reward):
        if m is not None:
            set_dropout(m, 0.0).eval()  # DESIGN.md detail 9
    vocabs = {name: m.config.vocab_size for name, m in (("actor", actor), ("critic", critic), ("reward model", reward))
              if m is not None}
    if len(set(vocabs.values())) > 1:
        raise ConfigError(f"actor, critic and reward model must share one vocabulary, got {vocabs}")
    return actor, critic, reference, reward


def train(cfg: PPOConfig, resume: str | Path | None = None,
          reward_fn: Callable[[list[str]], list[float]] | None = None,
          prompts: list[list[int]] | None = None) -> Path:
    """Run PPO. `reward_fn` (texts -> scores) replaces the reward model; `prompts` (token
    ids) replace the prompt dataset: both for programmatic tasks and tests."""
    run = open_run(cfg, "ppo", resume)
    p, t = cfg.ppo, cfg.train
    enc = get_tokenizer()

    if prompts is None:
        records, _ = train_eval_records(cfg.data, t.seed)
        prompts, stats = prompt_examples(records, cfg.data, cfg.prompts.min_tokens, cfg.prompts.max_tokens, enc,
                                         "data.train", seed=t.seed)
        run.print(stats.report())
    actor, critic, reference, reward_model = load_models(cfg, run, with_reward_model=reward_fn is None)
    score_fn = model_reward(reward_model) if reward_fn is None else callable_reward(reward_fn, enc)
    if actor.config.block_size < cfg.prompts.max_tokens + p.max_new_tokens:
        raise ConfigError(f"prompts.max_tokens + ppo.max_new_tokens ({cfg.prompts.max_tokens} + {p.max_new_tokens}) "
                          f"exceed the actor's context ({actor.config.block_size})")

    def reference_logprobs(r: Rollouts) -> torch.Tensor:
        ctx = adapters_disabled(actor) if reference is None else nullcontext()
        with ctx:
            return response_logprobs(actor if reference is None else reference, r, p.temperature)[0]

    micro = t.micro_batch_size or p.mini_batch_size
    updates_per_iter = p.ppo_epochs * math.ceil(t.batch_size / p.mini_batch_size)
    actor_stepper = Stepper(actor, run, cfg.optim, t, t.max_steps * updates_per_iter)
    critic_stepper = Stepper(critic, run, cfg.critic_optim, t, t.max_steps * updates_per_iter)
    kl_ctl = (AdaptiveKLController(p.kl_coef, p.target_kl, p.kl_horizon) if p.adaptive_kl
              else FixedKLController(p.kl_coef))
    stream = BatchStream(len(prompts), t.batch_size, t.seed)

    def batch_of(step: int, source: BatchStream = stream):
        q, m = left_pad([prompts[i] for i in source.indices(step)], pad=eos_id(actor) or 0)
        return q.to(run.device), m.to(run.device)

    # reward normalisation: gain and bias from the starting policy's scores (once)
    if run.checkpoint is not None:
        gain, bias = run.state["reward_gain"], run.state["reward_bias"]
        kl_ctl.load_state_dict(run.state["kl_ctl"])
    elif p.normalize_reward:
        raw, sampler = [], BatchStream(len(prompts), t.batch_size, t.seed + 1)
        with torch.no_grad(), run.autocast():
            for i in range(math.ceil(p.normalization_samples / t.batch_size)):
                raw.append(score_fn(rollout(actor, *batch_of(i, sampler), p)))
        raw = torch.cat(raw)
        gain, bias = 1.0 / (float(raw.std()) + 1e-8), -float(raw.mean()) / (float(raw.std()) + 1e-8)
        run.print(f"reward normalisation from {raw.numel()} rollouts: mean {raw.mean():.4f}, std {raw.std():.4f}")
    else:
        gain, bias = 1.0, 0.0
    start = resume_step(run, {"actor_": actor_stepper, "critic_": critic_stepper})
    run.tracker = tracker = Tracker(run.dir, t.max_steps, start)
    run.print(f"run folder: {run.dir}\ndevice {run.device}, {str(run.dtype).replace('torch.', '')}; actor "
              f"{sum(q.numel() for q in actor_stepper.params):,} trainable, critic "
              f"{sum(q.numel() for q in critic_stepper.params):,} trainable; iterations {start}..{t.max_steps}")
    try:
        for it in range(start, t.max_steps):
            t0 = time.perf_counter()
            # 1. rollout
            with run.autocast():
                r = rollout(actor, *batch_of(it), p)
            t1 = time.perf_counter()
            with torch.no_grad(), run.autocast():
                # 2. score
                raw = score_fn(r)
                score = shape_scores(raw, r, p, gain, bias)
                # 3. logprobs under actor and reference; critic values
                r.logprobs = response_logprobs(actor, r, p.temperature)[0].float()
                ref_logprobs = reference_logprobs(r).float()
                r.values = response_values(critic, r)
            # 4. advantages
            logs = advantages(r, score, ref_logprobs, kl_ctl.value, p)
            t2 = time.perf_counter()
            # 5. update
            logs.update(ppo_update(actor, critic, r, p, actor_stepper, critic_stepper, micro))
            t3 = time.perf_counter()
            kl_ctl.update(logs["objective/kl"], t.batch_size)
            # 6. log
            lengths = r.response_mask.sum(1).float()
            done = it + 1
            logs.update({"objective/raw_score": float(raw.mean()), "objective/score": float(score.mean()),
                         "objective/kl_coef": kl_ctl.value, "objective/response_length": float(lengths.mean()),
                         "objective/no_eos_share": float((~has_eos(r)).float().mean()),
                         "optim/skipped_steps": actor_stepper.skipped + critic_stepper.skipped,
                         "time/generation": t1 - t0, "time/scoring": t2 - t1, "time/update": t3 - t2,
                         "time/iteration": t3 - t0})
            tracker.scalars(done, logs)
            tracker.progress(1, score=logs["objective/raw_score"], kl=logs["objective/kl"])
            if p.sample_every and (done % p.sample_every == 0 or done == 1):
                lines = [f"iteration {done}: raw score {logs['objective/raw_score']:.4f}, kl {logs['objective/kl']:.3f}, "
                         f"beta {kl_ctl.value:.4f}, generation {t1 - t0:.1f}s, update {t3 - t2:.1f}s"]
                for i in range(min(3, r.query.size(0))):
                    q = enc.decode(r.query[i][r.query_mask[i].bool()].tolist())
                    a = enc.decode([x for x, m in zip(r.response[i].tolist(), r.response_mask[i].tolist())
                                    if m and x != EOT_TOKEN])
                    lines.append(f"  [{float(raw[i]):+.3f}] {q!r} -> {a!r}")
                run.print("\n".join(lines))
            if (t.save_every and done % t.save_every == 0) or done == t.max_steps:
                save(run, done, {"actor": actor, "critic": critic},
                     {"actor_": actor_stepper, "critic_": critic_stepper},
                     {"kl_ctl": kl_ctl.state_dict(), "reward_gain": gain, "reward_bias": bias,
                      "data_position": stream.position(done)})
        run.print(f"done: {run.dir}")
    finally:
        tracker.close()
        run.tracker = None
    return run.dir


def main(argv=None, usage: str = __doc__):
    cli(PPOConfig, "ppo", train, argv, usage)
