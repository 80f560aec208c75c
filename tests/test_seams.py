"""The seams: a backend, a stage and a scheduler are each one unit, and nothing else asks which one it is.

A toy backend and a toy stage (its own template and entry module, all written by this test) are registered from
here, rendered by the real renderer and run by the real local executor, touching no module of the package.
"""

from __future__ import annotations

import ast
import re
import sys
from collections.abc import Iterator, Mapping
from pathlib import Path

import pytest
import yaml

from hyperjob import backends, stage_table
from hyperjob.backends.base import Backend
from hyperjob.config.load import ConfigError, load_config
from hyperjob.config.models import HyperjobConfig
from hyperjob.plan.planner import make_plan
from hyperjob.schedule import registry
from hyperjob.schedule.manifest import read_manifest
from hyperjob.schedule.outcome import read_outcomes
from hyperjob.schedule.run import submit_run, write_run_dir
from hyperjob.stage_table import StageSpec

REPO = Path(__file__).resolve().parent.parent
PACKAGE = REPO / "hyperjob"

ENTRY = '''"""A toy stage entry: records what it was run with."""
import argparse, json, os, pathlib, sys
p = argparse.ArgumentParser()
p.add_argument("--run-dir", required=True)
p.add_argument("--greeting", required=True)
a = p.parse_args()
out = pathlib.Path(a.run_dir) / f"toy-{os.environ['HYPERJOB_STAGE']}.json"
out.write_text(json.dumps({"greeting": a.greeting, "toy": os.environ.get("TOY_BACKEND"),
                           "python": sys.executable}))
'''
TEMPLATE = """{% import "_macros.sbatch.j2" as m %}
{{ m.header(s) | trim | raw }}

{{ m.environment(s) | trim | raw }}

{{ m.launcher(s) | trim | raw }}

"${launch[@]}" {{ m.entry(s) | raw }}

{{ m.footer(s) | trim | raw }}
"""


class ToyBackend(Backend):
    """Runs on the cpu instance type; replaces every stage's entry with the toy module."""

    name = "toy"
    accelerator = "cpu"
    default_stages = ("download", "greet")

    def entry(self, stage: StageSpec) -> tuple[str, tuple[str, ...]]:
        return "toy_entry", ("--greeting", f"hello from {stage.name}")

    def env(self, cfg: HyperjobConfig, stage: StageSpec) -> list[tuple[str, str]]:
        return [*super().env(cfg, stage), ("TOY_BACKEND", "1")]

    def processes_per_node(self, cfg: HyperjobConfig, inst: object) -> int:
        return 1

    def template_vars(self, cfg: HyperjobConfig, stage: StageSpec) -> Mapping[str, str | int]:
        return {}


@pytest.fixture
def toy(tmp_path: Path) -> Iterator[Path]:
    """The toy backend and stage registered; yields a config using them (entry module on PYTHONPATH)."""
    (tmp_path / "mods").mkdir()
    (tmp_path / "mods" / "toy_entry.py").write_text(ENTRY)
    (tmp_path / "templates").mkdir()
    (tmp_path / "templates" / "greet.sbatch.j2").write_text(TEMPLATE)
    greet = StageSpec(
        name="greet", purpose="Say hello.", entry="toy_entry", backends=frozenset({"toy"}),
        template_dir=tmp_path / "templates",
    )  # fmt: skip
    data = yaml.safe_load((REPO / "examples" / "tiny-cpu.yaml").read_text())
    data.update(backend="toy", workdir=str(tmp_path / "work"))
    data["dataset"]["path"] = str(REPO / "examples" / "data" / "dolly-tiny.jsonl")
    data["environment"] = {"python": sys.executable, "env": {"PYTHONPATH": str(tmp_path / "mods")}}
    cfg = tmp_path / "toy.yaml"
    cfg.write_text(yaml.safe_dump(data))
    with backends.registered(ToyBackend()), stage_table.registered(greet, after="download"):
        yield cfg


def test_toy_backend_and_stage_render_and_run_locally(toy: Path) -> None:
    cfg = load_config(toy)
    plan = make_plan(cfg)
    assert plan.stages == ("download", "greet")
    run_dir = cfg.workdir / "runs" / "toy-run"
    manifest = write_run_dir(cfg, plan, run_dir, "local")
    assert manifest is not None
    greet_script = (run_dir / "scripts" / "02-greet.sbatch").read_text()
    assert "-m toy_entry --run-dir \"$RUN_DIR\" --greeting 'hello from greet'" in greet_script
    assert "export TOY_BACKEND=1" in greet_script and "Say hello." in greet_script
    final, _ = submit_run(registry.get("local"), run_dir, manifest, wait=True, echo=lambda _: None)
    assert [(r.name, r.state.value, r.exit_code) for r in final.stages] == [
        ("download", "COMPLETED", "0:0"),
        ("greet", "COMPLETED", "0:0"),
    ]
    for stage in ("download", "greet"):
        assert (run_dir / f"toy-{stage}.json").read_text().count(f"hello from {stage}") == 1
    assert {k: o.exit_code for k, o in read_outcomes(run_dir, read_manifest(run_dir)).items()} == {
        "download": 0, "greet": 0,
    }  # fmt: skip


def test_toy_stage_is_refused_on_other_backends(toy: Path) -> None:
    with pytest.raises(ConfigError, match="stage 'greet' exists only for backend 'toy' \\(backend is 'cpu'\\)"):
        make_plan(load_config(toy, ["backend=cpu", "stages=[download, greet]"]))
    with pytest.raises(ConfigError, match="'nope' is not a backend \\(allowed: cpu, cuda, neuron, torchneuron, toy\\)"):
        make_plan(load_config(toy, ["backend=nope"]))


