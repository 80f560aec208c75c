"""Backend torchneuron (TorchNeuron: native PyTorch on device "neuron", trn2/trn3), as far as a CPU machine allows.

What runs here: the planner's rules and messages, `hyperjob env` for its pinned set, the train arguments, the
rendered train script run by real bash against recording stand-ins (tests/standins), the train entry's refusal of a
drifted environment, and the device binding against a fake "neuron" device registered through PyTorch's own
PrivateUse1 mechanism (rename_privateuse1_backend + _register_device_module) in a child process. What does not:
any TorchNeuron kernel, collective or compile; those need trn2 hardware (README).
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from run_helpers import hyperjob
from test_trainium_scripts import SECRET, Rig, print_args

from hyperjob import backends
from hyperjob.backends.neuron_env import NEURON_INDEX_URL, TORCHNEURON
from hyperjob.config.load import ConfigError, load_config
from hyperjob.plan.planner import make_plan

REPO = Path(__file__).resolve().parents[1]
EXAMPLE = REPO / "examples" / "trn2-llama3-8b.yaml"
PINNED = ["workdir=/shared/work", "environment.python=/opt/venv/bin/python"]


def plan_of(*overrides: str):  # type: ignore[no-untyped-def]
    return make_plan(load_config(EXAMPLE, [*PINNED, *overrides], check_inputs=False))


def test_plan_one_process_per_logical_core_no_compile_stage() -> None:
    plan = plan_of()
    assert (plan.backend, plan.procs_per_node, plan.world_size, plan.data) == ("torchneuron", 64, 64, 64)
    assert plan.stages == ("download", "train", "merge", "evaluate")
    small = plan_of("cluster.instance_type=trn2.3xlarge", "parallel.mode=ddp")
    assert small.procs_per_node == 4


@pytest.mark.parametrize("instance", ["trn1.32xlarge", "ml.trn1n.32xlarge", "trn1.2xlarge"])
def test_trn1_is_refused_pointing_to_backend_neuron(instance: str) -> None:
    with pytest.raises(ConfigError) as err:
        plan_of(f"cluster.instance_type={instance}")
    msg = str(err.value)
    assert "cluster.instance_type" in msg and "NeuronCore-v2" in msg and "backend: neuron" in msg


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("parallel.mode=deepspeed-zero3", "parallel.mode"),
        ("parallel.tensor=8", "parallel.tensor"),
        ("model.quantize=nf4", "model.quantize"),
        ("training.loss=liger", "training.loss"),
        ("cluster.instance_type=p5.48xlarge", "cluster.instance_type"),
    ],
)
def test_what_it_cannot_do_is_refused_by_key(override: str, key: str) -> None:
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        plan_of(override)


def test_fsdp2_is_allowed_on_neuron_and_still_refused_on_cpu() -> None:
    from hyperjob.backends.parallel_modes import mode_problems

    assert mode_problems("fsdp2", "neuron", 64, "none") == []
    assert mode_problems("fsdp2", "cpu", 2, "none") and mode_problems("deepspeed-zero2", "neuron", 64, "none")


def test_train_arguments_leave_the_device_and_group_to_the_entry(tmp_path: Path) -> None:
    """bf16 on, no use_cpu, no ddp_backend (transformers has no "neuron" choice; stages.device starts the group),
    FSDP2 through accelerate, and training.torch_compile passed on for transformers to pick the neuron compiler."""
    rig = Rig(tmp_path, example=EXAMPLE).install()
    args = print_args(rig.render("args"))
    trainer = args["trainer_config"]
    assert args["backend"] == "torchneuron" and trainer["bf16"] is True
    assert "use_cpu" not in trainer and "ddp_backend" not in trainer and "torch_compile" not in trainer
    assert trainer["fsdp"] and args["model_loader"]["kwargs"]["dtype"] == "bfloat16"
    compiled = print_args(rig.render("compiled", "training.torch_compile=true"))
    assert compiled["trainer_config"]["torch_compile"] is True
    runtime = backends.get("torchneuron").runtime
    assert (runtime.device, runtime.distributed, runtime.device_module) == ("neuron", "neuron", "torch_neuronx")


def test_rendered_train_script_under_recording_stand_ins(tmp_path: Path) -> None:
    """64 processes on the node through torchrun from the TorchNeuron venv, FSDP2 and the shared graph cache in the
    environment, EFA settings, and the hub token nowhere: not in argv, env, logs or scripts."""
    rig = Rig(tmp_path, example=EXAMPLE).install()
    run_dir = rig.render("train", f"environment.train_python={rig.python}")
    res = rig.run(run_dir, "train")
    assert res.proc.returncode == 0, res.output
    torchrun = res.only("torchrun")
    assert torchrun["argv0"] == str(rig.python)
    assert torchrun["argv"] == [
        "-m", "torch.distributed.run", "--nproc_per_node=64", "--nnodes=1", "--standalone",
        "-m", "hyperjob.stages.train", "--run-dir", str(run_dir),
    ]  # fmt: skip
    env = torchrun["env"]
    assert env["ACCELERATE_USE_FSDP"] == "true" and env["FI_PROVIDER"] == "efa"
    assert env["TORCH_NEURONX_NEFF_CACHE_DIR"].startswith(str(rig.work))
    assert "NEURON_EXTRACT_GRAPHS_ONLY" not in env and not res.calls("neuron_parallel_compile")
    for call in res.records:
        assert "HF_TOKEN" not in call["env"] and SECRET not in json.dumps(call)
    assert SECRET not in res.output and SECRET not in res.log.read_text()
    for path in [*(run_dir / "scripts").iterdir(), run_dir / "config.yaml"]:
        assert SECRET not in path.read_text(), path
    assert {p.name.split("-", 1)[1] for p in (run_dir / "scripts").glob("*.sbatch")} == {
        "download.sbatch", "train.sbatch", "merge.sbatch", "evaluate.sbatch"
    }  # fmt: skip


def test_env_dry_run_builds_the_torchneuron_set(tmp_path: Path) -> None:
    venv_py = tmp_path / "venv-torchneuron" / "bin" / "python"
    out = hyperjob("env", str(EXAMPLE), "--set", f"workdir={tmp_path}", "--set", f"environment.train_python={venv_py}",
                   "--dry-run", timeout=120)  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert "TorchNeuron's Neuron 2.33 set" in out.stdout
    assert f"--extra-index-url {NEURON_INDEX_URL}" in out.stdout and "download.pytorch.org/whl/cpu" in out.stdout
    for req in TORCHNEURON.requirements():
        assert req in out.stdout
    assert "python3.12 -m venv" in out.stdout or "python3 -m venv" in out.stdout
    assert list(tmp_path.iterdir()) == []


def test_train_entry_refuses_a_drifted_environment(tmp_path: Path) -> None:
    """This machine has torch 2.13 but no torch-neuronx: the entry says so in one line, before importing torch."""
    from hyperjob.paths import RunPaths
    from hyperjob.stages.common import StageError
    from hyperjob.stages.train import train

    cfg = load_config(EXAMPLE, [f"workdir={tmp_path}", "environment.python=/opt/venv/bin/python"], check_inputs=False)
    with pytest.raises(StageError, match=r"torch-neuronx is not installed, TorchNeuron's Neuron 2\.33 set needs"):
        train(RunPaths(tmp_path / "runs" / "r"), cfg)


FAKE_NEURON = """
import json, os, sys, types
import torch, torch.distributed as dist

