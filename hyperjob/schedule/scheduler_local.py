"""The local scheduler: the same stage scripts run in order by `hyperjob.schedule.local`, without Slurm.

`submit --wait` runs the executor in the foreground; otherwise it runs detached and `submit` returns once it has
recorded itself in the manifest. Its live view is the manifest it writes, valid while the executor lives.
"""

from __future__ import annotations

import shlex
from dataclasses import replace
from pathlib import Path

from hyperjob.schedule import local
from hyperjob.schedule.base import Echo, LiveState, SubmitError, SubmitRequest, job_log, submissions
from hyperjob.schedule.manifest import Manifest, StageRecord, read_manifest, write_manifest
from hyperjob.schedule.states import StageState


def job_id(rec: StageRecord) -> str:
    return f"local-{rec.index}"


class LocalScheduler:
    name = "local"
    priority: int | None = 1
    max_nodes: int | None = 1
    waits_on_live_jobs = False

    def unavailable(self) -> str | None:
        return None

    def request(self, run_dir: Path, manifest: Manifest) -> SubmitRequest:
        """In order, each only if the ones before succeeded (`&&`), as the executor runs them."""
        subs = submissions(run_dir, manifest)
        todo = [manifest.stage(sub.stage) for sub in subs]
        lines = [f"cd {shlex.quote(str(run_dir))}"]
        lines += [
            f"HYPERJOB_EXECUTOR=local HYPERJOB_JOB_ID={job_id(rec)} bash {shlex.quote(rec.script)}"
            + (" &&" if rec is not todo[-1] else "")
            for rec in todo
        ]
        return SubmitRequest(self.name, run_dir, subs, tuple(lines))

    def schedule(self, request: SubmitRequest, manifest: Manifest, *, wait: bool, echo: Echo) -> Manifest:
        """Mark the stages to run (a resumed run keeps its completed ones) and start the executor."""
        todo = {sub.stage for sub in request.submissions}
        stages = tuple(
            replace(r, job_id=job_id(r), state=StageState.PENDING) if r.name in todo else r for r in manifest.stages
        )
        write_manifest(request.run_dir, replace(manifest, stages=stages))
        if wait:
            local.run_local(request.run_dir)
        else:
            proc = local.spawn_detached(request.run_dir)
            try:
                local.await_start(request.run_dir, proc)
            except RuntimeError as e:
                raise SubmitError(str(e)) from None
        return read_manifest(request.run_dir)

    def query(self, run_dir: Path, manifest: Manifest) -> dict[str, LiveState]:
        """The executor's own records while it lives (or runs elsewhere); nothing once it is gone."""
        if local.executor_alive(manifest) is False:
            return {}
        return {rec.name: LiveState(rec.state, rec.reason, rec.exit_code) for rec in manifest.stages if rec.is_open}

    def cancel(self, run_dir: Path, manifest: Manifest) -> None:
        local.stop_executor(manifest)

    def log(self, run_dir: Path, rec: StageRecord) -> Path | None:
        return job_log(run_dir, rec)


SCHEDULER = LocalScheduler()
