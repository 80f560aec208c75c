"""The rendered Trainium compile and train scripts, run by real bash against recording stand-ins.

The golden files pin the scripts' text; these tests pin what that text *does*: which srun and torchrun command
lines a step really gets, with which environment, where the rendezvous lands when HyperPod replaced a node, when
--auto-resume is added, and how the compile stage skips, recompiles or fails on the shared compile cache. The
stand-ins (tests/standins/standin.py) log every call as JSON; hyperjob's own compile_cache module runs for real.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[1]
EXAMPLE = REPO / "examples" / "trainium-llama3-8b.yaml"
STANDIN = Path(__file__).resolve().parent / "standins" / "standin.py"
MODEL_SLUG = "meta-llama--Meta-Llama-3-8B"
FAKE_MODEL_CONFIG = {"architectures": ["LlamaForCausalLM"], "num_hidden_layers": 32, "num_key_value_heads": 8}
SECRET = "hf_StandinSecretValue7f3a9c1e"  # what a job inherits as HF_TOKEN; must never reach a step
JOB_ID = 4242
RDZV_PORT = 20000 + JOB_ID % 20000
SCRIPT_TIMEOUT_S = 180
SILENT_FAILURE = "failed silently"

# Entered with `unshare --mount`: /opt becomes a tmpfs holding the real /opt's entries (bound back, so an
# interpreter under /opt still works) and, only if asked, an empty sagemaker_cluster dir. The real /opt is untouched.
OPT_SETUP = r"""
set -eu
orig=$1 with_dir=$2
shift 2
mount --make-rprivate /
mount --rbind /opt "$orig"
mount -t tmpfs hyperjob-test-opt /opt
for entry in "$orig"/* "$orig"/.[!.]*; do
  name=${entry##*/}
  if [ "$name" = sagemaker_cluster ]; then continue; fi
  if [ -L "$entry" ]; then cp -P "$entry" "/opt/$name"
  elif [ -d "$entry" ]; then mkdir "/opt/$name"; mount --rbind "$entry" "/opt/$name"
  elif [ -e "$entry" ]; then touch "/opt/$name"; mount --bind "$entry" "/opt/$name"
  fi
