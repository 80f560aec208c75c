"""The fixture generator checked against the upstream format facts (FORMAT.md), never against the reader.

Every expectation here is re-derived in the test from the documented rules rather than taken from the writer's code.
"""

from __future__ import annotations

import json
import pickle
import pickletools
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import Any

import pytest

torch = pytest.importorskip("torch")

from hyperjob.testing import neuron_checkpoints as synth  # noqa: E402
from hyperjob.testing.neuron_checkpoints import writer  # noqa: E402

P = "base_model.model."
BF16 = torch.bfloat16


# ---------------------------------------------------------------- test-side readers (independent of the reader)


class _Ref:
    def __init__(self, tid: int = -1) -> None:
        self.tid = tid


class _RefUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if (module, name) == ("torch_xla.utils.serialization", "TensorReference"):
            return _Ref
        return super().find_class(module, name)


_UNPICKLE = type(sys)("test_xser_unpickle")
_UNPICKLE.Unpickler = _RefUnpickler  # type: ignore[attr-defined]
_UNPICKLE.load = pickle.load  # type: ignore[attr-defined]


def load_rank(path: Path) -> dict[str, Any]:
    """A rank file as {key: tensor}, xser or plain, preserving the file's key order."""
    folder = path.with_name(path.name + ".tensors")
    if not folder.exists():
        return torch.load(path, weights_only=True)
    refs = torch.load(path, pickle_module=_UNPICKLE, weights_only=False)
    return {k: torch.load(folder / f"tensor_{r.tid}.pt", weights_only=True) for k, r in refs.items()}


def ranks(ckpt: Path, tp: int, sub: str = "adapter_default/adapter_shards", pp: int = 0) -> list[dict[str, Any]]:
    return [load_rank(ckpt / sub / "model" / f"dp_rank_00_tp_rank_{r:02d}_pp_rank_{pp:02d}.pt") for r in range(tp)]


def metadata(ckpt: Path, sub: str = "adapter_default/adapter_shards", pp: int = 0) -> dict[str, Any]:
    return json.loads((ckpt / sub / f"mp_metadata_pp_rank_{pp}.json").read_text())


def tree(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()}


def col(tp: int, dim: int = 0, stride: int = 1) -> dict[str, Any]:
    return {"tensor_model_parallel": True, "partition_dim": dim, "partition_stride": stride, "num_partitions": tp}


NOTP = {"tensor_model_parallel": False}


def chunk(t: Any, tp: int, r: int, dim: int = 0) -> Any:
    return torch.chunk(t, tp, dim=dim)[r]


def gqa_heads(tp: int, rank: int, heads: int, kv: int, m: int) -> list[int]:
    """Query heads on `rank`, from the rule: KV list [K0..K(kv-1)] * m is cut into tp equal runs (trn1); a rank's
    slot for replica c of KV head k serves the c-th block of that head's query group (block size = group / m)."""
    kv_per_rank, per_slot, group = kv * m // tp, heads // tp // (kv * m // tp), heads // kv
    out = []
    for j in range(kv_per_rank):
        g = rank * kv_per_rank + j  # position in the replicated KV list
        k, c = g % kv, g // kv
        out += [k * group + c * per_slot + q for q in range(per_slot)]
    return out


# ---------------------------------------------------------------- layout and serialization


@pytest.fixture
def lora_tp2(tmp_path: Path) -> tuple[Path, dict[str, Any], dict[str, Any]]:
    cfg = synth.tiny_llama_config()
    state = synth.random_lora_state(cfg, 4, synth.PROJECTIONS, seed=1)
    ckpt = synth.write_neuron_checkpoint(tmp_path, config=cfg, state_dict=state, kind="lora", tp=2)
    return ckpt, cfg, state


def test_lora_tree_xser(lora_tp2: tuple[Path, dict[str, Any], dict[str, Any]]) -> None:
    ckpt, cfg, state = lora_tp2
    n = len(state)  # gate/up become one module with one A: 7 projections -> 6 modules x 2 factors per layer
    n_saved = cfg["num_hidden_layers"] * 12
    assert n == cfg["num_hidden_layers"] * 14
    model = "adapter_default/adapter_shards/model"
    expected = {"README.md", "trainer_state.json", "scheduler.pt", "adapter_default/adapter_config.json"}
    expected |= {f"adapter_default/adapter_shards/{f}" for f in ("checkpoint", "done", "mp_metadata_pp_rank_0.json")}
    for r in range(2):
        name = f"{model}/dp_rank_00_tp_rank_{r:02d}_pp_rank_00.pt"
        expected |= {name, f"{name}.info.pt"} | {f"{name}.tensors/tensor_{i}.pt" for i in range(n_saved)}
    assert tree(ckpt) == expected
    for f in ("checkpoint", "done"):
        assert (ckpt / "adapter_default/adapter_shards" / f).read_text() == "1"
    cfg_json = json.loads((ckpt / "adapter_default/adapter_config.json").read_text())
    assert cfg_json["inference_mode"] is True and sorted(cfg_json["target_modules"]) == sorted(synth.PROJECTIONS)


