"""Independent writer of optimum-neuron 0.4.5 tensor-parallel Llama checkpoints, for tests and benchmarks.

It exists so the reader is tested against a second implementation derived from the upstream rules (see
hyperjob/checkpoint/FORMAT.md), not against itself. It never imports torch_xla, neuronx_distributed or optimum: the
xser reference class is written by a custom pickler. Tensors are computed one at a time and each TP rank file is
written before the next is built.
"""

from __future__ import annotations

import json
import pickle
import types
import zlib
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any, Literal

import torch

from hyperjob.testing.neuron_checkpoints.layout import BLOCK, PEFT, PROJECTIONS, QKV, Dims, Layout, Tensor
from hyperjob.testing.neuron_checkpoints.model import Param, Walk

# ---------------------------------------------------------------- configs and random states


def tiny_llama_config(
    *,
    hidden: int = 64,
    intermediate: int = 128,
    heads: int = 4,
    kv_heads: int = 4,
    layers: int = 2,
    vocab: int = 256,
    head_dim: int | None = None,
    tie: bool = False,
) -> dict[str, Any]:
    """An HF-style LlamaConfig dict small enough for unit tests."""
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": hidden,
        "intermediate_size": intermediate,
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "num_hidden_layers": layers,
        "vocab_size": vocab,
        "head_dim": head_dim or hidden // heads,
        "hidden_act": "silu",
        "rms_norm_eps": 1e-5,
        "max_position_embeddings": 256,
        "rope_theta": 500000.0,
        "initializer_range": 0.02,
        "attention_bias": False,
        "mlp_bias": False,
        "tie_word_embeddings": tie,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "torch_dtype": "bfloat16",
    }


def llama3_8b_config(layers: int = 32) -> dict[str, Any]:
    """Llama-3-8B shapes (optionally fewer layers, to keep shape tests cheap)."""
    cfg = tiny_llama_config(hidden=4096, intermediate=14336, heads=32, kv_heads=8, layers=layers, vocab=128256)
    cfg.update(max_position_embeddings=8192, bos_token_id=128000, eos_token_id=128001)
    return cfg


def _randn(g: torch.Generator, shape: tuple[int, ...], dtype: torch.dtype, scale: float = 0.02) -> Tensor:
    return (torch.randn(shape, generator=g) * scale).to(dtype)


def random_full_state(
    config: Mapping[str, Any], seed: int = 0, dtype: torch.dtype = torch.bfloat16
) -> dict[str, Tensor]:
    """HF Llama state dict (standard names) with seeded random values."""
    d, g = Dims.of(config), torch.Generator().manual_seed(seed)
    out = {"model.embed_tokens.weight": _randn(g, (d.vocab, d.hidden), dtype)}
    for i in range(d.layers):
        for p in PROJECTIONS:
            out[f"model.layers.{i}.{BLOCK[p]}.{p}.weight"] = _randn(g, d.shape(p), dtype)
        for n in ("input_layernorm", "post_attention_layernorm"):
            out[f"model.layers.{i}.{n}.weight"] = (1 + _randn(g, (d.hidden,), torch.float32, 0.1)).to(dtype)
    out["model.norm.weight"] = (1 + _randn(g, (d.hidden,), torch.float32, 0.1)).to(dtype)
    if not d.tie:
        out["lm_head.weight"] = _randn(g, (d.vocab, d.hidden), dtype)
    return out


