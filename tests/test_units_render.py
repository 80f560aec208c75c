"""hyperjob.render unit by unit: the shell-quoting Jinja environment, the per-stage context, and whole runs rendered
from the shipped examples and compared with the golden scripts *inside* the test.

test_render.py renders its golden cases at collection time (they parametrize the test), so a mutation tool that
switches mutants on per test never sees them; the golden comparison here renders in the test body. Written for
issue 12 (mutation score).
"""

from __future__ import annotations

from pathlib import Path

import jinja2
import pytest
from test_render import CASES as GOLDEN_CASES
from test_render import GOLDEN, PINNED, RUN_DIR

from hyperjob import __version__, backends
from hyperjob.config.load import load_config
from hyperjob.config.models import HyperjobConfig
from hyperjob.paths import datasets_cache_dir
from hyperjob.plan.planner import make_plan
from hyperjob.render.scripts import render_run, stage_context, stage_env
from hyperjob.render.shell import Raw, comment, make_env, quote, quote_list, slurm_filename
from hyperjob.resources import shipped_dir
from hyperjob.stage_table import spec

REPO = Path(__file__).resolve().parent.parent
CASES = {case: (example, overrides) for case, example, overrides in GOLDEN_CASES}  # test_render.py's own table


def config(example: str, *overrides: str) -> HyperjobConfig:
    return load_config(REPO / "examples" / f"{example}.yaml", [*PINNED, *overrides], check_inputs=False)


@pytest.mark.parametrize("case", sorted(CASES))
def test_rendered_run_matches_the_golden_scripts(case: str) -> None:
    example, overrides = CASES[case]
    cfg = config(example, *overrides)
    stages = render_run(cfg, make_plan(cfg), RUN_DIR)
    golden = sorted(p.name for p in (GOLDEN / case).glob("*.sbatch"))
    assert [s.filename for s in stages] == golden
    assert [(s.index, s.stage) for s in stages] == [(i, name) for i, name in enumerate(make_plan(cfg).stages, 1)]
    for s in stages:
        assert s.text == (GOLDEN / case / s.filename).read_text(), f"{case}/{s.filename} differs from its golden file"


# --- quoting and the Jinja environment -----------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (True, "1"),
        (False, "0"),
        (0, "0"),
        (42, "42"),
        ("plain", "plain"),
        ("two words", "'two words'"),
        ("it's", "'it'\"'\"'s'"),
        (Path("/a b/c"), "'/a b/c'"),
        (Raw("$HOME/x"), "$HOME/x"),
    ],
)
def test_quote(value: object, expected: str) -> None:
    assert quote(value) == expected


def test_quote_refuses_none() -> None:
    with pytest.raises(ValueError) as info:
        quote(None)
    assert str(info.value) == "a template interpolated None: the renderer must not pass optional values unchecked"


def test_quote_list_and_helpers() -> None:
    assert quote_list(["a b", 1, True, "c"]) == "'a b' 1 1 c"
    assert isinstance(quote_list([]), Raw) and quote_list([]) == ""
    assert comment("tab\there\nnew line\x00nul é") == "tab\\there\\nnew line\\x00nul é"
    assert slurm_filename(Path("/data/100%/run")) == "/data/100%%/run"
    assert slurm_filename("%j%%") == "%%j%%%%"


def test_environment_filters_and_layout(tmp_path: Path) -> None:
    env = make_env()

    def render(source: str, **values: object) -> str:
        return env.from_string(source).render(**values)

    assert render("{{ v }}", v="a b") == "'a b'"  # every value quoted, no HTML escaping
    assert render("{{ v }}", v="<&>") == "'<&>'"
    assert render("{{ v | raw }}", v="$X") == "$X"
    assert render("{{ v | qlist }}", v=["a b", "c"]) == "'a b' c"
    assert render("{{ v | slurm_filename | raw }}", v="/x%y") == "/x%%y"
    assert render("# {{ v | comment }}", v="one\ntwo") == "# one\\ntwo"
    assert render("  {% if v %}\nyes\n  {% endif %}\nend\n", v=True) == "yes\nend\n"  # block lines leave no trace
    with pytest.raises(jinja2.UndefinedError):
        render("{{ missing }}")


def test_extra_template_dirs_come_after_the_shipped_ones(tmp_path: Path) -> None:
    (tmp_path / "toy.sbatch.j2").write_text("toy {{ v }}\n")
    (tmp_path / "download.sbatch.j2").write_text("shadowed\n")
    env = make_env([tmp_path])
    assert env.get_template("toy.sbatch.j2").render(v="x y") == "toy 'x y'\n"
    assert (
        Path(env.get_template("download.sbatch.j2").filename or "") == shipped_dir("templates") / "download.sbatch.j2"
    )
    with pytest.raises(jinja2.TemplateNotFound):
        make_env().get_template("toy.sbatch.j2")


