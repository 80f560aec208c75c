"""The dry run as a scheduler: it records what another scheduler would do, and does nothing.

`schedule` writes the target's request lines to `<run_dir>/dry-run.sh` (a readable record, runnable by hand) and
leaves every stage RENDERED, with no job id, so `status` has nothing to ask anyone.
"""

from __future__ import annotations

from pathlib import Path

from hyperjob.fsutil import atomic_write_text
from hyperjob.schedule.base import Echo, LiveState, Scheduler, SubmitRequest
from hyperjob.schedule.manifest import Manifest, StageRecord

RECORD_NAME = "dry-run.sh"


class DryRunScheduler:
    name = "dry-run"
    priority: int | None = None
    max_nodes: int | None = None
    waits_on_live_jobs = False

    def __init__(self, target: Scheduler | None = None) -> None:
        self.target = target

    def unavailable(self) -> str | None:
        return None

    def request(self, run_dir: Path, manifest: Manifest) -> SubmitRequest:
        if self.target is None:
            raise ValueError("a dry run needs a target scheduler to show")
        return self.target.request(run_dir, manifest)

    def schedule(self, request: SubmitRequest, manifest: Manifest, *, wait: bool, echo: Echo) -> Manifest:
        header = [
            "#!/bin/bash",
            f"# hyperjob dry run: the commands the {request.scheduler} scheduler would run for this run; nothing ran.",
            "set -euo pipefail",
        ]
        atomic_write_text(request.run_dir / RECORD_NAME, "\n".join([*header, *request.lines]) + "\n")
        return manifest

    def query(self, run_dir: Path, manifest: Manifest) -> dict[str, LiveState]:
        return {}

    def cancel(self, run_dir: Path, manifest: Manifest) -> None:
        return None

    def log(self, run_dir: Path, rec: StageRecord) -> Path | None:
        return None


SCHEDULER = DryRunScheduler()
