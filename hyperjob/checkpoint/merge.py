"""Merge a LoRA adapter into its base model: one stable entry point over the streaming engine.

The merge stage, `hyperjob merge` and `hyperjob consolidate --base-model` all call `merge_adapter`; the
engine (`stream_merge`) merges tensor by tensor in bounded memory and publishes the output atomically.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hyperjob.checkpoint.common import parse_size

if TYPE_CHECKING:
    from hyperjob.checkpoint.merge_pipeline import MergeStats


def merge_adapter(
    adapter_dir: Path,
    base_dir: Path,
    output_dir: Path,
    *,
    max_shard_size: str | int | None = None,
    max_memory: str | int = "1GB",
    workers: int | str = "auto",
    progress: bool = True,
    config_overrides: Mapping[str, Any] | None = None,
    stats: MergeStats | None = None,
) -> Path:
    """Write base + adapter into `output_dir`: the base's shard names unless `max_shard_size` reshards.

    workers: "auto" (one per usable CPU, within max_memory) or a count. stats, if given, says where the time went.
    Raises errors.MergeError when they cannot be merged (ValueError for a bad size or worker count).
    """
    from hyperjob.checkpoint.stream_merge import merge_streaming

    return merge_streaming(
        Path(adapter_dir),
        Path(base_dir),
        Path(output_dir),
        max_memory=parse_size(max_memory),
        workers=parse_workers(workers),
        max_shard_size=None if max_shard_size is None else parse_size(max_shard_size),
        progress=progress,
        config_overrides=config_overrides,
        stats=stats,
    )


def parse_workers(value: int | str) -> int | None:
    """None for "auto" (the engine picks), else a positive count; ValueError names the bad value."""
    if value == "auto":
        return None
    try:
        n = int(value)
    except (TypeError, ValueError):
        n = 0
    if n < 1 or isinstance(value, bool):
        raise ValueError(f"workers {value!r}: use a positive number or 'auto'")
    return n
