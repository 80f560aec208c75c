"""Every error the checkpoint code raises on purpose, so callers import them from one place.

All are ValueErrors (bad input, not a bug): the CLI and stages catch them by name and show the message alone,
which always names the offending file or directory. Standard library only: safetensors_io imports it.
"""

from __future__ import annotations

__all__ = ["CheckpointError", "MergeError", "ReplicaDriftError", "SafetensorsError"]


class CheckpointError(ValueError):
    """A Neuron sharded checkpoint cannot be read or consolidated: it is incomplete, corrupt, unsafe to unpickle,
    in a layout hyperjob cannot un-shard, or the output path would replace it."""


class ReplicaDriftError(CheckpointError):
    """Replicated tensors differ across tensor-parallel ranks beyond the threshold and drift was not allowed;
    the message carries the drift report."""


class SafetensorsError(ValueError):
    """A safetensors file is truncated, corrupt or not what the caller expected, or a written one came out
    incomplete; the message names the file. The merge re-raises it as MergeError, the rank file reader (pread
    past the end of a file) as CheckpointError."""


class MergeError(ValueError):
    """A LoRA adapter cannot be merged into a base model: missing files, mismatched shapes or dtypes, an
    unsupported adapter variant, a corrupt input shard, too little memory or disk, or an unsafe output path."""
