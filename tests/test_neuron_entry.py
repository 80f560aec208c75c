"""The Trainium train entry's pure parts: LoRA target rules, --print-args, resume bookkeeping, the pinned
environment check (in a real venv holding fake Neuron packages) and the trainable-parameter check.

The same rules are checked against the real optimum-neuron classes in tests/test_neuron_upstream.py.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from hyperjob.backends.neuron_env import PINS
from hyperjob.backends.neuron_lora import LLAMA_LINEARS, neuron_targets, qkv_fused
from hyperjob.config.load import ConfigError, dump_config, load_config
from hyperjob.model_facts import ModelFacts
from hyperjob.paths import RunPaths
from hyperjob.stages.common import StageError
from hyperjob.stages.resume import incomplete_checkpoints, newest_checkpoint, resume_point
from hyperjob.stages.train_neuron import check_trn_config, refuse_resume

REPO = Path(__file__).resolve().parent.parent
TRAINIUM = REPO / "examples" / "trainium-llama3-8b.yaml"
LLAMA3_8B = ModelFacts(32, 8, 8192)


def trainium_run_dir(tmp_path: Path, *overrides: str) -> Path:
    cfg = load_config(TRAINIUM, overrides=[f"workdir={tmp_path / 'work'}", *overrides], check_inputs=False)
    run_dir = tmp_path / "work" / "runs" / "run"
    run_dir.mkdir(parents=True)
    RunPaths(run_dir).config.write_text(dump_config(cfg), encoding="utf-8")
    return run_dir


# --- LoRA targets ----------------------------------------------------------------------------------------------

TARGET_CASES = [
    # (targets, tp, refused?)  Llama 3 8B has 8 KV heads: q/k/v fuse at TP 16/32, stay separate at TP 8.
    (list(LLAMA_LINEARS), 8, False),
    (list(LLAMA_LINEARS), 32, False),
    (["q_proj", "v_proj"], 8, False),
    (["q_proj", "v_proj"], 32, True),
    (["q_proj", "k_proj", "v_proj"], 32, False),
    (["gate_proj"], 8, True),
    (["up_proj", "down_proj"], 8, True),
    (["gate_proj", "up_proj"], 8, False),
    (["o_proj"], 32, False),
    (["all-linear"], 32, False),
    (["all-linear", "q_proj"], 8, True),
]


@pytest.mark.parametrize(("targets", "tp", "refused"), TARGET_CASES)
def test_lora_targets_follow_the_fused_layer_rules(targets: list[str], tp: int, refused: bool) -> None:
    if refused:
        with pytest.raises(ConfigError) as e:
            neuron_targets(targets, LLAMA3_8B, tp)
        assert all(line.startswith("config: lora.target_modules:") for line in e.value.lines())
    else:
        out = neuron_targets(targets, LLAMA3_8B, tp)
        assert out == (LLAMA_LINEARS if targets == ["all-linear"] else tuple(targets))


def test_qkv_fusion_follows_kv_heads_and_unknown_heads_count_as_fused() -> None:
    assert not qkv_fused(LLAMA3_8B, 8)
    assert qkv_fused(LLAMA3_8B, 16)
    assert qkv_fused(ModelFacts(4, 2), 4)
    assert qkv_fused(None, 2) and not qkv_fused(None, 1)


def test_plan_refuses_a_partial_fused_group_before_anything_is_queued(tmp_path: Path) -> None:
    config = tmp_path / "c.yaml"
    config.write_text(
        TRAINIUM.read_text().replace(
            "[q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj]", "[q_proj, gate_proj]"
        )
    )
    proc = subprocess.run(
        [sys.executable, "-m", "hyperjob", "plan", str(config)], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 2
    assert "lora.target_modules: gate_proj without up_proj" in proc.stderr
    assert "Traceback" not in proc.stderr


# --- --print-args and plan --show-args -------------------------------------------------------------------------


def print_args(run_dir: Path, *extra: str) -> dict[str, object]:
    code = (
        "import sys, runpy; sys.argv = ['train', *sys.argv[1:]];"
        "runpy.run_module('hyperjob.stages.train', run_name='__main__')"
    )
    # A check that the printing path imports no torch: poison the module so an import would fail loudly.
    env = {**os.environ, "PYTHONPATH": str(REPO / "tests" / "data" / "no_torch")}
    proc = subprocess.run(
        [sys.executable, "-c", code, "--run-dir", str(run_dir), "--print-args", *extra],
        capture_output=True, text=True, timeout=60, env=env,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def test_print_args_for_the_seed_example(tmp_path: Path) -> None:
    run_dir = trainium_run_dir(tmp_path)
    args = print_args(run_dir)
    trainer = args["trainer_config"]
    assert isinstance(trainer, dict)
    assert trainer["tensor_parallel_size"] == 8 and trainer["pipeline_parallel_size"] == 1
    assert trainer["output_dir"] == str(run_dir / "checkpoints")
    assert trainer["max_length"] == 2048 and trainer["gradient_accumulation_steps"] == 3
    assert "kv_size_multiplier" not in trainer  # 8 KV heads at TP 8: no replication
    assert args["expected_trn_config"] == {
        "tensor_parallel_size": 8,
        "pipeline_parallel_size": 1,
        "kv_size_multiplier": None,
    }
    compile_args = print_args(run_dir, "--compile")["trainer_config"]
    assert isinstance(compile_args, dict)
    assert compile_args["output_dir"] == str(run_dir / "compile") and compile_args["max_steps"] == 10
    assert {k: v for k, v in compile_args.items() if k not in ("output_dir", "max_steps")} == {
        k: v for k, v in trainer.items() if k not in ("output_dir", "max_steps")
    }


def test_print_args_carries_the_kv_multiplier_when_kv_heads_are_fewer_than_tp(tmp_path: Path) -> None:
    args = print_args(trainium_run_dir(tmp_path, "parallel.tensor=32", "training.seq_len=2048"))
    assert args["trainer_config"]["kv_size_multiplier"] == 4  # type: ignore[index]
    assert args["expected_trn_config"]["kv_size_multiplier"] == 4  # type: ignore[index]


def test_print_args_on_cpu_shows_the_transformers_arguments(tmp_path: Path) -> None:
    from fixtures_tiny import make_run_dir

    args = print_args(make_run_dir(tmp_path / "w"))
    assert args["trainer_class"] == "transformers.TrainingArguments"
    assert args["trainer_config"]["use_cpu"] is True  # type: ignore[index]


def test_plan_show_args_prints_the_same_arguments(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "hyperjob", "plan", str(TRAINIUM), "--json", "--show-args"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    assert data["train_args"]["trainer_config"]["tensor_parallel_size"] == 8
    assert data["train_args"]["trainer_config"]["output_dir"] == "<run-dir>/checkpoints"


# --- resume bookkeeping ------------------------------------------------------------------------------------------


def checkpoint(root: Path, step: int, complete: bool = True) -> Path:
    d = root / f"checkpoint-{step}"
    (d / "adapter_default").mkdir(parents=True)
    if complete:
        (d / "trainer_state.json").write_text(json.dumps({"global_step": step}))
    return d


def test_resume_point_names_the_newest_complete_checkpoint_and_the_batches_to_skip(tmp_path: Path) -> None:
    # The seed: 15,011 rows, global batch 12 (micro 1 x accum 3 x DP 4): 1,251 steps per epoch.
    for step in (400, 800):
        checkpoint(tmp_path, step)
    checkpoint(tmp_path, 1200, complete=False)
    point = resume_point(tmp_path, steps_per_epoch=1251, grad_accum=3, global_batch=12, total_steps=2502)
    assert point is not None
    assert point.checkpoint == tmp_path / "checkpoint-800" and point.step == 800
    assert (point.epoch, point.skip_micro_batches, point.examples_seen) == (0, 2400, 9600)
    assert incomplete_checkpoints(tmp_path) == [tmp_path / "checkpoint-1200"]
    # In the second epoch, only that epoch's consumed batches are skipped.
    checkpoint(tmp_path, 1300)
    point = resume_point(tmp_path, steps_per_epoch=1251, grad_accum=3, global_batch=12, total_steps=2502)
    assert point is not None and (point.epoch, point.skip_micro_batches) == (1, 49 * 3)
    assert incomplete_checkpoints(tmp_path) == []  # checkpoint-1200 is older than the newest complete one
    assert "step 1300 of 2502" in point.describe()


def test_checkpoints_sort_by_step_not_by_name(tmp_path: Path) -> None:
    checkpoint(tmp_path, 900)
    checkpoint(tmp_path, 1000)
    assert newest_checkpoint(tmp_path) == tmp_path / "checkpoint-1000"


def test_neuron_entry_refuses_to_train_over_existing_checkpoints(tmp_path: Path) -> None:
    paths = RunPaths(tmp_path)
    refuse_resume(paths, None)  # nothing there: trains
    checkpoint(paths.checkpoints, 400)
    point = resume_point(paths.checkpoints, steps_per_epoch=1251, grad_accum=3, global_batch=12, total_steps=1251)
    with pytest.raises(StageError, match="cannot resume training") as e:
        refuse_resume(paths, point)
    assert "hyperjob consolidate" in str(e.value) and "checkpoint-400" in str(e.value)
    partial = RunPaths(tmp_path / "other")
    checkpoint(partial.checkpoints, 400, complete=False)
    with pytest.raises(StageError, match="interrupted save"):
        refuse_resume(partial, None)


def test_trn_config_must_match_the_plan() -> None:
    class Trn:
        tensor_parallel_size = 8
        pipeline_parallel_size = 1
        kv_size_multiplier = None

    check_trn_config(Trn(), {"tensor_parallel_size": 8, "pipeline_parallel_size": 1, "kv_size_multiplier": None})
    with pytest.raises(StageError, match="tensor_parallel_size=8, but the plan needs 4"):
        check_trn_config(Trn(), {"tensor_parallel_size": 4})


# --- the pinned environment, checked by the entry in a real venv with fake Neuron packages -------------------------


def fake_neuron_venv(root: Path, versions: dict[str, str]) -> Path:
    """A real venv whose site-packages holds only dist-info metadata for the pinned packages (at `versions`), and
    a .pth that makes hyperjob and its light dependencies importable after it."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(root)], check=True, timeout=120)
    (site,) = root.glob("lib/python*/site-packages")
    for dist, version in versions.items():
        info = site / f"{dist.replace('-', '_')}-{version}.dist-info"
        info.mkdir()
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: {version}\n")
    (site / "zz-hyperjob.pth").write_text(f"{REPO}\n{sysconfig.get_paths()['purelib']}\n")
    return root / "bin" / "python"


