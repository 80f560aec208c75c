"""Merge a LoRA adapter into a safetensors base model tensor by tensor, in bounded memory at disk speed.

Why not peft's merge_and_unload: it holds the whole model (16 GB for an 8B bf16 base, plus mmap'd pages that
count as RSS). Here the output is planned up front (every tensor's source, deltas and place in its file), then
streamed through merge_pipeline: untouched tensors are read straight into the output blocks, updated ones are
computed in row chunks, W' = W + s * (B @ A) in fp32 cast back to W's dtype by torch's own round-to-nearest-even
conversion. Peak memory is the LoRA factors plus a fixed pool of buffers, whatever the model size. Output shards
keep the base's file names and tensor order; they are built in a `.NAME.*.partial` dir beside the target, which is
swapped into place only when complete.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Mapping
from dataclasses import dataclass
from itertools import groupby
from pathlib import Path
from typing import Any

import torch

from hyperjob.checkpoint.direct_io import ALIGN, BlockFile
from hyperjob.checkpoint.errors import MergeError, SafetensorsError
from hyperjob.checkpoint.hf_layout import (
    INDEX_NAME,
    SHARD_METADATA,
    SINGLE_NAME,
    copy_model_files,
    override_config,
    shard_names,
    write_index,
)
from hyperjob.checkpoint.lora_adapter import FLOAT_DTYPES, Delta, load_adapter, read_json
from hyperjob.checkpoint.merge_pipeline import WRITERS, Item, MergeStats, OutFile, cut_blocks, run_blocks
from hyperjob.checkpoint.safetensors_io import SafetensorsReader, TensorInfo, plan_layout, tensor_nbytes
from hyperjob.checkpoint.stream_support import ByteProgress, ProgressFn, merge_label
from hyperjob.fsutil import atomic_dir

__all__ = ["merge_streaming"]

Plan = list[tuple[str, "dict[str, str] | None", list[Item]]]  # (shard file, shard metadata, tensors)
CHUNK_CAP = 4 << 20  # working bytes per compute chunk: chunks that stay in CPU cache ran 2-4x faster than 64 MiB ones
BLOCK_CAP = 16 << 20  # output block: 16 MiB direct writes ran at 2.5 GB/s, 4 MiB ones at 1.8 (virtio disk)
RESERVE = 16 << 20  # torch and Python bookkeeping around the buffers
MIN_CHUNK, MIN_BLOCK = 256 << 10, 256 << 10


@dataclass(frozen=True)
class Sizing:
    """How the memory budget is spent: fill threads, their compute chunk, and the block buffers."""

    workers: int
    chunk: int
    block: int


def size_buffers(avail: int, workers: int | None, cpus: int) -> Sizing | None:
    """Workers (None: one per CPU, as many as fit), chunk and block sizes within `avail` bytes; None if none fit.

    Each worker holds a compute chunk and its share of the block pool (workers + WRITERS + 1 blocks).
    """
    per_worker, fixed = CHUNK_CAP + BLOCK_CAP, (WRITERS + 1) * BLOCK_CAP
    n = workers or max(1, min(cpus, (avail - fixed) // per_worker))
    chunk = min(CHUNK_CAP, avail // (2 * n))
    block = min(BLOCK_CAP, (avail - n * chunk) // (n + WRITERS + 1)) // ALIGN * ALIGN
    if chunk < min(MIN_CHUNK, CHUNK_CAP) or block < min(MIN_BLOCK, BLOCK_CAP):
        return None
    return Sizing(n, chunk, block)


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
            items.append(Item(name, src, src_info, info.dtype, ds))
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
    workers: int | None = None,
    max_shard_size: int | None = None,
    progress: bool | ProgressFn = True,
    config_overrides: Mapping[str, Any] | None = None,
    stats: MergeStats | None = None,
    direct: bool = True,
) -> Path:
    """Write base + LoRA adapter as one safetensors model at `output_dir`, atomically; return `output_dir`.

    config_overrides: config.json values the tuned model was trained with (a raised RoPE base), written into the
    merged model's config.json so it serves with them.
    max_memory bounds the engine's own memory (LoRA factors + buffers), not the interpreter and torch themselves.
    workers: fill threads; None gives one per usable CPU, as many as the budget allows.
    max_shard_size=None keeps the base's shard files; a byte count reshards in base order.
    progress: True (rich bar on a TTY, plain lines otherwise), False, or a callable(done_bytes, total_bytes).
    stats, if given, is filled with where the time went. direct=False writes through the page cache (tests).
    """
    try:
        paths = Path(adapter_dir), Path(base_dir), Path(output_dir).absolute()
        options = _Options(max_memory, workers, max_shard_size, progress, config_overrides or {}, stats, direct)
        return _merge(*paths, options)
    except SafetensorsError as e:  # truncated or corrupt input: one error type for callers, naming the file
        raise MergeError(str(e)) from None


@dataclass(frozen=True)
class _Options:
    max_memory: int
    workers: int | None
    max_shard_size: int | None
    progress: bool | ProgressFn
    config_overrides: Mapping[str, Any]
    stats: MergeStats | None
    direct: bool


def usable_cpus() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def _sizing(o: _Options, deltas: dict[str, list[Delta]]) -> Sizing:
    """Split the budget: LoRA factors stay resident, each worker also converts one tensor's factors (fp64 at worst)."""
    resident = sum(d.a.nbytes + d.b.nbytes for ds in deltas.values() for d in ds)
    converted = max((sum(8 * (d.a.numel() + d.b.numel()) for d in ds) for ds in deltas.values()), default=0)
    n = o.workers or usable_cpus()
    sizing = size_buffers(o.max_memory - resident - RESERVE - n * converted, o.workers, n)
    if sizing is None:
        raise MergeError(
            f"max_memory={o.max_memory} is too small: the LoRA factors take {resident} bytes (plus {converted} "
            f"per worker while converted), {RESERVE} are reserved, and each of {n} worker(s) needs at least "
            f"{MIN_CHUNK + MIN_BLOCK} more, plus {(WRITERS + 1) * MIN_BLOCK} for the writers"
        )
    return sizing


