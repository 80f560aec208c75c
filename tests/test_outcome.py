"""Outcome records and the status rule: the scheduler for live jobs, the stage's own record for finished ones.

Pure, table-driven; the real-Slurm and real-executor versions of the same story are in test_status_truth.py.
"""

from __future__ import annotations

import subprocess
from dataclasses import replace
from pathlib import Path

import pytest

from hyperjob.paths import RunPaths
from hyperjob.schedule.base import LiveState
from hyperjob.schedule.manifest import Manifest, StageRecord
from hyperjob.schedule.outcome import Outcome, combine, combine_all, parse_outcome, read_outcomes
from hyperjob.schedule.states import StageState as S

DONE = "job_id=42\nhost=n1\nrestarts=0\nstarted=2026-11-30T10:00:00+00:00\nended=2026-11-30T10:05:00+00:00\n"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("job_id=7\nhost=n1\nstarted=T0\n", Outcome("7", "n1", "T0")),
        (DONE + "exit_code=0\n", Outcome("42", "n1", "2026-11-30T10:00:00+00:00", 0, "2026-11-30T10:05:00+00:00", 0)),
        ("job_id=local-2\nhost=h\nrestarts=1\nstarted=T\nexit_code=143\n", Outcome("local-2", "h", "T", 1, None, 143)),
        ("\njob_id=1\n\nhost=h\nstarted=T\n", Outcome("1", "h", "T")),  # blank lines are fine
    ],
)
def test_parse_outcome(text: str, expected: Outcome) -> None:
    assert parse_outcome(text) == expected


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("host=h\nstarted=T\n", "missing job_id"),
        ("job_id=\nhost=h\nstarted=T\n", "missing job_id"),
        ("job_id=1\nhost=h\nstarted=T\nexit_code=abc\n", "exit_code 'abc'"),
        ("job_id=1\nhost=h\nstarted=T\nexit_code=-1\n", "exit_code '-1'"),
        ("job_id=1\nhost=h\nstarted=T\nrestarts=x\n", "restarts 'x'"),
        ("job_id=1\nno equals sign\n", "not a key=value line"),
        ("", "missing job_id, host, started"),
    ],
)
def test_parse_outcome_rejects(text: str, fragment: str) -> None:
    with pytest.raises(ValueError, match=fragment):
        parse_outcome(text)


REC = StageRecord(index=2, name="train", script="scripts/02-train.sbatch", job_id="42", state=S.PENDING)
FAILED_UP = StageRecord(index=1, name="download", script="s", job_id="41", state=S.FAILED)
RUNNING = Outcome("42", "n1", "T0")
OK, BAD, TERM = (replace(RUNNING, ended="T1", exit_code=c) for c in (0, 3, 143))


@pytest.mark.parametrize(
    ("live", "outcome", "upstream", "state", "exit_code", "reason"),
    [
        # The scheduler wins while the job is pending or running (a requeued job may have an old record).
        (LiveState(S.RUNNING), None, None, S.RUNNING, None, ""),
        (LiveState(S.PENDING, "Resources"), OK, None, S.PENDING, None, "Resources"),
        (LiveState(S.REQUEUED), BAD, None, S.REQUEUED, None, ""),
        # The record wins for a finished stage, whether or not Slurm still remembers it.
        (None, OK, None, S.COMPLETED, "0:0", ""),
        (None, BAD, None, S.FAILED, "3:0", ""),
        (LiveState(S.COMPLETED, "", "0:0"), BAD, None, S.FAILED, "3:0", ""),
        (LiveState(S.FAILED, "NonZeroExitCode", "3:0"), OK, None, S.COMPLETED, "0:0", ""),
        # ... keeping Slurm's word where it says more than "failed".
        (LiveState(S.TIMEOUT, "TimeLimit", "0:15"), TERM, None, S.TIMEOUT, "143:0", "TimeLimit"),
        (LiveState(S.CANCELLED, "", "0:15"), TERM, None, S.CANCELLED, "143:0", ""),
        # Finished with no record: Slurm's terminal view (never started, or killed before the trap).
        (LiveState(S.CANCELLED, "DependencyNeverSatisfied"), None, FAILED_UP, S.CANCELLED, None,
         "DependencyNeverSatisfied"),
        (LiveState(S.NODE_FAIL, "", "0:9"), RUNNING, None, S.NODE_FAIL, "0:9", ""),
        # Forgotten by the scheduler, no end record.
        (None, None, FAILED_UP, S.CANCELLED, None, "DependencyNeverSatisfied (download FAILED)"),
        (None, RUNNING, None, S.LOST, None, "started on n1 at T0 and left no exit record"),
        (None, None, None, S.LOST, None, "no longer knows job 42 and the stage left no outcome record"),
    ],
)  # fmt: skip
def test_combine(
    live: LiveState | None, outcome: Outcome | None, upstream: StageRecord | None, state: S,
    exit_code: str | None, reason: str,
) -> None:  # fmt: skip
    new = combine(REC, live, outcome, upstream, "slurm")
    assert (new.state, new.exit_code) == (state, exit_code)
    assert reason in new.reason
    if outcome is not None and outcome.finished and not (live and not live.state.is_terminal):
        assert (new.started, new.ended) == (outcome.started, outcome.ended)