def test_train_stages_may_use_their_own_interpreter() -> None:
    """environment.train_python runs compile and train (the Neuron venv); the other stages keep python."""
    from hyperjob.render.scripts import render_run

    cfg = load_config(REPO / "examples" / "trainium-llama3-8b.yaml",
                      ["environment.train_python=/opt/neuron/bin/python"], check_inputs=False)  # fmt: skip
    scripts = {st.stage: st.text for st in render_run(cfg, make_plan(cfg), Path("/runs/r"))}
    for stage, text in scripts.items():
        want = "/opt/neuron/bin/python" if stage in ("compile", "train") else str(cfg.environment.python)
        assert f"readonly PYTHON={want}\n" in text, stage
    assert '  /opt/neuron/bin/neuron_parallel_compile "$PYTHON" -m torch.distributed.run' in scripts["compile"]


def _python_files() -> list[Path]:
    return sorted(p for p in PACKAGE.rglob("*.py") if "testing" not in p.parts)


def test_only_backend_modules_ask_which_backend() -> None:
    pattern = re.compile(r"backend (==|!=|in)\b")
    hits = [f"{p.relative_to(REPO)}:{n}" for p in _python_files()
            for n, line in enumerate(p.read_text().splitlines(), 1) if pattern.search(line)]  # fmt: skip
    assert all(h.startswith("hyperjob/backends/") for h in hits), hits


def test_only_schedulers_compare_scheduler_names() -> None:
    names = "|".join(re.escape(n) for n in ("slurm", "local", "dry-run"))
    pattern = re.compile(rf"""(==|!=|\bin)\s*[\(\[\{{]?\s*["']({names})["']|["']({names})["']\s*(==|!=)""")
    allowed = re.compile(r"hyperjob/schedule/(scheduler_\w+|local|registry)\.py")
    hits = [f"{p.relative_to(REPO)}:{n}: {line.strip()}" for p in _python_files()
            for n, line in enumerate(p.read_text().splitlines(), 1) if pattern.search(line)]  # fmt: skip
    assert all(allowed.match(h) for h in hits), hits


def _package_of(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if parts[0] == "hyperjob" and len(parts) > 1 else None


def test_no_import_cycles_between_packages() -> None:
    """hyperjob's top-level packages and modules form a layered graph (config at the bottom, cli at the top)."""
    graph: dict[str, set[str]] = {}
    for path in _python_files():
        rel = path.relative_to(PACKAGE).with_suffix("")
        if len(rel.parts) == 1 and rel.name in ("__init__", "__main__"):
            continue
        me = rel.parts[0]
        for node in ast.walk(ast.parse(path.read_text())):
            targets = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                targets = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            for target in targets:
                other = _package_of(target)
                if other and other != me and ((PACKAGE / other).is_dir() or (PACKAGE / f"{other}.py").is_file()):
                    graph.setdefault(me, set()).add(other)
    seen: dict[str, int] = {}

    def visit(node: str, stack: list[str]) -> None:
        seen[node] = 1
        for nxt in sorted(graph.get(node, ())):
            assert seen.get(nxt) != 1, f"import cycle: {' -> '.join([*stack, node, nxt])}"
            if nxt not in seen:
                visit(nxt, [*stack, node])
        seen[node] = 2

    for start in sorted(graph):
        if start not in seen:
            visit(start, [])
    assert {"config", "backends", "plan", "render", "schedule", "cli"} <= set(graph) | {"config"}
    assert "cli" not in {p for deps in graph.values() for p in deps}
    assert graph.get("config", set()) <= {"fsutil"}, graph["config"]


def test_unreadable_slurm_answer_is_a_slurm_error(monkeypatch: pytest.MonkeyPatch) -> None:
    """A squeue line we cannot parse (a changed format, a truncated answer) is an error to retry, not a crash."""
    import subprocess

    from hyperjob.schedule import slurm

    def garbled(cmd: list[str], **_: object) -> subprocess.CompletedProcess[str]:
        return subprocess.CompletedProcess(cmd, 0, stdout="12|RUNNING\n", stderr="")

    monkeypatch.setattr(slurm, "_run", garbled)
    with pytest.raises(slurm.SlurmError, match=r"unreadable output .*expected 5 columns"):
        slurm.query(["12"])


class FlakyScheduler:
    """Answers its first queries with SchedulerError, then knows nothing (the stage's record decides)."""

    name, priority, max_nodes = "flaky", None, None

    def __init__(self, failures: int) -> None:
        self.failures = failures

    def query(self, run_dir: Path, manifest: object) -> dict[str, object]:
        from hyperjob.schedule.base import SchedulerError

        if self.failures:
            self.failures -= 1
            raise SchedulerError("squeue: unreadable output")
        return {}


def test_wait_retries_scheduler_errors(tmp_path: Path) -> None:
    from hyperjob.paths import RunPaths
    from hyperjob.schedule.manifest import Manifest, StageRecord, write_manifest
    from hyperjob.schedule.run import wait_run
    from hyperjob.schedule.states import StageState

    rec = StageRecord(1, "download", "scripts/01-download.sbatch", job_id="7", state=StageState.RUNNING)
    write_manifest(tmp_path, Manifest("r", str(tmp_path), "h", "flaky", "now", "0", (rec,)))
    RunPaths(tmp_path).outcomes.mkdir()
    RunPaths(tmp_path).outcome(1, "download").write_text("job_id=7\nhost=h\nstarted=T\nended=T\nexit_code=0\n")
    said: list[str] = []
    with registry.registered(FlakyScheduler(failures=2)):  # type: ignore[arg-type]
        final = wait_run(tmp_path, poll=0.01, timeout=30, echo=said.append)
    assert [r.state for r in final.stages] == [StageState.COMPLETED]
    assert sum("unreadable output; retrying" in line for line in said) == 2
