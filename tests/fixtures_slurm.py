"""A real single-node Slurm for tests marked `slurm`.

Uses a cluster that already answers (SLURM_CONF set, or left running by `.ci/slurm/start.sh`, e.g. by a
CI step); otherwise, as root, starts one with that script and stops it at the end of the session.
Without root it skips: installing and running slurmd needs it. Set HYPERJOB_SLURM_KEEP=1 to leave a
cluster this session started running, for debugging.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

__all__ = ["SlurmCluster", "require_slurm_for_marked_tests", "slurm_cluster"]

REPO_ROOT = Path(__file__).resolve().parents[1]
START_SCRIPT = REPO_ROOT / ".ci" / "slurm" / "start.sh"
STOP_SCRIPT = REPO_ROOT / ".ci" / "slurm" / "stop.sh"
START_TIMEOUT_S = 900  # a first start installs the Debian packages


@dataclass(frozen=True)
class SlurmCluster:
    """How to reach the cluster: `env` (with SLURM_CONF) to add to a subprocess environment."""

    env: dict[str, str]
    partition: str
    started_here: bool


def _base() -> Path:
    return Path(os.environ.get("HYPERJOB_SLURM_BASE", "/tmp/hyperjob-slurm"))


def _conf_from_env_sh(base: Path) -> str | None:
    """SLURM_CONF from the `export SLURM_CONF=...` line that start.sh writes, if its slurmctld is alive.

    Checking the pid first matters: sinfo against a stopped controller retries for about ten seconds.
    """
    try:
        pid = (base / "run" / "slurmctld.pid").read_text().strip()
        if "slurmctld" not in Path(f"/proc/{pid}/cmdline").read_text():
            return None
    except (OSError, ValueError):
        return None
    return conf_in_env_sh(base / "env.sh")


def conf_in_env_sh(env_sh: Path) -> str | None:
    """The SLURM_CONF a cluster start script wrote into its env.sh (`export SLURM_CONF=...`), if any."""
    try:
        lines = env_sh.read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        if line.startswith("export SLURM_CONF="):
            return line.split("=", 1)[1].strip()
    return None


def _default_partition(conf: str) -> str | None:
    """The default partition (`debug*` in sinfo) when the controller answers, else None."""
    if shutil.which("sinfo") is None:
        return None
    try:
        proc = subprocess.run(
            ["sinfo", "--noheader", "--format=%P"],
            env={**os.environ, "SLURM_CONF": conf},
            capture_output=True,
            text=True,
            timeout=15,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    partitions = proc.stdout.split()
    if proc.returncode != 0 or not partitions:
        return None
    default = next((p for p in partitions if p.endswith("*")), partitions[0])
    return default.rstrip("*")


def _answering_cluster() -> tuple[str, str] | None:
    """(SLURM_CONF, default partition) of a cluster that already answers: ours from env.sh, or the caller's."""
    for conf in (os.environ.get("SLURM_CONF"), _conf_from_env_sh(_base())):
        partition = _default_partition(conf) if conf else None
        if conf and partition:
            return conf, partition
    return None


def _start_cluster() -> None:
    proc = subprocess.run(
        ["bash", str(START_SCRIPT)], capture_output=True, text=True, timeout=START_TIMEOUT_S, check=False
    )
    if proc.returncode != 0:
        pytest.fail(f"{START_SCRIPT} failed (exit {proc.returncode}):\n{proc.stdout}{proc.stderr[-4000:]}")


def _stop_cluster() -> None:
    proc = subprocess.run(["bash", str(STOP_SCRIPT)], capture_output=True, text=True, timeout=120, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"{STOP_SCRIPT} failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")


@pytest.fixture(scope="session")
def slurm_cluster() -> Iterator[SlurmCluster]:
    """A Slurm that answers sinfo; os.environ["SLURM_CONF"] points at it for the whole session."""
    found = _answering_cluster()
    started = False
    if found is None:
        if os.geteuid() != 0:
            pytest.skip("no Slurm answers (set SLURM_CONF) and starting one with .ci/slurm/start.sh needs root")
        _start_cluster()
        started = True
        found = _answering_cluster()
        if found is None:
            _stop_cluster()
            pytest.fail(f"{START_SCRIPT} succeeded but sinfo does not answer; see {_base()}/log")

    conf, partition = found
    previous = os.environ.get("SLURM_CONF")
    os.environ["SLURM_CONF"] = conf
    try:
        yield SlurmCluster(env={"SLURM_CONF": conf}, partition=partition, started_here=started)
    finally:
        if previous is None:
            os.environ.pop("SLURM_CONF", None)
        else:
            os.environ["SLURM_CONF"] = previous
        if started and os.environ.get("HYPERJOB_SLURM_KEEP") != "1":
            _stop_cluster()


@pytest.fixture(autouse=True)
def require_slurm_for_marked_tests(request: pytest.FixtureRequest) -> None:
    """Tests marked `slurm` get the cluster (or are skipped with the reason) without naming the fixture."""
    if request.node.get_closest_marker("slurm") is not None:
        request.getfixturevalue("slurm_cluster")