def _manifest(*states: S) -> Manifest:
    names = ["download", "train", "merge", "evaluate"]
    stages = tuple(
        StageRecord(i, n, f"scripts/{i:02d}-{n}.sbatch", job_id=str(40 + i), state=st)
        for i, (n, st) in enumerate(zip(names, states, strict=False), start=1)
    )
    return Manifest("r", "/r", "h", "slurm", "now", "0", stages)


def test_combine_all_decides_upstream_first() -> None:
    """train's record says it failed; merge and evaluate were forgotten: cancelled by it, not lost."""
    manifest = _manifest(S.COMPLETED, S.RUNNING, S.PENDING, S.PENDING)
    out = combine_all(manifest, {}, {"train": replace(BAD, job_id="42")}, "slurm")
    assert [(r.state, r.reason.split(" (")[0]) for r in out.stages] == [
        (S.COMPLETED, ""), (S.FAILED, ""), (S.CANCELLED, "DependencyNeverSatisfied"),
        (S.CANCELLED, "DependencyNeverSatisfied"),
    ]  # fmt: skip
    assert "(train FAILED)" in out.stages[3].reason


def test_combine_all_leaves_finished_and_unsubmitted_stages_alone() -> None:
    manifest = _manifest(S.COMPLETED, S.CANCELLED)
    manifest = manifest.with_stage(replace(manifest.stage("train"), reason="cancelled by user"))
    unsubmitted = replace(_manifest(S.RENDERED), stages=(replace(_manifest(S.RENDERED).stages[0], job_id=None),))
    assert combine_all(manifest, {}, {}, "slurm") == manifest
    assert combine_all(unsubmitted, {}, {}, "slurm") == unsubmitted


def test_read_outcomes_takes_only_this_submissions_records(tmp_path: Path) -> None:
    manifest = replace(_manifest(S.RUNNING, S.PENDING, S.PENDING), run_dir=str(tmp_path))
    paths = RunPaths(tmp_path)
    paths.outcomes.mkdir()
    paths.outcome(1, "download").write_text(DONE.replace("42", "41") + "exit_code=0\n")
    paths.outcome(2, "train").write_text(DONE + "exit_code=1\n")  # job 42: ours
    paths.outcome(3, "merge").write_text(DONE.replace("42", "999") + "exit_code=0\n")  # an earlier submission's
    assert set(read_outcomes(tmp_path, manifest)) == {"download", "train"}
    paths.outcome(1, "download").write_text("garbage")
    assert set(read_outcomes(tmp_path, manifest)) == {"train"}


@pytest.mark.parametrize(
    ("body", "exit_code"),
    [("true", "0"), ("exit 7", "7"), ("false", "1"), ("kill -TERM $$; sleep 5", "143"), ("kill -INT $$", "130")],
)
def test_rendered_outcome_block_records_the_exit_under_bash(tmp_path: Path, body: str, exit_code: str) -> None:
    """The record block of the shipped macros, run by real bash: signals arrive as 128+N, not as the last status."""
    from hyperjob.render.shell import make_env

    template = make_env().from_string(
        '{% import "_macros.sbatch.j2" as m %}set -euo pipefail\ncd {{ s.run_dir }}\n'
        "{{ m.outcome_record(s) | trim | raw }}\n" + body + "\n"
    )

    class Ctx:
        run_dir = str(tmp_path)
        outcome = "outcomes/01-x.outcome"

    script = tmp_path / "x.sh"
    script.write_text(template.render(s=Ctx()))
    proc = subprocess.run(["bash", str(script)], env={"PATH": "/usr/bin:/bin", "HYPERJOB_JOB_ID": "local-1"})
    assert str(proc.returncode) == exit_code
    record = parse_outcome((tmp_path / "outcomes" / "01-x.outcome").read_text())
    assert (record.job_id, record.exit_code) == ("local-1", int(exit_code))
    assert record.ended is not None and not list((tmp_path / "outcomes").glob("*.tmp"))
