"""Run configuration: one dataclass per stage, built from shared parts, and one per command
(evaluate.py, sample.py).

Every field has a docstring (the string under it), which --help shows, and every part checks
itself in `__post_init__`. The command lines are jsonargparse's, made from these dataclasses:
a stage's config comes from, in order, the dataclass defaults, a YAML preset (`--config
configs/imdb/sft.yaml`), then command-line overrides, `--section.key value` (`--optim.lr
1e-4`) and the original tool's short flags (`-n/--exp-name`, `-b/--batch-size`,
`-p/--pretrain`, PPO's `-a/--actor`, `-c/--critic`). Values are type-checked by the library;
an unknown key is an error that names the closest valid one; every error is one line
(ConfigError) naming the field and its source. The resolved config is saved in the run
folder and in every checkpoint.

Paths: an output folder resolves against the repository root, so `runs/` is one place
whichever folder a run starts from; an input path resolves against the current folder
when it exists there, otherwise against the repository root (where the presets' paths,
like ../shared/data/..., are written from).
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import functools
import re
import sys
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import docstring_parser
import yaml
from jsonargparse import (ArgumentError, ArgumentParser, DefaultHelpFormatter, Namespace, get_loader, set_loader,
                          set_parsing_settings)

from .files import write_atomic
from .lora import LoraConfig

ROOT = Path(__file__).resolve().parents[2]  # the repository root (src/gpt2rlhf/config.py)


class ConfigError(ValueError):
    """A bad configuration value; the message names the field (and the file, if any)."""


def resolve_input(path: str | None) -> str | None:
    """An input path: as given if absolute or found from the current folder, else from the
    repository root if found there; otherwise unchanged (a hub name, or a missing file
    that the loader will name)."""
    if path is None:
        return None
    p = Path(path).expanduser()
    if p.is_absolute():
        return str(p)
    for base in (Path.cwd(), ROOT):
        if any(c in path for c in "*?[") and any(base.glob(path)) or (base / p).exists():
            return str(base / p)
    return path


def _default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def check_device(name: str, flag: str = "--device"):
    """A command's device option: a device name torch knows, and CUDA only where there is
    one (else ConfigError naming the option)."""
    import torch

    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"argument {flag}: not a device name, got {name!r} (cpu, cuda, cuda:1, mps)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"argument {flag}: {name!r}, but no CUDA GPU is available")


def resolve_output(path: str) -> Path:
    p = Path(path).expanduser()
    return p if p.is_absolute() else ROOT / p


# ------------------------------------------------------------------ shared parts

@dataclass
class ModelArgs:
    """Which network to train and where its weights come from."""

    pretrain: str | None = None
    """-p: a Hugging Face hub name, a Hugging Face folder, or one of our checkpoints / run
    folders. None: random initialisation from `preset` and the size fields below."""
    preset: str | None = None
    """For random initialisation: a GPT-2 size (gpt2, gpt2-medium, gpt2-large, gpt2-xl)."""
    n_layer: int | None = None
    """For random initialisation: number of blocks (overrides the preset)."""
    n_head: int | None = None
    """For random initialisation: attention heads per block."""
    n_embd: int | None = None
    """For random initialisation: width of the residual stream."""
    block_size: int | None = None
    """For random initialisation: context length (default 1024)."""
    dropout: float = 0.0
    """Dropout while training (SFT and RM; PPO turns it off)."""

    def __post_init__(self):
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"model.dropout must be in [0, 1), got {self.dropout}")
        if self.pretrain is None and self.preset is None and self.n_layer is None:
            raise ConfigError("model: give model.pretrain (-p), or a model.preset / model.n_layer... for a new model")
        from .model import PRESETS  # checked here, before any data is read

        if self.preset is not None and self.preset not in PRESETS:
            close = difflib.get_close_matches(self.preset, PRESETS, n=1)
            raise ConfigError(f"model.preset {self.preset!r} is not a GPT-2 size; choose one of {', '.join(PRESETS)}"
                              + (f" (did you mean '{close[0]}'?)" if close else ""))
        for name in ("n_layer", "n_head", "n_embd", "block_size"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ConfigError(f"model.{name} must be >= 1, got {getattr(self, name)}")


@dataclass
class OptimArgs:
    """AdamW with a warmup-then-cosine learning rate."""

    lr: float = 3e-4
    """Peak learning rate."""
    min_lr_ratio: float = 0.1
    """The cosine decays to lr * min_lr_ratio at the last step."""
    warmup_steps: int = 100
    """Linear warmup from 0 to lr over this many optimizer steps."""
    schedule: str = "cosine"
    """cosine | constant (after warmup)."""
    weight_decay: float = 0.1
    """AdamW weight decay, applied to matrices only (not biases, layer norms, embeddings)."""
    beta1: float = 0.9
    """AdamW beta1."""
    beta2: float = 0.95
    """AdamW beta2."""
    eps: float = 1e-8
    """AdamW epsilon."""
    grad_clip: float = 1.0
    """Clip the global gradient norm to this (0 = no clipping); after fp16 unscaling."""

    def __post_init__(self):
        if self.lr <= 0:
            raise ConfigError(f"optim.lr must be > 0, got {self.lr}")
        if self.schedule not in ("cosine", "constant"):
            raise ConfigError(f"optim.schedule must be cosine or constant, got {self.schedule!r}")
        if self.warmup_steps < 0 or self.grad_clip < 0 or not 0 <= self.min_lr_ratio <= 1:
            raise ConfigError("optim: warmup_steps and grad_clip must be >= 0, min_lr_ratio in [0, 1]")


@dataclass
class DataArgs:
    """Where examples come from and how they become tokens."""

    train: str | None = None
    """Training data: a hub dataset name, or local files (json, jsonl, jsonl.gz, parquet,
    csv, txt; a glob or a comma-separated list)."""
    eval: str | None = None
    """Held-out data, same forms as train. None: hold out eval_size examples of train."""
    hub_subset: str | None = None
    """Hub datasets only: the data_dir / configuration (e.g. harmless-base for Anthropic/hh-rlhf)."""
    train_split: str = "train"
    """Hub datasets only: the split for training."""
    eval_split: str = "test"
    """Hub datasets only: the split for evaluation (when eval names a hub dataset)."""
    format: str = "auto"
    """text | hh | instruction | labelled | auto (guessed from the fields of the first record)."""
    text_field: str = "text"
    """Field holding the text (text and labelled formats)."""
    label_field: str = "label"
    """Field holding the label, 1 = positive (labelled format)."""
    strip_html: bool = False
    """Replace <br /> tags by newlines (IMDB reviews have them)."""
    max_length: int = 512
    """Tokens per example, prompt + response (+ EOS); longer ones are truncated and counted."""
    openings_only: bool = False
    """Train on the first max_length tokens of texts on purpose: no error when every example
    loses over half to truncation (the IMDB reward model reads review openings as long as the
    PPO prompts + continuations it will score). Truncation is still counted."""
    max_prompt_length: int | None = None
    """Tokens a prompt keeps at least when an example is too long (its end); None: max_length // 2."""
    max_examples: int | None = None
    """Use N training records, a seeded random subset (None: all)."""
    eval_size: int = 500
    """Records held out of train for evaluation when eval is None."""
    max_eval_examples: int | None = 2000
    """Use N evaluation records, a seeded random subset (None: all)."""
    loss_on: str = "response"
    """SFT: response (prompt tokens masked out of the loss) | all."""
    packing: bool = False
    """SFT: concatenate examples (EOS between them) into full max_length rows."""

    def __post_init__(self):
        if self.format not in ("auto", "text", "hh", "instruction", "labelled"):
            raise ConfigError(f"data.format must be auto, text, hh, instruction or labelled, got {self.format!r}")
        if self.loss_on not in ("response", "all"):
            raise ConfigError(f"data.loss_on must be response or all, got {self.loss_on!r}")
        if self.max_prompt_length is None:
            self.max_prompt_length = self.max_length // 2
        if self.max_length < 2 or not 0 <= self.max_prompt_length < self.max_length:
            raise ConfigError(f"data: need data.max_length >= 2 and 0 <= data.max_prompt_length < data.max_length "
                              f"(got {self.max_length} and {self.max_prompt_length})")


