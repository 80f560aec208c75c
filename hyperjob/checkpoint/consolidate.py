"""`hyperjob consolidate`: an optimum-neuron TP/PP checkpoint -> a standard PEFT adapter or HF model, on any CPU.

Both entry points validate the whole checkpoint first, then stream: one saved parameter's tp rank tensors are loaded,
combined and written before the next is read, so peak memory is about one parameter (times tp) whatever the model
size. Output goes to a temp dir beside `output_dir`, renamed into place only once complete: a failure (including
replica drift, detected during the pass) leaves any previous output untouched.

The safetensors header is computed up front from the planned output shapes (the un-shard rules run on meta tensors),
then each tensor's bytes are appended as it is produced (safetensors_io.SafetensorsWriter).
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from hyperjob.checkpoint.common import parse_size
from hyperjob.checkpoint.drift import DEFAULT_DRIFT_THRESHOLD, DriftReport
from hyperjob.checkpoint.errors import CheckpointError
from hyperjob.checkpoint.hf_layout import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    INDEX_NAME,
    SHARD_METADATA,
    copy_model_files,
    safetensors_dtypes,
    shard_names,
    write_index,
    write_json,
)
from hyperjob.checkpoint.reader import ShardedCheckpoint, resolve_checkpoint, validate
from hyperjob.checkpoint.safetensors_io import SafetensorsWriter
from hyperjob.checkpoint.unshard import Step, build_plan, iter_unsharded, planned_outputs
from hyperjob.fsutil import atomic_dir

__all__ = ["ConsolidateResult", "consolidate_adapter", "consolidate_any", "consolidate_full", "unfused_adapter_config"]

Planned = list[tuple[str, tuple[int, ...], torch.dtype]]


@dataclass
class ConsolidateResult:
    output_dir: Path
    kind: str  # "lora" or "full"
    source: Path  # the shards dir that was read
    tp_size: int
    pp_size: int
    xser: bool
    files: list[str]
    tensors: int
    total_bytes: int
    drift: DriftReport
    notes: list[str] = field(default_factory=list)


def _nbytes(shape: tuple[int, ...], dtype: torch.dtype) -> int:
    n = dtype.itemsize
    for d in shape:
        n *= d
    return n


class _SafetensorsStream:
    """One safetensors file whose tensors arrive one by one in the planned order (layout fixed up front, bytes
    appended by safetensors_io's writer); each tensor is checked against the plan before its bytes go out."""

    def __init__(self, path: Path, planned: Planned) -> None:
        if sys.byteorder != "little":
            raise RuntimeError("safetensors data is little-endian; this writer does not byte-swap")
        st_dtypes = safetensors_dtypes()
        missing = sorted({str(d) for _, _, d in planned if d not in st_dtypes})
        if missing:
            raise CheckpointError(f"{path.name}: dtypes {', '.join(missing)} have no safetensors equivalent")
        entries = [(name, st_dtypes[dtype], shape) for name, shape, dtype in planned]
        self.path, self._pending = path, list(reversed(planned))
        self._writer = SafetensorsWriter(path, entries, SHARD_METADATA)

    def write(self, name: str, tensor: torch.Tensor) -> None:
        want = self._pending.pop() if self._pending else None
        got = (name, tuple(tensor.shape), tensor.dtype)
        if want != got:
            raise RuntimeError(f"{self.path}: planned {want}, produced {got}")  # a bug, not a checkpoint problem
        if tensor.numel():
            self._writer.write(tensor.detach().contiguous().reshape(-1).view(torch.uint8).numpy().data)

    def close(self) -> None:
        self._writer.close()

    def abort(self) -> None:
        self._writer.abort()


def _write_files(folder: Path, tensors: Iterator[tuple[str, torch.Tensor]], planned: Planned, names: list[str]) -> None:
    """Stream the tensors into their planned files (names[i] for the i-th tensor), one file open at a time."""
    writer: _SafetensorsStream | None = None
    try:
        for i, (name, tensor) in enumerate(tensors):
            if writer is None or writer.path.name != names[i]:
                if writer is not None:
                    writer.close()
                chunk = [p for p, n in zip(planned, names, strict=True) if n == names[i]]
                writer = _SafetensorsStream(folder / names[i], chunk)
            writer.write(name, tensor)
    except BaseException:
        if writer is not None:
            writer.abort()
        raise
    if writer is not None:
        writer.close()


class _Progress:
    def __init__(self, enabled: bool, label: str) -> None:
        self.enabled, self.label, self.last = enabled, label, 0.0

    def __call__(self, i: int, n: int, step: Step) -> None:
        now = time.monotonic()
        if self.enabled and (now - self.last > 2.0 or i + 1 == n):
            self.last = now
            print(f"{self.label}: {i + 1}/{n} parameters ({step.key})", file=sys.stderr, flush=True)


def _prepare(
    checkpoint: Path, output_dir: Path, kind: str, adapter_name: str
) -> tuple[ShardedCheckpoint, list[Step], Planned]:
    """Resolve, validate and plan; nothing is written yet."""
    ckpt = resolve_checkpoint(Path(checkpoint), adapter_name)
    if ckpt.kind != kind:
        other = "consolidate_full" if ckpt.kind == "full" else "consolidate_adapter"
        raise CheckpointError(f"{ckpt.shards_dir}: a {ckpt.kind} checkpoint; use {other}")
    source, target = ckpt.shards_dir.resolve(), Path(output_dir).resolve()
    if target == source or target in source.parents:
        raise CheckpointError(f"{output_dir}: output would replace the checkpoint it is read from ({ckpt.shards_dir})")
    validate(ckpt)
    steps = build_plan(ckpt)
    planned = planned_outputs(ckpt, steps)
    if not planned:
        raise CheckpointError(f"{ckpt.shards_dir}: the rank files hold no tensors")
    return ckpt, steps, planned


def _result(
    ckpt: ShardedCheckpoint, output_dir: Path, files: list[str], planned: Planned, drift: DriftReport, notes: list[str]
) -> ConsolidateResult:
    total = sum(_nbytes(s, d) for _, s, d in planned)
    return ConsolidateResult(
        output_dir=output_dir,
        kind=ckpt.kind,
        source=ckpt.shards_dir,
        tp_size=ckpt.tp_size,
        pp_size=ckpt.pp_size,
        xser=ckpt.xser,
        files=files,
        tensors=len(planned),
        total_bytes=total,
        drift=drift,
        notes=notes,
    )


def _fused_targets(ckpt: ShardedCheckpoint) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for stage in ckpt.stages.values():
        for _, cls, f in stage.specs:
            if cls == "FusedLinearsSpec":
                out[f["fused_linear_name"]] = list(f["linear_names"])
            elif cls == "GQAQKVColumnParallelLinearSpec":
                out[f["gqa_qkv_projection_name"]] = [f[f"{x}_projection_name"] for x in ("query", "key", "value")]
    return out


def unfused_adapter_config(config: dict[str, Any], fused: dict[str, list[str]]) -> tuple[dict[str, Any], list[str]]:
    """target_modules with Neuron's fused names (gate_up_proj, qkv_proj) replaced by the linears they fuse.
    optimum-neuron already restores them on save (NeuronPeftModel.save_pretrained -> to_original_peft_config), so
    this is normally a no-op; it guards against hand-edited or older configs."""
    config = dict(config)
    targets = config.get("target_modules")
    notes: list[str] = []
    if isinstance(targets, list):
        new: list[str] = []
        for t in targets:
            for name in fused.get(t, [t]):
                if name not in new:
                    new.append(name)
        if new != targets:
            notes.append(f"adapter_config target_modules {targets} -> {new}")
        config["target_modules"] = new
    elif isinstance(targets, str) and any(f in targets for f in fused):
        notes.append(f"adapter_config target_modules pattern {targets!r} names fused Neuron modules; left unchanged")
    config["inference_mode"] = True
    return config, notes


def consolidate_adapter(
    checkpoint: Path,
    output_dir: Path,
    *,
    adapter_name: str = "default",
    allow_drift: bool = False,
    drift_threshold: float = DEFAULT_DRIFT_THRESHOLD,
    progress: bool = True,
) -> ConsolidateResult:
    """Write `adapter_model.safetensors` (one file, standard PEFT keys) and `adapter_config.json` into `output_dir`."""
    ckpt, steps, planned = _prepare(Path(checkpoint), Path(output_dir), "lora", adapter_name)
    assert ckpt.adapter_config is not None  # validate() requires it
    config, notes = unfused_adapter_config(ckpt.adapter_config, _fused_targets(ckpt))
    report = DriftReport(drift_threshold, allow_drift)
    output_dir = Path(output_dir)
    with atomic_dir(output_dir) as tmp:
        tensors = iter_unsharded(ckpt, report, steps, _Progress(progress, "consolidate adapter"))
        _write_files(tmp, tensors, planned, [ADAPTER_WEIGHTS] * len(planned))
        write_json(tmp / ADAPTER_CONFIG, config, sort_keys=True)  # as peft writes it
    files = [ADAPTER_WEIGHTS, ADAPTER_CONFIG]
    return _result(ckpt, output_dir, files, planned, report, ckpt.notes + notes)


def consolidate_full(
    checkpoint: Path,
    output_dir: Path,
    *,
    max_shard_size: int | str = "5GB",
    allow_drift: bool = False,
    drift_threshold: float = DEFAULT_DRIFT_THRESHOLD,
    progress: bool = True,
) -> ConsolidateResult:
    """Write HF safetensors shards (+ index when more than one), config/generation config and tokenizer files."""

    ckpt, steps, planned = _prepare(Path(checkpoint), Path(output_dir), "full", "default")
    names = shard_names([_nbytes(s, d) for _, s, d in planned], parse_size(max_shard_size))
    report = DriftReport(drift_threshold, allow_drift)
    notes = list(ckpt.notes)
    output_dir = Path(output_dir)
    files = list(dict.fromkeys(names))
    with atomic_dir(output_dir) as tmp:
        _write_files(tmp, iter_unsharded(ckpt, report, steps, _Progress(progress, "consolidate")), planned, names)
        if len(files) > 1:
            weight_map = sorted((p[0], n) for p, n in zip(planned, names, strict=True))  # save_pretrained's order
            write_index(tmp, dict(weight_map), sum(_nbytes(s, d) for _, s, d in planned))
            files.append(INDEX_NAME)
        files += copy_model_files(tmp, ckpt.model_dir)
        if "config.json" not in files:
            notes.append(f"no config.json beside {ckpt.shards_dir}: copy the base model's config.json into the output")
    return _result(ckpt, output_dir, files, planned, report, notes)


def consolidate_any(
    checkpoint: Path,
    output_dir: Path,
    *,
    adapter_name: str = "default",
    allow_drift: bool = False,
    drift_threshold: float = DEFAULT_DRIFT_THRESHOLD,
    max_shard_size: int | str | None = None,
    progress: bool = True,
) -> ConsolidateResult:
    """consolidate_adapter or consolidate_full, whichever the checkpoint holds (max_shard_size: full only)."""
    if resolve_checkpoint(Path(checkpoint), adapter_name).kind == "lora":
        return consolidate_adapter(
            checkpoint, output_dir, adapter_name=adapter_name, allow_drift=allow_drift,
            drift_threshold=drift_threshold, progress=progress,
        )  # fmt: skip
    return consolidate_full(
        checkpoint, output_dir, max_shard_size=max_shard_size or "5GB", allow_drift=allow_drift,
        drift_threshold=drift_threshold, progress=progress,
    )  # fmt: skip
