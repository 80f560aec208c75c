"""hyperjob.schedule unit by unit, through its public functions: parsers, manifest, outcome records, the registry,
the dry run, the Slurm scheduler (against stand-in `sbatch`/`squeue`/`scontrol`/`scancel` executables that answer
like Slurm 22.05), the local executor (real bash stage scripts, real processes and signals) and the run logic
(a scheduler registered from the test, a fake clock where timing is the point).

Written for issue 12 (mutation score): each test pins behaviour the older tests only reached through a subprocess,
or at collection time, where mutmut cannot see it.
"""

from __future__ import annotations

import os
import re
import shlex
import signal
import socket
import subprocess
import time
from collections.abc import Iterator, Mapping
from dataclasses import replace
from datetime import datetime
from pathlib import Path

import pytest

from hyperjob import __version__
from hyperjob.config.load import config_hash, dump_config, load_config
from hyperjob.config.models import HyperjobConfig
from hyperjob.paths import RunPaths
from hyperjob.plan.planner import make_plan
from hyperjob.render.scripts import render_run
from hyperjob.schedule import local, registry, slurm
from hyperjob.schedule.base import (
    LiveState,
    SchedulerError,
    Submission,
    SubmitError,
    SubmitRequest,
    job_log,
    submissions,
)
from hyperjob.schedule.manifest import Manifest, StageRecord, now, read_manifest, write_manifest
from hyperjob.schedule.outcome import Outcome, combine, combine_all, parse_outcome, read_outcomes
from hyperjob.schedule.parsers import JobInfo, expand_hostlist, parse_scontrol_show_job, parse_squeue
from hyperjob.schedule.run import cancel_run, new_run_dir, refresh, submit_run, wait_run, write_run_dir
from hyperjob.schedule.scheduler_dry_run import DryRunScheduler
from hyperjob.schedule.scheduler_local import SCHEDULER as LOCAL
from hyperjob.schedule.scheduler_slurm import SCHEDULER as SLURM
from hyperjob.schedule.states import StageState

S = StageState
REPO = Path(__file__).resolve().parent.parent
STAGES = ("download", "train", "merge")
TIMESTAMP = re.compile(r"^\[\d\d:\d\d:\d\d\] ")


def manifest_of(run_dir: Path, scheduler: str = "local", **records: StageRecord) -> Manifest:
    """A three-stage manifest (download, train, merge), with some records replaced."""
    stages = tuple(
        records.get(name, StageRecord(i, name, f"scripts/{i:02d}-{name}.sbatch")) for i, name in enumerate(STAGES, 1)
    )
    return Manifest("r", str(run_dir), "0" * 16, scheduler, now(), __version__, stages)


def rec(index: int, state: StageState = S.PENDING, job_id: str | None = None, **kw: str | None) -> StageRecord:
    name = STAGES[index - 1]
    return StageRecord(index, name, f"scripts/{index:02d}-{name}.sbatch", job_id or str(index), state, **kw)  # type: ignore[arg-type]


# --- parsers -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("hostlist", "expected"),
    [
        ("n[7,01-02]", ["n7", "n01", "n02"]),  # a single number before a range
        ("n[3-3]", ["n3"]),  # a range of one
        ("n[99998-99999]", ["n99998", "n99999"]),  # high numbers, short range
        ("a[1-2]-x[7,9]", ["a1-x7", "a1-x9", "a2-x7", "a2-x9"]),
    ],
)
def test_expand_hostlist_ranges(hostlist: str, expected: list[str]) -> None:
    assert expand_hostlist(hostlist) == expected


def test_expand_hostlist_size_limit() -> None:
    hosts = expand_hostlist("n[0-99999]")
    assert (len(hosts), hosts[0], hosts[-1]) == (100_000, "n0", "n99999")
    with pytest.raises(ValueError, match=re.escape("range '0-100000' in host list 'n[0-100000]' is too large")):
        expand_hostlist("n[0-100000]")
    whole = "a[0-60000],b[0-60000]"
    with pytest.raises(ValueError, match=re.escape(f"host list {whole!r} expands to more than 100000 hosts")):
        expand_hostlist(whole)


@pytest.mark.parametrize(
    ("hostlist", "bad"),
    [("good1,n[2-x]", "2-x"), ("a[1]b[x]", "x"), ("c[y]", "y")],
)
def test_expand_hostlist_errors_name_the_whole_list(hostlist: str, bad: str) -> None:
    with pytest.raises(ValueError, match=re.escape(f"bad range {bad!r} in host list {hostlist!r}")):
        expand_hostlist(hostlist)


def test_parse_squeue_reads_past_blank_lines() -> None:
    jobs = parse_squeue("5|RUNNING|1:02|vm|None\n\n6|PENDING|0:00||Dependency\n")
    assert [(j.job_id, j.state, j.reason, j.elapsed) for j in jobs.values()] == [
        ("5", S.RUNNING, None, 62),
        ("6", S.PENDING, "Dependency", 0),
    ]


def test_scontrol_het_job_components_are_spelled_like_squeue() -> None:
    lines = (
        "JobId=20 HetJobId=20 HetJobOffset=0 JobName=het JobState=RUNNING Reason=None NodeList=vm\n"
        "JobId=21 HetJobId=20 HetJobOffset=1 JobName=het JobState=PENDING Reason=Resources NodeList=\n"
        "JobId=22 HetJobId=22 JobName=lead JobState=PENDING\n"  # no offset printed: the plain id
        "JobId=23 ArrayJobId=23 JobName=arr JobState=PENDING\n"  # no task printed: the plain id
    )
    jobs = parse_scontrol_show_job(lines)
    assert {k: (v.state, v.reason) for k, v in jobs.items()} == {
        "20+0": (S.RUNNING, None),
        "20+1": (S.PENDING, "Resources"),
        "22": (S.PENDING, None),
        "23": (S.PENDING, None),
    }


def test_scontrol_fields_missing_from_a_line() -> None:
    """Keys Slurm may leave out: no StartTime (elapsed unknown even with a RunTime), no StdOut, Reason, NodeList."""
    jobs = parse_scontrol_show_job(
        "JobId=40 JobState=COMPLETED ExitCode=0:0 RunTime=00:00:05\n"
        "JobId=41 JobState=RUNNING StartTime=2026-11-23T22:41:05\n"
    )
    assert jobs == {
        "40": JobInfo("40", S.COMPLETED, "COMPLETED", None, 0, (), None, None, 0),
        "41": JobInfo("41", S.RUNNING, "RUNNING", None, None, (), None, None, None),
    }


def test_scontrol_exit_code_without_signal_and_bad_exit_codes() -> None:
    job = parse_scontrol_show_job("JobId=42 JobState=FAILED ExitCode=3\n")["42"]
    assert (job.exit_code, job.signal) == (3, None)
    for bad in ("x:0", "3:y"):
        with pytest.raises(ValueError, match=re.escape(f"scontrol: bad ExitCode {bad!r}")):
            parse_scontrol_show_job(f"JobId=43 JobState=FAILED ExitCode={bad}\n")


# --- manifest, outcome records, submissions ------------------------------------------------------


def test_now_is_utc_to_the_second() -> None:
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\+00:00", now())


def test_manifest_stage_lookup(tmp_path: Path) -> None:
    m = manifest_of(tmp_path)
    assert m.stage("train") is m.stages[1]
    assert m.stage("merge") is m.stages[2]
    with pytest.raises(KeyError, match=re.escape("run has no stage 'eval'; its stages are download, train")):
        m.stage("eval")


