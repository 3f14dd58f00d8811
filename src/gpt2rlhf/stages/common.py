"""What the stages share, as plain functions: the run folder, the model, the optimizer
and schedule, one optimizer step (accumulation, clipping, NaN guard), checkpoints with
exact resume, and the supervised loop SFT and RM both run."""

from __future__ import annotations

import gc
import math
import os
import re
import shutil
import sys
import time
import warnings
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
import torch.nn as nn

from ..allocator import keep_freed_memory
from ..checkpoint import (META_FILE, CheckpointError, clean_checkpoints, list_checkpoints, load_model,
                          load_trainer_state, prune_checkpoints, rng_state, save_checkpoint, set_rng_state,
                          step_dir, verify_checkpoint)
from ..loading import load
from ..runs import STAGE_SCRIPTS, checkpoints_of, latest_run, new_run_dir, run_of, run_stage
from ..config import ConfigError, ModelArgs, OptimArgs, TrainArgs, load_config, parse_cli, resolve_input, \
    resolve_output, save_config, to_dict
from ..data import BatchStream, DataError
from ..distributed import (World, full_state_dict, full_value, is_sharded, launched_world, load_optimizer, lost_peer,
                           missing_shards, save_optimizer_shards, shard)
from ..distributed import close as close_group
from ..distributed import init as init_group
from ..lora import LoraConfig, apply_lora
from ..model import MODEL_CLASSES, PRESETS, GPTConfig, set_dropout
from ..tokenizer import TokenizerError
from ..tracking import Tracker


class TrainingError(RuntimeError):
    """A run that cannot go on (e.g. too many non-finite steps in a row)."""


class RewardError(ValueError):
    """A reward function that returned the wrong number of scores, or non-finite ones."""


USER_ERRORS = (ConfigError, DataError, CheckpointError, TrainingError, TokenizerError, RewardError)


# ------------------------------------------------------------------ the run

@dataclass
class Run:
    """One run folder, runs/<stage>_<name>_<time>/: config.yaml, log.txt, TensorBoard
    events, checkpoints/step_*/.

    A new run's folder is created by start(), once its data and models have loaded: a run
    that fails on bad input leaves nothing behind (messages printed before that are
    written to log.txt then). Before start(), a resumed run changes its folder only to
    clean up after a killed save and to set a damaged checkpoint aside."""

    dir: Path | None
    stage: str
    cfg: object
    device: torch.device
    dtype: torch.dtype
    checkpoint: Path | None = None  # the checkpoint a resumed run continues from
    state: dict = field(default_factory=dict)  # its trainer state
    tracker: Tracker | None = None
    started: bool = False
    pending: list = field(default_factory=list)  # log lines waiting for the folder
    world: World = field(default_factory=World)  # rank 0 of 1 without torchrun
    ddp: dict = field(default_factory=dict)  # model -> its DistributedDataParallel wrapper (several processes)

    def autocast(self):
        return torch.autocast(self.device.type, dtype=self.dtype, enabled=self.dtype != torch.float32)

    def print(self, message: str, log: bool = True):
        """To the console (above the progress bar) and, with `log`, to log.txt; rank 0 only."""
        if not self.world.main:
            return
        if self.tracker:
            self.tracker.bar.write(message)
        else:
            print(message, flush=True)
        if not log:
            return
        if not self.started:
            self.pending.append(message)
            return
        with open(self.dir / "log.txt", "a") as f:
            f.write(message + "\n")

    def start(self):
        """Create the folder of a new run (or take over a resumed one): config.yaml, and the
        log lines printed so far. Call once everything the run needs has loaded."""
        if self.started:
            return
        if not self.world.main:  # rank 0 makes the folder; every rank learns its name
            self.dir, self.started, self.pending = Path(self.world.broadcast(None)), True, []
            return
        if self.dir is None:
            self.dir = new_run_dir(resolve_output(self.cfg.run.out_dir), self.stage, self.cfg.run.exp_name)
        save_config(self.cfg, self.dir / "config.yaml")
        self.world.broadcast(str(self.dir))
        self.started = True
        pending, self.pending = self.pending, []
        with open(self.dir / "log.txt", "a") as f:
            f.writelines(m + "\n" for m in pending)


