"""A real two-node Slurm for tests marked `slurm2` (`.ci/slurm/start-2node.sh`).

Two slurmd "hosts" (hj-n1, hj-n2), each in its own network, UTS and mount namespace on this machine, under one
slurmctld; see the start script for the layout. It is separate from the single-node cluster of fixtures_slurm.py
(own base directory, ports, munged and SLURM_CONF), and this module never changes os.environ: tests pass
`cluster.env` to every Slurm or hyperjob command they run against it.

The session fixture uses a cluster that is already up (left running by the start script, e.g. by a CI step, or by
HYPERJOB_SLURM2_KEEP=1) and leaves it running; otherwise, as root, it starts one and stops it at the end of the
session. Without root it skips (network namespaces need it); CI runs as root and fails on any skip.
`kill_slurmd` / `restart_slurmd` take one node away and bring it back, for fault tests.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from fixtures_slurm import conf_in_env_sh

__all__ = ["Slurm2Cluster", "require_slurm2_for_marked_tests", "slurm2_cluster"]

REPO_ROOT = Path(__file__).resolve().parents[1]
START_SCRIPT = REPO_ROOT / ".ci" / "slurm" / "start-2node.sh"
STOP_SCRIPT = REPO_ROOT / ".ci" / "slurm" / "stop-2node.sh"
START_TIMEOUT_S = 900  # a first start on a bare machine installs the Debian packages
CLIENT_TIMEOUT_S = 30
ACTIVE_STATES = "PENDING,RUNNING,CONFIGURING,COMPLETING,SUSPENDED,REQUEUED,RESIZING"


def _base() -> Path:
    return Path(os.environ.get("HYPERJOB_SLURM2_BASE", "/tmp/hyperjob-slurm2"))


def _pid_of(pidfile: Path, name: str, arg: str = "") -> int | None:
    """The pid in `pidfile` if that process is alive and is `name` started with this cluster's base (and `arg`)."""
    try:
        pid = int(pidfile.read_text().strip())
        stat = Path(f"/proc/{pid}/stat").read_text()
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except (OSError, ValueError):
        return None
    if stat.rsplit(")", 1)[1].split()[0] == "Z":
        return None
    base = str(_base())
    ok = name in cmdline and base in cmdline and arg in cmdline
    return pid if ok else None


def _conf_if_running(base: Path) -> str | None:
    """SLURM_CONF from the start script's env.sh, if its slurmctld is alive (checked first: clients retry for ~10 s
    against a dead controller)."""
    if _pid_of(base / "run" / "slurmctld.pid", "slurmctld") is None:
        return None
    return conf_in_env_sh(base / "env.sh")


def _script(script: Path, timeout: float) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["bash", str(script)], capture_output=True, text=True, timeout=timeout, check=False)


def _start(stop_on_failure: bool) -> None:
    proc = _script(START_SCRIPT, START_TIMEOUT_S)
    if proc.returncode != 0:
        if stop_on_failure:  # no half-started cluster (namespaces, bridge, daemons) outlives the session
            _stop()
        pytest.fail(f"{START_SCRIPT} failed (exit {proc.returncode}):\n{proc.stdout}{proc.stderr[-4000:]}")


def _stop() -> None:
    proc = _script(STOP_SCRIPT, 120)
    if proc.returncode != 0:
        raise RuntimeError(f"{STOP_SCRIPT} failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")


