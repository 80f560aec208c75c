"""`hyperjob runs`: the runs of a workdir, newest first; and the check that a verb was given a run directory.

A run directory's name carries a timestamp nobody remembers, so `runs` lists them, and status, logs and cancel,
given a config file or a workdir instead, name the newest ones rather than failing on a path.
"""

from __future__ import annotations

import argparse
import json
from datetime import datetime
from pathlib import Path
from typing import Any

from hyperjob.cli.common import CliError, table
from hyperjob.paths import RunPaths
from hyperjob.schedule.runs import (
    STATE_LETTERS,
    RunEntry,
    find_runs,
    legend,
    legend_entries,
    refreshed,
    runs_root,
    strip,
)

DEFAULT_CONFIG = Path("hyperjob.yaml")
DEFAULT_LIMIT = 20
HINT_RUNS = 5  # runs named when a verb was given a config or a workdir instead of a run
RUN_DIR_SHAPE = "<workdir>/runs/<name>-<timestamp>/"

_ENTRIES = legend_entries()
LEGEND = "\n".join("  " + ", ".join(_ENTRIES[i : i + 5]) for i in range(0, len(_ENTRIES), 5))
DESCRIPTION = f"""\
List the runs under <workdir>/runs/, newest first: name, creation time, scheduler, each stage's state, run
directory. WORKDIR|CONFIG is a workdir or a config file (its workdir); without it, ./{DEFAULT_CONFIG}.
States are refreshed from the scheduler as `status` does; a run whose manifest cannot be read is listed as
UNREADABLE with the reason.

The stages column shows each stage by its shortest unambiguous prefix (d download, t train, com compile, con
consolidate, ...) and its state as one letter:
{LEGEND}"""


def add_parsers(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "runs",
        help="list the runs of a workdir, newest first",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n  hyperjob runs examples/tiny-cpu.yaml\n  hyperjob runs /fsx/hyperjob --limit 0 --json",
    )
    p.add_argument("target", type=Path, nargs="?", metavar="WORKDIR|CONFIG", help=f"default: ./{DEFAULT_CONFIG}")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    limit = f"newest N runs (default {DEFAULT_LIMIT}; 0: all)"
    p.add_argument("--limit", type=_count, default=DEFAULT_LIMIT, metavar="N", help=limit)
    p.set_defaults(func=cmd_runs)


