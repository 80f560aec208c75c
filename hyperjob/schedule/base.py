"""What a scheduler is: submit a run's stages with their dependencies, say how they are, cancel them, find logs.

Submission has two phases, as in torchx: `request` builds a `SubmitRequest` from the run directory with no side
effects (its `lines` are the exact commands, which `submit --dry-run` prints), then `schedule` carries it out. A
scheduler is one module (slurm, local, dry run) registered by name in `hyperjob.schedule.registry`; the CLI and
the run logic only talk to this protocol.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from hyperjob.paths import RunPaths
from hyperjob.schedule.manifest import Manifest, StageRecord
from hyperjob.schedule.states import StageState

Echo = Callable[[str], None]


class SchedulerError(RuntimeError):
    """The scheduler could not be reached, or gave an answer that cannot be read; `--wait` retries these."""


class SubmitError(RuntimeError):
    """Submission failed; jobs already queued for this run were cancelled."""


@dataclass(frozen=True)
class Submission:
    """One stage to submit: its script, and the stages it must wait for (afterok)."""

    stage: str
    script: Path
    after: tuple[str, ...]


@dataclass(frozen=True)
class SubmitRequest:
    """Everything a submission will do, decided before anything is done. `lines`: the commands, as shell."""

    scheduler: str
    run_dir: Path
    submissions: tuple[Submission, ...]
    lines: tuple[str, ...]


@dataclass(frozen=True)
class LiveState:
    """What a scheduler says about one stage's job right now."""

    state: StageState
    reason: str = ""
    exit_code: str | None = None  # "<status>:<signal>", as Slurm prints it


class Scheduler(Protocol):
    """The unit the CLI and the run logic talk to. `priority` orders `--scheduler auto` (lower first; None: never
    chosen automatically); `max_nodes` is the largest allocation it can run (None: any); `waits_on_live_jobs`:
    new submissions can wait for jobs queued earlier (afterok on a job id), so a run can be resumed while some of
    its stages are still queued or running."""

    name: str
    priority: int | None
    max_nodes: int | None
    waits_on_live_jobs: bool

    def unavailable(self) -> str | None:
        """Why this scheduler cannot be used on this machine, or None when it can."""
        ...

    def request(self, run_dir: Path, manifest: Manifest) -> SubmitRequest:
        """The submission of every stage of `manifest`, each after the one before; no side effects."""
        ...

    def schedule(self, request: SubmitRequest, manifest: Manifest, *, wait: bool, echo: Echo) -> Manifest:
        """Carry out `request`; returns the manifest with job ids. `wait`: the scheduler may run in the foreground."""
        ...

    def query(self, run_dir: Path, manifest: Manifest) -> Mapping[str, LiveState]:
        """The live state of the run's unfinished stages, by stage name; a stage whose job the scheduler no longer
        knows (purged, executor gone) is absent. Raises SchedulerError when it cannot tell."""
        ...

    def cancel(self, run_dir: Path, manifest: Manifest) -> None:
        """Stop every unfinished stage of the run."""
        ...

    def log(self, run_dir: Path, rec: StageRecord) -> Path | None:
        """Where this stage's job writes its output (None: it never ran anywhere)."""
        ...


def submissions(run_dir: Path, manifest: Manifest) -> tuple[Submission, ...]:
    """The stages still to submit (no job yet) with the stages they wait for: today's DAG is a chain, each after
    the one before, unless that one has completed (a resumed run keeps its completed stages). A stage waited for
    may be one that is not submitted now: a live job from before (resume), whose id the scheduler links to."""
    subs = []
    for i, rec in enumerate(manifest.stages):
        if rec.job_id is not None:
            continue
        before = manifest.stages[i - 1] if i else None
        after = (before.name,) if before is not None and not before.state.is_success else ()
        subs.append(Submission(rec.name, run_dir / rec.script, after))
    return tuple(subs)


def job_log(run_dir: Path, rec: StageRecord) -> Path | None:
    """The log a stage's job writes (the scripts' `--output` pattern; the local executor uses the same name)."""
    return None if rec.job_id is None else RunPaths(run_dir).log(rec.index, rec.name, rec.job_id)
