"""`hyperjob runs`, and status, logs and cancel as a user meets them: a config where a run is expected, the train
stage's progress, status's exit codes, and a cancel that leaves finished work alone. Runs are made by the real
local executor (and, marked `slurm`, the project's real Slurm); a few manifests are then edited to stage the
moment under test (a stage the executor has not recorded yet, a failure), never the outcome records the stage
scripts wrote."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest
from fixtures_slurm import SlurmCluster
from run_helpers import config, hyperjob

from hyperjob.cli.main import main
from hyperjob.schedule.local import executor_identity
from hyperjob.schedule.manifest import Manifest, StageRecord, now, read_manifest, write_manifest
from hyperjob.schedule.runs import STATE_LETTERS, short_names
from hyperjob.schedule.states import StageState
from hyperjob.stages.progress import PROGRESS_NAME, progress_callback, read_progress, write_progress

S = StageState
WANTS = "wants a run directory"


def run_cli(capsys: pytest.CaptureFixture[str], *argv: object) -> tuple[int, str, str]:
    """The verb's exit code and its own output (what earlier steps printed is dropped)."""
    capsys.readouterr()
    code = main([str(a) for a in argv])
    out = capsys.readouterr()
    return code, out.out, out.err


def dry_run(cfg: Path) -> Path:
    """A run directory made by `submit --dry-run` (every stage RENDERED); the newest of its workdir."""
    assert main(["submit", str(cfg), "--dry-run"]) == 0
    return max((cfg.parent / "work" / "runs").iterdir(), key=lambda p: p.stat().st_mtime)


@pytest.fixture(scope="module")
def done_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A download-only run that the local executor ran to completion (outcome record and all)."""
    tmp = tmp_path_factory.mktemp("done")
    out = hyperjob("submit", str(config(tmp, ["download"])), "--scheduler", "local", "--wait", "--poll", "0.5")
    assert out.returncode == 0, out.stdout + out.stderr
    (run_dir,) = (tmp / "work" / "runs").iterdir()
    return run_dir


def copy_run(run_dir: Path, workdir: Path, name: str | None = None) -> Path:
    """The run copied into `workdir/runs/`, its manifest pointing at the copy."""
    target = workdir / "runs" / (name or run_dir.name)
    shutil.copytree(run_dir, target)
    write_manifest(target, replace(read_manifest(target), run_dir=str(target)))
    return target


def restage(run_dir: Path, *stages: StageRecord, **fields: object) -> Manifest:
    """Replace the manifest's stages (and other fields): the moment a test needs, on top of real records."""
    m = replace(read_manifest(run_dir), stages=stages, **fields)  # type: ignore[arg-type]
    write_manifest(run_dir, m)
    return m


def stage(index: int, name: str, state: StageState, job: str | None = None, **kw: str) -> StageRecord:
    return StageRecord(index, name, f"scripts/{index:02d}-{name}.sbatch", job, state, **kw)  # type: ignore[arg-type]


# --- a config (or anything else) where a run directory is expected --------------------------------------------


@pytest.mark.parametrize("verb", [["status"], ["logs", "download"], ["cancel"]])
def test_a_config_file_names_the_newest_runs_of_its_workdir(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], verb: list[str]
) -> None:
    cfg = config(tmp_path, ["download"])
    code, _, err = run_cli(capsys, verb[0], cfg, *verb[1:])
    assert code == 2
    assert err == (f"hyperjob: error: {cfg} is a config file; `hyperjob {verb[0]}` {WANTS} "
                   f"(<workdir>/runs/<name>-<timestamp>/); {tmp_path / 'work' / 'runs'} holds no runs yet "
                   f"(start one: hyperjob submit {cfg})\n")  # fmt: skip
    older, newer = dry_run(cfg), dry_run(cfg)
    code, _, err = run_cli(capsys, verb[0], cfg, *verb[1:])
    lines = err.splitlines()
    assert code == 2 and "Traceback" not in err
    assert lines[0].endswith(f"; the newest under {tmp_path / 'work' / 'runs'}:")
    assert [line.split()[2] for line in lines[1:]] == [str(newer), str(older)]  # newest first
    assert all(line.endswith(", d:-)") for line in lines[1:])


def test_anything_else_that_is_not_a_run_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    junk = tmp_path / "notes.txt"
    junk.write_text("not: [a, config\n")
    for path, says in [
        (tmp_path / "missing", "no such file or directory"),
        (tmp_path, "is not a run directory (no manifest.json)"),
        (junk, "is a file, not a run directory"),
    ]:
        code, out, err = run_cli(capsys, "status", path)
        assert (code, out) == (2, "")
        assert err.count("\n") == 1 and says in err and f"`hyperjob status` {WANTS}" in err, err


