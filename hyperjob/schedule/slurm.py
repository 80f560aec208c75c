"""The only module that runs Slurm commands.

Side effects sit in four small functions (sbatch, query, cancel, available) so that one fake replaces
all of Slurm in unit tests (`sbatch_command` is the pure part of sbatch, shared with the dry run);
everything they read is parsed by the pure hyperjob.schedule.parsers.
Status works without slurmdbd: squeue for live jobs, then `scontrol show job` for jobs squeue has
dropped (kept by slurmctld for MinJobAge seconds, 300 by default). sacct is never called.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path

from hyperjob.schedule.base import SchedulerError
from hyperjob.schedule.parsers import (
    SQUEUE_FORMAT,
    JobInfo,
    parse_sbatch_parsable,
    parse_scontrol_show_job,
    parse_squeue,
)

SUBMIT_TIMEOUT_S = 60.0
QUERY_TIMEOUT_S = 30.0

# A job id as sbatch prints it, or an array task / het component id as squeue prints it.
_JOB_ID = re.compile(r"\d+(?:_\d+|\+\d+)?")
# Slurm's message for ids it no longer (or never) knew; squeue and scontrol exit 1 with it.
_INVALID_JOB_ID = "Invalid job id specified"
# scancel errors that mean "nothing left to cancel" (scancel exits 0 after printing them).
_CANCEL_BENIGN = (_INVALID_JOB_ID, "already completing or completed")


class SlurmError(SchedulerError):
    """A Slurm command failed; carries the command line and its stderr for the user."""

    def __init__(self, cmd: Sequence[str], returncode: int | None, stderr: str) -> None:
        self.cmd = list(cmd)
        self.returncode = returncode
        self.stderr = stderr.strip()
        status = "could not run" if returncode is None else f"exit {returncode}"
        super().__init__(f"`{shlex.join(self.cmd)}` failed ({status}): {self.stderr or 'no error output'}")


def _run(
    cmd: list[str],
    *,
    timeout: float,
    cwd: Path | None = None,
    env: Mapping[str, str] | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run one Slurm command; a missing binary or a hung controller becomes a SlurmError."""
    full_env = None if env is None else {**os.environ, **env}
    try:
        return subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=timeout, cwd=cwd, env=full_env)
    except FileNotFoundError as exc:
        raise SlurmError(cmd, None, f"{cmd[0]} not found on PATH (is Slurm installed?)") from exc
    except subprocess.TimeoutExpired as exc:
        raise SlurmError(cmd, None, f"no answer within {timeout:g}s (is slurmctld up?)") from exc


def _check_ids(job_ids: Iterable[str]) -> list[str]:
    """Unique ids in order; anything but a job id is a caller bug, not something to send to Slurm."""
    ids = list(dict.fromkeys(str(job_id).strip() for job_id in job_ids))
    bad = [job_id for job_id in ids if not _JOB_ID.fullmatch(job_id)]
    if bad:
        raise ValueError(f"not Slurm job ids: {bad}")
    return ids


def available() -> bool:
    """True when sbatch is on PATH (the cluster may still be unreachable)."""
    return shutil.which("sbatch") is not None


def sbatch(
    script: Path,
    dependencies: Sequence[str] = (),
    *,
    cwd: Path,
    env: Mapping[str, str] | None = None,
) -> str:
    """Submit `script` after `dependencies` succeed (afterok); returns the job id.

    `--kill-on-invalid-dep=yes` makes Slurm cancel the job as soon as a dependency fails, instead of
    leaving it pending forever with reason DependencyNeverSatisfied. `env` is added to the current
    environment. Note that Slurm treats a dependency on a job id it does not know (purged after
    MinJobAge) as satisfied, so callers must check old upstream jobs themselves.
    """
    cmd = sbatch_command(script, _check_ids(dependencies))
    proc = _run(cmd, timeout=SUBMIT_TIMEOUT_S, cwd=cwd, env=env)
    if proc.returncode != 0:
        raise SlurmError(cmd, proc.returncode, proc.stderr)
    try:
        return parse_sbatch_parsable(proc.stdout)
    except ValueError as exc:
        raise SlurmError(cmd, proc.returncode, f"{exc}\n{proc.stderr}") from exc