def pick_device(name: str, world: World = World()) -> torch.device:
    """The device of train.device; under torchrun, "auto" and "cuda" mean this process's own
    GPU (cuda:LOCAL_RANK)."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"train.device is {name!r} but no CUDA GPU is available")
    if device.type == "cuda" and world.size > 1:
        if device.index is not None:
            raise ConfigError(f"train.device {name!r} under torchrun: give cuda (or auto), and each process takes "
                              f"its own GPU, cuda:LOCAL_RANK")
        if world.local_rank >= torch.cuda.device_count():
            raise ConfigError(f"process {world.local_rank} on this machine has no GPU of its own: "
                              f"{torch.cuda.device_count()} GPU(s) for more processes; start at most that many "
                              f"with torchrun --nproc_per_node")
        device = torch.device("cuda", world.local_rank)
    return device


def pick_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" and torch.cuda.is_bf16_supported() else torch.float32
    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[name]


def find_run(resume: str, stage: str, cfg) -> Path:
    """The run folder `--resume` means: a path, or "latest": the newest started run
    (with a config.yaml) of <stage>_<exp_name>_*. It must be a run of this stage."""
    if resume != "latest":
        path = Path(resolve_input(resume))
        if not path.is_dir():
            raise ConfigError(f"--resume: no run folder at {resume}")
        if (path / META_FILE).is_file() or path == checkpoints_of(path.parent):
            raise ConfigError(f"--resume: {path} is a checkpoint, not a run folder; give its run folder "
                              f"({run_of(path)})")
    else:
        out = resolve_output(cfg.run.out_dir)
        path = latest_run(out, stage, cfg.run.exp_name)
        if path is None:
            raise ConfigError(f"--resume: no earlier run {out}/{stage}_{cfg.run.exp_name}_<time> to resume")
    found = run_stage(path)
    if found is not None and found != stage:
        raise ConfigError(f"--resume: {path} is a {found} run, not a {stage} run; resume it with "
                          f"{STAGE_SCRIPTS.get(found, 'its own stage')}")
    if not (path / "config.yaml").is_file():
        raise ConfigError(f"--resume: {path} has no config.yaml; it is not a run folder (or its run never started)")
    return path


def resumable_checkpoint(run: Run) -> tuple[Path | None, dict]:
    """The newest checkpoint of a run that is intact (every file as written) and has its
    trainer state, with that state; a damaged one is renamed step_X.damaged (kept for
    inspection, ignored from then on) and the previous one is used, saying so. None when
    the run has no checkpoint yet; an error naming each damaged file when none is usable."""
    folder = checkpoints_of(run.dir)
    for line in clean_checkpoints(folder):
        run.print(f"note: {line}")
    problems, damaged = [], []
    for ckpt in reversed(list_checkpoints(folder)):
        try:
            verify_checkpoint(ckpt)
            state = load_trainer_state(ckpt)
        except CheckpointError as e:
            problems.append(str(e))
            damaged.append(ckpt)
            run.print(f"warning: {e}")
            continue
        for bad in damaged:  # set aside only once an intact one is found: a retry then sees the same
            aside = bad.with_name(bad.name + ".damaged")
            shutil.rmtree(aside, ignore_errors=True)
            bad.rename(aside)
            run.print(f"warning: {bad.name} is damaged, moved to {aside.name}; falling back to {ckpt.name}")
        return ckpt, state
    if problems:
        raise CheckpointError(f"{folder}: no intact checkpoint to resume from ({'; '.join(problems)}); nothing "
                              f"was changed")
    if list(folder.glob("step_*.damaged")):
        raise CheckpointError(f"{folder}: only damaged checkpoints (step_*.damaged) are left; nothing to resume from")
    return None, {}


def open_run(cfg, stage: str, resume: str | Path | None = None) -> Run:
    """A new run (its folder is made by run.start()), or an existing one to continue from
    its latest intact checkpoint (a run killed before its first checkpoint starts over in
    place)."""
    world = launched_world()
    device = pick_device(cfg.train.device, world)
    init_group(world, device, cfg.train.dist_timeout)
    dtype = pick_dtype(cfg.train.dtype, device)
    if device.type == "cpu" and not (world.size > 1 and cfg.train.parallel == "fsdp"):
        # large CPU tensors without page faults (allocator.py); not for FSDP, whose per-block
        # gathers fragment a kept heap (BENCHMARKS.md: 9.4 GiB per process instead of 4.9)
        keep_freed_memory()
    if resume is None:
        return Run(None, stage, cfg, device, dtype, world=world)
    run = Run(find_run(str(resume), stage, cfg), stage, cfg, device, dtype, world=world)
    # rank 0 alone cleans up or sets aside a damaged checkpoint, first; its error is every rank's
    found = world.on_main(lambda: resumable_checkpoint(run))
    run.checkpoint, run.state = found if world.main else resumable_checkpoint(run)
    return run


# ------------------------------------------------------------------ model and optimizer

def build_model(args: ModelArgs, kind: str, lora: LoraConfig, seed: int, new_head: bool = False,
                what: str = "model.pretrain") -> nn.Module:
    """From `pretrain` (hub, Hugging Face folder, our checkpoint) or a new random model;
    dropout as configured; LoRA adapters if lora.r > 0. A scalar model starts from a
    language model only with `new_head` (see loading.load); errors name `what`."""
    torch.manual_seed(seed)
    if args.pretrain:
        try:
            model = load(resolve_input(args.pretrain), kind=kind, new_head=new_head)
        except CheckpointError as e:
            raise CheckpointError(f"{what}: {e}") from None
    else:
        if args.preset is not None and args.preset not in PRESETS:
            GPTConfig.from_name(args.preset)  # raises with the list of presets
        base = dict(PRESETS[args.preset]) if args.preset else {}
        for name in ("n_layer", "n_head", "n_embd", "block_size"):
            if getattr(args, name) is not None:
                base[name] = getattr(args, name)
        try:
            config = GPTConfig(**base)
        except ValueError as e:
            raise ConfigError(f"model: {e}") from None
        model = MODEL_CLASSES[kind](config)
    set_dropout(model, args.dropout)
    return apply_lora(model, lora)


def make_optimizer(model: nn.Module, o: OptimArgs, device: torch.device) -> torch.optim.Optimizer:
    """AdamW; weight decay on weight matrices only, not on biases, layer norms or the
    (tied) embeddings (nanoGPT's and most LLM recipes' grouping). The fused kernel on CPU
    and CUDA (one pass over each parameter; on 2 CPU cores a step over a 7.2M-parameter
    model takes 4 ms instead of the for-loop's 14)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (decay if p.dim() >= 2 and not name.startswith(("transformer.wte", "transformer.wpe")) else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": o.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps,
                             fused=device.type in ("cuda", "cpu"))