# --- the per-stage context -----------------------------------------------------------------------


def test_stage_env_offline_except_download_and_user_values_win() -> None:
    cfg = config("tiny-cpu", "environment.env={HF_HUB_OFFLINE: '0', MY_VAR: x}")
    cache = str(datasets_cache_dir(cfg))
    download = dict(stage_env(cfg, backends.get(cfg.backend), spec("download")))
    train = stage_env(cfg, backends.get(cfg.backend), spec("train"))
    assert download["HYPERJOB_STAGE"] == "download" and download["HF_DATASETS_CACHE"] == cache
    assert "HF_DATASETS_OFFLINE" not in download  # the only stage that may reach the hub
    assert train[:4] == (
        ("HYPERJOB_STAGE", "train"),
        ("HF_DATASETS_CACHE", cache),
        ("HF_HUB_OFFLINE", "0"),  # the user's value replaces the default, in the default's place
        ("HF_DATASETS_OFFLINE", "1"),
    )
    assert train[-1] == ("MY_VAR", "x")
    plain = dict(stage_env(config("tiny-cpu"), backends.get(cfg.backend), spec("merge")))
    assert (plain["HF_HUB_OFFLINE"], plain["HF_DATASETS_OFFLINE"]) == ("1", "1")


def test_stage_context_of_a_two_node_trainium_run() -> None:
    cfg = config("trainium-llama3-8b", "cluster.nodes=2", "workdir=/shared/w%rk")
    plan = make_plan(cfg)
    run_dir = Path("/shared/w%rk/runs/R")
    compile_ = stage_context(cfg, plan, run_dir, "compile", 2)
    assert (compile_.version, compile_.stage, compile_.index, compile_.total) == (__version__, "compile", 2, 6)
    assert (compile_.run_name, compile_.job_name, compile_.run_dir) == (
        "llama3-8b-dolly",
        "llama3-8b-dolly.compile",
        str(run_dir),
    )
    assert compile_.log_pattern == "/shared/w%%rk/runs/R/logs/02-compile-%j.out"
    assert (compile_.nodes, compile_.exclusive, compile_.procs_per_node, compile_.world_size) == (2, True, 32, 64)
    assert compile_.layout == "TP=8 x PP=1 x DP=8"
    assert compile_.launch_wrapper == ("/opt/venv/bin/neuron_parallel_compile",)
    assert (compile_.entry, compile_.entry_args) == ("hyperjob.stages.train", ("--compile",))
    assert (compile_.outcome, compile_.template) == ("outcomes/02-compile.outcome", "compile.sbatch.j2")
    assert compile_.extra == {"compile_steps": 10}
    assert (compile_.srun_extra, compile_.token_source) == ("", "$HF_TOKEN")
    merge = stage_context(cfg, plan, run_dir, "merge", 5)
    assert (merge.nodes, merge.exclusive, merge.launch_wrapper) == (1, False, ())
    assert merge.log_pattern == "/shared/w%%rk/runs/R/logs/05-merge-%j.out"
    shared = config("trainium-llama3-8b", "cluster.nodes=2", "cluster.exclusive=false")
    assert stage_context(shared, make_plan(shared), run_dir, "train", 3).exclusive is False


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        ([], "$HF_TOKEN"),
        (["model.token_env=MY_HF"], "$MY_HF"),
        (["model.token_env=null"], "nowhere (anonymous download)"),
        (["model.token_env=null", "model.token_file=/secrets/hf"], "the file /secrets/hf"),
    ],
)
def test_token_source(overrides: list[str], expected: str) -> None:
    cfg = config("tiny-cpu", *overrides)
    ctx = stage_context(cfg, make_plan(cfg), RUN_DIR, "download", 1)
    assert ctx.token_source == expected
    (script,) = [s for s in render_run(cfg, make_plan(cfg), RUN_DIR) if s.stage == "download"]
    assert expected in script.text


def test_container_image_reaches_srun() -> None:
    cfg = config("gpu-llama3-8b", "cluster.container_image=nvcr.io#nvidia/pytorch:25.01-py3")
    ctx = stage_context(cfg, make_plan(cfg), RUN_DIR, "train", 2)
    assert ctx.srun_extra == (
        " --container-image='nvcr.io#nvidia/pytorch:25.01-py3' --container-mounts=/shared/work:/shared/work"
    )
    plain = config("gpu-llama3-8b")
    assert stage_context(plain, make_plan(plain), RUN_DIR, "train", 2).srun_extra == ""
