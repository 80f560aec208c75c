"""The pinned Neuron environment: version rules, the mismatch line, the record, and `hyperjob env` end to end.

The end-to-end tests run the real CLI with a fake base interpreter whose `-m venv` makes a fake venv python: it
logs every argv it gets and answers the versions step from a file, so the build's commands, its record, its
cleanup after a failure and its "up to date" path are checked without network or a Neuron index.
"""

from __future__ import annotations

import fcntl
import json
import re
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
from run_helpers import hyperjob

from hyperjob import __version__
from hyperjob.backends import neuron_env
from hyperjob.backends.neuron_env import (
    NEURON_INDEX_URL,
    PINS,
    RECORD_NAME,
    installed_versions,
    make_record,
    mismatch,
    plan_rows,
    read_record,
    record_is_current,
    requirements,
    venv_of,
    version_matches,
)
from hyperjob.cli.cmd_env import build_steps

REPO = Path(__file__).resolve().parent.parent
TRN = REPO / "examples" / "trainium-llama3-8b.yaml"
TINY = REPO / "examples" / "tiny-cpu.yaml"

# A set that satisfies every pin, with the shapes real installs report (local label on torch, a later patch).
GOOD = {
    "optimum-neuron": "0.4.5",
    "torch": "2.8.0+cpu",
    "torch-neuronx": "2.8.0.2.10.16998",
    "neuronx-distributed": "0.15.22404",
    "neuronx-cc": "2.21.33363.0",
    "transformers": "4.57.3",
    "peft": "0.17.0",
    "trl": "0.24.0",
    "accelerate": "1.8.1",
    "optimum": "2.0.0",
}


@pytest.mark.parametrize(
    ("found", "spec", "ok"),
    [
        ("0.4.5", "==0.4.5", True),
        ("0.4.50", "==0.4.5", False),
        ("0.4.5.0", "==0.4.5", True),  # zero padding
        ("0.4.5+local", "==0.4.5", True),  # the spec has no local label: ignore the candidate's
        ("0.4.5rc1", "==0.4.5", False),
        ("0.4.5.post1", "==0.4.5", False),
        ("0.4.5", "==0.4.5+cpu", False),
        ("2.21.33363.0", "==2.21.33363.0", True),
        ("2.20.1.0", "==2.21.33363.0", False),
        ("2.8.0", "==2.8.0.*", True),
        ("2.8.0+cpu", "==2.8.0.*", True),
        ("2.8.0.2.10.16998", "==2.8.0.*", True),
        ("2.8", "==2.8.0.*", True),
        ("2.8.1", "==2.8.0.*", False),
        ("2.80.0", "==2.8.*", False),
        ("2.13.0+cpu", "==2.8.0.*", False),
        ("4.57.1", "~=4.57.1", True),
        ("4.57.3", "~=4.57.1", True),
        ("4.57.1+local", "~=4.57.1", True),
        ("4.57.0", "~=4.57.1", False),
        ("4.57.1rc1", "~=4.57.1", False),
        ("4.57.1.post1", "~=4.57.1", True),
        ("4.58.0", "~=4.57.1", False),
        ("5.0.0", "~=4.57.1", False),
        ("2.0.0", "~=2.0.0", True),
        ("2.0.7", "~=2.0.0", True),
        ("2.1.0", "~=2.0.0", False),
        ("2.1", "~=2.0", True),
        ("3.0", "~=2.0", False),
        ("not-a-version", "==0.4.5", False),
        ("", "~=4.57.1", False),
    ],
)
def test_version_matches(found: str, spec: str, ok: bool) -> None:
    assert version_matches(found, spec) is ok


@pytest.mark.parametrize("spec", [">=1.0", "<2", "!=1.0", "===1.0", "~=4", "==bad"])
def test_version_matches_names_an_unsupported_spec(spec: str) -> None:
    with pytest.raises(ValueError, match="spec"):
        version_matches("1.0", spec)


def test_pins_are_the_optimum_neuron_045_set() -> None:
    reqs = requirements()
    assert reqs[0] == "optimum-neuron[training]==0.4.5"  # pip needs the extra, the metadata check the plain name
    assert PINS[0].dist == "optimum-neuron"
    assert "torch==2.8.0.*" in reqs and "neuronx-cc==2.21.33363.0" in reqs and "transformers~=4.57.1" in reqs
    assert {pin.dist for pin in PINS} == set(GOOD)


