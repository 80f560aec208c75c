"""Each stage's own record of how it ended, and the rule that combines it with the scheduler's live view.

Every stage script replaces `outcomes/NN-<stage>.outcome` atomically at start and, from its EXIT trap, at exit
(`key=value` lines: job_id, host, restarts, started, then ended and exit_code). Slurm forgets finished jobs after
MinJobAge (300 s by default) and a local executor can die with its machine, so a status built on the scheduler
alone would show PENDING forever; the record stays. Pure apart from `read_outcomes`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path

from hyperjob.paths import RunPaths
from hyperjob.schedule.base import LiveState
from hyperjob.schedule.manifest import Manifest, StageRecord, exit_text
from hyperjob.schedule.states import StageState

_REQUIRED = ("job_id", "host", "started")


@dataclass(frozen=True)
class Outcome:
    """One stage script's record; `exit_code` is None while it runs (or if it was killed before its trap ran)."""

    job_id: str
    host: str
    started: str
    restarts: int = 0
    ended: str | None = None
    exit_code: int | None = None

    @property
    def finished(self) -> bool:
        return self.exit_code is not None


def parse_outcome(text: str) -> Outcome:
    """Parse a record; ValueError names what is wrong (a record is only ever replaced whole, never half-written)."""
    fields: dict[str, str] = {}
    for line in text.splitlines():
        if not line.strip():
            continue
        key, sep, value = line.partition("=")
        if not sep or not key.isidentifier():
            raise ValueError(f"not a key=value line: {line!r}")
        fields[key] = value.strip()
    missing = [k for k in _REQUIRED if not fields.get(k)]
    if missing:
        raise ValueError(f"missing {', '.join(missing)}")
    code = fields.get("exit_code")
    if code is not None and not code.isdigit():
        raise ValueError(f"exit_code {code!r} is not a number")
    restarts = fields.get("restarts", "0")
    if not restarts.isdigit():
        raise ValueError(f"restarts {restarts!r} is not a number")
    return Outcome(
        job_id=fields["job_id"],
        host=fields["host"],
        started=fields["started"],
        restarts=int(restarts),
        ended=fields.get("ended") or None,
        exit_code=None if code is None else int(code),
    )


def read_outcomes(run_dir: Path, manifest: Manifest) -> dict[str, Outcome]:
    """The records of this submission's jobs, by stage name; another job's record (an earlier submission of the
    same run directory) or an unreadable file counts as no record."""
    paths = RunPaths(run_dir)
    found: dict[str, Outcome] = {}
    for rec in manifest.stages:
        try:
            outcome = parse_outcome(paths.outcome(rec.index, rec.name).read_text(encoding="utf-8", errors="replace"))
        except (OSError, ValueError):
            continue
        if rec.job_id is not None and outcome.job_id == rec.job_id:
            found[rec.name] = outcome
    return found


def combine(
    rec: StageRecord, live: LiveState | None, outcome: Outcome | None, failed_upstream: StageRecord | None, who: str
) -> StageRecord:
    """The new state of one unfinished stage.

    The scheduler wins while the job is pending or running; the stage's own record wins once it has finished
    (the scheduler's terminal state is kept when it says more than "failed": CANCELLED, TIMEOUT, OUT_OF_MEMORY);
    a job that nobody knows any more is CANCELLED when a stage it waits for did not succeed (afterok would never
    have let it start), else LOST with the reason: never PENDING forever.
    """
    if live is not None and not live.state.is_terminal:
        return replace(rec, state=live.state, reason=live.reason, exit_code=live.exit_code or rec.exit_code)
    if outcome is not None and outcome.exit_code is not None:
        state, reason = StageState.COMPLETED if outcome.exit_code == 0 else StageState.FAILED, ""
        if live is not None and outcome.exit_code != 0 and live.state is not StageState.COMPLETED:
            state, reason = live.state, live.reason
        return replace(
            rec,
            state=state,
            reason=reason,
            exit_code=exit_text(outcome.exit_code),
            started=outcome.started,
            ended=outcome.ended,
        )
    if live is not None:  # finished without a record: never started (a failed dependency) or killed at once
        return replace(rec, state=live.state, reason=live.reason, exit_code=live.exit_code or rec.exit_code)
    if failed_upstream is not None:
        why = f"DependencyNeverSatisfied ({failed_upstream.name} {failed_upstream.state.value})"
        return replace(rec, state=StageState.CANCELLED, reason=why)
    if outcome is not None:
        why = (
            f"started on {outcome.host} at {outcome.started} and left no exit record; {who} no longer knows job "
            f"{rec.job_id}: killed without a chance to record (node failure, SIGKILL, out of memory)"
        )
        return replace(rec, state=StageState.LOST, reason=why, started=outcome.started)
    why = f"{who} no longer knows job {rec.job_id} and the stage left no outcome record (it never started)"
    return replace(rec, state=StageState.LOST, reason=why)


def stranded(manifest: Manifest) -> list[StageRecord]:
    """Stages still pending behind a stage that did not succeed: afterok will never let them start, and Slurm's
    --kill-on-invalid-dep can be slow or off (a cluster default), so hyperjob cancels them itself."""
    out: list[StageRecord] = []
    failed = False
    for rec in manifest.stages:
        if failed and rec.is_open and rec.state is StageState.PENDING:
            out.append(rec)
        failed = failed or (rec.state.is_terminal and not rec.state.is_success)
    return out


def combine_all(
    manifest: Manifest, live: Mapping[str, LiveState], outcomes: Mapping[str, Outcome], who: str
) -> Manifest:
    """Apply `combine` to every submitted, unfinished stage, in order (a stage's upstream is decided first)."""
    failed: StageRecord | None = None
    for rec in manifest.stages:
        if rec.is_open:
            rec = combine(rec, live.get(rec.name), outcomes.get(rec.name), failed, who)
            manifest = manifest.with_stage(rec)
        if failed is None and rec.state.is_terminal and not rec.state.is_success:
            failed = rec
    return manifest