def lr_factor(step: int, o: OptimArgs, max_steps: int) -> float:
    """Linear warmup to 1 over warmup_steps, then cosine (or constant) down to min_lr_ratio."""
    if step < o.warmup_steps:
        return (step + 1) / o.warmup_steps
    if o.schedule == "constant":
        return 1.0
    progress = min(1.0, (step - o.warmup_steps) / max(1, max_steps - o.warmup_steps))
    return o.min_lr_ratio + (1 - o.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


class Stepper:
    """One optimizer step from micro-batches: autocast forward, gradient accumulation,
    unscale then clip, step, schedule; a step with a non-finite loss or gradient is
    skipped and counted, and `max_bad_steps` of them in a row stop the run. In every dtype:
    with fp16 an overflow is such a step too, and GradScaler lowers its scale after it."""

    def __init__(self, model: nn.Module, run: Run, optim: OptimArgs, train: TrainArgs, max_steps: int,
                 ddp: nn.Module | None = None):
        self.model, self.run, self.train_args, self.ddp = model, run, train, ddp
        self.params = [p for p in model.parameters() if p.requires_grad]
        if not self.params:
            raise ConfigError("the model has no trainable parameter (check lora.trainable)")
        self.optimizer = make_optimizer(model, optim, run.device)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda s: lr_factor(s, optim, max_steps))
        self.scaler = torch.amp.GradScaler(run.device.type, enabled=run.dtype == torch.float16)
        self.grad_clip = optim.grad_clip
        self.bad_in_row, self.skipped = 0, 0

    def step(self, micro_batches: list, loss_fn: Callable, weights: list[float] | None = None) -> dict:
        """loss_fn(micro_batch) -> (loss tensor, {name: float tensor}), each a mean over the
        micro-batch's own units (loss tokens for SFT, pairs for the RM); weights[i] is how
        many units micro-batch i has (None: equally many). Its loss counts weights[i] /
        sum(weights) towards the gradient, so the step's gradient is that of the mean over
        every unit of the batch, whatever the micro-batch size (with one micro-batch the
        factor is exactly 1). Returns the step's loss and metrics as the same weighted
        means, except metrics named "*_max" (PPO's "ratio_max"), which are the largest over
        the micro-batches; and lr, grad norm and whether the step was skipped."""
        if weights is None:
            weights = [1.0] * len(micro_batches)
        if len(weights) != len(micro_batches):
            raise ValueError(f"{len(weights)} weights for {len(micro_batches)} micro-batches")
        world = self.run.world
        total_weight = float(sum(weights))
        if world.size > 1:  # every rank's units: the step is the mean over the global batch
            total_weight = float(world.sum(torch.tensor(total_weight, dtype=torch.float64, device=self.run.device)))
        total_weight = total_weight or 1.0  # no unit at all: every share is 0
        total, metrics = torch.zeros((), device=self.run.device), {}
        for i, (mb, weight) in enumerate(zip(micro_batches, weights)):
            share = weight / total_weight
            # DDP all-reduces the gradients once per step, after the last micro-batch's backward
            # (FSDP2 reduce-scatters after every micro-batch: accumulated sharded, the gradients stay 1/N in size)
            with self.ddp.no_sync() if hasattr(self.ddp, "no_sync") and i < len(micro_batches) - 1 else nullcontext():
                with self.run.autocast():
                    loss, m = loss_fn(mb)
                # DDP (and FSDP) average the ranks' gradients: times world.size makes it their sum, as one process has it
                self.scaler.scale(loss * (share * world.size if self.ddp is not None else share)).backward()
            total = total + loss.detach().float() * share
            for k, v in m.items():
                v = v.detach()
                if k.endswith("_max"):
                    metrics[k] = torch.maximum(metrics[k], v) if k in metrics else v
                else:
                    metrics[k] = metrics.get(k, 0.0) + v * share
        if world.size > 1:
            total = world.sum(total)
            metrics = {k: (world.max(torch.as_tensor(v, device=self.run.device)) if k.endswith("_max") else
                           world.sum(torch.as_tensor(v, device=self.run.device).float())) for k, v in metrics.items()}
        loss_value = float(total)
        lr = self.scheduler.get_last_lr()[0]
        # always unscale: with fp16 it records the inf check that scaler.update() needs
        self.scaler.unscale_(self.optimizer)
        grad_norm = float(full_value(torch.nn.utils.clip_grad_norm_(self.params, self.grad_clip or float("inf"))))
        finite = math.isfinite(loss_value) and math.isfinite(grad_norm)
        if finite:
            self.scaler.step(self.optimizer)
            self.bad_in_row = 0
        else:
            self.skipped += 1
            self.bad_in_row += 1
        self.scaler.update()  # fp16: lowers the scale after inf gradients, raises it after a run of good steps
        self.optimizer.zero_grad(set_to_none=True)
        with warnings.catch_warnings():  # a skipped step: the schedule still moves with the step count
            warnings.filterwarnings("ignore", message=re.escape("Detected call of `lr_scheduler.step()`"))
            self.scheduler.step()
        if self.bad_in_row >= self.train_args.max_bad_steps:
            raise TrainingError(
                f"{self.bad_in_row} steps in a row had a non-finite loss or gradient (last loss {loss_value}, "
                f"grad norm {grad_norm}); stopping. Lower optim.lr, check the data, or use train.dtype fp32/bf16."
            )
        return {"loss": loss_value, "lr": lr, "grad_norm": grad_norm, "skipped": not finite,
                **{k: float(v) for k, v in metrics.items()}}

    def state_dict(self) -> dict:
        """What a checkpoint's trainer_state keeps of the step; a sharded model's optimizer
        state is written apart, in shards (save())."""
        state = {"scheduler": self.scheduler.state_dict(), "scaler": self.scaler.state_dict(),
                 "bad_in_row": self.bad_in_row, "skipped": self.skipped}
        return state if is_sharded(self.model) else {"optimizer": self.optimizer.state_dict(), **state}

    def load_state_dict(self, state: dict, shards: Path | None = None):
        """`shards`: the checkpoint's folder of optimizer shards, when a sharded (FSDP) run
        saved it; either form loads into a sharded model or a whole one, on any number of
        processes."""
        fused = [g.get("fused") for g in self.optimizer.param_groups]
        if shards is not None and shards.is_dir():
            load_optimizer(self.model, self.optimizer, folder=shards)
        elif is_sharded(self.model):
            load_optimizer(self.model, self.optimizer, state=state["optimizer"])
        else:
            self.optimizer.load_state_dict(state["optimizer"])
        for g, f in zip(self.optimizer.param_groups, fused):  # the kernel this device runs, not the saver's
            g["fused"] = f
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        self.bad_in_row, self.skipped = state["bad_in_row"], state["skipped"]


