"""Causal-LM loss without the [tokens, vocab] logits: the LM head and cross-entropy run chunk by chunk.

At 32K tokens and a 128K vocabulary the float32 logits alone are 16.8 GB, more than the whole model's activations.
`chunked_lm_loss` runs the head and the CE on `chunk` tokens at a time, each chunk under non-reentrant
`torch.utils.checkpoint`: forward keeps only the chunk's scalar loss, backward recomputes one chunk's logits at a
time, so the peak is a few chunks' logits instead of all of them (bench/loss_memory.py measures it). It calls the
head module itself per chunk, so any head works: a plain nn.Linear, peft's ModulesToSaveWrapper (trainable head) or
a LoRA-wrapped lm_head, and a frozen head gets no weight gradient. The price is one extra head matmul per chunk in
backward (the recompute).

Labels are ALREADY aligned with `hidden` (labels[i] is the target of position i): the caller shifts, because
sequence parallelism has to shift over the whole sequence before it shards it. Losses are returned as (sum over
valid targets, number of valid targets), so the caller divides by a count summed over micro-batches or ranks;
chunks with no valid target add an exact 0 (a sum, never a 0/0 mean). Logits are upcast to float32 for the CE,
as transformers does.

`lm_loss` dispatches between this, the plain full-logits baseline ("standard") and two optional fused CUDA kernels:
Liger-Kernel's LigerFusedLinearCrossEntropyLoss and Apple's cut-cross-entropy. Those take a weight matrix, not a
module: a ModulesToSaveWrapper is unwrapped to its active nn.Linear (exact), any other wrapper (LoRA on lm_head)
raises, since silently running another implementation would misreport what was measured; use "chunked" there.
Their call sites cannot run on this project's CPU CI (neither package is installed there, both need CUDA), so they
are kept to one call each, written against liger-kernel's and cut-cross-entropy's current signatures.

Imports torch only inside functions: importing this module is cheap (the plan/render verbs never call it).
"""

from __future__ import annotations

import importlib.util
from typing import TYPE_CHECKING, Any, cast

if TYPE_CHECKING:
    import torch

IGNORE_INDEX = -100  # transformers' label value for "no target"
IMPLS = ("standard", "chunked", "liger", "cut-cross-entropy")
# impl -> (module to import, pip package that provides it)
KERNELS = {"liger": ("liger_kernel", "liger-kernel"), "cut-cross-entropy": ("cut_cross_entropy", "cut-cross-entropy")}


def available_kernels() -> dict[str, bool]:
    """Which optional fused kernels are importable here, without importing them (they pull in triton)."""
    return {impl: _installed(module) for impl, (module, _) in KERNELS.items()}


def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # ValueError: sys.modules[module] is None (import blocked)
        return False


def require_kernel(impl: str) -> None:
    """Raise a clear error now (e.g. before loading a model) if `impl` is unknown or its package is missing."""
    if impl not in IMPLS:
        raise ValueError(f"unknown loss implementation {impl!r}: choose one of {', '.join(IMPLS)}")
    if impl in KERNELS and not available_kernels()[impl]:
        module, package = KERNELS[impl]
        raise ImportError(
            f"loss {impl!r} needs the {package!r} package ({module} is not importable): "
            f"pip install {package}  (CUDA only), or use loss 'chunked', which needs nothing extra"
        )


