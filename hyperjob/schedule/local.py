"""The local executor: runs a run's stage scripts in order with bash, no Slurm.

Same scripts as under Slurm; `HYPERJOB_EXECUTOR=local` makes them call their commands directly instead of
through srun, and `HYPERJOB_JOB_ID` gives their outcome record the job id the manifest knows. A stage that fails
cancels the rest, as `afterok` + `--kill-on-invalid-dep=yes` does under Slurm. Progress is written to the
manifest, and the executor's pid and host too, so `status` can tell a live executor from a dead one. Each stage
runs in its own process group, which the executor stops with itself (SIGTERM from `cancel`, or Ctrl-C).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from types import FrameType

from hyperjob.paths import RunPaths
from hyperjob.schedule.manifest import Manifest, exit_text, now, read_manifest, write_manifest
from hyperjob.schedule.states import StageState

# Inherited Slurm variables would make scripts believe they run inside an allocation.
_SLURM_PREFIXES = ("SLURM_", "SBATCH_", "SRUN_", "SALLOC_")
STOP_GRACE_S = 10.0  # SIGTERM first, so the stage's EXIT trap records how it ended; SIGKILL after this
START_TIMEOUT_S = 60.0
_HELD_SIGNALS = (signal.SIGTERM, signal.SIGINT)


def local_env(job_id: str | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(_SLURM_PREFIXES)}
    env["HYPERJOB_EXECUTOR"] = "local"
    if job_id is not None:
        env["HYPERJOB_JOB_ID"] = job_id
    return env


def _stop(proc: subprocess.Popen[bytes]) -> None:
    """Stop a stage's whole process group: SIGTERM, then SIGKILL after STOP_GRACE_S."""
    for sig, grace in ((signal.SIGTERM, STOP_GRACE_S), (signal.SIGKILL, 5.0)):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, sig)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=grace)
            return


@contextlib.contextmanager
def _signals_held() -> Iterator[list[int]]:
    """Collect SIGTERM and SIGINT instead of acting on them while a stage starts. Raised inside Popen, after the fork,
    the executor's exception would lose the new stage's pid and leave the stage running without its executor."""
    held: list[int] = []
    previous = {sig: signal.signal(sig, lambda signum, _frame: held.append(signum)) for sig in _HELD_SIGNALS}
    try:
        yield held
    finally:
        for sig, handler in previous.items():
            if handler is not None:  # None: installed outside Python, and gone for good once replaced
                signal.signal(sig, handler)


def _run_script(run_dir: Path, script: str, job_id: str | None, log: Path) -> int:
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("ab") as out:
        with _signals_held() as held:
            proc = subprocess.Popen(
                ["bash", str(run_dir / script)], cwd=run_dir, env=local_env(job_id), stdout=out, stderr=out,
                start_new_session=True,
            )  # fmt: skip
        try:
            for signum in held:
                signal.raise_signal(signum)  # now the executor's own handler acts, with the stage's pid known
            return proc.wait()
        except BaseException:
            _stop(proc)
            raise


def _terminate(signum: int, _frame: FrameType | None) -> None:
    raise SystemExit(128 + signum)


def run_local(run_dir: Path) -> bool:
    """Run every stage not yet completed; True when all completed."""
    paths = RunPaths(run_dir)
    pid, host, start = executor_identity()
    manifest = _save(run_dir, replace(read_manifest(run_dir), local_pid=pid, local_host=host, local_start=start))
    previous = signal.signal(signal.SIGTERM, _terminate)
    failed: str | None = None
    try:
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
            code = _run_script(run_dir, rec.script, rec.job_id, log)
            state = StageState.COMPLETED if code == 0 else StageState.FAILED
            text = exit_text(code) if code >= 0 else exit_text(0, -code)  # negative: killed by that signal
            rec = replace(rec, state=state, exit_code=text, ended=now())
            manifest = _save(run_dir, manifest.with_stage(rec))
            print(f"hyperjob local: {rec.name} {state.value.lower()} (exit {code})", flush=True)
            if code != 0:
                failed = rec.name
    except BaseException:
        _mark_stopped(run_dir, manifest)
        raise
    finally:
        signal.signal(signal.SIGTERM, previous)
    return failed is None


def _mark_stopped(run_dir: Path, manifest: Manifest) -> None:
    """The executor is stopping (cancel, Ctrl-C): what has not finished will not run."""
    for rec in manifest.stages:
        if not rec.state.is_terminal:
            manifest = manifest.with_stage(replace(rec, state=StageState.CANCELLED, reason="local executor stopped"))
    with contextlib.suppress(OSError):
        write_manifest(run_dir, manifest)


def _save(run_dir: Path, manifest: Manifest) -> Manifest:
    write_manifest(run_dir, manifest)
    return manifest


def spawn_detached(run_dir: Path) -> subprocess.Popen[bytes]:
    """Start the local executor in its own session, so `submit` returns at once (like sbatch)."""
    log = RunPaths(run_dir).logs / "local-executor.out"
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("ab") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "hyperjob.schedule.local", str(run_dir)],
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=out,
            start_new_session=True,
            env=local_env(),
        )


def await_start(run_dir: Path, proc: subprocess.Popen[bytes], timeout: float = START_TIMEOUT_S) -> None:
    """Return once the executor has recorded its pid in the manifest, so `status` never sees a run without one."""
    deadline = time.monotonic() + timeout
    while read_manifest(run_dir).local_pid != proc.pid:
        if proc.poll() is not None:
            log = RunPaths(run_dir).logs / "local-executor.out"
            raise RuntimeError(f"the local executor exited with {proc.returncode} before starting; see {log}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"the local executor (pid {proc.pid}) did not start within {timeout:.0f}s")
        time.sleep(0.05)


def _proc_stat(pid: int) -> tuple[str, int] | None:
    """(state, start time in clock ticks) of a process, or None if there is none."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[-1].split()  # the name may hold spaces
        return fields[0], int(fields[19])
    except (OSError, IndexError, ValueError):
        return None


def executor_identity() -> tuple[int, str, int | None]:
    """(pid, host, start time) of this process: the start time tells a live executor from a reused pid."""
    stat = _proc_stat(os.getpid())
    return os.getpid(), socket.gethostname(), None if stat is None else stat[1]


def executor_alive(manifest: Manifest) -> bool | None:
    """Whether the run's executor still runs: None when it ran on another host (this one cannot tell)."""
    if manifest.local_pid is None:
        return False
    if manifest.local_host is not None and manifest.local_host != socket.gethostname():
        return None
    stat = _proc_stat(manifest.local_pid)
    if stat is None or stat[0] == "Z":
        return False
    return manifest.local_start is None or stat[1] == manifest.local_start


def stop_executor(manifest: Manifest) -> None:
    """SIGTERM the executor; it stops its running stage's process group before it exits."""
    if manifest.local_pid is not None and executor_alive(manifest):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(manifest.local_pid, signal.SIGTERM)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m hyperjob.schedule.local", description=__doc__)
    parser.add_argument("run_dir", type=Path)
    args = parser.parse_args(argv)
    return 0 if run_local(args.run_dir.resolve()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