def supervised_model(run: Run, kind: str) -> tuple[nn.Module, nn.Module]:
    """SFT's and RM's model (new, or from the run's last checkpoint) and what the loss
    calls (the model, or its torch.compile'd twin); checks that examples fit its context."""
    cfg = run.cfg
    # the reward model starts from a language model (SFT) with a new head: InstructGPT's recipe
    model = restore_models(run, {"model": lambda: build_model(cfg.model, kind, cfg.lora, cfg.train.seed,
                                                              new_head=kind == "scalar")})["model"]
    if model.config.block_size < cfg.data.max_length:
        raise ConfigError(f"data.max_length ({cfg.data.max_length}) exceeds the model's context "
                          f"(block_size {model.config.block_size})")
    return model, forward_fn(model, run)


def eval_chunks(examples: list, cfg) -> list[list]:
    """The evaluation set in micro-batches, at most train.eval_batches of them."""
    size = cfg.train.micro_batch_size or cfg.train.batch_size
    return [examples[i:i + size] for i in range(0, len(examples), size)][: cfg.train.eval_batches]


def forward_fn(model: nn.Module, run: Run) -> nn.Module:
    """What the loss calls: the model, or its torch.compile'd twin (same parameters, so
    the optimizer and checkpoints keep working on `model` itself); under torchrun, through
    DistributedDataParallel, which averages the gradients over the processes (run.ddp keeps
    the wrapper for the Stepper's no_sync between micro-batches), or with train.parallel
    fsdp the model itself sharded in place by FSDP2 (distributed.shard; make the optimizer
    after this)."""
    forward = model
    if run.world.size > 1 and run.cfg.train.parallel == "fsdp":
        if getattr(model, "lora_config", None) is not None:
            raise ConfigError("train.parallel fsdp shards full fine-tuning; a LoRA run (lora.r > 0) trains few "
                              "parameters and keeps the whole model on each process: use train.parallel ddp")
        if run.dtype == torch.float16:
            raise ConfigError("train.parallel fsdp: use train.dtype bf16 or fp32 (fp16's loss scaling is not "
                              "shard-aware here)")
        if run.cfg.train.compile:
            raise ConfigError("train.parallel fsdp: train.compile is not supported with it; leave it off")
        forward = run.ddp[model] = shard(model, run.world, run.device, run.dtype)
    elif run.world.size > 1:
        from torch.nn.parallel import DistributedDataParallel

        forward = run.ddp[model] = DistributedDataParallel(
            model, device_ids=[run.device.index] if run.device.type == "cuda" else None)
    return torch.compile(forward) if run.cfg.train.compile else forward


