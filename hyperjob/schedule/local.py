"""The local executor: runs a run's stage scripts in order with bash, no Slurm.

Same scripts as under Slurm; `HYPERJOB_EXECUTOR=local` makes them call their
commands directly instead of through srun. A stage that fails cancels the rest,
as `afterok` + `--kill-on-invalid-dep=yes` does under Slurm. Progress is written
to the manifest, so `hyperjob status` reads both executors the same way.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

from hyperjob.paths import RunPaths
from hyperjob.schedule.manifest import Manifest, now, read_manifest, write_manifest
from hyperjob.schedule.states import StageState

# Inherited Slurm variables would make scripts believe they run inside an allocation.
_SLURM_PREFIXES = ("SLURM_", "SBATCH_", "SRUN_", "SALLOC_")


def local_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(_SLURM_PREFIXES)}
    env["HYPERJOB_EXECUTOR"] = "local"
    return env


def run_local(run_dir: Path, *, detached: bool = False) -> bool:
    """Run every stage not yet completed; True when all completed."""
    paths = RunPaths(run_dir)
    manifest = read_manifest(run_dir)
    if detached:  # our pid is our process group: `cancel` signals the group
        manifest = _save(run_dir, replace(manifest, local_pid=os.getpid()))
    failed: str | None = None
    for rec in manifest.stages:
        if rec.state is StageState.COMPLETED:
            continue
        if failed is not None:
            rec = replace(rec, state=StageState.CANCELLED, reason=f"DependencyNeverSatisfied ({failed} failed)")
            manifest = _save(run_dir, manifest.with_stage(rec))
            continue
        log = paths.log(rec.index, rec.name, str(rec.job_id))
        rec = replace(rec, state=StageState.RUNNING, reason="", log=str(log), started=now())
        manifest = _save(run_dir, manifest.with_stage(rec))
        print(f"hyperjob local: {rec.name} running (log: {log})", flush=True)
        log.parent.mkdir(parents=True, exist_ok=True)
        with log.open("ab") as out:
            code = subprocess.call(
                ["bash", str(run_dir / rec.script)], cwd=run_dir, env=local_env(), stdout=out, stderr=out
            )
        state = StageState.COMPLETED if code == 0 else StageState.FAILED
        rec = replace(rec, state=state, exit_code=f"{code}:0" if code >= 0 else f"0:{-code}", ended=now())
        manifest = _save(run_dir, manifest.with_stage(rec))
        print(f"hyperjob local: {rec.name} {state.value.lower()} (exit {code})", flush=True)
        if code != 0:
            failed = rec.name
    return failed is None


def _save(run_dir: Path, manifest: Manifest) -> Manifest:
    write_manifest(run_dir, manifest)
    return manifest


def spawn_detached(run_dir: Path) -> None:
    """Start the local executor in its own session, so `submit` returns at once (like sbatch)."""
    log = RunPaths(run_dir).logs / "local-executor.out"
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("ab") as out:
        subprocess.Popen(
            [sys.executable, "-m", "hyperjob.schedule.local", str(run_dir)],
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=out,
            start_new_session=True,
            env=local_env(),
        )


def cancel_local(manifest: Manifest) -> None:
    """Stop a detached local executor and everything it started (its process group)."""
    if manifest.local_pid is None:
        return
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(manifest.local_pid, signal.SIGTERM)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m hyperjob.schedule.local", description=__doc__)
    parser.add_argument("run_dir", type=Path)
    args = parser.parse_args(argv)
    return 0 if run_local(args.run_dir.resolve(), detached=True) else 1


if __name__ == "__main__":
    raise SystemExit(main())
