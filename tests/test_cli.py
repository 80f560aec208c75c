"""The CLI verbs as a user runs them: plan output, bad configs, dry runs, init, light imports."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from hyperjob.cli.main import main
from hyperjob.schedule import slurm

REPO = Path(__file__).resolve().parent.parent
TRN = REPO / "examples" / "trainium-llama3-8b.yaml"
TINY = REPO / "examples" / "tiny-cpu.yaml"


def hyperjob(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "hyperjob", *args], capture_output=True, text=True, env=env or dict(os.environ)
    )


def tiny_config(tmp_path: Path, **training: object) -> Path:
    data = yaml.safe_load(TINY.read_text())
    data["workdir"] = str(tmp_path / "work")
    data["dataset"]["path"] = str(REPO / "examples" / "data" / "dolly-tiny.jsonl")
    data["training"].update(training)
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_plan_prints_seed_layout() -> None:
    out = hyperjob("plan", str(TRN))
    assert out.returncode == 0, out.stderr
    text = " ".join(out.stdout.split())
    assert "processes 32 (32 per node)" in text
    assert "tensor parallel (TP) 8" in text
    assert "data parallel (DP) 4" in text
    assert "global batch 12 =" in text


def test_plan_json(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["plan", str(TRN), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert (data["tensor_parallel"], data["data_parallel"], data["world_size"], data["global_batch"]) == (8, 4, 32, 12)


@pytest.mark.parametrize(
    ("overrides", "key"),
    [
        (["parallel.tensor=3"], "parallel.tensor"),
        (["cluster.instance_type=trn9.huge"], "cluster.instance_type"),
        (["dataset.path=missing.jsonl"], "dataset.path"),
        (["training.seq_len=-5"], "training.seq_len"),
    ],
)
def test_bad_config_one_line_nothing_written(tmp_path: Path, overrides: list[str], key: str) -> None:
    cfg = tiny_config(tmp_path)
    if key == "parallel.tensor":  # tensor parallelism is checked on the neuron backend
        overrides = [
            *overrides,
            "backend=neuron",
            "cluster.instance_type=trn1.32xlarge",
            "model.id=meta-llama/Meta-Llama-3-8B",
        ]
    out = hyperjob("submit", str(cfg), "--dry-run", *[f"--set={o}" for o in overrides])
    assert out.returncode == 2
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1, lines
    assert key in lines[0] and lines[0].startswith("hyperjob: error:")
    assert "Traceback" not in out.stderr
    assert not (tmp_path / "work").exists()


def test_dry_run_touches_no_cluster(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def forbidden(*_a: object, **_k: object) -> None:
        raise AssertionError("dry run called Slurm")

    for name in ("sbatch", "query", "cancel", "available"):
        monkeypatch.setattr(slurm, name, forbidden)
    assert main(["submit", str(tiny_config(tmp_path)), "--dry-run"]) == 0
    (run_dir,) = (tmp_path / "work" / "runs").iterdir()
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert manifest["scheduler"] == "dry-run"
    assert [s["name"] for s in manifest["stages"]] == ["download", "train", "merge", "evaluate"]
    assert all(s["job_id"] is None for s in manifest["stages"])
    assert sorted(p.name for p in (run_dir / "scripts").iterdir()) == [
        "01-download.sbatch", "02-train.sbatch", "03-merge.sbatch", "04-evaluate.sbatch",
    ]  # fmt: skip


def test_dry_run_without_slurm_on_path(tmp_path: Path) -> None:
    bare = tmp_path / "bin"
    bare.mkdir()
    env = {**os.environ, "PATH": str(bare)}
    out = hyperjob("submit", str(tiny_config(tmp_path)), "--dry-run", env=env)
    assert out.returncode == 0, out.stderr
    assert "dry run: nothing submitted" in out.stdout
    out = hyperjob("submit", str(tiny_config(tmp_path)), "--scheduler", "slurm", env=env)
    assert out.returncode == 2 and "sbatch is not on PATH" in out.stderr


def test_render_writes_scripts_and_refuses_existing_dir(tmp_path: Path) -> None:
    out_dir = tmp_path / "rendered"
    assert main(["render", str(TRN), "--out", str(out_dir)]) == 0
    assert len(list((out_dir / "scripts").iterdir())) == 6
    assert "readonly RUN_DIR=" + str(out_dir) in (out_dir / "scripts" / "03-train.sbatch").read_text()
    assert main(["render", str(TRN), "--out", str(out_dir)]) == 2


def test_init_presets_validate(tmp_path: Path) -> None:
    for preset in ("trainium", "trn2", "gpu", "cpu-tiny"):
        target = tmp_path / preset / "hyperjob.yaml"
        target.parent.mkdir()
        assert main(["init", "--preset", preset, "--output", str(target)]) == 0
        assert main(["plan", str(target)]) == 0
    assert (tmp_path / "cpu-tiny" / "data" / "dolly-tiny.jsonl").is_file()
    assert main(["init", "--output", str(tmp_path / "gpu" / "hyperjob.yaml")]) == 2  # no silent overwrite


@pytest.mark.parametrize(
    "verb", [["--help"], ["plan", str(TRN)], ["render", str(TRN), "--out", "{tmp}/r"], ["runs", "{tmp}"]]
)
def test_light_verbs_import_no_torch(tmp_path: Path, verb: list[str]) -> None:
    args = [a.replace("{tmp}", str(tmp_path)) for a in verb]
    code = (
        "import sys\nfrom hyperjob.cli.main import main\n"
        f"try:\n    main({args!r})\nexcept SystemExit:\n    pass\n"
        "heavy = [m for m in ('torch', 'transformers', 'peft') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr


def test_status_of_a_dry_run(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["submit", str(tiny_config(tmp_path)), "--dry-run"]) == 0
    (run_dir,) = (tmp_path / "work" / "runs").iterdir()
    capsys.readouterr()
    assert main(["status", str(run_dir)]) == 0
    assert "RENDERED" in capsys.readouterr().out
    assert main(["status", str(tmp_path)]) == 2


def test_an_unbuilt_neuron_environment_is_announced_before_queueing(tmp_path: Path) -> None:
    venv = tmp_path / "venv-neuron"
    sets = [f"--set=workdir={tmp_path / 'work'}", f"--set=environment.python={venv}/bin/python"]
    bare = tmp_path / "bin"
    bare.mkdir()
    out = hyperjob("submit", str(TRN), "--scheduler", "slurm", *sets, env={**os.environ, "PATH": str(bare)})
    assert f"{venv} is not a Neuron environment built by this hyperjob" in out.stderr
    assert "hyperjob env CONFIG" in out.stderr