def test_lora_tree_plain(tmp_path: Path) -> None:
    cfg = synth.tiny_llama_config(layers=1)
    state = synth.random_lora_state(cfg, 4, ["q_proj", "v_proj"], seed=1)
    ckpt = synth.write_neuron_checkpoint(tmp_path, config=cfg, state_dict=state, kind="lora", tp=2, xser=False)
    model = {f for f in tree(ckpt) if "/model/" in f}
    assert model == {f"adapter_default/adapter_shards/model/dp_rank_00_tp_rank_0{r}_pp_rank_00.pt" for r in (0, 1)}
    rank0 = torch.load(ckpt / sorted(model)[0], weights_only=True)  # a plain dict of CPU tensors
    assert type(rank0) is dict and list(rank0) == list(state)  # q A, q B, v A, v B in module order
    assert rank0[f"{P}model.layers.0.self_attn.q_proj.lora_B.weight"].shape == (32, 4)


def test_xser_pickle_global_and_info(lora_tp2: tuple[Path, dict[str, Any], dict[str, Any]]) -> None:
    ckpt, _, _ = lora_tp2
    ref = ckpt / "adapter_default/adapter_shards/model/dp_rank_00_tp_rank_01_pp_rank_00.pt"
    with zipfile.ZipFile(ref) as z:
        data = z.read(next(n for n in z.namelist() if n.endswith("data.pkl")))
    globals_ = {arg for op, arg, _ in pickletools.genops(data) if op.name in ("GLOBAL", "STACK_GLOBAL")}
    assert globals_ == {"torch_xla.utils.serialization TensorReference"}
    assert "torch_xla" not in sys.modules
    refs = torch.load(ref, pickle_module=_UNPICKLE, weights_only=False)
    assert type(refs) is dict and [r.tid for r in refs.values()] == list(range(len(refs)))  # tids in state order
    assert vars(next(iter(refs.values()))) == {"tid": 0}
    info = torch.load(str(ref) + ".info.pt", weights_only=True)
    assert list(info) == list(range(len(refs)))
    for tid, entry in info.items():
        t = torch.load(ref.with_name(ref.name + ".tensors") / f"tensor_{tid}.pt", weights_only=True)
        assert entry == {"dtype": BF16, "shape": t.shape, "expert_model_parallel": False}
        assert type(entry["shape"]) is torch.Size and t.is_contiguous()


def test_lora_metadata(lora_tp2: tuple[Path, dict[str, Any], dict[str, Any]]) -> None:
    ckpt, cfg, _ = lora_tp2
    text = (ckpt / "adapter_default/adapter_shards/mp_metadata_pp_rank_0.json").read_text()
    assert text.startswith('{\n    "parameters": {\n        "')  # json.dumps(indent=4)
    meta = json.loads(text)
    params, lp = meta["parameters"], f"{P}model.layers.0"
    assert params[f"{P}model.embed_tokens.weight"] == col(2)  # frozen base weights are listed too
    assert params[f"{lp}.self_attn.q_proj.base_layer.weight"] == col(2)
    assert params[f"{lp}.self_attn.q_proj.lora_A.default.weight"] == NOTP
    assert params[f"{lp}.self_attn.q_proj.lora_B.default.weight"] == col(2)
    assert params[f"{lp}.self_attn.o_proj.lora_A.default.weight"] == col(2, dim=1)
    assert params[f"{lp}.self_attn.o_proj.lora_B.default.weight"] == NOTP
    assert params[f"{lp}.mlp.gate_up_proj.base_layer.weight"] == col(2, stride=2)
    assert params[f"{lp}.mlp.gate_up_proj.lora_B.default.weight"] == col(2)  # stride 1 although fused
    assert params[f"{lp}.mlp.down_proj.lora_A.default.weight"] == col(2, dim=1)
    assert params[f"{lp}.input_layernorm.weight"] == NOTP
    assert params[f"{P}lm_head.weight"] == col(2)
    assert len(params) == 1 + cfg["num_hidden_layers"] * (6 * 3 + 2) + 2
    specs = meta["model_weight_transformation_specs"]
    assert [s["module_fully_qualified_name"] for s in specs[:2]] == [f"{lp}.self_attn", f"{lp}.mlp"]
    assert specs[0]["specs"] == []
    assert specs[1]["specs"] == [
        [
            "FusedLinearsSpec",
            {
                "fused_linear_name": "gate_up_proj",
                "linear_names": ["gate_proj", "up_proj"],
                "bias": False,
                "fuse_axis": 0,
                "original_dims": [128, 128],
                "tp_size": 2,
                "peft_type": "lora",
            },
        ]
    ]


