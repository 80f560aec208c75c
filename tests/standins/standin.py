"""Recording stand-ins for srun, scontrol, neuron_parallel_compile and the Neuron venv's python.

One file, several tools: `standin.py TOOL ARGV0 ARGS...`; the test writes tiny launchers named after each tool
that pass their own path as ARGV0. Every call appends one JSON line (tool, argv, full environment, cwd) to
$HJ_STANDIN_LOG, so a test sees exactly what a rendered script ran and with which environment, without Slurm,
torch or a Trainium device. Stdlib only.

Knobs (environment): HJ_STEP_NODELIST, the node list srun gives its step (default: the job's, as real srun does;
set it to simulate HyperPod re-running a step on a replaced node); HJ_NEFFS, how many *.neff files
neuron_parallel_compile writes into the --cache_dir of NEURON_CC_FLAGS (default 2; 0 simulates a silent failure);
HJ_SCONTROL_SLOW_WRITES=1 makes scontrol write one host per write(), as real scontrol does past its 4 KiB buffer.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
import time
import uuid
from pathlib import Path

ARGV0 = ""  # the launcher's path: how the script called this tool


def record(tool: str, argv: list[str]) -> None:
    line = json.dumps({"tool": tool, "argv0": ARGV0, "argv": argv, "env": dict(os.environ), "cwd": os.getcwd()})
    with open(os.environ["HJ_STANDIN_LOG"], "a", encoding="utf-8") as log:
        log.write(line + "\n")


def expand_hostlist(hostlist: str) -> list[str]:
    """`trn-[1-2,5],gpu07` -> trn-1 trn-2 trn-5 gpu07: the simple forms Slurm prints (one bracket per name)."""
    names = [n for n in re.split(r",(?![^\[]*\])", hostlist) if n]
    hosts: list[str] = []
    for name in names:
        match = re.fullmatch(r"([^\[]*)\[([^\]]+)\](.*)", name)
        if match is None:
            hosts.append(name)
            continue
        prefix, ranges, suffix = match.groups()
        for part in ranges.split(","):
            lo, _, hi = part.partition("-")
            for i in range(int(lo), int(hi or lo) + 1):
                hosts.append(f"{prefix}{str(i).zfill(len(lo))}{suffix}")
    return hosts


def srun(argv: list[str]) -> int:
    """Runs the command once per node of the step (sequentially), each task seeing the step's node list."""
    record("srun", argv)
    split = next((i for i, a in enumerate(argv) if not a.startswith("-")), len(argv))
    options, command = argv[:split], argv[split:]
    if not command:
        print(f"srun stand-in: cannot parse {argv}", file=sys.stderr)
        return 2
    nodes = int(next((o.split("=", 1)[1] for o in options if o.startswith("--nodes=")), "1"))
    step_nodes = os.environ.get("HJ_STEP_NODELIST") or os.environ.get("SLURM_JOB_NODELIST", "")
    hosts = expand_hostlist(step_nodes) or ["localhost"]
    status = 0
    for node_id in range(nodes):
        env = {**os.environ, "SLURM_STEP_NODELIST": step_nodes, "SLURM_NODEID": str(node_id)}
        env["SLURMD_NODENAME"] = hosts[node_id % len(hosts)]
        status = max(status, subprocess.run(command, env=env).returncode)
    return status


def scontrol(argv: list[str]) -> int:
    record("scontrol", argv)
    if argv[:2] != ["show", "hostnames"]:
        print(f"scontrol stand-in: only `show hostnames` is implemented, not {argv}", file=sys.stderr)
        return 1
    hostlist = argv[2] if len(argv) > 2 else os.environ.get("SLURM_JOB_NODELIST", "")
    lines = [f"{host}\n".encode() for host in expand_hostlist(hostlist)]
    if os.environ.get("HJ_SCONTROL_SLOW_WRITES") != "1":
        os.write(1, b"".join(lines))  # one write, as real scontrol's stdio buffer does for a short list
        return 0
    for line in lines:  # a list longer than scontrol's 4 KiB buffer: several writes, the reader may be gone
        os.write(1, line)
        time.sleep(0.3)
    return 0


def cache_dir_from_flags(flags: str) -> Path | None:
    for word in shlex.split(flags):
        if word.startswith("--cache_dir="):
            return Path(word.split("=", 1)[1])
    return None


def neuron_parallel_compile(argv: list[str]) -> int:
    """Writes HJ_NEFFS fresh graphs (unique names, as a new compile's would be) into the cache, then runs argv."""
    record("neuron_parallel_compile", argv)
    count = int(os.environ.get("HJ_NEFFS", "2"))
    cache = cache_dir_from_flags(os.environ.get("NEURON_CC_FLAGS", ""))
    if count and cache is None:
        print("neuron_parallel_compile stand-in: no --cache_dir= in NEURON_CC_FLAGS", file=sys.stderr)
        return 3
    for _ in range(count):
        assert cache is not None
        neff = cache / "neuronxcc-0.0.0+standin" / f"MODULE_{uuid.uuid4().hex}" / "model.neff"
        neff.parent.mkdir(parents=True, exist_ok=True)
        neff.write_bytes(b"standin neff")
    return subprocess.run(argv).returncode


def python(argv: list[str]) -> int:
    """The Neuron venv's interpreter: hyperjob's own light modules run for real, torchrun is only recorded."""
    if argv[:2] == ["-m", "torch.distributed.run"]:
        record("torchrun", argv)
        return 0
    if argv[:2] == ["-m", "hyperjob.stages.compile_cache"]:
        os.execv(sys.executable, [sys.executable, *argv])
    record("python", argv)
    print(f"python stand-in: unexpected command {argv}", file=sys.stderr)
    return 4


TOOLS = {"srun": srun, "scontrol": scontrol, "neuron_parallel_compile": neuron_parallel_compile, "python": python}

if __name__ == "__main__":
    ARGV0 = sys.argv[2]
    raise SystemExit(TOOLS[sys.argv[1]](sys.argv[3:]))
