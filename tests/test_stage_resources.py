"""Per-stage resources (issue 16, point 3): `stage_resources.<stage>` > the stage table's default > `cluster.*`.

What this file proves: the resolution rule, case by case (which value wins, where the stage defaults stop at
cluster.time, what a single-task stage may ask for); that the rendered scripts' `#SBATCH` lines and interpreter are
the resolved values and a stage's override leaves the other stages' scripts unchanged; that the local executor runs a
script whatever its Slurm-only values, with the overridden interpreter; that `hyperjob plan` shows the table (text and
JSON); that bad values fail with one line naming the key, the value and what is allowed; and (marked `slurm`) that
the real sbatch and controller read a stage's own time limit and partition.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
from fixtures_slurm import SlurmCluster
from run_helpers import config, hyperjob

from hyperjob.cli.main import main
from hyperjob.config.load import ConfigError, load_config
from hyperjob.config.models import HyperjobConfig, StageResourceOverride
from hyperjob.paths import RunPaths
from hyperjob.plan.planner import make_plan
from hyperjob.plan.resources import CLUSTER, OVERRIDE, STAGE_DEFAULT, check, resolve, slurm_minutes, table_rows
from hyperjob.render.scripts import RenderedStage, render_run
from hyperjob.schedule.run import write_run_dir
from hyperjob.stage_table import all_stages

REPO = Path(__file__).resolve().parent.parent
PINNED = ["workdir=/shared/work", "environment.python=/opt/venv/bin/python"]
RUN_DIR = Path("/shared/work/runs/RUN")


def cfg_of(example: str, *overrides: str) -> HyperjobConfig:
    return load_config(REPO / "examples" / f"{example}.yaml", [*PINNED, *overrides], check_inputs=False)


def scripts(cfg: HyperjobConfig) -> dict[str, str]:
    return {s.stage: s.text for s in render_run(cfg, make_plan(cfg), RUN_DIR)}


def sbatch_lines(text: str) -> list[str]:
    return [line.removeprefix("#SBATCH ") for line in text.splitlines() if line.startswith("#SBATCH ")]


# --- The rule, table-driven ------------------------------------------------------------------------------------------

TRN, GPU, TINY = "trainium-llama3-8b", "gpu-llama3-8b", "tiny-cpu"
MERGE_OWN = ["stage_resources.merge.partition=cpu", "stage_resources.merge.time='01:00:00'"]

# (example, overrides, stage, (partition, nodes, time, exclusive, sbatch_extra), {key: source} that must hold)
RESOLUTION = [
    # Trainium: cluster dev, 24:00:00, exclusive. The single-task stages get their own shorter time, no exclusivity.
    (TRN, [], "train", ("dev", 1, "24:00:00", True, ()), {"time": CLUSTER, "exclusive": CLUSTER}),
    (TRN, [], "compile", ("dev", 1, "24:00:00", True, ()), {"time": CLUSTER}),
    (TRN, [], "download", ("dev", 1, "02:00:00", False, ()), {"time": STAGE_DEFAULT, "exclusive": STAGE_DEFAULT}),
    (TRN, [], "consolidate", ("dev", 1, "02:00:00", False, ()), {"time": STAGE_DEFAULT}),
    (TRN, [], "merge", ("dev", 1, "02:00:00", False, ()), {"time": STAGE_DEFAULT, "partition": CLUSTER}),
    (TRN, [], "evaluate", ("dev", 1, "04:00:00", False, ()), {"time": STAGE_DEFAULT}),
    # Distributed stages run on the layout's nodes; single-task stages on one.
    (TRN, ["cluster.nodes=2"], "compile", ("dev", 2, "24:00:00", True, ()), {"nodes": CLUSTER}),
    (TRN, ["cluster.nodes=2"], "merge", ("dev", 1, "02:00:00", False, ()), {"nodes": STAGE_DEFAULT}),
    (TRN, ["cluster.nodes=2", "stage_resources.train.nodes=2"], "train", ("dev", 2, "24:00:00", True, ()), {}),
    # A stage default never exceeds cluster.time (a partition limited to it would never start the job) ...
    (TINY, [], "merge", (None, 1, "00:30:00", False, ()), {"time": CLUSTER}),
    (TRN, ["cluster.time='90'"], "merge", ("dev", 1, "90", False, ()), {"time": CLUSTER}),
    (TRN, ["cluster.time='150'"], "merge", ("dev", 1, "02:00:00", False, ()), {"time": STAGE_DEFAULT}),
    (TRN, ["cluster.time='2:00:01'"], "merge", ("dev", 1, "02:00:00", False, ()), {"time": STAGE_DEFAULT}),
    (TRN, ["cluster.time='1-0'"], "evaluate", ("dev", 1, "04:00:00", False, ()), {"time": STAGE_DEFAULT}),
    # ... and applies where cluster.time sets no limit, or none is set.
    (TRN, ["cluster.time=UNLIMITED"], "merge", ("dev", 1, "02:00:00", False, ()), {"time": STAGE_DEFAULT}),
    (TRN, ["cluster.time='0'"], "merge", ("dev", 1, "02:00:00", False, ()), {"time": STAGE_DEFAULT}),
    (TRN, ["cluster.time=null"], "merge", ("dev", 1, "02:00:00", False, ()), {"time": STAGE_DEFAULT}),
    (TRN, ["cluster.time=null"], "train", ("dev", 1, None, True, ()), {"time": CLUSTER}),
    # The stage's own values win over both, even a time longer than cluster.time: it was asked for.
    (TRN, MERGE_OWN, "merge", ("cpu", 1, "01:00:00", False, ()), {"partition": OVERRIDE, "time": OVERRIDE}),
    (TINY, ["stage_resources.merge.time='2:00:00'"], "merge", (None, 1, "2:00:00", False, ()), {"time": OVERRIDE}),
    (TRN, MERGE_OWN, "train", ("dev", 1, "24:00:00", True, ()), {"partition": CLUSTER}),  # others keep theirs
    (TRN, ["stage_resources.merge.exclusive=true"], "merge", ("dev", 1, "02:00:00", True, ()), {"exclusive": OVERRIDE}),
    (TRN, ["stage_resources.train.exclusive=false"], "train", ("dev", 1, "24:00:00", False, ()), {}),
    (TRN, ["cluster.exclusive=false"], "train", ("dev", 1, "24:00:00", False, ()), {"exclusive": CLUSTER}),
    # sbatch_extra replaces the cluster's (an empty list drops it); unset inherits it.
    (GPU, ["cluster.sbatch_extra=[--gres=gpu:8]"], "merge", ("gpu", 1, "02:00:00", False, ("--gres=gpu:8",)), {}),
    (
        GPU,
        ["cluster.sbatch_extra=[--gres=gpu:8]", "stage_resources.evaluate.sbatch_extra=[--gres=gpu:1, --mem=64G]"],
        "evaluate",
        ("gpu", 1, "04:00:00", False, ("--gres=gpu:1", "--mem=64G")),
        {"sbatch_extra": OVERRIDE},
    ),
    (
        GPU,
        ["cluster.sbatch_extra=[--gres=gpu:8]", "stage_resources.merge.sbatch_extra=[]"],
        "merge",
        ("gpu", 1, "02:00:00", False, ()),
        {"sbatch_extra": OVERRIDE},
    ),
]


@pytest.mark.parametrize(("example", "overrides", "stage", "expected", "sources"), RESOLUTION)
def test_resolution(
    example: str,
    overrides: list[str],
    stage: str,
    expected: tuple[object, ...],
    sources: dict[str, str],
) -> None:
    res = resolve(cfg_of(example, *overrides), stage)
    assert (res.partition, res.nodes, res.time, res.exclusive, res.sbatch_extra) == expected
    assert {key: res.source(key) for key in sources} == sources


TRAIN_PY = "environment.train_python=/opt/train/bin/python"
EVAL_PY = "stage_resources.evaluate.python=/opt/eval/bin/python"

# (overrides, stage, interpreter, source): the stage's own wins; unset, environment.* decides as before.
INTERPRETERS = [
    ([], "merge", "/opt/venv/bin/python", "environment"),
    ([TRAIN_PY], "train", "/opt/train/bin/python", "environment"),
    ([TRAIN_PY], "merge", "/opt/venv/bin/python", "environment"),
    ([EVAL_PY], "evaluate", "/opt/eval/bin/python", OVERRIDE),
    ([EVAL_PY], "merge", "/opt/venv/bin/python", "environment"),
    ([TRAIN_PY, "stage_resources.train.python=/opt/other/bin/python"], "train", "/opt/other/bin/python", OVERRIDE),
]


@pytest.mark.parametrize(("overrides", "stage", "python", "source"), INTERPRETERS)
def test_interpreter(overrides: list[str], stage: str, python: str, source: str) -> None:
    res = resolve(cfg_of(TINY, *overrides), stage)
    assert (res.python, res.source("python")) == (python, source)


def test_the_trainium_compile_wrapper_follows_the_compile_stage_interpreter() -> None:
    """One place decides a stage's interpreter: the compile stage's neuron_parallel_compile comes from its venv."""
    cfg = cfg_of(TRN, "stage_resources.compile.python=/fsx/other-venv/bin/python")
    text = scripts(cfg)["compile"]
    assert "readonly PYTHON=/fsx/other-venv/bin/python" in text
    assert "/fsx/other-venv/bin/neuron_parallel_compile" in text


@pytest.mark.parametrize(
    ("time", "minutes"),
    [
        ("5", 5), ("5:30", 6), ("00:30:00", 30), ("1:02:03", 63), ("02:00:00", 120), ("1-0", 1440),
        ("1-2:3", 1563), ("1-2:03:04", 1564), ("0", None), ("0-0:0:0", None), ("UNLIMITED", None), ("INFINITE", None),
    ],
)  # fmt: skip
def test_slurm_minutes(time: str, minutes: int | None) -> None:
    assert slurm_minutes(time) == minutes


def test_stage_table_defaults() -> None:
    """Training keeps cluster.*; every single-task stage has a default time that Slurm reads as a limit."""
    defaults = {row.name: row.time_limit for row in all_stages()}
    assert defaults == {
        "download": "02:00:00",
        "compile": None,
        "train": None,
        "consolidate": "02:00:00",
        "merge": "02:00:00",
        "evaluate": "04:00:00",
    }
    for row in all_stages():
        assert (row.time_limit is None) == row.distributed, row.name
        if row.time_limit is not None:
            StageResourceOverride(time=row.time_limit)  # the same pattern a user's value must match


# --- Rendered scripts ---------------------------------------------------------------------------------------------


def test_trainium_scripts_ask_for_the_resolved_values() -> None:
    texts = scripts(cfg_of(TRN))
    for stage in ("download", "consolidate", "merge", "evaluate"):
        lines = sbatch_lines(texts[stage])
        assert "--exclusive" not in lines and "--nodes=1" in lines, stage
        assert f"--time={'04:00:00' if stage == 'evaluate' else '02:00:00'}" in lines, stage
        assert "# Resources: " in texts[stage] and "(stage default)" in texts[stage]
    for stage in ("compile", "train"):
        lines = sbatch_lines(texts[stage])
        assert {"--exclusive", "--time=24:00:00", "--partition=dev"} <= set(lines), stage
        assert "# Resources: " not in texts[stage]


def test_a_stage_override_changes_that_script_only() -> None:
    base = scripts(cfg_of(TRN))
    own = [*MERGE_OWN, "stage_resources.merge.exclusive=true", "stage_resources.merge.sbatch_extra=[--mem=32G]"]
    changed = scripts(cfg_of(TRN, *own, "stage_resources.merge.python=/opt/merge/bin/python"))
    assert {stage for stage in base if base[stage] != changed[stage]} == {"merge"}
    lines = sbatch_lines(changed["merge"])
    assert {"--partition=cpu", "--time=01:00:00", "--exclusive", "--mem=32G"} <= set(lines)
    assert not {"--partition=dev", "--time=02:00:00"} & set(lines)
    assert "readonly PYTHON=/opt/merge/bin/python" in changed["merge"]
    note = next(line for line in changed["merge"].splitlines() if line.startswith("# Resources: "))
    assert "partition cpu, time 01:00:00, exclusive, sbatch options --mem=32G" in note
    assert "python /opt/merge/bin/python (stage_resources.merge)" in note


def test_local_executor_ignores_slurm_only_values(tmp_path: Path) -> None:
    """A partition no cluster has and an odd time do not matter to bash; the stage's interpreter does."""
    recorder = tmp_path / "merge-python"
    recorder.write_text(f'#!/bin/bash\necho "$@" >{tmp_path}/ran\n')
    recorder.chmod(0o755)
    path = config(
        tmp_path,
        stage_resources={"merge": {"partition": "nowhere", "time": "1", "nodes": 1, "python": str(recorder)}},
    )
    cfg = load_config(path, check_inputs=False)
    run_dir = tmp_path / "run"
    write_run_dir(cfg, make_plan(cfg), run_dir, scheduler=None)
    script = RunPaths(run_dir).script(3, "merge")
    assert "#SBATCH --partition=nowhere" in script.read_text()
    env = {**os.environ, "HYPERJOB_EXECUTOR": "local"}
    proc = subprocess.run(["bash", str(script)], cwd=run_dir, env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "ran").read_text().split() == ["-m", "hyperjob.stages.merge", "--run-dir", str(run_dir)]
    assert "exit_code=0" in RunPaths(run_dir).outcome(3, "merge").read_text()


