"""Multi-node for real: a two-node Slurm (tests/fixtures_slurm2.py), each node its own host in a network namespace.

A job's step runs on both nodes; the tiny pipeline trains with 2 nodes x 2 processes, rendezvousing on the
allocation's first node, and ends with the same adapter as 1 node x 4 processes with the same seed: data-parallel
training is the same computation however the 4 ranks are spread over hosts. About a minute and a half on 2 cores.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from fixtures_slurm2 import Slurm2Cluster
from run_helpers import config, hyperjob, only_run_dir

from hyperjob.config.load import load_resolved
from hyperjob.paths import RunPaths, base_model_dir

pytestmark = [pytest.mark.slurm2, pytest.mark.slow]

SUBMIT_TIMEOUT_S = 600  # download + train of the tiny model take ~30 s; a loaded CI machine gets 20x that
# Same ranks, same data shards, same gloo all-reduce over 4 ranks: only float summation order could differ.
LOGITS_ATOL = 1e-5
TRAINING = {"max_steps": 4, "save_steps": 4, "logging_steps": 1, "warmup": 0, "seed": 1234}
# LOGLEVEL=INFO makes torchrun print its launch config (rdzv_endpoint) and each node's rendezvous result.
ENVIRONMENT = {"env": {"LOGLEVEL": "INFO"}}


def test_step_runs_on_both_nodes(tmp_path: Path, slurm2_cluster: Slurm2Cluster) -> None:
    out = tmp_path / "hostnames.out"
    script = tmp_path / "hostnames.sbatch"
    script.write_text(
        "#!/bin/bash\n"
        f"#SBATCH --partition={slurm2_cluster.partition}\n#SBATCH --nodes=2\n#SBATCH --ntasks-per-node=1\n"
        f"#SBATCH --time=2\n#SBATCH --output={out}\nset -e\n"
        "srun --nodes=2 --ntasks-per-node=1 hostname\n"
    )
    proc = slurm2_cluster.client("sbatch", "--wait", str(script), timeout=180)
    assert proc.returncode == 0, proc.stdout + proc.stderr + (out.read_text() if out.exists() else "")
    assert sorted(out.read_text().split()) == sorted(slurm2_cluster.nodes) == ["hj-n1", "hj-n2"]


@dataclass(frozen=True)
class Run:
    run_dir: Path
    manifest: dict[str, Any]
    summary: dict[str, Any]
    train_log: str


def submit_tiny(tmp_path: Path, cluster: Slurm2Cluster, nodes: int, per_node: int) -> Run:
    """download + train of the tiny example on the two-node cluster, waited for; workdir under tmp_path."""
    section = {"nodes": nodes, "devices_per_node": per_node, "partition": cluster.partition, "time": "00:15:00"}
    cfg = config(tmp_path, stages=["download", "train"], cluster=section, training=TRAINING, environment=ENVIRONMENT)
    try:
        proc = hyperjob("submit", str(cfg), "--scheduler", "slurm", "--wait", "--poll", "1", env=cluster.env,
                        timeout=SUBMIT_TIMEOUT_S)  # fmt: skip
    finally:
        cluster.cancel_all()  # after a timeout, no stage job may outlive the test (a module fixture runs this)
    run_dir = only_run_dir(tmp_path)
    manifest = json.loads((run_dir / "manifest.json").read_text())
    train = manifest["stages"][1]
    train_log = Path(train["log"]).read_text() if train.get("log") and Path(train["log"]).is_file() else ""
    assert proc.returncode == 0, proc.stdout + proc.stderr + train_log[-4000:]
    summary = json.loads((run_dir / "train_summary.json").read_text())
    return Run(run_dir, manifest, summary, train_log)


@pytest.fixture(scope="module")
def two_by_two(tmp_path_factory: pytest.TempPathFactory, slurm2_cluster: Slurm2Cluster) -> Run:
    return submit_tiny(tmp_path_factory.mktemp("two-by-two"), slurm2_cluster, nodes=2, per_node=2)


def test_trains_across_two_nodes(two_by_two: Run, slurm2_cluster: Slurm2Cluster) -> None:
    assert two_by_two.summary["world_size"] == 4
    assert two_by_two.summary["steps"] == TRAINING["max_steps"]
    train = two_by_two.manifest["stages"][1]
    assert (train["name"], train["state"]) == ("train", "COMPLETED")
    log = two_by_two.train_log
    first = slurm2_cluster.nodes[0]
    assert f"starting on {first} at" in log  # the batch script runs on the allocation's first node
    # One torchrun agent per node, both pointed at the first node (the port the rendered script derives from the
    # job id), both in a 2-node rendezvous whose master is that node.
    port = 20000 + int(train["job_id"]) % 20000
    assert re.findall(r"rdzv_endpoint\s*:\s*(\S+)", log) == [f"{first}:{port}"] * 2, log[-4000:]
    assert re.findall(r"master_addr=(\S+)", log) == [first] * 2, log[-4000:]
    assert re.findall(r"group_world_size=(\d+)", log) == ["2", "2"], log[-4000:]
    assert sorted(re.findall(r"group_rank=(\d+)", log)) == ["0", "1"], log[-4000:]


def _logits(run_dir: Path) -> tuple[Any, Any]:
    """(base, base + the run's adapter) logits of the run's own base model on a fixed prompt, float32 on CPU."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base_dir = base_model_dir(load_resolved(RunPaths(run_dir).config))
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    ids = tokenizer(["### Instruction:\nName three rivers in Europe.\n\n### Response:\n"], return_tensors="pt")
    model = AutoModelForCausalLM.from_pretrained(base_dir).eval()  # float32, as saved
    with torch.no_grad():
        base = model(**ids).logits.float()
        tuned = PeftModel.from_pretrained(model, RunPaths(run_dir).adapter).eval()(**ids).logits.float()
    return base, tuned


def test_two_by_two_matches_one_by_four(tmp_path: Path, two_by_two: Run, slurm2_cluster: Slurm2Cluster) -> None:
    one = submit_tiny(tmp_path, slurm2_cluster, nodes=1, per_node=4)
    assert one.summary["world_size"] == 4
    assert re.findall(r"group_world_size=(\d+)", one.train_log) == ["1"], one.train_log[-4000:]
    # Each run built its own tiny base model: bit-identical by construction (seeded), checked here.
    bases = [base_model_dir(load_resolved(RunPaths(r.run_dir).config)) for r in (two_by_two, one)]
    weights = [sorted(p.name for p in b.glob("*.safetensors")) for b in bases]
    assert weights[0] and weights[0] == weights[1]
    for name in weights[0]:
        assert (bases[0] / name).read_bytes() == (bases[1] / name).read_bytes(), name

    base, tuned_2x2 = _logits(two_by_two.run_dir)
    _, tuned_1x4 = _logits(one.run_dir)
    moved = (tuned_2x2 - base).abs().max().item()
    diff = (tuned_2x2 - tuned_1x4).abs().max().item()
    print(f"2x2 vs 1x4 adapter logits: max abs diff {diff:.3g}; training moved the logits by up to {moved:.3g}")
    assert moved > 100 * LOGITS_ATOL, f"training barely changed the model ({moved}): the comparison would prove little"
    assert diff <= LOGITS_ATOL, f"2 nodes x 2 and 1 node x 4 disagree: max abs logit diff {diff}"