@dataclass
class TrainArgs:
    """The loop every stage shares."""

    batch_size: int = 32
    """-b: examples per optimizer step (pairs for the reward model)."""
    micro_batch_size: int | None = None
    """Examples per forward pass (in each process, under torchrun); the rest are accumulated.
    None: batch_size (PPO: ppo.mini_batch_size), each process's share of it."""
    max_steps: int = 1000
    """Optimizer steps to run."""
    eval_every: int = 200
    """Evaluate every N steps (and at the end); 0 = only at the end."""
    eval_batches: int | None = None
    """Evaluate on this many micro-batches (None: the whole eval set)."""
    log_every: int = 10
    """Write training scalars every N steps (and at the end); 0 = only at the end."""
    save_every: int = 500
    """Checkpoint every N steps (and at the end); 0 = only at the end."""
    keep_checkpoints: int = 2
    """Keep the newest N checkpoints (0 = all)."""
    seed: int = 1337
    """Seed of initialisation, data order and dropout."""
    device: str = "auto"
    """auto (cuda if available) | cpu | cuda | cuda:N."""
    dtype: str = "auto"
    """auto (bf16 on GPUs that have it, else fp32) | fp32 | bf16 | fp16 (autocast; fp16 with loss scaling)."""
    compile: bool = False
    """torch.compile the model for training."""
    max_bad_steps: int = 10
    """Stop after this many steps in a row with a non-finite loss or gradient (each is skipped)."""
    dist_timeout: float = 600.0
    """Under torchrun: seconds a collective waits for the other processes before it fails
    (a rank that died or hangs ends the run with an error on every rank, not a hang)."""
    parallel: str = "ddp"
    """Under torchrun (SFT, RM): ddp (each process holds the whole model; gradients averaged)
    | fsdp (FSDP2: parameters, gradients and optimizer state sharded across the processes,
    for full fine-tuning of gpt2-large / gpt2-xl; LoRA runs and PPO use ddp; every process writes
    its optimizer shard into the run folder, so across machines it must be on a shared
    filesystem; with bf16 the gathered weights are cast to bf16, FSDP2's mixed precision).
    One process: ignored."""

    def __post_init__(self):
        mb = self.micro_batch_size or self.batch_size
        if self.batch_size < 1 or mb < 1 or self.batch_size % mb:
            raise ConfigError(f"train.batch_size ({self.batch_size}) must be a positive multiple of "
                              f"train.micro_batch_size ({self.micro_batch_size})")
        if self.max_steps < 1:
            raise ConfigError(f"train.max_steps must be >= 1, got {self.max_steps}")
        if self.dtype not in ("auto", "fp32", "bf16", "fp16"):
            raise ConfigError(f"train.dtype must be auto, fp32, bf16 or fp16, got {self.dtype!r}")
        if not self.dist_timeout > 0:
            raise ConfigError(f"train.dist_timeout must be > 0 seconds, got {self.dist_timeout}")
        if self.parallel not in ("ddp", "fsdp"):
            raise ConfigError(f"train.parallel must be ddp or fsdp, got {self.parallel!r}")

    @property
    def grad_accum(self) -> int:
        return self.batch_size // (self.micro_batch_size or self.batch_size)


@dataclass
class RunArgs:
    """Naming and output of a run."""

    exp_name: str = "default"
    """-n: name of the run; the folder is <out_dir>/<stage>_<exp_name>_<time>."""
    out_dir: str = "runs"
    """Where run folders go (relative paths: from the repository root)."""

    def __post_init__(self):
        if not self.exp_name or "/" in self.exp_name:
            raise ConfigError(f"run.exp_name must be a non-empty name without '/', got {self.exp_name!r}")


# ------------------------------------------------------------------ stages

@dataclass
class SFTConfig:
    """Supervised fine-tuning: next-token loss on responses."""

    model: ModelArgs = field(default_factory=lambda: ModelArgs(preset="gpt2"))
    lora: LoraConfig = field(default_factory=LoraConfig)
    optim: OptimArgs = field(default_factory=OptimArgs)
    data: DataArgs = field(default_factory=DataArgs)
    train: TrainArgs = field(default_factory=TrainArgs)
    run: RunArgs = field(default_factory=RunArgs)


