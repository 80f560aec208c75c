"""Ulysses (all-to-all) sequence parallelism for the HF trainer path.

Every process of an SP group of k holds a contiguous 1/k of each sample's tokens, so activation memory per process
falls by k. Everything outside attention is token-wise and runs on the local slice unchanged. Attention needs the
whole sequence, so around it one all-to-all turns ``[B, S/k, H, D]`` (own tokens, all heads) into ``[B, S, H/k, D]``
(all tokens, own heads), the model's own attention kernel runs, and a second all-to-all turns the result back.

The pure rules (`sp_problems`, `kv_replication`) import without torch because the planner calls them; everything
else imports torch inside the function and is meant for the train process only.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from torch import Tensor

IGNORE_INDEX = -100
SHIFT_LABELS = "shift_labels"
_PREFIX = "hyperjob_ulysses_"
# Registered names avoid "flash": transformers treats any name containing it as a flash kernel to load.
_INNER = {"sdpa": "sdpa", "eager": "eager", "flash_attention_2": "fa2", "flash_attention_3": "fa3"}
_FLASH = frozenset({"flash_attention_2", "flash_attention_3"})
# Keys that travel per token from a rank's own slice and would be wrong once the sequence is gathered.
_LOCAL_ONLY_KWARGS = ("position_ids", "cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k")


# ---------------------------------------------------------------- pure rules (no torch)
def _divisors(n: int) -> str:
    return ", ".join(str(d) for d in range(1, n + 1) if n % d == 0)


def kv_replication(kv_heads: int, sp: int) -> int:
    """How many copies of each KV head are made before the all-to-all.

    With ``kv_heads >= sp`` the KV heads are split like the query heads (1: no copy). With fewer KV heads than ranks
    (``sp % kv_heads == 0``) every rank still needs the one KV head its query heads read, so each KV head is repeated
    ``sp // kv_heads`` times and every rank receives exactly one copy; the gradients of the copies add up again in
    backward.
    """
    return sp // kv_heads if kv_heads < sp else 1


def sp_problems(heads: int, kv_heads: int, seq_len: int, sp: int) -> list[str]:
    """Why ``parallel.sequence=sp`` cannot run this model at this length; empty when it can."""
    if sp == 1:
        return []
    out: list[str] = []
    if heads % sp:
        out.append(
            f"parallel.sequence={sp} does not divide the model's {heads} attention heads (allowed: {_divisors(heads)})"
        )
    if kv_heads % sp and sp % kv_heads:
        out.append(
            f"parallel.sequence={sp} and the model's {kv_heads} key/value heads: one must divide the other "
            f"(allowed: divisors of {kv_heads} ({_divisors(kv_heads)}) or multiples of {kv_heads})"
        )
    if seq_len % sp:
        out.append(
            f"parallel.sequence={sp} does not divide training.seq_len={seq_len}: every rank needs an equal slice "
            f"(use a seq_len that is a multiple of {sp}, e.g. {seq_len + sp - seq_len % sp})"
        )
    return out


# ---------------------------------------------------------------- process groups
@dataclass(frozen=True)
class SPGroup:
    """This process's place in the DP x SP grid: SP group = ranks ``dp_rank*size .. dp_rank*size+size-1``."""

    size: int
    rank: int
    group: Any  # torch.distributed.ProcessGroup; None when size == 1 (no collective is ever issued then)
    dp_rank: int
    dp_size: int

    @classmethod
    def single(cls, dp_rank: int = 0, dp_size: int = 1) -> SPGroup:
        """No sequence parallelism: every helper below becomes the plain single-process computation."""
        return cls(size=1, rank=0, group=None, dp_rank=dp_rank, dp_size=dp_size)