# --- hyperjob runs --------------------------------------------------------------------------------------------


def test_runs_lists_every_run_newest_first_with_its_stages(
    tmp_path: Path, done_run: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg = config(tmp_path, ["download"])
    work = tmp_path / "work"
    done = copy_run(done_run, work, "a-done")
    # The executor died before recording the end; its outcome record says exit 0: runs refreshes it, as status does.
    rec = read_manifest(done).stages[0]
    restage(done, replace(rec, state=S.RUNNING, exit_code=None), local_pid=None)
    rendered = dry_run(cfg)
    (work / "runs" / "broken").mkdir()
    (work / "runs" / "broken" / "manifest.json").write_text("{")
    os.utime(work / "runs" / "broken", (0, 0))  # the oldest: no manifest, so the directory's time counts
    code, out, _ = run_cli(capsys, "runs", cfg)
    assert code == 0
    lines = out.splitlines()
    assert lines[0] == f"runs under {work / 'runs'}, newest first:"
    assert lines[1].split() == ["name", "created", "scheduler", "stages", "run", "dir"]
    rows = [line.split() for line in lines[2:5]]
    assert [(r[0], r[3], r[4], r[5]) for r in rows[:2]] == [
        ("tiny-cpu", "dry-run", "d:-", str(rendered)),
        ("tiny-cpu", "local", "d:C", str(done)),
    ]
    assert rows[2] == ["broken", "-", "-", "UNREADABLE", str(work / "runs" / "broken")]
    assert lines[5] == "states: C completed, - not submitted"
    assert lines[6].startswith(f"UNREADABLE {work / 'runs' / 'broken'}: ") and "not a valid manifest" in lines[6]
    assert read_manifest(done).stages[0].state is S.COMPLETED  # written back, as status does

    code, out, _ = run_cli(capsys, "runs", work, "--json", "--limit", "2")
    data = json.loads(out)
    assert code == 0 and data["workdir"] == str(work) and data["not_shown"] == 1
    assert [r["run_dir"] for r in data["runs"]] == [str(rendered), str(done)]
    assert data["runs"][1]["stages"] == [{"name": "download", "state": "COMPLETED", "letter": "C"}]
    code, out, _ = run_cli(capsys, "runs", work / "runs", "--limit", "1")
    assert code == 0 and out.splitlines()[-1] == "(2 older runs not shown: --limit 0 shows all)"


def test_runs_needs_a_workdir_or_a_config(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    code, _, err = run_cli(capsys, "runs")
    assert code == 2 and err == (
        "hyperjob: error: no ./hyperjob.yaml here: pass a workdir or a config file (hyperjob runs WORKDIR|CONFIG)\n"
    )
    shutil.copy(config(tmp_path, ["download"]), tmp_path / "hyperjob.yaml")
    assert run_cli(capsys, "runs") == (0, f"no runs under {tmp_path / 'work' / 'runs'}\n", "")
    run_dir = dry_run(tmp_path / "hyperjob.yaml")
    code, out, _ = run_cli(capsys, "runs")
    assert code == 0 and str(run_dir) in out
    code, _, err = run_cli(capsys, "runs", run_dir)
    assert code == 2 and f"{run_dir} is a run directory, not a workdir: see `hyperjob status {run_dir}`" in err
    code, _, err = run_cli(capsys, "runs", tmp_path / "nope")
    assert code == 2 and "nope: no such file or directory (expected a workdir or a config file)" in err
    with pytest.raises(SystemExit) as info:
        main(["runs", "--limit", "-1"])
    assert info.value.code == 2 and "'-1' is not a whole number >= 0" in capsys.readouterr().err


def test_state_letters_and_stage_names_are_unambiguous() -> None:
    assert set(STATE_LETTERS) == set(StageState) and len(set(STATE_LETTERS.values())) == len(StageState)
    names = ["download", "compile", "train", "consolidate", "merge", "evaluate"]
    assert list(short_names(names).values()) == ["d", "com", "t", "con", "m", "e"]
    assert short_names(["train", "train2"]) == {"train": "train", "train2": "train2"}


# --- status: the train stage's progress, and exit codes -------------------------------------------------------


def running_train(tmp_path: Path, done_run: Path) -> Path:
    """A run whose download completed and whose train stage runs under a live local executor (this process)."""
    run_dir = copy_run(done_run, tmp_path / "work")
    pid, host, start = executor_identity()
    download = read_manifest(run_dir).stages[0]
    train = stage(2, "train", S.RUNNING, "local-2", started=now())
    restage(run_dir, download, train, local_pid=pid, local_host=host, local_start=start)
    return run_dir


def test_status_shows_the_running_train_stage_step_and_elapsed_time(
    tmp_path: Path, done_run: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run_dir = running_train(tmp_path, done_run)
    progress_file = run_dir / PROGRESS_NAME
    code, out, _ = run_cli(capsys, "status", run_dir)
    assert code == 0 and "train: step" not in out  # no progress written yet

    write_progress(run_dir, 120, 1251, time.time() - 843, job_id="local-2")
    code, out, _ = run_cli(capsys, "status", run_dir)
    line = out.splitlines()[-1]
    assert code == 0 and re.fullmatch(
        r"train: step 120/1251 \(9\.6%\), 00:14:0[34] elapsed, about 02:1\d:\d\d left", line
    )
    code, out, _ = run_cli(capsys, "status", run_dir, "--json")
    progress = json.loads(out)["progress"]
    assert (progress["stage"], progress["step"], progress["total"], progress["percent"]) == ("train", 120, 1251, 9.59)
    assert 843 <= progress["elapsed_s"] < 850

    # Not this attempt's: another job's file (an earlier submission), one written before this attempt started (the
    # same local job id, resumed), and one that cannot be read. None shows, and none breaks status.
    write_progress(run_dir, 7, 1251, time.time() - 60, job_id="1234")
    older = {**json.loads(progress_file.read_text()), "job_id": "local-2", "updated": time.time() - 3600}
    for text in (progress_file.read_text(), json.dumps(older), '{"step": "many"}'):
        progress_file.write_text(text)
        code, out, _ = run_cli(capsys, "status", run_dir, "--json")
        assert code == 0 and json.loads(out)["progress"] is None, text


def test_progress_callback_writes_from_rank_zero_only(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from transformers import TrainerControl, TrainerState
    from transformers.trainer_callback import CallbackHandler

    monkeypatch.setenv("HYPERJOB_JOB_ID", "local-2")
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    handler = CallbackHandler([progress_callback(tmp_path, interval_s=0)], None, None, None, None)
    state, control, args = TrainerState(max_steps=40, global_step=10), TrainerControl(), object()
    handler.on_train_begin(args, state, control)  # type: ignore[arg-type]
    first = read_progress(tmp_path)
    assert first is not None and (first.step, first.total, first.first_step, first.job_id) == (10, 40, 10, "local-2")
    state.global_step = 11
    handler.on_step_end(args, state, control)  # type: ignore[arg-type]
    assert read_progress(tmp_path).step == 11  # type: ignore[union-attr]
    state.is_world_process_zero, state.global_step = False, 12
    handler.on_step_end(args, state, control)  # type: ignore[arg-type]
    assert read_progress(tmp_path).step == 11  # type: ignore[union-attr]


def test_status_exit_codes(
    tmp_path: Path, done_run: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    work = tmp_path / "work"
    assert run_cli(capsys, "status", copy_run(done_run, work))[0] == 0  # completed
    assert run_cli(capsys, "status", running_train(tmp_path / "r", done_run))[0] == 0  # still running
    assert run_cli(capsys, "status", dry_run(config(tmp_path, ["download"])))[0] == 0  # not submitted
    for state, code in [(S.FAILED, 1), (S.LOST, 1), (S.TIMEOUT, 1), (S.CANCELLED, 0)]:
        run_dir = copy_run(done_run, work, state.value)
        restage(run_dir, replace(read_manifest(run_dir).stages[0], state=state, reason="x"))
        assert run_cli(capsys, "status", run_dir)[0] == code, state
    # A real failure: merge before anything was downloaded.
    (tmp_path / "f").mkdir()
    out = hyperjob("submit", str(config(tmp_path / "f", ["merge"])), "--scheduler", "local", "--wait")
    assert out.returncode == 1, out.stdout + out.stderr
    (failed,) = (tmp_path / "f" / "work" / "runs").iterdir()
    code, out, _ = run_cli(capsys, "status", failed)
    assert code == 1 and "stage merge failed (exit 2)" in out
    # Slurm cannot be asked: the state is unknown, which is neither 0 nor 1.
    asking = copy_run(done_run, work, "slurm")
    restage(asking, replace(read_manifest(asking).stages[0], state=S.PENDING, job_id="77"), scheduler="slurm")
    monkeypatch.setenv("PATH", str(tmp_path))
    code, _, err = run_cli(capsys, "status", asking)
    assert code == 3 and "cannot tell the state of the run" in err and "squeue not found" in err


# --- cancel -----------------------------------------------------------------------------------------------------


def test_cancel_of_a_finished_run_changes_nothing(
    tmp_path: Path, done_run: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run_dir = copy_run(done_run, tmp_path / "work")
    before = (run_dir / "manifest.json").read_bytes()
    code, out, _ = run_cli(capsys, "cancel", run_dir)
    assert (code, out) == (0, f"nothing to cancel in {run_dir}: every submitted stage has ended (download COMPLETED)\n")
    assert (run_dir / "manifest.json").read_bytes() == before
    code, out, _ = run_cli(capsys, "cancel", dry_run(config(tmp_path, ["download"])))
    assert code == 0 and out.endswith(": no stage was submitted (a dry run)\n")


def test_cancel_keeps_a_stage_whose_own_record_says_it_completed(
    tmp_path: Path, done_run: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The executor (on another host, so its view is the manifest) still shows download RUNNING, but the stage's
    script has recorded exit 0: cancel stops only train, and download stays COMPLETED with its exit code."""
    run_dir = copy_run(done_run, tmp_path / "work")
    download = replace(read_manifest(run_dir).stages[0], state=S.RUNNING, exit_code=None)
    restage(run_dir, download, stage(2, "train", S.PENDING, "local-2"), local_host="elsewhere")
    code, out, _ = run_cli(capsys, "cancel", run_dir)
    assert code == 0 and out.splitlines()[-2:] == ["cancelled: train", "had already ended (kept): download COMPLETED"]
    final = read_manifest(run_dir).stages
    assert [(r.state, r.exit_code) for r in final] == [(S.COMPLETED, "0:0"), (S.CANCELLED, None)]
    assert final[1].reason == "cancelled by user"
    assert run_cli(capsys, "cancel", run_dir)[1].startswith("nothing to cancel")  # and again: nothing left


def test_light_verbs_import_nothing_heavy(tmp_path: Path, done_run: Path) -> None:
    run_dir = running_train(tmp_path, done_run)
    write_progress(run_dir, 1, 2, time.time(), job_id="local-2")
    for argv in (["runs", str(tmp_path / "work")], ["status", str(run_dir)], ["cancel", str(tmp_path)]):
        code = (
            "import sys\nfrom hyperjob.cli.main import main\n"
            f"main({argv!r})\n"
            "heavy = [m for m in ('torch', 'transformers', 'peft', 'boto3') if m in sys.modules]\n"
            "assert not heavy, heavy\n"
        )
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stderr


# --- the real Slurm -----------------------------------------------------------------------------------------------


@pytest.mark.slurm
def test_runs_and_cancel_on_real_slurm(tmp_path: Path, slurm_cluster: SlurmCluster) -> None:
    cfg = config(tmp_path, ["download"])
    out = hyperjob("submit", str(cfg), "--scheduler", "slurm", "--wait", "--poll", "0.5")
    assert out.returncode == 0, out.stdout + out.stderr
    (done,) = (tmp_path / "work" / "runs").iterdir()
    held = hyperjob("submit", str(cfg), "--scheduler", "slurm", "--set=cluster.sbatch_extra=[--hold]")
    assert held.returncode == 0, held.stderr
    (queued,) = set((tmp_path / "work" / "runs").iterdir()) - {done}
    job = read_manifest(queued).stages[0].job_id
    try:
        out = hyperjob("runs", str(cfg))
        assert out.returncode == 0, out.stderr
        rows = [line.split() for line in out.stdout.splitlines()[2:4]]
        assert [(r[3], r[4], r[5]) for r in rows] == [("slurm", "d:P", str(queued)), ("slurm", "d:C", str(done))]
        out = hyperjob("cancel", str(done))
        assert out.returncode == 0 and out.stdout.startswith(f"nothing to cancel in {done}"), out.stdout
        out = hyperjob("cancel", str(queued))
        assert out.returncode == 0 and out.stdout.splitlines()[-1] == "cancelled: download", out.stdout
        assert json.loads(hyperjob("runs", str(tmp_path / "work"), "--json").stdout)["runs"][0]["strip"] == "d:X"
    finally:
        subprocess.run(["scancel", str(job)], env={**os.environ, **slurm_cluster.env}, check=False, timeout=30)