@dataclass
class RMConfig:
    """Reward model: pairwise loss -log sigmoid(r_chosen - r_rejected)."""

    model: ModelArgs = field(default_factory=lambda: ModelArgs(preset="gpt2"))
    lora: LoraConfig = field(default_factory=LoraConfig)
    optim: OptimArgs = field(default_factory=lambda: OptimArgs(lr=1e-5, weight_decay=0.0))
    data: DataArgs = field(default_factory=DataArgs)
    train: TrainArgs = field(default_factory=TrainArgs)
    run: RunArgs = field(default_factory=RunArgs)


@dataclass
class DPOArgs:
    """DPO's objective (Rafailov et al. 2023): the policy itself is the reward model, with
    implicit reward beta * (log pi(y|x) - log pi_ref(y|x)); the reference is the SFT model."""

    beta: float = 0.1
    """Strength of the KL tie to the reference (DPO's beta; IPO's tau). Lower lets the
    policy move further from the SFT model for the same preference margin."""
    loss: str = "sigmoid"
    """sigmoid (DPO: -log sigmoid of the implicit reward margin) | ipo (Azar et al. 2023:
    the squared distance of the mean-per-token log-ratio margin to 1 / (2 beta))."""
    label_smoothing: float = 0.0
    """Conservative DPO (sigmoid loss only): the share of preference labels assumed wrong,
    in [0, 0.5); 0 is plain DPO."""

    def __post_init__(self):
        if not self.beta > 0:
            raise ConfigError(f"dpo.beta must be > 0, got {self.beta}")
        if self.loss not in ("sigmoid", "ipo"):
            raise ConfigError(f"dpo.loss must be sigmoid or ipo, got {self.loss!r}")
        if not 0.0 <= self.label_smoothing < 0.5:
            raise ConfigError(f"dpo.label_smoothing must be in [0, 0.5), got {self.label_smoothing}")
        if self.loss == "ipo" and self.label_smoothing:
            raise ConfigError(f"dpo.label_smoothing ({self.label_smoothing}) applies to the sigmoid loss only, "
                              f"not to ipo; set it to 0")


@dataclass
class DPOConfig:
    """DPO: the SFT model trained directly on preference pairs, no reward model, no sampling."""

    model: ModelArgs = field(default_factory=lambda: ModelArgs(preset="gpt2"))
    lora: LoraConfig = field(default_factory=LoraConfig)
    optim: OptimArgs = field(default_factory=lambda: OptimArgs(lr=1e-6, weight_decay=0.0))
    data: DataArgs = field(default_factory=DataArgs)
    dpo: DPOArgs = field(default_factory=DPOArgs)
    train: TrainArgs = field(default_factory=TrainArgs)
    run: RunArgs = field(default_factory=RunArgs)

    def __post_init__(self):
        if self.model.dropout:
            # policy and reference must be the same function at the start (loss log 2, rewards
            # 0), and a log-ratio with dropout noise in one side only is biased (TRL turns
            # dropout off for DPO too)
            raise ConfigError(f"model.dropout must be 0 for DPO, got {self.model.dropout}: the policy's "
                              f"log-probs are compared with the reference's, which has no dropout")


@dataclass
class PPOArgs:
    """One PPO iteration: rollout, score, KL, GAE, then epochs of minibatch updates.

    There is no vf_coef: actor and critic are separate networks with separate Adam
    optimizers, and Adam is invariant to a constant scale of the loss, so a value-loss
    weight would only have moved the critic's gradient-clipping threshold. The critic's
    step size is critic_optim.lr, and its clipping critic_optim.grad_clip (the old default
    vf_coef 0.1 with grad_clip 1 clipped the critic like critic_optim.grad_clip 10 does now)."""

    max_new_tokens: int = 24
    """Longest response, in tokens."""
    min_new_tokens: int = 0
    """Shortest response: EOS cannot be sampled before this many tokens."""
    temperature: float = 1.0
    """Sampling temperature; logprobs are computed from logits / temperature too."""
    top_k: int = 0
    """Top-k sampling during rollouts: must stay 0 (off), since PPO scores the unfiltered distribution."""
    top_p: float = 1.0
    """Nucleus sampling during rollouts: must stay 1 (off), since PPO scores the unfiltered distribution."""
    mini_batch_size: int = 16
    """Rollouts per optimizer step in the update phase."""
    ppo_epochs: int = 4
    """Passes over each rollout batch, shuffled into minibatches."""
    gamma: float = 1.0
    """Discount of GAE."""
    lam: float = 0.95
    """Lambda of GAE."""
    clip_range: float = 0.2
    """Policy ratio clipping epsilon."""
    clip_range_value: float = 0.2
    """Value clipping around the rollout's values."""
    entropy_coef: float = 0.0
    """Entropy bonus weight (0: off)."""
    kl_coef: float = 0.05
    """beta of the per-token KL penalty (the start value when adaptive)."""
    adaptive_kl: bool = False
    """Adapt beta towards target_kl (Ziegler et al. 2019)."""
    target_kl: float = 6.0
    """Adaptive beta: the KL per response it steers to, in nats."""
    kl_horizon: int = 10000
    """Adaptive beta: the horizon, in rollouts."""
    whiten_rewards: bool = False
    """Whiten per-token rewards (mean kept) before GAE."""
    normalize_reward: bool = True
    """Gain and bias so that the starting policy's scores have mean 0, std 1 (computed once)."""
    normalization_samples: int = 256
    """Rollouts scored to compute that gain and bias."""
    reward_clip: float = 0.0
    """Clip normalised scores to [-c, c] (0: off)."""
    missing_eos_penalty: float | None = None
    """Subtracted from the score of a response that has no EOS (None: no penalty)."""
    sample_every: int = 10
    """Every N iterations (and after the first): print a few prompt/response pairs and save
    the first 8 rollouts with their per-token data to rollouts/ for inspect_rollouts.py (0: never)."""
    forward_batch_size: int = 16
    """Rows per forward pass when scoring a rollout batch (reward, log-probs of actor and
    reference, values): the batch is never held as B x T x vocabulary logits at once."""
    target_approxkl: float | None = None
    """Early stop: start no further update epoch of an iteration once an epoch's mean approxkl
    (each minibatch's, measured before its step) exceeds this (cleanrl's target_kl; None:
    always run every epoch)."""

    def __post_init__(self):
        if self.max_new_tokens < 1 or not 0 <= self.min_new_tokens <= self.max_new_tokens:
            raise ConfigError("ppo: need max_new_tokens >= 1 and 0 <= min_new_tokens <= max_new_tokens")
        if self.temperature <= 0:
            raise ConfigError(f"ppo.temperature must be > 0 for PPO (logprobs divide by it), got {self.temperature}")
        if self.ppo_epochs < 1 or self.mini_batch_size < 1:
            raise ConfigError("ppo.ppo_epochs and ppo.mini_batch_size must be >= 1")
        if self.adaptive_kl and (self.target_kl <= 0 or self.kl_horizon <= 0):
            raise ConfigError("ppo: adaptive KL needs target_kl > 0 and kl_horizon > 0")
        if self.top_k or self.top_p < 1.0:
            # the ratio and the KL are scored on the unfiltered distribution: sampling from a
            # filtered one would make PPO off-policy and its KL estimate biased
            raise ConfigError(f"ppo.top_k ({self.top_k}) and ppo.top_p ({self.top_p}) must stay off (0 and 1): PPO "
                              f"scores log-probs of the distribution it samples from, and top-k/top-p would "
                              f"change that distribution")
        if self.forward_batch_size < 1:
            raise ConfigError(f"ppo.forward_batch_size must be >= 1, got {self.forward_batch_size}")
        if self.target_approxkl is not None and self.target_approxkl <= 0:
            raise ConfigError(f"ppo.target_approxkl must be > 0 (or none), got {self.target_approxkl}")


