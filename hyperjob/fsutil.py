"""Atomic file and directory writes: a reader sees the old content or the new, never half of it.

Temp files and dirs get the modes the umask allows before they are renamed into place, so a shared
workdir stays readable by the other jobs of the group.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import stat
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any


def _aside(target: Path, tag: str) -> Path:
    return target.parent / f".{target.name}.{tag}-{uuid.uuid4().hex[:8]}"


def replace_dir(src: Path, target: Path) -> None:
    """Move a finished `src` directory to `target`; an old `target` is moved aside first and deleted after.

    At every instant either the old or the new directory sits at `target` (never neither, never a mix).
    """
    old: Path | None = None
    if target.exists() or target.is_symlink():
        old = _aside(target, "old")
        os.replace(target, old)
    try:
        os.replace(src, target)
    except BaseException:
        if old is not None:
            os.replace(old, target)
        raise
    if old is not None:
        if old.is_dir() and not old.is_symlink():
            shutil.rmtree(old, ignore_errors=True)
        else:
            old.unlink()


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def apply_umask(tree: Path) -> None:
    """Give a tree the modes the umask allows: temp dirs and some writers (safetensors) create 0600/0700
    entries, which other jobs of the group cannot read in a shared workdir."""
    mask = _umask()
    for path in [tree, *tree.rglob("*")] if tree.is_dir() else [tree]:
        mode = path.lstat().st_mode
        if stat.S_ISLNK(mode):
            continue
        want = (0o777 if stat.S_ISDIR(mode) or mode & stat.S_IXUSR else 0o666) & ~mask
        os.chmod(path, stat.S_IMODE(mode) | want)


@contextlib.contextmanager
def atomic_dir(target: Path) -> Iterator[Path]:
    """Yield a temp dir beside `target`; on success it replaces `target`, on error it is removed."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        yield tmp
        apply_umask(tmp)
        replace_dir(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    """Write a file via a temp file in the same directory and rename, so readers never see half of it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        apply_umask(Path(tmp))
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def write_json(path: Path, data: Any) -> None:
    atomic_write_text(path, json.dumps(data, indent=2, sort_keys=False) + "\n")
