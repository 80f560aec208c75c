"""Read neuronx-distributed rank files on a CPU machine, without torch_xla.

A rank file is either a plain `torch.save` dict of tensors (`use_xser=False`) or, with xser, a `torch.save` dict of
`torch_xla.utils.serialization.TensorReference(tid)` objects whose tensors live one per file in
`<rank file>.tensors/tensor_<tid>.pt`, with `<rank file>.info.pt` giving `{tid: {"dtype", "shape", ...}}`.

Everything goes through `torch.load(weights_only=True)`: torch's own allow-list admits tensors, storages, dtypes and
sizes, and the one extra global admitted is that TensorReference class, mapped by name onto the local stand-in below.
Checkpoints come from shared file systems, so any other global (os.system, another torch_xla class) is refused,
and the error names it and the file. Nothing is ever put into `sys.modules["torch_xla"]`: other libraries would then
believe XLA is installed.
"""

from __future__ import annotations

import os
import pickle
import re
import struct
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from hyperjob.checkpoint.errors import CheckpointError, SafetensorsError
from hyperjob.checkpoint.safetensors_io import pread_into

XSER_REFERENCE_GLOBAL = "torch_xla.utils.serialization.TensorReference"
_GLOBAL_RE = re.compile(r"GLOBAL ([\w.]+)")


class _XlaTensorReference:
    """Local stand-in for torch_xla's TensorReference; its pickled state is exactly `{"tid": int}`."""

    __slots__ = ("tid",)

    def __init__(self, tid: int) -> None:
        self.tid = tid

    def __setstate__(self, state: Any) -> None:
        if not isinstance(state, dict) or set(state) != {"tid"} or not isinstance(state["tid"], int):
            raise pickle.UnpicklingError(f"TensorReference state must be {{'tid': int}}, got {state!r}"[:200])
        self.tid = state["tid"]


@dataclass(frozen=True)
class TensorRef:
    """One xser entry: the tensor is in `<rank file>.tensors/tensor_<tid>.pt`; shape/dtype from `.info.pt` if any."""

    tid: int
    shape: tuple[int, ...] | None
    dtype: torch.dtype | None


@dataclass(frozen=True)
class TensorMeta:
    """One plain entry: shape and dtype read through a memory map, no tensor data touched."""

    shape: tuple[int, ...]
    dtype: torch.dtype


IndexEntry = TensorRef | TensorMeta


def _safe_load(path: Path, *, refs: bool = False, mmap: bool = False) -> Any:
    """torch.load with weights_only; `refs` admits the TensorReference stand-in. Failures become CheckpointError."""
    allowed: list[Any] = [(_XlaTensorReference, XSER_REFERENCE_GLOBAL)] if refs else []
    try:
        with torch.serialization.safe_globals(allowed):
            return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as e:
        m = _GLOBAL_RE.search(str(e))
        what = f"global {m.group(1)}" if m else str(e).strip().splitlines()[-1][:200]
        raise CheckpointError(
            f"{path}: refusing to unpickle {what} (only tensors and TensorReference are allowed)"
        ) from None
    except FileNotFoundError:
        raise CheckpointError(f"{path}: file is missing") from None
    except (RuntimeError, EOFError, OSError, ValueError) as e:
        if mmap and "mmap" in str(e):  # pre-1.6 (non-zip) torch.save files cannot be mapped
            return _safe_load(path, refs=refs, mmap=False)
        raise CheckpointError(f"{path}: not a readable torch file (truncated or corrupt): {str(e)[:200]}") from None


def is_xser(rank_file: Path) -> bool:
    return tensors_dir(rank_file).is_dir()


def tensors_dir(rank_file: Path) -> Path:
    return Path(f"{rank_file}.tensors")


def info_file(rank_file: Path) -> Path:
    return Path(f"{rank_file}.info.pt")


def tensor_file(rank_file: Path, tid: int) -> Path:
    return tensors_dir(rank_file) / f"tensor_{tid}.pt"


def _as_shape(value: Any, where: Path) -> tuple[int, ...]:
    if not isinstance(value, (tuple, list, torch.Size)) or not all(isinstance(d, int) for d in value):
        raise CheckpointError(f"{where}: shape entry {value!r} is not a list of ints"[:300])
    return tuple(value)