@dataclass
class PromptArgs:
    """How prompts are cut from the data for rollouts."""

    min_tokens: int = 0
    """Text records: a prompt is the first k tokens, k drawn in [min_tokens, max_tokens]
    (0: HH-style records use their prompt, text records their whole text)."""
    max_tokens: int = 64
    """The longest prompt; longer ones keep their end (counted)."""

    def __post_init__(self):
        if self.max_tokens < 1 or not 0 <= self.min_tokens <= self.max_tokens:
            raise ConfigError("prompts: need 0 <= min_tokens <= max_tokens and max_tokens >= 1")


@dataclass
class PPOConfig:
    """PPO (actor-critic) against a reward model."""

    actor: ModelArgs = field(default_factory=lambda: ModelArgs(preset="gpt2"))
    critic: ModelArgs = field(default_factory=lambda: ModelArgs(preset="gpt2"))
    reward: str | None = None
    """The reward: a frozen reward model (a reward-model checkpoint or run folder, or a
    Hugging Face folder with a score head), or a Python function of the response texts,
    module:function or path/to/file.py:function (list[str] -> list[float]; see
    gpt2rlhf/rewards.py); None: the critic's pretrain."""
    critic_new_head: bool = False
    """Start the critic from a language model (critic.pretrain an SFT checkpoint or a
    Hugging Face GPT-2) with a new value head. Off: critic.pretrain must be a reward model
    (or a PPO run's critic), and anything else is an error."""
    lora: LoraConfig = field(default_factory=LoraConfig)
    critic_lora: LoraConfig = field(default_factory=LoraConfig)
    optim: OptimArgs = field(default_factory=lambda: OptimArgs(lr=1e-5, weight_decay=0.0, warmup_steps=0))
    critic_optim: OptimArgs = field(default_factory=lambda: OptimArgs(lr=1e-5, weight_decay=0.0, warmup_steps=0))
    data: DataArgs = field(default_factory=DataArgs)
    prompts: PromptArgs = field(default_factory=PromptArgs)
    ppo: PPOArgs = field(default_factory=PPOArgs)
    train: TrainArgs = field(default_factory=lambda: TrainArgs(batch_size=64, max_steps=100, eval_every=0,
                                                               save_every=20, log_every=1))
    run: RunArgs = field(default_factory=RunArgs)


# ------------------------------------------------------------------ evaluate.py and sample.py

