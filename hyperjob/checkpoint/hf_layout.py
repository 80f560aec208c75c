"""The Hugging Face model folder that consolidation and merge both write, defined once.

What `from_pretrained` expects beside the weights: `model.safetensors`, or `model-0000i-of-0000N.safetensors`
shards listed by `model.safetensors.index.json`; the model's `config.json`, `generation_config.json` and tokenizer
files. Every file is written durably (fsynced before the folder is swapped into place by fsutil.atomic_dir), so a
crash right after a run reports success never leaves an output whose small files are empty.

Standard library only at import: the torch side of the dtype map is built on first use, so the size parser and
the CLI's option checks do not pay for importing torch.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

__all__ = [
    "ADAPTER_CONFIG",
    "ADAPTER_WEIGHTS",
    "INDEX_NAME",
    "MODEL_FILES",
    "SHARD_METADATA",
    "SINGLE_NAME",
    "TOKENIZER_FILES",
    "copy_durable",
    "copy_model_files",
    "safetensors_dtypes",
    "shard_names",
    "torch_dtypes",
    "write_durable",
    "write_index",
    "write_json",
]

SINGLE_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
ADAPTER_WEIGHTS, ADAPTER_CONFIG = "adapter_model.safetensors", "adapter_config.json"  # a PEFT adapter folder
SHARD_METADATA = {"format": "pt"}  # the header metadata save_pretrained writes; transformers checks for it
# Copied verbatim beside merged or consolidated weights, so the output loads like the original model.
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
    "chat_template.jinja", "chat_template.json", "vocab.json", "merges.txt",
)  # fmt: skip
MODEL_FILES = ("config.json", "generation_config.json", *TOKENIZER_FILES)
# safetensors dtype -> torch attribute: every dtype both sides know (sub-byte and unsigned wide types have no torch
# equivalent here).
_TORCH_NAMES = {
    "F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16", "I64": "int64", "I32": "int32",
    "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool", "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2",
}  # fmt: skip


@functools.cache
def torch_dtypes() -> dict[str, torch.dtype]:
    """safetensors dtype string -> torch dtype (imports torch on first call)."""
    import torch

    return {name: getattr(torch, attr) for name, attr in _TORCH_NAMES.items()}


@functools.cache
def safetensors_dtypes() -> dict[torch.dtype, str]:
    """torch dtype -> safetensors dtype string; a dtype missing here cannot be written as safetensors."""
    return {dtype: name for name, dtype in torch_dtypes().items()}


def shard_names(sizes: Sequence[int], max_shard_size: int) -> list[str]:
    """HF file name of each tensor, given their byte sizes in write order.

    Greedy: a new shard starts when the next tensor would push the current one past `max_shard_size` (unless the
    current one holds no bytes yet), so a larger tensor gets a shard of its own. One shard is `model.safetensors`.
    """
    groups: list[int] = []  # tensors per shard
    size = 0
    for n in sizes:
        if not groups or (size + n > max_shard_size and size > 0):
            groups.append(0)
            size = 0
        groups[-1] += 1
        size += n
    if len(groups) == 1:
        return [SINGLE_NAME] * len(sizes)
    return [
        f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors" for i, count in enumerate(groups) for _ in range(count)
    ]


def write_durable(path: Path, data: bytes) -> None:
    """Write `data` to `path` and fsync it."""
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def copy_durable(src: Path, dst: Path) -> None:
    """Copy the bytes of `src` to `dst` and fsync it (streamed: a large tokenizer is never held whole)."""
    with open(src, "rb") as fin, open(dst, "wb") as fout:
        shutil.copyfileobj(fin, fout)
        fout.flush()
        os.fsync(fout.fileno())


def write_json(path: Path, obj: Any, *, sort_keys: bool = False) -> None:
    """`obj` as JSON with indent 2 and a final newline, as transformers and peft write their files; durable."""
    write_durable(path, (json.dumps(obj, indent=2, sort_keys=sort_keys) + "\n").encode("utf-8"))


def write_index(
    folder: Path, weight_map: Mapping[str, str], total_size: int, metadata: Mapping[str, Any] | None = None
) -> None:
    """Write `model.safetensors.index.json`: `metadata` (e.g. the base's) with `total_size` set, then the
    weight map in the order given (save_pretrained sorts it by name; a merge keeps its base's order)."""
    index = {"metadata": dict(metadata or {}) | {"total_size": total_size}, "weight_map": dict(weight_map)}
    write_json(folder / INDEX_NAME, index)


def copy_model_files(folder: Path, model_dir: Path | None, tokenizer_dir: Path | None = None) -> list[str]:
    """Copy MODEL_FILES found in `model_dir` into `folder`, durably; return the names copied, in MODEL_FILES order.

    A tokenizer file missing from `model_dir` is taken from `tokenizer_dir` when there (a merge's adapter dir:
    training saves the tokenizer beside the adapter, and a base may lack one).
    """
    copied: list[str] = []
    for name in MODEL_FILES:
        src = model_dir / name if model_dir is not None else None
        if (src is None or not src.is_file()) and tokenizer_dir is not None and name in TOKENIZER_FILES:
            src = tokenizer_dir / name
        if src is not None and src.is_file():
            copy_durable(src, folder / name)
            copied.append(name)
    return copied


def override_config(path: Path, overrides: Mapping[str, Any]) -> None:
    """Rewrite a config.json with `overrides` applied (hyperjob.longctx.rope knows where each value lives)."""
    from hyperjob.longctx.rope import apply_to_dict

    config = json.loads(path.read_text(encoding="utf-8"))
    write_json(path, apply_to_dict(config, overrides))
