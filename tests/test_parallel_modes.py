"""parallel.mode: the Trainer arguments against the real transformers/accelerate classes, and save_adapter on
2 gloo processes under ddp and FSDP2.

accelerate 1.15 applies its FSDP plugin only on GPUs: with use_cpu the Trainer silently trains DDP (checked
below). So the FSDP2 run here is the closest real thing on CPU: our fsdp_config goes through the real
TrainingArguments into accelerate's real FullyShardedDataParallelPlugin, and accelerate's own FSDP2 preparation
(fsdp2_apply_ac, fsdp2_prepare_model: the calls of Accelerator._prepare_fsdp2) shards the PeftModel on a gloo
mesh; a plain loop then takes the Trainer's optimizer steps. Both runs must end with the same adapter.

This file is also the worker: `python -m torch.distributed.run --nproc-per-node 2 tests/test_parallel_modes.py OUT`.
"""

from __future__ import annotations

import dataclasses
import json
import os
import socket
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from hyperjob.backends.parallel_modes import (
    DEEPSPEED_CONFIG_NAME,
    PARALLEL_MODES,
    deepspeed_config,
    mode_arguments,
    mode_environment,
    mode_problems,
    shards_parameters,
    write_deepspeed_config,
)
from hyperjob.stages.tiny import TINY_ARCH

# Validated with deepspeed 0.19.8 (pip-installed into a scratch venv with torch 2.13 CPU, transformers 5.24,
# accelerate 1.15): TrainingArguments(deepspeed=<this JSON>, per_device_train_batch_size=2,
# gradient_accumulation_steps=4, bf16=...) accepted it, HfTrainerDeepSpeedConfig.trainer_config_finalize filled
# every "auto" from the arguments and a tiny Llama (hidden 64), and deepspeed.runtime.config.DeepSpeedConfig (whose
# ZeRO section is a pydantic model that forbids unknown keys) parsed the result: stage 2/3, train_batch_size 8,
# gradient_clipping 1.0, reduce_bucket_size 4096, stage3 prefetch 3686 / persistence 640, and
# gather_16bit_weights_on_model_save true for stage 3. If these change, validate the new JSON the same way.
ZERO2_BF16 = {
    "train_micro_batch_size_per_gpu": "auto",
    "gradient_accumulation_steps": "auto",
    "train_batch_size": "auto",
    "gradient_clipping": "auto",
    "bf16": {"enabled": True},
    "zero_optimization": {"stage": 2, "overlap_comm": True, "contiguous_gradients": True, "reduce_bucket_size": "auto"},
}
ZERO3_BF16 = {
    **ZERO2_BF16,
    "zero_optimization": {
        "stage": 3,
        "overlap_comm": True,
        "contiguous_gradients": True,
        "reduce_bucket_size": "auto",
        "stage3_prefetch_bucket_size": "auto",
        "stage3_param_persistence_threshold": "auto",
        "stage3_gather_16bit_weights_on_model_save": True,
    },
}

LR = 5e-3
STEPS = 3
SEQ = 16
EXAMPLES = 4  # = 2 ranks x micro batch 2: every step sees all examples, so the sample order cannot matter
RUN_TIMEOUT_S = 240
REPO_ROOT = Path(__file__).resolve().parents[1]


# --- pure: the arguments ---------------------------------------------------------------------------------------


def _base_trainer_kwargs(output_dir: Path, *, checkpointing: bool = False) -> dict[str, Any]:
    """What train_args.hf_arguments gives on the cpu backend (the parts that matter here)."""
    kwargs: dict[str, Any] = {
        "output_dir": str(output_dir),
        "use_cpu": True,
        "report_to": "none",
        "per_device_train_batch_size": 2,
        "activation_checkpointing": checkpointing,
    }
    if checkpointing:
        kwargs["activation_checkpointing_kwargs"] = {"use_reentrant": False}
    return kwargs


def _args(mode: str, checkpointing: bool = False, offload: bool = False) -> dict[str, Any]:
    return mode_arguments(
        mode,
        gradient_checkpointing=checkpointing,
        activation_offload=offload,
        bf16=False,
        deepspeed_config_path="/run/deepspeed.json",
    )


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    """TrainingArguments(fsdp=...) writes FSDP_* variables into os.environ: restore them afterwards."""
    for name in ("FSDP_CPU_RAM_EFFICIENT_LOADING", "FSDP_ACTIVATION_CHECKPOINTING_OFFLOAD", "ACCELERATE_USE_FSDP"):
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def test_ddp_adds_nothing_and_real_arguments_accept_it(tmp_path: Path) -> None:
    import transformers

    assert _args("ddp") == {} and mode_environment("ddp", activation_offload=True) == {}
    args = transformers.TrainingArguments(**_base_trainer_kwargs(tmp_path))
    assert args.fsdp_plugin_args is None and args.deepspeed is None