calls = []

class FakeNeuron:  # what torch_neuronx registers as torch.neuron, reduced to what binding a rank uses
    @staticmethod
    def is_available(): return True
    @staticmethod
    def device_count(): return int(os.environ["FAKE_CORES"])
    @staticmethod
    def set_device(i): calls.append(["set_device", i])
    @staticmethod
    def current_device(): return calls[-1][1] if calls else 0

def fake_import():  # importing the device package registers the device, as torch_neuronx does
    torch.utils.rename_privateuse1_backend("neuron")
    torch._register_device_module("neuron", FakeNeuron)
    calls.append(["import", "torch_neuronx"])

module = types.ModuleType("torch_neuronx")
sys.modules["torch_neuronx"] = module
fake_import()
dist.init_process_group = lambda backend=None, **kw: calls.append(["init_process_group", backend])
dist.is_initialized = lambda: any(c[0] == "init_process_group" for c in calls)

from hyperjob import backends
from hyperjob.stages.device import bind

device = bind(backends.get("torchneuron").runtime)
cpu = bind(backends.get("cpu").runtime)
print(json.dumps({"device": str(device), "cpu": cpu, "calls": calls}))
"""


@pytest.mark.parametrize(("cores", "local_rank", "world", "index"), [(64, 5, 64, 5), (1, 5, 64, 0), (4, 2, 1, 2)])
def test_device_binding_on_a_fake_privateuse1_neuron_device(
    cores: int, local_rank: int, world: int, index: int
) -> None:
    """The group first (with backend "neuron", only when distributed), then local_rank % visible cores."""
    env = {"FAKE_CORES": str(cores), "LOCAL_RANK": str(local_rank), "WORLD_SIZE": str(world), "PATH": "/usr/bin"}
    out = subprocess.run([sys.executable, "-c", textwrap.dedent(FAKE_NEURON)], capture_output=True, text=True,
                         timeout=120, env=env, cwd=REPO)  # fmt: skip
    assert out.returncode == 0, out.stderr
    got = json.loads(out.stdout.splitlines()[-1])
    assert got["device"] == f"neuron:{index}" and got["cpu"] is None
    expected = [["import", "torch_neuronx"]] + [["init_process_group", "neuron"]] * (world > 1)
    assert got["calls"] == [*expected, ["set_device", index]]


def test_device_binding_names_a_missing_device_package() -> None:
    from hyperjob.stages.common import StageError
    from hyperjob.stages.device import bind

    with pytest.raises(StageError, match=r"needs the torch_neuronx package.*hyperjob env CONFIG"):
        bind(backends.get("torchneuron").runtime, local_rank=0, world_size=1)
