"""The train stage's progress file: which step it is at, out of how many, since when.

`status` shows it for a running train stage. Neither Slurm nor the outcome records know how far a training job
has got, and its log is per-job and noisy, so rank 0 writes `<run>/train_progress.json` (atomically, at most once
a second) from a TrainerCallback. Light: torch and transformers are imported only inside `progress_callback`.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from hyperjob.fsutil import atomic_write_text

PROGRESS_NAME = "train_progress.json"
WRITE_INTERVAL_S = 1.0  # a tiny model steps in milliseconds: one fsync'd write per step would slow it down


def progress_path(run_dir: Path) -> Path:
    return run_dir / PROGRESS_NAME


def current_job_id() -> str | None:
    """The job this process runs in, as the stage scripts' outcome records name it (Slurm's id, else local's)."""
    return os.environ.get("SLURM_JOB_ID") or os.environ.get("HYPERJOB_JOB_ID") or None


@dataclass(frozen=True)
class Progress:
    """One snapshot: `first_step` is where this attempt began (a resumed run starts past 0), for the rate."""

    step: int
    total: int
    started: float  # epoch seconds, when this attempt's training loop began
    updated: float
    first_step: int = 0
    job_id: str | None = None

    @property
    def percent(self) -> float | None:
        return 100.0 * self.step / self.total if self.total > 0 else None

    def elapsed(self, now: float) -> float:
        return max(0.0, now - self.started)

    def remaining(self, now: float) -> float | None:
        """Seconds left at this attempt's rate so far; None before its first step."""
        done = self.step - self.first_step
        if done <= 0 or self.total <= 0 or self.step >= self.total:
            return None
        return (self.total - self.step) * self.elapsed(now) / done

    def belongs_to(self, job_id: str | None, since: float | None) -> bool:
        """Whether this file was written by the stage's current attempt: not by an earlier job of the run (a
        resume) nor before the current attempt started (a requeued job keeps its id; a local one is `local-N`)."""
        if job_id is not None and self.job_id is not None and self.job_id != job_id:
            return False
        return since is None or self.updated >= since

    def describe(self, now: float) -> str:
        """`step 120/1251 (9.6%), 00:14:03 elapsed, about 02:11:40 left`."""
        pct = self.percent
        words = [f"step {self.step}/{self.total}" + (f" ({pct:.1f}%)" if pct is not None else "")]
        words.append(f"{clock(self.elapsed(now))} elapsed")
        left = self.remaining(now)
        if left is not None:
            words.append(f"about {clock(left)} left")
        return ", ".join(words)

    def to_json(self, now: float) -> dict[str, Any]:
        left = self.remaining(now)
        pct = self.percent
        return {
            **asdict(self),
            "percent": None if pct is None else round(pct, 2),
            "elapsed_s": round(self.elapsed(now), 1),
            "remaining_s": None if left is None else round(left, 1),
        }


def clock(seconds: float) -> str:
    """HH:MM:SS; hours go past 24 rather than into days (a long run is read in hours)."""
    s = int(seconds)
    return f"{s // 3600:02d}:{s % 3600 // 60:02d}:{s % 60:02d}"


def write_progress(
    run_dir: Path, step: int, total: int, started: float, *, first_step: int = 0, job_id: str | None = None
) -> None:
    """Replace the progress file whole (readers never see half of it)."""
    snapshot = Progress(step, total, started, time.time(), first_step, job_id)
    atomic_write_text(progress_path(run_dir), json.dumps(asdict(snapshot)) + "\n")


def read_progress(run_dir: Path) -> Progress | None:
    """The last snapshot, or None when there is none or it cannot be read (status must not fail on it)."""
    try:
        data = json.loads(progress_path(run_dir).read_text(encoding="utf-8"))
        progress = Progress(**data)
    except (OSError, ValueError, TypeError):
        return None
    numbers = (progress.step, progress.total, progress.first_step, progress.started, progress.updated)
    if not all(isinstance(n, (int, float)) and math.isfinite(n) for n in numbers):
        return None
    return progress


def progress_callback(run_dir: Path, *, interval_s: float = WRITE_INTERVAL_S) -> Any:
    """A TrainerCallback that keeps the progress file current from rank 0: at train begin, after a step (at most
    every `interval_s`) and at train end. A failed write warns once and never stops training."""
    from transformers import TrainerCallback

    job_id = current_job_id()

    class ProgressFile(TrainerCallback):
        def __init__(self) -> None:
            self.started = time.time()
            self.first_step = 0
            self.last_write = -math.inf
            self.warned = False

        def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            self.started, self.first_step = time.time(), state.global_step
            self._write(state, force=True)

        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            self._write(state, force=False)

        def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            self._write(state, force=True)

        def _write(self, state: Any, *, force: bool) -> None:
            if not state.is_world_process_zero or (not force and time.monotonic() - self.last_write < interval_s):
                return
            self.last_write = time.monotonic()
            try:
                write_progress(run_dir, state.global_step, state.max_steps, self.started,
                               first_step=self.first_step, job_id=job_id)  # fmt: skip
            except OSError as e:
                if not self.warned:
                    print(f"hyperjob train: warning: cannot write {progress_path(run_dir)}: {e}", file=sys.stderr)
                    self.warned = True

    return ProgressFile()
