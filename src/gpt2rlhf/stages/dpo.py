"""Direct Preference Optimization (Rafailov et al. 2023): the SFT model trained on the reward
model's preference pairs directly, with no reward model and no sampling. The policy's
log-ratio to the SFT model, beta * log pi/pi_ref, is its implicit reward, and the loss is
the reward model's pairwise loss on those rewards (or IPO's squared loss, see losses.dpo_loss).

    1. data: the reward model's pairs (HH chosen/rejected, or positive/negative labelled
       text), with each pair's prompt length: log-probs are summed over response tokens only
    2. models: the policy from an SFT checkpoint (LoRA optional); the reference is that SFT
       model exactly: the policy with its adapters off under LoRA, else a frozen copy
    3. the shared loop (common.fit); chosen and rejected go through in one forward pass,
       and the reference's log-probs are computed per batch, without gradients
    4. eval: loss, preference accuracy of the implicit reward, its margin, and the implicit
       KL on held-out pairs

Reference log-probs are computed per batch, not precomputed over the training set: a run
reads fewer pairs than the set holds (the IMDB preset 2,400 of 12,500; the HH one 128,000
of 160,000), so a pass over the set costs more forwards than it saves; without gradients
the reference forward is about a third of a step (measured on a tiny model); under LoRA it
needs no second copy of the model; and a resumed run computes exactly what the
uninterrupted one did.
"""

from __future__ import annotations

import dataclasses
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.nn.functional as F

from ..config import ConfigError, DPOArgs, DPOConfig
from ..data import collate_dpo, pair_examples, train_eval_records
from ..loading import load
from ..lora import adapters_disabled
from ..losses import dpo_loss
from ..tokenizer import get_tokenizer
from .common import cli, eval_chunks, fit, open_run, supervised_model, to_device
from .ppo import pin
from .rm import pair_count


