"""Our checkpoint format: atomic saves, safe loads, what a resume needs. (Which source a
user means, hub name / Hugging Face folder / checkpoint / run folder, is loading.py's job;
where checkpoints live in a run, runs.py's.)

A checkpoint is a folder:

    step_000100/
        checkpoint.json      format, step, stage, resolved run config, and for each model
                             its kind ("lm" | "scalar"), GPTConfig and LoraConfig
        <name>.safetensors   weights of each model ("model", or "actor" and "critic")
        trainer_state.pt     optimizer, scheduler, RNG states, step, data position (optional)
        optimizer/           (a sharded run, train.parallel fsdp) the optimizer state in
                             shards, torch.distributed.checkpoint's format, instead of in
                             trainer_state.pt: it reads back on any number of processes

It rebuilds its models alone: no pickled classes. It is written under a temporary name
(.step_X.tmp-PID) and renamed into place only when complete and synced, so a crash or a
kill during a save never leaves a broken checkpoint behind; `latest_checkpoint` only sees
complete ones. checkpoint.json records the size and SHA-256 of every other file, so a
checkpoint damaged later (a truncated copy, a bad disk) is recognised before a resume
uses it (`verify_checkpoint`). Pruning renames a folder out of sight (.step_X.del-PID)
before deleting it, so a kill mid-delete never leaves a half-deleted step_X that looks
complete; `clean_checkpoints` removes what killed saves and prunes left behind. Loading
never unpickles arbitrary objects (safetensors, and torch.load(weights_only=True)).
"""

from __future__ import annotations

import errno
import json
import os
import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
from safetensors import SafetensorError
from safetensors.torch import save_file

from .files import CheckpointError, file_digest, load_state_checked, read_json, read_safetensors
from .lora import LoraConfig, apply_lora
from .model import MODEL_CLASSES, GPTConfig

__all__ = ["CheckpointError", "META_FILE", "STATE_FILE", "read_meta", "load_model", "save_checkpoint",
           "verify_checkpoint", "step_dir", "list_checkpoints", "latest_checkpoint", "prune_checkpoints",
           "clean_checkpoints", "load_trainer_state", "rng_state", "set_rng_state"]

FORMAT = "gpt2rlhf"
VERSION = 1
META_FILE = "checkpoint.json"
STATE_FILE = "trainer_state.pt"
STEP_DIR = re.compile(r"^step_(\d+)$")
LEFTOVER = re.compile(r"^\.(step_\d+)\.(tmp|old|del|shards)-\d+$")  # a killed save's or prune's folder
KIND_NAMES = {"lm": "a language model", "scalar": "a scalar-head (reward or value) model"}


def read_meta(path: str | Path) -> dict:
    """checkpoint.json of a checkpoint folder, checked to be ours."""
    path = Path(path)
    meta_file = path / META_FILE
    if not meta_file.is_file():
        raise CheckpointError(f"{path}: not a gpt2rlhf checkpoint (no {META_FILE})")
    meta = read_json(meta_file)
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{meta_file}: format is {meta.get('format')!r}, not {FORMAT!r}")
    if not isinstance(meta.get("models"), dict) or not meta["models"]:
        raise CheckpointError(f"{meta_file}: field 'models' is missing or empty")
    return meta


def load_model(path: str | Path, name: str | None = None, kind: str | None = None) -> nn.Module:
    """Rebuild one model of a checkpoint folder: its class, config, LoRA layers and weights.
    `name` picks a model of a multi-model checkpoint; `kind` checks what it is."""
    path = Path(path)
    meta = read_meta(path)
    meta_file = path / META_FILE
    models = meta["models"]
    name = name or (next(iter(models)) if len(models) == 1 else None)
    if name not in models:
        raise CheckpointError(f"{meta_file}: holds models {sorted(models)}; say which one (not {name!r})")
    entry = models[name]
    if entry.get("kind") not in MODEL_CLASSES:
        raise CheckpointError(f"{meta_file}: models.{name}.kind is {entry.get('kind')!r}, not one of {sorted(MODEL_CLASSES)}")
    if kind is not None and entry["kind"] != kind:
        raise CheckpointError(
            f"{path}: holds {KIND_NAMES[entry['kind']]} ({name!r}), but {KIND_NAMES[kind]} is expected here"
        )
    try:
        config = GPTConfig.from_dict(entry.get("model") or {}, f"{meta_file}: models.{name}.model")
        lora = LoraConfig.from_dict(entry["lora"], f"{meta_file}: models.{name}.lora") if entry.get("lora") else None
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{meta_file}: {e}") from None
    model = MODEL_CLASSES[entry["kind"]](config)
    if lora is not None:
        apply_lora(model, lora)
    weights = path / f"{name}.safetensors"
    optional = ("lm_head.weight",) if config.tie_word_embeddings else ()
    load_state_checked(model, read_safetensors(weights), weights, optional)
    return model


