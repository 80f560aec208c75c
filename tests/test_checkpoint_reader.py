"""hyperjob.checkpoint reader/unshard/consolidate: rules table-tested bit-exact on hand-sharded tensors, the
restricted unpickler, error paths, and round trips through the independent fixture generator
(hyperjob.testing.neuron_checkpoints)."""

from __future__ import annotations

import io
import json
import os
import pickle
import re
import shutil
import subprocess
import sys
import types
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from hyperjob.checkpoint.consolidate import (
    consolidate_adapter,
    consolidate_any,
    consolidate_full,
    unfused_adapter_config,
)
from hyperjob.checkpoint.drift import DriftReport, replica_difference
from hyperjob.checkpoint.errors import CheckpointError, ReplicaDriftError
from hyperjob.checkpoint.hf_layout import shard_names
from hyperjob.checkpoint.reader import resolve_checkpoint, validate
from hyperjob.checkpoint.unshard import (
    GQALayout,
    Step,
    apply_step,
    gqa_query_head_order,
    restore_head_order,
    saved_name,
    unfuse_shards,
)
from hyperjob.checkpoint.xser import PlainRankReader, read_rank_index
from hyperjob.testing import neuron_checkpoints as synth

PROJ = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
PEFT = "base_model.model."
G = torch.Generator().manual_seed(0)


