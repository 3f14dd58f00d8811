"""PPO (actor-critic) RLHF against a reward model, one numbered phase per function:

    1. rollout      sample responses to a batch of left-padded prompts (KV cache), cut at EOS
    2. score        the reward model's score at the EOS / last real token (or a Python
                    callable on the texts); optional missing-EOS penalty, normalisation, clip
    3. logprobs     of the sampled tokens under actor and reference, from the distribution
                    they were sampled from (logits / temperature, EOS masked before
                    min_new_tokens), in fp32, forward_batch_size rows at a time; the
                    rollout policy's entropy (objective/entropy)
    4. advantages   per-token KL penalty + score on the last token, critic values, GAE,
                    advantages whitened over valid tokens
    5. update       ppo_epochs passes over shuffled minibatches: clipped policy loss for the
                    actor, clipped value loss for the critic, each through the shared Stepper
                    (micro-batches weighted by their tokens); optional early stop on approxkl
    6. log          scores, total reward, KL (k1 and k3), beta, losses, clipfrac, approxkl,
                    ratios, entropies, explained variance, advantage/return statistics,
                    lengths, time per phase; every ppo.sample_every iterations, samples and
                    the first rollouts with their per-token data (rollouts/, the inspector's)

PPOLab runs these phases one method each, for a notebook or a debugger; train() is
PPOLab.step() in a loop.

The reference policy is the actor with its LoRA adapters switched off (no second copy),
or a frozen copy of the SFT model for full fine-tuning. Dropout is off in all four models.
The critic starts as the reward model with the reward normalisation (gain, bias) folded
into its head, so its first values are on the scale of the returns. The checkpoints a run
starts from are resolved once and pinned in its state: a resumed run uses exactly those.
"""

from __future__ import annotations

import dataclasses
import math
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..checkpoint import CheckpointError
from ..loading import load, load_reward_model
from ..runs import is_run_folder, resolve_run
from ..config import ConfigError, PPOArgs, PPOConfig, load_config, resolve_input
from ..data import BatchStream, left_pad, prompt_examples, train_eval_records
from ..distributed import World
from ..generation import generate
from ..lora import adapters_disabled
from ..losses import kl_loss_k3, ppo_policy_loss, ppo_value_loss
from ..model import set_dropout
from ..rewards import RewardFunction, is_reward_spec, load_reward_function, one_line
from ..rl import (AdaptiveKLController, FixedKLController, entropy_from_logprobs, explained_variance, gae,
                  kl_estimators, masked_mean, masked_whiten, per_token_rewards, reward_normalisation,
                  sampling_logits_)
from ..tokenizer import EOT_TOKEN, get_tokenizer, response_text
from .common import (RewardError, Run, Stepper, build_model, cli, find_run, is_due, open_run, restore_models,
                     resume_step, save, tracked)


