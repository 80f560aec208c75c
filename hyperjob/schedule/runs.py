"""The runs of a workdir: every directory under `<workdir>/runs/`, newest first, with each stage's state.

`hyperjob runs` lists them, and a verb given something other than a run directory names the newest ones. A run
whose manifest cannot be read is listed with the reason instead of stopping the listing. `find_runs` only reads
manifests; `refreshed` asks the scheduler, as `status` does.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from datetime import datetime
from pathlib import Path
from types import MappingProxyType

from hyperjob.schedule.base import SchedulerError
from hyperjob.schedule.manifest import Manifest, read_manifest
from hyperjob.schedule.states import StageState

_S = StageState

# One letter per state for the compact strip; every StageState has its own (a test checks).
STATE_LETTERS = MappingProxyType(
    {
        _S.COMPLETED: "C",
        _S.RUNNING: "R",
        _S.PENDING: "P",
        _S.FAILED: "F",
        _S.CANCELLED: "X",
        _S.LOST: "L",
        _S.RENDERED: "-",
        _S.SUSPENDED: "S",
        _S.REQUEUED: "Q",
        _S.TIMEOUT: "T",
        _S.OUT_OF_MEMORY: "M",
        _S.NODE_FAIL: "N",
        _S.PREEMPTED: "E",
        _S.UNKNOWN: "?",
    }
)


def legend(states: Sequence[StageState] | None = None) -> str:
    """`C completed, R running, ...`: for the letters of `states`, or for every state."""
    return ", ".join(legend_entries(states))


def legend_entries(states: Sequence[StageState] | None = None) -> list[str]:
    wanted = set(STATE_LETTERS) if states is None else set(states)
    return [f"{STATE_LETTERS[s]} {_label(s)}" for s in STATE_LETTERS if s in wanted]


def _label(state: StageState) -> str:
    return "not submitted" if state is StageState.RENDERED else state.value.lower().replace("_", " ")


def short_names(names: Sequence[str]) -> dict[str, str]:
    """Each stage's shortest prefix that no other stage of the run shares: d, t, m, e; `com` and `con` for
    compile and consolidate. A name that is a prefix of another keeps its whole self."""
    out = {}
    for name in names:
        others = [n for n in names if n != name]
        size = next((k for k in range(1, len(name)) if not any(o.startswith(name[:k]) for o in others)), len(name))
        out[name] = name[:size]
    return out


def strip(manifest: Manifest) -> str:
    """`d:C t:R m:P e:P`: each stage's short name and state letter, in order."""
    short = short_names([r.name for r in manifest.stages])
    return " ".join(f"{short[r.name]}:{STATE_LETTERS[r.state]}" for r in manifest.stages)


@dataclass(frozen=True)
class RunEntry:
    """One directory under runs/: its manifest, or why it has none that can be read (`problem`)."""

    run_dir: Path
    manifest: Manifest | None
    problem: str | None = None
    note: str | None = None  # shown beside a readable run: e.g. the scheduler could not be asked

    @property
    def created(self) -> float:
        """Sort key: the manifest's creation time, else the directory's modification time."""
        if self.manifest is not None:
            try:
                return datetime.fromisoformat(self.manifest.created).timestamp()
            except ValueError:
                pass
        try:
            return self.run_dir.stat().st_mtime
        except OSError:
            return 0.0


def runs_root(workdir: Path) -> Path:
    return workdir / "runs"


def read_entry(run_dir: Path) -> RunEntry:
    """The run's manifest as last written (no scheduler asked), or the reason it cannot be read."""
    try:
        return RunEntry(run_dir, read_manifest(run_dir))
    except FileNotFoundError:
        return RunEntry(run_dir, None, "no manifest.json (not a run directory, or written by `hyperjob render`)")
    except (OSError, ValueError) as e:
        return RunEntry(run_dir, None, str(e))


def find_runs(workdir: Path) -> list[RunEntry]:
    """Every directory under `<workdir>/runs/`, newest first; hidden ones (a run being written) are skipped."""
    root = runs_root(workdir)
    try:
        dirs = [p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")]
    except (FileNotFoundError, NotADirectoryError):
        return []
    entries = [read_entry(p) for p in dirs]
    return sorted(entries, key=lambda e: (e.created, e.run_dir.name), reverse=True)


def refreshed(entry: RunEntry, refresh: Callable[[Path], Manifest]) -> RunEntry:
    """The entry with the scheduler's current view (`refresh`: hyperjob.schedule.run.refresh). A scheduler that
    cannot answer leaves the last recorded states, with a note; a manifest that breaks on the way is a problem."""
    if entry.manifest is None:
        return entry
    try:
        return replace(entry, manifest=refresh(entry.run_dir))
    except SchedulerError as e:
        return replace(entry, note=f"states as last recorded: {e}")
    except (OSError, ValueError) as e:  # unknown scheduler name, a manifest replaced meanwhile by garbage
        return RunEntry(entry.run_dir, None, str(e))