def test_the_index_url_and_versions_live_in_one_module() -> None:
    holders = [
        p.relative_to(REPO).as_posix()
        for p in (REPO / "hyperjob").rglob("*.py")
        if "pip.repos.neuron" in p.read_text() or "2.21.33363" in p.read_text()
    ]
    assert holders == ["hyperjob/backends/neuron_env.py"]


def test_core_deps_follow_pyproject() -> None:
    """The venv gets hyperjob with --no-deps, so its core dependencies must be listed again: keep them in step."""
    block = re.search(r"^dependencies = \[(.*?)\]", (REPO / "pyproject.toml").read_text(), re.M | re.S)
    assert block is not None
    assert list(neuron_env.CORE_DEPS) == re.findall(r'"([^"]+)"', block[1])


def test_mismatch_none_when_every_pin_matches() -> None:
    assert mismatch(GOOD) is None


def test_mismatch_names_package_found_and_expected() -> None:
    line = mismatch({**GOOD, "neuronx-cc": "2.20.1.0"})
    assert line is not None and "\n" not in line
    assert "neuronx-cc 2.20.1.0 is installed" in line and "==2.21.33363.0" in line
    assert "hyperjob env" in line and "more" not in line


def test_mismatch_missing_package_and_count() -> None:
    line = mismatch({**GOOD, "torch-neuronx": None, "trl": "0.23.0", "peft": "0.18.0"})
    assert line is not None
    assert line.startswith("torch-neuronx is not installed") and "==2.8.0.2.10.16998" in line
    assert "(and 2 more mismatches)" in line
    absent = {k: v for k, v in GOOD.items() if k != "optimum"}
    assert "optimum is not installed" in (mismatch(absent) or "")


def test_installed_versions() -> None:
    found = installed_versions(["pytest", "no-such-dist-hyperjob"])
    assert found["pytest"] == pytest.__version__ and found["no-such-dist-hyperjob"] is None
    assert set(installed_versions()) == set(GOOD)


def test_record_roundtrip_and_currency(tmp_path: Path) -> None:
    assert read_record(tmp_path) is None
    (tmp_path / RECORD_NAME).write_text("{not json")
    assert read_record(tmp_path) is None
    record = make_record("3.11.7", GOOD)
    (tmp_path / RECORD_NAME).write_text(json.dumps(record))
    loaded = read_record(tmp_path)
    assert loaded == record and record_is_current(record)
    assert record["pins"] == requirements() and record["index_url"] == NEURON_INDEX_URL
    assert not record_is_current({**record, "hyperjob": "0.0.1"})
    assert not record_is_current({**record, "pins": [*requirements()[:-1], "optimum~=1.0"]})


@pytest.mark.parametrize(
    ("interpreter", "venv"),
    [
        ("/fsx/hyperjob/venv-neuron/bin/python", "/fsx/hyperjob/venv-neuron"),
        ("/fsx/v/bin/python3", "/fsx/v"),
        ("/fsx/v/bin/python3.11", "/fsx/v"),
        ("python3", None),
        ("venv/bin/python", None),  # relative: the nodes would not agree where it is
        ("/usr/bin/python3", "/usr"),
        ("/bin/python", None),
        ("/fsx/v/python", None),
        ("/fsx/v/bin/pip", None),
    ],
)
def test_venv_of(interpreter: str, venv: str | None) -> None:
    assert venv_of(interpreter) == (None if venv is None else Path(venv))


def test_plan_rows() -> None:
    rows = dict(plan_rows())
    assert "2.26" in rows["Neuron environment"] and "optimum-neuron 0.4.5" in rows["Neuron environment"]
    assert rows["Neuron pip index"] == NEURON_INDEX_URL


def test_build_steps_are_the_pinned_commands(tmp_path: Path) -> None:
    venv = tmp_path / "venv"
    steps = build_steps("python3.11", venv, REPO)
    py = str(venv / "bin" / "python")
    assert steps[0] == ["python3.11", "-m", "venv", str(venv)]
    assert steps[1] == [py, "-m", "pip", "install", "--extra-index-url", NEURON_INDEX_URL, *requirements()]
    assert steps[3][-2:] == ["--no-deps", str(REPO)]
    assert steps[4][:2] == [py, "-c"]
    assert not venv.exists()


# --- the CLI ----------------------------------------------------------------------------------------------------


def env_cli(tmp_path: Path, *args: str, config: Path = TRN) -> subprocess.CompletedProcess[str]:
    venv_py = tmp_path / "venv" / "bin" / "python"
    return hyperjob(
        "env", str(config), "--set", f"workdir={tmp_path}", "--set", f"environment.python={venv_py}", *args, timeout=120
    )


