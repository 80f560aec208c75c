"""Resume a partly failed run: redo what failed, was cancelled or lost, and what comes after it; keep the rest.

A completed stage is kept only when its outcome record says it exited 0 AND its completion marker still holds
(hyperjob.stage_outputs: same config values, same outputs, same upstream). A stage still queued or running keeps
its job, and what is redone after it waits for it (afterok on its live job id). A config change that would leave
a completed stage standing on old values is refused, naming the keys, unless forced (then that stage is redone).
`plan_resume` decides, purely; `resume_run` carries it out through the scheduler protocol.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal

from hyperjob.config.load import config_hash, dump_config
from hyperjob.config.models import HyperjobConfig
from hyperjob.fsutil import atomic_write_text
from hyperjob.paths import RunPaths
from hyperjob.plan.planner import Plan
from hyperjob.render.scripts import render_run
from hyperjob.schedule import registry
from hyperjob.schedule.base import Echo, Scheduler
from hyperjob.schedule.manifest import Manifest, StageRecord, write_manifest
from hyperjob.schedule.run import refresh, submit_run
from hyperjob.schedule.states import StageState
from hyperjob.stage_outputs import MarkerCheck, check_marker, drop_marker

Action = Literal["keep", "wait", "redo"]


class ResumeError(RuntimeError):
    """Resume cannot go ahead (a user decision is needed); the message says why and what to do."""


@dataclass(frozen=True)
class Decision:
    """What resume does with one stage: keep its result, wait for its live job, or redo it; `why` says why."""

    stage: str
    action: Action
    why: str


@dataclass(frozen=True)
class ResumePlan:
    decisions: tuple[Decision, ...]
    changed: Mapping[str, Mapping[str, tuple[Any, Any]]]  # completed stage -> its config keys that changed

    @property
    def redo(self) -> tuple[str, ...]:
        return tuple(d.stage for d in self.decisions if d.action == "redo")


def _show(value: Any) -> str:
    return "absent" if value == "<absent>" else repr(value)


def plan_resume(manifest: Manifest, proofs: Mapping[str, MarkerCheck], *, force: bool = False) -> ResumePlan:
    """Decide per stage, in DAG order (a chain: once one stage is redone, every later one is too)."""
    decisions: list[Decision] = []
    changed: dict[str, Mapping[str, tuple[Any, Any]]] = {}
    redoing: str | None = None
    for rec in manifest.stages:
        proof = proofs.get(rec.name)
        if redoing is not None:
            decisions.append(Decision(rec.name, "redo", f"after {redoing}, which is redone"))
        elif rec.state is StageState.COMPLETED and proof is not None and proof.ok:
            decisions.append(Decision(rec.name, "keep", f"completed; {proof.why}"))
        elif rec.state is StageState.COMPLETED and proof is not None and proof.changed_keys:
            changed[rec.name] = proof.changed_keys
            decisions.append(Decision(rec.name, "redo", f"completed, but {proof.why} (forced)"))
        elif rec.state is StageState.COMPLETED:
            why = proof.why if proof is not None else "no proof of completion"
            decisions.append(Decision(rec.name, "redo", f"completed, but {why}"))
        elif rec.is_open:
            decisions.append(Decision(rec.name, "wait", f"{rec.state.value} as job {rec.job_id}: later stages wait"))
        else:
            reason = f", {rec.reason}" if rec.reason else ""
            decisions.append(Decision(rec.name, "redo", f"{rec.state.value}{reason}"))
        if decisions[-1].action == "redo" and redoing is None:
            redoing = rec.name
    if changed and not force:
        lines = [
            f"stage {stage} completed with {key}={_show(old)}, the config now says {_show(new)}"
            for stage, keys in changed.items()
            for key, (old, new) in keys.items()
        ]
        raise ResumeError(
            "; ".join(lines) + ". Resuming would redo it and everything after it: pass --force to do that, "
            "or resume with the config the run had"
        )
    return ResumePlan(tuple(decisions), changed)


def _archive_outcome(paths: RunPaths, rec: StageRecord) -> None:
    """A stage about to be redone keeps its old record under outcomes/attempts/ (status reads only the new one)."""
    record = paths.outcome(rec.index, rec.name)
    if record.exists():
        attempts = paths.outcomes / "attempts"
        attempts.mkdir(exist_ok=True)
        os.replace(record, attempts / f"{record.stem}.{rec.job_id or 'unsubmitted'}.outcome")
    drop_marker(paths, rec.name)


def _reset(rec: StageRecord) -> StageRecord:
    return replace(rec, job_id=None, state=StageState.RENDERED, reason="", exit_code=None, log=None,
                   started=None, ended=None)  # fmt: skip


def _rewrite_run_files(cfg: HyperjobConfig, plan: Plan, run_dir: Path, manifest: Manifest) -> None:
    """The config (possibly changed) and the scripts rendered from it, each file replaced atomically."""
    rendered = render_run(cfg, plan, run_dir)
    if [s.stage for s in rendered] != [r.name for r in manifest.stages]:
        have, want = [r.name for r in manifest.stages], [s.stage for s in rendered]
        raise ResumeError(f"the config's stages {want} differ from the run's {have}: submit a new run instead")
    paths = RunPaths(run_dir)
    atomic_write_text(paths.config, dump_config(cfg))
    for st in rendered:
        atomic_write_text(paths.scripts / st.filename, st.text)
        os.chmod(paths.scripts / st.filename, 0o755)


def _check_resumable(manifest: Manifest, cfg: HyperjobConfig) -> Scheduler:
    if cfg.name != manifest.name:
        raise ResumeError(f"name: the run is {manifest.name!r}, the config says {cfg.name!r}")
    try:
        scheduler = registry.get(manifest.scheduler)
    except KeyError:
        raise ResumeError(f"a run made with --scheduler {manifest.scheduler} cannot be resumed; submit it") from None
    live = [r.name for r in manifest.stages if r.is_open]
    if live and not scheduler.waits_on_live_jobs:
        raise ResumeError(
            f"stage {live[0]} is still {manifest.stage(live[0]).state.value} under the {scheduler.name} scheduler, "
            f"which cannot make new stages wait for it: wait for the run to end, or `hyperjob cancel "
            f"{manifest.run_dir}` first"
        )
    return scheduler


def resume_run(
    run_dir: Path, cfg: HyperjobConfig, plan: Plan, *, force: bool = False, wait: bool = False, echo: Echo = print
) -> tuple[Manifest, ResumePlan]:
    """Redo what needs redoing; returns the manifest as submitted and the plan (whose `redo` may be empty)."""
    paths = RunPaths(run_dir)
    manifest = refresh(run_dir)
    scheduler = _check_resumable(manifest, cfg)
    proofs = {r.name: check_marker(paths, cfg, r.name) for r in manifest.stages if r.state is StageState.COMPLETED}
    decided = plan_resume(manifest, proofs, force=force)
    for d in decided.decisions:
        echo(f"  {d.stage:<12} {d.action:<5} {d.why}")
    if not decided.redo:
        return manifest, decided
    stale = replace(manifest, stages=tuple(r for r in manifest.stages if r.name in decided.redo and r.is_open))
    if stale.stages:  # queued behind a stage that is redone now: their jobs must not run
        scheduler.cancel(run_dir, stale)
    _rewrite_run_files(cfg, plan, run_dir, manifest)
    for rec in manifest.stages:
        if rec.name in decided.redo:
            _archive_outcome(paths, rec)
            manifest = manifest.with_stage(_reset(rec))
    manifest = replace(manifest, config_hash=config_hash(cfg))
    write_manifest(run_dir, manifest)
    submitted, _ = submit_run(scheduler, run_dir, manifest, wait=wait, echo=echo)
    return _check_waited_on(run_dir, submitted, decided, scheduler), decided


def _check_waited_on(run_dir: Path, submitted: Manifest, decided: ResumePlan, scheduler: Scheduler) -> Manifest:
    """Slurm takes an afterok on a job it has already forgotten as satisfied: if a stage we made others wait for
    failed meanwhile, cancel what was just queued rather than let it run on a failed upstream."""
    waited = [d.stage for d in decided.decisions if d.action == "wait"]
    if not waited:
        return submitted
    now = refresh(run_dir)
    failed = [n for n in waited if now.stage(n).state.is_terminal and not now.stage(n).state.is_success]
    if failed:
        queued = replace(now, stages=tuple(r for r in now.stages if r.name in decided.redo and r.is_open))
        scheduler.cancel(run_dir, queued)
        raise ResumeError(
            f"stage {failed[0]} failed while resume was submitting; what was queued after it is cancelled: "
            f"run `hyperjob resume {run_dir}` again"
        )
    return now