# --- hyperjob plan ------------------------------------------------------------------------------------------------


def test_plan_shows_the_resources_table(capsys: pytest.CaptureFixture[str]) -> None:
    example = REPO / "examples" / f"{TRN}.yaml"
    assert main(["plan", str(example), "--set", "stage_resources.merge.partition=cpu"]) == 0
    out = capsys.readouterr().out
    table = out[out.index("stage resources") :].splitlines()
    assert table[1].split() == ["stage", "partition", "nodes", "time", "exclusive", "sbatch_extra", "python"]
    rows = {line.split()[0]: " ".join(line.split()[1:]) for line in table[2:8]}
    assert list(rows) == ["download", "compile", "train", "consolidate", "merge", "evaluate"]
    python = "/fsx/hyperjob/venv-neuron/bin/python"
    assert rows["train"] == f"dev 1 24:00:00 yes - {python}"
    assert rows["merge"] == f"cpu (set) 1 02:00:00 (default) no (default) - {python}"
    assert rows["evaluate"] == f"dev 1 04:00:00 (default) no (default) - {python}"


def test_plan_json_carries_the_resources(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["plan", str(REPO / "examples" / f"{TRN}.yaml"), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)["stage_resources"]
    assert list(data) == ["download", "compile", "train", "consolidate", "merge", "evaluate"]
    assert (data["merge"]["time"], data["merge"]["exclusive"], data["merge"]["nodes"]) == ("02:00:00", False, 1)
    assert data["merge"]["sources"]["time"] == STAGE_DEFAULT
    assert (data["train"]["time"], data["train"]["exclusive"], data["train"]["partition"]) == ("24:00:00", True, "dev")


def test_table_rows_mark_where_values_come_from() -> None:
    cfg = cfg_of(TINY, "stage_resources.evaluate.sbatch_extra=[--gres=gpu:1]", "stage_resources.merge.nodes=1")
    rows = {row[0]: row[1:] for row in table_rows(cfg, ("train", "merge", "evaluate"))}
    assert rows["train"] == ("(Slurm's default)", "1", "00:30:00", "yes", "-", "/opt/venv/bin/python")
    assert rows["merge"][1] == "1 (set)"
    assert rows["evaluate"][3:5] == ("no (default)", "--gres=gpu:1 (set)")


# --- Bad values ---------------------------------------------------------------------------------------------------

UNKNOWN_KEY = "unknown key 'colour'; allowed keys here: exclusive, nodes, partition, python, sbatch_extra, time"


@pytest.mark.parametrize(
    ("overrides", "key", "message"),
    [
        (["stage_resources.merge.colour=red"], "stage_resources.merge", UNKNOWN_KEY),
        (["stage_resources.merge.time=forever"], "stage_resources.merge.time", "'forever' is not allowed"),
        (["stage_resources.merge.time='1:2:3:4'"], "stage_resources.merge.time", "should match pattern"),
        (["stage_resources.merge.partition='a b'"], "stage_resources.merge.partition", "should match pattern"),
        (["stage_resources.merge.sbatch_extra=[mem=4G]"], "stage_resources.merge.sbatch_extra", "must start with '--'"),
        (["stage_resources.merge.python=-c"], "stage_resources.merge.python", "must not start with '-'"),
        (["stage_resources.merge.nodes=0"], "stage_resources.merge.nodes", "greater than 0"),
        (["stage_resources.merge.exclusive=maybe"], "stage_resources.merge.exclusive", "valid boolean"),
        (["stage_resources.merge=fast"], "stage_resources.merge", "valid dictionary"),
        (['stage_resources.merge.python="/opt/a\\tb"'], "", "stage_resources.merge.python: control characters"),
    ],
)  # fmt: skip
def test_invalid_values_name_the_key(overrides: list[str], key: str, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        cfg_of(TRN, *overrides)
    assert [k for k, _ in info.value.problems] == [key]
    assert message in info.value.problems[0][1]


@pytest.mark.parametrize(
    ("overrides", "key", "message"),
    [
        (["stage_resources.marge.time='01:00:00'"], "stage_resources",
         "unknown stage 'marge' (allowed: download, compile, train, consolidate, merge, evaluate)"),
        (["stage_resources.merge.nodes=2"], "stage_resources.merge.nodes",
         "2: stage 'merge' runs one task on one node (allowed: 1)"),
        (["stage_resources.train.nodes=2"], "stage_resources.train.nodes",
         "2 differs from cluster.nodes=1: a distributed stage runs on the training layout's nodes (set cluster.nodes "
         "instead)"),
    ],
)  # fmt: skip
def test_stage_checks(overrides: list[str], key: str, message: str) -> None:
    cfg = cfg_of(TRN, *overrides)
    with pytest.raises(ConfigError) as info:
        check(cfg)
    assert info.value.problems == [(key, message)]


def test_a_stage_of_the_table_that_the_run_lacks_is_accepted() -> None:
    """compile exists only on neuron; one config may still carry its resources for a cpu run."""
    cfg = cfg_of(TINY, "stage_resources.compile.time='01:00:00'")
    check(cfg)
    assert "compile" not in scripts(cfg)


@pytest.mark.parametrize("verb", ["plan", "render", "submit"])
def test_cli_refuses_a_bad_stage_in_one_line(tmp_path: Path, verb: str) -> None:
    """Before anything is written or queued (the planner checks), with no traceback."""
    path = config(tmp_path, stage_resources={"marge": {"time": "01:00:00"}})
    args = {"plan": [], "render": ["--out", str(tmp_path / "out")], "submit": ["--dry-run"]}[verb]
    out = hyperjob(verb, str(path), *args)
    assert out.returncode == 2, out.stdout + out.stderr
    assert out.stderr.splitlines() == [
        f"hyperjob: error: {path}: stage_resources: unknown stage 'marge' "
        "(allowed: download, compile, train, consolidate, merge, evaluate)"
    ]
    assert not (tmp_path / "out").exists() and not (tmp_path / "work" / "runs").exists()


# --- Slurm reads them ---------------------------------------------------------------------------------------------


@pytest.mark.slurm
def test_slurm_reads_each_stages_own_time_and_partition(slurm_cluster: SlurmCluster, tmp_path: Path) -> None:
    """Held jobs: sbatch and the controller keep the stage defaults (download, merge), a stage's own values (evaluate)
    and the cluster's (train): time limits as the minutes meant, --exclusive where meant, on the partition meant."""
    from test_hostile import submit_held

    path = config(
        tmp_path,
        cluster={"partition": slurm_cluster.partition, "time": "1-0"},
        stage_resources={"evaluate": {"time": "00:07:00", "partition": slurm_cluster.partition, "exclusive": True}},
    )
    cfg = load_config(path, check_inputs=False)
    run_dir = tmp_path / "run"
    stages: list[RenderedStage] = render_run(cfg, make_plan(cfg), run_dir)
    write_run_dir(cfg, make_plan(cfg), run_dir, scheduler=None)
    limits: dict[str, tuple[int, str | None]] = {}
    for st in stages:
        options, job = submit_held(slurm_cluster, RunPaths(run_dir).script(st.index, st.stage))
        assert job["partition"] == slurm_cluster.partition
        limits[st.stage] = (job["time_limit"], options.get("exclusive"))
    assert limits == {  # (minutes, sbatch's reading of --exclusive)
        "download": (120, None), "train": (1440, "exclusive"), "merge": (120, None), "evaluate": (7, "exclusive"),
    }  # fmt: skip
