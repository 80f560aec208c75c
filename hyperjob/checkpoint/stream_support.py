"""Plumbing of the streaming merge: atomically swapped staging dir, durable small files, progress, readahead.

Crash story: everything is written into `.NAME.<id>.partial` beside the target and fsynced; the finished dir is
swapped in with one renameat2(RENAME_EXCHANGE), so `NAME` is at every instant either the previous complete
output or the new one. A run killed with -9 leaves only its `.partial` dir, whose flock the kernel drops; the
next run deletes such stale dirs and leaves alone those still locked by a live run.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import glob
import os
import shutil
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from hyperjob.checkpoint.safetensors_io import SafetensorsReader

ProgressFn = Callable[[int, int], None]
PLAIN_EVERY_S = 10.0


class ByteProgress:
    """Thread-safe byte counter shown as a rich bar (TTY), plain stderr lines (logs), or passed to a callback."""

    def __init__(self, mode: bool | ProgressFn, total: int, label: str) -> None:
        self.mode, self.total, self.label, self.done = mode, total, label, 0
        self.lock, self.t0 = threading.Lock(), time.monotonic()
        self.last = self.t0
        self.bar: Any = None
        if mode is True and sys.stderr.isatty():
            from rich.console import Console
            from rich.progress import (
                BarColumn,
                DownloadColumn,
                Progress,
                TextColumn,
                TimeRemainingColumn,
                TransferSpeedColumn,
            )

            columns = (TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TransferSpeedColumn())
            self.bar = Progress(*columns, TimeRemainingColumn(), console=Console(stderr=True))
            self.task = self.bar.add_task(label, total=total)
            self.bar.start()

    def _line(self, now: float) -> None:
        rate = self.done / max(now - self.t0, 1e-9)
        pct = 100 * self.done / max(self.total, 1)
        done, total = self.done / 1e9, self.total / 1e9
        print(
            f"{self.label}: {done:.2f}/{total:.2f} GB ({pct:.0f}%), {rate / 1e6:.0f} MB/s", file=sys.stderr, flush=True
        )

    def advance(self, n: int) -> None:
        with self.lock:
            self.done += n
            if callable(self.mode):
                self.mode(self.done, self.total)
            elif self.bar is not None:
                self.bar.update(self.task, completed=self.done)
            elif self.mode and (now := time.monotonic()) - self.last >= PLAIN_EVERY_S:
                self.last = now
                self._line(now)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()
        elif self.mode is True:
            self._line(time.monotonic())


def write_durable(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _lock_dir(path: Path) -> int | None:
    """flock a staging dir (the kernel drops it if we are killed); None when a live run holds it."""
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


@contextlib.contextmanager
def staging_dir(target: Path) -> Iterator[Path]:
    """Yield `.NAME.<id>.partial` beside `target`; on success swap it in (old output deleted after), else remove it.

    Stale `.NAME.*.partial` dirs of killed runs are removed first; a live run's dir is kept (it holds a flock).
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    for stale in glob.glob(os.path.join(glob.escape(str(target.parent)), f".{glob.escape(target.name)}.*.partial")):
        if (fd := _lock_dir(Path(stale))) is not None:
            shutil.rmtree(stale, ignore_errors=True)
            os.close(fd)
    tmp = target.parent / f".{target.name}.{uuid.uuid4().hex[:12]}.partial"
    tmp.mkdir()
    lock = _lock_dir(tmp)
    try:
        yield tmp
        fsync_dir(tmp)
        if not os.path.lexists(target):
            os.rename(tmp, target)
        elif _exchange(tmp, target):  # target is the new output at every instant; tmp now holds the old one
            shutil.rmtree(tmp, ignore_errors=True)
        else:  # a kill -9 between these two renames leaves no output; the old one sits in a .partial dir
            aside = target.parent / f".{target.name}.{uuid.uuid4().hex[:12]}.old.partial"
            os.rename(target, aside)
            os.rename(tmp, target)
            shutil.rmtree(aside, ignore_errors=True)
        fsync_dir(target.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        if lock is not None:
            os.close(lock)


class Readahead(threading.Thread):
    """Keeps the kernel reading up to `ahead` bytes ahead of the workers, so disk reads overlap compute.

    WILLNEED fills the page cache, which is not our RSS; workers then find their bytes there. Threads reading
    one fd out of order would otherwise defeat the kernel's own sequential readahead.
    """

    def __init__(self, reads: list[tuple[SafetensorsReader, int, int]], ahead: int, step: int) -> None:
        """`reads`: (file, offset, length) in the order the workers will consume them."""
        super().__init__(name="merge-readahead", daemon=True)
        self.ahead = ahead
        self.ranges: list[tuple[SafetensorsReader, int, int, int]] = []  # reader, offset, length, bytes before it
        before = 0
        for src, off, n in reads:
            last = self.ranges[-1] if self.ranges else None
            if last and last[0] is src and last[1] + last[2] == off and last[2] + n <= step:
                self.ranges[-1] = (src, last[1], last[2] + n, last[3])
            else:
                self.ranges.append((src, off, n, before))
            before += n
        self.consumed, self.stopped, self.cond = 0, False, threading.Condition()

    def run(self) -> None:
        for src, off, n, before in self.ranges:
            with self.cond:
                self.cond.wait_for(lambda b=before: self.stopped or b - self.consumed < self.ahead)  # type: ignore[misc]
                if self.stopped:
                    return
            src.advise(off, n)

    def advance(self, n: int) -> None:
        """The workers consumed n more bytes of `reads`."""
        with self.cond:
            self.consumed += n
            self.cond.notify()

    def stop(self) -> None:
        with self.cond:
            self.stopped = True
            self.cond.notify()