def _merge(adapter_dir: Path, base_dir: Path, output_dir: Path, o: _Options) -> Path:
    if (o.workers is not None and o.workers < 1) or o.max_memory <= 0 or (o.max_shard_size or 1) <= 0:
        raise ValueError("workers must be >= 1, max_memory and max_shard_size > 0")
    _check_paths(adapter_dir, base_dir, output_dir)
    adapter, deltas, replacements = load_adapter(adapter_dir)
    readers = [adapter]
    try:
        shards, index = _open_base(base_dir)
        readers += [r for _, r in shards]
        plan = _plan(f"adapter {adapter_dir} does not fit base model {base_dir}", adapter, shards, deltas, replacements)
        if o.max_shard_size is not None:
            plan = _reshard(plan, o.max_shard_size)
        sizing = _sizing(o, deltas)
        total = sum(tensor_nbytes(it.dtype, it.info.shape) for _, _, items in plan for it in items)
        for r in readers:
            r.advise(0, 0, willneed=False)  # sequential: larger kernel readahead
        with atomic_dir(output_dir) as tmp:
            if (free := shutil.disk_usage(tmp).free) < total:
                raise MergeError(f"{output_dir.parent} has {free} bytes free; the merged model needs {total}")
            _write_shards(tmp, plan, sizing, o, merge_label(adapter_dir, base_dir), total)
            if len(plan) > 1 or (index is not None and o.max_shard_size is None):
                weight_map = {it.name: file for file, _, items in plan for it in items}
                if index is not None and o.max_shard_size is None:
                    weight_map = index["weight_map"]  # the base's own, in its order
                write_index(tmp, weight_map, total, (index or {}).get("metadata"))
            copy_model_files(tmp, base_dir, tokenizer_dir=adapter_dir)
            if o.config_overrides:
                override_config(tmp / "config.json", o.config_overrides)
    finally:
        for r in readers:
            r.close()
    return output_dir


def _write_shards(tmp: Path, plan: Plan, sizing: Sizing, o: _Options, label: str, total: int) -> None:
    """Every planned shard file in `tmp`, complete and fsynced, its header re-read and checked."""
    outs, blocks = [], []
    try:
        for file, meta, items in plan:
            layout = plan_layout([(it.name, it.dtype, it.info.shape) for it in items], meta)
            out = OutFile(BlockFile(tmp / file, layout.size, direct=o.direct), layout, 0)
            outs.append(out)
            mine = cut_blocks(out, items, sizing.block)
            out.remaining = len(mine)
            blocks += mine
        stats = o.stats if o.stats is not None else MergeStats()
        stats.workers, stats.bytes = sizing.workers, total
        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # parallelism comes from workers: intra-op threads only add sync on 4 MiB chunks
        bar = ByteProgress(o.progress, sum(b.length for b in blocks), label)
        try:
            run_blocks(blocks, workers=sizing.workers, block_bytes=sizing.block, chunk_bytes=sizing.chunk,
                       progress=bar, stats=stats)  # fmt: skip
        finally:
            bar.close()
            torch.set_num_threads(threads)
        stats.direct = all(out.file.direct for out in outs)  # after: a file may fall back to buffered mid-run
    finally:
        for out in outs:
            out.file.abort()  # no-op for files already closed (fsynced)
    for file, _, _ in plan:
        SafetensorsReader(tmp / file).close()  # re-validate each written header against its file