def test_fsdp2_arguments_reach_accelerates_plugin(tmp_path: Path, clean_env: pytest.MonkeyPatch) -> None:
    """Through the real TrainingArguments into the real plugin: FSDP2, full state dict, FSDP's own activation
    checkpointing (the Trainer's is turned off), rank-0 loading, and one FSDP unit per decoder layer."""
    import transformers
    from accelerate.utils import FullyShardedDataParallelPlugin
    from accelerate.utils.fsdp_utils import fsdp2_prepare_auto_wrap_policy

    extra = _args("fsdp2", checkpointing=True)
    assert extra["activation_checkpointing"] is False
    args = transformers.TrainingArguments(**(_base_trainer_kwargs(tmp_path, checkpointing=True) | extra))
    assert args.activation_checkpointing is False
    plugin = FullyShardedDataParallelPlugin(**args.fsdp_plugin_args)
    assert plugin.fsdp_version == 2
    assert plugin.activation_checkpointing is True
    assert plugin.activation_checkpointing_offload is False
    assert plugin.cpu_ram_efficient_loading is True
    assert plugin.reshard_after_forward is True
    assert str(plugin.state_dict_type) == "StateDictType.FULL_STATE_DICT"

    model = _peft_model()
    plugin.set_auto_wrap_policy(model)
    policy = fsdp2_prepare_auto_wrap_policy(plugin, model)
    assert policy is not None
    wrapped = [name for name, module in model.named_modules() if policy(module)]
    assert wrapped == ["base_model.model.model.layers.0", "base_model.model.model.layers.1"]


def test_fsdp2_without_checkpointing_leaves_the_trainers_flag(tmp_path: Path, clean_env: pytest.MonkeyPatch) -> None:
    import transformers

    extra = _args("fsdp2")
    assert "activation_checkpointing" not in extra and extra["fsdp_config"]["activation_checkpointing"] is False
    pinned = mode_arguments(
        "fsdp2",
        gradient_checkpointing=False,
        activation_offload=False,
        bf16=False,
        deepspeed_config_path="",
        decoder_layer="LlamaDecoderLayer",
    )
    args = transformers.TrainingArguments(**(_base_trainer_kwargs(tmp_path) | pinned))
    assert args.fsdp_plugin_args["transformer_cls_names_to_wrap"] == "LlamaDecoderLayer"
    assert (
        "activation_checkpointing" not in args.fsdp_plugin_args or not args.fsdp_plugin_args["activation_checkpointing"]
    )


def test_fsdp2_activation_offload_reaches_the_plugin_through_the_environment(
    tmp_path: Path, clean_env: pytest.MonkeyPatch
) -> None:
    """TrainingArguments does not forward an offload key of fsdp_config; the plugin reads the environment."""
    import transformers
    from accelerate.utils import FullyShardedDataParallelPlugin

    env = mode_environment("fsdp2", activation_offload=True)
    assert env == {
        "ACCELERATE_USE_FSDP": "true",
        "FSDP_CPU_RAM_EFFICIENT_LOADING": "true",
        "FSDP_ACTIVATION_CHECKPOINTING_OFFLOAD": "true",
    }
    for name, value in env.items():
        clean_env.setenv(name, value)
    extra = _args("fsdp2", checkpointing=True, offload=True)
    args = transformers.TrainingArguments(**(_base_trainer_kwargs(tmp_path, checkpointing=True) | extra))
    assert FullyShardedDataParallelPlugin(**args.fsdp_plugin_args).activation_checkpointing_offload is True
    assert "FSDP_ACTIVATION_CHECKPOINTING_OFFLOAD" not in mode_environment("fsdp2", activation_offload=False)


@pytest.mark.parametrize("mode", ["deepspeed-zero2", "deepspeed-zero3"])
def test_deepspeed_arguments_are_trainingarguments_fields(mode: str) -> None:
    """TrainingArguments(deepspeed=...) imports deepspeed, which is not installed here: check the field instead."""
    import transformers

    extra = _args(mode)
    assert extra == {"deepspeed": "/run/deepspeed.json"}
    fields = {f.name: f for f in dataclasses.fields(transformers.TrainingArguments)}
    assert set(extra) <= set(fields)
    assert "str" in str(fields["deepspeed"].type)  # a path is one of the accepted forms