@dataclass
class GroupArgs:
    """One iteration of the critic-free trainer: group_size responses to each prompt, each
    response's advantage from its group's rewards (no value model), then clipped policy
    updates (PPO's surrogate: the ratio matters when epochs > 1 reuses a batch).

    estimator rloo (Ahmadian et al. 2024, "Back to Basics"): the advantage is the reward
    minus the mean of the group's other k-1 rewards. grpo (Shao et al. 2024,
    DeepSeekMath): the reward minus the group mean, divided by the group's standard
    deviation (scale_rewards; Liu et al. 2025, "Dr. GRPO", argue for leaving it off).
    The KL to the reference: kl_penalty reward subtracts beta times the response's summed
    KL (k1) from its reward before the group baseline (RLOO's form, and TRL's
    RLOOTrainer); loss adds beta times the mean per-token k3 KL to the loss (GRPO's form,
    DeepSeekMath eq. 3-4); auto: reward for rloo, loss for grpo."""

    estimator: str = "grpo"
    """rloo (leave-one-out baseline) | grpo (group mean and standard deviation)."""
    group_size: int = 4
    """k: responses sampled per prompt (>= 2; train.batch_size counts responses, so it
    must be a multiple of k)."""
    max_new_tokens: int = 24
    """Longest response, in tokens."""
    min_new_tokens: int = 0
    """Shortest response: EOS cannot be sampled before this many tokens."""
    temperature: float = 1.0
    """Sampling temperature; logprobs are computed from logits / temperature too."""
    kl_coef: float = 0.05
    """beta, the weight of the KL to the reference (SFT) model."""
    kl_penalty: str = "auto"
    """reward | loss | auto (reward for rloo, loss for grpo): where the KL goes (see above)."""
    adaptive_kl: bool = False
    """Adapt beta towards target_kl (Ziegler et al. 2019's controller, as the PPO stage's)."""
    target_kl: float = 6.0
    """Adaptive beta: the KL per response it steers to, in nats."""
    kl_horizon: int = 10000
    """Adaptive beta: the horizon, in responses."""
    scale_rewards: bool = True
    """grpo: divide by the group's standard deviation (rloo never does)."""
    mini_batch_size: int = 16
    """Responses per optimizer step."""
    ppo_epochs: int = 1
    """Passes over each batch (1: every step on fresh samples, the ratio is 1 at the first
    minibatch; more reuse the batch under the clipped ratio)."""
    clip_range: float = 0.2
    """Policy ratio clipping epsilon."""
    entropy_coef: float = 0.0
    """Entropy bonus weight (0: off)."""
    normalize_reward: bool = True
    """Gain and bias so that the starting policy's scores have mean 0, std 1 (computed
    once), so that kl_coef means what it means for PPO."""
    normalization_samples: int = 256
    """Rollouts scored to compute that gain and bias."""
    reward_clip: float = 0.0
    """Clip normalised scores to [-c, c] (0: off)."""
    missing_eos_penalty: float | None = None
    """Subtracted from the score of a response that has no EOS (None: no penalty)."""
    sample_every: int = 10
    """Every N iterations (and after the first): print a few prompt/response pairs (0: never)."""
    forward_batch_size: int = 16
    """Rows per forward pass when scoring (reward, log-probs of actor and reference)."""
    target_approxkl: float | None = None
    """Early stop between epochs once an epoch's mean approxkl exceeds this (None: off)."""
    top_k: int = 0
    """Must stay 0: the log-probs are those of the unfiltered distribution."""
    top_p: float = 1.0
    """Must stay 1: the log-probs are those of the unfiltered distribution."""

    def __post_init__(self):
        if self.estimator not in ("rloo", "grpo"):
            raise ConfigError(f"grpo.estimator must be rloo or grpo, got {self.estimator!r}")
        if self.kl_penalty not in ("auto", "reward", "loss"):
            raise ConfigError(f"grpo.kl_penalty must be auto, reward or loss, got {self.kl_penalty!r}")
        if self.group_size < 2:
            raise ConfigError(f"grpo.group_size must be >= 2 (the group is the baseline), got {self.group_size}")
        if self.max_new_tokens < 1 or not 0 <= self.min_new_tokens <= self.max_new_tokens:
            raise ConfigError("grpo: need max_new_tokens >= 1 and 0 <= min_new_tokens <= max_new_tokens")
        if self.temperature <= 0:
            raise ConfigError(f"grpo.temperature must be > 0 (logprobs divide by it), got {self.temperature}")
        if self.ppo_epochs < 1 or self.mini_batch_size < 1 or self.forward_batch_size < 1:
            raise ConfigError("grpo.ppo_epochs, grpo.mini_batch_size and grpo.forward_batch_size must be >= 1")
        if self.kl_coef < 0:
            raise ConfigError(f"grpo.kl_coef must be >= 0, got {self.kl_coef}")
        if self.adaptive_kl and (self.target_kl <= 0 or self.kl_horizon <= 0):
            raise ConfigError("grpo: adaptive KL needs target_kl > 0 and kl_horizon > 0")
        if self.top_k or self.top_p < 1.0:
            raise ConfigError("grpo.top_k and grpo.top_p must stay off (0 and 1): the trainer scores log-probs "
                              "of the distribution it samples from")
        if self.target_approxkl is not None and self.target_approxkl <= 0:
            raise ConfigError(f"grpo.target_approxkl must be > 0 (or none), got {self.target_approxkl}")

    @property
    def kl_in_loss(self) -> bool:
        return self.kl_penalty == "loss" or (self.kl_penalty == "auto" and self.estimator == "grpo")


@dataclass
class GRPOConfig:
    """Critic-free policy gradient (RLOO or GRPO) against a reward model or function."""

    actor: ModelArgs = field(default_factory=lambda: ModelArgs(preset="gpt2"))
    reward: str | None = None
    """The reward: a reward-model checkpoint or run folder (or a Hugging Face folder with a
    score head), or a Python function of the response texts, module:function or
    path/to/file.py:function (see gpt2rlhf/rewards.py). Required."""
    lora: LoraConfig = field(default_factory=LoraConfig)
    optim: OptimArgs = field(default_factory=lambda: OptimArgs(lr=1e-5, weight_decay=0.0, warmup_steps=0))
    data: DataArgs = field(default_factory=DataArgs)
    prompts: PromptArgs = field(default_factory=PromptArgs)
    grpo: GroupArgs = field(default_factory=GroupArgs)
    train: TrainArgs = field(default_factory=lambda: TrainArgs(batch_size=64, max_steps=100, eval_every=0,
                                                               save_every=20, log_every=1))
    run: RunArgs = field(default_factory=RunArgs)

    def __post_init__(self):
        if self.train.batch_size % self.grpo.group_size:
            raise ConfigError(f"train.batch_size ({self.train.batch_size}, responses per iteration) must be a "
                              f"multiple of grpo.group_size ({self.grpo.group_size})")


@dataclass
class EvalOptions:
    """Every option of evaluate.py (--config FILE may give any but -m, with _ or - in names)."""

    model: list[str] = field(default_factory=list)
    """A model to evaluate (give two or more; the first is compared with each other one): our
    checkpoint or run folder (a PPO run gives its actor), a Hugging Face folder or hub name."""
    names: str | None = None
    """Comma-separated labels for the models, one per -m (default: their folder names)."""
    prompts: str = "Anthropic/hh-rlhf"
    """Prompt file or hub dataset."""
    prompts_split: str = "test"
    """Hub datasets: the split the prompts come from."""
    prompts_subset: str | None = None
    """Hub datasets: the data_dir, e.g. harmless-base."""
    num_prompts: int = 200
    """Use N prompts, a seeded subset (0: every prompt)."""
    prompt_min_tokens: int = 0
    """Text prompts: the first k tokens of a text, k >= this."""
    prompt_max_tokens: int = 256
    """The longest prompt, in tokens (longer ones keep their end)."""
    max_new_tokens: int = 128
    """Longest response, in tokens."""
    min_new_tokens: int = 0
    """No EOS before this many tokens."""
    temperature: float = 0.7
    """Sampling temperature (0: greedy)."""
    top_k: int = 0
    """Top-k sampling (0: off)."""
    top_p: float = 1.0
    """Nucleus sampling (1: off)."""
    seed: int = 0
    """Seed of the prompt subset and of sampling."""
    batch_size: int = 16
    """Prompts per batch when sampling and scoring."""
    reward_model: str | None = None
    """A reward-model checkpoint or run folder: the mean reward-model score per model."""
    reference: str | None = None
    """The model KL and perplexity are measured against (default: the last -m)."""
    sentiment_train: str | None = None
    """Labelled reviews ({text, label}) to fit the independent sentiment judge on."""
    sentiment_test: str | None = None
    """Labelled reviews to measure the sentiment judge's accuracy on."""
    sentiment_input: Literal["response", "prompt+response"] = "response"
    """What the sentiment judge reads: the response alone (the model's own text) or prompt+response."""
    samples: int = 8
    """Sample responses shown side by side in the report (0: no sample table)."""
    judge_model: str = "gpt-4o-mini"
    """The LLM judge's model name."""
    base_url: str | None = None
    """An OpenAI-compatible server for the judge (default: OpenAI)."""
    key_file: str | None = None
    """A file with the judge's API key (JSON {"api_key": ...} or plain); default OPENAI_API_KEY."""
    concurrency: int = 4
    """Judge requests in flight at once."""
    timeout: float = 60.0
    """Seconds before a judge request is given up and retried."""
    max_retries: int = 5
    """Retries of a failed judge request (timeouts, 429, 5xx), with exponential backoff."""
    no_judge: bool = False
    """Offline metrics only: no LLM judge."""
    dry_run: bool = False
    """Print a sample judging prompt and the request count, and stop (no output folder)."""
    out: str | None = None
    """Output folder (default runs/eval_<time>)."""
    device: str = _default_device()
    """cpu | cuda | cuda:N | mps."""
    config: str | None = None
    """A YAML mapping of these options (e.g. configs/imdb/eval.yaml); the command line wins over it."""


