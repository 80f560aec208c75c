"""Requeue and restart on the project's real Slurm: USR2 before the time limit (save, stop, requeue), an admin's
`scontrol requeue` mid-training, and the retry budget. A restarted train resumes from its newest complete
checkpoint, and its logged losses match an uninterrupted run step for step."""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

import pytest
from fixtures_slurm import SlurmCluster
from run_helpers import config, final_losses, hyperjob, only_run_dir, states, wait_for

pytestmark = [pytest.mark.slurm, pytest.mark.slow]

STEPS = 30
TRAINING = {"max_steps": STEPS, "save_steps": 5, "logging_steps": 1, "warmup": 0}


def _losses(run_dir: Path) -> dict[int, float]:
    return final_losses(run_dir, STEPS)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory: pytest.TempPathFactory) -> dict[int, float]:
    """The same training, never interrupted (local executor: the same world size and seed)."""
    tmp = tmp_path_factory.mktemp("straight")
    out = hyperjob("submit", str(config(tmp, ["download", "train"], training=TRAINING)), "--scheduler", "local",
                   "--wait", "--poll", "1")  # fmt: skip
    assert out.returncode == 0, out.stdout + out.stderr
    return _losses(only_run_dir(tmp))


def _submit(tmp_path: Path, env: dict[str, str], **cluster: object) -> tuple[Path, str]:
    cfg = config(tmp_path, ["download", "train"], training=TRAINING, cluster=cluster)
    out = hyperjob("submit", str(cfg), "--scheduler", "slurm", env=env)
    assert out.returncode == 0, out.stdout + out.stderr
    run_dir = only_run_dir(tmp_path)
    train = next(s for s in json.loads((run_dir / "manifest.json").read_text())["stages"] if s["name"] == "train")
    return run_dir, train["job_id"]


def _slurm(env: dict[str, str], *cmd: str) -> None:
    subprocess.run(list(cmd), check=True, env={**os.environ, **env}, timeout=30, capture_output=True)


def _mid_training(run_dir: Path) -> None:
    """Once the first checkpoint is complete, and before the last one."""
    wait_for("checkpoint-5", lambda: (run_dir / "checkpoints" / "checkpoint-5" / "trainer_state.json").is_file(), 300)


def _wait_done(run_dir: Path, env: dict[str, str]) -> dict[str, str]:
    out = hyperjob("status", str(run_dir), "--json", env=env)
    deadline = time.monotonic() + 400
    while True:
        view = states(run_dir)
        if view["train"] in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "LOST", "NODE_FAIL"):
            return view
        assert time.monotonic() < deadline, out.stdout
        time.sleep(2)


def test_usr2_saves_stops_and_requeues(
    tmp_path: Path, slurm_cluster: SlurmCluster, uninterrupted: dict[int, float]
) -> None:
    run_dir, job = _submit(tmp_path, slurm_cluster.env)
    _mid_training(run_dir)
    _slurm(slurm_cluster.env, "scancel", "--signal=USR2", "--batch", job)  # what --signal=B:USR2@N sends
    assert _wait_done(run_dir, slurm_cluster.env)["train"] == "COMPLETED"
    log = next((run_dir / "logs").glob("02-train-*.out")).read_text()
    assert "asking train to save a checkpoint and stop" in log and "requeueing job" in log, log[-3000:]
    assert "resuming from checkpoint-" in log
    assert "restarts=1" in (run_dir / "outcomes" / "02-train.outcome").read_text()
    resumed = _losses(run_dir)
    assert resumed.keys() == uninterrupted.keys()
    assert all(abs(resumed[k] - uninterrupted[k]) < 1e-5 for k in resumed), (resumed, uninterrupted)


def test_scontrol_requeue_mid_training_resumes_from_the_checkpoint(
    tmp_path: Path, slurm_cluster: SlurmCluster, uninterrupted: dict[int, float]
) -> None:
    run_dir, job = _submit(tmp_path, slurm_cluster.env)
    _mid_training(run_dir)
    _slurm(slurm_cluster.env, "scontrol", "requeue", job)
    assert _wait_done(run_dir, slurm_cluster.env)["train"] == "COMPLETED"
    log = next((run_dir / "logs").glob("02-train-*.out")).read_text()
    assert "resuming from checkpoint-" in log, log[-3000:]
    resumed = _losses(run_dir)
    assert all(abs(resumed[k] - uninterrupted[k]) < 1e-5 for k in resumed), (resumed, uninterrupted)


def test_retry_budget_exhausted_fails_with_a_reason(tmp_path: Path, slurm_cluster: SlurmCluster) -> None:
    run_dir, job = _submit(tmp_path, slurm_cluster.env, max_restarts=0)
    _mid_training(run_dir)
    _slurm(slurm_cluster.env, "scontrol", "requeue", job)
    assert _wait_done(run_dir, slurm_cluster.env)["train"] == "FAILED"
    out = hyperjob("status", str(run_dir), "--json", env=slurm_cluster.env)
    train = next(s for s in json.loads(out.stdout)["stages"] if s["name"] == "train")
    assert "more than cluster.max_restarts=0" in (train["error"] or ""), train
