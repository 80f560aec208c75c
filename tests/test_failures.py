"""A failed stage cancels the rest and --wait says where; `cancel` stops a run (Slurm and local)."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
from fixtures_slurm import SlurmCluster
from run_helpers import config, hyperjob, only_run_dir, run_processes, slurm_view, states


@pytest.mark.parametrize("scheduler", [pytest.param("slurm", marks=pytest.mark.slurm), "local"])
def test_failed_stage_cancels_the_rest(tmp_path: Path, scheduler: str, request: pytest.FixtureRequest) -> None:
    if scheduler == "slurm":
        request.getfixturevalue("slurm_cluster")
    # No download stage and no model in the workdir: train fails at once.
    out = hyperjob("submit", str(config(tmp_path, ["train", "merge", "evaluate"])), "--scheduler", scheduler,
                   "--wait", "--poll", "1")  # fmt: skip
    assert out.returncode == 1, out.stdout + out.stderr
    assert "run failed at stage train (FAILED)" in out.stdout
    assert "stage train failed (exit 1): hyperjob train" in out.stdout and "run the download stage first" in out.stdout
    assert states(only_run_dir(tmp_path)) == {"train": "FAILED", "merge": "CANCELLED", "evaluate": "CANCELLED"}


@pytest.mark.slurm
def test_cancel_slurm_run(tmp_path: Path, slurm_cluster: SlurmCluster) -> None:
    held = "--set=cluster.sbatch_extra=[--hold]"  # queued, never started
    out = hyperjob("submit", str(config(tmp_path, ["download", "train"])), "--scheduler", "slurm", held)
    assert out.returncode == 0, out.stderr
    run_dir = only_run_dir(tmp_path)
    jobs = [s["job_id"] for s in json.loads((run_dir / "manifest.json").read_text())["stages"]]
    try:
        assert set(states(run_dir).values()) == {"PENDING"}
        assert set(slurm_view(jobs, slurm_cluster.env).values()) == {"PENDING"}
        assert hyperjob("cancel", str(run_dir)).returncode == 0
        deadline = time.monotonic() + 30
        while set(slurm_view(jobs, slurm_cluster.env).values()) - {"CANCELLED", "gone"}:
            assert time.monotonic() < deadline, f"Slurm still has {slurm_view(jobs, slurm_cluster.env)}"
            time.sleep(0.5)
        assert set(states(run_dir).values()) == {"CANCELLED"}
    finally:  # whatever hyperjob did, leave no held job behind
        subprocess.run(["scancel", *jobs], env={**os.environ, **slurm_cluster.env}, check=False, timeout=30)


def test_cancel_local_background_run(tmp_path: Path) -> None:
    """cancel stops the executor and every process of the stage it was running: bash, torchrun, python."""
    endless = {"epochs": 10_000}  # train outlasts the test: only cancel can end it
    out = hyperjob("submit", str(config(tmp_path, ["download", "train", "merge"], training=endless)), "--scheduler",
                   "local")  # fmt: skip
    assert out.returncode == 0, out.stderr
    run_dir = only_run_dir(tmp_path)
    deadline = time.monotonic() + 120
    procs = run_processes(run_dir)
    while not any("hyperjob.stages.train" in cmd for cmd in procs.values()):
        assert time.monotonic() < deadline, f"train never started: {states(run_dir)}"
        time.sleep(0.2)
        procs = run_processes(run_dir)
    assert any(cmd.startswith("bash ") for cmd in procs.values()), procs  # the stage script itself
    assert hyperjob("cancel", str(run_dir)).returncode == 0
    deadline = time.monotonic() + 20
    while left := run_processes(run_dir):
        if time.monotonic() > deadline:
            for pid in left:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            pytest.fail(f"processes of the run survived cancel: {left}")
        time.sleep(0.2)
    final = states(run_dir)
    assert final["train"] == "CANCELLED" and final["merge"] == "CANCELLED", final