def test_deepspeed_json_is_the_validated_one(tmp_path: Path) -> None:
    assert deepspeed_config("deepspeed-zero2", bf16=True) == ZERO2_BF16
    assert deepspeed_config("deepspeed-zero3", bf16=True) == ZERO3_BF16
    assert deepspeed_config("deepspeed-zero3", bf16=False)["bf16"] == {"enabled": False}
    path = write_deepspeed_config("deepspeed-zero3", tmp_path / DEEPSPEED_CONFIG_NAME, bf16=True)
    assert json.loads(path.read_text()) == ZERO3_BF16
    for not_deepspeed in ("ddp", "fsdp2"):
        with pytest.raises(ValueError, match="does not use DeepSpeed"):
            deepspeed_config(not_deepspeed, bf16=True)
    with pytest.raises(ValueError, match="not one of"):
        _args("zero9")


def test_sharding_modes() -> None:
    assert [m for m in PARALLEL_MODES if shards_parameters(m)] == ["fsdp2", "deepspeed-zero3"]


@pytest.mark.parametrize(
    ("mode", "device", "world", "quantize", "expected"),
    [
        ("ddp", "cpu", 1, "none", []),
        ("ddp", "cuda", 8, "nf4", []),
        ("fsdp2", "cuda", 8, "none", []),
        ("deepspeed-zero2", "cuda", 8, "nf4", []),
        ("deepspeed-zero3", "cuda", 8, "none", []),
        ("fsdp2", "cpu", 2, "none", ["needs backend device cuda or neuron", "silently train DDP"]),
        ("deepspeed-zero2", "cpu", 2, "none", ["needs backend device cuda", "CUDA GPUs only"]),
        ("deepspeed-zero3", "neuron", 2, "none", ["needs backend device cuda"]),
        ("fsdp2", "cuda", 1, "none", ["this run has 1", "use parallel.mode ddp"]),
        ("fsdp2", "cuda", 8, "nf4", ["nf4 with parallel.mode fsdp2", "use deepspeed-zero2"]),
        ("deepspeed-zero3", "cuda", 8, "nf4", ["nf4 with parallel.mode deepspeed-zero3", "bnb_4bit_quant_storage"]),
        ("zero9", "cuda", 8, "none", ["'zero9' is not one of"]),
    ],
)
def test_mode_problems(mode: str, device: str, world: int, quantize: str, expected: list[str]) -> None:
    problems = mode_problems(mode, device, world, quantize)
    text = "\n".join(problems)
    assert bool(problems) == bool(expected), problems
    for fragment in expected:
        assert fragment in text, text


def test_problems_add_up() -> None:
    assert len(mode_problems("fsdp2", "cpu", 1, "nf4")) == 3


# --- the model, data and worker for the 2-process run ----------------------------------------------------------


def _peft_model() -> Any:
    """A seeded tiny Llama with LoRA on all linear layers and a fully trained lm_head (modules_to_save)."""
    import torch
    import transformers
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        **{**TINY_ARCH, "vocab_size": 1024, "max_position_embeddings": 64}, attn_implementation="sdpa"
    )
    base = transformers.LlamaForCausalLM(config).to(torch.float32)
    base.config.use_cache = False
    lora = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules="all-linear", modules_to_save=["lm_head"])
    return get_peft_model(base, lora)


def _examples() -> list[dict[str, Any]]:
    import torch

    gen = torch.Generator().manual_seed(1)
    rows = []
    for _ in range(EXAMPLES):
        ids = torch.randint(3, 1024, (SEQ,), generator=gen)
        rows.append({"input_ids": ids, "attention_mask": torch.ones(SEQ, dtype=torch.long), "labels": ids.clone()})
    return rows


def _trainer_kwargs(output_dir: Path) -> dict[str, Any]:
    """The schedule both runs share: constant lr, no weight decay or clipping (the FSDP2 loop does none)."""
    return _base_trainer_kwargs(output_dir) | {
        "ddp_backend": "gloo",
        "max_steps": STEPS,
        "learning_rate": LR,
        "lr_scheduler_type": "constant",
        "weight_decay": 0.0,
        "max_grad_norm": 0.0,
        "optim": "adamw_torch",
        "save_strategy": "no",
        "logging_steps": 1,
        "seed": 0,
        "remove_unused_columns": False,
        "disable_tqdm": True,
    }


