"""Merge a LoRA adapter into a safetensors base model shard by shard, in bounded memory at disk speed.

Why not peft's merge_and_unload: it holds the whole model (16 GB for an 8B bf16 base, plus mmap'd pages that
count as RSS). Here each base tensor is either copied file-to-file in the kernel (the adapter does not touch it)
or streamed through in row chunks: W' = W + s * (B @ A) in fp32, cast back to W's dtype by torch's own
round-to-nearest-even conversion. Peak memory is one chunk buffer per worker plus the LoRA factors, whatever the
model size. Output shards keep the base's file names and tensor order; they are built in a `.NAME.*.partial` dir
beside the target, which is swapped into place only when complete.
"""

from __future__ import annotations

import os
import shutil
import threading
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from itertools import groupby
from pathlib import Path
from typing import Any

import torch

from hyperjob.checkpoint.errors import MergeError, SafetensorsError
from hyperjob.checkpoint.hf_layout import (
    INDEX_NAME,
    SHARD_METADATA,
    SINGLE_NAME,
    copy_model_files,
    override_config,
    shard_names,
    torch_dtypes,
    write_index,
)
from hyperjob.checkpoint.lora_adapter import FLOAT_DTYPES, Delta, load_adapter, read_json
from hyperjob.checkpoint.safetensors_io import SafetensorsReader, SafetensorsWriter, TensorInfo, tensor_nbytes
from hyperjob.checkpoint.stream_support import ByteProgress, ProgressFn, Readahead, merge_label
from hyperjob.fsutil import atomic_dir

__all__ = ["merge_streaming"]

Plan = list[tuple[str, "dict[str, str] | None", list["_Item"]]]  # (shard file, shard metadata, tensors)
CHUNK_CAP = 4 << 20  # working bytes per chunk: chunks that stay in CPU cache ran 2-4x faster than 64 MiB ones
COPY_STEP = 256 << 20  # untouched tensors are copied in pieces this big, for progress and parallelism
READAHEAD, READAHEAD_STEP = 64 << 20, 8 << 20  # page cache kept filled ahead of the workers, in pieces
RESERVE = 16 << 20  # torch and Python bookkeeping around the buffers
MIN_CHUNK = 1 << 20