done
if [ "$with_dir" = 1 ]; then mkdir /opt/sagemaker_cluster; fi
exec "$@"
"""


@dataclass(frozen=True)
class ScriptRun:
    """One `bash SCRIPT`: its exit, its output, every stand-in call it made and the outcome record it left."""

    proc: subprocess.CompletedProcess[str]
    records: list[dict[str, Any]]
    outcome: dict[str, str]
    log: Path

    @property
    def output(self) -> str:
        return self.proc.stdout + self.proc.stderr

    def calls(self, tool: str) -> list[dict[str, Any]]:
        return [r for r in self.records if r["tool"] == tool]

    def only(self, tool: str) -> dict[str, Any]:
        calls = self.calls(tool)
        assert len(calls) == 1, f"expected one {tool} call, got {len(calls)}:\n{self.output}"
        return calls[0]


@dataclass
class Rig:
    """A fake cluster for one test: stand-in srun/scontrol first on PATH, a stand-in Neuron venv, one workdir."""

    root: Path
    runs: int = 0  # script runs so far: numbers the stand-in logs
    example: Path = EXAMPLE  # the config rendered (tests of other Trainium backends pass theirs)

    @property
    def bin(self) -> Path:
        return self.root / "bin"

    @property
    def python(self) -> Path:
        return self.root / "venv" / "bin" / "python"

    @property
    def work(self) -> Path:
        return self.root / "work"

    @property
    def cache(self) -> Path:
        return self.work / "neuron_compile_cache" / MODEL_SLUG

    def install(self) -> Rig:
        for path, tool in (
            (self.bin / "srun", "srun"),
            (self.bin / "scontrol", "scontrol"),
            (self.python, "python"),
            (self.python.parent / "neuron_parallel_compile", "neuron_parallel_compile"),
        ):
            path.parent.mkdir(parents=True, exist_ok=True)
            quoted = " ".join(shlex.quote(w) for w in (sys.executable, str(STANDIN), tool))
            path.write_text(f'#!/bin/bash\nexec {quoted} "$0" "$@"\n')  # dash would drop the exported function
            path.chmod(0o755)
        model = self.work / "models" / MODEL_SLUG / "config.json"  # what the download stage would have left
        model.parent.mkdir(parents=True)
        model.write_text(json.dumps(FAKE_MODEL_CONFIG))
        return self

    def render(self, name: str, *overrides: str) -> Path:
        """Render the example into runs/NAME (`--set` OVERRIDES), HF_TOKEN set as in a login shell."""
        out = self.root / "runs" / name
        sets = [f"workdir={self.work}", f"environment.python={self.python}", *overrides]
        proc = subprocess.run(
            [sys.executable, "-m", "hyperjob", "render", str(self.example), "--out", str(out)]
            + [w for o in sets for w in ("--set", o)],
            capture_output=True, text=True, timeout=120, env={**os.environ, "HF_TOKEN": SECRET},
        )  # fmt: skip
        assert proc.returncode == 0, proc.stderr
        return out

    def run(
        self,
        run_dir: Path,
        stage: str,
        *,
        nodelist: str | None = "trn-1",
        step_nodelist: str | None = None,
        neffs: int = 2,
        wrap: tuple[str, ...] = (),
        extra_env: dict[str, str] | None = None,
    ) -> ScriptRun:
        """Run the stage's script as Slurm would start it (job id, node list, inherited HF_TOKEN) and check that
        its outcome record states the exit code bash really returned."""
        (script,) = (run_dir / "scripts").glob(f"*-{stage}.sbatch")
        self.runs += 1
        log = self.root / "standin-logs" / f"{self.runs:02d}-{run_dir.name}-{stage}.jsonl"
        log.parent.mkdir(exist_ok=True)
        log.touch()
        env = {
            k: v
            for k, v in os.environ.items()
            if not k.startswith(("SLURM_", "HJ_")) and k not in ("HYPERJOB_EXECUTOR", "HF_TOKEN")
        }
        env.update(
            PATH=f"{self.bin}{os.pathsep}{os.environ['PATH']}",
            SLURM_JOB_ID=str(JOB_ID),
            HF_TOKEN=SECRET,
            HJ_STANDIN_LOG=str(log),
            HJ_NEFFS=str(neffs),
        )
        if nodelist is not None:
            env["SLURM_JOB_NODELIST"] = nodelist
        if step_nodelist is not None:
            env["HJ_STEP_NODELIST"] = step_nodelist
        env.update(extra_env or {})
        proc = subprocess.run(
            [*wrap, "bash", str(script)], capture_output=True, text=True, timeout=SCRIPT_TIMEOUT_S, env=env
        )
        records = [json.loads(line) for line in log.read_text().splitlines()]
        outcome_file = run_dir / "outcomes" / f"{script.stem}.outcome"
        assert outcome_file.is_file(), f"{script.name} left no outcome record:\n{proc.stdout}{proc.stderr}"
        outcome = dict(line.split("=", 1) for line in outcome_file.read_text().splitlines())
        assert outcome.get("exit_code") == str(proc.returncode), (outcome, proc.stdout + proc.stderr)
        assert outcome["job_id"] == str(JOB_ID)
        return ScriptRun(proc, records, outcome, log)


@pytest.fixture
def rig(tmp_path: Path) -> Rig:
    return Rig(tmp_path).install()


def cache_dir_of(env: dict[str, str]) -> str:
    (flag,) = [w for w in shlex.split(env["NEURON_CC_FLAGS"]) if w.startswith("--cache_dir=")]
    return flag.split("=", 1)[1]


def neffs_in(cache: Path) -> set[Path]:
    return set(cache.rglob("*.neff"))


def print_args(run_dir: Path, *flags: str) -> dict[str, Any]:
    proc = subprocess.run(
        [sys.executable, "-m", "hyperjob.stages.train", "--run-dir", str(run_dir), "--print-args", *flags],
        capture_output=True, text=True, timeout=120, cwd=run_dir,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def test_one_node_train_step_gets_the_planned_torchrun_and_the_shared_cache(rig: Rig) -> None:
    """The step must start 32 processes on one node, train (not compile), and read the cache compile filled."""
    run_dir = rig.render("train")
    res = rig.run(run_dir, "train")
    assert res.proc.returncode == 0, res.output

    hyperpod = Path("/opt/sagemaker_cluster").is_dir()  # this host's own /opt decides; test 2 pins both cases
    srun = res.only("srun")
    expected_srun = ["--nodes=1", "--ntasks-per-node=1", "--kill-on-bad-exit=1"] + ["--auto-resume=1"] * hyperpod
    assert srun["argv"] == [*expected_srun, "bash", "-c", "hyperjob_step"]

    torchrun = res.only("torchrun")
    assert torchrun["argv0"] == str(rig.python)
    assert torchrun["argv"] == [
        "-m", "torch.distributed.run", "--nproc_per_node=32", "--nnodes=1", "--standalone",
        "-m", "hyperjob.stages.train", "--run-dir", str(run_dir),
    ]  # fmt: skip
    assert "--compile" not in torchrun["argv"]
    env = torchrun["env"]
    assert env["NEURON_EXTRACT_GRAPHS_ONLY"] == "0"
    assert cache_dir_of(env) == str(rig.cache)
    assert env["HYPERJOB_STAGE"] == "train"
    assert torchrun["cwd"] == str(run_dir)
    assert not res.calls("neuron_parallel_compile")
    assert "hyperjob: stage train finished" in res.proc.stdout


@pytest.mark.parametrize("hyperpod", [True, False], ids=["hyperpod", "plain-slurm"])
def test_auto_resume_only_where_sagemaker_cluster_exists(rig: Rig, hyperpod: bool) -> None:
    """--auto-resume=1 is a HyperPod srun option: on plain Slurm srun rejects it, so it must depend on the host."""
    if os.geteuid() != 0 or shutil.which("unshare") is None:
        pytest.skip("needs root and unshare to mount a private /opt")
    real_opt = sorted(p.name for p in Path("/opt").iterdir())
    run_dir = rig.render("resume")
    orig = rig.root / "real-opt"
    orig.mkdir()
    wrap = ("unshare", "--mount", "sh", "-c", OPT_SETUP, "opt-setup", str(orig), "1" if hyperpod else "0")
    res = rig.run(run_dir, "train", wrap=wrap)
    assert res.proc.returncode == 0, res.output

    srun_argv = res.only("srun")["argv"]
    assert ("--auto-resume=1" in srun_argv) == hyperpod, srun_argv
    assert srun_argv[-3:] == ["bash", "-c", "hyperjob_step"]
    assert res.only("torchrun")["argv"][:4] == ["-m", "torch.distributed.run", "--nproc_per_node=32", "--nnodes=1"]
    assert sorted(p.name for p in Path("/opt").iterdir()) == real_opt, "the test changed the real /opt"


def test_compile_step_runs_under_neuron_parallel_compile_extracting_graphs(rig: Rig) -> None:
    """The compile must be the training command, wrapped by the venv's neuron_parallel_compile, in extract mode."""
    run_dir = rig.render("compile")
    res = rig.run(run_dir, "compile")
    assert res.proc.returncode == 0, res.output

    srun = res.only("srun")
    assert srun["argv"] == ["--nodes=1", "--ntasks-per-node=1", "--kill-on-bad-exit=1", "bash", "-c", "hyperjob_step"]
    npc = res.only("neuron_parallel_compile")
    assert npc["argv0"] == str(rig.python.parent / "neuron_parallel_compile")  # not found on PATH: only by path
    torchrun_argv = [
        "-m", "torch.distributed.run", "--nproc_per_node=32", "--nnodes=1", "--standalone",
        "-m", "hyperjob.stages.train", "--run-dir", str(run_dir), "--compile",
    ]  # fmt: skip
    assert npc["argv"] == [str(rig.python), *torchrun_argv]
    torchrun = res.only("torchrun")
    assert torchrun["argv"] == torchrun_argv
    for call in (npc, torchrun):
        assert call["env"]["NEURON_EXTRACT_GRAPHS_ONLY"] == "1"
        assert cache_dir_of(call["env"]) == str(rig.cache)
        assert call["env"]["HYPERJOB_STAGE"] == "compile"
    assert len(neffs_in(rig.cache)) == 2
    assert "compiled 2 new graphs" in res.proc.stdout