def test_dry_run_prints_index_and_pins_and_writes_nothing(tmp_path: Path) -> None:
    out = env_cli(tmp_path, "--dry-run", "--base-python", "python3.11")
    assert out.returncode == 0, out.stderr
    assert f"--extra-index-url {NEURON_INDEX_URL}" in out.stdout
    for req in requirements():
        assert req in out.stdout
    assert f"python3.11 -m venv {tmp_path / 'venv'}" in out.stdout
    assert list(tmp_path.iterdir()) == []


def test_non_neuron_backend_is_one_line_exit_2(tmp_path: Path) -> None:
    out = env_cli(tmp_path, "--dry-run", config=TINY)
    assert out.returncode == 2
    assert len(out.stderr.splitlines()) == 1 and "'cpu'" in out.stderr and "allowed: backend neuron" in out.stderr
    assert "Traceback" not in out.stderr


def test_interpreter_that_is_not_a_venv_is_refused(tmp_path: Path) -> None:
    out = hyperjob("env", str(TRN), "--set", f"workdir={tmp_path}", "--set", "environment.python=python3")
    assert out.returncode == 2 and len(out.stderr.splitlines()) == 1
    assert "environment.python is 'python3'" in out.stderr and "<venv>/bin/python" in out.stderr


class Fakes:
    """A fake base interpreter and the fake venv python it installs; both log their argv to `log`."""

    def __init__(self, tmp_path: Path, base_version: str = "3.11") -> None:
        self.log = tmp_path / "argv.jsonl"
        self.versions = tmp_path / "versions.json"
        self.fail_on = tmp_path / "fail-on"  # the venv python exits 7 when its argv holds this file's text
        self.venv = tmp_path / "venv"
        self.venv_python = tmp_path / "fake-venv-python"
        self.base = tmp_path / "fake-base-python"
        self._script(self.venv_python, f"""
            if sys.argv[1] == "-c":
                print(json.dumps({{"python": "3.11.9", "installed": json.loads(open({str(self.versions)!r}).read())}}))
            fail = {str(self.fail_on)!r}
            if os.path.exists(fail) and open(fail).read() in sys.argv:
                sys.exit(7)
        """)  # fmt: skip
        self._script(self.base, f"""
            if sys.argv[1] == "-c":
                print({base_version!r})
            elif sys.argv[1:3] == ["-m", "venv"]:
                os.makedirs(os.path.join(sys.argv[3], "bin"))
                open(os.path.join(sys.argv[3], "pyvenv.cfg"), "w").write("home = /fake\\n")
                shutil.copy({str(self.venv_python)!r}, os.path.join(sys.argv[3], "bin", "python"))
            else:
                sys.exit(3)
        """)  # fmt: skip
        self.set_versions(GOOD)

    def _script(self, path: Path, body: str) -> None:
        head = f"#!{sys.executable}\nimport json, os, shutil, sys\n"
        head += f"open({str(self.log)!r}, 'a').write(json.dumps([sys.argv[0], *sys.argv[1:]]) + '\\n')\n"
        path.write_text(head + textwrap.dedent(body))
        path.chmod(0o755)

    def set_versions(self, versions: dict[str, Any]) -> None:
        self.versions.write_text(json.dumps(versions))

    def calls(self) -> list[list[str]]:
        return [json.loads(line) for line in self.log.read_text().splitlines()] if self.log.exists() else []


def test_build_end_to_end_then_up_to_date(tmp_path: Path) -> None:
    fakes = Fakes(tmp_path)
    out = env_cli(tmp_path, "--base-python", str(fakes.base))
    assert out.returncode == 0, out.stderr + out.stdout
    assert "[env]" in out.stdout
    calls = fakes.calls()
    assert calls[0] == [str(fakes.base), "-c", calls[0][2]] and calls[1][1:] == ["-m", "venv", str(fakes.venv)]
    pips = [c[1:] for c in calls if c[1:3] == ["-m", "pip"]]
    assert pips[0] == ["-m", "pip", "install", "--extra-index-url", NEURON_INDEX_URL, *requirements()]
    assert pips[-1] == ["-m", "pip", "install", "--no-deps", str(REPO)]
    record = json.loads((fakes.venv / RECORD_NAME).read_text())
    assert record["installed"] == GOOD and record["pins"] == requirements() and record["hyperjob"] == __version__
    assert record["python"] == "3.11.9" and record["neuron_sdk"] == "2.26" and record["index_url"] == NEURON_INDEX_URL
    assert (tmp_path / "venv.lock").exists()

    again = env_cli(tmp_path, "--base-python", str(fakes.base))
    assert again.returncode == 0, again.stderr
    assert "up to date" in again.stdout and "neuronx-cc 2.21.33363.0" in again.stdout
    assert fakes.calls() == calls  # nothing ran
    dry = env_cli(tmp_path, "--dry-run", "--base-python", str(fakes.base))
    assert "up to date already" in dry.stdout and fakes.calls() == calls


