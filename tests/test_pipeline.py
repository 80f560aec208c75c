"""The tiny pipeline end to end, through the CLI: on the real Slurm (sbatch + afterok) and locally.

download (builds tiny-llama) -> train (torchrun, 2 processes, gloo) -> merge -> evaluate. The merged
model must load with AutoModelForCausalLM and give the adapter-wrapped model's logits.
(The hub token's leak test, which needs a real hub download, is in tests/test_hub.py.)
"""

from __future__ import annotations

import itertools
import json
import re
import subprocess
import sys
from datetime import datetime
from pathlib import Path

import pytest
import yaml

from hyperjob.paths import RunPaths

REPO = Path(__file__).resolve().parent.parent
STAGES = ["download", "train", "merge", "evaluate"]


def tiny_config(tmp_path: Path) -> Path:
    data = yaml.safe_load((REPO / "examples" / "tiny-cpu.yaml").read_text())
    data["workdir"] = str(tmp_path / "work")
    data["dataset"]["path"] = str(REPO / "examples" / "data" / "dolly-tiny.jsonl")
    data["training"].update(max_steps=8, save_steps=4)
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def run_pipeline(tmp_path: Path, scheduler: str) -> Path:
    proc = subprocess.run(
        [sys.executable, "-m", "hyperjob", "submit", str(tiny_config(tmp_path)), "--scheduler", scheduler,
         "--wait", "--poll", "1"],
        capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    (run_dir,) = (tmp_path / "work" / "runs").iterdir()
    assert f"merged model:       {run_dir / 'merged'}" in proc.stdout
    assert f"evaluation answers: {run_dir / 'eval' / 'answers.json'}" in proc.stdout
    return run_dir


def stage_times(log: Path) -> tuple[datetime, datetime]:
    text = log.read_text()
    start = re.search(r"starting on \S+ at (\S+) ", text)
    end = re.search(r"finished at (\S+)", text)
    assert start and end, text[-2000:]
    return datetime.fromisoformat(start.group(1)), datetime.fromisoformat(end.group(1))


def check_run(run_dir: Path) -> dict[str, object]:
    manifest = json.loads((run_dir / "manifest.json").read_text())
    stages = manifest["stages"]
    assert [s["name"] for s in stages] == STAGES
    assert all(s["state"] == "COMPLETED" for s in stages), stages
    ids = [s["job_id"] for s in stages]
    assert len(set(ids)) == len(ids)
    times = [stage_times(Path(s["log"])) for s in stages]
    for (_, end), (start, _) in itertools.pairwise(times):
        assert end <= start, f"a stage started before its dependency ended: {times}"
    summary = json.loads((run_dir / "train_summary.json").read_text())
    assert summary["world_size"] == 2  # torchrun ran 2 data-parallel processes
    assert summary["steps"] == 8
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir() if p.name.startswith("checkpoint-")) == [
        "checkpoint-4", "checkpoint-8",
    ]  # fmt: skip
    answers = json.loads((RunPaths(run_dir).evaluation / "answers.json").read_text())
    assert len(answers) == 2 and all(a["base"] is not None and a["tuned"] is not None for a in answers)
    check_merged_matches_adapter(run_dir)
    return manifest


def check_merged_matches_adapter(run_dir: Path) -> None:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from hyperjob.config.load import load_resolved
    from hyperjob.paths import base_model_dir

    paths = RunPaths(run_dir)
    assert (paths.merged / "model.safetensors.index.json").is_file()
    merged = AutoModelForCausalLM.from_pretrained(paths.merged).eval()
    base = AutoModelForCausalLM.from_pretrained(base_model_dir(load_resolved(paths.config)))
    tuned = PeftModel.from_pretrained(base, paths.adapter).eval()
    ids = torch.randint(3, 500, (2, 48), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b = merged(ids).logits, tuned(ids).logits
    # fp32 tiny model: merging only reorders float sums.
    assert torch.allclose(a, b, atol=1e-4, rtol=1e-4), (a - b).abs().max()


@pytest.mark.slow
@pytest.mark.slurm
def test_pipeline_on_real_slurm(tmp_path: Path, slurm_cluster: object) -> None:
    run_dir = run_pipeline(tmp_path, "slurm")
    manifest = check_run(run_dir)
    assert manifest["scheduler"] == "slurm"
    assert all(re.fullmatch(r"\d+", s["job_id"]) for s in manifest["stages"])
    train_log = Path(manifest["stages"][1]["log"]).read_text()
    assert f"(job {manifest['stages'][1]['job_id']})" in train_log  # ran as that Slurm job, through srun
    status = subprocess.run(
        [sys.executable, "-m", "hyperjob", "status", str(run_dir), "--json"], capture_output=True, text=True
    )
    assert [s["state"] for s in json.loads(status.stdout)["stages"]] == ["COMPLETED"] * 4


@pytest.mark.slow
def test_pipeline_local_executor(tmp_path: Path) -> None:
    run_dir = run_pipeline(tmp_path, "local")
    manifest = check_run(run_dir)
    assert manifest["scheduler"] == "local"
    for follow in ([], ["--follow"]):  # a finished stage: --follow prints it all and returns
        logs = subprocess.run(
            [sys.executable, "-m", "hyperjob", "logs", str(run_dir), "train", *follow],
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert "world size 2" in logs.stdout and "stage train finished" in logs.stdout


@pytest.mark.slurm
def test_hostile_workdir_through_real_sbatch(tmp_path: Path, slurm_cluster: object) -> None:
    """Spaces, quotes, $(), backticks and % in the workdir survive sbatch's #SBATCH parsing and bash."""
    workdir = tmp_path / "w o'r\"k $(touch pwned) `touch pwned2` 100%j"
    data = yaml.safe_load((REPO / "examples" / "tiny-cpu.yaml").read_text())
    data.update(workdir=str(workdir), stages=["download"])
    data["dataset"]["path"] = str(REPO / "examples" / "data" / "dolly-tiny.jsonl")
    cfg = tmp_path / "hostile.yaml"
    cfg.write_text(yaml.safe_dump(data))
    proc = subprocess.run(
        [sys.executable, "-m", "hyperjob", "submit", str(cfg), "--scheduler", "slurm", "--wait", "--poll", "1"],
        capture_output=True, text=True, timeout=300, cwd=tmp_path,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    (run_dir,) = (workdir / "runs").iterdir()
    (stage,) = json.loads((run_dir / "manifest.json").read_text())["stages"]
    assert stage["state"] == "COMPLETED"
    log = Path(stage["log"])
    assert log.parent == run_dir / "logs" and log.is_file(), sorted((run_dir / "logs").iterdir())
    assert (workdir / "models" / "tiny-llama" / "config.json").is_file()
    assert not list(tmp_path.rglob("pwned*"))
