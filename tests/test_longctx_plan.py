"""Long-context options in config, plan and train arguments: which backend takes what, SP layouts, the activation
estimate, and the arguments the trainer, peft and the loader get (table-driven, no model)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from hyperjob.config.load import ConfigError, load_config
from hyperjob.longctx.rope import apply_to_config, apply_to_dict, config_overrides
from hyperjob.model_facts import model_facts
from hyperjob.paths import RunPaths
from hyperjob.plan.memory import estimate
from hyperjob.plan.planner import describe, make_plan
from hyperjob.stages.train import train_arguments

REPO = Path(__file__).resolve().parent.parent
LONG = REPO / "examples" / "gpu-llama3-8b-longctx.yaml"
GPU = REPO / "examples" / "gpu-llama3-8b.yaml"
TRN = REPO / "examples" / "trainium-llama3-8b.yaml"
TINY = REPO / "examples" / "tiny-cpu.yaml"
PINNED = ["workdir=/shared/work", "environment.python=/opt/venv/bin/python"]
PACK = "training.packing=true"


def plan_of(path: Path, *overrides: str) -> Any:
    cfg = load_config(path, [*PINNED, *overrides], check_inputs=False)
    return cfg, make_plan(cfg)


def args_of(path: Path, *overrides: str) -> dict[str, Any]:
    cfg = load_config(path, [*PINNED, *overrides], check_inputs=False)
    return train_arguments(RunPaths(Path("/shared/work/runs/RUN")), cfg)


def test_longctx_example_plans_sp8_with_per_gpu_tokens_and_an_estimate() -> None:
    cfg, plan = plan_of(LONG)
    assert (plan.world_size, plan.sequence, plan.data, plan.global_batch) == (8, 8, 1, 8)
    assert plan.tokens_per_device == 8192
    rows = dict(describe(plan, cfg))
    assert rows["sequence parallel (SP)"].startswith("8 ")
    assert rows["tokens per device"] == "8,192 per micro-batch"
    assert "GiB" in rows["activation memory"]
    assert any("extends the model's 8192 positions" in n for n in plan.notes)


def test_activation_estimate_shrinks_with_each_option() -> None:
    """Each option cuts the term it targets: the estimate tells a user which one to turn on."""
    cfg, plan = plan_of(
        LONG, "training.loss=standard", "training.mlp_chunk=null", "training.gradient_checkpointing=false"
    )
    assert plan.model is not None
    plain = estimate(cfg, plan.model)
    opts = {
        "training.loss=chunked": "head",
        "training.mlp_chunk=1024": "layers",
        "parallel.sequence=8": "layers",
    }
    assert plain is not None
    for override, term in opts.items():
        c2, p2 = plan_of(
            LONG, "training.loss=standard", "training.mlp_chunk=null", "training.gradient_checkpointing=false",
            "parallel.sequence=1", PACK, override,
        )  # fmt: skip
        base_cfg, base_plan = plan_of(
            LONG, "training.loss=standard", "training.mlp_chunk=null", "training.gradient_checkpointing=false",
            "parallel.sequence=1",
        )  # fmt: skip
        before, after = estimate(base_cfg, base_plan.model), estimate(c2, p2.model)
        assert before is not None and after is not None
        assert getattr(after, term) < getattr(before, term), override
    ckpt_cfg, ckpt_plan = plan_of(LONG, "training.loss=standard", "training.mlp_chunk=null")
    with_ckpt = estimate(ckpt_cfg, ckpt_plan.model)
    assert with_ckpt is not None and with_ckpt.layers < plain.layers


@pytest.mark.parametrize(
    ("path", "overrides", "key", "fragment"),
    [
        (GPU, ["parallel.sequence=2"], "parallel.sequence", "needs training.packing: true"),
        (GPU, [PACK, "parallel.sequence=3"], "parallel.sequence", "does not divide"),
        (GPU, [PACK, "parallel.sequence=16"], "parallel.sequence", "does not divide the 8 training processes"),
        (GPU, [PACK, "parallel.sequence=2", "training.seq_len=2047"], "parallel.sequence", "2047"),
        (TINY, [PACK, "parallel.sequence=2", "training.seq_len=127"], "parallel.sequence", "127"),
        (GPU, ["parallel.mode=fsdp2", "model.quantize=nf4"], "parallel.mode", "nf4"),
        (TRN, ["parallel.sequence=2"], "parallel.sequence", "not supported on backend 'neuron'"),
        (TRN, ["model.rope_theta=1e6"], "model.rope_theta", "not supported on backend 'neuron'"),
        (TRN, ["lora.modules_to_save=[embed_tokens]"], "lora.modules_to_save", "not supported"),
        (TRN, ["training.mlp_chunk=512"], "training.mlp_chunk", "not supported"),
        (TRN, ["training.loss=chunked"], "training.loss", "allowed: standard"),
        (TINY, ["model.quantize=nf4"], "model.quantize", "allowed: none"),
        (TINY, ["parallel.mode=deepspeed-zero3"], "parallel.mode", "allowed: ddp"),
        (TINY, ["parallel.mode=fsdp2"], "parallel.mode", "allowed: ddp"),
        (TINY, ["training.loss=liger"], "training.loss", "allowed: chunked, standard"),
        (GPU, ["training.seq_len=65536"], "training.seq_len", "raise model.rope_theta"),
    ],
)
def test_refused_with_the_key_and_what_is_allowed(path: Path, overrides: list[str], key: str, fragment: str) -> None:
    with pytest.raises(ConfigError) as e:
        plan_of(path, *overrides)
    text = str(e.value)
    assert key in text and fragment in text, text


def test_activation_offload_needs_checkpointing() -> None:
    with pytest.raises(ConfigError, match="activation_offload needs gradient_checkpointing"):
        load_config(TINY, [*PINNED, "training.activation_offload=true"], check_inputs=False)


@pytest.mark.parametrize(
    ("overrides", "world", "sp", "dp"),
    [
        ([PACK, "parallel.sequence=2"], 8, 2, 4),
        ([PACK, "parallel.sequence=4", "cluster.nodes=2"], 16, 4, 4),
        ([], 8, 1, 8),
    ],
)
def test_world_is_dp_times_sp(overrides: list[str], world: int, sp: int, dp: int) -> None:
    _, plan = plan_of(GPU, *overrides)
    assert (plan.world_size, plan.sequence, plan.data) == (world, sp, dp)
    assert plan.layout().sequence == sp


def test_train_arguments_carry_the_long_context_options() -> None:
    args = args_of(LONG)
    loader = args["model_loader"]
    assert loader["config_overrides"] == {"rope_theta": 200000000.0, "max_position_embeddings": 65536}
    assert loader["kwargs"]["quantization_config"] == {
        "load_in_4bit": True,
        "bnb_4bit_quant_type": "nf4",
        "bnb_4bit_use_double_quant": True,
        "bnb_4bit_compute_dtype": "bfloat16",
    }
    assert args["lora_config"]["modules_to_save"] == ["embed_tokens"]
    assert args["lora_config"]["target_modules"] == ["q_proj", "k_proj", "v_proj", "o_proj"]
    assert (args["trainer_config"]["learning_rate"], args["trainer_config"]["lr_scheduler_type"]) == (5e-5, "linear")


def test_offload_uses_reentrant_checkpoints_and_defaults_do_not() -> None:
    def ckpt_kwargs(*ov: str) -> dict[str, Any]:
        tc = args_of(GPU, *ov)["trainer_config"]
        return next(v for k, v in tc.items() if k.endswith("checkpointing_kwargs"))

    assert ckpt_kwargs() == {"use_reentrant": False}
    assert ckpt_kwargs("training.activation_offload=true") == {"use_reentrant": True}


def test_defaults_add_nothing_to_todays_arguments() -> None:
    args = args_of(GPU)
    assert args["model_loader"]["config_overrides"] == {}
    assert "quantization_config" not in args["model_loader"]["kwargs"]
    assert "modules_to_save" not in args["lora_config"]
    assert not {"fsdp", "fsdp_config", "deepspeed"} & set(args["trainer_config"])


# ------------------------------------------------------------------ RoPE base override


@pytest.mark.parametrize(
    ("config", "expect"),
    [
        # transformers 5 writes rope_parameters only
        (
            {"rope_parameters": {"rope_theta": 5e5, "rope_type": "default"}, "max_position_embeddings": 8192},
            {"rope_parameters": {"rope_theta": 2e8, "rope_type": "default"}, "max_position_embeddings": 65536},
        ),
        # transformers 4.x writes rope_theta at the top level
        (
            {"rope_theta": 5e5, "max_position_embeddings": 8192},
            {"rope_theta": 2e8, "max_position_embeddings": 65536},
        ),
        # both present: both change
        (
            {"rope_theta": 5e5, "rope_parameters": {"rope_theta": 5e5}, "max_position_embeddings": 8192},
            {"rope_theta": 2e8, "rope_parameters": {"rope_theta": 2e8}, "max_position_embeddings": 65536},
        ),
    ],
)
def test_rope_override_lands_where_the_config_keeps_it(config: dict[str, Any], expect: dict[str, Any]) -> None:
    before = json.dumps(config)
    assert apply_to_dict(config, {"rope_theta": 2e8, "max_position_embeddings": 65536}) == expect
    assert json.dumps(config) == before  # the input is not changed


def test_rope_override_reaches_the_rotary_embedding() -> None:
    """The model built from the overridden config rotates with the new base (inv_freq = base^(-2i/d))."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=32, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1, max_position_embeddings=64,
    )  # fmt: skip
    apply_to_config(config, {"rope_theta": 1e6, "max_position_embeddings": 256})
    model = LlamaForCausalLM(config)
    inv_freq = model.model.rotary_emb.inv_freq
    dim = 32 // 2
    expected = 1.0 / (1e6 ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    assert torch.allclose(inv_freq, expected)
    assert model.config.max_position_embeddings == 256


def test_overrides_only_raise_positions_past_the_model() -> None:
    cfg = load_config(GPU, [*PINNED, "model.rope_theta=1e6"], check_inputs=False)
    assert config_overrides(cfg, model_facts(cfg)) == {"rope_theta": 1e6}
    assert config_overrides(load_config(GPU, PINNED, check_inputs=False), None) == {}


def test_an_sp_group_across_nodes_is_a_note() -> None:
    _, plan = plan_of(TINY, PACK, "parallel.sequence=4", "cluster.nodes=2")
    assert any("spans nodes" in n for n in plan.notes), plan.notes
    _, plan = plan_of(TINY, PACK, "parallel.sequence=2", "cluster.nodes=2")
    assert not any("spans nodes" in n for n in plan.notes)
