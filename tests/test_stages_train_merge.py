"""Train (2 processes, gloo), resume, merge and evaluate on the tiny model, end to end.

The slow part trains twice with torchrun (about 20 s each on 2 cores): once from scratch, and once after a
simulated crash that lost the newest checkpoint, which must resume from the previous one and end with the
same adapter weights.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from fixtures_tiny import REPO_ROOT, make_run_dir

from hyperjob.paths import RunPaths
from hyperjob.stages.resume import newest_checkpoint
from hyperjob.stages.train import SUMMARY_NAME

TRAIN_OVERRIDES = ["training.max_steps=4", "training.save_steps=2", "training.logging_steps=1", "training.lr=5e-3"]
# fp32 merge: W + s*B@A folded once vs. applied per forward; differences are float32 rounding (~1e-7 rel).
FP32_ATOL = 1e-4
# bf16: weights keep 8 mantissa bits, so merged and adapter-wrapped logits differ by a few bf16 ulps of the
# logit scale (|logits| <= ~1 here): allow 2% of the largest logit.
BF16_REL_TO_MAX = 2e-2


@dataclass
class Trained:
    run_dir: Path
    first: subprocess.CompletedProcess[str]
    first_summary: dict[str, Any]
    first_adapter: Path
    resumed: subprocess.CompletedProcess[str]
    resumed_summary: dict[str, Any]


def _torchrun_train(run_dir: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone"]
    cmd += ["-m", "hyperjob.stages.train", "--run-dir", str(run_dir)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Trained:
    run_dir = make_run_dir(tmp_path_factory.mktemp("train") / "work", TRAIN_OVERRIDES, model_dir=tiny_model_dir)
    paths = RunPaths(run_dir)
    first = _torchrun_train(run_dir)
    first_summary = json.loads((run_dir / SUMMARY_NAME).read_text())
    first_adapter = shutil.copytree(paths.adapter, run_dir.parent / "first-adapter")
    # Simulate a crash after step 3: the step-4 checkpoint and every final output are gone.
    shutil.rmtree(paths.checkpoints / "checkpoint-4")
    shutil.rmtree(paths.adapter)
    (run_dir / SUMMARY_NAME).unlink()
    resumed = _torchrun_train(run_dir)
    resumed_summary = json.loads((run_dir / SUMMARY_NAME).read_text())
    return Trained(run_dir, first, first_summary, first_adapter, resumed, resumed_summary)


def _adapter_tensors(adapter: Path) -> dict[str, Any]:
    from safetensors.torch import load_file

    return load_file(adapter / "adapter_model.safetensors")


def _logits(model: Any, tokenizer: Any) -> Any:
    import torch

    ids = tokenizer(["### Instruction:\nWhat is the capital of Japan?\n\n### Response:\n"], return_tensors="pt")
    with torch.no_grad():
        return model(**ids).logits.float()


# ---------------------------------------------------------------- train and resume


@pytest.mark.slow
def test_train_is_data_parallel_and_saves_checkpoints(trained: Trained) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    s = trained.first_summary
    assert s["world_size"] == 2 and s["steps"] == 4 and s["resumed_from"] is None
    assert s["tokens_seen"] > 0 and s["final_loss"] > 0 and s["wall_time_s"] > 0
    assert "world size 2 (DDP over gloo)" in trained.first.stdout
    checkpoints = RunPaths(trained.run_dir).checkpoints
    assert sorted(p.name for p in checkpoints.iterdir()) == ["checkpoint-2", "checkpoint-4"]
    assert all((p / "trainer_state.json").is_file() for p in checkpoints.iterdir())
    adapter = RunPaths(trained.run_dir).adapter
    assert {"adapter_config.json", "adapter_model.safetensors", "tokenizer.json"} <= {p.name for p in adapter.iterdir()}
    base = AutoModelForCausalLM.from_pretrained(
        json.loads((adapter / "adapter_config.json").read_text())["base_model_name_or_path"]
    )
    model = PeftModel.from_pretrained(base, adapter)
    assert any("lora_B" in name for name, _ in model.named_parameters())


@pytest.mark.slow
def test_rerun_resumes_from_newest_complete_checkpoint(trained: Trained) -> None:
    import torch

    assert "resuming from" in trained.resumed.stdout and "checkpoint-2" in trained.resumed.stdout
    s = trained.resumed_summary
    assert s["resumed_from"] == "checkpoint-2" and s["steps"] == 4 and s["world_size"] == 2
    assert newest_checkpoint(RunPaths(trained.run_dir).checkpoints) == RunPaths(trained.run_dir).checkpoints / (
        "checkpoint-4"
    )
    # Optimizer, scheduler, RNG and data position were restored: steps 3-4 retrace the first run.
    first, again = _adapter_tensors(trained.first_adapter), _adapter_tensors(RunPaths(trained.run_dir).adapter)
    assert first.keys() == again.keys()
    for name in first:
        torch.testing.assert_close(again[name], first[name], atol=1e-6, rtol=1e-5)
    assert s["tokens_seen"] == trained.first_summary["tokens_seen"]


# ---------------------------------------------------------------- merge


@pytest.mark.slow
def test_merge_stage_matches_adapter_model(trained: Trained, tiny_model_dir: Path) -> None:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from hyperjob.stages import merge

    paths = RunPaths(trained.run_dir)
    assert merge.main(["--run-dir", str(trained.run_dir)]) == 0
    index = json.loads((paths.merged / "model.safetensors.index.json").read_text())
    shards = sorted(p.name for p in paths.merged.glob("*.safetensors"))
    assert len(shards) >= 3 and set(index["weight_map"].values()) == set(shards)  # 200KB shards
    assert {"config.json", "generation_config.json", "tokenizer.json", "chat_template.jinja"} <= {
        p.name for p in paths.merged.iterdir()
    }
    tok = AutoTokenizer.from_pretrained(paths.merged)
    merged = AutoModelForCausalLM.from_pretrained(paths.merged)
    assert merged.dtype == torch.float32 and not any("lora" in n for n, _ in merged.named_parameters())
    wrapped = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), paths.adapter)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    got, want, orig = _logits(merged, tok), _logits(wrapped, tok), _logits(base, tok)
    torch.testing.assert_close(got, want, atol=FP32_ATOL, rtol=0)
    assert (got - orig).abs().max() > 100 * FP32_ATOL  # the adapter really changed the model


@pytest.mark.slow
def test_merge_keeps_bf16_and_matches_within_bf16_tolerance(
    trained: Trained, tiny_model_dir: Path, tmp_path: Path
) -> None:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from hyperjob.checkpoint.merge import merge_adapter
    from hyperjob.stages.common import dtype_kwargs

    bf16_base = tmp_path / "base-bf16"
    AutoModelForCausalLM.from_pretrained(tiny_model_dir, **dtype_kwargs(torch.bfloat16)).save_pretrained(bf16_base)
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(bf16_base)
    adapter = RunPaths(trained.run_dir).adapter
    out = merge_adapter(adapter, bf16_base, tmp_path / "merged", max_shard_size="5GB")
    assert not (out / "model.safetensors.index.json").exists() and (out / "model.safetensors").is_file()
    tok = AutoTokenizer.from_pretrained(out)
    merged = AutoModelForCausalLM.from_pretrained(out, **dtype_kwargs("auto"))
    assert merged.dtype == torch.bfloat16
    wrapped = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(bf16_base, **dtype_kwargs("auto")), adapter
    )
    got, want = _logits(merged, tok), _logits(wrapped, tok)
    torch.testing.assert_close(got, want, atol=BF16_REL_TO_MAX * float(want.abs().max()), rtol=0)


@pytest.mark.slow
def test_merge_rejects_adapter_of_another_model(trained: Trained, tmp_path: Path) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    from hyperjob.checkpoint.errors import MergeError
    from hyperjob.checkpoint.merge import merge_adapter

    other = tmp_path / "other-base"
    arch: dict[str, Any] = {
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
    }
    cfg = LlamaConfig(vocab_size=1024, num_hidden_layers=2, **arch)
    LlamaForCausalLM(cfg).save_pretrained(other)
    adapter = RunPaths(trained.run_dir).adapter
    with pytest.raises(MergeError) as err:
        merge_adapter(adapter, other, tmp_path / "merged")
    assert str(adapter) in str(err.value) and str(other) in str(err.value) and "does not fit" in str(err.value)
    assert not (tmp_path / "merged").exists()


# ---------------------------------------------------------------- evaluate


@pytest.mark.slow
def test_evaluate_writes_base_and_tuned_answers(trained: Trained, capsys: pytest.CaptureFixture[str]) -> None:
    from hyperjob.config.load import load_resolved
    from hyperjob.stages import evaluate, merge

    paths = RunPaths(trained.run_dir)
    if not (paths.merged / "config.json").is_file():
        assert merge.main(["--run-dir", str(trained.run_dir)]) == 0
    assert evaluate.main(["--run-dir", str(trained.run_dir)]) == 0
    assert str(paths.evaluation / "answers.json") in capsys.readouterr().out
    prompts = list(load_resolved(paths.config).evaluate.prompts)
    with_merged = json.loads((paths.evaluation / "answers.json").read_text())
    assert [r["prompt"] for r in with_merged] == prompts and len(prompts) == 2
    assert all(set(r) == {"prompt", "base", "tuned"} and r["tuned"] != r["base"] for r in with_merged)
    assert prompts[0] in (paths.evaluation / "answers.md").read_text()
    # Without the merged dir the stage falls back to base + adapter: greedy answers are the same.
    shutil.rmtree(paths.merged)
    assert evaluate.main(["--run-dir", str(trained.run_dir)]) == 0
    assert json.loads((paths.evaluation / "answers.json").read_text()) == with_merged


# ---------------------------------------------------------------- fast checks


def test_newest_checkpoint_ignores_incomplete(tmp_path: Path) -> None:
    assert newest_checkpoint(tmp_path / "absent") is None
    for step, complete in ((5, True), (10, True), (15, False)):
        ckpt = tmp_path / f"checkpoint-{step}"
        ckpt.mkdir()
        if complete:
            (ckpt / "trainer_state.json").write_text("{}")
    (tmp_path / "checkpoint-x").mkdir()
    assert newest_checkpoint(tmp_path) == tmp_path / "checkpoint-10"


def test_neuron_training_outside_the_neuron_environment_is_refused(
    make_tiny_run_dir: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    """This venv has no Neuron stack: the Trainium entry says so in one line before importing anything heavy."""
    from hyperjob.stages import train

    run_dir = make_tiny_run_dir(["backend=neuron", "training.bf16=true"])
    assert train.main(["--run-dir", str(run_dir)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "optimum-neuron is not installed" in err[0] and "hyperjob env" in err[0]


def test_compile_flag_is_neuron_only(make_tiny_run_dir: Any, capsys: pytest.CaptureFixture[str]) -> None:
    from hyperjob.stages import train

    assert train.main(["--run-dir", str(make_tiny_run_dir()), "--compile"]) == 2
    assert "--compile precompiles Neuron graphs; it does not apply to backend 'cpu'" in capsys.readouterr().err


def test_merge_and_evaluate_need_an_adapter(make_tiny_run_dir: Any, capsys: pytest.CaptureFixture[str]) -> None:
    from hyperjob.stages import evaluate, merge

    run_dir = make_tiny_run_dir()
    assert merge.main(["--run-dir", str(run_dir)]) == 2
    assert evaluate.main(["--run-dir", str(run_dir)]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 2 and "run the train stage first" in err[0] and "run train first" in err[1]


def test_parse_size() -> None:
    from hyperjob.checkpoint.common import parse_size

    assert parse_size("200KB") == 200_000 and parse_size("1.5GiB") == 3 * 2**29 and parse_size("7B") == 7
    with pytest.raises(ValueError, match="must be a number"):
        parse_size("5 parsecs")


def test_a_hung_teardown_ends_with_exit_0_after_the_grace_period() -> None:
    """After the outputs are saved, a rank stuck in teardown (here: sleeping) is ended by the watchdog, exit 0."""
    import subprocess
    import sys
    import time

    code = (
        "import time; from hyperjob.stages import train; train.TEARDOWN_GRACE_S = 1.0; "
        "train._finish_distributed(); time.sleep(60)"
    )
    started = time.monotonic()
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert time.monotonic() - started < 30
    assert "still shutting down 1s after its outputs were saved" in proc.stderr
