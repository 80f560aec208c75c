"""Proof that a stage completed and still stands: a marker written when it succeeds, checked before it is redone.

A stage that exits 0 leaves `outcomes/<stage>.done.json`: the config values its result depends on (the stage
table's `config_keys`), a digest of its outputs (each file's path, size and modification time: a changed, truncated
or deleted output shows, and checking an 8B model costs a directory walk, not a read), and the digest of the
previous stage's marker (a redone upstream stage invalidates everything after it). `hyperjob resume` keeps a
completed stage only when its marker still holds; a stage started again on outputs that still hold says so and
does nothing. Pure apart from the small readers and the writer at the bottom.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hyperjob import backends
from hyperjob.config.models import HyperjobConfig
from hyperjob.fsutil import write_json
from hyperjob.paths import RunPaths
from hyperjob.stage_table import resolve_stages, spec

MARKER_VERSION = 1
_MISSING = "<absent>"


def marker_path(paths: RunPaths, stage: str) -> Path:
    return paths.outcomes / f"{stage}.done.json"


def _leaves(prefix: str, value: Any) -> dict[str, Any]:
    if isinstance(value, dict) and value:
        return {k: v for name, sub in value.items() for k, v in _leaves(f"{prefix}.{name}", sub).items()}
    return {prefix: value}


def config_values(cfg: HyperjobConfig, keys: Sequence[str]) -> dict[str, Any]:
    """The values under dotted `keys` in the config, one entry per leaf key (so a change names `training.lr`, not
    the whole section), as JSON data; a missing key reads as `<absent>`."""
    data = cfg.model_dump(mode="json")
    out: dict[str, Any] = {}
    for key in keys:
        value: Any = data
        for part in key.split("."):
            value = value.get(part, _MISSING) if isinstance(value, dict) else _MISSING
        out |= _leaves(key, value)
    return out


def tree_digest(path: Path) -> str | None:
    """sha256 over (relative path, size, mtime_ns) of every file under `path` (or of the file itself); None: absent."""
    if not path.exists():
        return None
    h = hashlib.sha256()
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    for f in files:
        st = f.stat()
        rel = "." if f == path else f.relative_to(path).as_posix()
        h.update(f"{rel}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def previous_stage(cfg: HyperjobConfig, stage: str) -> str | None:
    """The stage before `stage` in this config's run (the DAG is a chain)."""
    stages = resolve_stages(cfg.stages, cfg.backend, backends.get(cfg.backend).default_stages)
    if stage not in stages:
        return None
    i = stages.index(stage)
    return stages[i - 1] if i > 0 else None


def _file_digest(path: Path) -> str | None:
    try:
        return hashlib.sha256(path.read_bytes()).hexdigest()
    except OSError:
        return None


def make_marker(paths: RunPaths, cfg: HyperjobConfig, stage: str) -> dict[str, Any]:
    """What `write_marker` records for `stage` now."""
    row = spec(stage)
    before = previous_stage(cfg, stage)
    outputs = {str(p): tree_digest(p) for p in row.outputs(paths, cfg)}
    return {
        "version": MARKER_VERSION,
        "stage": stage,
        "config": config_values(cfg, row.config_keys),
        "outputs": {k: v for k, v in outputs.items() if v is not None},
        "after": before,
        "after_marker": _file_digest(marker_path(paths, before)) if before else None,
    }


@dataclass(frozen=True)
class MarkerCheck:
    """Whether a completed stage still stands. `changed_keys`: config keys whose value differs (old, new)."""

    ok: bool
    why: str
    changed_keys: Mapping[str, tuple[Any, Any]]


def check_marker(paths: RunPaths, cfg: HyperjobConfig, stage: str) -> MarkerCheck:
    """Compare the stage's marker with the config and outputs as they are now."""
    try:
        old = json.loads(marker_path(paths, stage).read_text())
    except FileNotFoundError:
        return MarkerCheck(False, "no completion marker", {})
    except (OSError, ValueError) as e:
        return MarkerCheck(False, f"unreadable completion marker ({e})", {})
    now = make_marker(paths, cfg, stage)
    before = old.get("config", {})
    changed = {
        k: (before.get(k, _MISSING), now["config"].get(k, _MISSING))
        for k in sorted(set(before) | set(now["config"]))
        if before.get(k, _MISSING) != now["config"].get(k, _MISSING)
    }
    if changed:
        return MarkerCheck(False, f"config changed: {', '.join(changed)}", changed)
    for path, digest in old.get("outputs", {}).items():
        if now["outputs"].get(path) != digest:
            state = "is gone" if path not in now["outputs"] else "changed"
            return MarkerCheck(False, f"output {path} {state} since the stage completed", {})
    if (old.get("after"), old.get("after_marker")) != (now["after"], now["after_marker"]):
        return MarkerCheck(False, f"stage {now['after']} was redone since", {})
    return MarkerCheck(True, "outputs unchanged since it completed", {})


def write_marker(paths: RunPaths, cfg: HyperjobConfig, stage: str) -> None:
    """Called by a stage entry after it succeeded (rank 0 only), atomically."""
    paths.outcomes.mkdir(parents=True, exist_ok=True)
    write_json(marker_path(paths, stage), make_marker(paths, cfg, stage))


def drop_marker(paths: RunPaths, stage: str) -> None:
    """A stage about to be redone no longer stands."""
    with contextlib.suppress(FileNotFoundError):
        os.unlink(marker_path(paths, stage))