@dataclass
class SampleOptions:
    """Every option of sample.py."""

    pretrain: str | None = None
    """Our checkpoint or run folder, a Hugging Face folder, or a hub name."""
    demo: bool = False
    """Sample from a tiny random model (no weights needed), saved under runs/ first."""
    prompt: list[str] = field(default_factory=list)
    """A prompt (repeat for a batch; default: two sample prompts)."""
    num_samples: int = 1
    """Samples per prompt."""
    max_new_tokens: int = 40
    """Longest continuation, in tokens."""
    temperature: float = 1.0
    """Sampling temperature (0: greedy)."""
    top_k: int = 0
    """Top-k sampling (0: off)."""
    top_p: float = 1.0
    """Nucleus sampling (1: off)."""
    seed: int = 0
    """Seed of sampling."""
    device: str = _default_device()
    """cpu | cuda | cuda:N | mps."""


# ------------------------------------------------------------------ the command line (jsonargparse)

# The original tool's short flags, each the same as one field.
COMMON_FLAGS = {"-n": "run.exp_name", "--exp-name": "run.exp_name", "-b": "train.batch_size",
                "--batch-size": "train.batch_size"}
SHORT_FLAGS = {**COMMON_FLAGS, "-p": "model.pretrain", "--pretrain": "model.pretrain"}
PPO_FLAGS = {**COMMON_FLAGS, "-a": "actor.pretrain", "--actor": "actor.pretrain",
             "-c": "critic.pretrain", "--critic": "critic.pretrain"}
GRPO_FLAGS = {**COMMON_FLAGS, "-a": "actor.pretrain", "--actor": "actor.pretrain"}
# --actor and --critic are also the names of sections, which jsonargparse takes as "a YAML
# file for that section": they are read as -a and -c
SECTION_FLAGS = {"--actor": "-a", "--critic": "-c"}

REMOVED_KEYS = {
    "ppo.vf_coef": "the critic has its own Adam optimizer, which ignores a constant loss scale; "
                   "set critic_optim.lr (and critic_optim.grad_clip) instead (vf_coef c with grad_clip g "
                   "clipped like critic_optim.grad_clip g / c does now)",
}


def short_flags(cls) -> dict:
    return {PPOConfig: PPO_FLAGS, GRPOConfig: GRPO_FLAGS}.get(cls, SHORT_FLAGS)


def _is_dataclass_type(tp) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def leaf_types(cls, prefix: str = "") -> dict:
    """Every field of a config as a dotted key ('optim.lr'), with its type."""
    out = {}
    for name, tp in typing.get_type_hints(cls).items():
        out.update(leaf_types(tp, f"{prefix}{name}.") if _is_dataclass_type(tp) else {prefix + name: tp})
    return out


def valid_keys(cls) -> list[str]:
    return list(leaf_types(cls))


def _unknown(key: str, cls, where: str) -> ConfigError:
    """An unknown key, with the closest valid one (jsonargparse suggests none)."""
    if key in REMOVED_KEYS:
        return ConfigError(f"{where}'{key}' was removed: {REMOVED_KEYS[key]}")
    keys = valid_keys(cls)
    # a leaf name given without its section ("lr" for "optim.lr"): the field of that name;
    # otherwise the closest spelling of the whole dotted key (the section typed counts)
    close = [k for k in keys if k.rsplit(".", 1)[-1] == key][:1] if "." not in key else []
    if not close:
        close = difflib.get_close_matches(key, keys, n=1, cutoff=0.5)
    if not close:
        close = [k for k in keys if k.rsplit(".", 1)[-1] == key.rsplit(".", 1)[-1]][:1]
    hint = f"; did you mean '{close[0]}'?" if close else ""
    return ConfigError(f"{where}unknown key '{key}'{hint}")


def check_keys(cls, values: dict, where: str, prefix: str = "", root=None):
    """Every key of a YAML mapping is a field of cls (recursively); else name the closest one."""
    root = root or cls
    if not isinstance(values, dict):
        raise ConfigError(f"{where}'{prefix.rstrip('.')}' must be a mapping of keys, got {values!r}")
    types = typing.get_type_hints(cls)
    for key, value in values.items():
        if key not in types:
            raise _unknown(prefix + str(key), root, where)
        if _is_dataclass_type(types[key]) and value is not None:
            check_keys(types[key], value, where, f"{prefix}{key}.", root)


def type_name(tp) -> str:
    """A field's type as a user reads it: int, float or none, a list of str."""
    args = typing.get_args(tp)
    if type(None) in args:
        return " or ".join([type_name(a) for a in args if a is not type(None)] + ["none"])
    if typing.get_origin(tp) in (tuple, list):
        return f"a list of {type_name(args[0])}"
    if typing.get_origin(tp) is Literal:
        return "one of " + ", ".join(map(str, args))
    return getattr(tp, "__name__", str(tp))


