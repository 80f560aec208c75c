"""A hostile string in any config field reaches the program unchanged and never executes.

Each string field gets hypothesis-generated text full of shell metacharacters
(quotes, $(), backticks, ;, &, |, newlines, globs, %). Either validation rejects
it with a ConfigError, or every rendered script runs under real bash (local
executor mode) with a recorder in place of Python: the recorder must see the
expected argv and, through config.yaml, the exact string; no injected command
may run.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hyperjob.config.load import ConfigError, load_config
from hyperjob.paths import RunPaths
from hyperjob.plan.planner import make_plan
from hyperjob.schedule.run import write_run_dir

REPO = Path(__file__).resolve().parent.parent
PWNED = "hyperjob-pwned"
# Fragments that would create the marker file if any of them were ever executed.
INJECTIONS = [
    f"$(touch {PWNED})",
    f"`touch {PWNED}`",
    f"; touch {PWNED}",
    f"' ; touch {PWNED} ; '",
    f'" ; touch {PWNED} #',
]
hostile_text = st.builds(
    lambda a, inj, b: a + inj + b,
    st.text(alphabet="ab '\"$`;&|<>*?~!#\\%{}()\n\t=", max_size=12),
    st.sampled_from(INJECTIONS),
    st.text(alphabet="xyz $'\"\\\n", max_size=6),
)

RECORDER = """#!{python}
import json, os, sys, yaml
run_dir = sys.argv[sys.argv.index("--run-dir") + 1]
cfg = yaml.safe_load(open(os.path.join(run_dir, "config.yaml")))
env = {{k: os.environ.get(k) for k in {env_keys!r}}}
with open(os.environ["HJ_RECORD"], "a") as f:
    f.write(json.dumps({{"argv": sys.argv[1:], "cfg": cfg, "env": env}}) + "\\n")
"""

# Dotted key -> how to place the hostile value (string fields of every section).
FIELDS = [
    "name", "workdir", "model.id", "model.revision", "model.token_env", "model.token_file",
    "dataset.path", "dataset.split", "cluster.partition", "cluster.account", "cluster.qos", "cluster.time",
    "cluster.instance_type", "cluster.sbatch_extra", "cluster.container_image", "lora.target_modules",
    "evaluate.prompts", "environment.python", "environment.env", "merge.max_shard_size",
]  # fmt: skip


def place(data: dict[str, Any], key: str, value: str, tmp: Path) -> None:
    section, _, leaf = key.partition(".")
    if key in ("workdir", "model.token_file", "dataset.path"):
        value = f"{tmp}/{value}"  # keep every written path inside the test's directory
    if key == "cluster.sbatch_extra":
        data["cluster"][leaf] = [f"--comment={value}"]
    elif key in ("lora.target_modules", "evaluate.prompts"):
        data[section][leaf] = [value]
    elif key == "environment.env":
        data["environment"]["env"] = {"HJ_USER_VALUE": value}
    elif leaf:
        data.setdefault(section, {})[leaf] = value
    else:
        data[key] = value


def read_key(cfg: dict[str, Any], key: str) -> Any:
    node: Any = cfg
    for part in key.split("."):
        node = node[part]
    return node


@pytest.mark.parametrize("key", FIELDS)
@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(value=hostile_text)
def test_hostile_string(tmp_path_factory: pytest.TempPathFactory, key: str, value: str) -> None:
    tmp = tmp_path_factory.mktemp("hostile")
    recorder = tmp / "recorder"
    recorder.write_text(RECORDER.format(python=sys.executable, env_keys=["HJ_USER_VALUE"]))
    recorder.chmod(0o755)
    data = yaml.safe_load((REPO / "examples" / "tiny-cpu.yaml").read_text())
    data["workdir"] = str(tmp / "work")
    data["environment"] = {"python": str(recorder)}
    place(data, key, value, tmp)
    cfg_path = tmp / "c.yaml"
    cfg_path.write_text(yaml.safe_dump(data))
    try:
        cfg = load_config(cfg_path, check_inputs=False)
        plan = make_plan(cfg)
    except ConfigError as e:
        assert "\n" not in e.problems[0][0]  # rejected, with a key named: fine
        return
    run_dir = cfg.workdir / "runs" / "r"
    write_run_dir(cfg, plan, run_dir, scheduler=None)
    record = tmp / "record.jsonl"
    env = {**os.environ, "HYPERJOB_EXECUTOR": "local", "HJ_RECORD": str(record)}
    for script in sorted(RunPaths(run_dir).scripts.iterdir()):
        proc = subprocess.run(["bash", str(script)], cwd=tmp, env=env, capture_output=True, text=True, timeout=60)
        if key != "environment.python":
            assert proc.returncode == 0, proc.stderr
    assert not list(tmp.rglob(PWNED)) and not Path(PWNED).exists(), f"injection executed for {key}={value!r}"
    if key == "environment.python":
        return  # the interpreter itself was the hostile path: nothing ran, nothing was injected
    rows = [json.loads(line) for line in record.read_text().splitlines()]
    assert len(rows) == len(make_plan(cfg).stages)
    for row in rows:
        assert row["argv"][-2:] == ["--run-dir", str(run_dir)]
        stored = read_key(row["cfg"], key if key != "environment.env" else "environment.env.HJ_USER_VALUE")
        expected = data if key != "environment.env" else {"environment": {"env": {"HJ_USER_VALUE": value}}}
        want = read_key(expected, key if key != "environment.env" else "environment.env.HJ_USER_VALUE")
        if key in ("workdir", "model.token_file", "dataset.path"):
            assert Path(stored) == Path(want).resolve() or stored == want
        else:
            assert stored == want
    if key == "environment.env":
        assert all(row["env"]["HJ_USER_VALUE"] == value for row in rows)