def test_compile_arguments_write_into_compile_dir_for_ten_steps(rig: Rig) -> None:
    """A compile run is not a valid model: it must never write checkpoints/, which train resumes from."""
    run_dir = rig.render("args")
    compile_args = print_args(run_dir, "--compile")["trainer_config"]
    assert compile_args["output_dir"] == str(run_dir / "compile")
    assert compile_args["max_steps"] == 10
    train_args = print_args(run_dir)["trainer_config"]
    assert train_args["output_dir"] == str(run_dir / "checkpoints")
    assert train_args["max_steps"] != 10
    # Same graph shapes in both, or the compiled cache would not serve the training run.
    shape_keys = ("per_device_train_batch_size", "max_length", "tensor_parallel_size", "gradient_checkpointing")
    assert {k: compile_args[k] for k in shape_keys} == {k: train_args[k] for k in shape_keys}


@pytest.mark.parametrize(
    ("step_nodelist", "rdzv_host"),
    [("trn-3,trn-2", "trn-3"), (None, "trn-1")],
    ids=["node-1-replaced", "original-nodes"],
)
def test_two_node_rendezvous_resolved_inside_the_step(rig: Rig, step_nodelist: str | None, rdzv_host: str) -> None:
    """After HyperPod replaces a node, the re-run step must rendezvous on its own first host, not the dead one."""
    run_dir = rig.render("two", "cluster.nodes=2")
    res = rig.run(run_dir, "train", nodelist="trn-[1-2]", step_nodelist=step_nodelist)
    assert res.proc.returncode == 0, res.output

    assert res.only("srun")["argv"][:3] == ["--nodes=2", "--ntasks-per-node=1", "--kill-on-bad-exit=1"]
    scontrol = res.calls("scontrol")
    assert scontrol and all(c["argv"] == ["show", "hostnames", step_nodelist or "trn-[1-2]"] for c in scontrol)
    torchruns = res.calls("torchrun")
    assert len(torchruns) == 2, "one torchrun per node"
    for torchrun in torchruns:
        argv = torchrun["argv"]
        assert argv[:4] == ["-m", "torch.distributed.run", "--nproc_per_node=32", "--nnodes=2"]
        assert f"--rdzv_endpoint={rdzv_host}:{RDZV_PORT}" in argv
        assert "--rdzv_backend=c10d" in argv and f"--rdzv_id={JOB_ID}" in argv
        assert "--standalone" not in argv
        assert argv[-4:] == ["-m", "hyperjob.stages.train", "--run-dir", str(run_dir)]