def _read_info(rank_file: Path) -> dict[int, tuple[tuple[int, ...], torch.dtype]]:
    """`.info.pt` -> {tid: (shape, dtype)}; empty when the file is absent (neuronx-distributed <= 0.6 wrote none)."""
    path = info_file(rank_file)
    if not path.exists():
        return {}
    raw = _safe_load(path)
    if not isinstance(raw, dict):
        raise CheckpointError(f"{path}: expected a dict of tensor info, got {type(raw).__name__}")
    out = {}
    for tid, entry in raw.items():
        if not isinstance(entry, dict) or not isinstance(entry.get("dtype"), torch.dtype):
            raise CheckpointError(f"{path}: entry for tid {tid!r} lacks a torch dtype")
        out[int(tid)] = (_as_shape(entry.get("shape"), path), entry["dtype"])
    return out


def read_rank_index(path: Path) -> dict[str, IndexEntry]:
    """Names -> TensorRef (xser: tid, shape and dtype from `.info.pt`) or TensorMeta (plain), in saved order.

    Cheap: xser reads the small reference and info files; plain maps the file and reads only the pickle.
    """
    path = Path(path)
    xser = is_xser(path)
    raw = _safe_load(path, refs=xser, mmap=not xser)
    if not isinstance(raw, dict):
        raise CheckpointError(f"{path}: expected a dict of parameters, got {type(raw).__name__}")
    info = _read_info(path) if xser else {}
    index: dict[str, IndexEntry] = {}
    for name, value in raw.items():
        if not isinstance(name, str):
            raise CheckpointError(f"{path}: parameter name {name!r} is not a string"[:300])
        if xser and isinstance(value, _XlaTensorReference):
            shape, dtype = info.get(value.tid, (None, None))
            if info and shape is None:
                raise CheckpointError(f"{info_file(path)}: no entry for tid {value.tid} ({name})")
            index[name] = TensorRef(value.tid, shape, dtype)
        elif not xser and isinstance(value, torch.Tensor):
            index[name] = TensorMeta(tuple(value.shape), value.dtype)
        else:
            want = "TensorReference" if xser else "tensor"
            raise CheckpointError(f"{path}: value of {name} is a {type(value).__name__}, expected a {want}")
    return index


def check_tensor_file(path: Path, expected_bytes: int | None) -> None:
    """Cheap truncation check of one `tensor_<tid>.pt`: the zip directory (written last) must be readable and its
    data record must hold at least `expected_bytes`. Reads only the zip directory, never the tensor data."""
    try:
        size = path.stat().st_size
        with zipfile.ZipFile(path) as zf:
            infos = zf.infolist()
    except FileNotFoundError:
        raise CheckpointError(f"{path}: tensor file is missing (save interrupted?)") from None
    except (zipfile.BadZipFile, OSError) as e:
        raise CheckpointError(f"{path}: truncated or corrupt tensor file ({e})") from None
    if not any(i.filename.endswith("data.pkl") for i in infos):
        raise CheckpointError(f"{path}: not a torch.save file (no data.pkl)")
    data = [i for i in infos if "/data/" in i.filename]
    if any(i.header_offset + i.compress_size > size for i in infos):
        raise CheckpointError(f"{path}: truncated tensor file (records extend past {size} bytes)")
    if expected_bytes is not None and sum(i.file_size for i in data) < expected_bytes:
        raise CheckpointError(
            f"{path}: holds {sum(i.file_size for i in data)} bytes of data, expected {expected_bytes}"
        )


def load_xser_tensor(rank_file: Path, tid: int) -> torch.Tensor:
    """Load `tensor_<tid>.pt` only, memory-mapped."""
    path = tensor_file(rank_file, tid)
    value = _safe_load(path, mmap=True)
    if not isinstance(value, torch.Tensor):
        raise CheckpointError(f"{path}: expected a tensor, got {type(value).__name__}")
    return value


@dataclass(frozen=True)
class _Span:
    """Where one tensor of a plain rank file lives: its storage's data record in the zip, and its view on it."""

    offset: int  # file offset of the storage's first byte
    storage_bytes: int
    shape: tuple[int, ...]
    stride: tuple[int, ...]
    storage_offset: int
    dtype: torch.dtype
    contiguous: bool


def _zip_records(path: Path) -> dict[int, int] | None:
    """Data start offset -> size of every uncompressed `*/data/*` record (None if any is compressed)."""
    records = {}
    with zipfile.ZipFile(path) as zf, open(path, "rb") as f:
        for info in zf.infolist():
            if "/data/" not in info.filename:
                continue
            if info.compress_type != zipfile.ZIP_STORED:
                return None
            f.seek(info.header_offset)
            local = f.read(30)
            name_len, extra_len = struct.unpack("<HH", local[26:30])
            records[info.header_offset + 30 + name_len + extra_len] = info.file_size
    return records


