"""hyperjob.schedule.slurm against a real single-node Slurm (see tests/fixtures_slurm.py).

Only the public functions of hyperjob.schedule.slurm are used, so these tests pin what the rest of
hyperjob relies on: afterok ordering, --kill-on-invalid-dep cancelling the dependents of a failed
stage, cancel, and status for jobs squeue has already dropped. Jobs are tiny; the file takes ~15 s.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import pytest
import slurm_captures
from fixtures_slurm import SlurmCluster

from hyperjob.schedule import slurm
from hyperjob.schedule.parsers import JobInfo
from hyperjob.schedule.states import StageState

pytestmark = pytest.mark.slurm

POLL_S = 0.2
Snapshot = dict[str, JobInfo]


def write_job(workdir: Path, name: str, body: str, cluster: SlurmCluster) -> Path:
    """A batch script whose output goes to <workdir>/slurm-<jobid>.out; the time limit bounds leftovers."""
    script = workdir / f"{name}.sbatch"
    header = f"#!/bin/bash\n#SBATCH --job-name={name}\n#SBATCH --partition={cluster.partition}\n#SBATCH --time=5\n"
    script.write_text(f"{header}#SBATCH --output=slurm-%j.out\nset -e\n{body}\n")
    return script


def timestamped_step(name: str, exit_code: int = 0) -> str:
    return (
        f'echo "$(date +%s.%N) {name} start" >> chain.log\nsleep 0.3\n'
        f'echo "$(date +%s.%N) {name} end" >> chain.log\nexit {exit_code}'
    )


def poll(job_ids: Sequence[str], until: Callable[[Snapshot], bool], timeout: float = 30.0) -> list[Snapshot]:
    """Query until `until` holds; returns every snapshot seen, so tests can check intermediate states."""
    seen: list[Snapshot] = []
    deadline = time.monotonic() + timeout
    while True:
        seen.append(slurm.query(job_ids))
        if until(seen[-1]):
            return seen
        if time.monotonic() > deadline:
            pytest.fail(f"jobs {list(job_ids)} did not get there within {timeout}s; last: {seen[-1]}")
        time.sleep(POLL_S)


def all_terminal(job_ids: Sequence[str]) -> Callable[[Snapshot], bool]:
    return lambda jobs: all(i in jobs and jobs[i].state.is_terminal for i in job_ids)


def test_afterok_chain_runs_in_order(tmp_path: Path, slurm_cluster: SlurmCluster) -> None:
    ids: list[str] = []
    for name in "ABC":
        script = write_job(tmp_path, name, timestamped_step(name), slurm_cluster)
        ids.append(slurm.sbatch(script, ids[-1:], cwd=tmp_path))
    assert len(set(ids)) == 3

    first = slurm.query(ids)
    assert first[ids[2]].state is StageState.PENDING  # C waits for B, which waits for A
    assert first[ids[2]].reason in {"Dependency", None}

    final = poll(ids, all_terminal(ids))[-1]
    assert [final[i].state for i in ids] == [StageState.COMPLETED] * 3
    assert [final[i].exit_code for i in ids] == [0, 0, 0]
    events = [line.split() for line in (tmp_path / "chain.log").read_text().splitlines()]
    assert [f"{name}-{what}" for _, name, what in events] == [
        "A-start",
        "A-end",
        "B-start",
        "B-end",
        "C-start",
        "C-end",
    ]
    stamps = [float(stamp) for stamp, _, _ in events]
    assert stamps == sorted(stamps)


def test_failed_stage_cancels_dependents(tmp_path: Path, slurm_cluster: SlurmCluster) -> None:
    a = slurm.sbatch(write_job(tmp_path, "A", timestamped_step("A", exit_code=3), slurm_cluster), [], cwd=tmp_path)
    b = slurm.sbatch(write_job(tmp_path, "B", timestamped_step("B"), slurm_cluster), [a], cwd=tmp_path)
    c = slurm.sbatch(write_job(tmp_path, "C", timestamped_step("C"), slurm_cluster), [b], cwd=tmp_path)

    seen = poll([a, b, c], all_terminal([a, b, c]))
    final = seen[-1]
    assert (final[a].state, final[a].exit_code) == (StageState.FAILED, 3)
    for dependent in (b, c):
        assert final[dependent].state is StageState.CANCELLED
        assert final[dependent].reason == "DependencyNeverSatisfied"
        # Never started: no nodes. StartTime is Unknown (elapsed None) or the backfill's estimate (RunTime 0).
        assert (final[dependent].nodes, final[dependent].elapsed or 0) == ((), 0)
        for snapshot in seen:  # before the cancel: pending on its dependency, never running
            info = snapshot[dependent]
            assert info.state in {StageState.PENDING, StageState.CANCELLED}, info
            assert info.reason in {"Dependency", "DependencyNeverSatisfied", None}, info
    assert [line.split()[1:] for line in (tmp_path / "chain.log").read_text().splitlines()] == [
        ["A", "start"],
        ["A", "end"],
    ]

    # Submitting after the upstream already failed (a resume gone wrong) is cancelled at once too.
    late = slurm.sbatch(write_job(tmp_path, "late", "true", slurm_cluster), [a], cwd=tmp_path)
    info = poll([late], all_terminal([late]), timeout=15)[-1][late]
    assert (info.state, info.reason) == (StageState.CANCELLED, "DependencyNeverSatisfied")


def test_cancel_running_job(tmp_path: Path, slurm_cluster: SlurmCluster) -> None:
    job = slurm.sbatch(write_job(tmp_path, "sleeper", "sleep 300", slurm_cluster), [], cwd=tmp_path)
    poll([job], lambda jobs: job in jobs and jobs[job].state is StageState.RUNNING)
    slurm.cancel([job])
    info = poll([job], all_terminal([job]))[-1][job]
    assert info.state is StageState.CANCELLED
    assert info.signal == 15  # SIGTERM from scancel
    slurm.cancel([job, "999999"])  # already finished and unknown ids are not errors


def test_query_finished_job_answers_from_scontrol(tmp_path: Path, slurm_cluster: SlurmCluster) -> None:
    job = slurm.sbatch(write_job(tmp_path, "hello", "echo hello from $SLURM_JOB_ID", slurm_cluster), [], cwd=tmp_path)
    poll([job], all_terminal([job]))
    jobs = slurm.query([job, "999999"])
    assert set(jobs) == {job}  # unknown ids are absent, for the caller's manifest fallback
    info = jobs[job]
    # squeue shows neither exit codes nor log paths: these come from `scontrol show job`.
    assert (info.state, info.exit_code, info.signal) == (StageState.COMPLETED, 0, 0)
    assert info.stdout == tmp_path / f"slurm-{job}.out"
    assert info.stdout.read_text() == f"hello from {job}\n"
    assert info.nodes and info.elapsed is not None


def test_sbatch_error_carries_stderr(tmp_path: Path, slurm_cluster: SlurmCluster) -> None:
    with pytest.raises(slurm.SlurmError, match="Unable to open file") as err:
        slurm.sbatch(tmp_path / "missing.sbatch", [], cwd=tmp_path)
    assert err.value.returncode != 0
    assert slurm.available()


def test_captures_match_live_slurm(slurm_cluster: SlurmCluster) -> None:
    """The fast tests' stored Slurm answers are what this Slurm says today (see tests/slurm_captures.py)."""
    live = slurm_captures.capture({**os.environ, **slurm_cluster.env})
    assert live == slurm_captures.stored(), "Slurm answers differently: review, then run python tests/slurm_captures.py"