def _count(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number >= 0")
    return value


def cmd_runs(args: argparse.Namespace) -> int:
    from hyperjob.schedule.run import refresh

    workdir = workdir_of(args.target)
    entries = find_runs(workdir)
    shown = entries[: args.limit] if args.limit else entries
    shown = [refreshed(e, refresh) for e in shown]
    hidden = len(entries) - len(shown)
    if args.json:
        data = {"workdir": str(workdir), "runs": [entry_json(e) for e in shown], "not_shown": hidden}
        print(json.dumps(data, indent=2))
        return 0
    if not entries:
        print(f"no runs under {runs_root(workdir)}")
        return 0
    print(f"runs under {runs_root(workdir)}, newest first:")
    print(runs_table(shown))
    for line in footnotes(shown):
        print(line)
    if hidden:
        print(f"({hidden} older run{'s' if hidden > 1 else ''} not shown: --limit 0 shows all)")
    return 0


def workdir_of(target: Path | None) -> Path:
    """The workdir to list: TARGET itself, the workdir of a config file, or that of ./hyperjob.yaml."""
    from hyperjob.config.load import ConfigError, load_config  # pydantic: only when a config is given

    if target is None:
        if not DEFAULT_CONFIG.is_file():
            raise CliError(
                f"no ./{DEFAULT_CONFIG} here: pass a workdir or a config file (hyperjob runs WORKDIR|CONFIG)"
            )
        target = DEFAULT_CONFIG
    if target.is_file():
        try:
            return load_config(target, check_inputs=False).workdir
        except ConfigError as e:
            raise CliError("\n".join(e.lines())) from None
    if not target.is_dir():
        raise CliError(f"{target}: no such file or directory (expected a workdir or a config file)")
    if RunPaths(target).manifest.is_file():
        raise CliError(f"{target} is a run directory, not a workdir: see `hyperjob status {target}`")
    if target.name == "runs" and not runs_root(target).is_dir():
        return target.parent  # the runs/ folder itself
    return target


def created_text(entry: RunEntry) -> str:
    """The manifest's creation time in local time (as in run directory names), or `-`."""
    if entry.manifest is None:
        return "-"
    try:
        return datetime.fromisoformat(entry.manifest.created).astimezone().strftime("%Y-%m-%d %H:%M:%S")
    except ValueError:
        return entry.manifest.created


def runs_table(entries: list[RunEntry]) -> str:
    rows = []
    for e in entries:
        m = e.manifest
        name, sched, stages = (m.name, m.scheduler, strip(m)) if m else (e.run_dir.name, "-", "UNREADABLE")
        rows.append((name, created_text(e), sched, stages + (" *" if e.note else ""), str(e.run_dir)))
    return table(rows, ("name", "created", "scheduler", "stages", "run dir"))


def footnotes(entries: list[RunEntry]) -> list[str]:
    """The legend of the letters shown, then why each unreadable run is, and each note (`*`)."""
    states = [r.state for e in entries if e.manifest for r in e.manifest.stages]
    lines = [f"states: {legend(states)}"] if states else []
    lines += [f"UNREADABLE {e.run_dir}: {e.problem}" for e in entries if e.problem]
    lines += [f"* {e.run_dir}: {e.note}" for e in entries if e.note]
    return lines


def entry_json(entry: RunEntry) -> dict[str, Any]:
    m = entry.manifest
    return {
        "name": m.name if m else None,
        "run_dir": str(entry.run_dir),
        "created": m.created if m else None,
        "scheduler": m.scheduler if m else None,
        "stages": [{"name": r.name, "state": r.state.value, "letter": STATE_LETTERS[r.state]} for r in m.stages]
        if m
        else None,
        "strip": strip(m) if m else None,
        "readable": m is not None,
        "problem": entry.problem,
        "note": entry.note,
    }


def require_run_dir(path: Path, verb: str) -> Path:
    """`path`, resolved, when it is a run directory (it holds manifest.json); otherwise a CliError that says what
    it is instead and, for a config file or a workdir, names the newest runs to pass."""
    if RunPaths(path).manifest.is_file():
        return path.resolve()
    wants = f"`hyperjob {verb}` wants a run directory ({RUN_DIR_SHAPE})"
    if not path.exists():
        raise CliError(f"{path}: no such file or directory; {wants}")
    if path.is_file():
        raise CliError(_file_instead(path, wants))
    workdir = path if runs_root(path).is_dir() else path.parent if path.name == "runs" else None
    if workdir is None:
        raise CliError(f"{path} is not a run directory (no manifest.json); {wants}")
    lines = _newest(f"{path} holds runs but is not one; {wants}", workdir, f"hyperjob runs {workdir}")
    raise CliError("\n".join(lines))


def _file_instead(path: Path, wants: str) -> str:
    """A config file names its workdir's newest runs; any other file is just not a run directory."""
    from hyperjob.config.load import ConfigError, load_config

    try:
        workdir = load_config(path, check_inputs=False).workdir
    except (ConfigError, OSError):
        return f"{path} is a file, not a run directory; {wants}"
    lines = _newest(f"{path} is a config file; {wants}", workdir, f"hyperjob runs {path}", f"hyperjob submit {path}")
    return "\n".join(lines)


def _newest(first: str, workdir: Path, see_all: str, start: str | None = None) -> list[str]:
    """`first`, then the workdir's newest runs (as last recorded: an error path asks no scheduler)."""
    entries = find_runs(workdir)
    if not entries:
        return [f"{first}; {runs_root(workdir)} holds no runs yet" + (f" (start one: {start})" if start else "")]
    lines = [f"{first}; the newest under {runs_root(workdir)}:"]
    for e in entries[:HINT_RUNS]:
        what = f"{created_text(e)}, {strip(e.manifest)}" if e.manifest else "unreadable"
        lines.append(f"  {e.run_dir}  ({what})")
    if len(entries) > HINT_RUNS:
        lines.append(f"  ... {len(entries) - HINT_RUNS} more: {see_all}")
    return lines
