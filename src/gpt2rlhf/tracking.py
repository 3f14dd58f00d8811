"""Watching a run: TensorBoard scalars and a tqdm progress bar."""

from __future__ import annotations

import math
from pathlib import Path

from torch.utils.tensorboard import SummaryWriter
from tqdm import tqdm  # the plain bar: tqdm.auto in a notebook without ipywidgets only warns


class Tracker:
    """Scalars go to TensorBoard under the run folder; tags are grouped by prefix
    (loss/, objective/, val/, optim/, time/). A run that starts at `start_step` (the step
    of the checkpoint it resumes from; 0 for a new run) purges the events an earlier
    process wrote after that step, so curves never double back; the steps up to it stay
    (their events are flushed before each checkpoint is written)."""

    def __init__(self, run_dir: Path, total_steps: int, start_step: int = 0, quiet: bool = False):
        self.run_dir = Path(run_dir)
        self.writer = SummaryWriter(str(self.run_dir), purge_step=start_step + 1)
        self.bar = tqdm(total=total_steps, initial=start_step, dynamic_ncols=True, disable=quiet,
                        desc=self.run_dir.name)

    @classmethod
    def silent(cls) -> "Tracker":
        """A tracker that writes and shows nothing: the processes other than rank 0 under torchrun."""
        tracker = cls.__new__(cls)
        tracker.run_dir, tracker.writer = None, None
        tracker.bar = tqdm(total=0, disable=True)
        return tracker

    def scalars(self, step: int, values: dict[str, float]):
        if self.writer is None:
            return
        for tag, value in values.items():
            if value is not None and math.isfinite(float(value)):
                self.writer.add_scalar(tag, float(value), step)

    def progress(self, steps: int = 1, **postfix):
        self.bar.update(steps)
        if postfix:
            self.bar.set_postfix({k: (f"{v:.4g}" if isinstance(v, float) else v) for k, v in postfix.items()},
                                 refresh=False)

    def close(self):
        self.bar.close()
        if self.writer is not None:
            self.writer.flush()
            self.writer.close()