# ------------------------------------------------------------------ checkpoints

def restore_models(run: Run, build: dict[str, Callable[[], nn.Module]]) -> dict[str, nn.Module]:
    """The run's models: rebuilt from its last checkpoint when resuming, else built new."""
    if run.checkpoint is not None:
        models = {name: load_model(run.checkpoint, name) for name in build}
    else:
        models = {name: make() for name, make in build.items()}
    return {name: m.to(run.device) for name, m in models.items()}


def save(run: Run, step: int, models: dict[str, nn.Module], stepper: Stepper | dict, extra: dict | None = None):
    """Checkpoint after `step` optimizer steps: models, optimizer(s), schedule, RNG states
    and data position; then keep only the newest train.keep_checkpoints.

    Sharded (FSDP) models: first, every rank takes part in gathering their whole weights
    onto rank 0 (the checkpoint's safetensors are whole, as always: every tool reads them)
    and writes its shard of their optimizer state with torch.distributed.checkpoint into a
    staging folder, which becomes the checkpoint's <prefix>optimizer/ (readable on any
    number of processes); rank 0 checks that every rank's shard is there."""
    steppers = stepper if isinstance(stepper, dict) else {"": stepper}
    tensors, folders = {}, {}
    if any(is_sharded(m) for m in models.values()):
        staging = checkpoints_of(run.dir) / f".{step_dir(Path(), step).name}.shards-{run.world.broadcast(os.getpid())}"
        try:
            tensors = {name: full_state_dict(m) for name, m in models.items() if is_sharded(m)}
            for prefix, s in steppers.items():
                if is_sharded(s.model):
                    folders[f"{prefix}optimizer"] = staging / f"{prefix}optimizer"
                    save_optimizer_shards(s.model, s.optimizer, folders[f"{prefix}optimizer"])
        except CheckpointError:  # every rank alike (DCP shares each rank's outcome): no staging left
            shutil.rmtree(staging, ignore_errors=True)
            raise
    # rank 0 writes (every rank holds the same weights); the others wait, and share its error
    try:
        path = run.world.on_main(lambda: _save(run, step, models, steppers, extra, tensors, folders))
    except CheckpointError:
        if folders:  # this rank's staged shards, where rank 0 could not see them (a disk of its own)
            shutil.rmtree(staging, ignore_errors=True)
        raise
    return path if run.world.main else step_dir(checkpoints_of(run.dir), step)