def random_lora_state(
    config: Mapping[str, Any],
    r: int,
    targets: Iterable[str],
    *,
    embedding: bool = False,
    seed: int = 0,
    dtype: torch.dtype = torch.bfloat16,
    share_qkv_a: bool = False,
) -> dict[str, Tensor]:
    """A standard PEFT adapter state (adapter_model.safetensors names) with non-zero A and B.

    gate/up always share one A (Neuron fuses them into one layer, so a trained adapter can only hold one); pass
    share_qkv_a for the layouts that fuse q/k/v too, or compare against expected_consolidation().
    `targets` may also hold "lm_head" (its base weight is then saved too, as upstream does).
    """
    d, g, tg = Dims.of(config), torch.Generator().manual_seed(seed), set(targets)
    unknown = tg - {*PROJECTIONS, "lm_head", "embed_tokens"}
    if unknown:
        raise ValueError(f"unsupported LoRA targets: {sorted(unknown)}")
    out: dict[str, Tensor] = {}
    if embedding or "embed_tokens" in tg:
        e = f"{PEFT}model.embed_tokens"
        out[f"{e}.lora_embedding_A"] = _randn(g, (r, d.vocab), dtype, 0.05)
        out[f"{e}.lora_embedding_B"] = _randn(g, (d.hidden, r), dtype, 0.05)
        out[f"{e}.base_layer.weight"] = _randn(g, (d.vocab, d.hidden), dtype)
    for i in range(d.layers):
        shared: dict[str, Tensor] = {}
        for p in (p for p in PROJECTIONS if p in tg):
            o, n = d.shape(p)
            key = "gu" if p in ("gate_proj", "up_proj") else "qkv" if (share_qkv_a and p in QKV) else p
            a = shared.setdefault(key, _randn(g, (r, n), dtype, 0.05))
            base = f"{PEFT}model.layers.{i}.{BLOCK[p]}.{p}"
            out[f"{base}.lora_A.weight"], out[f"{base}.lora_B.weight"] = a.clone(), _randn(g, (o, r), dtype, 0.05)
    if "lm_head" in tg:
        out[f"{PEFT}lm_head.lora_A.weight"] = _randn(g, (r, d.hidden), dtype, 0.05)
        out[f"{PEFT}lm_head.lora_B.weight"] = _randn(g, (d.vocab, r), dtype, 0.05)
        out[f"{PEFT}lm_head.base_layer.weight"] = _randn(g, (d.vocab, d.hidden), dtype)
    return out


def default_adapter_config(
    r: int, targets: Iterable[str], *, lora_alpha: int | None = None, base_model_name_or_path: str | None = None
) -> dict[str, Any]:
    """The adapter_config.json fields a peft 0.17 LoraConfig writes that matter for consolidation and merge."""
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "r": r,
        "lora_alpha": lora_alpha or 2 * r,
        "lora_dropout": 0.0,
        "target_modules": sorted(set(targets)),
        "bias": "none",
        "use_rslora": False,
        "use_dora": False,
        "fan_in_fan_out": False,
        "init_lora_weights": True,
        "modules_to_save": None,
        "rank_pattern": {},
        "alpha_pattern": {},
        "layers_to_transform": None,
        "layers_pattern": None,
        "base_model_name_or_path": base_model_name_or_path,
        "inference_mode": True,
        "revision": None,
    }


# ---------------------------------------------------------------- serialization


class _TensorReference:
    """Stand-in for torch_xla.utils.serialization.TensorReference: a plain object with one attribute, `tid`."""

    def __init__(self, tid: int) -> None:
        self.tid = tid


class _XserPickler(pickle._Pickler):  # the pure-Python pickler lets us write the GLOBAL opcode ourselves
    def save_global(self, obj: Any, name: str | None = None) -> None:
        if obj is _TensorReference:  # record the upstream class path without importing torch_xla
            self.write(pickle.GLOBAL + b"torch_xla.utils.serialization\nTensorReference\n")  # type: ignore[attr-defined]
            self.memoize(obj)  # type: ignore[attr-defined]
            return
        super().save_global(obj, name)  # type: ignore[misc]


_XSER_PICKLE = types.ModuleType("hyperjob_xser_pickle")
_XSER_PICKLE.Pickler = _XserPickler  # type: ignore[attr-defined]


def _write_rank(path: Path, tensors: Iterator[tuple[str, Tensor]], xser: bool) -> None:
    """One rank file. xser: tensors go one per file as they are produced; the ref file maps key -> reference."""
    if not xser:
        torch.save(dict(tensors), path)
        return
    folder = path.with_name(path.name + ".tensors")
    folder.mkdir()
    refs: dict[str, _TensorReference] = {}
    info: dict[int, dict[str, Any]] = {}
    for tid, (key, t) in enumerate(tensors):
        torch.save(t, folder / f"tensor_{tid}.pt")
        refs[key] = _TensorReference(tid)
        info[tid] = {"dtype": t.dtype, "shape": t.shape, "expert_model_parallel": False}
    torch.save(refs, path, pickle_module=_XSER_PICKLE)
    torch.save(info, path.with_name(path.name + ".info.pt"))


def _finish(t: Tensor, p: Param, rank: int, noise: float) -> Tensor:
    """A standalone contiguous copy (what `.cpu()` of an XLA tensor gives), drifted on replicas if asked."""
    t = t.detach().clone(memory_format=torch.contiguous_format)
    if noise and p.replicated and rank > 0:
        g = torch.Generator().manual_seed(zlib.crc32(f"{p.key}:{rank}".encode()))
        t = (t.float() + noise * torch.randn(t.shape, generator=g)).to(t.dtype)
    return t


