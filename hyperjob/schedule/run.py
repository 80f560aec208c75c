"""A run from start to end: lay out the run directory, submit the DAG, follow it.

Files are written once, into a temp dir renamed into place, so a failed render
leaves nothing; schedulers are reached only through their protocol (`schedule.base`).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from datetime import datetime
from pathlib import Path

from hyperjob import __version__
from hyperjob.config.load import config_hash, dump_config
from hyperjob.config.models import HyperjobConfig
from hyperjob.fsutil import atomic_dir
from hyperjob.paths import RunPaths
from hyperjob.plan.planner import Plan
from hyperjob.render.scripts import RenderedStage, render_run
from hyperjob.schedule import registry
from hyperjob.schedule.base import Echo, Scheduler, SchedulerError, SubmitRequest
from hyperjob.schedule.manifest import Manifest, StageRecord, now, read_manifest, write_manifest
from hyperjob.schedule.outcome import Outcome, combine, combine_all, read_outcomes, stranded
from hyperjob.schedule.states import StageState


def new_run_dir(cfg: HyperjobConfig, when: datetime | None = None) -> Path:
    stamp = (when or datetime.now()).strftime("%Y%m%d-%H%M%S")
    base = cfg.workdir / "runs" / f"{cfg.name}-{stamp}"
    run_dir, n = base, 1
    while run_dir.exists():
        n += 1
        run_dir = base.with_name(f"{base.name}-{n}")
    return run_dir


def initial_manifest(cfg: HyperjobConfig, run_dir: Path, stages: list[RenderedStage], scheduler: str) -> Manifest:
    records = tuple(StageRecord(index=s.index, name=s.stage, script=f"scripts/{s.filename}") for s in stages)
    return Manifest(
        name=cfg.name,
        run_dir=str(run_dir),
        config_hash=config_hash(cfg),
        scheduler=scheduler,
        created=now(),
        hyperjob_version=__version__,
        stages=records,
    )


def write_run_dir(cfg: HyperjobConfig, plan: Plan, run_dir: Path, scheduler: str | None) -> Manifest | None:
    """Render everything first, then write config, scripts (and a manifest) in one rename."""
    stages = render_run(cfg, plan, run_dir)
    manifest = initial_manifest(cfg, run_dir, stages, scheduler) if scheduler else None
    with atomic_dir(run_dir) as tmp:
        paths = RunPaths(tmp)
        paths.scripts.mkdir()
        paths.logs.mkdir()
        paths.outcomes.mkdir()
        paths.config.write_text(dump_config(cfg))
        for s in stages:
            script = paths.scripts / s.filename
            script.write_text(s.text)
            os.chmod(script, 0o755)
        if manifest is not None:
            paths.manifest.write_text(manifest.to_json())
    return manifest


def submit_run(
    scheduler: Scheduler, run_dir: Path, manifest: Manifest, *, wait: bool = False, echo: Echo = print
) -> tuple[Manifest, SubmitRequest]:
    """Build the scheduler's request (no side effects), then carry it out."""
    request = scheduler.request(run_dir, manifest)
    return scheduler.schedule(request, manifest, wait=wait, echo=echo), request


def refresh(run_dir: Path) -> Manifest:
    """Current state of every stage: the scheduler's live view, then each stage's outcome record (see outcome.py).

    The scheduler is asked first and the records read second: a job that ends in between then shows its record,
    never a stale "unknown" that would read as LOST.
    """
    manifest = read_manifest(run_dir)
    if not any(r.is_open for r in manifest.stages):
        return manifest
    scheduler = registry.get(manifest.scheduler)
    live = scheduler.query(run_dir, manifest)
    updated = combine_all(manifest, live, read_outcomes(run_dir, manifest), scheduler.name)
    stuck = stranded(updated)
    if stuck:
        scheduler.cancel(run_dir, replace(updated, stages=tuple(stuck)))
        for rec in stuck:
            why = f"DependencyNeverSatisfied: cancelled by hyperjob ({rec.reason or 'a stage before it failed'})"
            updated = updated.with_stage(replace(rec, state=StageState.CANCELLED, reason=why))
    if updated != manifest:
        write_manifest(run_dir, updated)
    return updated