def _save(run: Run, step: int, models: dict[str, nn.Module], steppers: dict, extra: dict | None,
          tensors: dict, folders: dict) -> Path:
    if run.tracker is not None:  # the step's scalars on disk before its checkpoint: a resume keeps them
        run.tracker.writer.flush()
    for folder in folders.values():  # every rank's shard must be here: the run folder on a shared filesystem
        missing = missing_shards(folder)
        if missing:
            shutil.rmtree(folder.parent, ignore_errors=True)
            raise CheckpointError(
                f"{step_dir(checkpoints_of(run.dir), step)}: optimizer shards {missing} of other processes never "
                f"reached {folder.parent}: train.parallel fsdp writes each process's shard into the run folder, "
                f"which must be on a filesystem every process shares (several machines: a shared disk); nothing "
                f"was replaced, the earlier checkpoints are intact")
    state = {"step": step, "rng": rng_state(), **(extra or {})}
    for prefix, s in steppers.items():
        state.update({f"{prefix}{k}": v for k, v in s.state_dict().items()})
    path = save_checkpoint(step_dir(checkpoints_of(run.dir), step), models,
                           metadata={"stage": run.stage, "step": step, "config": to_dict(run.cfg)},
                           trainer_state=state, tensors=tensors, folders=folders)
    prune_checkpoints(checkpoints_of(run.dir), run.cfg.train.keep_checkpoints)
    return path


