"""Human-readable reports on a run: the status table and the end-of-run summary."""

from __future__ import annotations

import json
import os
import shlex
import sys
from pathlib import Path
from typing import Any, TextIO

from hyperjob import stage_table
from hyperjob.cli.common import table
from hyperjob.config.load import ConfigError, load_resolved
from hyperjob.paths import RunPaths
from hyperjob.schedule.errors import error_line, read_log_tail
from hyperjob.schedule.manifest import Manifest, StageRecord
from hyperjob.schedule.states import StageState
from hyperjob.stages.curves import CURVES_CSV, CURVES_PNG
from hyperjob.stages.evaluate import TINY_NOTE
from hyperjob.stages.needle import NEEDLE_JSON, accuracy_grid, skip_reasons

# Shown only when the log has no error line: enough to see how it ended, short enough not to bury the rest.
TAIL_LINES = 5


HEADER = ("#", "stage", "job", "state", "exit", "reason", "log")
STATE_COLUMN = HEADER.index("state")
# ANSI SGR codes: green done, red failed, yellow going, blue waiting, magenta cancelled; others stay plain.
GREEN, RED, YELLOW, BLUE, MAGENTA = "32", "1;31", "33", "34", "35"
_S = StageState
STATE_COLOURS = {
    _S.COMPLETED: GREEN, _S.RUNNING: YELLOW, _S.REQUEUED: YELLOW, _S.SUSPENDED: YELLOW, _S.PENDING: BLUE,
    _S.CANCELLED: MAGENTA, _S.FAILED: RED, _S.TIMEOUT: RED, _S.OUT_OF_MEMORY: RED, _S.NODE_FAIL: RED,
    _S.PREEMPTED: RED, _S.LOST: RED,
}  # fmt: skip


def colour_enabled(stream: TextIO | None = None) -> bool:
    """Colour only for a person at a terminal: never under a pipe or in a file, never with NO_COLOR set
    (no-color.org) or TERM=dumb; FORCE_COLOR set forces it (CI logs that render ANSI)."""
    if os.environ.get("NO_COLOR"):
        return False
    if os.environ.get("FORCE_COLOR"):
        return True
    stream = sys.stdout if stream is None else stream
    isatty = getattr(stream, "isatty", None)
    return os.environ.get("TERM") != "dumb" and callable(isatty) and bool(isatty())


def paint(text: str, code: str | None, colour: bool) -> str:
    return f"\x1b[{code}m{text}\x1b[0m" if colour and code else text


def status_table(manifest: Manifest, colour: bool | None = None) -> str:
    """One row per stage; the state cell coloured when `colour` (None: when stdout is a terminal, see
    `colour_enabled`). The colour codes are added after padding, so the columns line up either way."""
    rows = []
    for r in manifest.stages:
        reason = r.reason if r.reason and r.reason != "None" else ""
        code = r.exit_code or "-"
        rows.append((f"{r.index:02d}", r.name, r.job_id or "-", r.state.value, code, reason, r.log or "-"))
    text = table(rows, HEADER)
    if not (colour_enabled() if colour is None else colour):
        return text
    start = sum(max(len(row[i]) for row in [HEADER, *rows]) + 2 for i in range(STATE_COLUMN))
    lines = text.split("\n")
    for n, rec in enumerate(manifest.stages, start=1):
        line, end = lines[n], start + len(rec.state.value)
        lines[n] = line[:start] + paint(line[start:end], STATE_COLOURS.get(rec.state), True) + line[end:]
    return "\n".join(lines)


def curves_line(run_dir: Path) -> str | None:
    """Where the training curves are, once the train stage has written them (it rewrites them as it goes)."""
    png = run_dir / CURVES_PNG
    if not png.is_file():
        return None
    return f"{'training curves:':<20}{png} (numbers: {run_dir / CURVES_CSV})"


def is_tiny_run(run_dir: Path) -> bool:
    """The run trains the random-weight tiny-llama (its answers are noise by design); False if unreadable."""
    try:
        return load_resolved(RunPaths(run_dir).config).model.is_tiny
    except (ConfigError, OSError, ValueError):
        return False


def _extras(run_dir: Path) -> list[str]:
    """What the stage table's outputs leave out: the curves, the readable answers, and the tiny model's caveat."""
    readable = RunPaths(run_dir).evaluation / "answers.md"
    lines = [line for line in (curves_line(run_dir),) if line]
    if readable.is_file():
        lines.append(f"{'readable answers:':<20}{readable}")
        if is_tiny_run(run_dir):
            lines.append(f"note: {TINY_NOTE}")
    return lines