def _flatten(hidden: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[B, S, H] or [T, H] hidden and matching labels -> [T, H], [T]: chunks run over tokens, rows do not matter."""
    if hidden.shape[:-1] != labels.shape:
        raise ValueError(f"labels {tuple(labels.shape)} must match hidden {tuple(hidden.shape)} without its last dim")
    return hidden.reshape(-1, hidden.shape[-1]), labels.reshape(-1)


def _valid_count(labels: torch.Tensor, ignore_index: int) -> torch.Tensor:
    return (labels != ignore_index).sum()


def _head_ce(head: torch.nn.Module, hidden: torch.Tensor, labels: torch.Tensor, ignore_index: int) -> torch.Tensor:
    """Sum of the CE of `hidden`'s tokens: head, float32 upcast (as transformers), sum over valid targets."""
    import torch.nn.functional as F

    logits = head(hidden).float()
    return F.cross_entropy(logits, labels, ignore_index=ignore_index, reduction="sum")


def standard_lm_loss(
    hidden: torch.Tensor, labels: torch.Tensor, head: torch.nn.Module, ignore_index: int = IGNORE_INDEX
) -> tuple[torch.Tensor, torch.Tensor]:
    """The baseline: all logits at once. (CE sum over valid targets, number of valid targets)."""
    flat_hidden, flat_labels = _flatten(hidden, labels)
    return _head_ce(head, flat_hidden, flat_labels, ignore_index), _valid_count(flat_labels, ignore_index)


def chunked_lm_loss(
    hidden: torch.Tensor, labels: torch.Tensor, head: torch.nn.Module, chunk: int, ignore_index: int = IGNORE_INDEX
) -> tuple[torch.Tensor, torch.Tensor]:
    """(CE sum over valid targets, number of valid targets), never holding more than one chunk's logits.

    Every token is covered: the last chunk is the remainder (T need not be a multiple of `chunk`).
    """
    import torch
    from torch.utils.checkpoint import checkpoint

    if chunk < 1:
        raise ValueError(f"chunk must be >= 1 token, got {chunk}")
    flat_hidden, flat_labels = _flatten(hidden, labels)
    tokens = flat_hidden.shape[0]
    total: torch.Tensor | None = None
    for start in range(0, max(tokens, 1), chunk):  # max: an empty input still returns a (zero) loss
        part_hidden, part_labels = flat_hidden[start : start + chunk], flat_labels[start : start + chunk]
        if torch.is_grad_enabled():
            part = checkpoint(_head_ce, head, part_hidden, part_labels, ignore_index, use_reentrant=False)
        else:  # evaluation: nothing to recompute
            part = _head_ce(head, part_hidden, part_labels, ignore_index)
        total = part if total is None else total + part
    assert total is not None
    return total, _valid_count(flat_labels, ignore_index)


def plain_linear(head: torch.nn.Module, impl: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(weight, bias) of a head a fused kernel can take; unwraps peft's ModulesToSaveWrapper, refuses other wrappers."""
    import torch

    module, wrapper = head, cast(Any, head)
    if hasattr(wrapper, "modules_to_save") and hasattr(wrapper, "original_module"):  # peft ModulesToSaveWrapper
        active = [name for name in wrapper.active_adapters if name in wrapper.modules_to_save]
        module = (
            wrapper.original_module if wrapper.disable_adapters or not active else wrapper.modules_to_save[active[0]]
        )
    if type(module) is not torch.nn.Linear:
        raise ValueError(
            f"loss {impl!r} takes the LM head's weight matrix, but the head is a {type(module).__name__} "
            "(LoRA on lm_head?): use loss 'chunked', which calls any head module chunk by chunk"
        )
    return module.weight, module.bias


def _liger_loss(hidden: torch.Tensor, labels: torch.Tensor, head: torch.nn.Module, ignore_index: int) -> torch.Tensor:
    """Untested here (needs liger-kernel + CUDA). Liger picks its own chunk size from V/H."""
    from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

    weight, bias = plain_linear(head, "liger")
    loss_fn = LigerFusedLinearCrossEntropyLoss(ignore_index=ignore_index, reduction="sum")
    return loss_fn(weight, hidden, labels, bias)  # forward(lin_weight, _input, target, bias)


def _cce_loss(hidden: torch.Tensor, labels: torch.Tensor, head: torch.nn.Module, ignore_index: int) -> torch.Tensor:
    """Untested here (needs cut-cross-entropy + CUDA). shift=0: our labels are already aligned."""
    from cut_cross_entropy import linear_cross_entropy

    weight, bias = plain_linear(head, "cut-cross-entropy")
    return linear_cross_entropy(hidden, weight, labels, bias=bias, ignore_index=ignore_index, reduction="sum")


def lm_loss(
    hidden: torch.Tensor,
    labels: torch.Tensor,
    head: torch.nn.Module,
    *,
    impl: str,
    chunk: int,
    ignore_index: int = IGNORE_INDEX,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(CE sum over valid targets, number of valid targets) by `impl`, one of IMPLS; `chunk` is for "chunked"."""
    require_kernel(impl)
    if impl == "standard":
        return standard_lm_loss(hidden, labels, head, ignore_index)
    if impl == "chunked":
        return chunked_lm_loss(hidden, labels, head, chunk, ignore_index)
    if hidden.device.type != "cuda":
        raise ValueError(f"loss {impl!r} is a CUDA kernel; hidden states are on {hidden.device.type}")
    flat_hidden, flat_labels = _flatten(hidden, labels)
    fused = _liger_loss if impl == "liger" else _cce_loss
    return fused(flat_hidden, flat_labels, head, ignore_index), _valid_count(flat_labels, ignore_index)
