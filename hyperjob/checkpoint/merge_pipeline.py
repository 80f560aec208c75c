"""The merge's data path: every output file is cut into aligned blocks, and reading, computing and writing overlap.

Fill threads (one per worker, the calling thread among them) take blocks in file order and assemble each in a
buffer: header bytes, untouched tensor bytes read straight into place, merged tensor bytes computed in row chunks
(W + s * B @ A in fp32, then torch's round-to-nearest-even cast). Writer threads put finished blocks on disk
(direct_io.BlockFile) while the fill threads go on; the writer that completes a file hands it to a closer thread
for its fsync. A fixed pool of block buffers bounds memory: a fill thread waits for a free one, so the disk, not
memory, absorbs any difference in speed. A readahead thread keeps the page cache ahead of the fill threads.

Bits do not depend on the chunking: MKL computes a GEMM row the same way for any chunk of at least MIN_ROWS rows
(1-3 rows take another path whose fp32 sums can differ in the last bit), so every chunk has at least that many.
"""

from __future__ import annotations

import mmap
import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, TypeVar

import torch

from hyperjob.checkpoint.direct_io import BlockFile, aligned_buffer
from hyperjob.checkpoint.hf_layout import torch_dtypes
from hyperjob.checkpoint.lora_adapter import Delta
from hyperjob.checkpoint.safetensors_io import Layout, SafetensorsReader, TensorInfo, pread_into
from hyperjob.checkpoint.stream_support import ByteProgress, Readahead

WRITERS = 2  # blocks in flight to the disk: two kept a virtio disk at 2.2 GB/s, one at 2.1
MIN_ROWS = 4
READAHEAD, READAHEAD_STEP = 256 << 20, 16 << 20  # page cache kept filled ahead of the fill threads, in pieces
T = TypeVar("T")
Q = TypeVar("Q")


