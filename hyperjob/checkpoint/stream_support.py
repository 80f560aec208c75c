"""Plumbing of the streaming merge: byte progress, disk readahead and the base prefetch.

Crash story (fsutil.atomic_dir): everything is written into `.NAME.<id>.partial` beside the target and fsynced
(BlockFile.close, hf_layout's durable writes); the finished dir is swapped in with one
renameat2(RENAME_EXCHANGE), so `NAME` is at every instant either the previous complete output or the new one. A run
killed with -9 leaves only its `.partial` dir, whose flock the kernel drops; the next run deletes such stale dirs
and leaves alone those still locked by a live run.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from hyperjob.checkpoint.safetensors_io import SafetensorsReader

ProgressFn = Callable[[int, int], None]
PLAIN_EVERY_S = 10.0


def merge_label(adapter_dir: Path, base_dir: Path) -> str:
    """What a merge's progress line is about: `merge adapter into tiny-llama`, `merge adapter checkpoint-8 into
    meta-llama--Meta-Llama-3-8B` (the output dir's name, `merged`, said nothing)."""
    adapter = "adapter" if adapter_dir.name in ("adapter", "") else f"adapter {adapter_dir.name}"
    return f"merge {adapter} into {base_dir.name or base_dir}"


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
        scale, unit = (1e9, "GB") if self.total >= 1e9 else (1e6, "MB")
        done, total = self.done / scale, self.total / scale
        print(
            f"{self.label}: {done:.2f}/{total:.2f} {unit} ({pct:.0f}%), {rate / 1e6:.0f} MB/s",
            file=sys.stderr,
            flush=True,
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


def available_memory() -> int:
    """MemAvailable from /proc/meminfo (what can be cached without pushing anything out); 0 where unknown."""
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return 0


class Prefetch(threading.Thread):
    """Asks the kernel for the start of a base model while the CPU is busy with something else.

    `hyperjob consolidate --base-model` spends its first seconds importing torch and consolidating the adapter,
    with the disk nearly idle; meanwhile this thread hands the kernel WILLNEED hints for the base's shard files in
    the order the merge reads them, up to half of the memory available, so the merge finds part of it cached.
    Measured on the 8B case (cold cache, two runs each): the merge took 14.8-17.5 s after these hints against
    19.7-21.0 s without. Hints, not reads: reading through a buffer got more cached (merge 12 s) but its page-cache
    work slowed the consolidation more than that saved. The page cache is not our RSS, and the cap keeps prefetched
    pages from pushing each other out. Standard library only: it starts before torch is imported.
    """

    def __init__(self, files: list[Path], limit: int, step: int = 64 << 20) -> None:
        super().__init__(name="merge-prefetch", daemon=True)
        self.files, self.limit, self.step, self.stopped, self.done = files, limit, step, threading.Event(), 0

    @classmethod
    def of_model(cls, model_dir: Path) -> Prefetch:
        """Prefetch for a model dir's safetensors shards (file-name order, as the merge reads them), started."""
        files = sorted(model_dir.glob("*.safetensors")) if model_dir.is_dir() else []
        thread = cls(files, available_memory() // 2)
        thread.start()
        return thread

    def run(self) -> None:
        if not hasattr(os, "posix_fadvise"):
            return
        for path in self.files:
            try:
                fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
            except OSError:
                continue  # the merge reports a missing or unreadable shard itself
            try:
                size = os.fstat(fd).st_size
                for offset in range(0, size, self.step):
                    if self.stopped.is_set() or self.done >= self.limit:
                        return
                    os.posix_fadvise(fd, offset, min(self.step, size - offset), os.POSIX_FADV_WILLNEED)
                    self.done += min(self.step, size - offset)
            except OSError:
                return  # only a hint
            finally:
                os.close(fd)

    def stop(self) -> None:
        self.stopped.set()
