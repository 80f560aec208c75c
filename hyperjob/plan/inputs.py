"""Checks of the local inputs that `plan` can reach, so a bad dataset fails before queueing, not 30 s into training.

The rows are judged by the train stage's own validator (`hyperjob.stages.data.validate_row`), so plan and train
cannot disagree on what a row of a format needs. The planner sits below the stages (the train entry imports it),
so the CLI hands the validator in as `RowProblem` instead of this module importing the stages.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, get_args

from hyperjob.config.load import ConfigError
from hyperjob.config.models import DatasetFormat, DatasetSection

# Rows of a local dataset file checked at plan time: enough to catch a wrong `dataset.format` or a file of another
# shape, few enough that plan stays instant on a multi-GB file (train still checks every row).
SAMPLE_ROWS = 20

# (row, format, where) -> None when the row fits the format, else one line naming `where` and the field.
RowProblem = Callable[[Any, DatasetFormat, str], str | None]


def _sample(path: Path, limit: int) -> Iterator[tuple[str, Any]]:
    """(`file:line`, parsed JSON) of the first `limit` non-blank lines; ConfigError on unreadable or invalid text."""
    seen = 0
    try:
        with path.open("rb") as f:
            for lineno, raw in enumerate(f, start=1):
                if seen >= limit:
                    return
                where = f"{path}:{lineno}"
                try:
                    line = raw.decode("utf-8").rstrip("\r\n")
                except UnicodeDecodeError as e:
                    msg = f"{where}: not UTF-8 text ({e.reason} at byte {e.start} of the line)"
                    raise ConfigError([("dataset.path", msg)]) from None
                if not line.strip():
                    continue
                seen += 1
                try:
                    yield where, json.loads(line)
                except json.JSONDecodeError as e:
                    msg = f"{where}: invalid JSON: {e.msg} (column {e.colno}); each line must be one JSON object"
                    raise ConfigError([("dataset.path", msg)]) from None
    except OSError as e:
        raise ConfigError([("dataset.path", f"cannot read {path}: {e.strerror}")]) from None
    if not seen:
        raise ConfigError([("dataset.path", f"{path}: no rows (the train stage needs at least one JSON line)")])


def _fitting_formats(row: Any, problem: RowProblem, wrong: DatasetFormat) -> list[str]:
    """The other formats this row does fit: the likely fix for a wrong `dataset.format`."""
    return [fmt for fmt in get_args(DatasetFormat) if fmt != wrong and problem(row, fmt, "") is None]


def _hint(row: Any, problem: RowProblem, fmt: DatasetFormat) -> str:
    keys = f"the row's keys: {', '.join(sorted(map(str, row)))}" if isinstance(row, dict) else ""
    fits = _fitting_formats(row, problem, fmt)
    fit = f"it fits dataset.format {' or '.join(repr(f) for f in fits)}" if fits else ""
    return "; ".join(part for part in (keys, fit) if part)


def check_dataset_sample(dataset: DatasetSection, problem: RowProblem, limit: int = SAMPLE_ROWS) -> None:
    """Raise ConfigError naming `file:line` and the field when one of the first `limit` rows of a local dataset
    does not fit `dataset.format`. Hub datasets and missing files pass: nothing local to read (a missing
    `dataset.path` is `check_local_inputs`' error)."""
    path = dataset.path
    if path is None or not path.is_file():
        return
    for where, row in _sample(path, limit):
        found = problem(row, dataset.format, where)
        if found is None:
            continue
        hint = _hint(row, problem, dataset.format)
        msg = f"{dataset.format!r} does not fit {found}" + (f" ({hint})" if hint else "")
        raise ConfigError([("dataset.format", msg)])
