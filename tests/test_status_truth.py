"""Status stays true after the scheduler forgets: real Slurm with a short MinJobAge, and a killed local executor.

Three runs are submitted without --wait and not looked at until their jobs are gone from Slurm (purged after
MinJobAge; CI starts Slurm with 10 s, as on a busy cluster) or their local executor was killed with SIGKILL:
a run that succeeded, one whose first stage failed (the rest cancelled by afterok), and one whose stage was
SIGKILLed before it could write its exit record. `hyperjob status` must then report each stage's true final
state and exit code, and LOST (with the reason) for the killed one, never PENDING.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml

from hyperjob.paths import RunPaths
from hyperjob.schedule import slurm
from hyperjob.schedule.outcome import Outcome, parse_outcome

REPO = Path(__file__).resolve().parent.parent
MAX_MIN_JOB_AGE_S = 60
SLOW_START_S = 2  # long enough to be sure a stage runs when the test kills its executor


def interpreter(tmp_path: Path, name: str, delay: int) -> Path:
    """A "python" that waits before running the real one: the stages run long enough to be interrupted."""
    path = tmp_path / f"python-{name}"
    path.write_text(f'#!/bin/bash\nsleep {delay}\nexec {sys.executable} "$@"\n')
    path.chmod(0o755)
    return path


def submit(tmp_path: Path, name: str, stages: list[str], python: Path, scheduler: str) -> Path:
    data = yaml.safe_load((REPO / "examples" / "tiny-cpu.yaml").read_text())
    data.update(name=name, workdir=str(tmp_path / name), stages=stages)
    data["dataset"]["path"] = str(REPO / "examples" / "data" / "dolly-tiny.jsonl")
    data["environment"] = {"python": str(python)}
    cfg = tmp_path / f"{name}.yaml"
    cfg.write_text(yaml.safe_dump(data))
    out = subprocess.run(
        [sys.executable, "-m", "hyperjob", "submit", str(cfg), "--scheduler", scheduler],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert out.returncode == 0, out.stdout + out.stderr
    (run_dir,) = (tmp_path / name / "runs").iterdir()
    return run_dir


def manifest(run_dir: Path) -> dict:  # type: ignore[type-arg]
    return json.loads((run_dir / "manifest.json").read_text())


def record(run_dir: Path, index: int, stage: str) -> Outcome | None:
    try:
        return parse_outcome(RunPaths(run_dir).outcome(index, stage).read_text())
    except (OSError, ValueError):
        return None


def wait_for(what: str, done: Callable[[], bool], timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not done():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.25)


def status(run_dir: Path) -> dict[str, tuple[str, str | None, str]]:
    out = subprocess.run([sys.executable, "-m", "hyperjob", "status", str(run_dir), "--json"], capture_output=True,
                         text=True, timeout=60)  # fmt: skip
    assert out.returncode in (0, 1), out.stderr  # 1: a stage failed
    return {s["name"]: (s["state"], s["exit_code"], s["reason"]) for s in json.loads(out.stdout)["stages"]}


Act = Callable[[str, Path], None]


def three_runs(tmp_path: Path, scheduler: str, act: Act) -> dict[str, Path]:
    """Submit the three runs, calling `act(name, run_dir)` right after each submission."""
    slow = interpreter(tmp_path, "slow", SLOW_START_S)
    stuck = interpreter(tmp_path, "stuck", 600)
    scenarios = {
        "ok": (["download"], slow),
        # No download stage and an empty workdir: train fails at once ("run the download stage first").
        "fail": (["train", "merge", "evaluate"], slow),
        "killed": (["download"], stuck),
    }
    runs = {}
    for name, (stages, python) in scenarios.items():
        runs[name] = submit(tmp_path, name, stages, python, scheduler)
        act(name, runs[name])
    return runs


def first_stage_started(name: str, run_dir: Path) -> None:
    stage = manifest(run_dir)["stages"][0]["name"]
    wait_for(f"{name}'s first stage to start", lambda: record(run_dir, 1, stage) is not None)


def assert_true_final_states(runs: dict[str, Path], scheduler: str) -> None:
    ok, fail, killed = (status(runs[k]) for k in ("ok", "fail", "killed"))
    assert ok["download"][:2] == ("COMPLETED", "0:0"), ok
    assert fail["train"][:2] == ("FAILED", "1:0"), fail  # torchrun exits 1 when a worker fails (the worker: 2)
    for stage in ("merge", "evaluate"):
        assert fail[stage][0] == "CANCELLED" and "DependencyNeverSatisfied" in fail[stage][2], fail
    state, code, reason = killed["download"]
    assert (state, code) == ("LOST", None), killed
    assert "left no exit record" in reason and f"{scheduler} no longer knows job" in reason, reason
    table = subprocess.run([sys.executable, "-m", "hyperjob", "status", str(runs["killed"])], capture_output=True,
                           text=True, timeout=60).stdout  # fmt: skip
    assert re.search(r"download\s+\S+\s+LOST\s+-\s+started on ", table), table


def _min_job_age() -> int:
    out = subprocess.run(["scontrol", "show", "config"], capture_output=True, text=True, timeout=30, check=True)
    match = re.search(r"^MinJobAge\s*=\s*(\d+)", out.stdout, re.MULTILINE)
    assert match, out.stdout[:2000]
    return int(match.group(1))


@pytest.mark.slurm
def test_status_after_slurm_purged_the_jobs(tmp_path: Path, slurm_cluster: object) -> None:
    age = _min_job_age()
    assert 0 < age <= MAX_MIN_JOB_AGE_S, (
        f"MinJobAge={age}: this test needs Slurm to forget jobs soon; restart the cluster with .ci/slurm/stop.sh "
        f"and .ci/slurm/start.sh (MinJobAge {MAX_MIN_JOB_AGE_S} s or less)"
    )

    def kill_the_stuck_one(name: str, run_dir: Path) -> None:
        if name == "killed":
            first_stage_started(name, run_dir)
            # SIGKILL to the batch shell only: no trap runs, so the stage leaves its start record and nothing else.
            job = manifest(run_dir)["stages"][0]["job_id"]
            subprocess.run(["scancel", "--batch", "--signal=KILL", job], check=True, timeout=30)

    runs = three_runs(tmp_path, "slurm", kill_the_stuck_one)
    ids = [s["job_id"] for run in runs.values() for s in manifest(run)["stages"]]
    wait_for("Slurm to purge every job", lambda: not slurm.query(ids), timeout=age + 120)
    assert_true_final_states(runs, "slurm")


def _stage_shell(run_dir: Path) -> int:
    """The pid of the bash running one of the run's stage scripts (the leader of the stage's process group)."""
    for proc in Path("/proc").iterdir():
        try:
            argv = (proc / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if argv[0] == b"bash" and len(argv) > 1 and argv[1].startswith(str(run_dir / "scripts").encode()):
            return int(proc.name)
    raise AssertionError(f"no stage of {run_dir} is running")


def test_status_after_the_local_executor_was_killed(tmp_path: Path) -> None:
    def kill_the_executor(name: str, run_dir: Path) -> None:
        first_stage_started(name, run_dir)
        os.kill(manifest(run_dir)["local_pid"], signal.SIGKILL)
        if name == "killed":
            os.killpg(_stage_shell(run_dir), signal.SIGKILL)
            return
        # The stage runs on in its own process group and records its end.
        stage = manifest(run_dir)["stages"][0]["name"]
        wait_for(f"{name}'s stage to end", lambda: bool((o := record(run_dir, 1, stage)) and o.finished))

    assert_true_final_states(three_runs(tmp_path, "local", kill_the_executor), "local")
