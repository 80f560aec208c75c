"""Save the trained LoRA adapter under any parallel.mode: every rank gathers, rank 0 writes, atomically.

Under ddp each rank holds the whole adapter, but under FSDP2 each holds a shard of every tensor (a DTensor) and
under DeepSpeed ZeRO-3 an empty placeholder plus a partition, so rank 0's `save_pretrained` alone would write
shards or nothing. And accelerate's FSDP activation checkpointing wraps each decoder layer in a
CheckpointWrapper whose state-dict hook strips `_checkpoint_wrapped_module.` while peft picks the adapter's
entries by module names that keep it: peft's save_pretrained (and so Trainer.save_model) then silently writes
no LoRA weight of any checkpointed layer. Here peft picks from names that match its own walk of the modules,
only the tensors it picked are gathered (the adapter, not the frozen base), peft writes them, and the keys are
then normalised to the standard ones. Imported only by the train process; torch is imported inside functions.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from hyperjob.fsutil import atomic_dir

ADAPTER_WEIGHTS = "adapter_model.safetensors"
# Module-name segments that wrappers add and a standard PEFT checkpoint never has.
_WRAPPER_SEGMENTS = ("_checkpoint_wrapped_module.", "_fsdp_wrapped_module.", "_orig_mod.")


def save_adapter(trainer: Any, model: Any, tokenizer: Any, dest: Path) -> None:
    """Write `model`'s adapter (peft's file set) and `tokenizer`'s files to `dest`. Call on EVERY rank.

    `model` is the PeftModel (or a DDP / DeepSpeed engine wrapping it); `trainer` is the Trainer that trained it,
    used only to find the model when `model` is None. Only rank 0 writes, into a temp dir beside `dest` that is
    renamed over it, so no rank needs to agree on a temp path. Every rank returns once `dest` is complete, and
    every rank raises if rank 0 could not write it (no rank is left waiting in a collective).
    """
    peft_model = _unwrap(model if model is not None else trainer.model)
    state = _gather_adapter(peft_model)
    error: str | None = None
    if _rank() == 0:
        try:
            with atomic_dir(Path(dest)) as tmp:
                peft_model.save_pretrained(tmp, state_dict=state)
                _standardise_keys(tmp / ADAPTER_WEIGHTS)
                if tokenizer is not None:
                    tokenizer.save_pretrained(tmp)
        except Exception as e:
            error = f"{type(e).__name__}: {e}"
            _share_outcome(error)
            raise
    _share_outcome(error)


def _rank() -> int:
    import torch.distributed as dist

    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def _share_outcome(error: str | None) -> None:
    """Rank 0 tells the others whether the adapter was written; they raise if it was not."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return
    box: list[str | None] = [error]
    dist.broadcast_object_list(box, src=0)
    if box[0] is not None and dist.get_rank() != 0:
        raise RuntimeError(f"rank 0 failed to save the adapter: {box[0]}")


def _unwrap(model: Any) -> Any:
    """The PeftModel inside DDP, a DeepSpeed engine or torch.compile (FSDP2 shards in place: nothing to unwrap)."""
    from accelerate.utils import extract_model_from_parallel

    return extract_model_from_parallel(model, keep_torch_compile=False)


def _module_names(model: Any) -> dict[str, Any]:
    """Parameters and buffers by the names named_modules() gives, which peft's adapter selection walks.

    Unlike state_dict(), these keep the `_checkpoint_wrapped_module.` segments: peft matches them against module
    names, so both must carry them. Values are the live tensors (Parameters, DTensors, ZeRO-3 placeholders).
    """
    tensors: dict[str, Any] = dict(model.named_parameters(remove_duplicate=False))
    tensors.update(model.named_buffers(remove_duplicate=False))
    return tensors


def _gather_adapter(peft_model: Any) -> dict[str, Any]:
    """The full CPU tensors of what peft saves, by module name; on rank 0 only (others get {}). Collective.

    Every rank walks the same names in the same order, so the per-tensor gathers pair up across ranks.
    """
    import torch
    from peft import get_peft_model_state_dict

    tensors = _module_names(peft_model)
    picked = {id(t) for t in get_peft_model_state_dict(peft_model, state_dict=tensors).values()}
    known = {id(t) for t in tensors.values()}
    if not picked <= known:  # peft built new tensors instead of selecting: gather everything, let peft pick
        picked = known
    keep = _rank() == 0
    gathered: dict[int, Any] = {}  # tied weights are gathered once
    out: dict[str, Any] = {}
    with torch.no_grad():
        for name, tensor in tensors.items():
            if id(tensor) not in picked:
                continue
            if id(tensor) not in gathered:
                gathered[id(tensor)] = _full_tensor(tensor)
            if keep:
                out[name] = gathered[id(tensor)]
    return out


def _full_tensor(tensor: Any) -> Any:
    """The whole tensor on CPU, whichever way it is sharded. Collective for sharded tensors."""
    from torch.distributed.tensor import DTensor

    if isinstance(tensor, DTensor):  # FSDP2 (and tensor parallel): all-gather the shards
        return tensor.full_tensor().detach().to("cpu", copy=True)
    if hasattr(tensor, "ds_id") or hasattr(tensor, "_hp_mapping"):  # DeepSpeed ZeRO-3 partition / ZeRO-1,2 master
        return _deepspeed_full(tensor)
    return tensor.detach().to("cpu", copy=True)


def _deepspeed_full(param: Any) -> Any:
    """DeepSpeed's fp32 master copy of a trained parameter (what a ddp run's adapter holds), else the gathered
    16-bit weights (a frozen ZeRO-3 parameter the optimizer does not own). Both calls are collective."""
    from deepspeed import zero
    from deepspeed.utils import safe_get_full_fp32_param

    if param.requires_grad:
        full = safe_get_full_fp32_param(param)
        if full is not None:
            return full.detach().to("cpu", copy=True)
    with zero.GatheredParameters([param], modifier_rank=None):
        return param.detach().to("cpu", copy=True)


def _standard_key(key: str) -> str:
    for segment in _WRAPPER_SEGMENTS:
        key = key.replace(segment, "")
    return key.removeprefix("module.")


def _standardise_keys(path: Path) -> None:
    """Rewrite the saved weights with the standard PEFT keys when wrappers' segments slipped into them."""
    from safetensors.torch import load_file, save_file

    weights = load_file(path)
    renamed = {_standard_key(k): v for k, v in weights.items()}
    if len(renamed) != len(weights):
        raise RuntimeError(f"adapter keys collide once wrapper names are removed: {sorted(weights)}")
    if renamed.keys() != weights.keys():
        save_file(renamed, path, metadata={"format": "pt"})
