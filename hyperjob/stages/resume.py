"""Where a rerun of the train stage stands: the newest complete checkpoint, its step, and what it already consumed.

A Slurm requeue or a HyperPod `--auto-resume` reruns the train stage over the same run directory. Every backend
asks this module first, so a rerun never trains from step 0 over checkpoints it did not account for. Pure apart
from reading the checkpoints directory.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")
STATE_FILE = "trainer_state.json"  # the Trainer writes it last into a checkpoint: its presence means complete


@dataclass(frozen=True)
class ResumePoint:
    """Resume from `checkpoint`: `step` optimizer steps are done, in `epoch`; each data-parallel rank skips
    `skip_micro_batches` micro-batches of that epoch's order (steps x grad_accum) before training on."""

    checkpoint: Path
    step: int
    total_steps: int | None
    epoch: int
    skip_micro_batches: int
    examples_seen: int

    def describe(self) -> str:
        total = f" of {self.total_steps}" if self.total_steps else ""
        return (
            f"{self.checkpoint.name}: step {self.step}{total} done ({self.examples_seen:,} examples seen); resuming "
            f"in epoch {self.epoch + 1} after its first {self.skip_micro_batches:,} micro-batches per rank"
        )


def checkpoint_dirs(checkpoints: Path) -> list[tuple[int, Path]]:
    """Every `checkpoint-N` directory, complete or not, by step."""
    if not checkpoints.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in checkpoints.iterdir() if (m := _CHECKPOINT.match(p.name)) and p.is_dir()]
    return sorted(found)


def newest_checkpoint(checkpoints: Path) -> Path | None:
    """The highest-numbered `checkpoint-N` whose trainer state exists (the Trainer writes it last)."""
    complete = [p for _, p in checkpoint_dirs(checkpoints) if (p / STATE_FILE).is_file()]
    return complete[-1] if complete else None


def incomplete_checkpoints(checkpoints: Path) -> list[Path]:
    """Checkpoints a save was interrupted in: newer than the newest complete one (a rerun would write over them)."""
    dirs = checkpoint_dirs(checkpoints)
    complete = [step for step, p in dirs if (p / STATE_FILE).is_file()]
    newest = max(complete, default=-1)
    return [p for step, p in dirs if step > newest]


def resume_point(
    checkpoints: Path, *, steps_per_epoch: int | None, grad_accum: int, global_batch: int, total_steps: int | None
) -> ResumePoint | None:
    """The resume bookkeeping for the newest complete checkpoint, or None when there is none."""
    newest = newest_checkpoint(checkpoints)
    if newest is None:
        return None
    step = _state_step(newest)
    if steps_per_epoch:
        epoch, done_in_epoch = divmod(step, steps_per_epoch)
    else:
        epoch, done_in_epoch = 0, step
    return ResumePoint(
        checkpoint=newest,
        step=step,
        total_steps=total_steps,
        epoch=epoch,
        skip_micro_batches=done_in_epoch * grad_accum,
        examples_seen=step * global_batch,
    )


def _state_step(checkpoint: Path) -> int:
    """The trainer state's global_step; the directory name says the same unless someone renamed it."""
    named = int(checkpoint.name.rsplit("-", 1)[1])
    try:
        state = json.loads((checkpoint / STATE_FILE).read_text())
        step = int(state["global_step"])
    except (OSError, ValueError, KeyError, TypeError):
        return named
    return step if step >= 0 and not math.isnan(step) else named
