"""Atomic file and directory writes: a reader sees the old content or the new, never half of it.

Temp files and dirs get the modes the umask allows before they are renamed into place, so a shared
workdir stays readable by the other jobs of the group.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import glob
import json
import os
import shutil
import stat
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _lock_dir(path: Path) -> int | None:
    """flock a staging dir (the kernel drops it if we are killed); None when a live process holds it."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        return None
    return fd


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two paths with renameat2(RENAME_EXCHANGE); False where the OS or filesystem cannot."""
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if fn(-100, os.fsencode(a), -100, os.fsencode(b), 2) == 0:  # AT_FDCWD, RENAME_EXCHANGE
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(b))


def _partial(target: Path, tag: str = "") -> Path:
    return target.parent / f".{target.name}.{uuid.uuid4().hex[:12]}{tag}.partial"


def replace_dir(src: Path, target: Path) -> None:
    """Move a finished `src` directory to `target`, replacing an old one.

    Where the filesystem can swap atomically, `target` is the old or the new directory at every instant; else
    the old one is renamed aside first (a kill between the two renames leaves it in a `.partial` dir).
    """
    if not os.path.lexists(target):
        os.rename(src, target)
    elif _exchange(src, target):  # src now holds the old output
        shutil.rmtree(src, ignore_errors=True)
    else:
        aside = _partial(target, ".old")
        os.rename(target, aside)
        try:
            os.rename(src, target)
        except BaseException:
            os.rename(aside, target)
            raise
        shutil.rmtree(aside, ignore_errors=True)
    fsync_dir(target.parent)


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
    """Yield `.NAME.<id>.partial` beside `target`; on success it replaces `target`, on error it is removed.

    Stale `.NAME.*.partial` dirs of killed runs are removed first; a live run's dir is kept (it holds a flock).
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    for stale in glob.glob(os.path.join(glob.escape(str(target.parent)), f".{glob.escape(target.name)}.*.partial")):
        if (fd := _lock_dir(Path(stale))) is not None:
            shutil.rmtree(stale, ignore_errors=True)
            os.close(fd)
    tmp = _partial(target)
    tmp.mkdir()
    lock = _lock_dir(tmp)
    try:
        yield tmp
        apply_umask(tmp)
        fsync_dir(tmp)
        replace_dir(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        if lock is not None:
            os.close(lock)


def atomic_write_text(path: Path, text: str) -> None:
    """Write a file via a temp file in the same directory and rename, so readers never see half of it."""
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """As atomic_write_text, for bytes (a PNG a viewer may reload at any moment)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
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
