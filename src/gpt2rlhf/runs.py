"""The run-folder layout, in one place:

    <out_dir>/<stage>_<name>_<YYYYmmdd-HHMMSS>[-n]/
        config.yaml, log.txt, events.out.tfevents.*
        checkpoints/step_XXXXXXXX/        (checkpoint.py's format)

A run folder is claimed by mkdir (two runs starting in the same second get -2, -3...);
"the latest run" of a stage and name is the newest started one (with its config.yaml);
a run folder given where a model is expected means its latest complete checkpoint."""

from __future__ import annotations

import re
import time
from pathlib import Path

from .checkpoint import META_FILE, CheckpointError, latest_checkpoint, list_checkpoints, read_meta

CHECKPOINTS = "checkpoints"
STAGE_SCRIPTS = {"sft": "training/train_sft.py", "rm": "training/train_rm.py", "ppo": "training/train_ppo.py",
                 "grpo": "training/train_grpo.py", "dpo": "training/train_dpo.py"}


def checkpoints_of(run_dir: Path) -> Path:
    return Path(run_dir) / CHECKPOINTS


def is_run_folder(path: Path) -> bool:
    path = Path(path)
    return path.is_dir() and not (path / META_FILE).exists() and checkpoints_of(path).is_dir()


def resolve_run(path: Path) -> Path:
    """A run folder as its latest complete checkpoint; anything else unchanged."""
    path = Path(path)
    if is_run_folder(path):
        latest = latest_checkpoint(checkpoints_of(path))
        if latest is None:
            raise CheckpointError(f"{path}: run folder without a complete checkpoint")
        return latest
    return path


def run_of(path: Path) -> Path:
    """The run folder a checkpoint (or the checkpoints folder) belongs to; else the path."""
    path = Path(path)
    while (path.name.startswith("step_") or path.name == CHECKPOINTS) and path.parent != path:
        path = path.parent
    return path


def new_run_dir(out: Path, stage: str, name: str) -> Path:
    """Create <out>/<stage>_<name>_<now>, or the next -n free name; mkdir is the claim."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    stamp, n = time.strftime("%Y%m%d-%H%M%S"), 1
    while True:
        run_dir = out / (f"{stage}_{name}_{stamp}" + (f"-{n}" if n > 1 else ""))
        try:
            run_dir.mkdir()
            checkpoints_of(run_dir).mkdir()
            return run_dir
        except FileExistsError:
            n += 1


def latest_run(out: Path, stage: str, name: str) -> Path | None:
    """The newest started run <stage>_<name>_<time>[-n] in `out` (exact name: -n a does not
    match sft_a_b_*; same-second runs in numeric order)."""
    pattern = re.compile(rf"^{re.escape(stage)}_{re.escape(name)}_(\d{{8}}-\d{{6}})(?:-(\d+))?$")
    runs = sorted((m.group(1), int(m.group(2) or 1), r) for r in Path(out).glob(f"{stage}_{name}_*")
                  if (m := pattern.match(r.name)) and (r / "config.yaml").is_file())
    return runs[-1][2] if runs else None


def run_stage(run_dir: Path) -> str | None:
    """The stage a run folder belongs to: from its checkpoints, else from its name."""
    for ckpt in reversed(list_checkpoints(checkpoints_of(run_dir))):
        try:
            stage = read_meta(ckpt).get("stage")
        except CheckpointError:
            continue
        if stage:
            return stage
    prefix = Path(run_dir).name.split("_", 1)[0]
    return prefix if prefix in STAGE_SCRIPTS else None