@dataclass(frozen=True)
class _Item:
    """One output tensor: bytes of `info` in `src` (base, or adapter replacement), plus `deltas`, stored as `dtype`."""

    name: str
    src: SafetensorsReader
    info: TensorInfo
    dtype: str
    deltas: tuple[Delta, ...]

    @property
    def is_copy(self) -> bool:
        return not self.deltas and self.dtype == self.info.dtype

    def sizes(self, rows: int) -> tuple[int, int]:
        """(raw, work) bytes for `rows` rows: raw holds src or dst bytes; work is the fp32/fp64 copy (0 if in place)."""
        elems = rows * (self.info.numel // self.info.rows)
        src, dst = torch_dtypes()[self.info.dtype], torch_dtypes()[self.dtype]
        cdt = torch.float64 if torch.float64 in (src, dst) else torch.float32
        return elems * max(src.itemsize, dst.itemsize), 0 if src == dst == cdt else elems * cdt.itemsize


@dataclass(frozen=True)
class _Task:
    """A row range (computed tensors) or byte range (copied tensors) of one item."""

    item: _Item
    out: _Out
    start: int
    stop: int

    def source(self) -> tuple[SafetensorsReader, int, int]:
        """(file, absolute offset, byte count) this task reads."""
        info = self.item.info
        unit = 1 if self.item.is_copy else info.row_bytes
        return self.item.src, info.start + self.start * unit, (self.stop - self.start) * unit


class _Out:
    """An output shard being filled by tasks; the last task to finish hands it to the closer (fsync)."""

    def __init__(self, writer: SafetensorsWriter, tasks: int) -> None:
        self.writer, self.remaining, self.lock = writer, tasks, threading.Lock()

    def task_done(self) -> bool:
        with self.lock:
            self.remaining -= 1
            return self.remaining == 0


def _open_base(base_dir: Path) -> tuple[list[tuple[str, SafetensorsReader]], dict[str, Any] | None]:
    """The base's shards in file-name order, headers validated (a truncated shard fails here), and its index."""
    index_path = base_dir / INDEX_NAME
    if index_path.is_file():
        index = read_json(index_path)
        weight_map: dict[str, str] = index.get("weight_map") or {}
        files = sorted(set(weight_map.values()))
    elif (base_dir / SINGLE_NAME).is_file():
        index, weight_map, files = None, {}, [SINGLE_NAME]
    else:
        raise MergeError(f"{base_dir} has no {INDEX_NAME} or {SINGLE_NAME} (only safetensors bases are merged)")
    shards: list[tuple[str, SafetensorsReader]] = []
    try:
        for file in files:
            if not (base_dir / file).is_file():
                raise MergeError(f"{base_dir}: shard {file} listed in {INDEX_NAME} is missing")
            shards.append((file, SafetensorsReader(base_dir / file)))
        by_file = dict(shards)
        for name, file in weight_map.items():
            if name not in by_file[file].tensors:
                raise MergeError(f"{base_dir}: {INDEX_NAME} puts {name} in {file}, whose header lacks it")
    except BaseException:
        for _, r in shards:
            r.close()
        raise
    return shards, index


def _plan(
    where: str,
    adapter: SafetensorsReader,
    shards: list[tuple[str, SafetensorsReader]],
    deltas: dict[str, list[Delta]],
    replacements: dict[str, TensorInfo],
) -> Plan:
    """Decide every output tensor and check that the adapter fits the base, before anything is written."""
    plan: Plan = []
    seen: set[str] = set()
    for file, reader in shards:
        items = []
        for name, info in reader.tensors.items():
            seen.add(name)
            src, src_info = (adapter, replacements[name]) if name in replacements else (reader, info)
            if src_info.shape != info.shape:
                raise MergeError(
                    f"{where}: {name} has shape {list(src_info.shape)} in the adapter, {list(info.shape)} in the base"
                )
            ds = tuple(deltas.get(name, ()))
            for d in ds:
                if d.shape() != info.shape:
                    raise MergeError(
                        f"{where}: module {name.rsplit('.', 1)[0]}: LoRA update has shape {list(d.shape())} "
                        f"(lora A {list(d.a.shape)}, B {list(d.b.shape)}), base tensor {name} has {list(info.shape)}"
                    )
            if (ds or src_info.dtype != info.dtype) and not {src_info.dtype, info.dtype} <= FLOAT_DTYPES:
                raise MergeError(f"{where}: cannot update {name}: dtype {info.dtype} is not a float type")
            items.append(_Item(name, src, src_info, info.dtype, ds))
        plan.append((file, reader.metadata, items))
    missing = sorted((set(deltas) | set(replacements)) - seen)
    if missing:
        raise MergeError(f"{where}: no base tensor for adapter tensor(s) {', '.join(missing[:8])}")
    return plan


def _reshard(plan: Plan, limit: int) -> Plan:
    """Regroup tensors in base order into shards of at most `limit` bytes, named like save_pretrained."""
    items = [it for _, _, its in plan for it in its]
    names = shard_names([tensor_nbytes(it.dtype, it.info.shape) for it in items], limit)
    pairs = groupby(zip(names, items, strict=True), key=lambda p: p[0])
    shards: Plan = [(name, SHARD_METADATA, [it for _, it in group]) for name, group in pairs]
    return shards or [(SINGLE_NAME, SHARD_METADATA, [])]  # a base without tensors still gets its one file


def _ranges(item: _Item, chunk_bytes: int) -> list[tuple[int, int]]:
    """Byte ranges of a copied tensor, or row ranges of a computed one sized to `chunk_bytes` of working memory."""
    if item.info.nbytes == 0:
        return []
    if item.is_copy:
        return [(s, min(s + COPY_STEP, item.info.nbytes)) for s in range(0, item.info.nbytes, COPY_STEP)]
    step = max(1, chunk_bytes // max(1, sum(item.sizes(1))))
    return [(r, min(r + step, item.info.rows)) for r in range(0, item.info.rows, step)]


class _Worker:
    """One worker's reusable buffers: `raw` for bytes as read and written, `work` for the fp32/fp64 copy."""

    def __init__(self, raw_bytes: int, work_bytes: int) -> None:
        self.raw = bytearray(max(raw_bytes, 1 << 20))  # >= 1 MiB: also the fallback buffer for plain copies
        self.view = memoryview(self.raw)
        self.raw_t = torch.frombuffer(self.raw, dtype=torch.uint8)
        self.work_t = torch.empty(work_bytes, dtype=torch.uint8)
        self.factors: tuple[_Item | None, list[tuple[torch.Tensor, torch.Tensor]]] = (None, [])

    def run(self, task: _Task) -> int:
        item, writer, info = task.item, task.out.writer, task.item.info
        if item.is_copy:
            nbytes = task.stop - task.start
            writer.copy_at(item.name, task.start, item.src.fileno(), info.start + task.start, nbytes, self.view)
            return nbytes
        rows, cols = task.stop - task.start, info.numel // info.rows
        src_dt, dst_dt = torch_dtypes()[info.dtype], torch_dtypes()[item.dtype]
        cdt = torch.float64 if torch.float64 in (src_dt, dst_dt) else torch.float32
        raw = item.src.read_rows(info.name, task.start, task.stop, self.view)
        w = src = self.raw_t[: len(raw)].view(src_dt).view(rows, cols)
        inplace = src_dt == dst_dt == cdt
        if not inplace:
            w = self.work_t[: rows * cols * cdt.itemsize].view(cdt).view(rows, cols)
            w.copy_(src)
        if self.factors[0] is not item:  # a tensor's chunks run back to back: convert its factors once
            self.factors = (item, [(d.a.to(cdt), d.b.to(cdt)) for d in item.deltas])
        for d, (a, b) in zip(item.deltas, self.factors[1], strict=True):
            d.apply(w, task.start, task.stop, a, b)
        nbytes = rows * cols * dst_dt.itemsize
        if not inplace:  # the same conversion as Tensor.to(dtype): round to nearest even
            self.raw_t[:nbytes].view(dst_dt).view(rows, cols).copy_(w)
        writer.write_at(item.name, task.start * cols * dst_dt.itemsize, self.view[:nbytes])
        return nbytes


def _run(tasks: list[_Task], workers: int, progress: ByteProgress) -> None:
    """Run tasks on `workers` threads (torch and file syscalls release the GIL); fsync finished shards meanwhile."""
    sizes = [t.item.sizes(t.stop - t.start) for t in tasks if not t.item.is_copy]
    raw_need, work_need = max((s[0] for s in sizes), default=0), max((s[1] for s in sizes), default=0)
    lock, stop, errors, closes = threading.Lock(), threading.Event(), [], []
    cursor = iter(range(len(tasks)))
    closer = ThreadPoolExecutor(1, thread_name_prefix="merge-fsync")
    readahead = Readahead([t.source() for t in tasks], READAHEAD, READAHEAD_STEP)
    readahead.start()

    def loop() -> None:
        try:
            worker = _Worker(raw_need, work_need)
            while not stop.is_set():
                with lock:
                    i = next(cursor, None)
                if i is None:
                    return
                done = worker.run(tasks[i])
                readahead.advance(tasks[i].source()[2])
                if tasks[i].out.task_done():
                    closes.append(closer.submit(tasks[i].out.writer.close))
                progress.advance(done)
        except BaseException as e:
            errors.append(e)
            stop.set()

    threads = [threading.Thread(target=loop, name=f"merge-{n}", daemon=True) for n in range(workers - 1)]
    try:
        for t in threads:
            t.start()
        loop()  # the calling thread is a worker too (Ctrl-C lands here)
        for t in threads:
            t.join()
    except BaseException:
        stop.set()  # let the other workers finish their chunk and quit before the staging dir is removed
        for t in threads:
            t.join()
        raise
    finally:
        readahead.stop()
        readahead.join()
        closer.shutdown(wait=True)
    if errors:
        raise errors[0]
    for f in closes:
        f.result()


def _check_paths(adapter_dir: Path, base_dir: Path, output_dir: Path) -> None:
    if not (base_dir / "config.json").is_file():
        raise MergeError(f"{base_dir} is not a model directory (no config.json)")
    for src in (adapter_dir.resolve(), base_dir.resolve()):
        if output_dir.resolve() == src or output_dir.resolve() in src.parents:
            raise MergeError(f"output {output_dir} would replace its own input {src}")
    if os.path.lexists(output_dir) and not (
        output_dir.is_dir() and (not any(output_dir.iterdir()) or (output_dir / "config.json").is_file())
    ):
        raise MergeError(f"output {output_dir} exists and is not a model directory; refusing to replace it")


def merge_streaming(
    adapter_dir: Path,
    base_dir: Path,
    output_dir: Path,
    *,
    max_memory: int = 1 << 30,
    workers: int = 1,
    max_shard_size: int | None = None,
    progress: bool | ProgressFn = True,
    config_overrides: Mapping[str, Any] | None = None,
) -> Path:
    """Write base + LoRA adapter as one safetensors model at `output_dir`, atomically; return `output_dir`.

    config_overrides: config.json values the tuned model was trained with (a raised RoPE base), written into the
    merged model's config.json so it serves with them.
    max_memory bounds the engine's own memory (LoRA factors + one chunk per worker), not the interpreter and torch
    themselves. max_shard_size=None keeps the base's shard files; a byte count reshards in base order.
    progress: True (rich bar on a TTY, plain lines otherwise), False, or a callable(done_bytes, total_bytes).
    """
    try:
        paths = Path(adapter_dir), Path(base_dir), Path(output_dir).absolute()
        return _merge(*paths, max_memory, workers, max_shard_size, progress, config_overrides or {})
    except SafetensorsError as e:  # truncated or corrupt input: one error type for callers, naming the file
        raise MergeError(str(e)) from None


def _merge(
    adapter_dir: Path,
    base_dir: Path,
    output_dir: Path,
    max_memory: int,
    workers: int,
    max_shard_size: int | None,
    progress: bool | ProgressFn,
    config_overrides: Mapping[str, Any],
) -> Path:
    if workers < 1 or max_memory <= 0 or (max_shard_size is not None and max_shard_size <= 0):
        raise ValueError("workers must be >= 1, max_memory and max_shard_size > 0")
    _check_paths(adapter_dir, base_dir, output_dir)
    adapter, deltas, replacements = load_adapter(adapter_dir)
    readers = [adapter]
    try:
        shards, index = _open_base(base_dir)
        readers += [r for _, r in shards]
        plan = _plan(f"adapter {adapter_dir} does not fit base model {base_dir}", adapter, shards, deltas, replacements)
        if max_shard_size is not None:
            plan = _reshard(plan, max_shard_size)
        resident = sum(d.a.nbytes + d.b.nbytes for ds in deltas.values() for d in ds)
        # each worker also holds one tensor's factors converted to the compute dtype (fp64 at worst)
        converted = max((sum(8 * (d.a.numel() + d.b.numel()) for d in ds) for ds in deltas.values()), default=0)
        avail = max_memory - resident - RESERVE - workers * converted
        if avail < workers * MIN_CHUNK:
            raise MergeError(
                f"max_memory={max_memory} is too small: the LoRA factors take {resident} bytes (plus {converted} "
                f"per worker while converted), {RESERVE} are reserved, and {workers} worker(s) need {MIN_CHUNK} each"
            )
        chunk = min(CHUNK_CAP, avail // workers)
        total = sum(tensor_nbytes(it.dtype, it.info.shape) for _, _, items in plan for it in items)
        for r in readers:
            r.advise(0, 0, willneed=False)  # sequential: larger kernel readahead
        with atomic_dir(output_dir) as tmp:
            if (free := shutil.disk_usage(tmp).free) < total:
                raise MergeError(f"{output_dir.parent} has {free} bytes free; the merged model needs {total}")
            outs, tasks = [], []
            for file, meta, items in plan:
                writer = SafetensorsWriter(tmp / file, [(it.name, it.dtype, it.info.shape) for it in items], meta)
                ranges = [(it, r) for it in items for r in _ranges(it, chunk)]
                outs.append(out := _Out(writer, len(ranges)))
                tasks += [_Task(it, out, a, b) for it, (a, b) in ranges]
                if not ranges:
                    writer.close()
            threads = torch.get_num_threads()
            torch.set_num_threads(1)  # parallelism comes from workers: intra-op threads only add sync on 4 MiB chunks
            bar = ByteProgress(progress, total, merge_label(adapter_dir, base_dir))
            try:
                _run(tasks, workers, bar)
            finally:
                bar.close()
                torch.set_num_threads(threads)
                for o in outs:
                    o.writer.abort()  # no-op for shards already closed (fsynced)
            for file, _, _ in plan:
                SafetensorsReader(tmp / file).close()  # re-validate each written header against its file
            if len(plan) > 1 or (index is not None and max_shard_size is None):
                weight_map = {it.name: file for file, _, items in plan for it in items}
                if index is not None and max_shard_size is None:
                    weight_map = index["weight_map"]  # the base's own, in its order
                write_index(tmp, weight_map, total, (index or {}).get("metadata"))
            copy_model_files(tmp, base_dir, tokenizer_dir=adapter_dir)
            if config_overrides:
                override_config(tmp / "config.json", config_overrides)
    finally:
        for r in readers:
            r.close()
    return output_dir