def test_wrong_version_fails_one_line_and_removes_the_venv(tmp_path: Path) -> None:
    fakes = Fakes(tmp_path)
    fakes.set_versions({**GOOD, "neuronx-cc": "2.20.1.0"})
    out = env_cli(tmp_path, "--base-python", str(fakes.base))
    assert out.returncode == 1
    (line,) = out.stderr.splitlines()
    assert "neuronx-cc 2.20.1.0 is installed" in line and "==2.21.33363.0" in line
    assert not fakes.venv.exists() and "Traceback" not in out.stderr


def test_failed_step_names_step_and_code_and_removes_the_venv(tmp_path: Path) -> None:
    fakes = Fakes(tmp_path)
    fakes.fail_on.write_text("--no-deps")
    out = env_cli(tmp_path, "--base-python", str(fakes.base))
    assert out.returncode == 1
    (line,) = out.stderr.splitlines()
    assert "step 4 (pip install hyperjob) failed with exit code 7" in line
    assert not fakes.venv.exists()


def test_existing_venv_without_record_needs_rebuild(tmp_path: Path) -> None:
    fakes = Fakes(tmp_path)
    (fakes.venv / "bin").mkdir(parents=True)
    (fakes.venv / "pyvenv.cfg").write_text("home = /usr/bin\n")
    out = env_cli(tmp_path, "--base-python", str(fakes.base))
    assert out.returncode == 2 and len(out.stderr.splitlines()) == 1
    assert f"holds no {RECORD_NAME}" in out.stderr and "--rebuild" in out.stderr
    assert fakes.calls() == [] and (fakes.venv / "bin").is_dir()
    stale = {**make_record("3.11.7", GOOD), "hyperjob": "0.0.1", "pins": ["optimum-neuron[training]==0.4.4"]}
    (fakes.venv / RECORD_NAME).write_text(json.dumps(stale))
    out = env_cli(tmp_path, "--base-python", str(fakes.base))
    assert out.returncode == 2 and "hyperjob 0.0.1" in out.stderr and "==0.4.4" in out.stderr

    rebuilt = env_cli(tmp_path, "--base-python", str(fakes.base), "--rebuild")
    assert rebuilt.returncode == 0, rebuilt.stderr
    assert record_is_current(read_record(fakes.venv) or {})


def test_rebuild_never_deletes_what_is_not_a_venv(tmp_path: Path) -> None:
    fakes = Fakes(tmp_path)
    (fakes.venv / "bin").mkdir(parents=True)
    (fakes.venv / "data.txt").write_text("keep me")
    out = env_cli(tmp_path, "--base-python", str(fakes.base), "--rebuild")
    assert out.returncode == 2 and "is not a venv (no pyvenv.cfg)" in out.stderr
    assert (fakes.venv / "data.txt").read_text() == "keep me" and fakes.calls() == []


def test_base_python_of_wrong_version_is_refused(tmp_path: Path) -> None:
    fakes = Fakes(tmp_path, base_version="3.12")
    out = env_cli(tmp_path, "--base-python", str(fakes.base))
    assert out.returncode == 2 and len(out.stderr.splitlines()) == 1
    assert "is Python 3.12" in out.stderr and "3.10 or 3.11" in out.stderr
    assert not fakes.venv.exists()
    missing = env_cli(tmp_path, "--base-python", str(tmp_path / "no-such-python"))
    assert missing.returncode == 2 and "cannot run it" in missing.stderr


def test_second_concurrent_call_waits_for_the_lock(tmp_path: Path) -> None:
    fakes = Fakes(tmp_path)
    with open(tmp_path / "venv.lock", "a") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        venv_py = fakes.venv / "bin" / "python"
        proc = subprocess.Popen(
            [sys.executable, "-m", "hyperjob", "env", str(TRN), "--set", f"workdir={tmp_path}",
             "--set", f"environment.python={venv_py}", "--base-python", str(fakes.base)],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        assert proc.stdout is not None
        first = proc.stdout.readline()
        assert "waiting for another `hyperjob env`" in first
        assert fakes.calls() == []
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 0, stderr
    assert read_record(fakes.venv) is not None