def sp_group(sp: int) -> SPGroup:
    """Create the SP groups (consecutive ranks, so a group stays inside a node) and return this rank's.

    ``new_group`` is collective: every rank creates every group, in the same order, even those it is not in.
    """
    import torch.distributed as dist

    if not dist.is_available() or not dist.is_initialized():
        if sp != 1:
            raise RuntimeError(f"parallel.sequence={sp} needs torch.distributed to be initialised first")
        return SPGroup.single()
    world, rank = dist.get_world_size(), dist.get_rank()
    if world % sp:
        raise ValueError(f"parallel.sequence={sp} does not divide the {world} processes (allowed: {_divisors(world)})")
    if sp == 1:
        return SPGroup.single(dp_rank=rank, dp_size=world)
    mine = None
    for g in range(world // sp):
        ranks = list(range(g * sp, (g + 1) * sp))
        group = dist.new_group(ranks)
        if rank in ranks:
            mine = group
    return SPGroup(size=sp, rank=rank % sp, group=mine, dp_rank=rank // sp, dp_size=world // sp)


# ---------------------------------------------------------------- batch sharding
def shift_labels(labels: Tensor, position_ids: Tensor | None = None) -> Tensor:
    """Next-token targets for the whole row: ``out[i] = labels[i+1]``, last = -100.

    Shifting must happen before slicing, or each rank's last token would lose its target (it lives on the next
    rank). Where ``position_ids`` say a new packed sample starts at i+1, ``out[i]`` is -100 too: a sample's last
    token must not be trained to predict the next sample's first token.
    """
    import torch

    out = torch.full_like(labels, IGNORE_INDEX)
    out[:, :-1] = labels[:, 1:]
    if position_ids is not None:
        pos = position_ids.expand(labels.shape[0], -1)
        out[:, :-1] = out[:, :-1].masked_fill(pos[:, 1:] != pos[:, :-1] + 1, IGNORE_INDEX)
    return out


def shard_batch(batch: dict[str, Tensor], g: SPGroup) -> dict[str, Tensor]:
    """This rank's contiguous slice of ``input_ids``, ``position_ids`` and the globally shifted labels.

    Returns ``input_ids``, ``position_ids`` (0..S-1 when absent: the model cannot know the slice's offset) and
    ``shift_labels`` (so the loss does not shift again); ``labels`` is dropped so the model computes no loss of its
    own on the slice. A padding ``attention_mask`` is refused: attention sees the gathered sequence, where the
    slice's mask means nothing; pack rows instead (position_ids restarting per sample, pad at the end).
    """
    import torch

    extra = set(batch) - {"input_ids", "labels", "position_ids", "attention_mask"}
    if extra:
        raise ValueError(f"sequence parallelism cannot shard batch keys {sorted(extra)}")
    ids = batch["input_ids"]
    bsz, seq = ids.shape
    if seq % g.size:
        raise ValueError(f"sequence length {seq} is not a multiple of parallel.sequence={g.size}")
    mask = batch.get("attention_mask")
    if mask is not None and not bool(mask.bool().all()):
        raise ValueError("sequence parallelism does not take a padding attention_mask; pack rows with position_ids")
    pos = batch.get("position_ids")
    if pos is None:
        pos = torch.arange(seq, device=ids.device).unsqueeze(0)
    pos = pos.expand(bsz, -1)
    labels = batch.get("labels", ids)
    local = slice(g.rank * (seq // g.size), (g.rank + 1) * (seq // g.size))
    return {
        "input_ids": ids[:, local],
        "position_ids": pos[:, local],
        SHIFT_LABELS: shift_labels(labels, pos)[:, local],
    }


# ---------------------------------------------------------------- loss
def sp_loss(local_loss_sum: Tensor, local_count: Tensor, g: SPGroup) -> Tensor:
    """Token-weighted loss whose DDP-averaged gradients equal those of the same samples without SP.

    Without SP, DP rank r has loss ``L_r = sum_r / n_r`` and DDP's average over d ranks gives ``(1/d) sum_r dL_r``.
    With SP the sample's tokens are spread over the k ranks of a group (``sum_r = sum_s sum_rs``), and the
    all-to-all's backward routes every token's gradient to the rank that holds the parameter use, so the k ranks'
    gradients add up to d(sum_s l_rs). DDP now averages over d*k ranks, so each rank returns
    ``l_rs = k * sum_rs / n_r`` with ``n_r`` all-reduced over the group: ``(1/(d k)) sum_r sum_s k dsum_rs / n_r =
    (1/d) sum_r dL_r``. The value is a k-scaled share: the mean of the group's values is ``L_r``. No counted
    token (all labels ignored) gives 0 rather than NaN.
    """
    count = local_count.detach().to(local_loss_sum.dtype).clone()
    if g.size > 1:
        import torch.distributed as dist

        dist.all_reduce(count, group=g.group)
    return local_loss_sum * g.size / count.clamp(min=1)


# ---------------------------------------------------------------- attention
@cache
def _all_to_all_fn() -> Any:
    """The differentiable all-to-all (built lazily to keep torch out of the import)."""
    import torch
    import torch.distributed as dist

    class AllToAll(torch.autograd.Function):
        """Rank r's chunk j goes to rank j's slot r; the backward is the same exchange of the gradients."""

        @staticmethod
        def forward(ctx: Any, x: Tensor, group: Any) -> Tensor:
            ctx.group = group
            x = x.contiguous()  # before empty_like, which would copy a transposed layout
            out = torch.empty_like(x)
            dist.all_to_all_single(out, x, group=group)
            return out

        @staticmethod
        def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
            grad = grad.contiguous()
            out = torch.empty_like(grad)
            dist.all_to_all_single(out, grad, group=ctx.group)
            return out, None

    return AllToAll


def _seq_to_heads(x: Tensor, g: SPGroup) -> Tensor:
    """``[B, N, S/k, D]`` (own tokens, all N heads) -> ``[B, N/k, S, D]`` (all tokens, this rank's heads)."""
    b, n, s, d = x.shape
    send = x.reshape(b, g.size, n // g.size, s, d).transpose(0, 1)  # [k, B, N/k, S/k, D]: chunk j -> rank j
    got = _all_to_all_fn().apply(send, g.group)  # [k, B, N/k, S/k, D]: slot r = rank r's tokens
    return got.permute(1, 2, 0, 3, 4).reshape(b, n // g.size, g.size * s, d)


def _heads_to_seq(x: Tensor, g: SPGroup) -> Tensor:
    """``[B, S, N/k, D]`` (attention output layout) -> ``[B, S/k, N, D]``, undoing `_seq_to_heads`."""
    b, s, n, d = x.shape
    send = x.reshape(b, g.size, s // g.size, n, d).transpose(0, 1)  # chunk j = rank j's tokens
    got = _all_to_all_fn().apply(send, g.group)  # slot r = rank r's heads
    return got.permute(1, 2, 0, 3, 4).reshape(b, s // g.size, g.size * n, d)


def _gather_seq(local: Tensor, g: SPGroup) -> Tensor:
    """All ranks' ``[B, S/k]`` slices joined in rank order (no gradient: ids only)."""
    import torch
    import torch.distributed as dist

    parts = [torch.empty_like(local) for _ in range(g.size)]
    dist.all_gather(parts, local.contiguous(), group=g.group)
    return torch.cat(parts, dim=1)


def sample_ids(position_ids: Tensor) -> Tensor:
    """Packed-sample index of every token: a new sample starts wherever the position does not step by one."""
    import torch

    first = position_ids[:, :1] - 1
    return (torch.diff(position_ids, prepend=first, dim=-1) != 1).cumsum(-1)


def full_mask(position_ids: Tensor, additive_dtype: Any = None, sliding_window: int | None = None) -> Tensor | None:
    """The full-sequence mask: causal, block-diagonal per packed sample, and banded for sliding-window layers.

    Boolean ``[B, 1, S, S]`` (True = attend) for sdpa, or additive (0 / dtype min) when ``additive_dtype`` is given
    (eager adds it to the scores). None means plain causal for sdpa, which keeps its fused causal kernels. The
    window counts tokens like transformers' overlay (a query sees the ``sliding_window`` latest keys, itself included);
    within a packed sample token distance equals position distance, so the sample blocks need no remapping.
    """
    import torch

    ids = sample_ids(position_ids)
    if additive_dtype is None and sliding_window is None and bool((ids[:, -1] == 0).all()):
        return None
    seq = ids.shape[1]
    ones = torch.ones(seq, seq, dtype=torch.bool, device=ids.device)
    causal = ones.tril() if sliding_window is None else ones.tril() & ~ones.tril(-sliding_window)
    allowed = (causal & (ids[:, :, None] == ids[:, None, :]))[:, None]
    if additive_dtype is None:
        return allowed
    zeros = torch.zeros(allowed.shape, dtype=additive_dtype, device=ids.device)
    return zeros.masked_fill(~allowed, torch.finfo(additive_dtype).min)


class _InnerView:
    """The attention module as the inner kernel must see it after the exchange.

    A rank holds H/k query heads and max(KV/k, 1) KV heads, so ``num_key_value_groups`` changes when KV heads were
    replicated; flash kernels also read ``config._attn_implementation`` to pick the kernel, which must name the
    real one, not ours. Everything else is read from the module.
    """

    def __init__(self, module: Any, groups: int, inner: str) -> None:
        self._module = module
        self.num_key_value_groups = groups
        self.config = _ConfigView(module.config, inner)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._module, name)


class _ConfigView:
    """A config whose ``_attn_implementation`` reads as the inner kernel's name."""

    def __init__(self, config: Any, inner: str) -> None:
        self._config = config
        self._attn_implementation = inner

    def __getattr__(self, name: str) -> Any:
        return getattr(self._config, name)


class _MaskCache:
    """The gathered position ids and masks of the current forward, built once and read by every layer.

    Keyed on the identity and version of the local ``position_ids`` tensor the model hands to each layer, so a new
    batch (or an in-place change) rebuilds it; checkpointed layers recomputed in backward hit the cache. Masks are
    kept per (kernel, window) because sliding and full layers of one model need different ones.
    """

    def __init__(self) -> None:
        self._key: tuple[Any, int] | None = None
        self._full: Tensor | None = None
        self._masks: dict[tuple[str, int | None], Tensor | None] = {}

    def positions(self, local_pos: Tensor | None, seq: int, device: Any, g: SPGroup) -> Tensor:
        """The whole row's position ids; 0..S-1 (one sample) when the model passed none."""
        import torch

        if local_pos is None:
            self._key, self._masks = None, {}
            return torch.arange(seq, device=device).unsqueeze(0)
        if self._key is None or self._key[0] is not local_pos or self._key[1] != local_pos._version:
            self._key, self._full, self._masks = (local_pos, local_pos._version), _gather_seq(local_pos, g), {}
        assert self._full is not None
        return self._full

    def mask(self, full: Tensor, inner: str, dtype: Any, window: int | None) -> Tensor | None:
        """What the inner kernel takes: flash reads packing from position_ids, eager adds, sdpa selects."""
        if inner in _FLASH:
            return None
        if (inner, window) not in self._masks:
            self._masks[(inner, window)] = full_mask(full, dtype if inner == "eager" else None, window)
        return self._masks[(inner, window)]


def _inner_function(module: Any, inner: str) -> Callable[..., Any]:
    """The kernel the model used before: registered ones by name, eager from the model's own modeling module."""
    if inner == "eager":
        return sys.modules[type(module).__module__].eager_attention_forward
    from transformers import AttentionInterface

    return AttentionInterface()[inner]


def _make_attention(inner: str, g: SPGroup) -> Callable[..., tuple[Tensor, None]]:
    masks = _MaskCache()

    def ulysses_attention(
        module: Any, query: Tensor, key: Tensor, value: Tensor, attention_mask: Tensor | None, **kwargs: Any
    ) -> tuple[Tensor, None]:
        if attention_mask is not None:
            raise ValueError(
                "Ulysses attention builds its own full-sequence mask: pass position_ids, no attention_mask"
            )
        rep = kv_replication(key.shape[1], g.size)
        if rep > 1:
            key, value = key.repeat_interleave(rep, dim=1), value.repeat_interleave(rep, dim=1)
        q, k, v = (_seq_to_heads(t, g) for t in (query, key, value))
        full_pos = masks.positions(kwargs.get("position_ids"), q.shape[2], q.device, g)
        mask = masks.mask(full_pos, inner, q.dtype, kwargs.get("sliding_window"))
        rest = {n: val for n, val in kwargs.items() if n not in _LOCAL_ONLY_KWARGS}
        view = _InnerView(module, q.shape[1] // k.shape[1], inner)
        out, _ = _inner_function(module, inner)(view, q, k, v, mask, position_ids=full_pos, **rest)
        return _heads_to_seq(out, g), None  # per-head weights of a head shard are of no use: never returned

    return ulysses_attention


def _pretrained(model: Any) -> Any:
    """The outermost transformers model inside a peft/DDP wrapper (or the model itself)."""
    from transformers import PreTrainedModel

    for m in model.modules():
        if isinstance(m, PreTrainedModel):
            return m
    raise TypeError(f"{type(model).__name__} contains no transformers PreTrainedModel")


def enable(model: Any, g: SPGroup) -> None:
    """Route the model's attention through the Ulysses exchange around its current kernel (no-op for SP=1).

    Call before wrapping in DDP. The model's own causal-mask builder is skipped for the new name (transformers only
    builds masks for kernels it knows), so no useless slice-sized mask is made. ``use_cache`` is turned off: a KV
    cache would only hoard every layer's slice-local keys during training.
    """
    if g.size == 1:
        return
    from transformers import AttentionInterface

    base = _pretrained(model)
    current: str = base.config._attn_implementation
    inner = next((k for k, v in _INNER.items() if current == _PREFIX + v), current)
    if inner not in _INNER:
        raise ValueError(f"sequence parallelism wraps {sorted(_INNER)} attention, not {current!r}")
    heads = base.config.num_attention_heads
    kv_heads = getattr(base.config, "num_key_value_heads", None) or heads
    problems = sp_problems(heads, kv_heads, g.size, g.size)
    if problems:
        raise ValueError("; ".join(problems))
    name = _PREFIX + _INNER[inner]
    AttentionInterface.register(name, _make_attention(inner, g))
    base.set_attn_implementation(name)
    base.config.use_cache = False