def rnd(*shape: int, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    return torch.randn(shape, generator=G).to(dtype)


# ---- hand sharding, written from the reference's description of what each rank holds ----


def col(t: torch.Tensor, tp: int) -> list[torch.Tensor]:
    return [c.clone() for c in t.chunk(tp, 0)]


def row(t: torch.Tensor, tp: int) -> list[torch.Tensor]:
    return [c.contiguous() for c in t.chunk(tp, 1)]


def rep(t: torch.Tensor, tp: int) -> list[torch.Tensor]:
    return [t.clone() for _ in range(tp)]


def fused(parts: list[torch.Tensor], tp: int) -> list[torch.Tensor]:
    """Rank r holds [gate_r; up_r] (each linear's r-th row block, back to back)."""
    return [torch.cat([p.chunk(tp, 0)[r] for p in parts]) for r in range(tp)]


def gqa_q(t: torch.Tensor, order: list[int], heads: int, tp: int) -> list[torch.Tensor]:
    """Rank r holds the query heads at positions r*H/tp.. of `order`."""
    return col(t.reshape(heads, -1, *t.shape[1:])[order].reshape(t.shape), tp)


def gqa_o(t: torch.Tensor, order: list[int], heads: int, tp: int) -> list[torch.Tensor]:
    """o_proj's input columns follow the same head order; row-parallel split on dim 1."""
    permuted = t.T.reshape(heads, -1, t.shape[0])[order].reshape(t.shape[1], t.shape[0]).T
    return row(permuted.contiguous(), tp)


def gqa_kv(t: torch.Tensor, m: int, tp: int) -> list[torch.Tensor]:
    """kv_size_multiplier copies [K; K; ...] split over the ranks."""
    return col(torch.cat([t] * m), tp)


# Query head at each rank-concatenated position, as upstream's compute_query_indices_for_rank gives for ranks 0..tp-1
# (values computed from optimum-neuron 0.4.5; keys: tp, heads, kv_heads, kv_size_multiplier).
QUERY_ORDER = {
    key: [int(h) for h in heads.split()]
    for key, heads in {
        (8, 8, 2, 4): "0 4 1 5 2 6 3 7",
        (4, 8, 2, 2): "0 1 4 5 2 3 6 7",
        (8, 32, 8, 1): " ".join(map(str, range(32))),
        (8, 16, 2, 8): "0 8 1 9 2 10 3 11 4 12 5 13 6 14 7 15",
        (32, 32, 8, 4): "0 4 8 12 16 20 24 28 1 5 9 13 17 21 25 29 2 6 10 14 18 22 26 30 3 7 11 15 19 23 27 31",
        (8, 32, 4, 2): "0 1 2 3 8 9 10 11 16 17 18 19 24 25 26 27 4 5 6 7 12 13 14 15 20 21 22 23 28 29 30 31",
        (16, 32, 4, 4): "0 1 8 9 16 17 24 25 2 3 10 11 18 19 26 27 4 5 12 13 20 21 28 29 6 7 14 15 22 23 30 31",
    }.items()
}


@pytest.mark.parametrize("key", sorted(QUERY_ORDER))
def test_gqa_query_head_order_matches_upstream(key: tuple[int, int, int, int]) -> None:
    assert gqa_query_head_order(*key) == QUERY_ORDER[key]


def test_gqa_impossible_layout_is_refused() -> None:
    with pytest.raises(CheckpointError, match="GQA layout"):
        gqa_query_head_order(8, 12, 3, 2)


def _gqa(tp: int, heads: int, kv: int, m: int, hd: int) -> GQALayout:
    return GQALayout(tp, heads, kv, m, heads * hd // tp, kv * m * hd // tp)


def _rule_cases() -> list[tuple[str, Step, list[torch.Tensor], list[torch.Tensor]]]:
    """(id, step, per-rank tensors, expected outputs)."""
    q, k, o = rnd(8 * 4, 16), rnd(2 * 4, 16), rnd(16, 8 * 4)
    gate, up, bg, bu, a = rnd(24, 16), rnd(24, 16), rnd(24, 4), rnd(24, 4), rnd(4, 16)
    emb, norm, bias = rnd(32, 16), rnd(16), rnd(8 * 4)
    g = _gqa(8, 8, 2, 4, 4)
    order = QUERY_ORDER[(8, 8, 2, 4)]
    g2 = _gqa(4, 8, 2, 2, 4)
    order2 = QUERY_ORDER[(4, 8, 2, 2)]
    qkv_ranks = [
        torch.cat([qr, kr, vr])
        for qr, kr, vr in zip(gqa_q(q, order2, 8, 4), gqa_kv(k, 2, 4), gqa_kv(-k, 2, 4), strict=True)
    ]
    same_qkv = [torch.cat(parts) for parts in zip(col(q, 2), col(k.repeat(4, 1), 2), col(-q, 2), strict=True)]
    return [
        ("column", Step("concat", 0, "x", ("x",), dim=0), col(q, 4), [q]),
        ("row", Step("concat", 0, "x", ("x",), dim=1), row(o, 4), [o]),
        ("vocab-embedding", Step("concat", 0, "e", ("e",), dim=0), col(emb, 8), [emb]),
        ("replicated-norm", Step("replicated", 0, "n", ("n",)), rep(norm, 4), [norm]),
        ("gate_up", Step("unfuse", 0, "gu", ("g", "u"), sizes=(6, 6)), fused([gate, up], 4), [gate, up]),
        ("gate_up-lora_B", Step("unfuse", 0, "b", ("g", "u"), sizes=(12, 12)), fused([bg, bu], 2), [bg, bu]),
        ("shared-lora_A", Step("replicated", 0, "a", ("ga", "ua")), rep(a, 4), [a, a]),
        (
            "fused-qkv-MHA",
            Step("unfuse", 0, "qkv", ("q", "k", "v"), sizes=(16, 16, 16)),
            same_qkv,
            [q, k.repeat(4, 1), -q],
        ),
        ("gqa-q", Step("gqa_q", 0, "q", ("q",), gqa=g), gqa_q(q, order, 8, 8), [q]),
        ("gqa-q-bias", Step("gqa_q", 0, "b", ("b",), gqa=g), gqa_q(bias, order, 8, 8), [bias]),
        ("gqa-kv", Step("gqa_kv", 0, "k", ("k",), gqa=g), gqa_kv(k, 4, 8), [k]),
        ("gqa-o", Step("gqa_o", 0, "o", ("o",), dim=1, gqa=g), gqa_o(o, order, 8, 8), [o]),
        ("gqa-o-lora_A", Step("gqa_o", 0, "oa", ("oa",), dim=1, gqa=g2), gqa_o(o[:4], order2, 8, 4), [o[:4]]),
        ("gqa-weight_qkv", Step("gqa_qkv", 0, "w", ("q", "k", "v"), gqa=g2), qkv_ranks, [q, k, -k]),
    ]


@pytest.mark.parametrize(
    ("step", "shards", "expected"), [c[1:] for c in _rule_cases()], ids=[c[0] for c in _rule_cases()]
)
def test_unshard_rules_are_bit_exact(step: Step, shards: list[torch.Tensor], expected: list[torch.Tensor]) -> None:
    got = apply_step(step, shards).outputs
    assert len(got) == len(expected)
    for g, e in zip(got, expected, strict=True):
        assert g.dtype == e.dtype and torch.equal(g, e)


def test_restore_head_order_inverts_permutation_on_any_dim() -> None:
    t = rnd(4, 6, 3 * 5)
    order = [2, 0, 1]
    permuted = t.reshape(4, 6, 3, 5)[:, :, order].reshape(4, 6, 15)
    assert torch.equal(restore_head_order(permuted, order, 3, 2), t)


def test_unfuse_uneven_sizes() -> None:
    a, b, c = rnd(4, 2), rnd(2, 2), rnd(2, 2)
    assert all(
        torch.equal(x, y) for x, y in zip(unfuse_shards(fused([a, b, c], 2), (2, 1, 1), 0, 0), [a, b, c], strict=True)
    )


@pytest.mark.parametrize(
    ("meta", "saved"),
    [
        (
            "base_model.model.model.layers.0.mlp.gate_up_proj.lora_A.default.weight",
            ("mlp.gate_up_proj.lora_A.weight", "default"),
        ),
        (
            "base_model.model.model.embed_tokens.lora_embedding_B.other",
            ("model.embed_tokens.lora_embedding_B", "other"),
        ),
        ("base_model.model.lm_head.modules_to_save.default.weight", ("lm_head.weight", "default")),
        (
            "base_model.model.model.layers.0.self_attn.qkv_proj.lora_B.default.weight_qkv",
            ("self_attn.qkv_proj.lora_B.weight_qkv", "default"),
        ),
        ("base_model.model.model.norm.weight", ("model.norm.weight", None)),
    ],
)
def test_saved_name_strips_adapter(meta: str, saved: tuple[str, str | None]) -> None:
    key, adapter = saved_name(meta)
    assert key.endswith(saved[0]) and adapter == saved[1]


def test_drift_difference_and_report() -> None:
    a = torch.ones(3)
    assert replica_difference([a, a.clone()]) == (0.0, 0.0)
    diff, rel = replica_difference([a * 2, a * 2 + torch.tensor([0, 0.5, 0])])
    assert diff == 0.5 and rel == 0.25
    report = DriftReport(threshold=0.1, allow_drift=True)
    mean = report.check("x", [a, a * 3])
    assert mean is not None and torch.equal(mean, a * 2) and report.exceeding()[0].name == "x"


# ---- a hand-built TP=2 LoRA checkpoint (own writer, independent of neuron_checkpoints) ----


class _Ref:
    def __init__(self, tid: int) -> None:
        self.tid = tid


def _ref_pickler(global_line: bytes) -> types.ModuleType:
    class Pickler(pickle._Pickler):
        def save_global(self, obj: Any, name: str | None = None) -> None:
            if obj is _Ref:
                self.write(pickle.GLOBAL + global_line)  # type: ignore[attr-defined]
                self.memoize(obj)  # type: ignore[attr-defined]
                return
            super().save_global(obj, name)  # type: ignore[misc]

    module = types.ModuleType("ref_pickle")
    module.Pickler = Pickler  # type: ignore[attr-defined]
    return module


XLA_REF = _ref_pickler(b"torch_xla.utils.serialization\nTensorReference\n")


def write_rank(path: Path, state: dict[str, torch.Tensor], xser: bool) -> None:
    if not xser:
        torch.save(state, path)
        return
    folder = Path(f"{path}.tensors")
    folder.mkdir()
    for tid, t in enumerate(state.values()):
        torch.save(t.clone(), folder / f"tensor_{tid}.pt")
    torch.save({k: _Ref(i) for i, k in enumerate(state)}, path, pickle_module=XLA_REF)
    info = {
        i: {"dtype": t.dtype, "shape": t.shape, "expert_model_parallel": False} for i, t in enumerate(state.values())
    }
    torch.save(info, f"{path}.info.pt")


def _tp(dim: int, stride: int = 1) -> dict[str, Any]:
    return {"tensor_model_parallel": True, "partition_dim": dim, "partition_stride": stride, "num_partitions": 2}


REP = {"tensor_model_parallel": False}


def meta_name(key: str) -> str:
    """named_parameters() name of a saved key: the adapter name goes back in."""
    key = re.sub(r"\.(lora_A|lora_B)\.", r".\1.default.", key)
    key = re.sub(r"\.(lora_embedding_[AB])$", r".\1.default", key)
    return key.replace(f"{PEFT}lm_head.weight", f"{PEFT}lm_head.modules_to_save.default.weight")


def hand_lora(root: Path, xser: bool = True, step: int = 10) -> tuple[Path, dict[str, torch.Tensor]]:
    """TP=2 LoRA on q_proj (column), o_proj and down_proj (row), fused gate_up_proj, embed_tokens, and lm_head in
    modules_to_save; returns (checkpoint dir, expected consolidated adapter)."""
    tp, L, a = 2, f"{PEFT}model.layers.0", rnd(4, 16)
    orig = {
        f"{L}.self_attn.q_proj.lora_A.weight": rnd(4, 16),
        f"{L}.self_attn.q_proj.lora_B.weight": rnd(16, 4),
        f"{L}.self_attn.o_proj.lora_A.weight": rnd(4, 16),
        f"{L}.self_attn.o_proj.lora_B.weight": rnd(16, 4),
        f"{L}.mlp.gate_proj.lora_A.weight": a,
        f"{L}.mlp.gate_proj.lora_B.weight": rnd(24, 4),
        f"{L}.mlp.up_proj.lora_A.weight": a,
        f"{L}.mlp.up_proj.lora_B.weight": rnd(24, 4),
        f"{L}.mlp.down_proj.lora_A.weight": rnd(4, 24),
        f"{L}.mlp.down_proj.lora_B.weight": rnd(16, 4),
        f"{PEFT}model.embed_tokens.lora_embedding_A": rnd(4, 32),
        f"{PEFT}model.embed_tokens.lora_embedding_B": rnd(16, 4),
        f"{PEFT}model.embed_tokens.base_layer.weight": rnd(32, 16),
        f"{PEFT}lm_head.weight": rnd(32, 16),
    }
    o, E = orig, f"{PEFT}model.embed_tokens"
    sharded = {  # saved key -> (per-rank tensors, metadata entry)
        f"{L}.self_attn.q_proj.lora_A.weight": (rep(o[f"{L}.self_attn.q_proj.lora_A.weight"], tp), REP),
        f"{L}.self_attn.q_proj.lora_B.weight": (col(o[f"{L}.self_attn.q_proj.lora_B.weight"], tp), _tp(0)),
        f"{L}.self_attn.o_proj.lora_A.weight": (row(o[f"{L}.self_attn.o_proj.lora_A.weight"], tp), _tp(1)),
        f"{L}.self_attn.o_proj.lora_B.weight": (rep(o[f"{L}.self_attn.o_proj.lora_B.weight"], tp), REP),
        f"{L}.mlp.gate_up_proj.lora_A.weight": (rep(a, tp), REP),
        f"{L}.mlp.gate_up_proj.lora_B.weight": (
            fused([o[f"{L}.mlp.gate_proj.lora_B.weight"], o[f"{L}.mlp.up_proj.lora_B.weight"]], tp),
            _tp(0),
        ),
        f"{L}.mlp.down_proj.lora_A.weight": (row(o[f"{L}.mlp.down_proj.lora_A.weight"], tp), _tp(1)),
        f"{L}.mlp.down_proj.lora_B.weight": (rep(o[f"{L}.mlp.down_proj.lora_B.weight"], tp), REP),
        f"{E}.lora_embedding_A": (rep(o[f"{E}.lora_embedding_A"], tp), REP),
        f"{E}.lora_embedding_B": (rep(o[f"{E}.lora_embedding_B"], tp), REP),
        f"{E}.base_layer.weight": (col(o[f"{E}.base_layer.weight"], tp), _tp(0)),
        f"{PEFT}lm_head.weight": (col(o[f"{PEFT}lm_head.weight"], tp), REP),  # deep copy lost the TP attributes
    }
    params = {meta_name(key): entry for key, (_, entry) in sharded.items()}
    for name, dim, stride in (
        ("self_attn.q_proj", 0, 1),
        ("self_attn.o_proj", 1, 1),
        ("mlp.gate_up_proj", 0, 2),
        ("mlp.down_proj", 1, 1),
    ):
        params[f"{L}.{name}.base_layer.weight"] = _tp(dim, stride)
    params[f"{PEFT}lm_head.original_module.weight"] = _tp(0)
    params[f"{PEFT}model.norm.weight"] = REP
    ckpt = root / f"checkpoint-{step}"
    shards = ckpt / "adapter_default" / "adapter_shards"
    (shards / "model").mkdir(parents=True)
    for r in range(tp):
        write_rank(
            shards / "model" / f"dp_rank_00_tp_rank_{r:02d}_pp_rank_00.pt",
            {k: v[0][r] for k, v in sharded.items()},
            xser,
        )
    spec = {
        "fused_linear_name": "gate_up_proj",
        "linear_names": ["gate_proj", "up_proj"],
        "bias": False,
        "fuse_axis": 0,
        "original_dims": [24, 24],
        "tp_size": 2,
        "peft_type": "lora",
    }
    metadata = {
        "parameters": params,
        "model_weight_transformation_specs": [
            {"module_fully_qualified_name": f"{L}.mlp", "specs": [["FusedLinearsSpec", spec]]},
            {"module_fully_qualified_name": f"{L}.self_attn", "specs": []},
        ],
    }
    (shards / "mp_metadata_pp_rank_0.json").write_text(json.dumps(metadata, indent=4))
    (shards / "done").write_text("1")
    (shards / "checkpoint").write_text("1")
    config = synth.default_adapter_config(4, ["q_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "embed_tokens"])
    config["modules_to_save"] = ["lm_head"]
    (ckpt / "adapter_default" / "adapter_config.json").write_text(json.dumps(config))
    return ckpt, orig


def read_adapter(out: Path) -> dict[str, torch.Tensor]:
    return load_file(out / "adapter_model.safetensors")


def assert_same(got: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert sorted(got) == sorted(expected)
    bad = [k for k in expected if got[k].dtype != expected[k].dtype or not torch.equal(got[k], expected[k])]
    assert not bad, bad[:5]


@pytest.mark.parametrize("xser", [True, False], ids=["xser", "plain"])
def test_hand_built_lora_consolidates_bit_exact(tmp_path: Path, xser: bool) -> None:
    ckpt, expected = hand_lora(tmp_path, xser)
    result = consolidate_adapter(tmp_path, tmp_path / "out", progress=False)
    assert_same(read_adapter(tmp_path / "out"), expected)
    assert result.tp_size == 2 and result.xser is xser and result.drift.max_abs_diff == 0
    config = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    assert "gate_up_proj" not in config["target_modules"] and config["inference_mode"] is True
    assert resolve_checkpoint(ckpt / "adapter_default" / "adapter_shards").kind == "lora"


def test_rank_index_reads_names_tids_shapes(tmp_path: Path) -> None:
    ckpt, _ = hand_lora(tmp_path)
    index = read_rank_index(ckpt / "adapter_default/adapter_shards/model/dp_rank_00_tp_rank_01_pp_rank_00.pt")
    entry = index[f"{PEFT}model.layers.0.mlp.gate_up_proj.lora_B.weight"]
    assert entry.tid == 5 and entry.shape == (24, 4) and entry.dtype == torch.bfloat16  # type: ignore[union-attr]


# ---- the restricted unpickler ----


def _torch_file_with_pickle(path: Path, pkl: bytes) -> None:
    """A torch.save zip container whose data.pkl is replaced by hand-written pickle bytes."""
    buf = io.BytesIO()
    torch.save({}, buf)
    with zipfile.ZipFile(io.BytesIO(buf.getvalue())) as src, zipfile.ZipFile(path, "w") as dst:
        for info in src.infolist():
            dst.writestr(info.filename, pkl if info.filename.endswith("data.pkl") else src.read(info))


@pytest.mark.parametrize(
    ("pkl", "named"),
    [
        (b"\x80\x02cos\nsystem\nX\x02\x00\x00\x00id\x85R.", "os.system"),
        (
            b"\x80\x02}X\x01\x00\x00\x00wctorch_xla.utils.serialization\nOther\n)\x81s.",
            "torch_xla.utils.serialization.Other",
        ),
    ],
    ids=["os.system", "torch_xla-Other"],
)
@pytest.mark.parametrize("container", ["zip", "raw"])
def test_unpickler_refuses_other_globals(tmp_path: Path, pkl: bytes, named: str, container: str) -> None:
    rank_file = tmp_path / "dp_rank_00_tp_rank_00_pp_rank_00.pt"
    Path(f"{rank_file}.tensors").mkdir()
    _torch_file_with_pickle(rank_file, pkl) if container == "zip" else rank_file.write_bytes(pkl)
    with pytest.raises(CheckpointError, match=rf"{rank_file.name}.*refusing to unpickle global {named}"):
        read_rank_index(rank_file)


def test_evil_rank_file_fails_validation_naming_global_and_file(tmp_path: Path) -> None:
    ckpt, _ = hand_lora(tmp_path)
    rank_file = ckpt / "adapter_default/adapter_shards/model/dp_rank_00_tp_rank_01_pp_rank_00.pt"
    _torch_file_with_pickle(rank_file, b"\x80\x02cos\nsystem\nX\x02\x00\x00\x00id\x85R.")
    with pytest.raises(
        CheckpointError, match=r"dp_rank_00_tp_rank_01_pp_rank_00\.pt: refusing to unpickle global os\.system"
    ):
        validate(resolve_checkpoint(ckpt))


# ---- errors: named file, named problem, nothing written ----

SHARDS = "adapter_default/adapter_shards"


def _rank(ckpt: Path, tp: int) -> Path:
    return ckpt / SHARDS / "model" / f"dp_rank_00_tp_rank_{tp:02d}_pp_rank_00.pt"


def _drop_rank(ckpt: Path) -> None:
    _rank(ckpt, 1).unlink()


def _truncate_tensor(ckpt: Path) -> None:
    f = Path(f"{_rank(ckpt, 1)}.tensors") / "tensor_5.pt"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])


def _delete_tensor(ckpt: Path) -> None:
    (Path(f"{_rank(ckpt, 0)}.tensors") / "tensor_3.pt").unlink()


def _bad_spec(ckpt: Path) -> None:
    path = ckpt / SHARDS / "mp_metadata_pp_rank_0.json"
    meta = json.loads(path.read_text())
    meta["model_weight_transformation_specs"][0]["specs"][0][1]["original_dims"] = [24, 40]
    path.write_text(json.dumps(meta))


def _drop_metadata(ckpt: Path) -> None:
    (ckpt / SHARDS / "mp_metadata_pp_rank_0.json").unlink()


def _drop_key(ckpt: Path) -> None:
    state = torch.load(_rank(ckpt, 1), weights_only=True)
    state.pop(f"{PEFT}model.layers.0.mlp.down_proj.lora_B.weight")
    torch.save(state, _rank(ckpt, 1))


def _shape_mismatch(ckpt: Path) -> None:
    state = torch.load(_rank(ckpt, 1), weights_only=True)
    state[f"{PEFT}model.layers.0.mlp.down_proj.lora_B.weight"] = rnd(16, 5)
    torch.save(state, _rank(ckpt, 1))


def _unknown_key(ckpt: Path) -> None:
    for tp in range(2):
        state = torch.load(_rank(ckpt, tp), weights_only=True)
        state[f"{PEFT}model.layers.0.mlp.mystery.weight"] = rnd(2)
        torch.save(state, _rank(ckpt, tp))


def _wrong_rank_r(ckpt: Path) -> None:
    path = ckpt / "adapter_default" / "adapter_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "r": 8}))


@pytest.mark.parametrize(
    ("breaks", "xser", "message"),
    [
        (_drop_rank, True, r"dp_rank_00_tp_rank_01_pp_rank_00\.pt: rank file missing"),
        (_truncate_tensor, True, r"tensor_5\.pt: truncated or corrupt"),
        (_delete_tensor, True, r"tensor_3\.pt: tensor file is missing"),
        (_bad_spec, True, r"gate_up_proj\.lora_B\.weight: per-rank size 24 along dim 0 contradicts the spec \(32\)"),
        (_drop_metadata, True, r"mp_metadata_pp_rank_0\.json: metadata missing"),
        (lambda c: (c / SHARDS / "done").unlink(), True, r"adapter_shards/done: missing"),
        (_drop_key, False, r"tp_rank_01_pp_rank_00\.pt: key set differs from tp rank 0 \(missing \['.*down_proj"),
        (_shape_mismatch, False, r"tp_rank_01_pp_rank_00\.pt: .*down_proj\.lora_B\.weight is \(16, 5\)"),
        (_unknown_key, False, r"mystery\.weight has no metadata entry"),
        (_wrong_rank_r, True, r"lora_A\.weight has rank 4, .*adapter_config\.json says r=8"),
        (lambda c: (c / "adapter_default" / "adapter_config.json").unlink(), True, r"adapter_config\.json missing"),
    ],
    ids=[
        "rank-file",
        "truncated",
        "tensor-file",
        "spec-shape",
        "metadata",
        "done",
        "keys",
        "shapes",
        "unknown",
        "r",
        "adapter-config",
    ],
)
def test_validate_errors_name_file_and_problem(
    tmp_path: Path, breaks: Callable[[Path], None], xser: bool, message: str
) -> None:
    ckpt, _ = hand_lora(tmp_path, xser)
    breaks(ckpt)
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep").write_text("previous result")
    with pytest.raises(CheckpointError, match=message):
        consolidate_adapter(ckpt, out, progress=False)
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".out")] == []
    assert (out / "keep").read_text() == "previous result"


def test_output_dir_picks_newest_complete_checkpoint(tmp_path: Path) -> None:
    hand_lora(tmp_path, step=10)
    newer, _ = hand_lora(tmp_path, step=20)
    (newer / SHARDS / "done").unlink()
    ckpt = resolve_checkpoint(tmp_path)
    assert ckpt.shards_dir.parent.parent.name == "checkpoint-10"
    assert any("checkpoint-20" in n for n in ckpt.notes)
    assert resolve_checkpoint(newer).shards_dir.parent.parent.name == "checkpoint-20"  # explicit dir: taken as is


def test_wrong_adapter_name_lists_available(tmp_path: Path) -> None:
    hand_lora(tmp_path)
    with pytest.raises(CheckpointError, match="no adapter_other/ here; found adapter_default"):
        resolve_checkpoint(tmp_path / "checkpoint-10", adapter_name="other")


def test_lora_checkpoint_refused_by_consolidate_full(tmp_path: Path) -> None:
    hand_lora(tmp_path)
    with pytest.raises(CheckpointError, match="use consolidate_adapter"):
        consolidate_full(tmp_path, tmp_path / "out", progress=False)


@pytest.mark.parametrize(
    ("which", "message"),
    [
        ("tensor_parallel_shards", r"legacy optimum-neuron 0\.0\.x layout"),
        ("adapter_shards_no_adapter_level", "2024 AWS sample"),
    ],
)
@pytest.mark.parametrize("level", ["output", "checkpoint"])
def test_legacy_layouts_are_named(tmp_path: Path, which: Any, message: str, level: str) -> None:
    ckpt = synth.write_legacy_layout(tmp_path, which)
    with pytest.raises(CheckpointError, match=message):
        resolve_checkpoint(tmp_path if level == "output" else ckpt)


def test_legacy_adapter_shards_pointed_at_directly(tmp_path: Path) -> None:
    ckpt = synth.write_legacy_layout(tmp_path, "adapter_shards_no_adapter_level")
    with pytest.raises(CheckpointError, match="2024 AWS sample"):
        resolve_checkpoint(ckpt / "adapter_shards")


def test_package_never_imports_neuron_stack(tmp_path: Path) -> None:
    hand_lora(tmp_path)
    code = (
        "import sys; from pathlib import Path\n"
        "import hyperjob.checkpoint.consolidate as c, hyperjob.checkpoint.reader, hyperjob.checkpoint.unshard\n"
        f"c.consolidate_adapter(Path({str(tmp_path)!r}), Path({str(tmp_path / 'out')!r}), progress=False)\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in {'torch_xla', 'neuronx_distributed', 'optimum'})\n"
        "print(bad); sys.exit(1 if bad else 0)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert (tmp_path / "out" / "adapter_model.safetensors").is_file()


# ---- round trips through the independent generator (neuron_checkpoints) ----

LORA_CASES: dict[str, dict[str, Any]] = {
    "tp2": dict(config={}, tp=2),
    "gqa-tp8-m4": dict(config=dict(heads=8, kv_heads=2), tp=8, m=4),
    "gqa-tp8-m4-fuse_qkv": dict(config=dict(heads=8, kv_heads=2), tp=8, m=4, fuse_qkv=True),
    "fuse_qkv-mha": dict(config={}, tp=2, fuse_qkv=True),
    "embedding": dict(config={}, tp=2, embedding=True, targets=["q_proj", "v_proj"]),
    "lm_head": dict(config={}, tp=4, targets=[*PROJ, "lm_head"]),
    "pp2": dict(config=dict(layers=4), tp=2, pp=2),
    "q_v-only-gqa": dict(config=dict(heads=8, kv_heads=2), tp=4, m=2, targets=["o_proj", "down_proj"]),
}


def synth_lora(tmp: Path, case: dict[str, Any], xser: bool, dtype: torch.dtype = torch.bfloat16, **kw: Any) -> Any:
    config = synth.tiny_llama_config(**case["config"])
    state = synth.random_lora_state(
        config, 4, case.get("targets", PROJ), embedding=case.get("embedding", False), seed=3, dtype=dtype
    )
    layout = dict(tp=case["tp"], kv_size_multiplier=case.get("m"), fuse_qkv=case.get("fuse_qkv", False))
    synth.write_neuron_checkpoint(
        tmp, config=config, state_dict=state, kind="lora", xser=xser, pp=case.get("pp", 1), **layout, **kw
    )
    return config, state, synth.expected_consolidation(state, config, **layout)


@pytest.mark.parametrize("xser", [True, False], ids=["xser", "plain"])
@pytest.mark.parametrize("case", sorted(LORA_CASES))
def test_lora_round_trip_through_synth(tmp_path: Path, case: str, xser: bool) -> None:
    _, _, expected = synth_lora(tmp_path / "run", LORA_CASES[case], xser)
    result = consolidate_adapter(tmp_path / "run", tmp_path / "out", progress=False)
    assert_same(read_adapter(tmp_path / "out"), expected)
    assert result.drift.max_abs_diff == 0 and result.tensors == len(expected)
    targets = json.loads((tmp_path / "out" / "adapter_config.json").read_text())["target_modules"]
    assert not {"qkv_proj", "gate_up_proj"} & set(targets)


FULL_CASES: dict[str, dict[str, Any]] = {
    "tp4": dict(config={}, tp=4),
    "gqa-tp4-m2": dict(config=dict(heads=8, kv_heads=2), tp=4, m=2),
    "gqa-tp8-fuse_qkv": dict(config=dict(heads=8, kv_heads=2), tp=8, m=4, fuse_qkv=True),
    "fuse_qkv-mha-pp2": dict(config=dict(layers=4), tp=2, fuse_qkv=True, pp=2),
    "tied-tp2": dict(config=dict(tie=True), tp=2),
}


@pytest.mark.parametrize("xser", [True, False], ids=["xser", "plain"])
@pytest.mark.parametrize("case", sorted(FULL_CASES))
def test_full_round_trip_through_synth(tmp_path: Path, case: str, xser: bool) -> None:
    c = FULL_CASES[case]
    config = synth.tiny_llama_config(**c["config"])
    state = synth.random_full_state(config, seed=4)
    synth.write_neuron_checkpoint(
        tmp_path / "run",
        config=config,
        state_dict=state,
        kind="full",
        tp=c["tp"],
        kv_size_multiplier=c.get("m"),
        fuse_qkv=c.get("fuse_qkv", False),
        xser=xser,
        pp=c.get("pp", 1),
    )
    result = consolidate_full(tmp_path / "run", tmp_path / "out", max_shard_size="64KB", progress=False)
    out = tmp_path / "out"
    got = {k: v for f in sorted(out.glob("*.safetensors")) for k, v in load_file(f).items()}
    assert_same(got, state)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(state) and {"config.json", "generation_config.json"} <= set(result.files)
    assert json.loads((out / "config.json").read_text())["num_attention_heads"] == config["num_attention_heads"]


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="names fsynced files through /proc")
def test_every_output_file_is_fsynced(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Weights, index, adapter config and the copied model and tokenizer files alike (they once were not)."""
    fsynced: set[str] = set()
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        if os.path.isfile(path := os.readlink(f"/proc/self/fd/{fd}")):
            fsynced.add(f"{Path(path).parent.name.split('.')[1]}/{Path(path).name}")  # .NAME.<id>.partial/file
        real_fsync(fd)

    config = synth.tiny_llama_config(layers=1)
    ckpt = synth.write_neuron_checkpoint(
        tmp_path / "full", config=config, state_dict=synth.random_full_state(config), kind="full", tp=2
    )
    (ckpt / "tokenizer.json").write_text("{}")
    lora = synth.random_lora_state(config, 4, ["q_proj", "v_proj"], seed=1)
    synth.write_neuron_checkpoint(tmp_path / "lora", config=config, state_dict=lora, kind="lora", tp=2)
    monkeypatch.setattr(os, "fsync", fsync)
    consolidate_full(tmp_path / "full", tmp_path / "model", max_shard_size="20KB", progress=False)
    consolidate_adapter(tmp_path / "lora", tmp_path / "adapter", progress=False)
    written = {f"{d}/{f.name}" for d in ("model", "adapter") for f in (tmp_path / d).iterdir()}
    assert {"model/model.safetensors.index.json", "model/tokenizer.json", "adapter/adapter_config.json"} <= written
    assert fsynced == written


def test_shard_names_bound_by_size() -> None:
    sizes = [40, 40, 120]  # bytes: fp32 x 10, x 10, x 30
    assert shard_names(sizes, 1000) == ["model.safetensors"] * 3
    assert shard_names(sizes, 80) == ["model-00001-of-00002.safetensors"] * 2 + ["model-00002-of-00002.safetensors"]
    assert shard_names(sizes, 10) == [f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)]
    assert shard_names([0, 0, 50, 0], 10) == ["model-00001-of-00002.safetensors"] * 3 + [
        "model-00002-of-00002.safetensors"
    ]  # an empty shard takes the next tensor whatever its size


def test_unfused_adapter_config() -> None:
    fused_names = {"gate_up_proj": ["gate_proj", "up_proj"], "qkv_proj": ["q_proj", "k_proj", "v_proj"]}
    config, notes = unfused_adapter_config({"target_modules": ["qkv_proj", "gate_up_proj", "o_proj"]}, fused_names)
    assert config["target_modules"] == ["q_proj", "k_proj", "v_proj", "gate_proj", "up_proj", "o_proj"] and notes
    config, notes = unfused_adapter_config({"target_modules": ["q_proj", "v_proj"]}, fused_names)
    assert config["target_modules"] == ["q_proj", "v_proj"] and not notes


@pytest.mark.parametrize("xser", [True, False], ids=["xser", "plain"])
def test_replica_drift_fails_unless_allowed(tmp_path: Path, xser: bool) -> None:
    case = LORA_CASES["gqa-tp8-m4"]
    _, _, expected = synth_lora(tmp_path / "run", case, xser, replica_noise=1e-2)
    with pytest.raises(ReplicaDriftError, match=r"lora_A\.weight: max abs diff"):
        consolidate_adapter(tmp_path / "run", tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()
    result = consolidate_adapter(tmp_path / "run", tmp_path / "out", allow_drift=True, progress=False)
    assert result.drift.exceeding() and result.drift.max_abs_diff > 0
    got = read_adapter(tmp_path / "out")
    assert sorted(got) == sorted(expected)
    changed = {k for k in expected if not torch.equal(got[k], expected[k])}
    assert changed and all(torch.allclose(got[k].float(), expected[k].float(), atol=0.05) for k in changed)
    replicated = re.compile(
        r"(q_proj|k_proj|v_proj|gate_proj|up_proj)\.lora_A|(o_proj|down_proj)\.lora_B|(k|v)_proj\.lora_B"
    )
    assert all(replicated.search(k) for k in changed), sorted(changed)[:5]


@pytest.mark.filterwarnings("ignore:Setting `save_embedding_layers`")
@pytest.mark.parametrize("case", ["tp2", "gqa-tp8-m4-fuse_qkv", "embedding"])
def test_peft_loads_consolidated_adapter_with_identical_logits(tmp_path: Path, case: str) -> None:
    from peft import PeftModel, get_peft_model_state_dict
    from transformers import LlamaConfig, LlamaForCausalLM

    config, _, expected = synth_lora(tmp_path / "run", LORA_CASES[case], xser=True, dtype=torch.float32)
    consolidate_adapter(tmp_path / "run", tmp_path / "ours", progress=False)
    reference = tmp_path / "reference"
    reference.mkdir()
    from safetensors.torch import save_file

    save_file({k: v.clone() for k, v in expected.items()}, reference / "adapter_model.safetensors")
    shutil.copy(tmp_path / "ours" / "adapter_config.json", reference / "adapter_config.json")
    hf_config = LlamaConfig(**{k: v for k, v in config.items() if k not in ("architectures", "torch_dtype")})
    ids = torch.randint(0, config["vocab_size"], (2, 12), generator=torch.Generator().manual_seed(1))
    logits = []
    for adapter in (reference, tmp_path / "ours"):
        torch.manual_seed(0)
        model = PeftModel.from_pretrained(LlamaForCausalLM(hf_config).eval(), adapter)
        assert set(get_peft_model_state_dict(model)) == set(expected)
        with torch.no_grad():
            logits.append(model(ids).logits)
    assert torch.equal(logits[0], logits[1])


def test_plain_reader_reads_views_and_shared_storage(tmp_path: Path) -> None:
    base = rnd(6, 8)
    state = {
        "t": base.T,
        "slice": base[2:4],
        "whole": base,
        "strided": base[:, ::2],
        "scalar": torch.tensor(3.0),
        "empty": torch.empty(0, 4),
    }
    path = tmp_path / "rank.pt"
    torch.save(state, path)
    reader = PlainRankReader()
    for name, want in state.items():
        got = reader.get(path, name)
        assert got.shape == want.shape and torch.equal(got, want), name
    assert reader._spans[path] is not None  # located by positional reads, not the per-tensor memory-map fallback


def test_trn_config_contradicting_rank_files_is_an_error(tmp_path: Path) -> None:
    config = synth.tiny_llama_config()
    synth.write_neuron_checkpoint(
        tmp_path, config=config, state_dict=synth.random_full_state(config), kind="full", tp=2
    )
    trn = tmp_path / "checkpoint-10" / "trn_config.json"
    trn.write_text(json.dumps({**json.loads(trn.read_text()), "tensor_parallel_size": 4}))
    with pytest.raises(CheckpointError, match=r"trn_config\.json: tensor_parallel_size=4, but the rank files"):
        validate(resolve_checkpoint(tmp_path))


@pytest.mark.parametrize("target", ["output-dir", "checkpoint", "shards"])
def test_output_that_would_replace_the_input_is_refused(tmp_path: Path, target: str) -> None:
    ckpt, _ = hand_lora(tmp_path)
    out = {"output-dir": tmp_path, "checkpoint": ckpt, "shards": ckpt / SHARDS}[target]
    with pytest.raises(CheckpointError, match="would replace the checkpoint"):
        consolidate_adapter(tmp_path, out, progress=False)
    assert (ckpt / SHARDS / "done").is_file()


def test_consolidate_any_dispatches_on_kind(tmp_path: Path) -> None:
    hand_lora(tmp_path / "lora")
    config = synth.tiny_llama_config(layers=1)
    synth.write_neuron_checkpoint(
        tmp_path / "full", config=config, state_dict=synth.random_full_state(config), kind="full", tp=2
    )
    assert consolidate_any(tmp_path / "lora", tmp_path / "a", progress=False).kind == "lora"
    result = consolidate_any(tmp_path / "full", tmp_path / "m", progress=False)
    assert result.kind == "full" and (tmp_path / "m" / "model.safetensors").is_file()
