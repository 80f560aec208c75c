"""`hyperjob env`: build a backend's pinned Neuron venv on the shared filesystem, once per workdir.

The command list is a pure function (`build_steps`); the side effects (subprocesses, the lock, removing a
half-built venv, writing the record) live in a few small functions below it.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import os
import re
import shlex
import shutil
import subprocess
import textwrap
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import hyperjob
from hyperjob import backends
from hyperjob.backends.envspec import CORE_DEPS, RECORD_NAME, EnvSpec, read_record, venv_of
from hyperjob.backends.neuron_env import NEURON_INDEX_URL, TORCHNEURON, XLA
from hyperjob.cli.common import EXIT_RUN_FAILED, CliError, add_config_args, load_and_plan
from hyperjob.config.models import HyperjobConfig
from hyperjob.fsutil import write_json
from hyperjob.stage_table import spec


def _pins(env: EnvSpec) -> str:
    return textwrap.fill(" ".join(env.requirements()), width=112, initial_indent="    ", subsequent_indent="    ")


DESCRIPTION = f"""\
Build the Python environment the Trainium training stages run in: a venv at the path of the config's
environment.train_python (or environment.python), which must be <venv>/bin/python on the shared filesystem,
e.g. /fsx/hyperjob/venv-neuron/bin/python. The config's backend picks the set:

  backend neuron ({XLA.label}, Python {" or ".join(XLA.python_versions)}): optimum-neuron 0.4.5 is the last
  release of the PyTorch/XLA training path (trn1, trn1n; also trn2) and works with this exact set only:
{_pins(XLA)}
  backend torchneuron ({TORCHNEURON.label}, Python {" or ".join(TORCHNEURON.python_versions)}; trn2, trn3):
  native PyTorch on device "neuron" with the versions hyperjob's train entry is tested with:
{_pins(TORCHNEURON)}

Why pinned: a venv that drifts fails deep inside a compiler or a trainer; this one is built from fixed pins and
records what it installed in <venv>/{RECORD_NAME}, so a later run can tell that it is complete and current.

Steps: BASE -m venv VENV; pip install the pins with the Neuron pip index as an extra index
({NEURON_INDEX_URL}); pip install this hyperjob (from its source tree) with its core
dependencies; compare the installed versions with the pins; write the record, last. A failed build removes
the venv it started; a second run says "up to date" and does nothing.

Run it once per workdir, on a node that mounts the shared filesystem (the login or head node). It needs network
access to PyPI and to the Neuron pip index. Backends cpu and cuda install with .ci/install.sh or pip.
"""

VERSION_CHECK = 'import sys; print("%d.%d" % sys.version_info[:2])'
STEP_NAMES = (
    "create the venv",
    "pip install the Neuron set",
    "pip install hyperjob's dependencies",
    "pip install hyperjob",
    "read the installed versions",
)


def add_parsers(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "env",
        help="build the backend's pinned Neuron venv (neuron: Neuron SDK 2.26; torchneuron: 2.33) on the shared FS",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_config_args(p)
    p.add_argument("--dry-run", action="store_true", help="print the commands it would run; write nothing")
    p.add_argument("--rebuild", action="store_true", help="delete an existing venv at that path and build it again")
    p.add_argument(
        "--base-python",
        metavar="PY",
        help=f"interpreter that creates the venv: Python {' or '.join(XLA.python_versions)} for backend neuron, "
        f"{' or '.join(TORCHNEURON.python_versions)} for torchneuron (default: {XLA.base_python} or "
        f"{TORCHNEURON.base_python} if on PATH, else python3)",
    )
    p.set_defaults(func=cmd_env)


# --- pure parts -----------------------------------------------------------------------------------------------------


def environment_of(cfg: HyperjobConfig) -> EnvSpec:
    """The pinned set of the config's backend; a CliError for a backend without one."""
    env = backends.get(cfg.backend).environment
    if env is None:
        allowed = ", ".join(n for n in backends.names() if backends.get(n).environment is not None)
        raise CliError(
            f"backend {cfg.backend!r}: `hyperjob env` builds the pinned Neuron venvs only (allowed: backend "
            f"{allowed}); for cpu and cuda install hyperjob with .ci/install.sh or pip install 'hyperjob[train]'"
        )
    return env


def target_venv(cfg: HyperjobConfig) -> Path:
    """The venv the training stages run from; a CliError when the config cannot name one."""
    environment_of(cfg)
    own = cfg.stage_resources.get("train")
    if own is not None and own.python is not None:
        key = "stage_resources.train.python"
    else:
        key = "environment.train_python" if cfg.environment.train_python else "environment.python"
    interpreter = backends.get(cfg.backend).python(cfg, spec("train"))
    venv = venv_of(interpreter) if interpreter else None
    if venv is None:
        shown = repr(interpreter) if interpreter else "not set"
        raise CliError(
            f"{key} is {shown}; `hyperjob env` needs an absolute <venv>/bin/python path on the shared "
            f"filesystem, e.g. {cfg.workdir / 'venv-neuron' / 'bin' / 'python'}"
        )
    return venv


