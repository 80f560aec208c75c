"""Neuron-side layout rules of optimum-neuron's Llama (dims, TP partitioning, GQA), for the fixture writer.

Kept apart from the reader on purpose: this is the second, independent reading of the upstream rules
(hyperjob/checkpoint/FORMAT.md).
Names follow optimum-neuron 0.4.5 (models/training/llama/modeling_llama.py) and neuronx-distributed 0.15.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

import torch

Tensor = torch.Tensor
Local = Callable[[int], Tensor]
QKV = ("q_proj", "k_proj", "v_proj")
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
BLOCK = {p: ("self_attn" if p in (*QKV, "o_proj") else "mlp") for p in PROJECTIONS}
NOTP: dict[str, Any] = {"tensor_model_parallel": False}
PEFT = "base_model.model."


@dataclass(frozen=True)
class Dims:
    hidden: int
    inter: int
    heads: int
    kv: int
    head_dim: int
    vocab: int
    layers: int
    tie: bool

    @classmethod
    def of(cls, c: Mapping[str, Any]) -> Dims:
        h, n = int(c["hidden_size"]), int(c["num_attention_heads"])
        return cls(
            h,
            int(c["intermediate_size"]),
            n,
            int(c.get("num_key_value_heads") or n),
            int(c.get("head_dim") or h // n),
            int(c["vocab_size"]),
            int(c["num_hidden_layers"]),
            bool(c.get("tie_word_embeddings", False)),
        )

    def shape(self, proj: str) -> tuple[int, int]:
        """(out, in) of an HF Llama projection."""
        q, kv = self.heads * self.head_dim, self.kv * self.head_dim
        return {
            "q_proj": (q, self.hidden),
            "k_proj": (kv, self.hidden),
            "v_proj": (kv, self.hidden),
            "o_proj": (self.hidden, q),
            "gate_proj": (self.inter, self.hidden),
            "up_proj": (self.inter, self.hidden),
            "down_proj": (self.hidden, self.inter),
        }[proj]


# ---------------------------------------------------------------- layout rules


def query_heads(tp: int, rank: int, heads: int, kv: int, m: int) -> Tensor:
    """Global query heads held by `rank` on the GQA path, in local order (trn1 interleaved KV replicas)."""
    kvpr = kv * m // tp
    group, gpr = heads // kv, (heads // tp) // kvpr
    kv_of_slot = torch.arange(kv).repeat(m).repeat_interleave(gpr).chunk(tp)[rank]
    replica = torch.arange(m).repeat_interleave(kv * gpr).chunk(tp)[rank]
    return kv_of_slot * group + replica * gpr + torch.arange(gpr).repeat(kvpr)


@dataclass(frozen=True)
class Layout:
    d: Dims
    tp: int
    pp: int
    mode: Literal["separate", "fused", "gqa"]
    m: int
    fuse_qkv: bool

    @classmethod
    def of(cls, config: Mapping[str, Any], tp: int, pp: int, m: int | None, fuse_qkv: bool) -> Layout:
        d = Dims.of(config)
        for what, n in (("intermediate_size", d.inter), ("vocab_size", d.vocab), ("num_attention_heads", d.heads)):
            if n % tp:
                raise ValueError(f"{what}={n} is not divisible by tp={tp}")
        if not 1 <= pp <= d.layers:
            raise ValueError(f"pp={pp} needs 1..num_hidden_layers ({d.layers}) stages")
        if d.kv < tp or d.kv % tp:  # optimum's LlamaAttention.qkv_linear condition
            mult = m if m is not None else max(1, tp // d.kv)
            if d.heads % d.kv or tp % mult or (d.kv * mult) % tp or (d.heads // tp) % (d.kv * mult // tp):
                raise ValueError(f"kv_size_multiplier={mult} does not fit kv_heads={d.kv}, heads={d.heads}, tp={tp}")
            return cls(d, tp, pp, "gqa", mult, fuse_qkv)
        return cls(d, tp, pp, "fused" if fuse_qkv and d.heads == d.kv else "separate", 1, fuse_qkv)

    def stage_of(self, layer: int) -> int:
        """NxD create_partitions: even split, the remainder layers go to the last stages."""
        sizes = [
            self.d.layers // self.pp + (1 if s >= self.pp - self.d.layers % self.pp else 0) for s in range(self.pp)
        ]
        return next(s for s in range(self.pp) if layer < sum(sizes[: s + 1]))

    # per-rank slicing rules; each returns a function rank -> local tensor
    def rows(self, t: Tensor) -> Local:
        return lambda r: t.narrow(0, r * (t.shape[0] // self.tp), t.shape[0] // self.tp)

    def cols(self, t: Tensor) -> Local:
        return lambda r: t.narrow(1, r * (t.shape[1] // self.tp), t.shape[1] // self.tp)

    def fused_rows(self, ts: list[Tensor]) -> Local:
        return lambda r: torch.cat([self.rows(t)(r) for t in ts])

    def q_rows(self, t: Tensor) -> Local:
        d = self.d
        return lambda r: t.reshape(d.heads, d.head_dim, -1)[self.qidx(r)].reshape(-1, t.shape[1])

    def o_cols(self, t: Tensor) -> Local:
        return lambda r: self.q_rows(t.t())(r).t()

    def kv_rows(self, t: Tensor) -> Local:
        n = self.d.kv * self.d.head_dim * self.m // self.tp
        return lambda r: t[torch.arange(r * n, (r + 1) * n) % t.shape[0]]

    def qidx(self, rank: int) -> Tensor:
        return query_heads(self.tp, rank, self.d.heads, self.d.kv, self.m)

    def tp_attrs(self, dim: int, stride: int = 1) -> dict[str, Any]:
        return {
            "tensor_model_parallel": True,
            "partition_dim": dim,
            "partition_stride": stride,
            "num_partitions": self.tp,
        }


def const(t: Tensor) -> Local:
    return lambda r: t


def mean_a(parts: list[tuple[Tensor, Tensor]]) -> Tensor:
    """What upstream keeps when separate LoRA A's meet one fused layer (FusedLinearsSpec/GQA load path)."""
    return torch.mean(torch.stack([a for a, _ in parts]), dim=0)