def _plain_spans(path: Path) -> dict[str, _Span] | None:
    """Locate every tensor of a plain rank file from one memory-mapped load: torch maps the whole file as one
    storage and slices each record out of it, so a storage's address minus the map's base is its record offset.
    Every span is checked against the zip's records; None (use memory maps instead) if that does not hold."""
    state = _safe_load(path, mmap=True)
    records = _zip_records(path) if isinstance(state, dict) else None
    tensors = {k: v for k, v in state.items() if isinstance(v, torch.Tensor)} if records else {}
    if not records or not tensors or len(tensors) != len(state):
        return None
    sized = {k: t for k, t in tensors.items() if t.untyped_storage().nbytes()}  # empty storages have no address
    filled = [offset for offset, size in records.items() if size]
    if not sized or not filled:
        return None
    base = min(t.untyped_storage().data_ptr() for t in sized.values()) - min(filled)
    spans = {}
    for k, t in tensors.items():
        size = t.untyped_storage().nbytes()
        offset = t.untyped_storage().data_ptr() - base if size else 0
        if size and records.get(offset, -1) < size:
            return None
        spans[k] = _Span(offset, size, tuple(t.shape), t.stride(), int(t.storage_offset()), t.dtype, t.is_contiguous())
    return spans


class PlainRankReader:
    """Single tensors of plain rank files by positional reads into fresh buffers.

    Parsing a rank file's pickle with the weights-only unpickler takes ~0.2 s for 450 keys, too slow to repeat per
    tensor, and keeping the memory map open would let every page read stay counted in RSS until the end. So each
    file is mapped once to locate its tensors, the map is dropped, and each tensor is then read with pread: memory
    holds only the tensors in use. Files whose layout cannot be located fall back to one map per tensor."""

    def __init__(self) -> None:
        self._spans: dict[Path, dict[str, _Span] | None] = {}

    def get(self, rank_file: Path, name: str) -> torch.Tensor:
        if rank_file not in self._spans:
            self._spans[rank_file] = _plain_spans(rank_file)
        spans = self._spans[rank_file]
        if spans is None:
            state = _safe_load(rank_file, mmap=True)
            tensor = state.get(name) if isinstance(state, dict) else None
            if not isinstance(tensor, torch.Tensor):
                raise CheckpointError(f"{rank_file}: no tensor named {name}")
            return tensor
        span = spans.get(name)
        if span is None:
            raise CheckpointError(f"{rank_file}: no tensor named {name}")
        item = span.dtype.itemsize
        numel = 1
        for d in span.shape:
            numel *= d
        if span.contiguous:
            start, nbytes = span.offset + span.storage_offset * item, numel * item
        else:
            start, nbytes = span.offset, span.storage_bytes
        raw = torch.empty(nbytes, dtype=torch.uint8)
        if nbytes == 0:
            return torch.empty(span.shape, dtype=span.dtype)
        fd = os.open(rank_file, os.O_RDONLY)
        try:
            try:
                pread_into(fd, raw.numpy().data, start, rank_file)
            except SafetensorsError as e:
                raise CheckpointError(f"{e}: ends inside a tensor") from None
        finally:
            os.close(fd)
        data = raw.view(span.dtype)
        if span.contiguous:
            return data.reshape(span.shape)
        return data.as_strided(span.shape, span.stride, span.storage_offset).clone()


def load_tensor(
    rank_file: Path, name: str, entry: IndexEntry | None = None, plain: PlainRankReader | None = None
) -> torch.Tensor:
    """One tensor of one rank file; only its bytes are read. Pass `entry` (from `read_rank_index`) to skip re-reading
    an xser reference file, and one `plain` reader for many reads of plain files (it locates tensors once per file).
    The tensor is checked against the entry's shape and dtype."""
    rank_file = Path(rank_file)
    if entry is None and is_xser(rank_file):
        entry = read_rank_index(rank_file).get(name)
        if entry is None:
            raise CheckpointError(f"{rank_file}: no parameter {name}")
    if isinstance(entry, TensorRef):
        tensor = load_xser_tensor(rank_file, entry.tid)
    else:
        tensor = (plain or PlainRankReader()).get(rank_file, name)
    if (
        entry is not None
        and entry.shape is not None
        and (tuple(tensor.shape), tensor.dtype) != (entry.shape, entry.dtype)
    ):
        raise CheckpointError(
            f"{rank_file}: {name} is {tuple(tensor.shape)} {tensor.dtype}, index says {entry.shape} {entry.dtype}"
        )
    return tensor