class _BrokenTokenizer:
    def save_pretrained(self, path: Any) -> None:
        raise OSError("disk full (injected)")


def _shard_like_accelerate(model: Any, plugin: Any) -> Any:
    """Accelerator._prepare_fsdp2's model steps, with a stand-in for the Accelerator that accelerate will not build
    on CPU: set the wrap policy, wrap layers for activation checkpointing, fully_shard."""
    import torch
    import torch.distributed as dist
    from accelerate.utils.fsdp_utils import fsdp2_apply_ac, fsdp2_prepare_model

    accelerator = SimpleNamespace(
        state=SimpleNamespace(fsdp_plugin=plugin),
        mixed_precision="no",
        is_main_process=dist.get_rank() == 0,
        device=torch.device("cpu"),
        torch_device_mesh=None,
    )
    plugin.set_auto_wrap_policy(model)
    if plugin.activation_checkpointing:
        model = fsdp2_apply_ac(accelerator, model)
    return fsdp2_prepare_model(accelerator, model)


def _train_sharded(model: Any, rank: int) -> None:
    """The Trainer's steps: AdamW (torch's defaults but no weight decay), each rank on its half of the examples;
    FSDP2 averages the gradients over the ranks as DDP does."""
    import torch

    rows = _examples()[2 * rank : 2 * rank + 2]
    batch = {key: torch.stack([row[key] for row in rows]) for key in rows[0]}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LR, weight_decay=0.0)
    model.train()
    for _ in range(STEPS):
        model(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)


def _worker(out: Path) -> None:
    import torch
    import torch.distributed as dist
    import transformers
    from accelerate.utils import FullyShardedDataParallelPlugin
    from peft import get_peft_model_state_dict
    from torch.distributed.tensor import DTensor

    from hyperjob.stages.adapter_save import save_adapter
    from hyperjob.stages.tiny import build_tokenizer

    torch.set_num_threads(1)
    rank = int(os.environ["RANK"])
    tokenizer = build_tokenizer()
    report: dict[str, Any] = {}

    # ddp: the Trainer as the train stage runs it.
    args = transformers.TrainingArguments(**_trainer_kwargs(out / "ckpt-ddp"))
    model = _peft_model()
    trainer = transformers.Trainer(
        model=model, args=args, train_dataset=_examples(), data_collator=transformers.default_data_collator
    )
    trainer.train()
    report["ddp_wrapper"] = type(trainer.model_wrapped).__name__
    save_adapter(trainer, model, tokenizer, out / "ddp")
    if rank == 0:
        model.save_pretrained(out / "peft")  # what peft itself writes for the same adapter
        tokenizer.save_pretrained(out / "peft")

    # The Trainer with fsdp on CPU: accelerate keeps DDP (the reason for the stand-in below).
    fsdp_extra = mode_arguments(
        "fsdp2", gradient_checkpointing=True, activation_offload=False, bf16=False, deepspeed_config_path=""
    )
    fsdp_args = transformers.TrainingArguments(**(_trainer_kwargs(out / "ckpt-fsdp") | fsdp_extra))
    probe = transformers.Trainer(model=_peft_model(), args=fsdp_args, train_dataset=_examples())
    report["cpu_trainer_fsdp_enabled"] = probe.is_fsdp_enabled

    # fsdp2: accelerate's own FSDP2 preparation of the PeftModel on the gloo mesh.
    plugin = FullyShardedDataParallelPlugin(**fsdp_args.fsdp_plugin_args)
    sharded = _shard_like_accelerate(_peft_model(), plugin)
    name = "base_model.model.model.layers.0._checkpoint_wrapped_module.self_attn.q_proj.lora_B.default.weight"
    param = dict(sharded.named_parameters())[name]
    report["lora_b_is_dtensor"] = isinstance(param, DTensor)
    report["lora_b_local_shape"] = list(param.to_local().shape)
    report["lora_b_full_shape"] = list(param.shape)
    report["peft_default_keys"] = sorted(get_peft_model_state_dict(sharded))
    _train_sharded(sharded, rank)
    save_adapter(None, sharded, tokenizer, out / "fsdp2")

    # Rank 0 fails to write: nothing appears and every rank raises instead of waiting.
    try:
        save_adapter(None, sharded, _BrokenTokenizer() if rank == 0 else tokenizer, out / "broken")
        report["broken"] = "returned"
    except Exception as e:
        report["broken"] = f"{type(e).__name__}: {e}"
    (out / f"rank{rank}.json").write_text(json.dumps(report))
    dist.barrier()
    dist.destroy_process_group()