def resume_step(run: Run, stepper: Stepper | dict[str, Stepper]) -> int:
    """Load the optimizer side of a resumed run and put every RNG back where it was;
    call last before the loop. Returns the step to continue from (0 for a new run).
    Several steppers (PPO's actor and critic) are saved and found under their prefixes."""
    if run.checkpoint is None:
        return 0
    steppers = stepper if isinstance(stepper, dict) else {"": stepper}
    for prefix, s in steppers.items():
        s.load_state_dict({k[len(prefix):]: v for k, v in run.state.items() if k.startswith(prefix)},
                          shards=run.checkpoint / f"{prefix}optimizer")
    set_rng_state(run.state["rng"])
    run.print(f"resumed from {run.checkpoint} at step {run.state['step']} ({time.strftime('%Y-%m-%d %H:%M:%S')})")
    return run.state["step"]


# ------------------------------------------------------------------ the loop's scaffolding

def is_due(done: int, every: int, max_steps: int) -> bool:
    """Whether a periodic action (log, evaluate, save) runs after step `done`: every
    `every` steps, and always after the last one (so 0 means only at the end)."""
    return bool(every and done % every == 0) or done == max_steps


@contextmanager
def tracked(run: Run, start: int, header: str):
    """What every stage's loop runs inside: the run folder created, TensorBoard and the
    progress bar from step `start`, the header (in log.txt once per run), "done" at the end,
    and the tracker closed whatever happens."""
    run.start()
    run.tracker = tracker = (Tracker(run.dir, run.cfg.train.max_steps, start) if run.world.main
                             else Tracker.silent())
    run.print(f"run folder: {run.dir}\n{header}", log=not start)
    try:
        yield tracker
        run.print(f"done: {run.dir}")
    finally:
        tracker.close()
        run.tracker = None
        close_group()  # under torchrun: the stage leaves the process group as it found it


# ------------------------------------------------------------------ the supervised loop