def _metadata(walk: Walk, stage: int) -> dict[str, Any]:
    """mp_metadata_pp_rank_<stage>.json: every parameter of the stage, then one spec entry per CustomModule."""
    params = {p.meta: p.attrs for p in walk.params if p.meta is not None and p.stage == stage}
    specs = [
        {"module_fully_qualified_name": name, "specs": [list(x) for x in specs] if s == stage else []}
        for name, s, specs in walk.specs
    ]
    return {"parameters": params, "model_weight_transformation_specs": specs}


def _dump(path: Path, obj: Any, indent: int, sort: bool = False, newline: bool = False) -> None:
    path.write_text(json.dumps(obj, indent=indent, sort_keys=sort) + ("\n" if newline else ""))


def write_neuron_checkpoint(
    out_dir: Path,
    *,
    config: dict[str, Any],
    state_dict: Mapping[str, Tensor],
    kind: Literal["lora", "full"],
    tp: int,
    kv_size_multiplier: int | None = None,
    fuse_qkv: bool = False,
    xser: bool = True,
    adapter_config: dict[str, Any] | None = None,
    step: int = 10,
    pp: int = 1,
    adapter_name: str = "default",
    replica_noise: float = 0.0,
    trainer_files: bool = True,
) -> Path:
    """Write `out_dir/checkpoint-<step>/` as optimum-neuron 0.4.5 + neuronx-distributed 0.15 save a Llama.

    `state_dict` is un-sharded with standard names: PEFT adapter keys for "lora", HF Llama keys for "full".
    Keys the Neuron model cannot hold raise ValueError rather than being dropped silently.
    """
    lay = Layout.of(config, tp, pp, kv_size_multiplier, fuse_qkv)
    walk = Walk(state_dict, kind, lay, adapter_name)
    walk.walk()
    left = sorted(set(state_dict) - walk.used)
    if left:
        raise ValueError(f"keys the {kind} Neuron Llama does not hold: {left[:5]}{' ...' if len(left) > 5 else ''}")
    ckpt = Path(out_dir) / f"checkpoint-{step}"
    if ckpt.exists():
        raise FileExistsError(ckpt)
    shards = ckpt / (f"adapter_{adapter_name}/adapter_shards" if kind == "lora" else "shards")
    (shards / "model").mkdir(parents=True)
    (shards / "checkpoint").write_text("1")
    for stage in range(pp):
        saved = sorted((p for p in walk.params if p.key and p.local and p.stage == stage), key=lambda p: p.group)
        for rank in range(tp):
            path = shards / "model" / f"dp_rank_00_tp_rank_{rank:02d}_pp_rank_{stage:02d}.pt"
            gen = ((p.key, _finish(p.local(rank), p, rank, replica_noise)) for p in saved if p.key and p.local)
            _write_rank(path, gen, xser)
    (shards / "done").write_text("1")
    for stage in range(pp):
        _dump(shards / f"mp_metadata_pp_rank_{stage}.json", _metadata(walk, stage), 4)
    dtype = next(iter(state_dict.values())).dtype if state_dict else torch.bfloat16
    if kind == "lora":
        cfg = dict(adapter_config or _infer_adapter_config(state_dict, config))
        cfg["inference_mode"] = True
        cfg["target_modules"] = list(cfg.get("target_modules") or [])
        _dump(ckpt / f"adapter_{adapter_name}" / "adapter_config.json", cfg, 2, sort=True)
        base = cfg.get("base_model_name_or_path")
        (ckpt / "README.md").write_text(f"---\nbase_model: {base}\nlibrary_name: peft\n---\n\n# Model Card\n")
    else:
        model_cfg = {**config, "architectures": ["LlamaForCausalLM"], "dtype": str(dtype).split(".")[1]}
        _dump(ckpt / "config.json", model_cfg, 2, sort=True, newline=True)
        gen_cfg = {
            "_from_model_config": True,
            "bos_token_id": config.get("bos_token_id"),
            "eos_token_id": config.get("eos_token_id"),
            "transformers_version": "4.57.1",
        }
        _dump(ckpt / "generation_config.json", gen_cfg, 2, sort=True, newline=True)
        _dump(ckpt / "trn_config.json", _trn_config(tp, pp, kv_size_multiplier, fuse_qkv, xser), 4)
    if trainer_files:
        _dump(ckpt / "trainer_state.json", {"global_step": step, "max_steps": step, "log_history": []}, 2, True)
        torch.save(
            {"base_lrs": [1e-4], "last_epoch": step, "_step_count": step + 1, "_last_lr": [1e-4]}, ckpt / "scheduler.pt"
        )
    return ckpt


