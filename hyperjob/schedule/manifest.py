"""The run manifest: what was rendered and submitted, and the last state seen of each stage.

`status` works from it when Slurm has forgotten a job (no slurmdbd), and the
local executor records its progress in it. Written atomically.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from hyperjob.fsutil import atomic_write_text
from hyperjob.paths import RunPaths
from hyperjob.schedule.states import StageState

MANIFEST_VERSION = 1


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


@dataclass(frozen=True)
class StageRecord:
    index: int
    name: str
    script: str
    job_id: str | None = None
    state: StageState = StageState.RENDERED
    reason: str = ""
    exit_code: str | None = None
    log: str | None = None
    started: str | None = None
    ended: str | None = None

    @property
    def is_open(self) -> bool:
        """Submitted and not finished: the stages whose state a scheduler or an outcome record can still change."""
        return self.job_id is not None and not self.state.is_terminal


def exit_text(status: int, signal: int = 0) -> str:
    """A job's exit as Slurm prints it, `<status>:<signal>`: the one spelling the manifest and `status` use."""
    return f"{status}:{signal}"


@dataclass(frozen=True)
class Manifest:
    name: str
    run_dir: str
    config_hash: str
    scheduler: str
    created: str
    hyperjob_version: str
    stages: tuple[StageRecord, ...]
    local_pid: int | None = None  # the local executor: pid, host and start time (clock ticks), for liveness
    local_host: str | None = None
    local_start: int | None = None
    version: int = MANIFEST_VERSION

    def stage(self, name: str) -> StageRecord:
        for rec in self.stages:
            if rec.name == name:
                return rec
        raise KeyError(f"run has no stage {name!r}; its stages are {', '.join(s.name for s in self.stages)}")

    def with_stage(self, rec: StageRecord) -> Manifest:
        return replace(self, stages=tuple(rec if s.name == rec.name else s for s in self.stages))

    def to_json(self) -> str:
        data = asdict(self)
        for s in data["stages"]:
            s["state"] = s["state"].value
        return json.dumps(data, indent=2) + "\n"

    @staticmethod
    def from_json(text: str) -> Manifest:
        data: dict[str, Any] = json.loads(text)
        stages = tuple(StageRecord(**{**s, "state": StageState(s["state"])}) for s in data.pop("stages"))
        data.pop("notes", None)  # written by early versions, never used
        return Manifest(stages=stages, **data)


def read_manifest(run_dir: Path) -> Manifest:
    path = RunPaths(run_dir).manifest
    try:
        return Manifest.from_json(path.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"{run_dir} is not a hyperjob run directory (no manifest.json)") from None
    except (ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{path} is not a valid manifest: {e}") from None


def write_manifest(run_dir: Path, manifest: Manifest) -> None:
    atomic_write_text(RunPaths(run_dir).manifest, manifest.to_json())
