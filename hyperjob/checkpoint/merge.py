"""Merge a LoRA adapter into its base model and save a standalone model directory.

This in-memory version loads the whole base model; the signature of `merge_adapter` is kept so a
streaming, shard-by-shard engine can replace it without touching callers.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path
from typing import Any

# Tokenizer and chat files copied verbatim from the base, so the merged dir loads like the original.
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer.model",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
    "vocab.json",
    "merges.txt",
)
_UNITS = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}


class MergeError(ValueError):
    """The adapter and base model cannot be merged (missing files, mismatched shapes or modules)."""


def parse_size(size: str | int) -> int:
    """'200KB' -> 200000, '1.5GiB' -> bytes; accepts what config's merge.max_shard_size accepts."""
    if isinstance(size, int):
        return size
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]+)\s*", size)
    if not m or m.group(2).upper() not in _UNITS:
        raise ValueError(f"size {size!r} must be a number followed by one of B, KB, MB, GB, KiB, MiB, GiB")
    return int(float(m.group(1)) * _UNITS[m.group(2).upper()])


def _check_inputs(adapter_dir: Path, base_dir: Path) -> None:
    if not (adapter_dir / "adapter_config.json").is_file():
        raise MergeError(f"{adapter_dir} is not a PEFT adapter (no adapter_config.json)")
    if not (base_dir / "config.json").is_file():
        raise MergeError(f"{base_dir} is not a model directory (no config.json)")


def _load_merged(adapter_dir: Path, base_dir: Path) -> Any:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from hyperjob.stages.common import dtype_kwargs

    # "auto": keep the dtype the base was stored in (bf16 for real checkpoints), so the merge halves no memory.
    base = AutoModelForCausalLM.from_pretrained(base_dir, low_cpu_mem_usage=True, **dtype_kwargs("auto"))
    try:
        model = PeftModel.from_pretrained(base, adapter_dir)
    except (RuntimeError, ValueError, KeyError) as e:
        detail = str(e).strip().splitlines()
        reason = next((line.strip() for line in detail if "size mismatch" in line), detail[0] if detail else "")
        raise MergeError(f"adapter {adapter_dir} does not match base model {base_dir}: {reason[:300]}") from None
    return model.merge_and_unload()


def merge_adapter(adapter_dir: Path, base_dir: Path, output_dir: Path, *, max_shard_size: str = "5GB") -> Path:
    """Write base+adapter as one model into `output_dir` (safetensors shards, index when sharded), atomically."""
    from hyperjob.fsutil import atomic_dir

    adapter_dir, base_dir, output_dir = Path(adapter_dir), Path(base_dir), Path(output_dir)
    _check_inputs(adapter_dir, base_dir)
    shard_bytes = parse_size(max_shard_size)
    merged = _load_merged(adapter_dir, base_dir)
    with atomic_dir(output_dir) as tmp:
        merged.save_pretrained(tmp, max_shard_size=shard_bytes)
        for name in TOKENIZER_FILES:
            src = base_dir / name if (base_dir / name).is_file() else adapter_dir / name
            if src.is_file():
                shutil.copy2(src, tmp / name)
        if not (tmp / "generation_config.json").is_file() and (base_dir / "generation_config.json").is_file():
            shutil.copy2(base_dir / "generation_config.json", tmp / "generation_config.json")
    return output_dir
