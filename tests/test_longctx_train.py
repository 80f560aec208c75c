"""The long-context options through the real train entry (torchrun, gloo) on the tiny model, end to end.

Each run trains 3 steps on packed rows with the same global batch of 4 rows. The baseline is one process with the
stock Trainer; the others switch options on and must train the same model: Ulysses SP=2 over 2 processes with the
chunked loss and the tiled MLP, and one process with activation checkpointing offloaded to host memory. A last run
raises the RoPE base and trains the embeddings, then merges: the merged model's config carries the base, and the
merged model answers as the adapter-wrapped one.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from fixtures_tiny import REPO_ROOT, make_run_dir

from hyperjob.paths import RunPaths
from hyperjob.stages.train import SUMMARY_NAME

BASE = [
    "training.max_steps=3", "training.save_steps=3", "training.logging_steps=1", "training.lr=5e-3",
    "training.packing=true", "training.micro_batch=4", "training.seq_len=256",
]  # fmt: skip
ONE = ["cluster.devices_per_node=1"]
SP2 = ["cluster.devices_per_node=2", "parallel.sequence=2", "training.loss=chunked", "training.loss_chunk=64"]
SP2 += ["training.mlp_chunk=48"]
OFFLOAD = [*ONE, "training.gradient_checkpointing=true", "training.activation_offload=true", "training.loss=chunked"]
ROPE = [*ONE, "model.rope_theta=1000000.0", "lora.modules_to_save=[embed_tokens]", "training.max_steps=2"]
# Same model, same data, different arithmetic order (chunks, tiles, all-to-all): float32 rounding only.
LOSS_ATOL = 1e-5
# Adam divides by the gradient's running RMS, so an element whose gradient is near zero amplifies rounding noise.
ADAPTER_ATOL = 1e-5


def _train(run_dir: Path, procs: int) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={procs}", "--standalone"]
    cmd += ["-m", "hyperjob.stages.train", "--run-dir", str(run_dir)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def _losses(run_dir: Path) -> list[float]:
    state = json.loads((run_dir / "checkpoints" / "checkpoint-3" / "trainer_state.json").read_text())
    return [e["loss"] for e in state["log_history"] if "loss" in e]


def _adapter(run_dir: Path) -> dict[str, Any]:
    from safetensors.torch import load_file

    return load_file(RunPaths(run_dir).adapter / "adapter_model.safetensors")


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> dict[str, tuple[Path, str]]:
    out = {}
    for name, overrides, procs in (("base", ONE, 1), ("sp2", SP2, 2), ("offload", OFFLOAD, 1)):
        work = tmp_path_factory.mktemp(name) / "work"
        run_dir = make_run_dir(work, [*BASE, *overrides], model_dir=tiny_model_dir)
        proc = _train(run_dir, procs)
        out[name] = (run_dir, proc.stdout + proc.stderr)
    return out


@pytest.mark.slow
@pytest.mark.parametrize("name", ["sp2", "offload"])
def test_options_train_the_same_model_as_the_stock_trainer(runs: dict[str, tuple[Path, str]], name: str) -> None:
    import torch

    base_dir, _ = runs["base"]
    run_dir, _ = runs[name]
    base_losses, losses = _losses(base_dir), _losses(run_dir)
    assert len(losses) == len(base_losses) == 3
    assert losses == pytest.approx(base_losses, abs=LOSS_ATOL), (losses, base_losses)
    base, tuned = _adapter(base_dir), _adapter(run_dir)
    assert base.keys() == tuned.keys()
    worst = max(float((base[k] - tuned[k]).abs().max()) for k in base)
    moved = max(float(v.abs().max()) for k, v in base.items() if "lora_B" in k)
    assert worst < ADAPTER_ATOL, worst
    print(f"{name}: adapter max difference {worst:.2e}, largest lora_B {moved:.2e}")
    assert moved > 10 * ADAPTER_ATOL  # the adapters really trained (lora_B starts at zero)
    assert all(torch.isfinite(v).all() for v in tuned.values())


@pytest.mark.slow
def test_the_logs_say_which_options_ran(runs: dict[str, tuple[Path, str]]) -> None:
    _, sp2_log = runs["sp2"]
    assert "Ulysses sequence parallelism: 2 ranks per sample, DP 1" in sp2_log
    assert "tiled MLP: 2 MLPs run 48 tokens at a time" in sp2_log
    assert "loss: chunked (LM head chunk 64 tokens)" in sp2_log
    _, offload_log = runs["offload"]
    assert "activation offload" in offload_log


@pytest.mark.slow
def test_summary_reports_pad_fraction_and_tokens_per_step(runs: dict[str, tuple[Path, str]]) -> None:
    for name in ("base", "sp2"):
        run_dir, _ = runs[name]
        summary = json.loads((run_dir / SUMMARY_NAME).read_text())
        pack = summary["data"]["pack"]
        assert 0 <= summary["pad_fraction"] < 0.1
        assert summary["pad_fraction"] == pytest.approx(pack["pad_fraction"], abs=1e-6)
        # one data-parallel rank in both runs: a step is 4 rows of 256 positions, less their padding
        assert summary["tokens_per_step"] == pytest.approx(4 * 256 * (1 - pack["pad_fraction"]), rel=1e-3)


@pytest.mark.slow
def test_rope_base_and_trained_embeddings_reach_the_merged_model(
    tmp_path: Path, tiny_model_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import torch
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from hyperjob.longctx.rope import apply_to_config
    from hyperjob.stages import merge

    run_dir = make_run_dir(tmp_path / "work", [*BASE, *ROPE], model_dir=tiny_model_dir)
    _train(run_dir, 1)
    paths = RunPaths(run_dir)
    assert merge.main(["--run-dir", str(run_dir)]) == 0
    merged_config = AutoConfig.from_pretrained(paths.merged)
    assert merged_config.rope_parameters["rope_theta"] == 1e6
    base_config = AutoConfig.from_pretrained(tiny_model_dir)
    assert base_config.rope_parameters["rope_theta"] != 1e6  # the base was not touched

    apply_to_config(base_config, {"rope_theta": 1e6})
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, config=base_config, dtype=torch.float32)
    original_embed = base.get_input_embeddings().weight.detach().clone()
    wrapped = PeftModel.from_pretrained(base, paths.adapter).eval()
    merged = AutoModelForCausalLM.from_pretrained(paths.merged, dtype=torch.float32).eval()
    saved = load_file(paths.adapter / "adapter_model.safetensors")
    trained_embed = saved["base_model.model.model.embed_tokens.weight"]
    assert not torch.equal(trained_embed, original_embed)  # the embeddings trained
    assert torch.equal(merged.get_input_embeddings().weight, trained_embed)  # and the merge took them
    tok = AutoTokenizer.from_pretrained(paths.adapter)
    ids = tok(["### Instruction:\nWhat is the capital of Japan?\n\n### Response:\n"], return_tensors="pt")
    with torch.no_grad():
        a, b = wrapped(**ids).logits, merged(**ids).logits
    assert torch.allclose(a, b, atol=1e-4), float((a - b).abs().max())


@pytest.mark.parametrize(
    ("num_items", "sp", "world_summed", "world", "expect"),
    [
        (None, 1, False, 1, 2.0),  # no step-wide count: this micro-batch's mean
        (12, 1, True, 4, 2.0),  # transformers' own rule: sum / step count x processes
        (12, 1, False, 4, 0.5),  # counted locally: sum / count, DDP averages
        (24, 2, True, 4, 2.0),  # SP=2: the count is summed over both ranks of the sample, the loss scaled by 2
    ],
)
def test_scaled_loss_follows_transformers_and_scales_for_sp(
    num_items: int | None, sp: int, world_summed: bool, world: int, expect: float
) -> None:
    import torch

    from hyperjob.stages.train_longctx import scaled_loss

    got = scaled_loss(
        torch.tensor(6.0), torch.tensor(3), num_items, sp=sp, world_summed=world_summed, world=world, group=None
    )
    assert float(got) == pytest.approx(expect)
