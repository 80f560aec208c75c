"""A run from start to end: lay out the run directory, submit the DAG, follow it.

Files are written once, into a temp dir renamed into place, so a failed render
leaves nothing; Slurm is reached only through `hyperjob.schedule.slurm`.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import replace
from datetime import datetime
from pathlib import Path

from hyperjob import __version__
from hyperjob.config.load import config_hash, dump_config
from hyperjob.config.models import HyperjobConfig
from hyperjob.fsutil import atomic_dir
from hyperjob.paths import RunPaths
from hyperjob.plan.planner import Plan
from hyperjob.render.scripts import RenderedStage, render_run
from hyperjob.schedule import local, slurm
from hyperjob.schedule.manifest import Manifest, StageRecord, now, read_manifest, write_manifest
from hyperjob.schedule.states import StageState


class SubmitError(RuntimeError):
    """Submission failed; jobs already queued for this run were cancelled."""


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
        paths.config.write_text(dump_config(cfg))
        for s in stages:
            script = paths.scripts / s.filename
            script.write_text(s.text)
            os.chmod(script, 0o755)
        if manifest is not None:
            paths.manifest.write_text(manifest.to_json())
    return manifest


def submit_slurm(run_dir: Path, manifest: Manifest, echo: Callable[[str], None] = print) -> Manifest:
    """Queue every stage at once, each `afterok` on the one before; cancel all on any failure."""
    previous: str | None = None
    submitted: list[str] = []
    try:
        for rec in manifest.stages:
            job_id = slurm.sbatch(run_dir / rec.script, [previous] if previous else [], cwd=run_dir)
            submitted.append(job_id)
            log = RunPaths(run_dir).log(rec.index, rec.name, job_id)
            manifest = manifest.with_stage(replace(rec, job_id=job_id, state=StageState.PENDING, log=str(log)))
            write_manifest(run_dir, manifest)
            echo(f"  {rec.index:02d} {rec.name:<12} job {job_id}" + (f"  (afterok:{previous})" if previous else ""))
            previous = job_id
    except slurm.SlurmError as e:
        if submitted:
            slurm.cancel(submitted)
        raise SubmitError(f"sbatch failed for stage {rec.name}: {e}; cancelled jobs {submitted}") from None
    return manifest


def submit_local(run_dir: Path, manifest: Manifest, *, wait: bool) -> Manifest:
    manifest = replace(
        manifest,
        stages=tuple(replace(r, job_id=f"local-{r.index}", state=StageState.PENDING) for r in manifest.stages),
    )
    write_manifest(run_dir, manifest)
    if wait:
        local.run_local(run_dir)
    else:
        local.spawn_detached(run_dir)
    return read_manifest(run_dir)


def refresh(run_dir: Path) -> Manifest:
    """Current state of every stage: Slurm first (squeue, then scontrol), the manifest for what Slurm forgot."""
    manifest = read_manifest(run_dir)
    if manifest.scheduler != "slurm":
        return manifest
    live = [r.job_id for r in manifest.stages if r.job_id and not r.state.is_terminal]
    if not live:
        return manifest
    infos = slurm.query(live)
    changed = False
    for rec in manifest.stages:
        info = infos.get(rec.job_id or "")
        if info is None:
            continue
        code = rec.exit_code if info.exit_code is None else f"{info.exit_code}:{info.signal or 0}"
        update = replace(rec, state=info.state, reason=info.reason or "", exit_code=code)
        if update != rec:
            manifest, changed = manifest.with_stage(update), True
    if changed:
        write_manifest(run_dir, manifest)
    return manifest


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
        except slurm.SlurmError as e:
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


def cancel_run(run_dir: Path) -> Manifest:
    manifest = refresh(run_dir)
    live = [r for r in manifest.stages if not r.state.is_terminal]
    if manifest.scheduler == "slurm":
        ids = [r.job_id for r in live if r.job_id]
        if ids:
            slurm.cancel(ids)
    elif manifest.scheduler == "local":
        local.cancel_local(manifest)
    for rec in live:
        manifest = manifest.with_stage(replace(rec, state=StageState.CANCELLED, reason="cancelled by user"))
    write_manifest(run_dir, manifest)
    return manifest