def test_rendezvous_survives_scontrol_writing_after_head_exits(rig: Rig) -> None:
    """A large allocation's node list takes scontrol several writes; taking its first line must not kill the step."""
    run_dir = rig.render("two", "cluster.nodes=2")
    res = rig.run(run_dir, "train", nodelist="trn-[1-2]", extra_env={"HJ_SCONTROL_SLOW_WRITES": "1"})
    assert res.proc.returncode == 0, res.output
    assert len(res.calls("torchrun")) == 2


def test_two_node_stage_refuses_to_run_outside_an_allocation(rig: Rig) -> None:
    """Without a node list each node would rendezvous with itself and train alone: refuse, saying why."""
    run_dir = rig.render("two", "cluster.nodes=2")
    res = rig.run(run_dir, "train", nodelist=None)
    assert res.proc.returncode != 0
    assert "must run inside a Slurm allocation" in res.proc.stderr
    assert not res.calls("srun") and not res.calls("torchrun")
    assert res.outcome["exit_code"] == str(res.proc.returncode)


def test_hf_token_reaches_no_step_and_no_script(rig: Rig) -> None:
    """The hub token is for the download stage only: a compile or train step (and its logs) must not see it."""
    run_dir = rig.render("token")
    runs = [rig.run(run_dir, "compile"), rig.run(run_dir, "train")]
    for res in runs:
        assert res.proc.returncode == 0, res.output
        assert res.calls("srun") and res.calls("torchrun"), "nothing recorded: the check below would prove nothing"
        for call in res.records:
            assert "HF_TOKEN" not in call["env"], call["tool"]
        assert SECRET not in res.log.read_text()
        assert SECRET not in res.output
    for path in [*(run_dir / "scripts").iterdir(), run_dir / "config.yaml"]:
        assert SECRET not in path.read_text(), path


def test_compile_skipped_when_cached_and_rerun_when_shapes_change(rig: Rig) -> None:
    """Two submits with the same shapes compile once (a compile takes 30-60 min); a changed seq_len recompiles."""
    first = rig.run(rig.render("first"), "compile")
    assert first.proc.returncode == 0, first.output
    assert first.only("neuron_parallel_compile")
    compiled = neffs_in(rig.cache)
    assert len(compiled) == 2

    second = rig.run(rig.render("second"), "compile")
    assert second.proc.returncode == 0, second.output
    assert second.records == [], "an up-to-date cache must not start srun, neuron_parallel_compile or torchrun"
    assert "hyperjob: stage compile skipped: the cache is up to date" in second.proc.stdout
    assert "nothing to compile" in second.proc.stdout
    assert neffs_in(rig.cache) == compiled

    longer = rig.run(rig.render("longer", "training.seq_len=1024"), "compile")
    assert longer.proc.returncode == 0, longer.output
    assert longer.only("neuron_parallel_compile")
    assert "seq_len 2048 -> 1024" in longer.proc.stdout
    assert len(neffs_in(rig.cache) - compiled) == 2


def test_compile_that_writes_no_neff_fails_the_stage(rig: Rig) -> None:
    """neuron_parallel_compile can exit 0 having compiled nothing; the stage must fail instead of passing it on."""
    res = rig.run(rig.render("silent"), "compile", neffs=0)
    assert res.only("neuron_parallel_compile"), "the compile ran and exited 0; only finish can catch it"
    assert res.proc.returncode == 2, res.output
    assert SILENT_FAILURE in res.output
    assert res.outcome["exit_code"] == "2"
    assert "hyperjob: stage compile finished" not in res.proc.stdout
    assert not neffs_in(rig.cache)