def test_lora_values_tp2(lora_tp2: tuple[Path, dict[str, Any], dict[str, Any]]) -> None:
    ckpt, _, state = lora_tp2
    rk, lp = ranks(ckpt, 2), f"{P}model.layers.1"
    for r in range(2):
        q_a, q_b = state[f"{lp}.self_attn.q_proj.lora_A.weight"], state[f"{lp}.self_attn.q_proj.lora_B.weight"]
        assert torch.equal(rk[r][f"{lp}.self_attn.q_proj.lora_A.weight"], q_a)  # replicated
        assert torch.equal(rk[r][f"{lp}.self_attn.q_proj.lora_B.weight"], chunk(q_b, 2, r))
        o_a, o_b = state[f"{lp}.self_attn.o_proj.lora_A.weight"], state[f"{lp}.self_attn.o_proj.lora_B.weight"]
        assert torch.equal(rk[r][f"{lp}.self_attn.o_proj.lora_A.weight"], chunk(o_a, 2, r, dim=1))
        assert torch.equal(rk[r][f"{lp}.self_attn.o_proj.lora_B.weight"], o_b)
        g_b, u_b = state[f"{lp}.mlp.gate_proj.lora_B.weight"], state[f"{lp}.mlp.up_proj.lora_B.weight"]
        fused = torch.cat([chunk(g_b, 2, r), chunk(u_b, 2, r)])  # [gate_r; up_r]
        assert torch.equal(rk[r][f"{lp}.mlp.gate_up_proj.lora_B.weight"], fused)
        assert torch.equal(rk[r][f"{lp}.mlp.gate_up_proj.lora_A.weight"], state[f"{lp}.mlp.gate_proj.lora_A.weight"])
    assert not any(".gate_proj." in k or ".up_proj." in k for k in rk[0])


# ---------------------------------------------------------------- Llama-3-8B shapes at TP=8