PINNED = {
    "optimum-neuron": "0.4.5", "torch": "2.8.0", "torch-neuronx": "2.8.0.2.10.16998",
    "neuronx-distributed": "0.15.22404", "neuronx-cc": "2.21.33363.0", "transformers": "4.57.6", "peft": "0.17.0",
    "trl": "0.24.0", "accelerate": "1.8.1", "optimum": "2.0.0",
}  # fmt: skip


def test_pins_table_is_the_one_the_fake_venv_mirrors() -> None:
    assert {p.dist for p in PINS} == set(PINNED)


@pytest.mark.parametrize("compile_flag", [[], ["--compile"]])
def test_version_mismatch_in_the_neuron_venv_is_refused_with_one_line(tmp_path: Path, compile_flag: list[str]) -> None:
    python = fake_neuron_venv(tmp_path / "venv", {**PINNED, "neuronx-cc": "2.20.9.0"})
    run_dir = trainium_run_dir(tmp_path)
    proc = subprocess.run(
        [str(python), "-m", "hyperjob.stages.train", "--run-dir", str(run_dir), *compile_flag],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 2, proc.stdout + proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert "neuronx-cc 2.20.9.0 is installed" in lines[0] and "==2.21.33363.0" in lines[0]


def test_matching_neuron_venv_passes_the_check_and_goes_on_to_the_model(tmp_path: Path) -> None:
    python = fake_neuron_venv(tmp_path / "venv", PINNED)
    run_dir = trainium_run_dir(tmp_path)
    proc = subprocess.run(
        [str(python), "-m", "hyperjob.stages.train", "--run-dir", str(run_dir)], capture_output=True, text=True,
        timeout=120,
    )  # fmt: skip
    # Past the version check, the next thing it needs is the downloaded base model.
    assert proc.returncode == 2 and "run the download stage first" in proc.stderr, proc.stderr


# --- did LoRA apply ----------------------------------------------------------------------------------------------


def test_trainable_parameter_check_on_a_real_peft_model(tiny_model_dir: Path) -> None:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from hyperjob.stages.lora_check import check_lora_applied

    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    with pytest.raises(StageError, match=r"all .* parameters are trainable"):
        check_lora_applied(base)
    model = get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"))
    trainable, total = check_lora_applied(model)
    assert 0 < trainable < total
    for p in model.parameters():
        p.requires_grad_(False)
    with pytest.raises(StageError, match="0 of"):
        check_lora_applied(model)