def test_manifest_of_an_early_version_with_notes_loads(tmp_path: Path) -> None:
    m = manifest_of(tmp_path)
    text = m.to_json().replace('"version": 1', '"version": 1, "notes": ["written by hyperjob 0.0"]')
    assert '"notes"' in text
    assert Manifest.from_json(text) == m


def test_read_manifest_errors_name_the_problem(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=re.escape(f"{tmp_path} is not a hyperjob run directory")):
        read_manifest(tmp_path)
    (tmp_path / "manifest.json").write_text("{not json")
    with pytest.raises(ValueError, match=re.escape(f"{tmp_path / 'manifest.json'} is not a valid manifest: ")):
        read_manifest(tmp_path)


@pytest.mark.parametrize("line", ["truncated", "1x=3", "job id=4"])
def test_parse_outcome_rejects_lines_without_a_key(line: str) -> None:
    with pytest.raises(ValueError, match=re.escape(f"not a key=value line: {line!r}")):
        parse_outcome(f"job_id=1\nhost=vm\nstarted=2026-11-30T10:00:00+00:00\n{line}\n")


def test_read_outcomes_replaces_undecodable_bytes(tmp_path: Path) -> None:
    m = manifest_of(tmp_path, download=rec(1, S.RUNNING, "12"))
    path = RunPaths(tmp_path).outcome(1, "download")
    path.parent.mkdir()
    path.write_bytes(b"job_id=12\nhost=n\xffde\nstarted=2026-11-30T10:00:00+00:00\nexit_code=0\n")
    assert read_outcomes(tmp_path, m) == {
        "download": Outcome("12", "n\ufffdde", "2026-11-30T10:00:00+00:00", exit_code=0),
    }


@pytest.mark.parametrize(
    ("before", "live_exit", "after"),
    [("2:0", None, "2:0"), (None, "0:15", "0:15"), ("1:0", "0:15", "0:15")],
)
def test_combine_live_state_keeps_the_known_exit_code(before: str | None, live_exit: str | None, after: str) -> None:
    """A requeued job pends again: its last exit code stays until the scheduler reports a new one."""
    old = rec(2, S.RUNNING, "12", exit_code=before)
    new = combine(old, LiveState(S.REQUEUED, "BeginTime", live_exit), None, None, "slurm")
    assert (new.state, new.reason, new.exit_code) == (S.REQUEUED, "BeginTime", after)


def test_combine_lost_stage_keeps_its_start() -> None:
    started = Outcome("12", "node7", "2026-11-30T10:00:00+00:00")
    new = combine(rec(2, S.RUNNING, "12"), None, started, None, "slurm")
    assert (new.state, new.started) == (S.LOST, "2026-11-30T10:00:00+00:00")
    assert new.reason.startswith("started on node7 at 2026-11-30T10:00:00+00:00 and left no exit record; slurm no")


def test_combine_all_takes_live_states_by_stage_name(tmp_path: Path) -> None:
    m = manifest_of(tmp_path, download=rec(1, S.RUNNING, "11"), train=rec(2, S.PENDING, "12"))
    out = combine_all(m, {"train": LiveState(S.RUNNING, "", None)}, {}, "the-scheduler")
    assert [(r.state, r.reason) for r in out.stages] == [
        (S.LOST, "the-scheduler no longer knows job 11 and the stage left no outcome record (it never started)"),
        (S.RUNNING, ""),
        (S.RENDERED, ""),
    ]


def test_submissions_chain_each_stage_after_the_previous(tmp_path: Path) -> None:
    assert submissions(tmp_path, manifest_of(tmp_path)) == (
        Submission("download", tmp_path / "scripts/01-download.sbatch", ()),
        Submission("train", tmp_path / "scripts/02-train.sbatch", ("download",)),
        Submission("merge", tmp_path / "scripts/03-merge.sbatch", ("train",)),
    )


def test_job_log(tmp_path: Path) -> None:
    assert job_log(tmp_path, rec(2, S.RUNNING, "77")) == tmp_path / "logs" / "02-train-77.out"
    assert job_log(tmp_path, StageRecord(2, "train", "scripts/02-train.sbatch")) is None
    assert LOCAL.log(tmp_path, rec(3, S.RUNNING, "local-3")) == tmp_path / "logs" / "03-merge-local-3.out"
    assert SLURM.log(tmp_path, rec(1, S.RUNNING, "5")) == tmp_path / "logs" / "01-download-5.out"


# --- registry and the dry run --------------------------------------------------------------------


class RecordingScheduler:
    """A scheduler registered from a test: answers `query` from a script, records every call."""

    priority: int | None = None
    max_nodes: int | None = None

    def __init__(self, name: str = "fake", answers: list[Mapping[str, LiveState] | Exception] | None = None) -> None:
        self.name = name
        self.answers = answers or []
        self.calls: list[tuple[str, object, object]] = []

    def unavailable(self) -> str | None:
        return None

    def request(self, run_dir: Path, manifest: Manifest) -> SubmitRequest:
        return SubmitRequest(self.name, run_dir, submissions(run_dir, manifest), ("true",))

    def schedule(self, request: SubmitRequest, manifest: Manifest, *, wait: bool, echo: object) -> Manifest:
        self.calls.append(("schedule", wait, echo))
        return replace(manifest, scheduler=self.name)

    def query(self, run_dir: Path, manifest: Manifest) -> Mapping[str, LiveState]:
        self.calls.append(("query", run_dir, manifest))
        answer = self.answers.pop(0) if len(self.answers) > 1 else self.answers[0]
        if isinstance(answer, Exception):
            raise answer
        return answer

    def cancel(self, run_dir: Path, manifest: Manifest) -> None:
        self.calls.append(("cancel", run_dir, manifest))

    def log(self, run_dir: Path, rec: StageRecord) -> Path | None:
        return None


