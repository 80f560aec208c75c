"""`hyperjob resume`: redo what failed and what comes after it, keep what completed, refuse a config change that
would leave completed stages on old values; the decisions as a pure table, then real runs (local and Slurm)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest
from fixtures_slurm import SlurmCluster
from run_helpers import config, final_losses, hyperjob, only_run_dir, states

from hyperjob.schedule.base import submissions
from hyperjob.schedule.manifest import Manifest, StageRecord
from hyperjob.schedule.resume import ResumeError, plan_resume
from hyperjob.schedule.scheduler_slurm import SCHEDULER as SLURM
from hyperjob.schedule.states import StageState
from hyperjob.stage_outputs import MarkerCheck

S = StageState
OK = MarkerCheck(True, "outputs unchanged since it completed", {})


def manifest(*stages: tuple[str, StageState]) -> Manifest:
    recs = tuple(
        StageRecord(index=i, name=name, script=f"scripts/{i:02d}-{name}.sbatch",
                    job_id=None if state is S.RENDERED else str(100 + i), state=state)
        for i, (name, state) in enumerate(stages, start=1)
    )  # fmt: skip
    return Manifest("r", "/runs/r", "h", "slurm", "now", "0", recs)


CASES = [
    # (states, proofs of the completed ones, expected actions)
    ([("download", S.COMPLETED), ("train", S.FAILED), ("merge", S.CANCELLED)], {"download": OK},
     ["keep", "redo", "redo"]),
    ([("download", S.COMPLETED), ("train", S.COMPLETED), ("merge", S.LOST)], {"download": OK, "train": OK},
     ["keep", "keep", "redo"]),
    # A completed stage whose output changed is redone, and everything after it, completed or not.
    ([("download", S.COMPLETED), ("train", S.COMPLETED), ("merge", S.COMPLETED)],
     {"download": MarkerCheck(False, "output x changed since the stage completed", {}), "train": OK, "merge": OK},
     ["redo", "redo", "redo"]),
    # Still running: kept, and what is redone after it waits for it.
    ([("download", S.COMPLETED), ("train", S.RUNNING), ("merge", S.FAILED)], {"download": OK},
     ["keep", "wait", "redo"]),
    ([("download", S.COMPLETED), ("train", S.COMPLETED)], {"download": OK, "train": OK}, ["keep", "keep"]),
    # A completed stage without a marker (made by an older version, or the marker deleted) is not proven.
    ([("download", S.COMPLETED), ("train", S.TIMEOUT)], {"download": MarkerCheck(False, "no completion marker", {})},
     ["redo", "redo"]),
]  # fmt: skip


@pytest.mark.parametrize(("stages", "proofs", "actions"), CASES)
def test_resume_decisions(stages: list[Any], proofs: dict[str, MarkerCheck], actions: list[str]) -> None:
    decided = plan_resume(manifest(*stages), proofs)
    assert [d.action for d in decided.decisions] == actions
    assert all(d.why for d in decided.decisions)


def test_a_config_change_under_a_completed_stage_is_refused_unless_forced() -> None:
    m = manifest(("download", S.COMPLETED), ("train", S.COMPLETED), ("merge", S.FAILED))
    changed = MarkerCheck(False, "config changed: training.lr", {"training.lr": (0.003, 0.001)})
    with pytest.raises(ResumeError, match=r"stage train completed with training.lr=0.003, the config now says 0.001"):
        plan_resume(m, {"download": OK, "train": changed})
    forced = plan_resume(m, {"download": OK, "train": changed}, force=True)
    assert forced.redo == ("train", "merge")


def test_submissions_skip_completed_stages_and_wait_for_live_ones(tmp_path: Path) -> None:
    m = manifest(("download", S.COMPLETED), ("train", S.RUNNING), ("merge", S.RENDERED), ("evaluate", S.RENDERED))
    subs = submissions(tmp_path, m)
    assert [(s.stage, s.after) for s in subs] == [("merge", ("train",)), ("evaluate", ("merge",))]
    lines = SLURM.request(tmp_path, m).lines
    # The live train job is waited for by its id; evaluate by the variable of the merge job queued now.
    assert "--dependency=afterok:102" in lines[1] and lines[1].startswith("job_03=$(")
    assert "--dependency=afterok:${job_03}" in lines[2]
    first = manifest(("download", S.COMPLETED), ("train", S.RENDERED))
    assert [(s.stage, s.after) for s in submissions(tmp_path, first)] == [("train", ())]


# --- real runs ---------------------------------------------------------------------------------------------------

SHORT = {"max_steps": 12, "save_steps": 4, "logging_steps": 1}
FAULT = {"HYPERJOB_FAULT_AFTER_SAVE": "8"}


def _records(run_dir: Path) -> dict[str, dict[str, Any]]:
    return {s["name"]: s for s in json.loads((run_dir / "manifest.json").read_text())["stages"]}


def _logits(run_dir: Path, base: Path) -> Any:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(base)
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), run_dir / "adapter").eval()
    with torch.no_grad():
        return model(**tok("Tell me about llamas and alpacas.", return_tensors="pt")).logits


def _losses(run_dir: Path) -> dict[int, float]:
    return final_losses(run_dir, 12)


def _resume_flow(tmp_path: Path, scheduler: str, env: dict[str, str]) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    cfg = config(tmp_path / "a", ["download", "train", "merge"], training=SHORT)
    out = hyperjob("submit", str(cfg), "--scheduler", scheduler, "--wait", "--poll", "1", env={**env, **FAULT})
    assert out.returncode == 1, out.stdout + out.stderr
    run_dir = only_run_dir(tmp_path / "a")
    assert states(run_dir, env) == {"download": "COMPLETED", "train": "FAILED", "merge": "CANCELLED"}
    assert "stage train failed (exit 1)" in out.stdout and f"resume with: hyperjob resume {run_dir}" in out.stdout
    status = json.loads(hyperjob("status", str(run_dir), "--json", env=env).stdout)
    train = next(s for s in status["stages"] if s["name"] == "train")
    assert train["exit_code"] == "1:0" and "fault injected after saving step 8" in train["error"], train
    before = _records(run_dir)
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["checkpoint-4", "checkpoint-8"]

    out = hyperjob("resume", str(run_dir), "--wait", "--poll", "1", env=env)  # the fault is gone
    assert out.returncode == 0, out.stdout + out.stderr
    assert "download     keep" in out.stdout and "train        redo  FAILED" in out.stdout
    after = _records(run_dir)
    assert after["download"] == before["download"], "download was run again"
    assert states(run_dir, env) == {"download": "COMPLETED", "train": "COMPLETED", "merge": "COMPLETED"}
    train_log = Path(after["train"]["log"]).read_text()
    assert "resuming from checkpoint-8: step 8 of 12 done" in train_log
    assert json.loads((run_dir / "train_summary.json").read_text())["resumed_from"] == "checkpoint-8"
    assert (run_dir / "outcomes" / "attempts").is_dir()  # the failed attempt's record is kept

    # The same run without the fault: the resumed adapter and losses match it.
    out = hyperjob("submit", str(config(tmp_path / "b", ["download", "train"], training=SHORT)), "--scheduler",
                   scheduler, "--wait", "--poll", "1", env=env)  # fmt: skip
    assert out.returncode == 0, out.stdout + out.stderr
    straight = only_run_dir(tmp_path / "b")
    base = tmp_path / "a" / "work" / "models" / "tiny-llama"
    assert (_logits(run_dir, base) - _logits(straight, base)).abs().max().item() < 1e-5
    resumed, uninterrupted = _losses(run_dir), _losses(straight)
    assert resumed.keys() == uninterrupted.keys() == set(range(1, 13))
    assert all(abs(resumed[k] - uninterrupted[k]) < 1e-5 for k in resumed), (resumed, uninterrupted)

    # Everything completed: resume has nothing to do, and a stage run again on its outputs is a no-op.
    out = hyperjob("resume", str(run_dir), env=env)
    assert out.returncode == 0 and "nothing to resume" in out.stdout, out.stdout + out.stderr


@pytest.mark.slow
def test_resume_a_failed_local_run(tmp_path: Path) -> None:
    _resume_flow(tmp_path, "local", {})


@pytest.mark.slow
@pytest.mark.slurm
def test_resume_a_failed_slurm_run(tmp_path: Path, slurm_cluster: SlurmCluster) -> None:
    _resume_flow(tmp_path, "slurm", slurm_cluster.env)


@pytest.mark.slow
def test_resume_refuses_a_config_change_under_a_completed_stage(tmp_path: Path) -> None:
    cfg = config(tmp_path, ["download", "train", "merge"], training={"max_steps": 2, "save_steps": 2},
                 merge={"max_memory": "1KB"})  # fmt: skip
    out = hyperjob("submit", str(cfg), "--scheduler", "local", "--wait", "--poll", "1")
    run_dir = only_run_dir(tmp_path)
    assert states(run_dir)["train"] == "COMPLETED", out.stdout + out.stderr
    refused = hyperjob("resume", str(run_dir), "--set", "training.lr=0.001")
    assert refused.returncode == 2
    assert "stage train completed with training.lr=0.003, the config now says 0.001" in refused.stderr
    assert "--force" in refused.stderr
    # A key train does not depend on is fine; so is --force for one it does.
    kept = hyperjob("resume", str(run_dir), "--set", "merge.max_memory=1GB", "--wait", "--poll", "1")
    assert kept.returncode == 0 and "train        keep" in kept.stdout, kept.stdout + kept.stderr
    forced = hyperjob("resume", str(run_dir), "--set", "training.lr=0.001", "--force")
    assert forced.returncode == 0 and "train        redo" in forced.stdout, forced.stdout + forced.stderr
    hyperjob("cancel", str(run_dir))


def test_a_stage_run_again_on_its_completed_outputs_does_nothing(tmp_path: Path, tiny_model_dir: Path) -> None:
    from fixtures_tiny import make_run_dir

    run_dir = make_run_dir(tmp_path / "w", model_dir=tiny_model_dir)
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    import subprocess
    import sys

    cmd = [sys.executable, "-m", "hyperjob.stages.download", "--run-dir", str(run_dir)]
    first = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120)
    assert first.returncode == 0, first.stderr
    assert (run_dir / "outcomes" / "download.done.json").is_file()
    again = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120)
    assert again.returncode == 0 and "already complete (outputs unchanged" in again.stdout, again.stdout + again.stderr
    assert "nothing to do" in again.stdout
    # A changed output is not "complete" any more.
    model = tmp_path / "w" / "models" / "tiny-llama"
    (model / "config.json").write_text((model / "config.json").read_text() + " ")
    third = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120)
    assert "nothing to do" not in third.stdout, third.stdout  # the stage ran (its own checks decide the rest)


@pytest.mark.slow
def test_merge_killed_mid_write_leaves_no_model_and_resume_completes_it(tmp_path: Path) -> None:
    """kill -9 of the merge while it writes: nothing at merged/, and resume redoes only the merge."""
    import signal
    import time

    from run_helpers import run_processes

    cfg = config(tmp_path, ["download", "train", "merge"], training={"max_steps": 2, "save_steps": 2},
                 merge={"max_shard_size": "20KB", "max_memory": "20MB"})  # fmt: skip
    out = hyperjob("submit", str(cfg), "--scheduler", "local")
    assert out.returncode == 0, out.stdout + out.stderr
    run_dir = only_run_dir(tmp_path)
    deadline, killed = time.monotonic() + 300, None
    merge_record = run_dir / "outcomes" / "03-merge.outcome"
    while killed is None and time.monotonic() < deadline:
        assert "exit_code=" not in (merge_record.read_text() if merge_record.exists() else ""), "merge ended first"
        if any(run_dir.glob(".merged.*.partial")):  # the merge is writing its shards now
            for pid, cmd in run_processes(run_dir).items():
                if "hyperjob.stages.merge" in cmd and "bash" not in cmd.split()[0]:
                    os.kill(pid, signal.SIGKILL)
                    killed = pid
        time.sleep(0.005)
    assert killed is not None, "never saw the merge writing"
    deadline = time.monotonic() + 60
    while states(run_dir)["merge"] not in ("FAILED", "COMPLETED"):
        assert time.monotonic() < deadline
        time.sleep(0.5)
    assert states(run_dir)["merge"] == "FAILED"
    assert not (run_dir / "merged").exists(), "a partial model at the final path"
    out = hyperjob("resume", str(run_dir), "--wait", "--poll", "1")
    assert out.returncode == 0, out.stdout + out.stderr
    assert "train        keep" in out.stdout and "merge        redo" in out.stdout
    assert (run_dir / "merged" / "model.safetensors.index.json").is_file()
    assert not list(run_dir.glob(".merged.*.partial"))
