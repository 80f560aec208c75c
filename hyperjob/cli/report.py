"""Human-readable reports on a run: the status table and the end-of-run summary."""

from __future__ import annotations

from pathlib import Path

from hyperjob import stage_table
from hyperjob.cli.common import table
from hyperjob.paths import RunPaths
from hyperjob.schedule.manifest import Manifest
from hyperjob.schedule.states import StageState

TAIL_LINES = 20


def status_table(manifest: Manifest) -> str:
    rows = []
    for r in manifest.stages:
        reason = r.reason if r.reason and r.reason != "None" else ""
        code = r.exit_code or "-"
        rows.append((f"{r.index:02d}", r.name, r.job_id or "-", r.state.value, code, reason, r.log or "-"))
    return table(rows, ("#", "stage", "job", "state", "exit", "reason", "log"))


def tail(path: Path, n: int = TAIL_LINES) -> list[str]:
    try:
        return path.read_text(errors="replace").splitlines()[-n:]
    except OSError:
        return []


def print_outcome(run_dir: Path, manifest: Manifest) -> bool:
    """Print the final table; on success where the results are, on failure the failing log's tail."""
    print(status_table(manifest))
    failed = [r for r in manifest.stages if r.state is not StageState.COMPLETED]
    if failed:
        first = next((r for r in failed if r.state is not StageState.CANCELLED), failed[0])
        print(f"\nrun failed at stage {first.name} ({first.state.value})")
        if first.log:
            print(f"last lines of {first.log}:")
            for line in tail(Path(first.log)):
                print(f"  | {line}")
        return False
    paths = RunPaths(run_dir)
    print(f"\nrun completed: {run_dir}")
    shown: set[str] = set()
    specs = {row.name: row for row in stage_table.all_stages()}
    for rec in manifest.stages:
        for out in specs[rec.name].produces if rec.name in specs else ():
            if out.label in shown:
                continue
            shown.add(out.label)
            path = out.path(paths)
            print(f"{out.label + ':':<20}{path}")
            for line in out.preview(path) if out.preview else []:
                print(line)
    return True
