"""The Trainium entry's arguments and LoRA rules against the REAL optimum-neuron 0.4.5 training classes.

torch-neuronx and neuronx-distributed exist only on the Neuron pip index, so a second venv holds the Python side
of the stack (`.ci/install-neuron-venv.sh`) and tests/neuron_upstream/stubs.py stands in for the device packages.
Each check batches its cases into one subprocess there (optimum's import is the slow part), and compares in this
venv, where hyperjob's pure functions run as they do on a login node:

1. NeuronSFTConfig takes the train entry's `trainer_config` (seed example; TP 4/8/32 x PP 1/2) in a faked NxD
   world of the plan's size, and its trn_config is the layout we planned; a misspelled keyword fails.
2. `neuron_targets` refuses exactly the LoRA target lists upstream's adapt_peft_config_for_model refuses, on the
   real training Llama at fused and unfused q/k/v layouts; the planner's head rules match what upstream can build.
3. The training NeuronModelForCausalLM loads a tiny local Llama from the entry's `model_loader`, LoRA from its
   `lora_config` wraps it (get_peft_model, and NeuronSFTTrainer as the entry does), check_lora_applied passes,
   and refuses the bare model.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest

from hyperjob.backends.neuron import head_checks
from hyperjob.backends.neuron_lora import LLAMA_LINEARS, neuron_targets, qkv_fused
from hyperjob.config.load import ConfigError, dump_config, load_config
from hyperjob.model_facts import ModelFacts
from hyperjob.paths import RunPaths
from hyperjob.plan.planner import Plan, make_plan
from hyperjob.stages.train import train_arguments

pytestmark = pytest.mark.slow

REPO_ROOT = Path(__file__).resolve().parents[1]
CASES = REPO_ROOT / "tests" / "neuron_upstream" / "cases.py"
SEED = REPO_ROOT / "examples" / "trainium-llama3-8b.yaml"
INSTALL = REPO_ROOT / ".ci" / "install-neuron-venv.sh"
# First import of optimum.neuron can take a minute on a cold cache; a venv install, a few more.
CASES_TIMEOUT_S = 900
INSTALL_TIMEOUT_S = 1800
CORES_PER_NODE = 32  # ml.trn1.32xlarge, the seed's instance


# --- plumbing ---------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def neuron_python() -> Path:
    """The neuron venv's interpreter; made (or found in the cache) by the project's install script."""
    proc = subprocess.run(
        ["bash", str(INSTALL)], capture_output=True, text=True, timeout=INSTALL_TIMEOUT_S, cwd=REPO_ROOT
    )
    if proc.returncode != 0 or not proc.stdout.strip():
        pytest.skip(f"no optimum-neuron venv ({INSTALL.name} exited {proc.returncode}): {proc.stderr[-2000:]}")
    python = Path(proc.stdout.strip().splitlines()[-1]) / "bin" / "python"
    assert python.is_file(), f"{INSTALL.name} printed {python.parent}, which has no bin/python"
    return python


def run_cases(python: Path, command: str, request: dict[str, Any], cwd: Path) -> dict[str, Any]:
    """One batch in the neuron venv: JSON request on stdin, JSON facts on stdout."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "TORCHELASTIC_RUN_ID")}
    env |= {"PYTHONPATH": str(REPO_ROOT), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    proc = subprocess.run(
        [str(python), str(CASES), command],
        input=json.dumps(request),
        capture_output=True,
        text=True,
        timeout=CASES_TIMEOUT_S,
        env=env,
        cwd=cwd,  # upstream may write default output/log folders into its working directory
    )
    if proc.returncode != 0:
        pytest.fail(f"cases.py {command} exited {proc.returncode}:\n{proc.stderr[-6000:]}")
    return json.loads(proc.stdout)


def neuron_run(root: Path, name: str, overrides: Sequence[str] = ()) -> tuple[RunPaths, Any, Plan]:
    """A run dir for the seed Trainium example (workdir under root), as `hyperjob submit` would make it."""
    cfg = load_config(SEED, overrides=[f"workdir={root}", *overrides])
    paths = RunPaths(root / "runs" / name)
    paths.run_dir.mkdir(parents=True)
    paths.config.write_text(dump_config(cfg), encoding="utf-8")
    return paths, cfg, make_plan(cfg)


def print_args(paths: RunPaths) -> dict[str, Any]:
    """What the train entry prints with --print-args (and passes upstream)."""
    proc = subprocess.run(
        [sys.executable, "-m", "hyperjob.stages.train", "--run-dir", str(paths.run_dir), "--print-args"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO_ROOT,
    )
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def failure(result: dict[str, Any]) -> str:
    return f"{result.get('error_type')}: {result.get('error')}\n{result.get('where', '')}"


# --- 1. NeuronSFTConfig -----------------------------------------------------------------------------------------------

LAYOUTS = [(tp, pp) for tp in (4, 8, 32) for pp in (1, 2)]
SFT_CASES = ["seed", "seed-compile", *(f"tp{tp}-pp{pp}" for tp, pp in LAYOUTS)]


@pytest.fixture(scope="module")
def sft(neuron_python: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """{"plans", "arguments", "results"}: every case through one NeuronSFTConfig process."""
    root = tmp_path_factory.mktemp("sft")
    runs: dict[str, tuple[RunPaths, Any, Plan, bool]] = {}
    paths, cfg, plan = neuron_run(root, "seed")
    runs["seed"] = (paths, cfg, plan, False)
    runs["seed-compile"] = (paths, cfg, plan, True)
    for tp, pp in LAYOUTS:
        nodes = max(1, tp * pp // CORES_PER_NODE)
        overrides = [f"parallel.tensor={tp}", f"parallel.pipeline={pp}", f"cluster.nodes={nodes}"]
        paths, cfg, plan = neuron_run(root, f"tp{tp}-pp{pp}", overrides)
        runs[f"tp{tp}-pp{pp}"] = (paths, cfg, plan, False)

    arguments = {name: train_arguments(p, c, compile_only) for name, (p, c, _, compile_only) in runs.items()}
    cases = []
    for name, (_, _, plan, _) in runs.items():
        a = arguments[name]
        assert plan.model is not None
        cases.append(
            {
                "name": name,
                "world": plan.world_size,
                "kwargs": a["trainer_config"],
                "expected": a["expected_trn_config"],
                "num_key_value_heads": plan.model.num_key_value_heads,
            }
        )
    seed = arguments["seed"]
    # Proof the check can fail: one misspelled keyword, and a world too small for the seed's TP.
    misspelled = dict(seed["trainer_config"])
    misspelled["tensor_paralel_size"] = misspelled.pop("tensor_parallel_size")
    cases.append({"name": "misspelled", "world": runs["seed"][2].world_size, "kwargs": misspelled})
    cases.append({"name": "world-too-small", "world": 4, "kwargs": seed["trainer_config"]})
    results = run_cases(neuron_python, "sft", {"cases": cases}, root)["results"]
    return {"runs": runs, "arguments": arguments, "results": results}


@pytest.mark.parametrize("name", SFT_CASES)
def test_neuron_sft_config_takes_our_trainer_config(sft: dict[str, Any], name: str) -> None:
    result = sft["results"][name]
    assert result["ok"], failure(result)
    _, cfg, plan, compile_only = sft["runs"][name]
    expected = sft["arguments"][name]["expected_trn_config"]
    trn = result["trn_config"]
    assert {k: trn[k] for k in expected} == expected
    assert trn["check_trn_config"] is None  # the entry's own check agrees
    assert (trn["tensor_parallel_size"], trn["pipeline_parallel_size"]) == (plan.tensor, plan.pipeline)
    assert trn["data_parallel_size"] == plan.data
    # Upstream folds gradient accumulation into the micro batch under PP; the global batch must not change.
    assert result["train_batch_size"] * result["gradient_accumulation_steps"] == plan.global_batch
    assert result["max_length"] == cfg.training.seq_len
    assert result["padding_free"] is False and result["packing"] is False
    assert trn["gradient_checkpointing"] is cfg.training.gradient_checkpointing
    assert trn["fuse_qkv"] is False  # neuron_targets models only the GQA fusion, not fuse_qkv's
    if compile_only:
        assert result["max_steps"] == 10
    if expected["kv_size_multiplier"] is not None:
        auto = trn["auto_kv_size_multiplier"]  # what the model classes infer must match what we pass
        assert auto["ok"] and auto["value"] == expected["kv_size_multiplier"], auto


def test_seed_print_args_is_what_we_construct(sft: dict[str, Any]) -> None:
    paths = sft["runs"]["seed"][0]
    assert print_args(paths) == sft["arguments"]["seed"]
    assert sft["arguments"]["seed"]["trainer_config"]["tensor_parallel_size"] == 8


def test_a_misspelled_keyword_fails(sft: dict[str, Any]) -> None:
    result = sft["results"]["misspelled"]
    assert not result["ok"] and result["error_type"] == "TypeError", result
    assert "tensor_paralel_size" in result["error"]


def test_a_world_too_small_for_tp_fails(sft: dict[str, Any]) -> None:
    """The faked NxD world is honoured, so the cases above really ran at the plan's world size."""
    result = sft["results"]["world-too-small"]
    assert not result["ok"] and "not divisible" in result["error"], result


# --- 2. LoRA targets --------------------------------------------------------------------------------------------------

# (heads, kv_heads, tp): fused q/k/v (GQA, KV < TP) and unfused layouts, in tiny and Llama-3-8B head counts.
BUILDABLE = {
    "gqa-tp4": (4, 2, 4),
    "gqa-tp6": (6, 2, 6),
    "gqa-tp8": (8, 2, 8),
    "llama3-tp32": (32, 8, 32),
    "unfused-tp1": (4, 2, 1),
    "unfused-tp2": (4, 2, 2),
    "mha-tp4": (4, 4, 4),
    "llama3-tp8": (32, 8, 8),
}
# Layouts upstream cannot build: KV heads >= TP but not divisible, TP not a multiple of KV, heads not divisible.
UNBUILDABLE = {"kv3-tp2": (6, 3, 2), "kv4-tp6": (12, 4, 6), "heads4-tp8": (4, 2, 8)}
TARGETS: dict[str, list[str]] = {
    "seven": list(LLAMA_LINEARS),
    "q-v": ["q_proj", "v_proj"],
    "q-k-v": ["q_proj", "k_proj", "v_proj"],
    "gate-no-up": ["gate_proj", "down_proj"],
    "up-no-gate": ["up_proj"],
    "gate-up": ["gate_proj", "up_proj"],
    "q-k-no-v": ["q_proj", "k_proj", "o_proj"],
    "all-linear": ["all-linear"],
    "o": ["o_proj"],
    "down": ["down_proj"],
}
TARGET_CASES = [f"{layout}/{entry}" for layout in BUILDABLE for entry in TARGETS]


def facts_of(layout: tuple[int, int, int]) -> ModelFacts:
    return ModelFacts(num_attention_heads=layout[0], num_key_value_heads=layout[1])


def ours(targets: list[str], layout: tuple[int, int, int]) -> tuple[str, ...] | ConfigError:
    try:
        return neuron_targets(targets, facts_of(layout), layout[2])
    except ConfigError as e:
        return e


@pytest.fixture(scope="module")
def targets(neuron_python: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    layouts = {**BUILDABLE, **UNBUILDABLE}
    request: dict[str, Any] = {
        "layouts": [{"name": n, "heads": h, "kv_heads": kv, "tp": tp} for n, (h, kv, tp) in layouts.items()],
        "cases": [],
    }
    for layout, shape in BUILDABLE.items():
        for entry, listed in TARGETS.items():
            # What a user writes; "all-linear" reaches peft as a plain string (transformers/peft convention).
            raw: list[str] | str = "all-linear" if listed == ["all-linear"] else listed
            request["cases"].append({"name": f"{layout}/{entry}", "layout": layout, "targets": raw})
            mine = ours(listed, shape)
            if isinstance(mine, tuple) and list(mine) != listed:  # upstream must take what we rewrite it to
                request["cases"].append({"name": f"{layout}/{entry}/ours", "layout": layout, "targets": list(mine)})
    return run_cases(neuron_python, "targets", request, tmp_path_factory.mktemp("targets"))


def missing_named_by_upstream(message: str) -> list[str]:
    found = re.search(r"missing: ([\w, ]+)\.", message)
    return found.group(1).split(", ") if found else []


@pytest.mark.parametrize("case", TARGET_CASES)
def test_neuron_targets_agree_with_upstream(targets: dict[str, Any], case: str) -> None:
    layout, entry = case.split("/")
    listed = TARGETS[entry]
    mine = ours(listed, BUILDABLE[layout])
    upstream = targets["results"][case]
    if entry == "all-linear":
        # Upstream crashes on the string; we expand it, and upstream takes the expansion.
        assert upstream["error_type"] == "AttributeError", upstream
        assert mine == LLAMA_LINEARS
        expanded = targets["results"][f"{case}/ours"]
        assert expanded["ok"], failure(expanded)
        return
    if upstream["ok"]:
        assert not isinstance(mine, ConfigError), f"ours refuses what upstream takes: {mine.lines()} / {upstream}"
        assert list(mine) == listed  # nothing rewritten behind the user's back
        assert upstream["lora_modules"] == upstream["adapted"]  # and LoRA landed exactly on the adapted modules
        assert 0 < upstream["trainable"] < upstream["total"]
    else:
        assert upstream["error_type"] == "ValueError", failure(upstream)
        assert isinstance(mine, ConfigError), f"ours takes {mine} but upstream refuses: {upstream['error']}"
        lines = "\n".join(mine.lines())
        assert {key for key, _ in mine.problems} == {"lora.target_modules"}
        for name in missing_named_by_upstream(upstream["error"]):
            assert name in lines, f"upstream names {name} as missing; ours says: {lines}"


@pytest.mark.parametrize("layout", [*BUILDABLE, *UNBUILDABLE])
def test_layout_rules_match_upstream_model(targets: dict[str, Any], layout: str) -> None:
    """Our fused-q/k/v rule and the planner's KV-head replication are what the real training Llama builds; the
    layouts the planner refuses are the ones upstream cannot build."""
    shape = {**BUILDABLE, **UNBUILDABLE}[layout]
    upstream = targets["layouts"][layout]
    try:
        multiplier = head_checks(shape[2], shape[2], facts_of(shape))
    except ConfigError as e:
        assert not upstream["ok"], f"planner refuses {layout} ({e.lines()}) but upstream builds it: {upstream}"
        return
    assert upstream["ok"], f"planner accepts {layout} but upstream cannot build it: {failure(upstream)}"
    assert upstream["qkv_fused"] == qkv_fused(facts_of(shape), shape[2]) == (multiplier is not None)
    assert upstream["kv_size_multiplier"] == (multiplier or 1)
    fused = {"o_proj", "qkv_proj"}
    assert set(upstream["attention_modules"]) == (fused if multiplier else {"q_proj", "k_proj", "v_proj", "o_proj"})


# --- 3. the training model, loaded and wrapped ------------------------------------------------------------------------

MODEL_RUNS = {"tp1": 1, "tp4": 4}  # TP 4 with 2 KV heads: the fused GQA layer, KV heads replicated twice


@pytest.fixture(scope="module")
def model(neuron_python: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("model")
    tiny = run_cases(neuron_python, "tiny", {"out": str(root / "tiny-llama")}, root)["path"]
    runs: dict[str, tuple[Any, Plan, dict[str, Any]]] = {}
    for name, tp in MODEL_RUNS.items():
        overrides = [f"model.id={tiny}", f"parallel.tensor={tp}", "training.seq_len=256"]
        paths, cfg, plan = neuron_run(root, name, overrides)
        runs[name] = (cfg, plan, print_args(paths))
    cases = [{"name": name, "world": plan.world_size, "arguments": a} for name, (_, plan, a) in runs.items()]
    return {"runs": runs, "results": run_cases(neuron_python, "model", {"cases": cases}, root)["results"]}


@pytest.mark.parametrize("name", list(MODEL_RUNS))
def test_training_model_loads_and_lora_applies(model: dict[str, Any], name: str) -> None:
    result = model["results"][name]
    assert result["ok"], failure(result)
    _, plan, arguments = model["runs"][name]
    assert arguments["model_loader"]["class"] == "optimum.neuron.models.training.NeuronModelForCausalLM"
    assert result["model_class"].startswith("optimum.neuron.models.training.")
    assert result["param_dtype"] == "torch.bfloat16"
    assert result["trn_config"]["kv_size_multiplier"] == plan.kv_size_multiplier
    attention = {"qkv_proj", "o_proj"} if plan.kv_size_multiplier else {"q_proj", "k_proj", "v_proj", "o_proj"}
    assert set(result["attention_modules"]) == attention
    # The seven projections, as upstream's fused layers name them.
    assert set(result["adapted_targets"]) == attention | {"gate_up_proj", "down_proj"}
    counts = result["get_peft_model"]
    assert 0 < counts["trainable"] < counts["total"], counts


@pytest.mark.parametrize("name", list(MODEL_RUNS))
def test_neuron_sft_trainer_wraps_the_model_as_the_entry_does(model: dict[str, Any], name: str) -> None:
    """hyperjob/stages/train_neuron.py hands LoRA to NeuronSFTTrainer(peft_config=...), with our trainer_config.

    Upstream 0.4.5 trap (sft_trainer.py, __init__): with gradient_checkpointing on, it reads
    args.gradient_checkpointing_kwargs with no None default and raises TypeError unless the config sets it."""
    result = model["results"][name]
    assert result["ok"], failure(result)
    trainer = result["trainer"]
    assert trainer["ok"], failure(trainer)
    assert trainer["model_class"] == "NeuronPeftModelForCausalLM"
    assert (trainer["trainable"], trainer["total"]) == (
        result["get_peft_model"]["trainable"],
        result["get_peft_model"]["total"],
    )
    # Every batch has the compiled shape: 16-token examples padded to exactly max_length (training.seq_len=256).
    shapes = trainer["batch_shapes"]
    assert shapes == {"input_ids": [2, 256], "labels": [2, 256], "attention_mask": [2, 256]}, shapes


@pytest.mark.parametrize("name", list(MODEL_RUNS))
def test_lora_check_refuses_the_bare_model(model: dict[str, Any], name: str) -> None:
    result = model["results"][name]
    assert result["ok"], failure(result)
    assert result["bare_check"] is not None and "all" in result["bare_check"], result["bare_check"]