@dataclass(frozen=True)
class Item:
    """One output tensor: bytes of `info` in `src` (base, or adapter replacement), plus `deltas`, stored as `dtype`."""

    name: str
    src: SafetensorsReader
    info: TensorInfo
    dtype: str
    deltas: tuple[Delta, ...]

    @property
    def is_copy(self) -> bool:
        return not self.deltas and self.dtype == self.info.dtype

    def compute_dtype(self) -> torch.dtype:
        src, dst = torch_dtypes()[self.info.dtype], torch_dtypes()[self.dtype]
        return torch.float64 if torch.float64 in (src, dst) else torch.float32

    def sizes(self, rows: int) -> tuple[int, int]:
        """(raw, work) bytes for `rows` rows: raw holds src or dst bytes; work is the fp32/fp64 copy (0 if in place)."""
        elems = rows * (self.info.numel // self.info.rows)
        src, dst, cdt = torch_dtypes()[self.info.dtype], torch_dtypes()[self.dtype], self.compute_dtype()
        return elems * max(src.itemsize, dst.itemsize), 0 if src == dst == cdt else elems * cdt.itemsize

    def source_range(self, rel: int, n: int) -> tuple[int, int]:
        """(file offset, bytes) in `src` behind output bytes [rel, rel + n): scaled when the dtype changes."""
        src, dst = torch_dtypes()[self.info.dtype].itemsize, torch_dtypes()[self.dtype].itemsize
        return self.info.start + rel * src // dst, n * src // dst

    def rows_per_chunk(self, chunk_bytes: int) -> int:
        return max(MIN_ROWS, chunk_bytes // max(1, sum(self.sizes(1))))


@dataclass(frozen=True)
class Piece:
    """Bytes [rel, rel + n) of one output tensor (or of the header when `item` is None) at `dst` in a block."""

    item: Item | None
    rel: int
    n: int
    dst: int


class OutFile:
    """An output file being filled block by block; the writer of its last block hands it to the closer."""

    def __init__(self, file: BlockFile, layout: Layout, blocks: int) -> None:
        self.file, self.layout, self.remaining, self.lock = file, layout, blocks, threading.Lock()

    def block_done(self) -> bool:
        with self.lock:
            self.remaining -= 1
            return self.remaining == 0


@dataclass(frozen=True)
class Block:
    out: OutFile
    offset: int
    length: int
    pieces: tuple[Piece, ...]

    def sources(self) -> list[tuple[SafetensorsReader, int, int]]:
        """(file, offset, bytes) the block reads, in order, for the readahead."""
        return [(p.item.src, *p.item.source_range(p.rel, p.n)) for p in self.pieces if p.item is not None]


def cut_blocks(out: OutFile, items: list[Item], block_bytes: int) -> list[Block]:
    """Split one output file into blocks of `block_bytes` (a multiple of ALIGN) and name each block's pieces."""
    spans: list[tuple[Item | None, int, int]] = [(None, 0, len(out.layout.header))]  # (item, file offset, bytes)
    spans += [(it, out.layout.tensors[it.name].start, out.layout.tensors[it.name].nbytes) for it in items]
    blocks, i = [], 0
    for offset in range(0, out.layout.size, block_bytes):
        end = min(offset + block_bytes, out.layout.size)
        pieces = []
        while i < len(spans) and spans[i][1] < end:
            item, start, n = spans[i]
            lo, hi = max(start, offset), min(start + n, end)
            if hi > lo:
                pieces.append(Piece(item, lo - start, hi - lo, lo - offset))
            if start + n > end:
                break
            i += 1
        blocks.append(Block(out, offset, end - offset, tuple(pieces)))
    return blocks


def widen(lo: int, hi: int, rows: int) -> tuple[int, int]:
    """[lo, hi) grown to at least MIN_ROWS rows where the tensor has them (see the module docstring)."""
    if hi - lo >= MIN_ROWS or rows <= hi - lo:
        return lo, hi
    start = max(0, min(lo, rows - MIN_ROWS))
    return start, min(rows, max(hi, start + MIN_ROWS))


class Busy:
    """Time during which at least one thread was inside (the resource was busy), and the time summed over threads."""

    def __init__(self) -> None:
        self.lock, self.inside, self.since, self.union, self.total = threading.Lock(), 0, 0.0, 0.0, 0.0

    def timed(self, fn: Callable[..., T], *args: Any) -> T:
        t0 = time.perf_counter()
        with self.lock:
            if self.inside == 0:
                self.since = t0
            self.inside += 1
        try:
            return fn(*args)
        finally:
            t1 = time.perf_counter()
            with self.lock:
                self.inside -= 1
                self.total += t1 - t0
                if self.inside == 0:
                    self.union += t1 - self.since


@dataclass
class MergeStats:
    """Where a merge spent its time, to say which resource bounds it (see `bound`)."""

    bytes: int = 0
    wall: float = 0.0
    workers: int = 1
    direct: bool = True
    reads: Busy = field(default_factory=Busy)  # fill threads waiting in pread (cold page cache)
    compute: Busy = field(default_factory=Busy)  # fill threads converting and multiplying
    writes: Busy = field(default_factory=Busy)  # writer threads in pwrite, closer in fsync

    def shares(self) -> dict[str, float]:
        """Busy fraction of the wall time: disk reads and writes as 'any in flight', compute per core used."""
        wall = max(self.wall, 1e-9)
        return {
            "disk read": self.reads.union / wall,
            "compute": self.compute.total / (wall * self.workers),
            "write-back": self.writes.union / wall,
        }

    def bound(self) -> str:
        shares = self.shares()
        return max(shares, key=lambda k: shares[k])

    def summary(self) -> str:
        rate = self.bytes / max(self.wall, 1e-9) / 1e9
        busy = ", ".join(f"{k} {v:.0%}" for k, v in self.shares().items())
        mode = "direct" if self.direct else "buffered"
        return (
            f"{self.bytes / 1e9:.2f} GB in {self.wall:.1f} s ({rate:.2f} GB/s, {self.workers} worker(s), {mode} "
            f"writes); busy: {busy}; bound by {self.bound()}"
        )


class _Filler:
    """One fill thread's reusable buffers: `raw` for source rows as read and merged rows as cast back, `work` for the
    fp32/fp64 copy."""

    def __init__(self, raw_bytes: int, work_bytes: int, chunk_bytes: int, stats: MergeStats) -> None:
        self.raw = bytearray(max(raw_bytes, 1))
        self.view = memoryview(self.raw)
        self.raw_t = torch.frombuffer(self.raw, dtype=torch.uint8)
        self.work_t = torch.empty(work_bytes, dtype=torch.uint8)
        self.chunk_bytes, self.stats = chunk_bytes, stats
        self.factors: tuple[Item | None, list[tuple[torch.Tensor, torch.Tensor]]] = (None, [])

    def fill(self, block: Block, buf: mmap.mmap) -> None:
        view = memoryview(buf)
        block_t = torch.frombuffer(buf, dtype=torch.uint8)
        for p in block.pieces:
            if p.item is None:
                view[p.dst : p.dst + p.n] = block.out.layout.header[p.rel : p.rel + p.n]
            elif p.item.is_copy:
                src = p.item.src
                self.stats.reads.timed(pread_into, src.fileno(), view[p.dst : p.dst + p.n], p.item.info.start + p.rel,
                                       src.path)  # fmt: skip
            else:
                self._merge(p, block_t)

    def _merge(self, p: Piece, block_t: torch.Tensor) -> None:
        """Compute the rows covering the piece chunk by chunk and copy the piece's bytes into the block."""
        item = p.item
        assert item is not None
        info = item.info
        row_bytes = info.numel // info.rows * torch_dtypes()[item.dtype].itemsize  # output bytes per row
        first, last = p.rel // row_bytes, -(-(p.rel + p.n) // row_bytes)
        step = item.rows_per_chunk(self.chunk_bytes)
        for a in range(first, last, step):
            lo, hi = widen(a, min(a + step, last), info.rows)
            self.stats.reads.timed(item.src.read_rows, info.name, lo, hi, self.view)
            self.stats.compute.timed(self._rows, item, lo, hi)
            s, e = max(p.rel, lo * row_bytes), min(p.rel + p.n, hi * row_bytes)
            dst = block_t[p.dst + s - p.rel : p.dst + e - p.rel]
            self.stats.compute.timed(dst.copy_, self.raw_t[s - lo * row_bytes : e - lo * row_bytes])

    def _rows(self, item: Item, lo: int, hi: int) -> None:
        """Rows [lo, hi) of the source, read into `raw`, become the merged rows in the output dtype, in place."""
        info = item.info
        rows, cols = hi - lo, info.numel // info.rows
        src_dt, dst_dt, cdt = torch_dtypes()[info.dtype], torch_dtypes()[item.dtype], item.compute_dtype()
        w = src = self.raw_t[: rows * cols * src_dt.itemsize].view(src_dt).view(rows, cols)
        inplace = src_dt == dst_dt == cdt
        if not inplace:
            w = self.work_t[: rows * cols * cdt.itemsize].view(cdt).view(rows, cols)
            w.copy_(src)
        if self.factors[0] is not item:  # a tensor's chunks run back to back: convert its factors once
            self.factors = (item, [(d.a.to(cdt), d.b.to(cdt)) for d in item.deltas])
        for d, (fa, fb) in zip(item.deltas, self.factors[1], strict=True):
            d.apply(w, lo, hi, fa, fb)
        if not inplace:  # the same conversion as Tensor.to(dtype): round to nearest even
            self.raw_t[: rows * cols * dst_dt.itemsize].view(dst_dt).view(rows, cols).copy_(w)


def _get(q: queue.Queue[Q], stop: threading.Event) -> Q | None:
    """q.get() that gives up (None) once `stop` is set, so no thread waits forever after another failed."""
    while not stop.is_set():
        try:
            return q.get(timeout=0.05)
        except queue.Empty:
            continue
    return None


def run_blocks(
    blocks: list[Block],
    *,
    workers: int,
    block_bytes: int,
    chunk_bytes: int,
    progress: ByteProgress,
    stats: MergeStats,
) -> None:
    """Fill, write and close every block's file; raises the first error of any thread after all have stopped."""
    computed = [p.item for b in blocks for p in b.pieces if p.item is not None and not p.item.is_copy]
    sizes = [it.sizes(it.rows_per_chunk(chunk_bytes)) for it in computed]
    raw_need, work_need = max((s[0] for s in sizes), default=0), max((s[1] for s in sizes), default=0)
    free: queue.Queue[mmap.mmap] = queue.Queue()
    for _ in range(workers + WRITERS + 1):
        free.put(aligned_buffer(block_bytes))
    full: queue.Queue[tuple[Block, mmap.mmap] | None] = queue.Queue()
    lock, stop, errors, closes = threading.Lock(), threading.Event(), [], []
    cursor = iter(blocks)
    closer = ThreadPoolExecutor(1, thread_name_prefix="merge-fsync")
    readahead = Readahead([s for b in blocks for s in b.sources()], READAHEAD, READAHEAD_STEP)

    def guard(fn: Callable[[], None]) -> Callable[[], None]:
        def run() -> None:
            try:
                fn()
            except BaseException as e:
                errors.append(e)
                stop.set()

        return run

    def fill() -> None:
        filler = _Filler(raw_need, work_need, chunk_bytes, stats)
        while not stop.is_set():
            with lock:
                block = next(cursor, None)
            if block is None:
                return
            buf = _get(free, stop)
            if buf is None:
                return
            filler.fill(block, buf)
            readahead.advance(sum(n for _, _, n in block.sources()))
            full.put((block, buf))

    def write() -> None:
        while (job := _get(full, stop)) is not None:
            block, buf = job
            stats.writes.timed(block.out.file.write, block.offset, buf, block.length)
            free.put(buf)
            if block.out.block_done():
                closes.append(closer.submit(stats.writes.timed, block.out.file.close))
            progress.advance(block.length)

    fillers = [threading.Thread(target=guard(fill), name=f"merge-fill-{n}", daemon=True) for n in range(workers - 1)]
    writers = [threading.Thread(target=guard(write), name=f"merge-write-{n}", daemon=True) for n in range(WRITERS)]
    t0 = time.perf_counter()
    readahead.start()
    try:
        for t in fillers + writers:
            t.start()
        guard(fill)()  # the calling thread fills too; an error or Ctrl-C elsewhere stops it through `stop`
        for t in fillers:
            t.join()
        for _ in writers:
            full.put(None)
        for t in writers:
            t.join()
    except BaseException:
        stop.set()  # let every thread finish its block and quit before the staging dir is removed
        for t in fillers + writers:
            t.join()
        raise
    finally:
        readahead.stop()
        readahead.join()
        closer.shutdown(wait=True)
        stats.wall = time.perf_counter() - t0
    if errors:
        raise errors[0]
    for f in closes:
        f.result()  # a failed fsync or completeness check