@dataclass
class Rollouts:
    """One iteration's experience: (B, Tq) prompts, (B, Tr) responses, (B,) scores and
    (B, Tr) per-token data, filled in phase by phase (None until its phase has run):
    rollout: query, query_mask (1 on real prompt tokens, left-padded), response,
        response_mask (1 on real response tokens up to and including EOS);
    score: raw_score (the reward model's or function's), score (normalised, shaped);
    logprobs and values: logprobs (actor), ref_logprobs (reference), values (critic);
    advantages: kl (log pi - log pi_ref per token), rewards (-beta * kl, plus the score on
        the last real token), advantages (GAE, whitened), returns (GAE advantages + values)."""

    query: torch.Tensor
    query_mask: torch.Tensor
    response: torch.Tensor
    response_mask: torch.Tensor
    logprobs: torch.Tensor | None = None
    values: torch.Tensor | None = None
    advantages: torch.Tensor | None = None
    returns: torch.Tensor | None = None
    ref_logprobs: torch.Tensor | None = None
    raw_score: torch.Tensor | None = None
    score: torch.Tensor | None = None
    kl: torch.Tensor | None = None
    rewards: torch.Tensor | None = None

    def sequences(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Prompt + response ids and mask: [pad.. prompt | response ..pad]."""
        return torch.cat([self.query, self.response], 1), torch.cat([self.query_mask, self.response_mask], 1)

    def select(self, idx: torch.Tensor | slice) -> "Rollouts":
        return Rollouts(*(None if v is None else v[idx] for v in vars(self).values()))


def in_chunks(fn: Callable[["Rollouts"], torch.Tensor], r: Rollouts, size: int) -> torch.Tensor:
    """fn over the rollouts `size` rows at a time, concatenated: a large batch never holds
    its B x T x vocabulary logits at once (ppo.forward_batch_size)."""
    B = r.query.size(0)
    return torch.cat([fn(r.select(slice(i, i + size))) for i in range(0, B, size)])


# ------------------------------------------------------------------ 1. rollout

def eos_id(model) -> int | None:
    """GPT-2's EOS, when the model's vocabulary has it (tiny test vocabularies do not)."""
    return EOT_TOKEN if model.config.vocab_size > EOT_TOKEN else None


@torch.no_grad()
def rollout(actor, query, query_mask, p: PPOArgs, world: World = World()) -> Rollouts:
    """Under torchrun every rank samples its share of the prompts, and all ranks take the
    same number of decode steps (generate's all_finished): a rank whose rows all ended
    keeps stepping until every rank's have, so the responses have one width everywhere.
    Every rank draws the random numbers of the whole batch and uses its rows' (generate's
    rows): from the same random state, N processes sample what one process samples."""
    eos = eos_id(actor)
    out = generate(actor, query, query_mask, max_new_tokens=p.max_new_tokens, min_new_tokens=p.min_new_tokens,
                   temperature=p.temperature, top_k=p.top_k, top_p=p.top_p, eos_token_id=eos,
                   pad_token_id=eos if eos is not None else 0, all_finished=world.all if world.size > 1 else None,
                   rows=(world.rank * query.size(0), world.size * query.size(0)) if world.size > 1 else None)
    return Rollouts(query, query_mask, out.tokens, out.mask)


# ------------------------------------------------------------------ 2. score

def model_reward(reward_model, forward_batch_size: int = 16) -> Callable[[Rollouts], torch.Tensor]:
    """Scores from a reward model, read at each sequence's last real token (its EOS, or
    the last token of a response cut at the length limit), never on padding."""
    @torch.no_grad()
    def score(r: Rollouts) -> torch.Tensor:
        return in_chunks(lambda c: reward_model.score_last(*c.sequences()).float(), r, forward_batch_size)
    return score


def callable_reward(fn: Callable, enc, name: str | None = None) -> Callable[[Rollouts], torch.Tensor]:
    """Scores from a Python function of the response texts (and of the prompt texts, when
    it takes them: rewards.RewardFunction); its answer is checked, and every error names it."""
    if not isinstance(fn, RewardFunction):
        fn = RewardFunction(fn, name or getattr(fn, "__qualname__", repr(fn)))

    def score(r: Rollouts) -> torch.Tensor:
        texts = [response_text(enc, row, mask) for row, mask in zip(r.response, r.response_mask)]
        prompts = ([enc.decode(q[m.bool()].tolist()) for q, m in zip(r.query, r.query_mask)]
                   if fn.with_prompts else None)
        try:
            values = fn(texts, prompts)
        except Exception as e:  # the user's code: its error, in one line that names it
            raise RewardError(f"reward {fn.name} raised {type(e).__name__}: {one_line(e)}") from e
        try:
            values = list(values)
        except TypeError:
            raise RewardError(f"reward {fn.name} returned {type(values).__name__}, not a list of "
                              f"{len(texts)} numbers") from None
        if len(values) != len(texts):
            raise RewardError(f"reward {fn.name} returned {len(values)} scores for {len(texts)} responses")
        try:
            scores = torch.tensor([float(v) for v in values], device=r.response.device)
        except (TypeError, ValueError) as e:
            raise RewardError(f"reward {fn.name} returned something that is not a number ({e}): "
                              f"{values[:3]!r}") from None
        bad = (~torch.isfinite(scores)).nonzero().flatten().tolist()
        if bad:
            raise RewardError(f"reward {fn.name} returned non-finite scores for responses {bad[:5]}: "
                              f"e.g. {texts[bad[0]]!r} -> {values[bad[0]]}")
        return scores
    score.name = fn.name
    return score


def check_scores(raw: torch.Tensor, done: int | None):
    """A non-finite score would turn every advantage into NaN: stop with a clear message
    instead of training on it (the checkpoints of the `done` iterations so far are kept;
    None: while normalising, before the first iteration)."""
    bad = (~torch.isfinite(raw)).nonzero().flatten().tolist()
    if bad:
        when = "reward normalisation" if done is None else f"iteration {done + 1}"
        raise RewardError(f"{when}: the reward gave non-finite scores for {len(bad)} of {raw.numel()} responses "
                          f"(rows {bad[:5]}); stopping. Fix the reward (model or function); the run resumes from "
                          f"its last checkpoint")


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


def score(r: Rollouts, score_fn, p: PPOArgs, gain: float, bias: float, done: int,
          world: World = World()) -> tuple[torch.Tensor, torch.Tensor]:
    """(raw, shaped) scores of one rollout batch; a non-finite raw score stops the run
    (checked over every rank's scores, so that every rank stops with the same message)."""
    raw = world.agree(lambda: score_fn(r))  # a reward that fails on one rank stops every rank with its message
    check_scores(world.gather(raw), done)
    return raw, shape_scores(raw, r, p, gain, bias)


@torch.no_grad()
def normalisation(actor, score_fn, batches, p: PPOArgs, world: World = World()) -> tuple[float, float, int, str | None]:
    """(gain, bias, rollouts scored, warning): the affine map that gives the starting
    policy's raw scores mean 0 and std 1, from rollouts of the (prompts, mask) batches;
    computed once, before the first iteration (lm-human-preferences' reward normalisation).
    Under torchrun each rank rolls out its share of every batch, and the statistics are
    those of all the ranks' scores together."""
    scores = []
    for q, m in batches:
        r = rollout(actor, q, m, p, world)
        scores.append(world.agree(lambda: score_fn(r)))
    raw = world.gather(torch.cat(scores))
    check_scores(raw, None)
    try:
        gain, bias, warning = reward_normalisation(raw)
    except ValueError as e:
        raise RewardError(str(e)) from None
    return gain, bias, raw.numel(), warning


# ------------------------------------------------------------------ 3. logprobs, values

class ResponseLogits(nn.Module):
    """A language model's fp32 logits at the positions that predict the response tokens:
    position Tq-1+t predicts response token t, so only those hidden states go through the
    LM head (model.fp32_logits). A module of its own so that, under torchrun, the actor's
    loss runs through DistributedDataParallel's forward (DDP averages the gradients of what
    its forward ran); its parameters are the language model's."""

    def __init__(self, lm: nn.Module):
        super().__init__()
        self.lm = lm

    def forward(self, ids: torch.Tensor, mask: torch.Tensor, prompt_width: int) -> torch.Tensor:
        hidden = self.lm.transformer(ids, attention_mask=mask)[:, prompt_width - 1: -1]  # (B, Tr, C)
        return self.lm.fp32_logits(hidden)  # (B, Tr, V)


def response_logprobs(model, r: Rollouts, p: PPOArgs, with_entropy: bool = False, logits_of: nn.Module | None = None):
    """(logprobs (B, Tr), entropy (B, Tr) or None) of the response tokens under `model`.

    The logits are ResponseLogits' (or `logits_of`'s: the same module wrapped by DDP). The
    distribution is the one the tokens were sampled from: logits / temperature, EOS
    impossible before min_new_tokens (rl.sampling_logits_, in place on the head's fresh
    output). The entropy builds an autograd graph only when it is in the loss
    (ppo.entropy_coef > 0)."""
    ids, mask = r.sequences()
    logits = (logits_of or ResponseLogits(model))(ids, mask, r.query.size(1))
    logits = sampling_logits_(logits, p.temperature, eos_id(model), p.min_new_tokens)
    logp = F.log_softmax(logits, dim=-1)  # (B, Tr, V)
    del logits  # log_softmax saves its output, not its input: one B x Tr x V tensor fewer at the peak
    logprobs = logp.gather(-1, r.response[..., None]).squeeze(-1)
    if not with_entropy:
        return logprobs, None
    with torch.set_grad_enabled(torch.is_grad_enabled() and p.entropy_coef > 0):
        return logprobs, entropy_from_logprobs(logp)


def response_values(critic, r: Rollouts) -> torch.Tensor:
    """V(prompt + response[:t]) for every response token t. (B, Tr)"""
    ids, mask = r.sequences()
    return critic(ids, attention_mask=mask)[:, r.query.size(1) - 1: -1].float()


@torch.no_grad()
def logprobs_and_values(r: Rollouts, actor, reference, critic, p: PPOArgs,
                        world: World = World()) -> tuple[Rollouts, dict]:
    """(the rollouts with the actor's log-probs, the reference's log-probs and the critic's
    values filled in, {"objective/entropy": the mean entropy per response token of the
    policy the rollouts were sampled from}); reference None means the actor with its LoRA
    adapters off. ppo.forward_batch_size rows per forward pass. The entropy is taken here,
    once per iteration from logits already computed (TRL logs the same rollout quantity as
    objective/entropy), not in every minibatch of the update, where it cost a tenth of the
    update on CPU; policy/entropy, the update's, is logged when it is in the loss
    (ppo.entropy_coef > 0)."""
    def reference_logprobs(c: Rollouts) -> torch.Tensor:
        with adapters_disabled(actor) if reference is None else nullcontext():
            return response_logprobs(actor if reference is None else reference, c, p)[0]

    size = p.forward_batch_size
    chunks = [response_logprobs(actor, r.select(slice(i, i + size)), p, with_entropy=True)
              for i in range(0, r.query.size(0), size)]
    logprobs, entropy = torch.cat([lp for lp, _ in chunks]), torch.cat([h for _, h in chunks])
    ref_logprobs = in_chunks(reference_logprobs, r, size)
    values = None if critic is None else in_chunks(lambda c: response_values(critic, c), r, size)
    mask = r.response_mask.float()
    if world.size == 1:
        stats = {"objective/entropy": float(masked_mean(entropy, mask))}
    else:  # the mean over every rank's response tokens
        total = world.sum(torch.stack([(entropy * mask).sum(), mask.sum()]).double())
        stats = {"objective/entropy": float(total[0] / total[1])}
    return dataclasses.replace(r, logprobs=logprobs, ref_logprobs=ref_logprobs, values=values), stats


@torch.no_grad()
def ratios(actor, r: Rollouts, p: PPOArgs) -> torch.Tensor:
    """pi_now(token) / pi_rollout(token) for every response token (0 on padding): exactly 1
    before any update; after the update, how far it moved each token's probability."""
    logprobs = in_chunks(lambda c: response_logprobs(actor, c, p)[0], r, p.forward_batch_size)
    return torch.exp(logprobs - r.logprobs) * r.response_mask


def fold_normalisation(critic, gain: float, bias: float):
    """Put the reward normalisation into the critic's head, so that a critic that starts as
    the reward model predicts normalised scores (lm-human-preferences keeps gain and bias in
    the reward model's head; OpenRLHF normalises its critic like its RM). Without it the
    first values sit on the raw RM scale while the returns are normalised, and value
    clipping keeps the baseline biased for many iterations. In place."""
    with torch.no_grad():
        critic.score.weight.mul_(gain)
        critic.score.bias.mul_(gain).add_(bias)


# ------------------------------------------------------------------ 4. advantages

def advantages(r: Rollouts, score, ref_logprobs, beta: float, p: PPOArgs) -> tuple[Rollouts, dict]:
    """Per-token rewards (KL penalty, score at the end), GAE, whitened advantages: the
    rollouts with score, ref_logprobs, kl, rewards, advantages and returns filled in, and
    the phase's statistics."""
    mask = r.response_mask.float()
    rewards, kl = per_token_rewards(score, r.logprobs, ref_logprobs, mask, beta)
    total = rewards.sum(1)  # score - beta * KL per response, before any whitening
    gae_rewards = masked_whiten(rewards, mask, shift_mean=False) if p.whiten_rewards else rewards
    adv, returns = gae(gae_rewards, r.values, mask, p.gamma, p.lam)
    k1, k3 = kl_estimators(r.logprobs * mask, ref_logprobs * mask)  # padding out before expm1 (k3 overflows)
    r = dataclasses.replace(r, score=score, ref_logprobs=ref_logprobs, kl=kl, rewards=rewards,
                            advantages=masked_whiten(adv, mask), returns=returns)
    return r, {"objective/kl": float((k1 * mask).sum(1).mean()), "objective/kl_k3": float((k3 * mask).sum(1).mean()),
               "objective/reward": float(total.mean()), "val/advantage_mean": float(masked_mean(adv, mask)),
               "val/advantage_std": float(masked_mean((adv - masked_mean(adv, mask)) ** 2, mask).sqrt()),
               "val/return_mean": float(masked_mean(returns, mask)), "val/value_mean": float(masked_mean(r.values, mask)),
               "val/explained_variance": explained_variance(r.values, returns, mask)}


def advantages_across(r: Rollouts, score, ref_logprobs, beta: float, p: PPOArgs,
                      world: World) -> tuple[Rollouts, dict]:
    """advantages() under torchrun: every rank gathers the per-token data of the whole
    batch (a few floats per token), runs the 1-process computation on it and keeps its
    own rows. So the advantage whitening, the KL that the adaptive controller sees and
    every logged statistic are those of the global batch, exactly as one process computes
    them from the union of the ranks' rollouts."""
    if world.size == 1:
        return advantages(r, score, ref_logprobs, beta, p)
    rows = slice(world.rank * r.response.size(0), (world.rank + 1) * r.response.size(0))
    whole = Rollouts(r.query[:0], r.query_mask[:0], *(world.gather(x) for x in (r.response, r.response_mask)),
                     logprobs=world.gather(r.logprobs), values=world.gather(r.values))
    whole, stats = advantages(whole, world.gather(score), world.gather(ref_logprobs), beta, p)
    return dataclasses.replace(r, score=score, ref_logprobs=ref_logprobs, kl=whole.kl[rows],
                               rewards=whole.rewards[rows], advantages=whole.advantages[rows],
                               returns=whole.returns[rows]), stats


# ------------------------------------------------------------------ 5. update

def policy_loss(actor, mb: Rollouts, p: PPOArgs, logits_of: nn.Module | None = None, kl_loss_coef: float = 0.0):
    """The actor's loss on one micro-batch: clipped surrogate, minus the entropy bonus
    when ppo.entropy_coef > 0 (the entropy is then computed here, with its gradient, and
    logged as policy/entropy; at 0 only the rollout's objective/entropy is logged).
    `logits_of`: the actor's ResponseLogits wrapped by DDP, under torchrun.
    `kl_loss_coef` > 0 (the critic-free trainer's GRPO form; PPO keeps the KL in the
    reward): plus that times the k3 estimate of KL(pi || pi_ref) per token, averaged over
    the valid tokens (losses.kl_loss_k3), logged as kl_loss."""
    logprobs, entropy = response_logprobs(actor, mb, p, with_entropy=p.entropy_coef > 0, logits_of=logits_of)
    pg_loss, s = ppo_policy_loss(logprobs, mb.logprobs, mb.advantages, mb.response_mask, p.clip_range)
    if kl_loss_coef > 0:
        kl = kl_loss_k3(logprobs, mb.ref_logprobs, mb.response_mask)
        pg_loss, s = pg_loss + kl_loss_coef * kl, {**s, "kl_loss": kl.detach()}
    if entropy is None:
        return pg_loss, s
    entropy = masked_mean(entropy, mb.response_mask)
    return pg_loss - p.entropy_coef * entropy, {**s, "entropy": entropy.detach()}


def value_loss(critic, mb: Rollouts, p: PPOArgs):
    """The critic's loss on one micro-batch: clipped value loss."""
    vf_loss, s = ppo_value_loss(response_values(critic, mb), mb.values, mb.returns, mb.response_mask,
                                p.clip_range_value)
    return vf_loss, {**s, "vf_loss": vf_loss.detach()}


UPDATE_TAGS = {"loss/policy": ("a", "loss"), "loss/value": ("c", "vf_loss"), "policy/clipfrac": ("a", "clipfrac"),
               "policy/approxkl": ("a", "approxkl"), "policy/entropy": ("a", "entropy"),
               "policy/ratio_mean": ("a", "ratio_mean"), "policy/ratio_max": ("a", "ratio_max"),
               "policy/ratio_outside_clip": ("a", "ratio_outside_clip"), "val/vf_clipfrac": ("c", "vf_clipfrac"),
               "optim/actor_grad_norm": ("a", "grad_norm"), "optim/critic_grad_norm": ("c", "grad_norm"),
               "policy/kl_loss": ("a", "kl_loss")}


def ppo_update(actor, critic, r: Rollouts, p: PPOArgs, actor_stepper: Stepper, critic_stepper: Stepper | None,
               micro_batch_size: int, world: World = World(), actor_ddp: nn.Module | None = None,
               critic_ddp: nn.Module | None = None, kl_loss_coef: float = 0.0) -> dict:
    """ppo_epochs passes over the rollouts in shuffled minibatches; in each, one actor and
    one critic optimizer step (gradient accumulation over micro-batches, each weighted by
    its valid tokens, so a step does not depend on the micro-batch size).

    Statistics are means over the steps that were taken (a skipped, non-finite step is
    counted in optim/skipped_steps, not averaged in as NaN); policy/ratio_max is the
    largest ratio of any valid token. With ppo.target_approxkl, no further epoch starts once
    an epoch's mean approxkl exceeds it (cleanrl's target_kl and TRL's early_stopping also
    stop between epochs). The critic-free trainer calls it with critic None (no value
    step) and, for GRPO's form, kl_loss_coef > 0 (policy_loss).

    Under torchrun every rank gathers the whole batch's rollouts, the ranks shuffle it in
    one order (rank 0's), and each takes its 1/N of every minibatch: the minibatches are
    those of one process, and every rank makes the same number of steps. DDP averages the
    gradients, the Stepper weighs each rank's tokens in the global total, and the
    statistics come back reduced over the ranks, so every rank takes the same early-stop
    decision."""
    if world.size > 1:  # the whole batch's rollouts on every rank (a few numbers per token)
        r = Rollouts(*(None if v is None else world.gather(v) for v in (
            r.query, r.query_mask, r.response, r.response_mask, r.logprobs, r.values, r.advantages, r.returns,
            r.ref_logprobs if kl_loss_coef > 0 else None)))
    B = r.query.size(0)
    stats: dict[str, list[float]] = {}
    lr = actor_stepper.scheduler.get_last_lr()[0]
    updates, early_stop = 0, False
    for _ in range(p.ppo_epochs):
        order = torch.randperm(B, device=r.query.device)
        if world.size > 1:  # one order for all (rank 0's), as one process shuffles the whole batch
            order = world.broadcast(order.cpu()).to(r.query.device)
        epoch_kl = []
        for start in range(0, B, p.mini_batch_size):
            idx = world.share(order[start:start + p.mini_batch_size], "ppo.mini_batch_size")  # this rank's part
            micro = [r.select(idx[i:i + micro_batch_size]) for i in range(0, len(idx), micro_batch_size)]
            tokens = [float(mb.response_mask.sum()) for mb in micro]
            a = actor_stepper.step(micro, lambda mb: policy_loss(actor, mb, p, actor_ddp, kl_loss_coef), tokens)
            c = None if critic is None else critic_stepper.step(
                micro, lambda mb: value_loss(critic_ddp or critic, mb, p), tokens)
            updates += 1
            for tag, (side, key) in UPDATE_TAGS.items():
                out = a if side == "a" else c
                if out is None or out["skipped"] or key not in out:  # no critic; entropy, kl_loss not computed
                    continue
                stats.setdefault(tag, []).append(out[key])
            if not a["skipped"]:
                epoch_kl.append(a["approxkl"])
        # early stop between epochs, so every minibatch gets the same number of passes
        if p.target_approxkl is not None and epoch_kl and sum(epoch_kl) / len(epoch_kl) > p.target_approxkl:
            early_stop = True
            break
    out = {k: (max(v) if k == "policy/ratio_max" else sum(v) / len(v)) for k, v in stats.items()}
    out.update({"optim/lr": lr, "policy/updates": updates, "policy/early_stop": float(early_stop)})
    return out


# ------------------------------------------------------------------ 6. log

def iteration_stats(r: Rollouts, beta: float, seconds: dict[str, float], world: World = World()) -> dict:
    """The rollout side of an iteration's scalars (the update adds its own): scores,
    beta, lengths, the share without EOS, and the time of each phase (rank 0's); under
    torchrun over every rank's rollouts."""
    if world.size > 1:
        r = Rollouts(r.query[:0], r.query_mask[:0], world.gather(r.response), world.gather(r.response_mask),
                     raw_score=world.gather(r.raw_score), score=world.gather(r.score))
    return {"objective/raw_score": float(r.raw_score.mean()), "objective/score": float(r.score.mean()),
            "objective/kl_coef": beta, "objective/response_length": float(r.response_mask.sum(1).float().mean()),
            "objective/no_eos_share": float((~has_eos(r)).float().mean()),
            **{f"time/{k}": v for k, v in seconds.items()}, "time/iteration": sum(seconds.values())}


def samples_text(done: int, r: Rollouts, logs: dict, enc, n: int = 3) -> str:
    """A few prompt -> response pairs with their raw scores, for the console and log.txt."""
    lines = [f"iteration {done}: raw score {logs['objective/raw_score']:.4f}, kl {logs['objective/kl']:.3f}, "
             f"beta {logs['objective/kl_coef']:.4f}, generation {logs['time/generation']:.1f}s, "
             f"update {logs['time/update']:.1f}s"]
    for i in range(min(n, r.query.size(0))):
        q = enc.decode(r.query[i][r.query_mask[i].bool()].tolist())
        a = response_text(enc, r.response[i], r.response_mask[i])
        lines.append(f"  [{float(r.raw_score[i]):+.3f}] {q!r} -> {a!r}")
    return "\n".join(lines)


INSPECT_ROWS = 8  # rollouts saved per sampled iteration for the per-token inspector
PER_TOKEN = ("logprobs", "ref_logprobs", "kl", "values", "rewards", "advantages", "returns", "ratio")


def rollout_record(done: int, r: Rollouts, ratio: torch.Tensor, logs: dict, enc) -> dict:
    """What the inspector (src/inspect_rollouts.py) reads of one iteration: the first rows
    of its rollouts, their tokens as text, every per-token quantity on the response tokens
    (padding cut off), the scores and the iteration's scalars. Plain tensors, lists and
    numbers: torch.load(..., weights_only=True) reads it."""
    rows = []
    for i in range(min(INSPECT_ROWS, r.query.size(0))):
        n = int(r.response_mask[i].sum())
        q = r.query[i][r.query_mask[i].bool()].tolist()
        ids = r.response[i, :n].tolist()
        per_token = {"ratio": ratio[i, :n]}
        per_token.update({k: getattr(r, k)[i, :n] for k in PER_TOKEN if k != "ratio"})
        rows.append({"prompt_ids": q, "prompt": enc.decode(q), "response_ids": ids,
                     "tokens": [enc.decode([t]) for t in ids], "raw_score": float(r.raw_score[i]),
                     "score": float(r.score[i]), **{k: v.detach().float().cpu().clone() for k, v in per_token.items()}})
    return {"iteration": done, "rows": rows, "scalars": {k: float(v) for k, v in logs.items()}}


# ------------------------------------------------------------------ the stage

def pin(source: str | None) -> str | None:
    """A model source as the exact checkpoint it means now: a run folder becomes its
    latest checkpoint, a folder its absolute path; a hub name stays a name."""
    if source is None:
        return None
    path = Path(resolve_input(source))
    if is_run_folder(path):
        try:
            path = resolve_run(path)
        except CheckpointError:
            pass  # a run without a checkpoint: load() names it
    return str(path.resolve()) if path.exists() else source


def pin_reward_spec(spec: str) -> str:
    """A reward function's file.py:function with the file's absolute path (a module name stays)."""
    target, _, name = spec.rpartition(":")
    path = Path(resolve_input(target))
    return f"{path.resolve()}:{name}" if target.endswith(".py") and path.is_file() else spec


def model_sources(cfg: PPOConfig, run: Run, function_given: bool = False) -> dict:
    """{"actor", "critic", "reward", "reward_fn"}: the checkpoints this run starts from (and
    the reward function cfg.reward names, if it names one), resolved once when it starts
    and pinned in its state. A resumed run takes them from there, so its reference and
    reward are exactly those it started with, even if the SFT or RM run folder it named has
    moved on to a newer checkpoint since. `function_given`: the reward is a Python function
    passed in (train(reward_fn=...)), so neither is pinned."""
    critic = getattr(cfg, "critic", None)  # the critic-free trainer's config has none
    if critic is not None and (not cfg.actor.pretrain or not critic.pretrain):
        raise ConfigError("ppo needs -a/--actor (an SFT checkpoint) and -c/--critic (a reward-model checkpoint)")
    if run.checkpoint is not None and "sources" in run.state:
        sources = run.state["sources"]
        for name, src in sources.items():
            path = Path(src.rpartition(":")[0] if name == "reward_fn" and src else src or "")
            if src is not None and path.is_absolute() and not path.exists():
                raise ConfigError(f"--resume: this run started from the {name} {path}, which is gone; "
                                  f"restore it to resume (a different {name} would change the run)")
        return sources
    if run.checkpoint is not None:  # a run from before sources were pinned
        run.print("note: this checkpoint does not pin its reference and reward model; resolving them again")
    spec = not function_given and is_reward_spec(cfg.reward)
    return {"actor": pin(cfg.actor.pretrain), "critic": pin(critic.pretrain) if critic else None,
            "reward": None if function_given or spec else pin(cfg.reward or critic.pretrain),
            "reward_fn": pin_reward_spec(cfg.reward) if spec else None}


def load_models(cfg: PPOConfig, run: Run, sources: dict):
    """(actor, critic, reference, reward model): actor and critic from the last checkpoint
    when resuming, else from the pinned SFT and RM checkpoints; dropout off everywhere.
    The critic must start from a scalar model (a reward model, or a PPO run's critic)
    unless critic_new_head asks for a language model with a new head; the reward model
    must be a reward model: a wrong kind of checkpoint is an error naming the option."""
    models = restore_models(run, {
        "actor": lambda: build_model(dataclasses.replace(cfg.actor, pretrain=sources["actor"]), "lm", cfg.lora,
                                     cfg.train.seed, what="actor.pretrain (-a)"),
        "critic": lambda: build_model(dataclasses.replace(cfg.critic, pretrain=sources["critic"]), "scalar",
                                      cfg.critic_lora, cfg.train.seed, new_head=cfg.critic_new_head,
                                      what="critic.pretrain (-c)")})
    actor, critic = models["actor"], models["critic"]
    if cfg.lora.r > 0:
        reference = None  # the actor with adapters off
    else:
        reference = load(sources["actor"], kind="lm").to(run.device)
        reference.requires_grad_(False)
    reward = None
    if sources["reward"] is not None:
        try:
            reward = load_reward_model(sources["reward"]).to(run.device)
        except CheckpointError as e:
            what = "reward" if cfg.reward else "reward (unset, so critic.pretrain)"
            raise CheckpointError(f"{what}: {e}; give a reward model trained by train_rm.py") from None
        reward.requires_grad_(False)
    for m in (actor, critic, reference, reward):
        if m is not None:
            set_dropout(m, 0.0).eval()  # no dropout in any PPO model (lm-human-preferences)
    vocabs = {name: m.config.vocab_size for name, m in (("actor", actor), ("critic", critic), ("reward model", reward))
              if m is not None}
    if len(set(vocabs.values())) > 1:
        raise ConfigError(f"actor, critic and reward model must share one vocabulary, got {vocabs}")
    return actor, critic, reference, reward


class PPOLab:
    """PPO one phase at a time: the object `train()` drives, for a notebook or a debugger.

        lab = PPOLab(cfg)                         # or PPOLab.from_checkpoints(actor, critic, reward)
        lab.sample_prompts()                      # lab.query, lab.query_mask
        lab.rollout()                             # lab.rollouts.response, .response_mask
        lab.score()                               # .raw_score, .score
        lab.logprobs_and_values()                 # .logprobs, .ref_logprobs, .values
        lab.advantages()                          # .kl, .rewards, .advantages, .returns
        lab.update()                              # ppo_epochs of clipped updates; lab.ratios() after it
        lab.log()                                 # scalars, samples; the iteration is done
        lab.save()                                # a checkpoint; PPOLab(cfg, resume=run folder) continues

    `lab.step()` is those seven calls (the save when train.save_every says), and
    `train()` is `lab.step()` until train.max_steps: a run driven by hand, call by call,
    ends with the same weights as train_ppo.py with the same config and seed. Each
    phase's tensors stay readable on `lab.rollouts` (see Rollouts) and its scalars in
    `lab.logs` until the next iteration starts. `with lab:` (or lab.close()) closes the
    TensorBoard writer; the run folder is made when the first iteration is logged."""

    def __init__(self, cfg: PPOConfig, resume: str | Path | None = None,
                 reward_fn: Callable | None = None, prompts: list[list[int]] | None = None):
        """`reward_fn` (texts [, prompts] -> scores) replaces the reward model, as does
        cfg.reward naming a function (module:function, file.py:function); `prompts`
        (token ids) replace the prompt dataset."""
        self.cfg = cfg
        self.run = run = open_run(cfg, "ppo", resume)
        p, t = self.p, self.t = cfg.ppo, cfg.train
        self.world = world = run.world
        if world.size > 1 and t.parallel == "fsdp":
            raise ConfigError("train.parallel fsdp shards SFT and reward-model training; PPO runs its models with "
                              "ddp (leave train.parallel at ddp)")
        for what, n in (("train.batch_size (-b)", t.batch_size), ("ppo.mini_batch_size", p.mini_batch_size)):
            if n % world.size:  # every rank holds an equal share of each batch and minibatch
                raise ConfigError(f"{what} ({n}) must be divisible by the number of processes ({world.size})")
        self.enc = enc = get_tokenizer()
        self.sources = sources = model_sources(cfg, run, function_given=reward_fn is not None)
        if reward_fn is None and sources.get("reward_fn"):
            reward_fn = load_reward_function(sources["reward_fn"])
        self.actor, self.critic, self.reference, self.reward_model = load_models(cfg, run, sources)
        self.score_fn = (model_reward(self.reward_model, p.forward_batch_size) if reward_fn is None
                         else callable_reward(reward_fn, enc))
        if self.actor.config.block_size < cfg.prompts.max_tokens + p.max_new_tokens:
            raise ConfigError(f"prompts.max_tokens + ppo.max_new_tokens ({cfg.prompts.max_tokens} + "
                              f"{p.max_new_tokens}) exceed the actor's context ({self.actor.config.block_size})")
        if prompts is None:
            records, _ = train_eval_records(cfg.data, t.seed)
            prompts, stats = prompt_examples(records, cfg.data, cfg.prompts.min_tokens, cfg.prompts.max_tokens, enc,
                                             "data.train", seed=t.seed)
            run.print(stats.report(), log=run.checkpoint is None)
        self.prompts = prompts

        self.micro_batch_size = t.micro_batch_size or p.mini_batch_size // world.size  # rows per forward, per rank
        updates_per_iter = p.ppo_epochs * math.ceil(t.batch_size / p.mini_batch_size)
        self.actor_ddp = self.critic_ddp = None  # under torchrun: DDP around the actor's loss forward and the critic
        self.actor_stepper = Stepper(self.actor, run, cfg.optim, t, t.max_steps * updates_per_iter)
        self.critic_stepper = Stepper(self.critic, run, cfg.critic_optim, t, t.max_steps * updates_per_iter)
        self.steppers = {"actor_": self.actor_stepper, "critic_": self.critic_stepper}
        self.kl_ctl = (AdaptiveKLController(p.kl_coef, p.target_kl, p.kl_horizon) if p.adaptive_kl
                       else FixedKLController(p.kl_coef))
        self.stream = BatchStream(len(prompts), t.batch_size, t.seed)

        # reward normalisation: once, from the starting policy (a resumed run has it in its
        # state), folded into the critic's head when the critic starts as that same reward model
        if run.checkpoint is not None:
            self.gain, self.bias = run.state["reward_gain"], run.state["reward_bias"]
            self.kl_ctl.load_state_dict(run.state["kl_ctl"])
        elif p.normalize_reward:
            sampler = BatchStream(len(prompts), t.batch_size, t.seed + 1)
            with run.autocast():
                self.gain, self.bias, n, warning = normalisation(
                    self.actor, self.score_fn, (self.batch_of(i, sampler) for i in range(
                        math.ceil(p.normalization_samples / t.batch_size))), p, world)
            run.print(f"reward normalisation from {n} rollouts: gain {self.gain:.4f}, bias {self.bias:.4f}"
                      + (f"\nwarning: {warning}" if warning else ""))
        else:
            self.gain, self.bias = 1.0, 0.0
        if run.checkpoint is None and sources["reward"] is not None and sources["reward"] == sources["critic"]:
            fold_normalisation(self.critic, self.gain, self.bias)  # critic on the returns' scale (issue 11)
        if world.size > 1:
            from torch.nn.parallel import DistributedDataParallel as DDP

            ids = [run.device.index] if run.device.type == "cuda" else None
            self.actor_ddp = DDP(ResponseLogits(self.actor), device_ids=ids)
            self.critic_ddp = DDP(self.critic, device_ids=ids)
            self.actor_stepper.ddp, self.critic_stepper.ddp = self.actor_ddp, self.critic_ddp
        self.iteration = resume_step(run, self.steppers)  # iterations done
        self.query = self.query_mask = self.rollouts = None
        self.beta, self.logs, self.seconds = self.kl_ctl.value, {}, {}
        self.phase = "log"  # the last phase run: an iteration starts with sample_prompts()
        self._tracking = None

    @classmethod
    def from_checkpoints(cls, actor: str, critic: str | None = None, reward: str | Callable | None = None, *,
                         prompts: list[str] | list[list[int]] | None = None, config: str | None = None,
                         overrides: dict | None = None, resume: str | Path | None = None) -> "PPOLab":
        """A lab from an SFT checkpoint (`actor`), a critic (a reward-model checkpoint; None:
        the actor with a new value head), and a reward: a reward-model checkpoint,
        "module:function" / "file.py:function", or a Python function (None: the critic,
        which must then be a reward model). `prompts`: texts or token ids (None: the
        config's data.train). `config`: a YAML preset to start from; `overrides`:
        {"ppo.max_new_tokens": 16, ...}, as the command line's --section.key value."""
        values = {"actor": {"pretrain": str(actor)}, "critic": {"pretrain": str(critic or actor)},
                  "critic_new_head": critic is None}
        if isinstance(reward, (str, Path)):
            values["reward"] = str(reward)
        for key, value in (overrides or {}).items():
            *sections, name = key.split(".")
            node = values
            for section in sections:
                node = node.setdefault(section, {})
            node[name] = str(value) if isinstance(value, Path) else value
        if resume is not None:  # as train_ppo.py --resume: the run's own config, the arguments over it
            config = str(find_run(str(resume), "ppo", load_config(PPOConfig, config, values)) / "config.yaml")
        cfg = load_config(PPOConfig, config, values)
        if prompts and isinstance(prompts[0], str):
            enc = get_tokenizer()
            prompts = [enc.encode_ordinary(text) for text in prompts]
            too_long = [i for i, q in enumerate(prompts) if len(q) > cfg.prompts.max_tokens]
            if too_long:
                raise ConfigError(f"prompts: {len(too_long)} of the texts are longer than prompts.max_tokens "
                                  f"({cfg.prompts.max_tokens} tokens), e.g. number {too_long[0]}")
        return cls(cfg, resume, reward_fn=None if isinstance(reward, (str, Path)) else reward, prompts=prompts)

    # ---------------------------------------------------------------- the phases

    def batch_of(self, step: int, source: BatchStream | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The left-padded prompts (ids, mask) of iteration `step` (0-based) of a prompt
        stream: this rank's contiguous share of them under torchrun, padded to the width
        of the whole batch's longest prompt, as one process pads them. Every rank holds
        the same random state (one seed, the same checkpointed state on resume) and
        draws the whole batch's random numbers (rollout()), so N processes sample and
        train what one process does."""
        rows = [self.prompts[i] for i in (source or self.stream).indices(step)]
        q, m = left_pad(self.world.share(rows), pad=eos_id(self.actor) or 0, width=max(map(len, rows)))
        return q.to(self.run.device), m.to(self.run.device)

    def sample_prompts(self) -> tuple[torch.Tensor, torch.Tensor]:
        """0. This iteration's batch of prompts (train.batch_size of them, each epoch of
        the prompt set in a new seeded order): lab.query (B, Tq), lab.query_mask."""
        if self.phase == "update":
            raise RuntimeError("call lab.log() first: this iteration's update ran, and log() completes it")
        t0 = time.perf_counter()
        self.rollouts, self.logs, self.seconds = None, {}, {}
        self.query, self.query_mask = self.batch_of(self.iteration)
        self.seconds["generation"] = time.perf_counter() - t0
        self.phase = "sample_prompts"
        return self.query, self.query_mask

    def rollout(self) -> Rollouts:
        """1. Sample a response to each prompt (KV cache; cut at EOS)."""
        self._after("sample_prompts", "rollout")
        t0 = time.perf_counter()
        with self.run.autocast():
            self.rollouts = rollout(self.actor, self.query, self.query_mask, self.p, self.world)
        self.seconds["generation"] += time.perf_counter() - t0
        self.phase = "rollout"
        return self.rollouts

    def score(self) -> torch.Tensor:
        """2. Score each response (reward model or function): rollouts.raw_score; then
        normalised and shaped: rollouts.score."""
        self._after("rollout", "score")
        t0 = time.perf_counter()
        with torch.no_grad(), self.run.autocast():
            raw, shaped = score(self.rollouts, self.score_fn, self.p, self.gain, self.bias, self.iteration,
                                self.world)
        self.rollouts = dataclasses.replace(self.rollouts, raw_score=raw, score=shaped)
        self.seconds["scoring"] = time.perf_counter() - t0
        self.phase = "score"
        return shaped

    def logprobs_and_values(self) -> Rollouts:
        """3. Log-probs of the sampled tokens under actor and reference, the critic's values."""
        self._after("score", "logprobs_and_values")
        t0 = time.perf_counter()
        with torch.no_grad(), self.run.autocast():
            self.rollouts, stats = logprobs_and_values(self.rollouts, self.actor, self.reference, self.critic,
                                                       self.p, self.world)
        self.logs.update(stats)
        self.seconds["scoring"] += time.perf_counter() - t0
        self.phase = "logprobs_and_values"
        return self.rollouts

    def advantages(self) -> Rollouts:
        """4. Per-token KL and rewards with this iteration's beta, GAE advantages and returns."""
        self._after("logprobs_and_values", "advantages")
        t0 = time.perf_counter()
        self.beta = self.kl_ctl.value  # this iteration's KL coefficient: used, logged, then adapted
        self.rollouts, stats = advantages_across(self.rollouts, self.rollouts.score, self.rollouts.ref_logprobs,
                                                 self.beta, self.p, self.world)
        self.logs.update(stats)
        self.seconds["scoring"] += time.perf_counter() - t0
        self.phase = "advantages"
        return self.rollouts

    def update(self) -> dict:
        """5. ppo_epochs passes of clipped policy and value updates over the rollouts."""
        self._after("advantages", "update")
        t0 = time.perf_counter()
        stats = ppo_update(self.actor, self.critic, self.rollouts, self.p, self.actor_stepper, self.critic_stepper,
                           self.micro_batch_size, self.world, self.actor_ddp, self.critic_ddp)
        self.logs.update(stats)
        self.seconds["update"] = time.perf_counter() - t0
        self.phase = "update"
        return stats

    def ratios(self) -> torch.Tensor:
        """pi_now / pi_rollout per response token (B, Tr): exactly 1 before update()."""
        if self.rollouts is None or self.rollouts.logprobs is None:
            raise RuntimeError("call lab.logprobs_and_values() first: ratios compare with the rollout's log-probs")
        with self.run.autocast():
            return ratios(self.actor, self.rollouts, self.p)

    def log(self) -> dict:
        """6. The iteration is done: adapt beta, log its scalars to TensorBoard, and every
        ppo.sample_every iterations (and after the first) print samples and save the
        rollouts the inspector shows (run folder rollouts/iteration_*.pt). Returns the scalars."""
        self._after("update", "log")
        r, done = self.rollouts, self.iteration + 1
        self.kl_ctl.update(self.logs["objective/kl"], self.t.batch_size)
        self.logs.update(iteration_stats(r, self.beta, self.seconds, self.world),
                         **{"optim/skipped_steps": self.actor_stepper.skipped + self.critic_stepper.skipped})
        tracker = self.open()
        tracker.scalars(done, self.logs)
        tracker.progress(1, score=self.logs["objective/raw_score"], kl=self.logs["objective/kl"])
        if self.p.sample_every and (done % self.p.sample_every == 0 or done == 1) and self.world.main:
            self.run.print(samples_text(done, r, self.logs, self.enc))  # rank 0's rows: the batch's first
            self.save_rollouts(done)
        self.iteration = done
        self.phase = "log"
        return self.logs

    def save(self) -> Path:
        """Checkpoint the run after the iterations done so far (models, optimizers, beta,
        reward normalisation, RNG and data position), between iterations only:
        PPOLab(cfg, resume=run folder) or train_ppo.py --resume continues from it exactly
        (a reward function or prompts passed in from Python must be passed again)."""
        if self.phase != "log":
            raise RuntimeError(f"lab.save() between iterations only: this one is at lab.{self.phase}(); finish it "
                               f"with lab.log() (a checkpoint mid-iteration could not resume exactly)")
        self.open()
        return save(self.run, self.iteration, {"actor": self.actor, "critic": self.critic}, self.steppers,
                    {"kl_ctl": self.kl_ctl.state_dict(), "reward_gain": self.gain, "reward_bias": self.bias,
                     "sources": self.sources, "data_position": self.stream.position(self.iteration)})

    def step(self) -> dict:
        """One whole iteration, phase by phase; a checkpoint when train.save_every says."""
        self.sample_prompts()            # 0. prompts
        self.rollout()                   # 1. rollout
        self.score()                     # 2. score
        self.logprobs_and_values()       # 3. logprobs, values
        self.advantages()                # 4. advantages
        self.update()                    # 5. update
        logs = self.log()                # 6. log
        if is_due(self.iteration, self.t.save_every, self.t.max_steps):
            self.save()
        return logs

    # ---------------------------------------------------------------- around the phases

    def save_rollouts(self, done: int) -> Path:
        """rollouts/iteration_<done>.pt in the run folder: the first rows of this
        iteration's rollouts with every per-token quantity and the ratio after the update
        (a forward pass over those rows only), for the inspector. Written atomically."""
        r = self.rollouts.select(slice(0, INSPECT_ROWS))
        with self.run.autocast():  # as the rollout's log-probs were taken: exactly 1 before an update
            ratio = ratios(self.actor, r, self.p)
        record = rollout_record(done, r, ratio, self.logs, self.enc)
        self.open()
        folder = self.run.dir / "rollouts"
        folder.mkdir(exist_ok=True)
        path = folder / f"iteration_{done:06d}.pt"
        tmp = path.with_suffix(".tmp")
        torch.save(record, tmp)
        tmp.replace(path)
        return path

    def open(self):
        """Create the run folder and open TensorBoard, if not yet done: train() calls it before
        the first iteration; a lab driven by hand opens it when it first logs or saves."""
        if self._tracking is None:
            p, t = self.actor_stepper, self.critic_stepper
            header = (f"device {self.run.device}, {str(self.run.dtype).replace('torch.', '')}; actor "
                      f"{sum(q.numel() for q in p.params):,} trainable, critic {sum(q.numel() for q in t.params):,} "
                      f"trainable; iterations {self.iteration}..{self.t.max_steps}\nstarting from "
                      + ", ".join(f"{k} {v}" for k, v in self.sources.items() if v is not None)
                      + ("" if self.reward_model is not None or self.sources.get("reward_fn") else
                         f", reward {self.score_fn.name} (a Python function)"))
            self._tracking = tracked(self.run, self.iteration, header)  # reopened after close(): no second header
            self._tracker = self._tracking.__enter__()
        return self._tracker

    def close(self, error: BaseException | None = None):
        """Close TensorBoard and the progress bar ("done" in the log unless `error`)."""
        if self._tracking is not None:
            tracking, self._tracking = self._tracking, None
            if error is None:
                tracking.__exit__(None, None, None)
            else:
                tracking.__exit__(type(error), error, error.__traceback__)

    def __enter__(self) -> "PPOLab":
        return self

    def __exit__(self, kind, error, tb):
        self.close(error)
        return False

    def _after(self, previous: str, phase: str):
        """Refuse a phase unless `previous` was the last one run in this iteration: a phase
        never runs twice, nor on another iteration's data."""
        if self.phase == previous:
            return
        if self.phase == "log":
            raise RuntimeError(f"call lab.sample_prompts() first: every iteration starts there "
                               f"({self.iteration} done so far)")
        order = PHASES.index(self.phase)
        if PHASES.index(phase) <= order:
            raise RuntimeError(f"lab.{phase}() already ran in this iteration; next is lab.{PHASES[order + 1]}() "
                               f"(the phases: {', '.join(PHASES)})")
        raise RuntimeError(f"call lab.{PHASES[order + 1]}() first: the phases run in order ({', '.join(PHASES)})")


PHASES = ("sample_prompts", "rollout", "score", "logprobs_and_values", "advantages", "update", "log")


def train(cfg: PPOConfig, resume: str | Path | None = None,
          reward_fn: Callable | None = None,
          prompts: list[list[int]] | None = None) -> Path:
    """Run PPO: PPOLab.step() until train.max_steps. `reward_fn` (texts -> scores)
    replaces the reward model; `prompts` (token ids) replace the prompt dataset: both for
    programmatic tasks and tests."""
    with PPOLab(cfg, resume, reward_fn, prompts) as lab:
        lab.open()  # the run folder and the header before the first iteration, as every stage
        while lab.iteration < cfg.train.max_steps:
            lab.step()
    return lab.run.dir


def main(argv=None, usage: str = __doc__):
    cli(PPOConfig, "ppo", train, argv, usage)