def fake_bin(tmp_path: Path, **programs: str) -> Path:
    """A directory of executables (bash bodies) to put first on PATH."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    for name, body in programs.items():
        path = bin_dir / name
        path.write_text(f"#!/bin/bash\n{body}\n")
        path.chmod(0o755)
    return bin_dir


def test_get_unknown_scheduler_names_the_known_ones() -> None:
    with pytest.raises(registry.SchedulerChoiceError) as info:
        registry.get("nope")
    assert str(info.value) == "unknown scheduler 'nope' (known: dry-run, local, slurm)"


def test_choose_follows_what_this_machine_can_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    assert registry.choose("auto") is LOCAL
    assert registry.choose("auto", dry_run=True) is SLURM  # a dry run shows Slurm's commands even without it
    assert registry.choose("slurm", dry_run=True) is SLURM
    assert registry.choose("local") is LOCAL
    with pytest.raises(registry.SchedulerChoiceError) as info:
        registry.choose("slurm")
    assert str(info.value) == "--scheduler slurm: sbatch is not on PATH (use --scheduler local, or load Slurm)"
    monkeypatch.setenv("PATH", str(fake_bin(tmp_path, sbatch="exit 1")))
    assert registry.choose("auto") is SLURM
    assert registry.choose("slurm") is SLURM
    assert SLURM.unavailable() is None


def test_choose_auto_when_nothing_can_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    monkeypatch.setattr(LOCAL, "unavailable", lambda: "no local executor here")
    with pytest.raises(registry.SchedulerChoiceError) as info:
        registry.choose("auto")
    assert str(info.value) == "no scheduler can run here"


def test_selectable_orders_by_priority() -> None:
    first, never = RecordingScheduler("first"), RecordingScheduler("never")
    first.priority = -1
    with registry.registered(first), registry.registered(never):  # type: ignore[arg-type]
        assert [s.name for s in registry.selectable()] == ["first", "slurm", "local"]
        assert registry.choose("auto", dry_run=True) is first


def test_dry_run_records_the_targets_commands(tmp_path: Path) -> None:
    m = manifest_of(tmp_path)
    with pytest.raises(ValueError, match=r"^a dry run needs a target scheduler to show$"):
        DryRunScheduler().request(tmp_path, m)
    dry = DryRunScheduler(LOCAL)
    req = dry.request(tmp_path, m)
    assert req == LOCAL.request(tmp_path, m)
    assert dry.schedule(req, m, wait=False, echo=print) is m
    header = [
        "#!/bin/bash",
        "# hyperjob dry run: the commands the local scheduler would run for this run; nothing ran.",
        "set -euo pipefail",
    ]
    assert (tmp_path / "dry-run.sh").read_text() == "\n".join([*header, *req.lines]) + "\n"
    assert (dry.query(tmp_path, m), dry.cancel(tmp_path, m), dry.log(tmp_path, m.stages[0])) == ({}, None, None)


# --- the Slurm scheduler, against stand-in Slurm commands -----------------------------------------

SQUEUE_PENDING = "102|PENDING|0:00||Dependency\n"
SCONTROL_FAILED = (
    "JobId=101 JobName=r.train UserId=root(0) JobState=FAILED Reason=NonZeroExitCode Dependency=(null) "
    "ExitCode=3:0 RunTime=00:00:01 StartTime=2026-11-23T22:41:43 NodeList=vm StdOut=/dev/null Power=\n"
)


@pytest.fixture
def fake_slurm(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """sbatch/squeue/scontrol/scancel that record their calls in `calls` and answer from files in the state dir.

    sbatch hands out ids from 100 (a file `sbatch-fail-<id>` makes that submission fail with its text on stderr);
    squeue prints `squeue.out`; `scontrol show job ID` prints `scontrol-ID.out` or Slurm's unknown-id error;
    scancel prints `scancel.err` and exits with `scancel.rc`.
    """
    state = tmp_path / "slurm-state"
    state.mkdir()
    (state / "next").write_text("100")
    bin_dir = fake_bin(
        tmp_path,
        sbatch=f"""S={state}
echo "sbatch $* | cwd=$PWD | var=${{HJ_TEST_VAR-unset}}" >>"$S/calls"
n=$(cat "$S/next"); echo $((n + 1)) >"$S/next"
if [[ -f "$S/sbatch-fail-$n" ]]; then cat "$S/sbatch-fail-$n" >&2; exit 1; fi
echo "$n" """,
        squeue=f"""S={state}
echo "squeue $*" >>"$S/calls"
cat "$S/squeue.out" 2>/dev/null || true""",
        scontrol=f"""S={state}
echo "scontrol $*" >>"$S/calls"
if [[ -f "$S/scontrol-$4.out" ]]; then cat "$S/scontrol-$4.out"; exit 0; fi
echo "slurm_load_jobs error: Invalid job id specified" >&2; exit 1""",
        scancel=f"""S={state}
