"""A failed stage cancels the rest and --wait says where; `cancel` stops a run (Slurm and local)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent


def config(tmp_path: Path, stages: list[str]) -> Path:
    data = yaml.safe_load((REPO / "examples" / "tiny-cpu.yaml").read_text())
    data.update(workdir=str(tmp_path / "work"), stages=stages)
    data["dataset"]["path"] = str(REPO / "examples" / "data" / "dolly-tiny.jsonl")
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def hyperjob(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "hyperjob", *args], capture_output=True, text=True, timeout=300,
        env={**os.environ, **(env or {})},
    )  # fmt: skip


def only_run_dir(tmp_path: Path) -> Path:
    (run_dir,) = (tmp_path / "work" / "runs").iterdir()
    return run_dir


def states(run_dir: Path) -> dict[str, str]:
    out = hyperjob("status", str(run_dir), "--json")
    assert out.returncode == 0, out.stderr
    return {s["name"]: s["state"] for s in json.loads(out.stdout)["stages"]}


@pytest.mark.parametrize("scheduler", [pytest.param("slurm", marks=pytest.mark.slurm), "local"])
def test_failed_stage_cancels_the_rest(tmp_path: Path, scheduler: str, request: pytest.FixtureRequest) -> None:
    if scheduler == "slurm":
        request.getfixturevalue("slurm_cluster")
    # No download stage and no model in the workdir: train fails at once.
    out = hyperjob("submit", str(config(tmp_path, ["train", "merge", "evaluate"])), "--scheduler", scheduler,
                   "--wait", "--poll", "1")  # fmt: skip
    assert out.returncode == 1, out.stdout + out.stderr
    assert "run failed at stage train (FAILED)" in out.stdout
    assert "last lines of" in out.stdout
    assert states(only_run_dir(tmp_path)) == {"train": "FAILED", "merge": "CANCELLED", "evaluate": "CANCELLED"}


@pytest.mark.slurm
def test_cancel_slurm_run(tmp_path: Path, slurm_cluster: object) -> None:
    held = "--set=cluster.sbatch_extra=[--hold]"  # queued, never started
    out = hyperjob("submit", str(config(tmp_path, ["download", "train"])), "--scheduler", "slurm", held)
    assert out.returncode == 0, out.stderr
    run_dir = only_run_dir(tmp_path)
    assert set(states(run_dir).values()) == {"PENDING"}
    assert hyperjob("cancel", str(run_dir)).returncode == 0
    deadline = time.monotonic() + 30
    while set(states(run_dir).values()) != {"CANCELLED"}:
        assert time.monotonic() < deadline, states(run_dir)
        time.sleep(0.5)


def test_cancel_local_background_run(tmp_path: Path) -> None:
    out = hyperjob("submit", str(config(tmp_path, ["download", "train", "merge"])), "--scheduler", "local")
    assert out.returncode == 0, out.stderr
    run_dir = only_run_dir(tmp_path)
    deadline = time.monotonic() + 30
    while (pid := json.loads((run_dir / "manifest.json").read_text())["local_pid"]) is None:
        assert time.monotonic() < deadline, "the background executor never started"
        time.sleep(0.2)
    assert hyperjob("cancel", str(run_dir)).returncode == 0
    deadline = time.monotonic() + 15
    while Path(f"/proc/{pid}").exists() and "Z" not in Path(f"/proc/{pid}/stat").read_text().split()[2]:
        assert time.monotonic() < deadline, "the executor survived cancel"
        time.sleep(0.2)
    final = states(run_dir)
    assert "CANCELLED" in final.values() and set(final.values()) <= {"CANCELLED", "COMPLETED"}