# A controller restart or a busy slurmctld should not kill a multi-hour --wait.
QUERY_FAILURE_GRACE_S = 120.0


def wait_run(
    run_dir: Path, *, poll: float = 2.0, timeout: float | None = None, echo: Callable[[str], None] = print
) -> Manifest:
    """Poll until every stage is terminal, printing each state change."""
    seen: dict[str, tuple[StageState, str]] = {}
    start = time.monotonic()
    failing_since: float | None = None
    while True:
        try:
            manifest = refresh(run_dir)
            failing_since = None
        except SchedulerError as e:
            failing_since = failing_since or time.monotonic()
            if time.monotonic() - failing_since > QUERY_FAILURE_GRACE_S:
                raise
            echo(f"[{time.strftime('%H:%M:%S')}] warning: {e}; retrying")
            time.sleep(poll)
            continue
        for rec in manifest.stages:
            key = (rec.state, rec.reason)
            if seen.get(rec.name) != key:
                seen[rec.name] = key
                why = f" ({rec.reason})" if rec.reason and rec.reason != "None" else ""
                echo(f"[{time.strftime('%H:%M:%S')}] {rec.name:<12} {rec.state.value}{why}")
        if all(r.state.is_terminal for r in manifest.stages):
            return manifest
        if timeout is not None and time.monotonic() - start > timeout:
            raise TimeoutError(f"run {run_dir} still running after {timeout:.0f}s")
        time.sleep(poll)


@dataclass(frozen=True)
class Cancelled:
    """What `cancel_stages` did: the manifest after it, the stages it cancelled, and the stages that were still
    open in the scheduler's view but whose own outcome records say they had ended (kept as they ended)."""

    manifest: Manifest
    cancelled: tuple[str, ...]
    finished: tuple[str, ...]


def cancel_stages(run_dir: Path) -> Cancelled:
    """Cancel every submitted, unfinished stage. A stage whose script recorded its exit has ended, whatever the
    scheduler still says (Slurm shows a finished job as COMPLETING for a while): exit 0, before or during the
    cancel, is COMPLETED; a non-zero exit recorded before it is that stage's own failure. Only the rest are marked
    CANCELLED. A run with nothing open is left untouched (nothing written), and the scheduler is not asked to
    cancel anything when every open stage turns out to have ended."""
    manifest = refresh(run_dir)
    open_ = [r for r in manifest.stages if r.is_open]
    if not open_:
        return Cancelled(manifest, (), ())
    scheduler = registry.get(manifest.scheduler)
    ended = _ended(open_, read_outcomes(run_dir, manifest), scheduler.name)
    if len(ended) < len(open_):
        scheduler.cancel(run_dir, replace(manifest, stages=tuple(ended.get(r.name, r) for r in manifest.stages)))
        late = _ended(open_, read_outcomes(run_dir, manifest), scheduler.name)
        ended |= {name: rec for name, rec in late.items() if rec.state is StageState.COMPLETED and name not in ended}
    for rec in open_:
        final = ended.get(rec.name) or replace(rec, state=StageState.CANCELLED, reason="cancelled by user")
        manifest = manifest.with_stage(final)
    write_manifest(run_dir, manifest)
    cancelled = tuple(r.name for r in open_ if r.name not in ended)
    return Cancelled(manifest, cancelled, tuple(r.name for r in open_ if r.name in ended))


def _ended(records: list[StageRecord], outcomes: Mapping[str, Outcome], who: str) -> dict[str, StageRecord]:
    """The stages among `records` whose outcome record holds an exit code, as that record says they ended."""
    return {
        r.name: combine(r, None, outcomes[r.name], None, who)
        for r in records
        if r.name in outcomes and outcomes[r.name].finished
    }


def cancel_run(run_dir: Path) -> Manifest:
    """`cancel_stages`, for callers that need only the resulting manifest."""
    return cancel_stages(run_dir).manifest