def library_error(e: Exception, where: str, types: dict, name, unknown) -> ConfigError:
    """A jsonargparse error as one line naming the option: a value of the wrong type, a
    missing value, or an unknown option (`unknown(option)` adds the closest valid one)."""
    text = str(e)
    if m := re.match(r"unrecognized arguments: (\S+)", text):
        if not m.group(1).startswith("-"):
            return ConfigError(f"{where}unexpected argument '{m.group(1)}' (options start with --)")
        return unknown(m.group(1).split("=", 1)[0])
    key = m.group(1) if (m := re.match(r'Parser key "([^"]+)"', text)) else None
    if key in types and (got := re.search(r"(?:Got|Given) value: (.*)", text)):
        return ConfigError(f"{where}{name(key)} expects {type_name(types[key])}, got {got.group(1).strip()!r}")
    if m := re.match(r"argument (\S+?)(?:/\S+)?: expected one argument", text):
        return ConfigError(f"{where}{m.group(1)} needs a value (e.g. {m.group(1)} VALUE)")
    return ConfigError(where + " ".join(text.split()))


def _check_nulls(ns: Namespace, types: dict, where: str, name):
    for key, value in ns.items():  # jsonargparse lets a file's null through to any field
        if value is None and key in types and type(None) not in typing.get_args(types[key]):
            raise ConfigError(f"{where}{name(key)} expects {type_name(types[key])}, got None")


_yaml_value = get_loader("yaml")


def _load_value(text: str):
    """A command-line value, read as jsonargparse reads it (1e-4 a float, true a bool, [a, b]
    a list), with `none` in any case as null too, as before the library."""
    value = _yaml_value(text)
    return None if isinstance(value, str) and value.strip().lower() == "none" else value


set_loader("yaml_or_none", _load_value, (yaml.YAMLError,))
set_parsing_settings(docstring_parse_attribute_docstrings=True)  # the field docstrings are the --help


class _HelpFormatter(argparse.RawDescriptionHelpFormatter, DefaultHelpFormatter):
    """jsonargparse's help (each docstring, then type and default), the usage text as written."""


def new_parser(usage: str) -> ArgumentParser:
    """A parser that raises (the command prints one line) instead of exiting on an error."""
    return ArgumentParser(description=usage.strip() or None, formatter_class=_HelpFormatter, exit_on_error=False,
                          allow_abbrev=False, print_config=None, parser_mode="yaml_or_none")


@functools.lru_cache(maxsize=None)
def stage_parser(cls) -> ArgumentParser:
    """A stage's parser: --config FILE, --resume [RUN_DIR], the short flags, and every field
    as --section.key with its docstring as help."""
    p = new_parser("")
    p.usage = "%(prog)s [--config FILE] [--resume [RUN_DIR]] [--section.key VALUE ...]"
    p.add_argument("--config", type=str | None, metavar="FILE",
                   help="a YAML preset (configs/*/*.yaml); the command line wins over it, wherever it stands")
    p.add_argument("--resume", nargs="?", const="latest", type=str | None, metavar="RUN_DIR",
                   help="continue a run from its last checkpoint: RUN_DIR, or without it the latest run of "
                        "this -n name; its saved config.yaml, then the command line")
    p.add_class_arguments(cls)
    types, flags_of = leaf_types(cls), {}
    for flag, key in short_flags(cls).items():
        flags_of.setdefault(key, []).append(flag)
    for key, flags in flags_of.items():
        long = next(f for f in flags if f.startswith("--"))
        p.add_argument(*[f for f in flags if f not in SECTION_FLAGS], dest=key, type=types[key],
                       metavar=long.lstrip("-").replace("-", "_").upper(),
                       help=f"the same as --{key}" + (f" (or {long})" if long in SECTION_FLAGS else ""))
    return p


def _spelled(args: list[str], cls) -> list[str]:
    """--actor X and --actor=X as -a X (see SECTION_FLAGS)."""
    out = []
    for arg in args:
        name, eq, value = arg.partition("=")
        if name in SECTION_FLAGS and name in short_flags(cls):
            out += [SECTION_FLAGS[name]] + ([value] if eq else [])
        else:
            out.append(arg)
    return out


def _read(cls, source, where: str) -> Namespace:
    """The values one source sets (a YAML mapping, a list of command-line arguments, or
    parse_cli's Namespace), each checked; errors start with `where`."""
    if isinstance(source, Namespace):
        return source
    p, types = stage_parser(cls), leaf_types(cls)
    try:
        if isinstance(source, dict):
            check_keys(cls, source, where)
            ns = p.parse_object(source, defaults=False)
        else:
            ns = p.parse_args(_spelled(source, cls), defaults=False)
    except ArgumentError as e:
        raise library_error(e, where, types, lambda key: f"'{key}'",
                            lambda option: _unknown(option.lstrip("-"), cls, where)) from None
    _check_nulls(ns, types, where, lambda key: f"'{key}'")
    return ns


DERIVED = (("data", "max_prompt_length"),)  # fields __post_init__ computes from others when unset


def load_config(cls, yaml_path: str | None = None, overrides=None):
    """The stage's defaults <- a YAML file (a preset, or a resumed run's config.yaml) <-
    command-line overrides (a list of arguments, parse_cli's Namespace, or a nested dict).
    Each source is checked on its own, so that an error names it; the merged values then
    build the dataclasses, whose __post_init__ checks them together."""
    read, sources = [], []
    if yaml_path:
        read.append(_read(cls, load_yaml(yaml_path), f"{resolve_input(yaml_path)}: "))
        sources.append(str(resolve_input(yaml_path)))
    if overrides:
        read.append(_read(cls, overrides, "command line: "))
        sources.append("command line")
    values = stage_parser(cls).get_defaults()  # the stage's own defaults (RM: optim.lr 1e-5)
    for section, name in DERIVED:  # derived again from the values in force, not the defaults'
        if f"{section}.{name}" in values:
            values[f"{section}.{name}"] = None
    for ns in read:
        values.update(ns)
    try:
        built = stage_parser(cls).instantiate(values)
    except (ConfigError, ValueError) as e:
        raise ConfigError(f"{' + '.join(sources)}: {e}" if sources else str(e)) from None
    return cls(**{f.name: built[f.name] for f in dataclasses.fields(cls)})