def sbatch_command(script: Path, dependencies: Sequence[str]) -> list[str]:
    """The sbatch command line for `script` after `dependencies` (job ids, or placeholders in a dry run)."""
    cmd = ["sbatch", "--parsable", "--kill-on-invalid-dep=yes"]
    if dependencies:
        cmd.append("--dependency=afterok:" + ":".join(dependencies))
    cmd.append(str(script))
    return cmd


def _parsed(cmd: list[str], parse: Callable[[str], dict[str, JobInfo]], stdout: str) -> dict[str, JobInfo]:
    """An answer we cannot read is the scheduler's error (retried by --wait), not a crash."""
    try:
        return parse(stdout)
    except ValueError as exc:
        raise SlurmError(cmd, 0, f"unreadable output ({exc})") from None


def _squeue(job_ids: list[str]) -> dict[str, JobInfo]:
    cmd = ["squeue", "--noheader", f"--jobs={','.join(job_ids)}", f"--format={SQUEUE_FORMAT}"]
    proc = _run(cmd, timeout=QUERY_TIMEOUT_S)
    if proc.returncode != 0:
        if _INVALID_JOB_ID in proc.stderr:  # only when every id is unknown
            return {}
        raise SlurmError(cmd, proc.returncode, proc.stderr)
    return _parsed(cmd, parse_squeue, proc.stdout)


def _scontrol_show_job(job_id: str) -> dict[str, JobInfo]:
    # Slurm 22.05's scontrol takes one id per call (`1,2` is "Invalid job id specified").
    cmd = ["scontrol", "--oneliner", "show", "job", job_id]
    proc = _run(cmd, timeout=QUERY_TIMEOUT_S)
    if proc.returncode != 0:
        if _INVALID_JOB_ID in proc.stderr:
            return {}
        raise SlurmError(cmd, proc.returncode, proc.stderr)
    return _parsed(cmd, parse_scontrol_show_job, proc.stdout)


def _answered(job_id: str, jobs: Mapping[str, JobInfo]) -> bool:
    """squeue answers for an array job with its tasks (`10_0`, `10_[1-3]`), never with `10` itself."""
    return job_id in jobs or any(key.startswith(f"{job_id}_") for key in jobs)


def query(job_ids: Iterable[str]) -> dict[str, JobInfo]:
    """Current state of the given jobs, keyed by job id (array tasks as `<id>_<task>`).

    squeue answers for pending and running jobs; jobs it has dropped (finished) are asked of
    `scontrol show job`, which has exit codes. Ids that neither knows (purged, or from another cluster)
    are absent from the result, so the caller falls back to what its manifest recorded.
    """
    ids = _check_ids(job_ids)
    if not ids:
        return {}
    jobs = _squeue(ids)
    for job_id in ids:
        if not _answered(job_id, jobs):
            jobs.update(_scontrol_show_job(job_id))
    return jobs


def cancel(job_ids: Iterable[str]) -> None:
    """Cancel the given jobs; jobs that already ended or are unknown are not an error."""
    ids = _check_ids(job_ids)
    if not ids:
        return
    cmd = ["scancel", *ids]
    proc = _run(cmd, timeout=QUERY_TIMEOUT_S)
    # scancel exits 0 even when some ids failed, so its stderr decides.
    errors = [
        line
        for line in proc.stderr.splitlines()
        if "error" in line.lower() and not any(benign in line for benign in _CANCEL_BENIGN)
    ]
    if proc.returncode != 0 or errors:
        raise SlurmError(cmd, proc.returncode, "\n".join(errors) or proc.stderr)
