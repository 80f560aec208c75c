"""Streaming safetensors reader and writer built on plain positional reads and writes.

No mmap on purpose: Linux counts the mapped pages of a file in the process's RSS, so reading a 5 GB shard
through `safe_open` shows up as gigabytes of resident memory. Here bytes go through `os.preadv` into a buffer the
caller reuses, so memory stays flat whatever the model size. Standard library only: no torch, no safetensors package.

Format: 8-byte little-endian header length N, N bytes of JSON (`{"__metadata__": {str: str}, name: {"dtype",
"shape", "data_offsets": [start, end]}, ...}`, space-padded to a multiple of 8), then the tensor bytes; offsets are
relative to the end of the header and must tile the data section exactly.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hyperjob.checkpoint.errors import SafetensorsError

# Bits per element, as the reference implementation defines them (sub-byte float types included).
DTYPE_BITS: dict[str, int] = {
    "BOOL": 8, "U8": 8, "I8": 8, "F8_E5M2": 8, "F8_E4M3": 8, "F8_E8M0": 8, "F4": 4, "F6_E2M3": 6, "F6_E3M2": 6,
    "I16": 16, "U16": 16, "F16": 16, "BF16": 16, "I32": 32, "U32": 32, "F32": 32, "I64": 64, "U64": 64, "F64": 64,
}  # fmt: skip
MAX_HEADER_BYTES = 100_000_000  # the reference rejects larger headers too
WRITEBACK_EVERY = 32 << 20  # start writeback this often, so the final fsync has little left to wait for


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives: `start` is an absolute file offset, so it can go straight to pread."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    start: int
    nbytes: int

    @property
    def end(self) -> int:
        return self.start + self.nbytes

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def rows(self) -> int:
        """Length of dim 0 (1 for a scalar): the unit a tensor is chunked by."""
        return self.shape[0] if self.shape else 1

    @property
    def row_bytes(self) -> int:
        return self.nbytes // self.rows if self.rows else 0


def tensor_nbytes(dtype: str, shape: Sequence[int]) -> int:
    """Size in bytes of a dtype x shape; raises ValueError for an unknown dtype or a partial trailing byte."""
    if dtype not in DTYPE_BITS:
        raise ValueError(f"unknown safetensors dtype {dtype!r}")
    bits = math.prod(shape) * DTYPE_BITS[dtype]
    if bits % 8:
        raise ValueError(f"{dtype} x {list(shape)} does not fill a whole number of bytes")
    return bits // 8


def pread_into(fd: int, buf: memoryview, offset: int, path: Path | str) -> None:
    """Fill all of `buf` from `offset`, looping over short reads; EOF first means the file shrank or is cut."""
    done = 0
    while done < len(buf):
        got = os.preadv(fd, [buf[done:]], offset + done)
        if got == 0:
            raise SafetensorsError(f"{path}: unexpected end of file at byte {offset + done} (truncated file?)")
        done += got


def pwrite_all(fd: int, data: memoryview | bytes, offset: int) -> None:
    """Write all of `data` at `offset`, looping over short writes."""
    view = memoryview(data).cast("B")
    done = 0
    while done < len(view):
        done += os.pwrite(fd, view[done:], offset + done)


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"duplicate key {key!r}")
        out[key] = value
    return out


def _parse_entry(name: str, entry: Any) -> tuple[str, tuple[int, ...], int, int]:
    if not isinstance(entry, dict):
        raise ValueError(f"entry for {name!r} is not an object")
    dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    if dtype not in DTYPE_BITS:
        raise ValueError(f"tensor {name!r} has unknown dtype {dtype!r}")
    if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
        raise ValueError(f"tensor {name!r} has an invalid shape {shape!r}")
    if (
        not isinstance(offsets, list)
        or len(offsets) != 2
        or not all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)
        or not 0 <= offsets[0] <= offsets[1]
    ):
        raise ValueError(f"tensor {name!r} has invalid data_offsets {offsets!r}")
    return dtype, tuple(shape), offsets[0], offsets[1]


class SafetensorsReader:
    """An open safetensors file whose header was fully validated; tensor bytes are read on request only."""

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)
        self._fd = os.open(self.path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
        try:
            self.metadata, self.tensors, self.data_start = self._parse()
        except BaseException:
            os.close(self._fd)
            raise

    def _parse(self) -> tuple[dict[str, str] | None, dict[str, TensorInfo], int]:
        size = os.fstat(self._fd).st_size
        if size < 8:
            raise SafetensorsError(f"{self.path}: {size} bytes is too short for a safetensors file (truncated?)")
        head = bytearray(8)
        pread_into(self._fd, memoryview(head), 0, self.path)
        (n,) = struct.unpack("<Q", head)
        if n > MAX_HEADER_BYTES:
            raise SafetensorsError(f"{self.path}: header length {n} exceeds {MAX_HEADER_BYTES} (not safetensors?)")
        if 8 + n > size:
            raise SafetensorsError(f"{self.path}: header needs {n} bytes but the file has {size - 8} (truncated)")
        raw = bytearray(n)
        pread_into(self._fd, memoryview(raw), 8, self.path)
        try:
            if not raw.startswith(b"{"):
                raise ValueError("header does not start with '{'")
            header = json.loads(raw.decode("utf-8"), object_pairs_hook=_no_duplicates)
            if not isinstance(header, dict):
                raise ValueError("header is not a JSON object")
            metadata = header.pop("__metadata__", None)
            if metadata is not None and not (
                isinstance(metadata, dict) and all(isinstance(v, str) for v in metadata.values())
            ):
                raise ValueError("__metadata__ must map strings to strings")
            entries = sorted(((*_parse_entry(k, v), k) for k, v in header.items()), key=lambda e: (e[2], e[3]))
        except ValueError as e:  # UnicodeDecodeError and JSONDecodeError are ValueErrors too
            raise SafetensorsError(f"{self.path}: corrupt safetensors header: {e}") from None
        data_start, data_size = 8 + n, size - 8 - n
        tensors: dict[str, TensorInfo] = {}
        cursor = 0
        for dtype, shape, begin, end, name in entries:
            if begin != cursor:
                raise SafetensorsError(f"{self.path}: tensor {name!r} starts at {begin}, expected {cursor} (corrupt)")
            try:
                expected = tensor_nbytes(dtype, shape)
            except ValueError as e:
                raise SafetensorsError(f"{self.path}: tensor {name!r}: {e}") from None
            if end - begin != expected:
                raise SafetensorsError(
                    f"{self.path}: tensor {name!r} ({dtype} x {list(shape)}) needs {expected} bytes, "
                    f"header gives {end - begin} (corrupt)"
                )
            tensors[name] = TensorInfo(name, dtype, shape, data_start + begin, expected)
            cursor = end
        if cursor > data_size:
            raise SafetensorsError(
                f"{self.path}: header promises {cursor} bytes of tensor data, the file has {data_size} (truncated)"
            )
        if cursor < data_size:
            raise SafetensorsError(f"{self.path}: {data_size - cursor} unexpected bytes after the last tensor")
        return metadata, tensors, data_start

    def fileno(self) -> int:
        return self._fd

    def read_into(self, name: str, buf: memoryview, *, start: int = 0, nbytes: int | None = None) -> memoryview:
        """Read bytes [start, start+nbytes) of tensor `name` into the front of `buf`; return that slice."""
        info = self.tensors[name]
        nbytes = info.nbytes - start if nbytes is None else nbytes
        if start < 0 or nbytes < 0 or start + nbytes > info.nbytes:
            raise ValueError(f"{self.path}: byte range [{start}, {start + nbytes}) outside tensor {name!r}")
        if nbytes > len(buf):
            raise ValueError(f"buffer of {len(buf)} bytes cannot hold {nbytes} bytes of {name!r}")
        view = buf[:nbytes]
        pread_into(self._fd, view, info.start + start, self.path)
        return view

    def read_rows(self, name: str, row_start: int, row_end: int, buf: memoryview) -> memoryview:
        """Read rows [row_start, row_end) along dim 0 of tensor `name` into the front of `buf`."""
        info = self.tensors[name]
        if not 0 <= row_start <= row_end <= info.rows:
            raise ValueError(f"{self.path}: rows [{row_start}, {row_end}) outside tensor {name!r} of {info.rows}")
        return self.read_into(
            name, buf, start=row_start * info.row_bytes, nbytes=(row_end - row_start) * info.row_bytes
        )

    def read_bytes(self, name: str) -> bytearray:
        """A fresh buffer holding the whole tensor (for small tensors such as LoRA factors)."""
        out = bytearray(self.tensors[name].nbytes)
        self.read_into(name, memoryview(out))
        return out

    def advise(self, offset: int, length: int, *, willneed: bool = True) -> None:
        """Hint the kernel to read a range ahead (page cache, not our RSS), or that reads will be sequential."""
        if hasattr(os, "posix_fadvise"):
            advice = os.POSIX_FADV_WILLNEED if willneed else os.POSIX_FADV_SEQUENTIAL
            with contextlib.suppress(OSError):
                os.posix_fadvise(self._fd, offset, length, advice)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> SafetensorsReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def build_header(entries: Iterable[tuple[str, str, Sequence[int]]], metadata: dict[str, str] | None) -> bytes:
    """Length prefix + JSON header, padded with spaces to 8 bytes like the reference writer; data in entry order."""
    header: dict[str, Any] = {}
    if metadata is not None:
        if not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
            raise ValueError("safetensors __metadata__ must map strings to strings")
        header["__metadata__"] = metadata
    cursor = 0
    for name, dtype, shape in entries:
        if name == "__metadata__" or name in header:
            raise ValueError(f"tensor name {name!r} is reserved or repeated")
        size = tensor_nbytes(dtype, shape)
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [cursor, cursor + size]}
        cursor += size
    raw = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw


@dataclass(frozen=True)
class Layout:
    """Every byte of a safetensors file decided before any is written: the header and where each tensor goes."""

    header: bytes
    tensors: dict[str, TensorInfo]
    size: int


def plan_layout(entries: Sequence[tuple[str, str, Sequence[int]]], metadata: dict[str, str] | None) -> Layout:
    """The header plus absolute tensor offsets for `entries` stored back to back in order."""
    header = build_header(entries, metadata)
    tensors: dict[str, TensorInfo] = {}
    cursor = len(header)
    for name, dtype, shape in entries:
        size = tensor_nbytes(dtype, shape)
        tensors[name] = TensorInfo(name, dtype, tuple(shape), cursor, size)
        cursor += size
    return Layout(header, tensors, cursor)


class SafetensorsWriter:
    """A safetensors file whose layout is fixed up front, its tensor bytes appended in order as they are produced.

    `close` checks every byte was written, fsyncs, and only then reports success.
    """

    def __init__(
        self, path: Path | str, entries: Sequence[tuple[str, str, Sequence[int]]], metadata: dict[str, str] | None
    ) -> None:
        self.path = Path(path)
        layout = plan_layout(entries, metadata)
        self.tensors, self.size = layout.tensors, layout.size
        self._data_bytes = layout.size - len(layout.header)
        self._written = 0
        self._pos = self._flushed = len(layout.header)
        self._fd = create_preallocated(self.path, self.size)
        try:
            os.ftruncate(self._fd, self.size)
            pwrite_all(self._fd, layout.header, 0)
        except BaseException:
            os.close(self._fd)
            raise

    def fileno(self) -> int:
        return self._fd

    def write(self, data: memoryview | bytes) -> None:
        """Append the next bytes in layout order."""
        view = memoryview(data).cast("B")
        if self._pos + len(view) > self.size:
            raise ValueError(f"{self.path}: write past the {self.size} bytes the header declares")
        pwrite_all(self._fd, view, self._pos)
        self._pos += len(view)
        self._written += len(view)
        if self._pos - self._flushed >= WRITEBACK_EVERY:
            # DONTNEED on the range just written starts its writeback now (the disk writes while we compute,
            # instead of all at once in close()'s fsync) and keeps the output from crowding the page cache. Only
            # that range: the whole file would cost a walk over all its pages each time.
            start_writeback(self._fd, self._flushed, self._pos - self._flushed)
            self._flushed = self._pos

    def close(self) -> None:
        """fsync and close; raises if fewer bytes arrived than the header promised (the file is then incomplete)."""
        if self._fd >= 0:
            fd, self._fd = self._fd, -1
            finish(fd, self.path, self._written, self._data_bytes, "tensor bytes")

    def abort(self) -> None:
        """Close without the completeness check (the caller is discarding the file)."""
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


def create_preallocated(path: Path, size: int) -> int:
    """A new (truncated) file for writing, its `size` bytes reserved where the filesystem can; returns the fd."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_CLOEXEC", 0), 0o644)
    try:
        if hasattr(os, "posix_fallocate") and size:
            with contextlib.suppress(OSError):  # not every filesystem can; ENOSPC then shows at write time
                os.posix_fallocate(fd, 0, size)
    except BaseException:
        os.close(fd)
        raise
    return fd


def finish(fd: int, path: Path, written: int, expected: int, what: str, *, size: int | None = None) -> None:
    """Close `fd` durably: check all `expected` bytes arrived (else the file is incomplete and this raises), cut it
    to `size` if given, fsync; the fd is closed either way."""
    try:
        if written != expected:
            raise SafetensorsError(f"{path}: {written} of {expected} {what} written")
        if size is not None:
            os.ftruncate(fd, size)
        os.fsync(fd)
    finally:
        os.close(fd)


def start_writeback(fd: int, offset: int, length: int) -> None:
    """Ask the kernel to write a just-written range back now and drop it from the cache once clean (a hint)."""
    if hasattr(os, "posix_fadvise"):
        with contextlib.suppress(OSError):
            os.posix_fadvise(fd, offset, length, os.POSIX_FADV_DONTNEED)