echo "scancel $*" >>"$S/calls"
cat "$S/scancel.err" >&2 2>/dev/null || true
exit "$(cat "$S/scancel.rc" 2>/dev/null || echo 0)" """,
    )
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    monkeypatch.delenv("HJ_TEST_VAR", raising=False)
    return state


def calls(state: Path) -> list[str]:
    path = state / "calls"
    return path.read_text().splitlines() if path.exists() else []


def test_slurm_request_is_a_runnable_script(tmp_path: Path, fake_slurm: Path) -> None:
    run_dir = tmp_path / "my runs" / "r1"
    run_dir.mkdir(parents=True)
    m = manifest_of(run_dir, scheduler="slurm")
    req = SLURM.request(run_dir, m)
    q = shlex.quote
    sbatch = "sbatch --parsable --kill-on-invalid-dep=yes"
    assert req == SubmitRequest(
        "slurm",
        run_dir,
        submissions(run_dir, m),
        (
            f"cd {q(str(run_dir))}",
            f"job_01=$({sbatch} {q(str(run_dir / 'scripts/01-download.sbatch'))})",
            f"job_02=$({sbatch} --dependency=afterok:${{job_01}} {q(str(run_dir / 'scripts/02-train.sbatch'))})",
            f"job_03=$({sbatch} --dependency=afterok:${{job_02}} {q(str(run_dir / 'scripts/03-merge.sbatch'))})",
        ),
    )
    script = "\n".join(["set -euo pipefail", *req.lines, 'echo "$job_01 $job_02 $job_03"'])
    out = subprocess.run(["bash", "-c", script], capture_output=True, text=True, check=True)
    assert out.stdout == "100 101 102\n"
    assert [c.split(" | ")[0] for c in calls(fake_slurm)] == [
        f"sbatch --parsable --kill-on-invalid-dep=yes {run_dir}/scripts/01-download.sbatch",
        f"sbatch --parsable --kill-on-invalid-dep=yes --dependency=afterok:100 {run_dir}/scripts/02-train.sbatch",
        f"sbatch --parsable --kill-on-invalid-dep=yes --dependency=afterok:101 {run_dir}/scripts/03-merge.sbatch",
    ]


def test_slurm_schedule_queues_each_stage_after_the_previous(tmp_path: Path, fake_slurm: Path) -> None:
    m = manifest_of(tmp_path, scheduler="slurm")
    echoed: list[str] = []
    out = SLURM.schedule(SLURM.request(tmp_path, m), m, wait=False, echo=echoed.append)
    assert [(r.job_id, r.state, r.log) for r in out.stages] == [
        ("100", S.PENDING, str(tmp_path / "logs/01-download-100.out")),
        ("101", S.PENDING, str(tmp_path / "logs/02-train-101.out")),
        ("102", S.PENDING, str(tmp_path / "logs/03-merge-102.out")),
    ]
    assert read_manifest(tmp_path) == out
    assert echoed == [
        "  01 download     job 100",
        "  02 train        job 101  (afterok:100)",
        "  03 merge        job 102  (afterok:101)",
    ]
    assert calls(fake_slurm)[1] == (
        f"sbatch --parsable --kill-on-invalid-dep=yes --dependency=afterok:100 {tmp_path}/scripts/02-train.sbatch"
        f" | cwd={tmp_path} | var=unset"
    )


@pytest.mark.parametrize(("failing", "queued"), [(102, ["100", "101"]), (100, [])])
def test_slurm_schedule_failure_cancels_what_it_queued(
    tmp_path: Path, fake_slurm: Path, failing: int, queued: list[str]
) -> None:
    (fake_slurm / f"sbatch-fail-{failing}").write_text("sbatch: error: Batch job submission failed: Invalid account")
    m = manifest_of(tmp_path, scheduler="slurm")
    with pytest.raises(SubmitError) as info:
        SLURM.schedule(SLURM.request(tmp_path, m), m, wait=False, echo=lambda _: None)
    stage = STAGES[failing - 100]
    assert str(info.value).startswith(f"sbatch failed for stage {stage}: `sbatch --parsable")
    reason = "sbatch: error: Batch job submission failed: Invalid account"
    assert str(info.value).endswith(f"(exit 1): {reason}; cancelled jobs {queued}")
    assert [c for c in calls(fake_slurm) if c.startswith("scancel")] == (
        [f"scancel {' '.join(queued)}"] if queued else []
    )


def test_slurm_query_and_cancel_ask_only_about_open_stages(tmp_path: Path, fake_slurm: Path) -> None:
    m = manifest_of(
        tmp_path,
        "slurm",
        download=rec(1, S.COMPLETED, "100"),
        train=rec(2, S.RUNNING, "101"),
        merge=rec(3, S.PENDING, "102"),
    )
    (fake_slurm / "squeue.out").write_text(SQUEUE_PENDING)
    (fake_slurm / "scontrol-101.out").write_text(SCONTROL_FAILED)
    assert SLURM.query(tmp_path, m) == {
        "train": LiveState(S.FAILED, "NonZeroExitCode", "3:0"),
        "merge": LiveState(S.PENDING, "Dependency", None),
    }
    SLURM.cancel(tmp_path, m)
    assert calls(fake_slurm) == [
        "squeue --noheader --jobs=101,102 --format=%i|%T|%M|%N|%r",
        "scontrol --oneliner show job 101",
        "scancel 101 102",
    ]
    (fake_slurm / "squeue.out").write_text("")
    assert SLURM.query(tmp_path, replace(m, stages=m.stages[:2])) == {
        "train": LiveState(S.FAILED, "NonZeroExitCode", "3:0")
    }
    done = manifest_of(tmp_path, "slurm", download=rec(1, S.COMPLETED, "100"))
    before = len(calls(fake_slurm))
    assert SLURM.query(tmp_path, done) == {}
    SLURM.cancel(tmp_path, done)
    assert len(calls(fake_slurm)) == before  # nothing open: no command at all


def test_slurm_query_reports_signals_and_no_reason(tmp_path: Path, fake_slurm: Path) -> None:
    m = manifest_of(tmp_path, "slurm", train=rec(2, S.RUNNING, "101"), merge=rec(3, S.RUNNING, "102"))
    (fake_slurm / "squeue.out").write_text("101|RUNNING|0:05|vm|None\n")
    (fake_slurm / "scontrol-102.out").write_text(
        "JobId=102 JobName=r.merge JobState=TIMEOUT Reason=TimeLimit ExitCode=0:15 RunTime=00:01:27 "
        "StartTime=2026-11-23T22:41:43 NodeList=vm StdOut=/dev/null Power=\n"
    )
    assert SLURM.query(tmp_path, m) == {
        "train": LiveState(S.RUNNING, "", None),  # squeue's "None" reason is no reason
        "merge": LiveState(S.TIMEOUT, "TimeLimit", "0:15"),  # killed by SIGTERM at the time limit
    }


# --- hyperjob.schedule.slurm: how commands are run and how they fail ------------------------------


def test_sbatch_runs_in_cwd_with_extra_env(tmp_path: Path, fake_slurm: Path) -> None:
    work = tmp_path / "work"
    work.mkdir()
    assert slurm.sbatch(work / "a.sbatch", ["7"], cwd=work, env={"HJ_TEST_VAR": "v 1"}) == "100"
    assert calls(fake_slurm) == [
        f"sbatch --parsable --kill-on-invalid-dep=yes --dependency=afterok:7 {work}/a.sbatch | cwd={work} | var=v 1"
    ]


def test_slurm_error_carries_command_status_and_stderr(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    bin_dir = fake_bin(tmp_path, sbatch='echo "sbatch: error: invalid partition" >&2; exit 1')
    monkeypatch.setenv("PATH", str(bin_dir))
    with pytest.raises(slurm.SlurmError) as info:
        slurm.sbatch(Path("/x/a.sbatch"), [], cwd=tmp_path)
    err = info.value
    assert (err.cmd, err.returncode, err.stderr) == (
        ["sbatch", "--parsable", "--kill-on-invalid-dep=yes", "/x/a.sbatch"],
        1,
        "sbatch: error: invalid partition",
    )
    assert (
        str(err)
        == "`sbatch --parsable --kill-on-invalid-dep=yes /x/a.sbatch` failed (exit 1): sbatch: error: invalid partition"
    )
    fake_bin(tmp_path, sbatch="echo 'Submitted batch job 5'")
    with pytest.raises(slurm.SlurmError) as info:
        slurm.sbatch(Path("/x/a.sbatch"), [], cwd=tmp_path)
    assert info.value.returncode == 0
    assert "` failed (exit 0): sbatch --parsable: expected `<jobid>[;<cluster>]`, got 'Submitted" in str(info.value)
    assert str(slurm.SlurmError(["scancel", "1"], 2, "  ")) == "`scancel 1` failed (exit 2): no error output"


def test_missing_slurm_binary(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    assert slurm.available() is False
    with pytest.raises(slurm.SlurmError) as info:
        slurm.sbatch(Path("/x/a.sbatch"), [], cwd=tmp_path)
    assert info.value.returncode is None
    assert str(info.value).endswith("failed (could not run): sbatch not found on PATH (is Slurm installed?)")
    monkeypatch.setenv("PATH", str(fake_bin(tmp_path, sbatch="echo 1")))
    assert slurm.available() is True


@pytest.mark.parametrize(
    ("setting", "program", "call"),
    [
        ("SUBMIT_TIMEOUT_S", "sbatch", lambda: slurm.sbatch(Path("/x/a.sbatch"), [], cwd=Path("/"))),
        ("QUERY_TIMEOUT_S", "squeue", lambda: slurm.query(["5"])),
        ("QUERY_TIMEOUT_S", "scancel", lambda: slurm.cancel(["5"])),
    ],
)
def test_a_hung_slurm_command_times_out(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, setting: str, program: str, call: object
) -> None:
    monkeypatch.setattr(slurm, setting, 0.3)
    monkeypatch.setenv("PATH", f"{fake_bin(tmp_path, **{program: 'exec sleep 3'})}:{os.environ['PATH']}")
    start = time.monotonic()
    with pytest.raises(slurm.SlurmError) as info:
        call()  # type: ignore[operator]
    assert time.monotonic() - start < 2.5
    assert info.value.cmd[0] == program and info.value.returncode is None
    assert str(info.value).endswith("failed (could not run): no answer within 0.3s (is slurmctld up?)")


def test_a_hung_scontrol_times_out(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(slurm, "QUERY_TIMEOUT_S", 0.3)
    monkeypatch.setenv("PATH", f"{fake_bin(tmp_path, squeue='true', scontrol='exec sleep 3')}:{os.environ['PATH']}")
    with pytest.raises(slurm.SlurmError, match=re.escape("no answer within 0.3s")) as info:
        slurm.query(["5"])
    assert info.value.cmd == ["scontrol", "--oneliner", "show", "job", "5"]


def test_unreadable_and_failed_query_answers(tmp_path: Path, fake_slurm: Path) -> None:
    (fake_slurm / "squeue.out").write_text("garbage\n")
    with pytest.raises(slurm.SlurmError) as info:
        slurm.query(["5"])
    assert (info.value.cmd[0], info.value.returncode) == ("squeue", 0)
    assert "failed (exit 0): unreadable output (squeue: expected 5 columns" in str(info.value)
    (fake_slurm / "squeue.out").write_text("")
    (fake_slurm / "scontrol-5.out").write_text("no pairs here\n")
    with pytest.raises(slurm.SlurmError) as info:
        slurm.query(["5"])
    assert info.value.cmd == ["scontrol", "--oneliner", "show", "job", "5"]
    assert str(info.value).startswith("`scontrol --oneliner show job 5` failed (exit 0): unreadable output (scontrol:")
    fake_bin(fake_slurm.parent, squeue='echo "squeue: error: Unable to contact slurm controller" >&2; exit 1')
    with pytest.raises(slurm.SlurmError) as info:
        slurm.query(["5"])
    assert (info.value.cmd[0], info.value.returncode) == ("squeue", 1)
    fake_bin(fake_slurm.parent, squeue="true", scontrol='echo "scontrol: error: Socket timed out" >&2; exit 1')
    with pytest.raises(slurm.SlurmError) as info:
        slurm.query(["5"])
    assert (info.value.cmd[0], info.value.returncode, info.value.stderr) == (
        "scontrol",
        1,
        "scontrol: error: Socket timed out",
    )


@pytest.mark.parametrize(
    ("rc", "stderr", "message"),
    [
        (
            0,
            "scancel: error: Kill job error on job id 5: Access/permission denied\n"
            "scancel: error: Kill job error on job id 6: Invalid job id specified\n"
            "scancel: error: Kill job error on job id 7: Access/permission denied\n",
            "scancel: error: Kill job error on job id 5: Access/permission denied\n"
            "scancel: error: Kill job error on job id 7: Access/permission denied",
        ),
        (0, "scancel: ERROR: something new\n", "scancel: ERROR: something new"),
        (1, "scancel: fatal: no controller\n", "scancel: fatal: no controller"),
        (0, "scancel: error: Kill job error on job id 6: Invalid job id specified\n", None),
        (0, "scancel: Terminating job 5\n", None),
    ],
)
def test_cancel_decides_by_exit_status_and_error_lines(
    fake_slurm: Path, rc: int, stderr: str, message: str | None
) -> None:
    (fake_slurm / "scancel.rc").write_text(str(rc))
    (fake_slurm / "scancel.err").write_text(stderr)
    if message is None:
        slurm.cancel(["5", "6"])
    else:
        with pytest.raises(slurm.SlurmError) as info:
            slurm.cancel(["5", "6", "7"])
        assert info.value.returncode == rc
        assert info.value.stderr == message
    assert calls(fake_slurm)[-1].startswith("scancel 5 6")


# --- the local executor --------------------------------------------------------------------------


def local_run(run_dir: Path, bodies: Mapping[str, str], done: tuple[str, ...] = ()) -> Manifest:
    """A submitted local run whose stages are the given bash bodies (stages in `done` already completed)."""
    (run_dir / "scripts").mkdir(parents=True)
    records = []
    for i, (name, body) in enumerate(bodies.items(), 1):
        script = f"scripts/{i:02d}-{name}.sbatch"
        (run_dir / script).write_text(f"#!/bin/bash\nset -euo pipefail\n{body}\n")
        state = S.COMPLETED if name in done else S.PENDING
        records.append(StageRecord(i, name, script, f"local-{i}", state))
    m = Manifest("r", str(run_dir), "0" * 16, "local", now(), __version__, tuple(records))
    write_manifest(run_dir, m)
    return m


def start_ticks(pid: int) -> int:
    """Field 22 of /proc/PID/stat (the process's start time), read independently of hyperjob."""
    text = Path(f"/proc/{pid}/stat").read_text()
    return int(text[text.rindex(")") + 2 :].split(" ")[19])


def test_local_env_drops_slurm_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("SLURM_JOB_ID", "SBATCH_PARTITION", "SRUN_CPUS_PER_TASK", "SALLOC_ACCOUNT", "KEEP_ME"):
        monkeypatch.setenv(name, "1")
    env = local.local_env("local-2")
    assert not [k for k in env if k.startswith(("SLURM_", "SBATCH_", "SRUN_", "SALLOC_"))]
    assert (env["KEEP_ME"], env["HYPERJOB_EXECUTOR"], env["HYPERJOB_JOB_ID"]) == ("1", "local", "local-2")
    assert "HYPERJOB_JOB_ID" not in local.local_env()


def test_run_local_runs_each_stage_in_its_run_dir(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("SLURM_JOB_ID", "99")
    run_dir = tmp_path / "run"
    m = local_run(
        run_dir,
        {
            "download": 'echo "to stdout"; echo "to stderr" >&2; cp manifest.json during.json\n'
            'echo "$PWD|$HYPERJOB_EXECUTOR|$HYPERJOB_JOB_ID|${SLURM_JOB_ID-unset}|$(ps -o pgid= $$)" >env.txt',
            "train": "touch train.ran",
            "merge": "touch merge.ran",
        },
        done=("train",),
    )
    write_manifest(run_dir, m.with_stage(replace(m.stages[0], reason="requeued by an earlier executor")))
    assert local.run_local(run_dir) is True
    m = read_manifest(run_dir)
    assert (m.local_pid, m.local_host, m.local_start) == (os.getpid(), socket.gethostname(), start_ticks(os.getpid()))
    assert [(r.state, r.exit_code, r.reason) for r in m.stages] == [
        (S.COMPLETED, "0:0", ""),
        (S.COMPLETED, None, ""),  # already completed: not run again
        (S.COMPLETED, "0:0", ""),
    ]
    assert not (run_dir / "train.ran").exists() and (run_dir / "merge.ran").exists()
    first = m.stages[0]
    assert first.log == str(run_dir / "logs" / "01-download-local-1.out")
    assert first.started is not None and first.ended is not None and first.started <= first.ended
    assert Path(first.log).read_text() == "to stdout\nto stderr\n"
    during = Manifest.from_json((run_dir / "during.json").read_text())  # what `status` saw while download ran
    assert [(r.state, r.reason, r.log) for r in during.stages] == [
        (S.RUNNING, "", first.log),
        (S.COMPLETED, "", None),
        (S.PENDING, "", None),
    ]
    assert during.stages[0].started == first.started and during.stages[0].ended is None
    cwd, executor, job, slurm_job, pgid = (run_dir / "env.txt").read_text().strip().split("|")
    assert (cwd, executor, job, slurm_job) == (str(run_dir), "local", "local-1", "unset")
    assert int(pgid) != os.getpgid(0)  # each stage in its own process group
    assert capsys.readouterr().out.splitlines() == [
        f"hyperjob local: download running (log: {first.log})",
        "hyperjob local: download completed (exit 0)",
        f"hyperjob local: merge running (log: {run_dir / 'logs' / '03-merge-local-3.out'})",
        "hyperjob local: merge completed (exit 0)",
    ]


def test_run_local_failure_cancels_the_rest(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    local_run(tmp_path, {"download": "exit 3", "train": "touch train.ran", "merge": "touch merge.ran"})
    assert local.run_local(tmp_path) is False
    assert [(r.state, r.exit_code, r.reason) for r in read_manifest(tmp_path).stages] == [
        (S.FAILED, "3:0", ""),
        (S.CANCELLED, None, "DependencyNeverSatisfied (download failed)"),
        (S.CANCELLED, None, "DependencyNeverSatisfied (download failed)"),
    ]
    assert not list(tmp_path.glob("*.ran"))
    assert "hyperjob local: download failed (exit 3)" in capsys.readouterr().out.splitlines()


def test_run_local_stage_killed_by_a_signal(tmp_path: Path) -> None:
    local_run(tmp_path, {"download": "kill -KILL $$", "train": "true"})
    assert local.run_local(tmp_path) is False
    assert [(r.state, r.exit_code) for r in read_manifest(tmp_path).stages] == [(S.FAILED, "0:9"), (S.CANCELLED, None)]


def pid_gone(pid: int, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.05)
    return False


def test_sigterm_stops_the_executor_and_its_stage(tmp_path: Path) -> None:
    """`hyperjob cancel` SIGTERMs the executor: it stops the running stage's whole process group, marks what did not
    finish CANCELLED, and exits 143; the handler it installed is removed again."""
    local_run(
        tmp_path,
        {
            "download": "true",
            "train": 'sleep 30 & echo $! >child.pid\nkill -TERM "$PPID"\nwait',
            "merge": "touch merge.ran",
        },
    )
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(SystemExit) as info:
        local.run_local(tmp_path)
    assert info.value.code == 128 + signal.SIGTERM
    assert signal.getsignal(signal.SIGTERM) is before
    assert [(r.state, r.reason) for r in read_manifest(tmp_path).stages] == [
        (S.COMPLETED, ""),
        (S.CANCELLED, "local executor stopped"),
        (S.CANCELLED, "local executor stopped"),
    ]
    assert pid_gone(int((tmp_path / "child.pid").read_text()))
    assert not (tmp_path / "merge.ran").exists()


def test_sigterm_while_a_stage_starts_still_stops_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """SIGTERM arriving after the fork but before Popen returns (a stage that starts fast, a loaded machine) used to
    raise inside Popen: the executor exited without the new stage's pid and left the stage running."""
    local_run(tmp_path, {"download": "exec sleep 30"})
    real_popen = subprocess.Popen
    started: list[int] = []

    def popen_then_sigterm(*args: object, **kwargs: object) -> subprocess.Popen[bytes]:
        proc = real_popen(*args, **kwargs)  # type: ignore[call-overload]
        started.append(proc.pid)
        os.kill(os.getpid(), signal.SIGTERM)  # delivered before Popen has returned to the executor
        return proc  # type: ignore[no-any-return]

    monkeypatch.setattr(local.subprocess, "Popen", popen_then_sigterm)
    with pytest.raises(SystemExit) as info:
        local.run_local(tmp_path)
    assert info.value.code == 128 + signal.SIGTERM
    assert pid_gone(started[0])
    assert read_manifest(tmp_path).stages[0].state is S.CANCELLED


def test_a_stage_that_ignores_sigterm_is_killed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(local, "STOP_GRACE_S", 0.5)
    local_run(tmp_path, {"download": "trap '' TERM\nkill -TERM \"$PPID\"\nsleep 5\ntouch survived"})
    start = time.monotonic()
    with pytest.raises(SystemExit):
        local.run_local(tmp_path)
    assert time.monotonic() - start < 4.5
    assert not (tmp_path / "survived").exists()
    assert read_manifest(tmp_path).stages[0].state is S.CANCELLED


def test_executor_identity_is_this_process() -> None:
    assert local.executor_identity() == (os.getpid(), socket.gethostname(), start_ticks(os.getpid()))


@pytest.fixture
def sleeper(tmp_path: Path) -> Iterator[subprocess.Popen[bytes]]:
    """A live process whose command name holds `) ` (as /proc/PID/stat shows it: `(hj) x 1)`)."""
    link = tmp_path / "hj) x 1"
    link.symlink_to(Path("/bin/sleep") if Path("/bin/sleep").exists() else Path("/usr/bin/sleep"))
    proc = subprocess.Popen([str(link), "30"])
    yield proc
    proc.kill()
    proc.wait()


def test_executor_alive(tmp_path: Path, sleeper: subprocess.Popen[bytes]) -> None:
    m = manifest_of(tmp_path)
    me = replace(m, local_pid=os.getpid(), local_host=socket.gethostname(), local_start=start_ticks(os.getpid()))
    assert local.executor_alive(m) is False  # no executor recorded
    assert local.executor_alive(me) is True
    assert local.executor_alive(replace(me, local_start=None, local_host=None)) is True
    assert local.executor_alive(replace(me, local_start=me.local_start + 1)) is False  # type: ignore[operator]
    assert local.executor_alive(replace(me, local_host="elsewhere.example")) is None
    odd = replace(me, local_pid=sleeper.pid, local_start=start_ticks(sleeper.pid))
    assert local.executor_alive(odd) is True
    dead = subprocess.Popen(["true"])
    dead.wait()
    assert local.executor_alive(replace(me, local_pid=dead.pid, local_start=None)) is False
    zombie = subprocess.Popen(["true"])
    deadline = time.monotonic() + 10
    while Path(f"/proc/{zombie.pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z":
        assert time.monotonic() < deadline
        time.sleep(0.02)
    assert local.executor_alive(replace(me, local_pid=zombie.pid, local_start=None)) is False
    zombie.wait()


def test_local_scheduler_query_and_cancel(tmp_path: Path, sleeper: subprocess.Popen[bytes]) -> None:
    m = manifest_of(
        tmp_path,
        download=rec(1, S.COMPLETED, "local-1"),
        train=rec(2, S.RUNNING, "local-2", exit_code="1:0", reason="retrying"),
        merge=rec(3, S.PENDING, "local-3"),
    )
    alive = replace(m, local_pid=sleeper.pid, local_host=socket.gethostname(), local_start=start_ticks(sleeper.pid))
    assert LOCAL.query(tmp_path, alive) == {
        "train": LiveState(S.RUNNING, "retrying", "1:0"),
        "merge": LiveState(S.PENDING, "", None),
    }
    assert set(LOCAL.query(tmp_path, replace(alive, local_host="elsewhere.example"))) == {"train", "merge"}
    reused = replace(alive, local_start=alive.local_start + 1)  # type: ignore[operator]
    assert LOCAL.query(tmp_path, reused) == {}
    LOCAL.cancel(tmp_path, reused)  # a reused pid is not ours to signal
    time.sleep(0.2)
    assert sleeper.poll() is None
    LOCAL.cancel(tmp_path, alive)
    assert sleeper.wait(timeout=5) == -signal.SIGTERM


def test_local_request_lines(tmp_path: Path) -> None:
    run_dir = tmp_path / "a run"
    m = manifest_of(run_dir)
    assert LOCAL.request(run_dir, m) == SubmitRequest(
        "local",
        run_dir,
        submissions(run_dir, m),
        (
            f"cd '{run_dir}'",
            "HYPERJOB_EXECUTOR=local HYPERJOB_JOB_ID=local-1 bash scripts/01-download.sbatch &&",
            "HYPERJOB_EXECUTOR=local HYPERJOB_JOB_ID=local-2 bash scripts/02-train.sbatch &&",
            "HYPERJOB_EXECUTOR=local HYPERJOB_JOB_ID=local-3 bash scripts/03-merge.sbatch",
        ),
    )


def fresh_local_run(run_dir: Path, bodies: Mapping[str, str]) -> Manifest:
    """Like a just-rendered run: stages RENDERED, no job ids (the local scheduler assigns them)."""
    m = local_run(run_dir, bodies)
    m = replace(m, stages=tuple(replace(r, job_id=None, state=S.RENDERED) for r in m.stages))
    write_manifest(run_dir, m)
    return m


def wait_until_done(run_dir: Path, timeout: float = 60.0) -> Manifest:
    deadline = time.monotonic() + timeout
    while True:
        m = read_manifest(run_dir)
        if all(r.state.is_terminal for r in m.stages):
            return m
        assert time.monotonic() < deadline, f"run not finished: {m.stages}"
        time.sleep(0.1)


def test_local_scheduler_in_the_foreground(tmp_path: Path) -> None:
    m = fresh_local_run(tmp_path, {"download": "echo $HYPERJOB_JOB_ID >id.txt", "train": "true"})
    out = LOCAL.schedule(LOCAL.request(tmp_path, m), m, wait=True, echo=print)
    assert [(r.job_id, r.state) for r in out.stages] == [("local-1", S.COMPLETED), ("local-2", S.COMPLETED)]
    assert out == read_manifest(tmp_path)
    assert (tmp_path / "id.txt").read_text() == "local-1\n"


def test_local_scheduler_in_the_background(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`submit` without --wait: the executor runs detached (own session, stdin from /dev/null, output appended to
    logs/local-executor.out) and `schedule` returns once it has recorded itself."""
    monkeypatch.setenv("SLURM_JOB_ID", "99")
    m = fresh_local_run(tmp_path, {"download": "sleep 1.5; echo ${SLURM_JOB_ID-unset} >slurm.txt", "train": "true"})
    log = tmp_path / "logs" / "local-executor.out"
    log.parent.mkdir()
    log.write_text("an earlier executor\n")
    out = LOCAL.schedule(LOCAL.request(tmp_path, m), m, wait=False, echo=print)
    pid = out.local_pid
    assert pid is not None and pid != os.getpid()
    assert out.stages[1].state is S.PENDING and out.stages[1].job_id == "local-2"
    assert Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[3] == str(pid)  # session leader
    assert os.readlink(f"/proc/{pid}/fd/1") == str(log)
    assert os.readlink(f"/proc/{pid}/fd/2") == str(log)
    done = wait_until_done(tmp_path)
    assert [r.state for r in done.stages] == [S.COMPLETED, S.COMPLETED]
    assert (tmp_path / "slurm.txt").read_text() == "unset\n"
    text = log.read_text()
    assert text.startswith("an earlier executor\nhyperjob local: download running")


def test_spawn_detached_reads_no_stdin(tmp_path: Path) -> None:
    fresh_local_run(tmp_path, {"download": "sleep 1"})
    read_end, write_end = os.pipe()  # `submit` run with a pipe (or a terminal) as its stdin
    saved_stdin = os.dup(0)
    os.dup2(read_end, 0)
    try:
        proc = local.spawn_detached(tmp_path)
    finally:
        os.dup2(saved_stdin, 0)
        for fd in (saved_stdin, read_end, write_end):
            os.close(fd)
    try:
        assert os.readlink(f"/proc/{proc.pid}/fd/0") == "/dev/null"
        local.await_start(tmp_path, proc)
        assert read_manifest(tmp_path).local_pid == proc.pid
    finally:
        assert proc.wait(timeout=60) == 0


def test_local_scheduler_reports_an_executor_that_never_started(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    m = fresh_local_run(tmp_path, {"download": "true"})
    monkeypatch.setattr(local, "spawn_detached", lambda run_dir: subprocess.Popen(["false"]))
    with pytest.raises(SubmitError) as info:
        LOCAL.schedule(LOCAL.request(tmp_path, m), m, wait=False, echo=print)
    log = tmp_path / "logs" / "local-executor.out"
    assert str(info.value) == f"the local executor exited with 1 before starting; see {log}"


def test_await_start_gives_up(tmp_path: Path) -> None:
    fresh_local_run(tmp_path, {"download": "true"})
    proc = subprocess.Popen(["sleep", "5"])
    try:
        start = time.monotonic()
        with pytest.raises(RuntimeError) as info:
            local.await_start(tmp_path, proc, timeout=0.6)
        assert 0.5 < time.monotonic() - start < 3
        assert str(info.value) == f"the local executor (pid {proc.pid}) did not start within 1s"
    finally:
        proc.kill()
        proc.wait()


def test_executor_main(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("COLUMNS", "200")
    local_run(tmp_path / "ok", {"download": "true"})
    local_run(tmp_path / "bad", {"download": "exit 2"})
    monkeypatch.chdir(tmp_path)
    assert local.main(["ok"]) == 0  # a relative run directory
    assert local.main([str(tmp_path / "bad")]) == 1
    capsys.readouterr()
    with pytest.raises(SystemExit):
        local.main(["--help"])
    help_text = capsys.readouterr().out
    assert help_text.startswith("usage: python -m hyperjob.schedule.local [-h] run_dir\n")
    assert "The local executor: runs a run's stage scripts in order with bash, no Slurm. Same scripts" in help_text


# --- the run: directory, submission, refresh, wait, cancel ---------------------------------------


@pytest.fixture
def tiny_cfg(tmp_path: Path) -> HyperjobConfig:
    return load_config(REPO / "examples" / "tiny-cpu.yaml", [f"workdir={tmp_path / 'work'}"], check_inputs=False)


def test_new_run_dir_never_reuses_a_directory(tiny_cfg: HyperjobConfig, tmp_path: Path) -> None:
    when = datetime(2026, 1, 2, 3, 4, 5)
    runs = tmp_path / "work" / "runs"
    first = new_run_dir(tiny_cfg, when)
    assert first == runs / "tiny-cpu-20260102-030405"
    first.mkdir(parents=True)
    assert new_run_dir(tiny_cfg, when) == runs / "tiny-cpu-20260102-030405-2"
    (runs / "tiny-cpu-20260102-030405-2").mkdir()
    assert new_run_dir(tiny_cfg, when) == runs / "tiny-cpu-20260102-030405-3"
    assert re.fullmatch(r"tiny-cpu-\d{8}-\d{6}", new_run_dir(tiny_cfg).name)


def test_write_run_dir(tiny_cfg: HyperjobConfig, tmp_path: Path) -> None:
    plan = make_plan(tiny_cfg)
    run_dir = tmp_path / "work" / "runs" / "r"
    m = write_run_dir(tiny_cfg, plan, run_dir, "local")
    assert m is not None
    rendered = render_run(tiny_cfg, plan, run_dir)
    assert (m.name, m.run_dir, m.config_hash, m.scheduler, m.hyperjob_version) == (
        "tiny-cpu",
        str(run_dir),
        config_hash(tiny_cfg),
        "local",
        __version__,
    )
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\+00:00", m.created)
    assert m.stages == tuple(StageRecord(s.index, s.stage, f"scripts/{s.filename}") for s in rendered)
    assert read_manifest(run_dir) == m
    assert (run_dir / "config.yaml").read_text() == dump_config(tiny_cfg)
    for s in rendered:
        script = run_dir / "scripts" / s.filename
        assert script.read_text() == s.text
        assert script.stat().st_mode & 0o777 == 0o755
    assert (run_dir / "logs").is_dir() and (run_dir / "outcomes").is_dir()
    other = tmp_path / "work" / "runs" / "render-only"
    assert write_run_dir(tiny_cfg, plan, other, None) is None
    assert not (other / "manifest.json").exists() and (other / "config.yaml").exists()


def test_submit_run_builds_the_request_then_schedules(tmp_path: Path) -> None:
    fake = RecordingScheduler()
    m = manifest_of(tmp_path)
    echoed: list[str] = []
    out, req = submit_run(fake, tmp_path, m, echo=echoed.append)  # type: ignore[arg-type]
    assert req == fake.request(tmp_path, m)
    assert out.scheduler == "fake"
    assert fake.calls == [("schedule", False, echoed.append)]


def test_refresh_asks_the_scheduler_then_the_records(tmp_path: Path) -> None:
    fake = RecordingScheduler("fake", [{"train": LiveState(S.RUNNING, "", None)}])
    m = manifest_of(tmp_path, "fake", download=rec(1, S.RUNNING, "11"), train=rec(2, S.PENDING, "12"))
    write_manifest(tmp_path, m)
    with registry.registered(fake):  # type: ignore[arg-type]
        out = refresh(tmp_path)
        assert [r.state for r in out.stages] == [S.LOST, S.RUNNING, S.RENDERED]
        assert out.stages[0].reason.startswith("fake no longer knows job 11")
        assert read_manifest(tmp_path) == out
        assert fake.calls == [("query", tmp_path, m)]
        finished = replace(out, stages=(out.stages[0], replace(out.stages[1], state=S.COMPLETED), out.stages[2]))
        write_manifest(tmp_path, finished)
        assert refresh(tmp_path) == finished
        assert len(fake.calls) == 1  # nothing open: the scheduler is not asked


class Clock:
    """time.monotonic and time.sleep for wait_run: sleeping advances the clock."""

    def __init__(self) -> None:
        self.now = 1000.0
        self.sleeps: list[float] = []

    def monotonic(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        assert len(self.sleeps) < 50, "wait_run kept polling"
        self.sleeps.append(seconds)
        self.now += seconds


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Clock:
    from hyperjob.schedule import run

    fake = Clock()
    monkeypatch.setattr(run.time, "monotonic", fake.monotonic)
    monkeypatch.setattr(run.time, "sleep", fake.sleep)
    return fake


def two_stage_run(run_dir: Path, scheduler: str = "fake") -> None:
    m = manifest_of(run_dir, scheduler, download=rec(1, S.PENDING, "11"), train=rec(2, S.PENDING, "12"))
    write_manifest(run_dir, replace(m, stages=m.stages[:2]))


def test_wait_run_prints_each_change_once(tmp_path: Path) -> None:
    two_stage_run(tmp_path)
    pending = LiveState(S.PENDING, "Dependency", None)
    fake = RecordingScheduler(
        "fake",
        [
            {"download": LiveState(S.RUNNING, "", None), "train": pending},
            {"download": LiveState(S.RUNNING, "", None), "train": pending},
            {"download": LiveState(S.COMPLETED, "", "0:0"), "train": LiveState(S.RUNNING, "None", None)},
            {"train": LiveState(S.COMPLETED, "", "0:0")},
        ],
    )
    lines: list[str] = []
    with registry.registered(fake):  # type: ignore[arg-type]
        out = wait_run(tmp_path, poll=0.0, echo=lines.append)
    assert [r.state for r in out.stages] == [S.COMPLETED, S.COMPLETED]
    assert all(TIMESTAMP.match(line) for line in lines)
    assert [TIMESTAMP.sub("", line) for line in lines] == [
        "download     RUNNING",
        "train        PENDING (Dependency)",
        "download     COMPLETED",
        "train        RUNNING",
        "train        COMPLETED",
    ]
    assert len(fake.calls) == 4


def test_wait_run_times_out(tmp_path: Path, clock: Clock) -> None:
    two_stage_run(tmp_path)
    fake = RecordingScheduler("fake", [{"download": LiveState(S.RUNNING, "", None)}])
    with registry.registered(fake), pytest.raises(TimeoutError) as info:  # type: ignore[arg-type]
        wait_run(tmp_path, timeout=4, echo=lambda _: None)
    assert str(info.value) == f"run {tmp_path} still running after 4s"
    assert clock.sleeps == [2.0, 2.0, 2.0]  # polled every 2 s (the default) until more than 4 s had passed
    assert len(fake.calls) == 4


def test_wait_run_rides_out_scheduler_errors_for_two_minutes(tmp_path: Path, clock: Clock) -> None:
    two_stage_run(tmp_path)
    fake = RecordingScheduler("fake", [SchedulerError("slurmctld is restarting")])
    lines: list[str] = []
    with registry.registered(fake), pytest.raises(SchedulerError):  # type: ignore[arg-type]
        wait_run(tmp_path, poll=60, echo=lines.append)
    assert len(fake.calls) == 4  # at 0, 60, 120 s (not yet more than 120 s of failures) and 180 s
    assert [TIMESTAMP.sub("", line) for line in lines] == ["warning: slurmctld is restarting; retrying"] * 3
    assert all(TIMESTAMP.match(line) for line in lines)


def test_cancel_run(tmp_path: Path) -> None:
    m = manifest_of(tmp_path, "fake", download=rec(1, S.COMPLETED, "11"), train=rec(2, S.RUNNING, "12"))
    m = replace(m, stages=(*m.stages[:2], rec(3, S.PENDING, "13")))
    write_manifest(tmp_path, m)
    live = {"train": LiveState(S.RUNNING, "", None), "merge": LiveState(S.PENDING, "Dependency", None)}
    fake = RecordingScheduler("fake", [live])
    with registry.registered(fake):  # type: ignore[arg-type]
        out = cancel_run(tmp_path)
    assert [(r.state, r.reason) for r in out.stages] == [
        (S.COMPLETED, ""),
        (S.CANCELLED, "cancelled by user"),
        (S.CANCELLED, "cancelled by user"),
    ]
    assert read_manifest(tmp_path) == out
    refreshed = replace(m, stages=(m.stages[0], m.stages[1], replace(m.stages[2], reason="Dependency")))
    assert fake.calls[-1] == ("cancel", tmp_path, refreshed)


def test_refresh_cancels_stages_stranded_behind_a_failed_one(tmp_path: Path) -> None:
    """Slurm may leave a job pending with DependencyNeverSatisfied (kill-on-invalid-dep off or slow): hyperjob
    cancels it itself, at once, instead of showing PENDING until someone looks."""
    live = {"train": LiveState(S.FAILED, "", "1:0"), "merge": LiveState(S.PENDING, "DependencyNeverSatisfied", None)}
    fake = RecordingScheduler("fake", [live])
    m = manifest_of(tmp_path, "fake", download=rec(1, S.COMPLETED, "11"), train=rec(2, S.RUNNING, "12"),
                    merge=rec(3, S.PENDING, "13"))  # fmt: skip
    write_manifest(tmp_path, m)
    with registry.registered(fake):  # type: ignore[arg-type]
        out = refresh(tmp_path)
    assert [r.state for r in out.stages] == [S.COMPLETED, S.FAILED, S.CANCELLED]
    assert out.stages[2].reason.startswith("DependencyNeverSatisfied: cancelled by hyperjob")
    cancels = [c for c in fake.calls if c[0] == "cancel"]
    assert len(cancels) == 1 and [r.name for r in cancels[0][2].stages] == ["merge"]  # type: ignore[attr-defined]