def parse_cli(cls, argv: list[str] | None = None, usage: str = ""):
    """(--config FILE, the overrides, --resume [RUN_DIR]) of a command line, every option
    checked; --help prints the usage and every field with its docstring, and exits."""
    stage_parser(cls).description = usage.strip() or None
    ns = _read(cls, list(sys.argv[1:] if argv is None else argv), "command line: ")
    return ns.pop("config", None), ns, ns.pop("resume", None)


# ------------------------------------------------------------------ flat commands (evaluate.py, sample.py)

def option_name(key: str) -> str:
    return "--" + key.replace("_", "-")


def options_parser(cls, usage: str, short: dict[str, str]) -> ArgumentParser:
    """The parser of a command whose options are one flat dataclass: --field-name per field
    (its docstring as help), short flags from `short`; a list field repeats (-m A -m B), a
    bool field is a switch (--no-judge, or --no-judge false)."""
    p = new_parser(usage)
    docs = {d.arg_name: d.description for d in docstring_parser.parse_from_object(cls).params}
    types = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp = types[f.name]
        if tp is bool:
            kwargs = dict(type=bool, nargs="?", const=True, default=f.default)
        elif typing.get_origin(tp) is list:
            kwargs = dict(action="append", type=typing.get_args(tp)[0], default=None)
        else:
            kwargs = dict(type=tp, default=f.default)
        names = [short[f.name], option_name(f.name)] if f.name in short else [option_name(f.name)]
        p.add_argument(*names, dest=f.name, help=docs.get(f.name), **kwargs)
    return p


def parse_options(cls, argv: list[str] | None, usage: str, short: dict[str, str]):
    """(options, the keys whose value came from --config FILE alone) of a flat command: the
    dataclass defaults, then the YAML mapping of --config FILE if cls has that field (names
    with _ or -; not the repeated options), then the command line. An error is a
    ConfigError naming the option (and the file)."""
    p, types = options_parser(cls, usage, short), typing.get_type_hints(cls)

    def closest(name: str, names: list[str]) -> str:
        close = difflib.get_close_matches(name, names, n=1)
        return f"; did you mean '{close[0]}'?" if close else ""

    options = [option_name(k) for k in types] + list(short.values())
    try:
        given = p.parse_args(list(sys.argv[1:] if argv is None else argv), defaults=False)
    except ArgumentError as e:
        raise library_error(e, "", types, lambda key: f"argument {option_name(key)}:",
                            lambda option: ConfigError(f"unknown option {option}{closest(option, options)}")) from None
    values, from_file = p.get_defaults(), Namespace()
    if given.get("config"):
        path, data = resolve_input(given.config), load_yaml(given.config)
        settable = [k for k, tp in types.items() if k != "config" and typing.get_origin(tp) is not list]
        data = {str(k).replace("-", "_"): v for k, v in data.items()}
        for key in data:
            if key not in settable:
                raise ConfigError(f"{path}: unknown option '{key}'{closest(key, settable)}")
        try:
            from_file = p.parse_object(data, defaults=False)
        except ArgumentError as e:
            raise library_error(e, f"{path}: ", types, lambda key: f"option '{key}'", None) from None
        _check_nulls(from_file, types, f"{path}: ", lambda key: f"option '{key}'")
        values.update(from_file)
    values.update(given)
    values = {k: [] if v is None and typing.get_origin(types[k]) is list else v for k, v in values.as_dict().items()}
    return cls(**values), set(from_file.keys()) - set(given.keys())


def to_dict(cfg) -> dict:
    """Plain nested dict (tuples as lists), for YAML and checkpoint metadata."""
    def plain(v):
        if isinstance(v, tuple):
            return [plain(x) for x in v]
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        return v
    return plain(dataclasses.asdict(cfg))


def load_yaml(path: str | Path) -> dict:
    path = Path(resolve_input(str(path)))
    try:
        data = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML ({' '.join(str(e).split())})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of sections, found {type(data).__name__}")
    return data


def save_config(cfg, path: Path):
    write_atomic(path, yaml.safe_dump(to_dict(cfg), sort_keys=False))


# ------------------------------------------------------------------ chat.py and serve.py

@dataclass
class ChatOptions:
    """Every option of chat.py."""

    pretrain: str | None = None
    """Our checkpoint or run folder (a PPO run gives its actor), a Hugging Face folder, or a hub name."""
    temperature: float = 0.7
    """Sampling temperature (0: greedy); /temperature changes it."""
    top_p: float = 0.9
    """Nucleus sampling (1: off); /top_p changes it."""
    max_tokens: int = 128
    """Longest reply, in tokens; /max_tokens changes it."""
    seed: int = 0
    """Seed of sampling."""
    verbose: bool = False
    """After each reply, print the tokens the turn fed through the model and the cache's fill."""
    device: str = _default_device()
    """cpu | cuda | cuda:N | mps."""


@dataclass
class ServeOptions:
    """Every option of serve.py."""

    pretrain: str | None = None
    """Our checkpoint or run folder (a PPO run gives its actor), a Hugging Face folder, or a hub name."""
    model_name: str | None = None
    """The name clients give as `model` (default: the folder or hub name of --pretrain)."""
    host: str = "127.0.0.1"
    """Address to listen on (0.0.0.0: every interface; then set --api-key)."""
    port: int = 8000
    """Port to listen on."""
    api_key: str | None = None
    """Require `Authorization: Bearer <key>` on /v1 (default: no key)."""
    max_batch: int = 32
    """Most sequences decoded together in one batch."""
    batch_wait: float = 0.01
    """Seconds an idle server waits, after a first request, for others sent with it (later ones join the running batch)."""
    max_concurrent: int = 128
    """Most requests admitted at once (waiting or decoding); more get 429."""
    max_tokens_limit: int = 512
    """Largest max_tokens a request may ask for (also the chat default, within the context)."""
    max_prompt_tokens: int = 0
    """Longest prompt in tokens (0: the model's context less one token)."""
    max_body_bytes: int = 1_000_000
    """Largest request body; more gets 413."""
    device: str = _default_device()
    """cpu | cuda | cuda:N | mps."""