def _trn_config(tp: int, pp: int, m: int | None, fuse_qkv: bool, xser: bool) -> dict[str, Any]:
    """asdict(TrainingNeuronConfig) field order (optimum/neuron/models/training/config.py)."""
    return {
        "tensor_parallel_size": tp,
        "sequence_parallel_enabled": tp > 1,
        "kv_size_multiplier": m,
        "pipeline_parallel_size": pp,
        "virtual_pipeline_parallel_size": 1,
        "pipeline_parallel_num_microbatches": 1,
        "pipeline_parallel_use_zero1_optimizer": False,
        "gradient_checkpointing": False,
        "checkpoint_dir": None,
        "num_local_ranks_per_step": 8,
        "use_xser": xser,
        "async_save": False,
        "fuse_qkv": fuse_qkv,
        "recompute_causal_mask": True,
        "transpose_nki_inputs": True,
    }


def _infer_adapter_config(state: Mapping[str, Tensor], config: Mapping[str, Any]) -> dict[str, Any]:
    targets = {k.split(".")[-3] for k in state if ".lora_A." in k}
    if any("lora_embedding_A" in k for k in state):
        targets.add("embed_tokens")
    ranks = [t.shape[0] for k, t in state.items() if ".lora_A." in k or k.endswith("lora_embedding_A")]
    return default_adapter_config(
        ranks[0] if ranks else 8, targets, base_model_name_or_path=config.get("_name_or_path")
    )


def expected_consolidation(
    state_dict: Mapping[str, Tensor],
    config: Mapping[str, Any],
    *,
    tp: int,
    kv_size_multiplier: int | None = None,
    fuse_qkv: bool = False,
) -> dict[str, Tensor]:
    """What a correct consolidator must return for a LoRA state written with the same arguments.

    Every projection group that Neuron holds as one layer keeps one A (the mean of the inputs' A's), which a
    consolidator duplicates back to each projection; everything else round-trips exactly.
    """
    lay = Layout.of(config, tp, 1, kv_size_multiplier, fuse_qkv)
    out = dict(state_dict)
    groups = [("mlp", ("gate_proj", "up_proj"))] + ([("self_attn", QKV)] if lay.mode != "separate" else [])
    for i in range(lay.d.layers):
        for block, names in groups:
            keys = [f"{PEFT}model.layers.{i}.{block}.{n}.lora_A.weight" for n in names]
            if all(k in out for k in keys):
                mean = torch.mean(torch.stack([out[k] for k in keys]), dim=0)
                out.update(dict.fromkeys(keys, mean))
    return out


# ---------------------------------------------------------------- legacy layouts (for error tests)


def write_legacy_layout(
    out_dir: Path,
    which: Literal["tensor_parallel_shards", "adapter_shards_no_adapter_level"],
    *,
    step: int = 10,
) -> Path:
    """Older layouts a consolidator must recognise and name in its error (tiny TP=2 content)."""
    config = tiny_llama_config(layers=1)
    ckpt = Path(out_dir) / f"checkpoint-{step}"
    if which == "adapter_shards_no_adapter_level":  # 2024 AWS sample: adapter files directly in checkpoint-N
        state = random_lora_state(config, 4, ["q_proj", "v_proj"], seed=0)
        write_neuron_checkpoint(out_dir, config=config, state_dict=state, kind="lora", tp=2, step=step)
        for child in (ckpt / "adapter_default").iterdir():
            child.rename(ckpt / child.name)
        (ckpt / "adapter_default").rmdir()
        return ckpt
    if which != "tensor_parallel_shards":
        raise ValueError(which)
    # optimum-neuron 0.0.x: parallel_layers.save({"model", "sharded_metadata"}) -> tp_rank_XX_pp_rank_YY/checkpoint.pt
    full = random_full_state(config, seed=0)
    lay = Layout.of(config, 2, 1, None, False)
    walk = Walk(full, "full", lay, "default")
    walk.walk()
    for rank in range(2):
        folder = ckpt / "tensor_parallel_shards" / f"tp_rank_{rank:02d}_pp_rank_00"
        folder.mkdir(parents=True)
        model = {p.key: _finish(p.local(rank), p, rank, 0.0) for p in walk.params if p.key and p.local}
        meta = {
            p.key: (
                {"kind": "sharded", "partition_dim": p.attrs["partition_dim"]}
                if p.attrs.get("tensor_model_parallel")
                else {"kind": "tied", "partition_dim": None}
            )
            for p in walk.params
            if p.key
        }
        torch.save({"model": model, "sharded_metadata": meta}, folder / "checkpoint.pt")
    _dump(ckpt / "config.json", config, 2, sort=True, newline=True)
    return ckpt
