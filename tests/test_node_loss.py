"""A node dies in the middle of a two-node training step (its slurmd killed, on the project's two-node Slurm):
with cluster.requeue the job comes back and resumes from its newest checkpoint; without, it fails cleanly and
`hyperjob resume` finishes it. Either way nothing is lost: the losses match an uninterrupted run step for step."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from fixtures_slurm2 import Slurm2Cluster
from run_helpers import config, final_losses, hyperjob, only_run_dir, states, wait_for

pytestmark = [pytest.mark.slurm2, pytest.mark.slow]

STEPS = 200  # long enough that the node dies mid-training (a step takes ~0.1 s here)
TRAINING = {"max_steps": STEPS, "save_steps": 10, "logging_steps": 1, "warmup": 0}


def _losses(run_dir: Path) -> dict[int, float]:
    return final_losses(run_dir, STEPS)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory: pytest.TempPathFactory) -> dict[int, float]:
    """World size 4 on one node (local executor): two nodes x two processes train exactly the same."""
    tmp = tmp_path_factory.mktemp("straight")
    cfg = config(tmp, ["download", "train"], training=TRAINING, cluster={"devices_per_node": 4})
    out = hyperjob("submit", str(cfg), "--scheduler", "local", "--wait", "--poll", "1")
    assert out.returncode == 0, out.stdout + out.stderr
    return _losses(only_run_dir(tmp))


def _start(tmp_path: Path, cluster: Slurm2Cluster, requeue: bool) -> Path:
    section = {"nodes": 2, "devices_per_node": 2, "partition": cluster.partition, "time": "00:20:00",
               "requeue": requeue}  # fmt: skip
    cfg = config(tmp_path, ["download", "train"], training=TRAINING, cluster=section)
    out = hyperjob("submit", str(cfg), "--scheduler", "slurm", env=cluster.env)
    assert out.returncode == 0, out.stdout + out.stderr
    run_dir = only_run_dir(tmp_path)
    done = run_dir / "checkpoints" / "checkpoint-10" / "trainer_state.json"
    wait_for("the first checkpoint", done.is_file, timeout=300)
    return run_dir


def _train_state(run_dir: Path, cluster: Slurm2Cluster, want: set[str], timeout: float) -> str:
    deadline = time.monotonic() + timeout
    while (state := states(run_dir, cluster.env)["train"]) not in want:
        assert time.monotonic() < deadline, f"train is {state}, waited for {want}"
        time.sleep(2)
    return state


def _check_nothing_lost(run_dir: Path, uninterrupted: dict[int, float]) -> None:
    summary = json.loads((run_dir / "train_summary.json").read_text())
    assert summary["world_size"] == 4 and summary["steps"] == STEPS
    assert summary["resumed_from"] and summary["resumed_from"].startswith("checkpoint-"), summary
    resumed = _losses(run_dir)
    assert resumed.keys() == uninterrupted.keys()
    assert all(abs(resumed[k] - uninterrupted[k]) < 1e-5 for k in resumed), (resumed, uninterrupted)


def test_node_loss_with_requeue_comes_back_and_resumes(
    tmp_path: Path, slurm2_cluster: Slurm2Cluster, uninterrupted: dict[int, float]
) -> None:
    run_dir = _start(tmp_path, slurm2_cluster, requeue=True)
    slurm2_cluster.freeze_node(slurm2_cluster.nodes[1])
    try:
        # Slurm notices the dead node (SlurmdTimeout), requeues the job; it needs both nodes to run again.
        wait_for("the requeue", lambda: "restarts=" in _job_line(run_dir, slurm2_cluster), timeout=180)
    finally:
        slurm2_cluster.reboot_node(slurm2_cluster.nodes[1])
    assert _train_state(run_dir, slurm2_cluster, {"COMPLETED", "FAILED", "NODE_FAIL", "LOST"}, 600) == "COMPLETED"
    _check_nothing_lost(run_dir, uninterrupted)


def test_node_loss_without_requeue_fails_cleanly_and_resume_finishes(
    tmp_path: Path, slurm2_cluster: Slurm2Cluster, uninterrupted: dict[int, float]
) -> None:
    run_dir = _start(tmp_path, slurm2_cluster, requeue=False)
    slurm2_cluster.freeze_node(slurm2_cluster.nodes[1])
    try:
        failed = _train_state(run_dir, slurm2_cluster, {"NODE_FAIL", "FAILED", "CANCELLED", "LOST"}, 180)
    finally:
        slurm2_cluster.reboot_node(slurm2_cluster.nodes[1])
    status = hyperjob("status", str(run_dir), env=slurm2_cluster.env)
    assert f"resume with: hyperjob resume {run_dir}" in status.stdout, status.stdout
    download = states(run_dir, slurm2_cluster.env)["download"]
    out = hyperjob("resume", str(run_dir), "--wait", "--poll", "1", env=slurm2_cluster.env, timeout=900)
    assert out.returncode == 0, f"{failed}: " + out.stdout + out.stderr
    assert "download     keep" in out.stdout and download == "COMPLETED"
    _check_nothing_lost(run_dir, uninterrupted)


def _job_line(run_dir: Path, cluster: Slurm2Cluster) -> str:
    """`scontrol show job` of the train job, `restarts=N` appended once Slurm has requeued it."""
    train = next(s for s in json.loads((run_dir / "manifest.json").read_text())["stages"] if s["name"] == "train")
    proc = cluster.client("scontrol", "--oneliner", "show", "job", str(train["job_id"]))
    restarts = proc.stdout.split("Restarts=", 1)[1].split()[0] if "Restarts=" in proc.stdout else "0"
    return proc.stdout + (f" restarts={restarts}" if restarts != "0" else "")