@dataclass(frozen=True)
class Slurm2Cluster:
    """How to reach the two-node cluster: add `env` (SLURM_CONF) to every Slurm or hyperjob subprocess."""

    conf: str
    partition: str
    nodes: tuple[str, ...]  # in Slurm's order: nodes[0] is the first host of a job that gets both
    base: Path
    started_here: bool
    env: dict[str, str] = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "env", {"SLURM_CONF": self.conf})

    def client(self, *cmd: str, timeout: float = CLIENT_TIMEOUT_S) -> subprocess.CompletedProcess[str]:
        """Run a Slurm client command (sinfo, squeue, scontrol, ...) against this cluster."""
        return _client(self.conf, *cmd, timeout=timeout)

    def node_state(self, node: str) -> str:
        """The node's state in sinfo's short form (`idle`, `alloc`, `down*`: `*` = not responding, ...)."""
        proc = self.client("sinfo", "--noheader", "--Node", f"--nodes={node}", "--format=%t")
        assert proc.returncode == 0, proc.stderr
        return proc.stdout.strip()

    def active_jobs(self) -> list[str]:
        proc = self.client("squeue", "--noheader", "--format=%A", f"--states={ACTIVE_STATES}")
        assert proc.returncode == 0, proc.stderr
        return proc.stdout.split()

    def cancel_all(self, timeout: float = 60) -> list[str]:
        """Cancel every job of this cluster and wait until none is active; returns the ids it cancelled."""
        jobs = self.active_jobs()
        if jobs:
            self.client("scancel", *jobs)
        deadline = time.monotonic() + timeout
        while self.active_jobs():
            if time.monotonic() > deadline:
                raise AssertionError(f"jobs still active {timeout:.0f}s after scancel: {self.active_jobs()}")
            time.sleep(0.5)
        return jobs

    def slurmd_pid(self, node: str) -> int | None:
        return _pid_of(self.base / "run" / f"slurmd-{node}.pid", "slurmd", node)

    def kill_slurmd(self, node: str, sig: signal.Signals = signal.SIGKILL) -> int:
        """Send `sig` to the node's slurmd (SIGKILL: the node dies without telling slurmctld); returns its pid.

        Job steps on the node keep running, orphaned, as on a host whose daemon crashed; slurmctld marks the node
        DOWN after about SlurmdTimeout (10 s) plus a ping interval.
        """
        pid = self.slurmd_pid(node)
        assert pid is not None, f"slurmd of {node} is not running"
        os.kill(pid, sig)
        deadline = time.monotonic() + 15
        while self.slurmd_pid(node) == pid:
            if time.monotonic() > deadline:
                raise AssertionError(f"slurmd {pid} of {node} still alive 15s after {sig.name}")
            time.sleep(0.1)
        return pid

    def node_pids(self, node: str) -> list[int]:
        """Every process of the node: its network namespace's (slurmd, slurmstepd, the job's own)."""
        proc = subprocess.run(["ip", "netns", "pids", node], capture_output=True, text=True, timeout=30, check=True)
        return [int(p) for p in proc.stdout.split()]

    def freeze_node(self, node: str) -> None:
        """The node stops answering, all at once, as a host that hangs or drops off the network: no connection is
        reset, so its peers' collectives hang and only slurmctld's SlurmdTimeout notices."""
        for pid in self.node_pids(node):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGSTOP)

    def reboot_node(self, node: str, timeout: float = 60) -> None:
        """Kill everything the node ran (a reboot), then start its slurmd again."""
        for pid in self.node_pids(node):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 30
        while self.node_pids(node):
            assert time.monotonic() < deadline, f"processes of {node} survive SIGKILL: {self.node_pids(node)}"
            time.sleep(0.2)
        self.restart_slurmd(node, timeout)

    def restart_slurmd(self, node: str, timeout: float = 60) -> None:
        """Start the node's slurmd again (the start script starts only what is missing) and wait until every node
        accepts jobs (ReturnToService=2: a node marked DOWN returns by itself once its slurmd registers)."""
        assert self.slurmd_pid(node) is None, f"slurmd of {node} is still running"
        proc = _script(START_SCRIPT, timeout)
        assert proc.returncode == 0, proc.stderr[-4000:]
        assert self.slurmd_pid(node) is not None


def _client(conf: str, *cmd: str, timeout: float = CLIENT_TIMEOUT_S) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "SLURM_CONF": conf}
    return subprocess.run(list(cmd), capture_output=True, text=True, timeout=timeout, check=False, env=env)


def _nodes_and_partition(conf: str) -> tuple[tuple[str, ...], str]:
    """The default partition's nodes (in Slurm's order) and name."""
    proc = _client(conf, "sinfo", "--noheader", "--format=%P %N")
    rows = [line.split() for line in proc.stdout.splitlines() if line.strip()]
    assert proc.returncode == 0 and rows, f"sinfo against {conf} failed: {proc.stderr}"
    partition, nodelist = next((row for row in rows if row[0].endswith("*")), rows[0])
    hosts = _client(conf, "scontrol", "show", "hostnames", nodelist)
    assert hosts.returncode == 0, hosts.stderr
    return tuple(hosts.stdout.split()), partition.rstrip("*")


@pytest.fixture(scope="session")
def slurm2_cluster() -> Iterator[Slurm2Cluster]:
    """The two-node cluster, both nodes accepting jobs."""
    base = _base()
    conf = _conf_if_running(base)
    started = False
    if os.geteuid() != 0:
        if conf is None:
            pytest.skip(f"no two-node Slurm runs under {base} and starting one ({START_SCRIPT.name}) needs root")
    else:
        # Also when it already runs: the script is idempotent and brings back a node whose slurmd has died.
        started = conf is None
        _start(stop_on_failure=started)
        conf = _conf_if_running(base)
        if conf is None:
            if started:
                _stop()
            pytest.fail(f"{START_SCRIPT} succeeded but left no running slurmctld; see {base}/log")
    assert conf is not None
    nodes, partition = _nodes_and_partition(conf)
    cluster = Slurm2Cluster(conf=conf, partition=partition, nodes=nodes, base=base, started_here=started)
    try:
        yield cluster
    finally:
        if started and os.environ.get("HYPERJOB_SLURM2_KEEP") != "1":
            _stop()


@pytest.fixture(autouse=True)
def require_slurm2_for_marked_tests(request: pytest.FixtureRequest) -> Iterator[None]:
    """Tests marked `slurm2` get the cluster without naming it, and no job of theirs outlives them."""
    if request.node.get_closest_marker("slurm2") is None:
        yield
        return
    cluster: Slurm2Cluster = request.getfixturevalue("slurm2_cluster")
    yield
    cluster.cancel_all()