def response_logps(logits: torch.Tensor, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of log pi over each row's response tokens, how many there are), both (rows,),
    from logits (rows, T, V): position t-1 predicts token t, whose loss_mask decides.
    Prompt and padding tokens add nothing to the sum, so no gradient reaches them."""
    ids, mask = batch["input_ids"], batch["loss_mask"][:, 1:].float()
    # every position's logits as they are (no copy of a (rows, T-1, V) slice): the last one,
    # which predicts nothing, gets the target -100 that cross_entropy ignores
    targets = torch.cat([ids[:, 1:], torch.full_like(ids[:, :1], -100)], dim=1)
    logp = -F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), reduction="none")  # fp32, as lm_loss
    logp = logp.view_as(ids)[:, :-1]
    return (logp * mask).sum(-1), mask.sum(-1)


def sequence_logps(model, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """response_logps of a collate_dpo batch under `model` (the policy, its compiled or DDP
    wrapper, or the reference)."""
    return response_logps(model(batch["input_ids"], attention_mask=batch["attention_mask"]), batch)


@torch.no_grad()
def reference_logps(model, reference, batch: dict) -> torch.Tensor:
    """Summed response log-probs under the SFT model: `reference`, or when it is None the
    policy with its LoRA adapters switched off (its frozen base weights are the SFT
    model's, merged; lora.adapters_disabled)."""
    with adapters_disabled(model) if reference is None else nullcontext():
        return sequence_logps(model if reference is None else reference, batch)[0]


def dpo_objective(args: DPOArgs, logps: torch.Tensor, counts: torch.Tensor, ref: torch.Tensor) -> tuple:
    """(loss, metrics) of a batch from the summed response log-probs of its 2B rows (chosen
    rows first) under policy and reference, and the rows' response lengths. IPO compares
    mean log-probs per response token (see losses.dpo_loss); the implicit rewards are then
    beta times the mean log-ratio. The implicit KL is always per response: the mean of
    log pi - log pi_ref (summed over a response's tokens) over every response of the
    batch, chosen and rejected. It is measured on the dataset's responses, not on samples
    of the policy, so unlike PPO's KL it can be negative (DPO lowers the likelihood of
    rejected responses); evaluate.py measures the KL on samples."""
    scale = counts.clamp(min=1) if args.loss == "ipo" else torch.ones_like(counts)
    pc, pr = (logps / scale).chunk(2)
    rc, rr = (ref / scale).chunk(2)
    loss, chosen, rejected = dpo_loss(pc, pr, rc, rr, args.beta, args.label_smoothing, args.loss)
    with torch.no_grad():
        policy_c, policy_r = logps.detach().float().chunk(2)
        metrics = {"rewards_chosen": chosen.mean(), "rewards_rejected": rejected.mean(),
                   "rewards_margin": (chosen - rejected).mean(), "rewards_accuracy": (chosen > rejected).float().mean(),
                   "logps_chosen": policy_c.mean(), "logps_rejected": policy_r.mean(),
                   "kl": (logps.detach().float() - ref.float()).mean()}
    return loss, metrics


def dpo_models(run, pretrain: str):
    """(policy, what its loss calls, reference): the policy from the SFT checkpoint (or the
    run's last checkpoint), and the reference: None under LoRA (the policy with adapters
    off), else a frozen copy loaded from the same SFT checkpoint, in eval mode."""
    model, forward = supervised_model(run, "lm")
    if run.cfg.lora.r > 0:
        return model, forward, None
    reference = load(pretrain, kind="lm").to(run.device).eval()
    reference.requires_grad_(False)
    return model, forward, reference


def train(cfg: DPOConfig, resume: str | Path | None = None) -> Path:
    if not cfg.model.pretrain:
        raise ConfigError("dpo needs -p/--pretrain: the SFT checkpoint or run folder to start from (it is also "
                          "the reference)")
    if resume is None:
        # the exact checkpoint a run folder means now, kept in config.yaml: a resumed run's
        # reference is the SFT model it started from, even if that SFT run has moved on since
        cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, pretrain=pin(cfg.model.pretrain)))
    run = open_run(cfg, "dpo", resume)
    enc = get_tokenizer()

    # 1. data: the reward model's pairs, with their prompt lengths
    train_records, eval_records = train_eval_records(cfg.data, cfg.train.seed)
    train_ex, train_stats = pair_examples(train_records, cfg.data, enc, "data.train", seed=cfg.train.seed)
    eval_ex, eval_stats = pair_examples(eval_records, cfg.data, enc, "data.eval", seed=cfg.train.seed + 1)
    run.print(train_stats.report() + "\n" + eval_stats.report(), log=run.checkpoint is None)  # once per run

    # 2. the policy and the reference
    model, forward, reference = dpo_models(run, cfg.model.pretrain)
    run.print(f"reference: {cfg.model.pretrain}" + (" (the policy with its LoRA adapters off)" if reference is None
                                                    else " (a frozen copy)"), log=run.checkpoint is None)

    def loss_fn(batch):
        ref = reference_logps(model, reference, batch)
        logps, counts = sequence_logps(forward, batch)
        return dpo_objective(cfg.dpo, logps, counts, ref)

    # 4. eval over every held-out pair: the means over all of them
    eval_batches = eval_chunks(eval_ex, cfg)

    def evaluate():
        logps, counts, refs = [], [], []
        for rows in eval_batches:
            b = to_device(collate_dpo(rows), run.device)
            lp, n = sequence_logps(model, b)
            ref = reference_logps(model, reference, b)
            for out, both in ((logps, lp), (counts, n), (refs, ref)):
                out.append(torch.stack(both.chunk(2)))  # (2, B): chosen, rejected
        lp, n, ref = (torch.cat(x, dim=1).flatten() for x in (logps, counts, refs))
        loss, m = dpo_objective(cfg.dpo, lp, n, ref)
        return {"loss/eval": float(loss), "val/accuracy": float(m["rewards_accuracy"]),
                "val/margin": float(m["rewards_margin"]), "val/rewards_chosen": float(m["rewards_chosen"]),
                "val/rewards_rejected": float(m["rewards_rejected"]), "val/kl": float(m["kl"])}

    # 3. the loop
    return fit(run, model, train_ex, collate_dpo, loss_fn, evaluate,
               tokens_of=lambda b: int(b["attention_mask"].sum()), weight_of=pair_count)


def main(argv=None, usage: str = __doc__):
    cli(DPOConfig, "dpo", train, argv, usage)