# ---------------------------------------------------------------------------- writing

def _fsync(path: Path):
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def model_entry(model: nn.Module) -> dict:
    lora = getattr(model, "lora_config", None)
    return {"kind": model.kind, "model": model.config.to_dict(), "lora": lora.to_dict() if lora else None}


def model_tensors(model: nn.Module, sd: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """The weights to write: model.state_dict(), or `sd` (a sharded model's, gathered)."""
    sd = dict(model.state_dict() if sd is None else sd)
    if model.config.tie_word_embeddings:
        sd.pop("lm_head.weight", None)  # the same tensor as transformer.wte.weight
    return {k: v.detach().to("cpu").contiguous() for k, v in sd.items()}


def save_checkpoint(path: str | Path, models: dict[str, nn.Module], metadata: dict | None = None,
                    trainer_state: dict | None = None, tensors: dict[str, dict] | None = None,
                    folders: dict[str, Path] | None = None) -> Path:
    """Write a checkpoint folder atomically: everything goes to a temporary folder beside
    it, which is renamed to `path` once complete and synced to disk. A failed write (a
    full disk) removes the temporary folder and raises CheckpointError; the checkpoints
    already there are untouched. `tensors`: {model name: its whole state dict} for models
    whose own state_dict() is sharded; `folders`: {name: a folder already written (sharded
    optimizer state)} moved in under that name, its files digested with the rest."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    old = None
    try:
        tmp.mkdir()
        for name, model in models.items():
            save_file(model_tensors(model, (tensors or {}).get(name)), str(tmp / f"{name}.safetensors"))
        if trainer_state is not None:
            torch.save(trainer_state, tmp / STATE_FILE)
        for name, folder in (folders or {}).items():
            shutil.move(str(folder), str(tmp / name))
            if not any(folder.parent.iterdir()):
                folder.parent.rmdir()  # the emptied staging folder
        files = {f.relative_to(tmp).as_posix(): file_digest(f) for f in sorted(tmp.rglob("*")) if f.is_file()}
        meta = {"format": FORMAT, "version": VERSION, **(metadata or {}),
                "models": {name: model_entry(m) for name, m in models.items()}, "files": files}
        (tmp / META_FILE).write_text(json.dumps(meta, indent=2, default=str) + "\n")
        for f in sorted(tmp.rglob("*"), reverse=True):  # files, then the folders that hold them
            _fsync(f)
        _fsync(tmp)
        if path.exists():  # overwriting: move the old one aside first, delete it last
            old = path.with_name(f".{path.name}.old-{os.getpid()}")
            path.rename(old)
        tmp.rename(path)
        _fsync(path.parent)
    # safetensors reports a failed write as SafetensorError, torch.save as RuntimeError
    # ("unexpected pos"), the rest as OSError: a full disk can surface as any of them
    except (OSError, SafetensorError, RuntimeError) as e:
        shutil.rmtree(tmp, ignore_errors=True)
        for folder in (folders or {}).values():  # staged shards not moved in yet
            shutil.rmtree(folder.parent, ignore_errors=True)
        if old is not None and not path.exists():
            old.rename(path)  # the swap failed half-way: the old checkpoint goes back
        text = str(e)
        full = getattr(e, "errno", None) == errno.ENOSPC or "No space left" in text or "os error 28" in text
        why = "the disk is full" if full else (getattr(e, "strerror", None) or text.splitlines()[0][:200])
        raise CheckpointError(f"{path}: could not write this checkpoint ({why}); nothing was replaced, the "
                              f"earlier checkpoints are intact") from None
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return path


def verify_checkpoint(path: str | Path) -> dict:
    """checkpoint.json, after checking that every file it lists has its recorded size and
    SHA-256 (checkpoints from before digests were recorded: that their safetensors files
    read). Raises CheckpointError naming the first damaged file."""
    path = Path(path)
    meta = read_meta(path)
    files = meta.get("files")
    if isinstance(files, dict):
        for name, want in files.items():
            f = path / name
            if not f.is_file():
                raise CheckpointError(f"{f}: file missing")
            try:
                got = file_digest(f)
            except OSError as e:
                raise CheckpointError(f"{f}: cannot be read ({e.strerror or e})") from None
            if got["bytes"] != want.get("bytes"):
                raise CheckpointError(f"{f}: {got['bytes']} bytes, but {want.get('bytes')} were written (truncated?)")
            if got["sha256"] != want.get("sha256"):
                raise CheckpointError(f"{f}: contents differ from what was written (SHA-256 mismatch: corrupted)")
    else:
        for name in meta["models"]:
            read_safetensors(path / f"{name}.safetensors")
    return meta


def step_dir(checkpoints: str | Path, step: int) -> Path:
    return Path(checkpoints) / f"step_{step:08d}"


def list_checkpoints(checkpoints: str | Path) -> list[Path]:
    """Complete checkpoints in a folder, oldest step first."""
    folder = Path(checkpoints)
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir()
             if (m := STEP_DIR.match(p.name)) and (p / META_FILE).is_file()]
    return [p for _, p in sorted(found)]


def latest_checkpoint(checkpoints: str | Path) -> Path | None:
    found = list_checkpoints(checkpoints)
    return found[-1] if found else None


def prune_checkpoints(checkpoints: str | Path, keep: int):
    """Delete all but the newest `keep` checkpoints (keep <= 0 keeps all). Each is first
    renamed out of sight (atomic), then deleted: a kill in between leaves a .del folder
    that clean_checkpoints removes, never a half-deleted step folder."""
    if keep > 0:
        for p in list_checkpoints(checkpoints)[:-keep]:
            gone = p.with_name(f".{p.name}.del-{os.getpid()}")
            p.rename(gone)
            shutil.rmtree(gone, ignore_errors=True)


def clean_checkpoints(checkpoints: str | Path) -> list[str]:
    """Remove what killed saves and prunes left in a checkpoints folder (.step_X.tmp-PID,
    .step_X.del-PID), and put back an overwritten checkpoint whose replacement never
    arrived (.step_X.old-PID without step_X). Returns what was done, one line each."""
    folder = Path(checkpoints)
    done = []
    if not folder.is_dir():
        return done
    for p in sorted(folder.iterdir()):
        m = LEFTOVER.match(p.name)
        if not m:
            continue
        target = folder / m.group(1)
        if m.group(2) == "old" and not target.exists() and (p / META_FILE).is_file():
            p.rename(target)
            done.append(f"restored {target.name} from an interrupted overwrite")
        else:
            shutil.rmtree(p, ignore_errors=True)
            done.append(f"removed {p.name}, left by an interrupted {'delete' if m.group(2) == 'del' else 'save'}")
    return done


def load_trainer_state(path: str | Path, map_location="cpu") -> dict:
    file = Path(path) / STATE_FILE
    if not file.is_file():
        raise CheckpointError(f"{file}: file not found; this checkpoint cannot resume training")
    try:
        return torch.load(file, map_location=map_location, weights_only=True)
    except Exception as e:
        raise CheckpointError(f"{file}: cannot be read as a weights-only PyTorch file ({e})") from None


# ---------------------------------------------------------------------------- RNG

def rng_state() -> dict:
    """Every random generator a run draws from, in a form torch.load(weights_only) accepts."""
    np_state = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict):
    random.setstate(state["python"])
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), *rest))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
