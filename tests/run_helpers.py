"""What the end-to-end tests share: a tiny config, the CLI in a subprocess, and views of a run from outside.

The views (`slurm_view`, `run_processes`) look at Slurm and at the process table directly, never through
hyperjob's own manifest, so a test built on them fails when hyperjob only *says* it did something.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parent.parent
TINY = REPO / "examples" / "tiny-cpu.yaml"
DOLLY = REPO / "examples" / "data" / "dolly-tiny.jsonl"


def config(tmp_path: Path, stages: list[str] | None = None, **sections: dict[str, Any]) -> Path:
    """The tiny example with its workdir in tmp_path, optionally only some stages and changed sections."""
    data = yaml.safe_load(TINY.read_text())
    data["workdir"] = str(tmp_path / "work")
    data["dataset"]["path"] = str(DOLLY)
    if stages is not None:
        data["stages"] = stages
    for section, values in sections.items():
        data.setdefault(section, {}).update(values)
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def hyperjob(*args: str, env: dict[str, str] | None = None, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "hyperjob", *args], capture_output=True, text=True, timeout=timeout,
        env={**os.environ, **(env or {})},
    )  # fmt: skip


def only_run_dir(tmp_path: Path) -> Path:
    (run_dir,) = (tmp_path / "work" / "runs").iterdir()
    return run_dir


def states(run_dir: Path, env: dict[str, str] | None = None) -> dict[str, str]:
    """Each stage's state as `hyperjob status --json` reports it."""
    import json

    out = hyperjob("status", str(run_dir), "--json", env=env)
    assert out.returncode in (0, 1), out.stderr  # 1: a stage failed
    return {s["name"]: s["state"] for s in json.loads(out.stdout)["stages"]}


def final_losses(run_dir: Path, step: int) -> dict[int, float]:
    """The logged loss of every step, from the trainer state of `checkpoint-<step>` (the run's last)."""
    import json

    state = json.loads((run_dir / "checkpoints" / f"checkpoint-{step}" / "trainer_state.json").read_text())
    return {e["step"]: e["loss"] for e in state["log_history"] if "loss" in e}


def wait_for(what: str, done: Callable[[], bool], timeout: float = 120.0, poll: float = 0.2) -> None:
    deadline = time.monotonic() + timeout
    while not done():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(poll)


def slow_python(tmp_path: Path, delay: float, ticks: int = 0) -> Path:
    """A stand-in interpreter that waits (printing `tick N` lines if asked) before running the real one.

    It first touches `<tmp_path>/slow-python.started`: under Slurm, srun has then started the step.
    """
    path = tmp_path / "slow-python"
    body = "".join(f"echo 'tick {i}'; sleep {delay / max(ticks, 1)}\n" for i in range(1, ticks + 1))
    start = f"touch {path}.started\n"
    path.write_text(f'#!/bin/bash\n{start}{body or f"sleep {delay}"}\nexec {sys.executable} "$@"\n')
    path.chmod(0o755)
    return path


def slurm_view(job_ids: list[str], env: dict[str, str]) -> dict[str, str]:
    """Each job's state as Slurm itself reports it (`gone` once it has forgotten the job), not as hyperjob does."""
    view = {}
    for job in job_ids:
        proc = subprocess.run(["scontrol", "--oneliner", "show", "job", job], capture_output=True, text=True,
                              env={**os.environ, **env}, timeout=30)  # fmt: skip
        if proc.returncode != 0:
            assert "Invalid job id specified" in proc.stderr, proc.stderr
            view[job] = "gone"
        else:
            view[job] = proc.stdout.split("JobState=", 1)[1].split()[0]
    return view


def run_processes(run_dir: Path) -> dict[int, str]:
    """Live processes that belong to a run: its path in their command line, or their working directory in it."""
    found = {}
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            if proc.joinpath("stat").read_text().rsplit(")", 1)[1].split()[0] == "Z":
                continue
            cmdline = proc.joinpath("cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            cwd = os.readlink(proc / "cwd")
        except (OSError, IndexError):
            continue  # gone meanwhile
        if str(run_dir) in cmdline or Path(cwd).is_relative_to(run_dir):
            found[int(proc.name)] = cmdline
    return found