def failed_stages(manifest: Manifest) -> list[StageRecord]:
    """Stages that ended without success on their own: not those still going, not cancelled ones."""
    return [
        r
        for r in manifest.stages
        if r.state.is_terminal and not r.state.is_success and r.state is not StageState.CANCELLED
    ]


def stage_error(rec: StageRecord) -> str | None:
    """The line of the stage's log that says why it failed (read at display time; the manifest keeps no copy)."""
    return error_line(read_log_tail(Path(rec.log))) if rec.log else None


def _how(rec: StageRecord) -> str:
    """`exit 1`, `TIMEOUT, killed by signal 15`: the state only where it says more than `failed`."""
    words = [] if rec.state is StageState.FAILED else [rec.state.value]
    if rec.exit_code:
        status, _, signal = rec.exit_code.partition(":")
        words.append(f"killed by signal {signal}" if signal not in ("", "0") else f"exit {status}")
    return ", ".join(words) or "no exit code"


def failure_report(manifest: Manifest, tail_lines: int = 0) -> list[str]:
    """Per failed stage its error line and log, the stages cancelled after it, and how to resume; [] if none.

    `tail_lines`: when a log has no error line, show its last lines instead (the end-of-run summary does).
    """
    failed = failed_stages(manifest)
    if not failed:
        return []
    out = []
    for rec in failed:
        error = stage_error(rec)
        reason = rec.reason if rec.reason and rec.reason != "None" else ""
        out.append(f"stage {rec.name} failed ({_how(rec)}): {error or reason or 'its log names no error'}")
        out.append(f"log: {rec.log or '(none)'}")
        if error is None and tail_lines and rec.log:
            lines = read_log_tail(Path(rec.log)).splitlines()[-tail_lines:]
            out.extend(f"  | {line}" for line in lines)
    first = min(r.index for r in failed)
    cancelled = [r.name for r in manifest.stages if r.state is StageState.CANCELLED and r.index > first]
    if cancelled:
        out.append(
            f"cancelled: {', '.join(cancelled)} (a stage before {'it' if len(cancelled) == 1 else 'them'} failed)"
        )
    out.append(f"resume with: hyperjob resume {shlex.quote(manifest.run_dir)}")
    return out


def read_needle(run_dir: Path) -> dict[str, Any] | None:
    """The run's needle-in-a-haystack results (evaluate with `evaluate.needle` set); None if absent or unreadable."""
    try:
        data = json.loads((RunPaths(run_dir).evaluation / NEEDLE_JSON).read_text(encoding="utf-8"))
        accuracy_grid(data)  # status must not crash on a file it cannot show
        skip_reasons(data)
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None
    return data if isinstance(data, dict) else None


def needle_report(data: dict[str, Any]) -> list[str]:
    """The accuracy table (rows: depths, columns: context lengths) and why any length was skipped."""
    header, rows = accuracy_grid(data)
    return ["needle in a haystack: accuracy by depth and context length (tokens)", table(rows, header)] + [
        f"  {line}" for line in skip_reasons(data)
    ]


def print_outcome(run_dir: Path, manifest: Manifest) -> bool:
    """Print the final table; on success where the results are, on failure why (see `failure_report`)."""
    colour = colour_enabled()
    print(status_table(manifest, colour))
    report = failure_report(manifest, tail_lines=TAIL_LINES)
    if report:
        first = failed_stages(manifest)[0]
        print("\n" + paint(f"run failed at stage {first.name} ({first.state.value})", RED, colour))
        print("\n".join(report))
        if (curves := curves_line(run_dir)) is not None:
            print(curves)  # a diverged or stalled training shows there
        return False
    if any(not r.state.is_success for r in manifest.stages):
        stopped = [f"{r.name} ({r.state.value})" for r in manifest.stages if not r.state.is_success]
        print(f"\nrun did not complete: {', '.join(stopped)}")
        print(f"resume with: hyperjob resume {shlex.quote(manifest.run_dir)}")
        return False
    paths = RunPaths(run_dir)
    print("\n" + paint("run completed:", GREEN, colour) + f" {run_dir}")
    shown: set[str] = set()
    specs = {row.name: row for row in stage_table.all_stages()}
    for rec in manifest.stages:
        for out in specs[rec.name].produces if rec.name in specs else ():
            if out.label in shown:
                continue
            shown.add(out.label)
            path = out.path(paths)
            if out.optional and not path.exists():
                continue
            print(f"{out.label + ':':<20}{path}")
            for line in out.preview(path) if out.preview else []:
                print(line)
    for line in _extras(run_dir):
        print(line)
    return True