def versions_script(env: EnvSpec) -> str:
    """A stdlib one-liner the new venv runs: its Python version and each pinned distribution's version as JSON."""
    dists = [pin.dist for pin in env.pins]
    return (
        "import importlib.metadata as m, json, platform; "
        'print(json.dumps({"python": platform.python_version(), "installed": '
        f"{{d: next((x.version for x in m.distributions(name=d)), None) for d in {json.dumps(dists)}}}}}))"
    )


def build_steps(base: str, venv: Path, source: Path, env: EnvSpec = XLA) -> list[list[str]]:
    """The commands of a build, in order (named by STEP_NAMES)."""
    python = str(venv / "bin" / "python")
    pip = [python, "-m", "pip", "install"]
    return [
        [base, "-m", "venv", str(venv)],
        [*pip, *env.index_options(), *env.requirements()],
        [*pip, *CORE_DEPS],
        [*pip, "--no-deps", str(source)],
        [python, "-c", versions_script(env)],
    ]


def parse_versions(stdout: str) -> tuple[str, dict[str, str | None]]:
    """(python version, installed versions) from the last step's output; ValueError when it is not that JSON."""
    lines = [line for line in stdout.splitlines() if line.strip()]
    data = json.loads(lines[-1]) if lines else None
    if not isinstance(data, dict) or not isinstance(data.get("installed"), dict):
        raise ValueError(f"expected a JSON object with 'python' and 'installed', got {stdout.strip()[-200:]!r}")
    return str(data.get("python")), {str(k): None if v is None else str(v) for k, v in data["installed"].items()}


def describe_existing(venv: Path, record: dict[str, Any] | None, env: EnvSpec) -> str:
    """What is at `venv` when it is not a current build, and what to do about it."""
    if record is None:
        what = f"{venv} exists but holds no {RECORD_NAME} (an unfinished build, or a venv not made by hyperjob env)"
    else:
        old = [p for p in record.get("pins", []) if p not in env.requirements()]
        why = f"other pins ({', '.join(map(str, old))})" if old else "the same pins"
        what = (
            f"{venv} was built by hyperjob {record.get('hyperjob')} on {record.get('created')} with {why}; "
            f"this is hyperjob {hyperjob.__version__}"
        )
    return f"{what}; pass --rebuild to delete it and build the pinned set there, or point the config elsewhere"


def deletable(venv: Path) -> bool:
    """--rebuild deletes only a venv (pyvenv.cfg) or an empty directory: never /usr for a /usr/bin/python3."""
    if (venv / "pyvenv.cfg").is_file():
        return True
    return venv.is_dir() and not venv.is_symlink() and not any(venv.iterdir())


def summary(record: dict[str, Any], env: EnvSpec) -> str:
    installed = record.get("installed", {})
    versions = ", ".join(f"{dist} {installed.get(dist)}" for dist in (p.dist for p in env.pins))
    return f"Python {record.get('python')}, Neuron {record.get('neuron_sdk')}: {versions}"


def default_base_python(env: EnvSpec) -> str:
    return env.base_python if shutil.which(env.base_python) else "python3"


def source_root() -> Path:
    """The source tree this hyperjob runs from (pip installs it into the venv); a CliError for an installed wheel."""
    package = Path(hyperjob.__file__).resolve().parent
    root = package.parent
    pyproject = root / "pyproject.toml"
    if pyproject.is_file() and re.search(r'^name\s*=\s*"hyperjob"', pyproject.read_text(encoding="utf-8"), re.M):
        return root
    raise CliError(
        f"hyperjob runs from {package}, not a source tree (no hyperjob pyproject.toml in {root}); "
        "run `hyperjob env` from a checkout installed with pip install -e <checkout>"
    )


# --- side effects ---------------------------------------------------------------------------------------------------


def say(message: str) -> None:
    print(f"[env] {message}", flush=True)


def check_base_python(base: str, env: EnvSpec) -> None:
    """The venv's interpreter decides its Python: refuse one the pinned set does not support before building."""
    allowed = " or ".join(env.python_versions)
    say(shlex.join([base, "-c", VERSION_CHECK]))
    try:
        proc = subprocess.run([base, "-c", VERSION_CHECK], capture_output=True, text=True, timeout=120)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise CliError(f"--base-python {base}: cannot run it ({e}); pass an interpreter of Python {allowed}") from None
    version = proc.stdout.strip()
    if proc.returncode != 0 or version not in env.python_versions:
        found = f"is Python {version}" if proc.returncode == 0 else f"exited {proc.returncode}"
        raise CliError(
            f"--base-python {base} {found}; {env.label} needs Python {allowed} "
            f"(pass --base-python {env.base_python} or a path to one)"
        )