def test_llama3_8b_shapes_tp8(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Layer 0 of Llama-3-8B. Inputs are expanded constants and the writer's copy step is bypassed, so the files
    hold 1-row storages: the shapes are real while the 2.4 GB of bytes stay off the disk."""
    monkeypatch.setattr(writer, "_finish", lambda t, p, rank, noise: t)
    cfg = synth.llama3_8b_config(layers=1)
    row = torch.zeros(1, 14336, dtype=BF16)

    def big(o: int, i: int) -> Any:
        return row[:, :i].expand(o, i)

    state = {"model.embed_tokens.weight": big(128256, 4096), "lm_head.weight": big(128256, 4096)}
    shapes = {"q_proj": (4096, 4096), "k_proj": (1024, 4096), "v_proj": (1024, 4096), "o_proj": (4096, 4096)}
    shapes |= {"gate_proj": (14336, 4096), "up_proj": (14336, 4096), "down_proj": (4096, 14336)}
    for p, (o, i) in shapes.items():
        block = "mlp" if p in ("gate_proj", "up_proj", "down_proj") else "self_attn"
        state[f"model.layers.0.{block}.{p}.weight"] = big(o, i)
    for n in ("model.layers.0.input_layernorm", "model.layers.0.post_attention_layernorm", "model.norm"):
        state[f"{n}.weight"] = big(1, 4096)[0]
    ckpt = synth.write_neuron_checkpoint(tmp_path / "full", config=cfg, state_dict=state, kind="full", tp=8)
    table = {
        "model.embed_tokens.weight": (16032, 4096),
        "model.layers.0.self_attn.q_proj.weight": (512, 4096),
        "model.layers.0.self_attn.k_proj.weight": (128, 4096),
        "model.layers.0.self_attn.v_proj.weight": (128, 4096),
        "model.layers.0.self_attn.o_proj.weight": (4096, 512),
        "model.layers.0.mlp.gate_up_proj.weight": (3584, 4096),
        "model.layers.0.mlp.down_proj.weight": (4096, 1792),
        "model.layers.0.input_layernorm.weight": (4096,),
        "model.layers.0.post_attention_layernorm.weight": (4096,),
        "model.norm.weight": (4096,),
        "lm_head.weight": (16032, 4096),
    }
    for r in (0, 7):
        info = torch.load(ckpt / f"shards/model/dp_rank_00_tp_rank_0{r}_pp_rank_00.pt.info.pt", weights_only=True)
        assert [tuple(e["shape"]) for e in info.values()] == list(table.values())
    assert list(ranks(ckpt, 1, "shards")[0]) == list(table)
    lora = synth.random_lora_state(cfg, 16, synth.PROJECTIONS, seed=0)
    ckpt = synth.write_neuron_checkpoint(tmp_path / "lora", config=cfg, state_dict=lora, kind="lora", tp=8)
    got = {k.removeprefix(f"{P}model.layers.0."): tuple(v.shape) for k, v in ranks(ckpt, 8)[3].items()}
    assert got == {
        "self_attn.q_proj.lora_A.weight": (16, 4096),
        "self_attn.q_proj.lora_B.weight": (512, 16),
        "self_attn.k_proj.lora_A.weight": (16, 4096),
        "self_attn.k_proj.lora_B.weight": (128, 16),
        "self_attn.v_proj.lora_A.weight": (16, 4096),
        "self_attn.v_proj.lora_B.weight": (128, 16),
        "self_attn.o_proj.lora_A.weight": (16, 512),
        "self_attn.o_proj.lora_B.weight": (4096, 16),
        "mlp.gate_up_proj.lora_A.weight": (16, 4096),
        "mlp.gate_up_proj.lora_B.weight": (3584, 16),
        "mlp.down_proj.lora_A.weight": (16, 1792),
        "mlp.down_proj.lora_B.weight": (4096, 16),
    }


# ---------------------------------------------------------------- full model, TP 4


def test_full_model_tp4(tmp_path: Path) -> None:
    cfg = synth.tiny_llama_config(layers=2)
    state = synth.random_full_state(cfg, seed=3)
    ckpt = synth.write_neuron_checkpoint(tmp_path, config=cfg, state_dict=state, kind="full", tp=4, xser=False)
    assert {"config.json", "generation_config.json", "trn_config.json"} <= tree(ckpt)
    assert json.loads((ckpt / "config.json").read_text())["architectures"] == ["LlamaForCausalLM"]
    trn = json.loads((ckpt / "trn_config.json").read_text())
    assert trn["tensor_parallel_size"] == 4 and trn["use_xser"] is False and trn["fuse_qkv"] is False
    rk = ranks(ckpt, 4, "shards")
    rebuilt: dict[str, Any] = {}
    for k in rk[0]:
        parts = [rk[r][k] for r in range(4)]
        if k.endswith("gate_up_proj.weight"):
            halves = [torch.chunk(t, 2) for t in parts]  # each rank is [gate_r; up_r]
            rebuilt[k.replace("gate_up", "gate")] = torch.cat([h[0] for h in halves])
            rebuilt[k.replace("gate_up", "up")] = torch.cat([h[1] for h in halves])
        elif "norm" in k:
            assert all(torch.equal(t, parts[0]) for t in parts)
            rebuilt[k] = parts[0]
        else:
            rebuilt[k] = torch.cat(parts, dim=1 if k.endswith(("o_proj.weight", "down_proj.weight")) else 0)
    assert rebuilt.keys() == state.keys()
    assert all(torch.equal(rebuilt[k], state[k]) for k in state)
    meta = metadata(ckpt, "shards")
    assert list(meta["parameters"]) == list(rk[0])  # named_parameters order == state_dict order
    assert meta["parameters"]["model.layers.1.mlp.gate_up_proj.weight"] == col(4, stride=2)
    assert meta["model_weight_transformation_specs"][1]["specs"][0][1]["peft_type"] is None


# ---------------------------------------------------------------- GQA path (8 heads, 2 KV heads, TP 8)


def test_gqa_full_tp8(tmp_path: Path) -> None:
    cfg = synth.tiny_llama_config(hidden=64, heads=8, kv_heads=2, layers=1)
    state = synth.random_full_state(cfg, seed=4)
    ckpt = synth.write_neuron_checkpoint(tmp_path, config=cfg, state_dict=state, kind="full", tp=8, xser=False)
    rk, a = ranks(ckpt, 8, "shards"), "model.layers.0.self_attn"
    hd = 8
    q, k, v, o = (state[f"{a}.{p}.weight"] for p in ("q_proj", "k_proj", "v_proj", "o_proj"))
    ks = torch.cat([rk[r][f"{a}.qkv_proj.weight_k"] for r in range(8)])
    vs = torch.cat([rk[r][f"{a}.qkv_proj.weight_v"] for r in range(8)])
    for copy in torch.chunk(ks, 4):  # m = tp // kv = 4 identical copies, interleaved (trn1)
        assert torch.equal(copy, k)
    assert all(torch.equal(c, v) for c in torch.chunk(vs, 4))
    order: list[int] = []
    for r in range(8):
        heads = gqa_heads(8, r, 8, 2, 4)
        order += heads
        want_q = torch.cat([q[h * hd : (h + 1) * hd] for h in heads])
        want_o = torch.cat([o[:, h * hd : (h + 1) * hd] for h in heads], dim=1)
        assert torch.equal(rk[r][f"{a}.qkv_proj.weight_q"], want_q)
        assert torch.equal(rk[r][f"{a}.o_proj.weight"], want_o)
    assert sorted(order) == list(range(8))
    # query group of KV head 0 is heads 0..3; its 4 replicas sit on ranks 0,2,4,6 and serve one head each
    assert [gqa_heads(8, r, 8, 2, 4) for r in range(8)] == [[0], [4], [1], [5], [2], [6], [3], [7]]
    meta = metadata(ckpt, "shards")
    assert meta["parameters"][f"{a}.qkv_proj.weight_q"] == col(8)
    spec = meta["model_weight_transformation_specs"][0]["specs"][0]
    assert spec[0] == "GQAQKVColumnParallelLinearSpec"
    assert spec[1] | {} == {
        "gqa_qkv_projection_name": "qkv_proj",
        "query_projection_name": "q_proj",
        "key_projection_name": "k_proj",
        "value_projection_name": "v_proj",
        "output_projection_name": "o_proj",
        "num_attention_heads": 8,
        "num_key_value_heads": 2,
        "kv_size_multiplier": 4,
        "q_output_size_per_partition": 8,
        "kv_output_size_per_partition": 8,
        "fuse_qkv": False,
        "bias": False,
        "tp_size": 8,
        "peft_type": None,
    }
    again = synth.write_neuron_checkpoint(
        tmp_path / "m4", config=cfg, state_dict=state, kind="full", tp=8, xser=False, kv_size_multiplier=4
    )
    assert torch.equal(ranks(again, 8, "shards")[5][f"{a}.qkv_proj.weight_q"], rk[5][f"{a}.qkv_proj.weight_q"])


def test_gqa_lora_tp8(tmp_path: Path) -> None:
    cfg = synth.tiny_llama_config(hidden=64, heads=8, kv_heads=2, layers=1)
    state = synth.random_lora_state(cfg, 4, synth.PROJECTIONS, seed=5)
    ckpt = synth.write_neuron_checkpoint(tmp_path, config=cfg, state_dict=state, kind="lora", tp=8)
    rk, a = ranks(ckpt, 8), f"{P}model.layers.0.self_attn"
    assert f"{a}.qkv_proj.lora_B.weight_q" in rk[0] and f"{a}.q_proj.lora_A.weight" not in rk[0]
    mean = torch.stack([state[f"{a}.{p}.lora_A.weight"] for p in ("q_proj", "k_proj", "v_proj")]).mean(0)
    assert torch.equal(rk[6][f"{a}.qkv_proj.lora_A.weight"], mean)  # one shared A on the fused layer
    b_q, a_o = state[f"{a}.q_proj.lora_B.weight"], state[f"{a}.o_proj.lora_A.weight"]
    for r in range(8):
        (h,) = gqa_heads(8, r, 8, 2, 4)
        assert torch.equal(rk[r][f"{a}.qkv_proj.lora_B.weight_q"], b_q[h * 8 : (h + 1) * 8])
        assert torch.equal(rk[r][f"{a}.o_proj.lora_A.weight"], a_o[:, h * 8 : (h + 1) * 8])
    k_b = torch.cat([rk[r][f"{a}.qkv_proj.lora_B.weight_k"] for r in range(8)])
    assert all(torch.equal(c, state[f"{a}.k_proj.lora_B.weight"]) for c in torch.chunk(k_b, 4))
    params = metadata(ckpt)["parameters"]
    assert params[f"{a}.qkv_proj.base_layer.weight_k"] == col(8)
    assert params[f"{a}.qkv_proj.lora_B.default.weight_v"] == col(8)
    assert params[f"{a}.qkv_proj.lora_A.default.weight"] == NOTP
    expected = synth.expected_consolidation(state, cfg, tp=8)
    assert torch.equal(expected[f"{a}.k_proj.lora_A.weight"], mean)


# ---------------------------------------------------------------- fuse_qkv


def test_fuse_qkv_equal_heads(tmp_path: Path) -> None:
    cfg = synth.tiny_llama_config(layers=1)  # 4 heads == 4 KV heads, TP 2: ColumnParallelLinear stride 3
    full = synth.random_full_state(cfg, seed=6)
    ckpt = synth.write_neuron_checkpoint(tmp_path, config=cfg, state_dict=full, kind="full", tp=2, fuse_qkv=True)
    a = "model.layers.0.self_attn"
    for r, rank in enumerate(ranks(ckpt, 2, "shards")):
        want = torch.cat([chunk(full[f"{a}.{p}.weight"], 2, r) for p in ("q_proj", "k_proj", "v_proj")])
        assert torch.equal(rank[f"{a}.qkv_proj.weight"], want)
    meta = metadata(ckpt, "shards")
    assert meta["parameters"][f"{a}.qkv_proj.weight"] == col(2, stride=3)
    spec = meta["model_weight_transformation_specs"][0]["specs"]
    assert spec == [
        [
            "FusedLinearsSpec",
            {
                "fused_linear_name": "qkv_proj",
                "linear_names": ["q_proj", "k_proj", "v_proj"],
                "bias": False,
                "fuse_axis": 0,
                "original_dims": [64, 64, 64],
                "tp_size": 2,
                "peft_type": None,
            },
        ]
    ]
    lora = synth.random_lora_state(cfg, 4, synth.PROJECTIONS, seed=6, share_qkv_a=True)
    ck2 = synth.write_neuron_checkpoint(tmp_path / "l", config=cfg, state_dict=lora, kind="lora", tp=2, fuse_qkv=True)
    rk = ranks(ck2, 2)
    la = f"{P}{a}"
    assert torch.equal(rk[1][f"{la}.qkv_proj.lora_A.weight"], lora[f"{la}.v_proj.lora_A.weight"])
    want_b = torch.cat([chunk(lora[f"{la}.{p}.lora_B.weight"], 2, 1) for p in ("q_proj", "k_proj", "v_proj")])
    assert torch.equal(rk[1][f"{la}.qkv_proj.lora_B.weight"], want_b)
    assert metadata(ck2)["model_weight_transformation_specs"][0]["specs"][0][1]["peft_type"] == "lora"


def test_fuse_qkv_on_gqa_path(tmp_path: Path) -> None:
    cfg = synth.tiny_llama_config(hidden=64, heads=8, kv_heads=2, layers=1)
    lora = synth.random_lora_state(cfg, 4, ["q_proj", "k_proj", "v_proj"], seed=7)
    ckpt = synth.write_neuron_checkpoint(tmp_path, config=cfg, state_dict=lora, kind="lora", tp=8, fuse_qkv=True)
    a = f"{P}model.layers.0.self_attn"
    rank = ranks(ckpt, 8)[2]
    assert list(rank) == [f"{a}.qkv_proj.lora_A.weight", f"{a}.qkv_proj.lora_B.weight_qkv"]
    (h,) = gqa_heads(8, 2, 8, 2, 4)
    b = rank[f"{a}.qkv_proj.lora_B.weight_qkv"]
    assert b.shape == (8 + 8 + 8, 4)  # q_output_size_per_partition + 2 * kv_output_size_per_partition
    assert torch.equal(b[:8], lora[f"{a}.q_proj.lora_B.weight"][h * 8 : (h + 1) * 8])
    k_head = (2 * 1) % 2  # rank 2 holds one KV slot (kv_per_rank = 2 * 4 / 8): position 2 of [K0, K1] * 4
    assert torch.equal(b[8:16], lora[f"{a}.k_proj.lora_B.weight"][k_head * 8 : (k_head + 1) * 8])
    params = metadata(ckpt)["parameters"]
    assert params[f"{a}.qkv_proj.base_layer.weight_qkv"] == NOTP  # no TP attributes upstream, sharded anyway
    assert params[f"{a}.qkv_proj.lora_B.default.weight_qkv"] == NOTP


def test_fuse_qkv_ignored_when_kv_divisible(tmp_path: Path) -> None:
    cfg = synth.tiny_llama_config(hidden=64, heads=8, kv_heads=4, layers=1)
    full = synth.random_full_state(cfg, seed=8)
    ckpt = synth.write_neuron_checkpoint(tmp_path, config=cfg, state_dict=full, kind="full", tp=2, fuse_qkv=True)
    keys = list(ranks(ckpt, 2, "shards")[0])
    assert "model.layers.0.self_attn.q_proj.weight" in keys and not any("qkv" in k for k in keys)


# ---------------------------------------------------------------- embeddings, modules_to_save, drift, PP


def test_embedding_lora(tmp_path: Path) -> None:
    cfg = synth.tiny_llama_config(layers=1)
    state = synth.random_lora_state(cfg, 4, ["q_proj", "v_proj"], embedding=True, seed=9)
    ckpt = synth.write_neuron_checkpoint(tmp_path, config=cfg, state_dict=state, kind="lora", tp=2)
    e = f"{P}model.embed_tokens"
    for r, rank in enumerate(ranks(ckpt, 2)):
        assert list(rank)[:2] == [f"{e}.lora_embedding_A", f"{e}.lora_embedding_B"]
        assert list(rank)[-1] == f"{e}.base_layer.weight"  # added after every LoRA key by save_embedding_layers
        assert torch.equal(rank[f"{e}.lora_embedding_A"], state[f"{e}.lora_embedding_A"])  # [r, vocab], replicated
        assert rank[f"{e}.lora_embedding_B"].shape == (64, 4)
        assert torch.equal(rank[f"{e}.base_layer.weight"], chunk(state[f"{e}.base_layer.weight"], 2, r))
    params = metadata(ckpt)["parameters"]
    assert params[f"{e}.base_layer.weight"] == col(2)
    assert params[f"{e}.lora_embedding_A.default"] == NOTP and params[f"{e}.lora_embedding_B.default"] == NOTP


def test_modules_to_save_lm_head(tmp_path: Path) -> None:
    cfg = synth.tiny_llama_config(layers=1)
    state = synth.random_lora_state(cfg, 4, ["q_proj", "v_proj"], seed=10)
    head = torch.randn(256, 64).to(BF16)
    state[f"{P}lm_head.weight"] = head
    ckpt = synth.write_neuron_checkpoint(tmp_path, config=cfg, state_dict=state, kind="lora", tp=2, xser=False)
    rk = ranks(ckpt, 2)
    assert torch.equal(torch.cat([rk[r][f"{P}lm_head.weight"] for r in range(2)]), head)
    params = metadata(ckpt)["parameters"]
    assert params[f"{P}lm_head.original_module.weight"] == col(2)
    assert params[f"{P}lm_head.modules_to_save.default.weight"] == NOTP


def test_replica_noise(tmp_path: Path) -> None:
    cfg = synth.tiny_llama_config(layers=1)
    state = synth.random_lora_state(cfg, 4, synth.PROJECTIONS, seed=11)
    ckpt = synth.write_neuron_checkpoint(tmp_path, config=cfg, state_dict=state, kind="lora", tp=2, replica_noise=1e-2)
    rk, a = ranks(ckpt, 2), f"{P}model.layers.0.self_attn"
    assert torch.equal(rk[0][f"{a}.q_proj.lora_A.weight"], state[f"{a}.q_proj.lora_A.weight"])
    drift = (rk[1][f"{a}.q_proj.lora_A.weight"].float() - rk[0][f"{a}.q_proj.lora_A.weight"].float()).abs().max()
    assert 0 < drift < 0.1
    assert not torch.equal(rk[1][f"{a}.o_proj.lora_B.weight"], state[f"{a}.o_proj.lora_B.weight"])
    assert torch.equal(rk[1][f"{a}.q_proj.lora_B.weight"], chunk(state[f"{a}.q_proj.lora_B.weight"], 2, 1))


def test_pipeline_stages(tmp_path: Path) -> None:
    cfg = synth.tiny_llama_config(layers=3)
    state = synth.random_full_state(cfg, seed=12)
    ckpt = synth.write_neuron_checkpoint(tmp_path, config=cfg, state_dict=state, kind="full", tp=2, pp=2)
    s0, s1 = ranks(ckpt, 2, "shards", pp=0)[0], ranks(ckpt, 2, "shards", pp=1)[1]
    assert {k.split(".")[2] for k in s0 if ".layers." in k} == {"0"}  # remainder layers go to the last stage
    assert {k.split(".")[2] for k in s1 if ".layers." in k} == {"1", "2"}
    assert "model.embed_tokens.weight" in s0 and {"model.norm.weight", "lm_head.weight"} <= s1.keys()
    m0, m1 = metadata(ckpt, "shards", 0), metadata(ckpt, "shards", 1)
    assert list(m0["parameters"]) == list(s0) and list(m1["parameters"]) == list(s1)
    assert [bool(s["specs"]) for s in m1["model_weight_transformation_specs"]] == [
        False,
        False,
        False,
        True,
        False,
        True,
    ]


def test_tied_embeddings_full(tmp_path: Path) -> None:
    cfg = synth.tiny_llama_config(layers=1, tie=True)
    state = synth.random_full_state(cfg, seed=13)
    ckpt = synth.write_neuron_checkpoint(tmp_path, config=cfg, state_dict=state, kind="full", tp=2, xser=False)
    rank = ranks(ckpt, 2, "shards")[1]
    assert torch.equal(rank["lm_head.weight"], rank["model.embed_tokens.weight"])
    assert "lm_head.weight" not in metadata(ckpt, "shards")["parameters"]


# ---------------------------------------------------------------- legacy layouts, errors, imports


def test_legacy_layouts(tmp_path: Path) -> None:
    old = synth.write_legacy_layout(tmp_path / "a", "tensor_parallel_shards")
    assert {f for f in tree(old) if "shards" in f} == {
        f"tensor_parallel_shards/tp_rank_0{r}_pp_rank_00/checkpoint.pt" for r in (0, 1)
    }
    flat = synth.write_legacy_layout(tmp_path / "b", "adapter_shards_no_adapter_level")
    assert (flat / "adapter_shards/done").is_file() and (flat / "adapter_config.json").is_file()
    assert not (flat / "adapter_default").exists()


def test_rejects_what_neuron_cannot_hold(tmp_path: Path) -> None:
    cfg = synth.tiny_llama_config(layers=1)
    half = synth.random_lora_state(cfg, 4, ["gate_proj"], seed=0)
    with pytest.raises(ValueError, match="all of"):
        synth.write_neuron_checkpoint(tmp_path, config=cfg, state_dict=half, kind="lora", tp=2)
    extra = synth.random_lora_state(cfg, 4, ["q_proj"], seed=0) | {"bogus.weight": torch.zeros(1)}
    with pytest.raises(ValueError, match="bogus"):
        synth.write_neuron_checkpoint(tmp_path, config=cfg, state_dict=extra, kind="lora", tp=2)
    with pytest.raises(ValueError, match="divisible"):
        synth.write_neuron_checkpoint(tmp_path, config=cfg, state_dict={}, kind="lora", tp=3)


def test_no_neuron_stack_imported(tmp_path: Path) -> None:
    code = (
        "import sys; from pathlib import Path; from hyperjob.testing import neuron_checkpoints as s\n"
        "c = s.tiny_llama_config(heads=8, kv_heads=2, layers=1)\n"
        f"s.write_neuron_checkpoint(Path({str(tmp_path)!r}), config=c, kind='lora', tp=8,\n"
        "    state_dict=s.random_lora_state(c, 2, s.PROJECTIONS, embedding=True))\n"
        "bad = [m for m in sys.modules if m.split('.')[0] in ('torch_xla', 'neuronx_distributed', 'optimum')]\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_product_never_imports_the_fixture_writer() -> None:
    """hyperjob.testing is test and benchmark tooling: the CLI and the checkpoint code must run without it."""
    code = (
        "import sys, hyperjob.cli.main, hyperjob.checkpoint.consolidate, hyperjob.checkpoint.stream_merge\n"
        "import hyperjob.checkpoint.merge\n"
        "hyperjob.cli.main.build_parser(load_all=True)\n"
        "bad = sorted(m for m in sys.modules if m.startswith('hyperjob.testing'))\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