# --- the 2-process run -----------------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def two_process_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("parallel-modes")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")])}
    env |= {"MASTER_ADDR": "127.0.0.1", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--nnodes", "1"]
    cmd += ["--master-addr", "127.0.0.1", "--master-port", str(_free_port()), __file__, str(out)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=RUN_TIMEOUT_S, cwd=REPO_ROOT)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-6000:]
    return out


def _tensors(adapter: Path) -> dict[str, Any]:
    from safetensors.torch import load_file

    return load_file(adapter / "adapter_model.safetensors")


def _files(adapter: Path) -> set[str]:
    return {p.name for p in adapter.iterdir()}


def _reports(out: Path) -> list[dict[str, Any]]:
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]


def test_ddp_save_equals_peft_save_pretrained(two_process_run: Path) -> None:
    import torch

    ref, saved = _tensors(two_process_run / "peft"), _tensors(two_process_run / "ddp")
    assert _files(two_process_run / "ddp") == _files(two_process_run / "peft")
    assert {"adapter_config.json", "adapter_model.safetensors", "tokenizer.json"} <= _files(two_process_run / "ddp")
    assert saved.keys() == ref.keys()
    for key in ref:
        assert torch.equal(saved[key], ref[key]), key
    assert _reports(two_process_run)[0]["ddp_wrapper"] == "DistributedDataParallel"


def test_fsdp2_adapter_equals_ddp_adapter(two_process_run: Path) -> None:
    import torch

    ddp, fsdp = _tensors(two_process_run / "ddp"), _tensors(two_process_run / "fsdp2")
    assert _files(two_process_run / "fsdp2") == _files(two_process_run / "ddp")
    assert fsdp.keys() == ddp.keys()
    # 2 layers x 7 linear layers x (A, B) + the trained lm_head copy.
    assert len(ddp) == 2 * 7 * 2 + 1 and "base_model.model.lm_head.weight" in ddp
    for key in ddp:
        assert fsdp[key].shape == ddp[key].shape, key
        torch.testing.assert_close(fsdp[key], ddp[key], rtol=0, atol=1e-5, msg=key)
    trained_b = ddp["base_model.model.model.layers.1.mlp.down_proj.lora_B.weight"]
    assert trained_b.abs().max() > 1e-3  # LoRA B starts at zero: equal adapters are not trivially equal
    config = json.loads((two_process_run / "fsdp2" / "adapter_config.json").read_text())
    assert config == json.loads((two_process_run / "ddp" / "adapter_config.json").read_text())


def test_saved_keys_are_standard_peft_keys(two_process_run: Path) -> None:
    for mode in ("ddp", "fsdp2"):
        for key in _tensors(two_process_run / mode):
            assert key.startswith("base_model.model."), key
            assert "_fsdp_wrapped_module" not in key and "_checkpoint_wrapped_module" not in key, key
            assert not key.startswith("module.") and ".default." not in key, key


def test_fsdp2_run_was_sharded_and_checkpoint_wrapped(two_process_run: Path) -> None:
    """The FSDP2 adapter came from shards; and peft alone, under accelerate's activation checkpointing, would
    have saved only the lm_head (no LoRA weight of a checkpointed layer) - what save_adapter works around."""
    for report in _reports(two_process_run):
        assert report["cpu_trainer_fsdp_enabled"] is False
        assert report["lora_b_is_dtensor"] is True
        assert report["lora_b_full_shape"] == [64, 8]
        assert report["lora_b_local_shape"] == [32, 8]
        assert report["peft_default_keys"] == ["base_model.model.lm_head.weight"]


def test_failed_save_leaves_nothing_and_fails_every_rank(two_process_run: Path) -> None:
    rank0, rank1 = (report["broken"] for report in _reports(two_process_run))
    assert rank0 == "OSError: disk full (injected)"
    assert rank1.startswith("RuntimeError: rank 0 failed to save the adapter: OSError: disk full")
    assert not (two_process_run / "broken").exists()
    assert not [p.name for p in two_process_run.iterdir() if p.name.endswith(".partial")]


if __name__ == "__main__":
    _worker(Path(sys.argv[1]))
