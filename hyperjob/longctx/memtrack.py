"""Peak bytes of tensor storage allocated by the ops run under a dispatch mode, on any device, fake tensors included.

Why not the allocator's counters: CPU has none, and the loss benchmark must size a 32K-token x 128K-vocab step
(16.8 GB of logits alone) without allocating it. Under `FakeTensorMode` no memory exists, but every op still
produces tensors with storages of the real size; counting those storages from birth to death gives the same peak
as a real run (bench/loss_memory.py checks both, and against the process's resident memory, at a size that fits).

What counts: each storage an op creates, once (views and in-place results share their input's storage), from the
op that makes it until the storage is freed; autograd's saved tensors, gradients and checkpoint recomputes
included, since backward's ops dispatch through the mode too. Storages that existed before the mode (weights,
inputs) are not counted, nor are scratch buffers an op frees before returning.

Imports torch at import time (TorchDispatchMode is a base class): for the train process, tests and benchmarks only.
"""

from __future__ import annotations

import weakref
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves


def _storage(value: object) -> torch.UntypedStorage | None:
    if not isinstance(value, torch.Tensor):
        return None
    try:
        return value.untyped_storage()
    except (RuntimeError, NotImplementedError):  # sparse and other storage-less layouts
        return None


class PeakMemory(TorchDispatchMode):
    """`with PeakMemory() as mem: ...` then `mem.peak`: the most bytes live at once; `mem.live`: bytes still live."""

    def __init__(self) -> None:
        super().__init__()
        self.live = 0
        self.peak = 0
        self._sizes: dict[int, int] = {}  # id(storage) -> bytes counted; a storage's Python object lives as long as it

    def __torch_dispatch__(
        self, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: dict[str, Any] | None = None
    ) -> Any:
        out = func(*args, **(kwargs or {}))
        inputs = {id(st) for st in map(_storage, tree_leaves((args, kwargs))) if st is not None}
        for storage in map(_storage, tree_leaves(out)):
            if storage is not None and (id(storage) not in inputs or id(storage) in self._sizes):
                self._count(storage)
        return out

    def _count(self, storage: torch.UntypedStorage) -> None:
        key, size = id(storage), storage.nbytes()
        counted = self._sizes.get(key)
        if counted is None:
            weakref.finalize(storage, self._free, key)
        elif size <= counted:
            return
        self._sizes[key] = size  # new, or grown by an in-place resize
        self.live += size - (counted or 0)
        self.peak = max(self.peak, self.live)

    def _free(self, key: int) -> None:
        self.live -= self._sizes.pop(key, 0)