def to_device(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def fit(run: Run, model: nn.Module, examples: list, collate: Callable, loss_fn: Callable,
        evaluate: Callable[[], dict], tokens_of: Callable[[dict], int], weight_of: Callable[[dict], float]) -> Path:
    """The loop SFT and RM share: each step reads the examples BatchStream gives it, in
    micro-batches weighted by weight_of(collated micro-batch), the number of units its
    loss averages over (Stepper.step's weights); logs every log_every steps, evaluates
    every eval_every, checkpoints every save_every and at the end."""
    t = run.cfg.train
    micro = t.micro_batch_size or t.batch_size
    stepper = Stepper(model, run, run.cfg.optim, t, t.max_steps, ddp=run.ddp.get(model))
    stream = BatchStream(len(examples), t.batch_size, t.seed)
    world = run.world
    world.share(list(range(t.batch_size)))  # -b must divide evenly: an error before the loop, on every rank
    start = resume_step(run, stepper)
    if world.rank > 0:  # dropout masks of their own on the other ranks (rank 0 draws as one process does)
        torch.manual_seed(t.seed + 1_000_003 * world.rank + start)
    header = (f"device {run.device}, {str(run.dtype).replace('torch.', '')}; "
              f"{sum(p.numel() for p in stepper.params):,} trainable parameters of "
              f"{sum(p.numel() for p in model.parameters()):,}; steps {start}..{t.max_steps}")
    model.train()
    with tracked(run, start, header) as tracker:
        t0, tokens = time.perf_counter(), 0  # the first tokens/s window counts training only
        for step in range(start, t.max_steps):
            batch = [examples[i] for i in world.share(stream.indices(step))]  # this rank's share
            collated = [collate(batch[i:i + micro]) for i in range(0, len(batch), micro)]
            weights = [weight_of(mb) for mb in collated]
            micro_batches = [to_device(mb, run.device) for mb in collated]
            out = stepper.step(micro_batches, loss_fn, weights)
            tokens += sum(tokens_of(mb) for mb in micro_batches)
            done = step + 1
            tracker.progress(1, loss=out["loss"])
            if is_due(done, t.log_every, t.max_steps):
                elapsed = time.perf_counter() - t0
                if world.size > 1:  # every rank's tokens
                    tokens = int(world.sum(torch.tensor(tokens, device=run.device)))
                values = {"optim/lr": out["lr"], "optim/skipped_steps": stepper.skipped,
                          "time/tokens_per_sec": tokens / elapsed}
                if not out["skipped"]:  # a skipped step's loss and statistics (NaN, or from NaN) describe no update
                    values.update({"loss/train": out["loss"], "optim/grad_norm": out["grad_norm"],
                                   **{f"objective/{k}": v for k, v in out.items()
                                      if k not in ("loss", "lr", "grad_norm", "skipped")}})
                tracker.scalars(done, values)
                tracker.progress(0, loss=out["loss"], tok_s=f"{tokens / elapsed:,.0f}")
                t0, tokens = time.perf_counter(), 0
            if is_due(done, t.eval_every, t.max_steps):
                model.eval()
                with torch.no_grad(), run.autocast():
                    metrics = evaluate()
                model.train()
                tracker.scalars(done, metrics)
                run.print(f"step {done}: " + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
            if is_due(done, t.save_every, t.max_steps):
                save(run, done, {"model": model}, stepper, {"data_position": stream.position(done)})
    return run.dir


# ------------------------------------------------------------------ command line

def cli(cls, stage: str, train: Callable, argv: list[str] | None, usage: str):
    """Parse a stage's command line, run it, and turn the errors a user can fix into one
    clear line (exit status 2) instead of a stack trace."""
    try:
        yaml_path, overrides, resume = parse_cli(cls, argv, usage)
        if resume is not None:
            cfg0 = load_config(cls, yaml_path, overrides)
            run_dir = find_run(resume, stage, cfg0)
            if launched_world().main:
                print(f"resuming run folder {run_dir}", flush=True)
            saved = load_config(cls, str(run_dir / "config.yaml"), overrides)
            return train(saved, resume=run_dir)
        return train(load_config(cls, yaml_path, overrides))
    except USER_ERRORS as e:
        sys.stderr.write(f"error: {e}\n")  # one write: under torchrun the ranks share the pipe
        sys.stderr.flush()
        raise SystemExit(2) from None
    except Exception as e:
        world = launched_world() if os.environ.get("WORLD_SIZE", "1") != "1" else World()
        if not lost_peer(e, world):
            raise
        sys.stderr.write(f"error: rank {world.rank}: another process failed or stopped answering within "
                         f"train.dist_timeout seconds (see its own message); {type(e).__name__}: "
                         f"{str(e).strip().splitlines()[0] if str(e).strip() else ''}\n")
        sys.stderr.flush()
        raise SystemExit(2) from None
    finally:
        # the stage's objects in reference cycles (DDP's reducer holds gloo work and tensors)
        # freed now, while the interpreter is whole: freed at its finalisation they could
        # abort a finished run ("terminate called without an active exception", pytorch#179291)
        gc.collect()
        close_group()  # under torchrun: leave the process group, whatever happened