def run_step(index: int, cmd: list[str], *, capture: bool = False) -> str:
    """Run one step with its output on the terminal (or captured); a CliError naming the step when it fails."""
    name = STEP_NAMES[index]
    say(f"{index + 1}/{len(STEP_NAMES)} {name}: {shlex.join(cmd)}")
    env = {**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
    try:
        proc = subprocess.run(cmd, stdout=subprocess.PIPE if capture else None, text=True, env=env)
    except OSError as e:
        raise CliError(f"step {index + 1} ({name}) could not start: {e}", EXIT_RUN_FAILED) from None
    if proc.returncode != 0:
        raise CliError(f"step {index + 1} ({name}) failed with exit code {proc.returncode}", EXIT_RUN_FAILED)
    return proc.stdout or ""


def remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif os.path.lexists(path):
        path.unlink()


@contextlib.contextmanager
def env_lock(venv: Path) -> Iterator[None]:
    """Hold `VENV.lock` so two `hyperjob env` calls on one workdir do not build the same venv at once."""
    lock = venv.with_name(venv.name + ".lock")
    try:
        lock.parent.mkdir(parents=True, exist_ok=True)
        handle = open(lock, "a")  # noqa: SIM115 (closed below; closing releases the lock)
    except OSError as e:
        raise CliError(f"cannot create the lock file {lock}: {e.strerror}") from None
    try:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            say(f"waiting for another `hyperjob env` building {venv} (lock {lock})")
            fcntl.flock(handle, fcntl.LOCK_EX)
        except OSError as e:  # a filesystem mounted without flock support
            say(f"cannot lock {lock} ({e.strerror}); go on without it: run one `hyperjob env` at a time")
        yield
    finally:
        handle.close()


def build(venv: Path, steps: Sequence[list[str]], env: EnvSpec) -> dict[str, Any]:
    """Run the steps and write the record; on any failure remove the venv this build created, then re-raise."""
    try:
        for index, cmd in enumerate(steps[:-1]):
            run_step(index, cmd)
        out = run_step(len(steps) - 1, steps[-1], capture=True)
        try:
            python, installed = parse_versions(out)
        except ValueError as e:
            raise CliError(f"step {len(steps)} ({STEP_NAMES[-1]}): {e}", EXIT_RUN_FAILED) from None
        if (problem := env.mismatch(installed)) is not None:
            raise CliError(problem, EXIT_RUN_FAILED)
        record = env.make_record(python, installed)
        write_json(venv / RECORD_NAME, record)  # last: its presence means the venv is complete
    except BaseException:
        remove(venv)
        say(f"removed the unfinished {venv}")
        raise
    return record


def print_dry_run(base: str, venv: Path, steps: Sequence[list[str]], env: EnvSpec) -> None:
    """The commands, shell-quoted, as a user could paste them; nothing runs and nothing is written."""
    print(f"# would build {venv}: {env.label}")
    print(f"# Neuron pip index: {env.index_url}")
    for cmd in [[base, "-c", VERSION_CHECK], *steps]:
        print(shlex.join(cmd))
    print(f"# then compare the versions with the pins and write {venv / RECORD_NAME}")
    record = read_record(venv)
    if record is not None and env.record_is_current(record):
        print(f"# {venv} is up to date already: a run without --rebuild would do nothing")


def cmd_env(args: argparse.Namespace) -> int:
    cfg, _ = load_and_plan(args.config, args.overrides, check_inputs=False)
    venv, env = target_venv(cfg), environment_of(cfg)
    base = args.base_python or default_base_python(env)
    steps = build_steps(base, venv, source_root(), env)
    if args.dry_run:
        print_dry_run(base, venv, steps, env)
        return 0
    with env_lock(venv):
        record = read_record(venv)
        if record is not None and env.record_is_current(record) and not args.rebuild:
            say(f"{venv} is up to date ({summary(record, env)})")
            return 0
        if os.path.lexists(venv) and not deletable(venv):
            raise CliError(f"{venv} exists and is not a venv (no pyvenv.cfg); choose a new <venv>/bin/python path")
        if os.path.lexists(venv) and not args.rebuild:
            raise CliError(describe_existing(venv, record, env))
        check_base_python(base, env)
        if os.path.lexists(venv):
            say(f"removing {venv} (--rebuild)")
            remove(venv)
        record = build(venv, steps, env)
    say(f"built {venv} ({summary(record, env)})")
    return 0
