"""The parameter list of optimum-neuron's Llama (plain or PEFT-wrapped), walked for the fixture writer (writer.py).

Kept apart from the reader on purpose: this is the second, independent reading of the upstream rules
(hyperjob/checkpoint/FORMAT.md).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from hyperjob.testing.neuron_checkpoints.layout import NOTP, PEFT, QKV, Layout, Local, Tensor, const, mean_a


@dataclass
class Param:
    meta: str | None  # named_parameters name (None: not listed, e.g. a tied lm_head)
    attrs: dict[str, Any]
    key: str | None  # key in the rank file (None: not saved)
    local: Local | None
    stage: int
    group: int = 0  # saved order: 0 state order, 1 modules_to_save, 2 embedding base layers
    replicated: bool = False


class Walk:
    """Lists the parameters of optimum-neuron's Llama (plain or PEFT-wrapped) in named_parameters order."""

    def __init__(self, state: Mapping[str, Tensor], kind: str, lay: Layout, adapter: str) -> None:
        self.state, self.kind, self.lay, self.d, self.ad = state, kind, lay, lay.d, adapter
        self.pre = PEFT if kind == "lora" else ""
        self.used: set[str] = set()
        self.params: list[Param] = []
        self.specs: list[tuple[str, int, list[tuple[str, dict[str, Any]]]]] = []
        self.last = lay.pp - 1

    def take(self, key: str) -> Tensor | None:
        t = self.state.get(key)
        if t is not None:
            self.used.add(key)
        return t

    def need(self, key: str) -> Tensor:
        t = self.take(key)
        if t is None:
            raise ValueError(f"state_dict lacks {key!r}")
        return t

    def base(self, path: str) -> Tensor | None:
        return self.need(f"{path}.weight") if self.kind == "full" else None

    def lora(self, path: str) -> tuple[Tensor, Tensor] | None:
        if self.kind != "lora":
            return None
        a, b = self.take(f"{PEFT}{path}.lora_A.weight"), self.take(f"{PEFT}{path}.lora_B.weight")
        if (a is None) != (b is None):
            raise ValueError(f"{path}: lora_A and lora_B must come together")
        return None if a is None or b is None else (a, b)

    def group(self, paths: list[str]) -> list[tuple[Tensor, Tensor]] | None:
        parts = [self.lora(p) for p in paths]
        if all(p is None for p in parts):
            return None
        if any(p is None for p in parts):
            raise ValueError(f"LoRA must target all of {paths} or none: optimum-neuron fuses them into one layer")
        return [p for p in parts if p is not None]

    def module(
        self,
        path: str,
        stage: int,
        base: list[tuple[str, dict[str, Any], Local | None, bool]],
        lora: list[tuple[str, dict[str, Any], Local, bool]] | None,
        save_base_in_lora: bool = False,
    ) -> None:
        """One (maybe LoRA-wrapped) module: base params, then lora params as `leaf.suffix` (adapter inserted)."""
        wrapped = lora is not None
        if not wrapped and self.kind == "lora" and self.modules_to_save(path, stage, base):
            return
        for suffix, attrs, local, rep in base:
            name = f"{path}.base_layer.{suffix}" if wrapped else f"{path}.{suffix}"
            if self.kind == "full":
                self.params.append(Param(name, attrs, name, local, stage, replicated=rep))
            elif wrapped and save_base_in_lora:
                w = self.need(f"{PEFT}{name}")
                self.params.append(Param(PEFT + name, attrs, PEFT + name, self.lay.rows(w), stage, group=2))
            else:
                self.params.append(Param(self.pre + name, attrs, None, None, stage))
        for leaf, attrs, local, rep in lora or []:
            head, _, suffix = leaf.partition(".")
            meta = f"{PEFT}{path}.{head}.{self.ad}" + (f".{suffix}" if suffix else "")
            self.params.append(Param(meta, attrs, f"{PEFT}{path}.{leaf}", local, stage, replicated=rep))

    def modules_to_save(
        self, path: str, stage: int, base: list[tuple[str, dict[str, Any], Local | None, bool]]
    ) -> bool:
        """peft 0.17 saves a ModulesToSaveWrapper copy as `<module>.weight`; deepcopy drops the TP attributes."""
        w = self.take(f"{PEFT}{path}.weight")
        if w is None:
            return False
        (suffix, attrs, _, rep), sharded = base[0], path in ("lm_head", "model.embed_tokens")
        if suffix != "weight" or not (sharded or rep):
            raise NotImplementedError(f"modules_to_save is only modelled for embeddings, lm_head and norms: {path}")
        self.params.append(Param(f"{PEFT}{path}.original_module.weight", attrs, None, None, stage))
        self.params.append(
            Param(
                f"{PEFT}{path}.modules_to_save.{self.ad}.weight",
                NOTP,
                f"{PEFT}{path}.weight",
                self.lay.rows(w) if sharded else const(w),
                stage,
                group=1,
                replicated=not sharded,
            )
        )
        return True

    def column(self, path: str, stage: int) -> None:
        lay, w, ab = self.lay, self.base(path), self.lora(path)
        lora = (
            None
            if ab is None
            else [
                ("lora_A.weight", NOTP, const(ab[0]), True),
                ("lora_B.weight", lay.tp_attrs(0), lay.rows(ab[1]), False),
            ]
        )
        base_local = None if w is None else lay.rows(w)
        self.module(
            path, stage, [("weight", lay.tp_attrs(0), base_local, False)], lora, save_base_in_lora=path == "lm_head"
        )

    def row(self, path: str, stage: int, split: Callable[[Tensor], Local]) -> None:
        lay, w, ab = self.lay, self.base(path), self.lora(path)
        lora = (
            None
            if ab is None
            else [
                ("lora_A.weight", lay.tp_attrs(1), split(ab[0]), False),
                ("lora_B.weight", NOTP, const(ab[1]), True),
            ]
        )
        self.module(path, stage, [("weight", lay.tp_attrs(1), None if w is None else split(w), False)], lora)

    def norm(self, path: str, stage: int) -> None:
        w = self.base(path)
        self.module(path, stage, [("weight", NOTP, None if w is None else const(w), True)], None)

    def spec(self, path: str, stage: int, cls: str, fields: dict[str, Any], wrapped: bool) -> None:
        self.specs.append(
            (
                self.pre + path,
                stage,
                [(cls, {**fields, "tp_size": self.lay.tp, "peft_type": "lora" if wrapped else None})],
            )
        )

    def fused_spec(self, name: str, linears: tuple[str, ...], dims: list[int]) -> dict[str, Any]:
        return {
            "fused_linear_name": name,
            "linear_names": list(linears),
            "bias": False,
            "fuse_axis": 0,
            "original_dims": dims,
        }

    def walk(self) -> None:
        d, lay = self.d, self.lay
        self.embed()
        for i in range(d.layers):
            s, lp = lay.stage_of(i), f"model.layers.{i}"
            self.attention(f"{lp}.self_attn", s)
            self.mlp(f"{lp}.mlp", s)
            self.norm(f"{lp}.input_layernorm", s)
            self.norm(f"{lp}.post_attention_layernorm", s)
        self.norm("model.norm", self.last)
        self.lm_head()

    def embed(self) -> None:
        path, lay = "model.embed_tokens", self.lay
        w = self.base(path)
        la, lb = (self.take(f"{PEFT}{path}.lora_embedding_{x}") for x in "AB")
        if (la is None) != (lb is None):
            raise ValueError("lora_embedding_A and lora_embedding_B must come together")
        lora = (
            None
            if la is None or lb is None
            else [("lora_embedding_A", NOTP, const(la), True), ("lora_embedding_B", NOTP, const(lb), True)]
        )
        self.module(
            path,
            0,
            [("weight", lay.tp_attrs(0), None if w is None else lay.rows(w), False)],
            lora,
            save_base_in_lora=True,
        )

    def lm_head(self) -> None:
        if not self.d.tie:
            self.column("lm_head", self.last)
            return
        if self.lora("lm_head") is not None or self.take(f"{PEFT}lm_head.weight") is not None:
            raise NotImplementedError("LoRA/modules_to_save on a tied lm_head is not modelled")
        if self.kind == "full":  # tied: state_dict() still holds lm_head.weight, named_parameters() does not
            w = self.take("lm_head.weight")
            w = self.state["model.embed_tokens.weight"] if w is None else w
            self.params.append(Param(None, NOTP, "lm_head.weight", self.lay.rows(w), self.last))

    def attention(self, path: str, s: int) -> None:
        lay, d = self.lay, self.d
        if lay.mode == "separate":
            for p in QKV:
                self.column(f"{path}.{p}", s)
            self.specs.append((self.pre + path, s, []))
        else:
            full = [w for w in (self.base(f"{path}.{p}") for p in QKV) if w is not None]
            parts = self.group([f"{path}.{p}" for p in QKV])
            bs = None if parts is None else [b for _, b in parts]
            lora_a = [] if parts is None else [("lora_A.weight", NOTP, const(mean_a(parts)), True)]
            base: list[tuple[str, dict[str, Any], Local | None, bool]]
            if lay.mode == "fused":
                base = [("weight", lay.tp_attrs(0, 3), lay.fused_rows(full) if full else None, False)]
                lora_b = [] if bs is None else [("lora_B.weight", lay.tp_attrs(0), lay.fused_rows(bs), False)]
                self.spec(
                    path,
                    s,
                    "FusedLinearsSpec",
                    self.fused_spec("qkv_proj", QKV, [d.heads * d.head_dim] * 3),
                    parts is not None,
                )
            else:
                base, lora_b = self._gqa(full, bs)
                self.spec(
                    path,
                    s,
                    "GQAQKVColumnParallelLinearSpec",
                    {
                        "gqa_qkv_projection_name": "qkv_proj",
                        "query_projection_name": "q_proj",
                        "key_projection_name": "k_proj",
                        "value_projection_name": "v_proj",
                        "output_projection_name": "o_proj",
                        "num_attention_heads": d.heads,
                        "num_key_value_heads": d.kv,
                        "kv_size_multiplier": lay.m,
                        "q_output_size_per_partition": d.heads * d.head_dim // lay.tp,
                        "kv_output_size_per_partition": d.kv * d.head_dim * lay.m // lay.tp,
                        "fuse_qkv": lay.fuse_qkv,
                        "bias": False,
                    },
                    parts is not None,
                )
            self.module(f"{path}.qkv_proj", s, base, None if parts is None else lora_a + lora_b)
        self.row(f"{path}.o_proj", s, lay.o_cols if lay.mode == "gqa" else lay.cols)

    def _gqa(self, ws: list[Tensor], bs: list[Tensor] | None) -> tuple[Any, Any]:
        """GQAQKVColumnParallelLinear params: weight_q/k/v (TP attrs) or weight_qkv (no TP attrs upstream)."""
        lay = self.lay
        split = [lay.q_rows, lay.kv_rows, lay.kv_rows]

        def cat3(ts: list[Tensor]) -> Local:
            return lambda r: torch.cat([f(t)(r) for f, t in zip(split, ts, strict=True)])

        if lay.fuse_qkv:
            base = [("weight_qkv", NOTP, cat3(ws) if ws else None, False)]
            lora_b = [] if bs is None else [("lora_B.weight_qkv", NOTP, cat3(bs), False)]
            return base, lora_b
        base = [
            (f"weight_{x}", lay.tp_attrs(0), f(ws[i]) if ws else None, False)
            for i, (x, f) in enumerate(zip("qkv", split, strict=True))
        ]
        lora_b = (
            []
            if bs is None
            else [
                (f"lora_B.weight_{x}", lay.tp_attrs(0), f(b), False) for x, f, b in zip("qkv", split, bs, strict=True)
            ]
        )
        return base, lora_b

    def mlp(self, path: str, s: int) -> None:
        lay, d = self.lay, self.d
        full = [w for w in (self.base(f"{path}.{p}") for p in ("gate_proj", "up_proj")) if w is not None]
        parts = self.group([f"{path}.gate_proj", f"{path}.up_proj"])
        base_local = lay.fused_rows(full) if full else None
        lora = (
            None
            if parts is None
            else [
                ("lora_A.weight", NOTP, const(mean_a(parts)), True),
                ("lora_B.weight", lay.tp_attrs(0), lay.fused_rows([b for _, b in parts]), False),
            ]
        )
        self.module(f"{path}.gate_up_proj", s, [("weight", lay.tp_attrs(0, 2), base_local, False)], lora)
        self.spec(
            path,
            s,
            "FusedLinearsSpec",
            self.fused_spec("gate_up_proj", ("gate_proj", "up_proj"), [d.inter, d.inter]),
            parts is not None,
        )
        self.row(f"{path}.down_proj", s, lay.cols)
