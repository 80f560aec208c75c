"""The Slurm scheduler: every stage queued at once with sbatch, each `afterok` on the stages it waits for.

Commands go through `hyperjob.schedule.slurm` (the only module that runs them). The request's lines are a
runnable shell script: each job id is captured in `job_NN` and later lines depend on it.
"""

from __future__ import annotations

import re
import shlex
from dataclasses import replace
from pathlib import Path

from hyperjob.schedule import slurm
from hyperjob.schedule.base import Echo, LiveState, SubmitError, SubmitRequest, job_log, submissions
from hyperjob.schedule.manifest import Manifest, StageRecord, exit_text, write_manifest
from hyperjob.schedule.states import StageState

_PLACEHOLDER = re.compile(r"(\$\{job_\d+\})")


def _variable(index: int) -> str:
    return f"job_{index:02d}"


def _shell_word(word: str) -> str:
    """Shell-quote `word`, leaving `${job_NN}` placeholders expandable."""
    return "".join(p if _PLACEHOLDER.fullmatch(p) else shlex.quote(p) for p in _PLACEHOLDER.split(word) if p)


class SlurmScheduler:
    name = "slurm"
    priority: int | None = 0
    max_nodes: int | None = None
    waits_on_live_jobs = True

    def unavailable(self) -> str | None:
        return None if slurm.available() else "sbatch is not on PATH (use --scheduler local, or load Slurm)"

    def request(self, run_dir: Path, manifest: Manifest) -> SubmitRequest:
        index = {rec.name: rec.index for rec in manifest.stages}
        subs, lines = submissions(run_dir, manifest), [f"cd {shlex.quote(str(run_dir))}"]
        now = {sub.stage for sub in subs}
        for sub in subs:
            # A stage queued earlier (resume) is waited for by its job id; one queued now by its variable.
            deps = ["${" + _variable(index[a]) + "}" if a in now else str(manifest.stage(a).job_id) for a in sub.after]
            cmd = " ".join(_shell_word(w) for w in slurm.sbatch_command(sub.script, deps))
            lines.append(f"{_variable(index[sub.stage])}=$({cmd})")
        return SubmitRequest(self.name, run_dir, subs, tuple(lines))

    def schedule(self, request: SubmitRequest, manifest: Manifest, *, wait: bool, echo: Echo) -> Manifest:
        """Queue every stage; if any sbatch fails, cancel what this call queued (nothing is left half-submitted)."""
        ids = {rec.name: rec.job_id for rec in manifest.stages if rec.job_id and rec.is_open}  # waited for (resume)
        queued: list[str] = []
        try:
            for sub in request.submissions:
                rec = manifest.stage(sub.stage)
                deps = [ids[a] for a in sub.after]
                job_id = slurm.sbatch(sub.script, deps, cwd=request.run_dir)
                ids[sub.stage] = job_id
                queued.append(job_id)
                rec = replace(rec, job_id=job_id, state=StageState.PENDING)
                manifest = manifest.with_stage(replace(rec, log=str(job_log(request.run_dir, rec))))
                write_manifest(request.run_dir, manifest)
                after = f"  (afterok:{':'.join(deps)})" if deps else ""
                echo(f"  {rec.index:02d} {rec.name:<12} job {job_id}{after}")
        except slurm.SlurmError as e:
            if queued:
                slurm.cancel(queued)
            raise SubmitError(f"sbatch failed for stage {sub.stage}: {e}; cancelled jobs {queued}") from None
        return manifest

    def query(self, run_dir: Path, manifest: Manifest) -> dict[str, LiveState]:
        """squeue, then `scontrol show job`; jobs Slurm has purged are absent."""
        open_ = {rec.job_id: rec.name for rec in manifest.stages if rec.job_id and rec.is_open}
        infos = slurm.query(list(open_)) if open_ else {}
        live = {}
        for job_id, name in open_.items():
            info = infos.get(job_id)
            if info is not None:
                code = None if info.exit_code is None else exit_text(info.exit_code, info.signal or 0)
                live[name] = LiveState(info.state, info.reason or "", code)
        return live

    def cancel(self, run_dir: Path, manifest: Manifest) -> None:
        ids = [rec.job_id for rec in manifest.stages if rec.job_id and rec.is_open]
        if ids:
            slurm.cancel(ids)

    def log(self, run_dir: Path, rec: StageRecord) -> Path | None:
        """A requeued job appends to the same file (--open-mode=append)."""
        return job_log(run_dir, rec)


SCHEDULER = SlurmScheduler()
