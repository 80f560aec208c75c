"""Real answers of Slurm 22.05's commands, captured from the project's test cluster, for the fast tests.

The fast tests feed these to hyperjob.schedule.slurm in place of a running Slurm, so what they assume about
exit codes and messages is what Slurm really says, not a guess (Slurm's scancel, for one, prints nothing for an
unknown or finished job unless run with -v, and exits 210 when permission is denied). The `slurm` test
`test_captures_match_live_slurm` captures them again and compares, so a Slurm that answers differently fails it;
`python tests/slurm_captures.py` (with the cluster's SLURM_CONF set) rewrites the stored file after a review.

Job ids are stored as `{JOB}`; the controller that cannot be reached is a copy of the cluster's slurm.conf
pointing at a port where nothing listens.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

from hyperjob.schedule.parsers import SQUEUE_FORMAT

STORED = Path(__file__).resolve().parent / "data" / "slurm-22.05-answers.json"
UNKNOWN_ID = "999999"
DEAD_PORT = "6899"


@dataclass(frozen=True)
class Answer:
    """One command's argv (job ids as `{JOB}`) and what it returned."""

    argv: tuple[str, ...]
    returncode: int
    stdout: str
    stderr: str

    @property
    def run_result(self) -> tuple[int, str, str]:
        """The (returncode, stdout, stderr) a fake `subprocess.run` returns."""
        return self.returncode, self.stdout, self.stderr


def stored() -> dict[str, Answer]:
    data = json.loads(STORED.read_text())
    return {name: Answer(tuple(a["argv"]), a["returncode"], a["stdout"], a["stderr"]) for name, a in data.items()}


def answer(name: str, job: str = "1") -> tuple[int, str, str]:
    """A stored answer as a fake `subprocess.run` returns it, with `job` in place of the captured job id."""
    code, out, err = stored()[name].run_result
    return code, out.replace("{JOB}", job), err.replace("{JOB}", job)


def _run(argv: list[str], job: str, env: dict[str, str]) -> Answer:
    proc = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=60)

    def norm(text: str) -> str:
        return re.sub(rf"\b{re.escape(job)}\b", "{JOB}", text) if job else text

    return Answer(tuple(norm(a) for a in argv), proc.returncode, norm(proc.stdout), norm(proc.stderr))


def _submit(env: dict[str, str], *flags: str) -> str:
    argv = ["sbatch", "--parsable", "--time=1", "--output=/dev/null", *flags, "--wrap", "true"]
    return subprocess.run(argv, capture_output=True, text=True, env=env, check=True, timeout=60).stdout.strip()


def _gone_from_squeue(job: str, env: dict[str, str], timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while subprocess.run(["squeue", "--noheader", f"--jobs={job}"], capture_output=True, text=True, env=env).stdout:
        if time.monotonic() > deadline:
            raise TimeoutError(f"job {job} still in squeue after {timeout:.0f}s")
        time.sleep(0.2)


@contextmanager
def _dead_controller(env: dict[str, str]) -> Iterator[dict[str, str]]:
    """The environment of a client whose controller does not answer (short timeouts: no 18 s retries)."""
    conf = Path(env["SLURM_CONF"]).read_text()
    conf = re.sub(r"(?m)^SlurmctldPort=\S+", f"SlurmctldPort={DEAD_PORT}", conf)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "slurm.conf"
        path.write_text(conf + "MessageTimeout=1\nTCPTimeout=1\n")
        yield {**env, "SLURM_CONF": str(path)}


def capture(env: dict[str, str]) -> dict[str, Answer]:
    """Every stored answer, produced again by the cluster that `env` reaches."""
    out: dict[str, Answer] = {}
    squeue = ["squeue", "--noheader", f"--format={SQUEUE_FORMAT}"]
    held = _submit(env, "--hold")
    try:
        out["squeue-held-and-unknown"] = _run([*squeue, f"--jobs={held},{UNKNOWN_ID}"], held, env)
        out["scancel-denied"] = _run(["runuser", "-u", "nobody", "--", "scancel", held], held, env)
    finally:
        subprocess.run(["scancel", held], env=env, check=False, timeout=60)
    finished = _submit(env)
    _gone_from_squeue(finished, env)
    cases: dict[str, tuple[list[str], str]] = {
        "scancel-finished": (["scancel", finished], finished),
        "scancel-unknown": (["scancel", UNKNOWN_ID], ""),
        "scancel-bad-id": (["scancel", "abc"], ""),
        "squeue-unknown": ([*squeue, f"--jobs={UNKNOWN_ID}"], ""),
        "scontrol-unknown": (["scontrol", "--oneliner", "show", "job", UNKNOWN_ID], ""),
        "sbatch-missing-script": (["sbatch", "--parsable", "/nonexistent/a.sbatch"], ""),
    }
    out.update({name: _run(argv, job, env) for name, (argv, job) in cases.items()})
    unreachable: dict[str, list[str]] = {
        "scancel-unreachable": ["scancel", "5"],
        "squeue-unreachable": [*squeue, "--jobs=5"],
        "scontrol-unreachable": ["scontrol", "--oneliner", "show", "job", "5"],
        "sbatch-unreachable": ["sbatch", "--parsable", "--wrap", "true"],
    }
    with _dead_controller(env) as dead:
        out.update({name: _run(argv, "", dead) for name, argv in unreachable.items()})
    return out


def write(answers: dict[str, Answer]) -> None:
    STORED.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps({k: asdict(v) for k, v in sorted(answers.items())}, indent=2) + "\n"
    tmp = STORED.with_suffix(".tmp")
    tmp.write_text(text)
    tmp.replace(STORED)


if __name__ == "__main__":
    if "SLURM_CONF" not in os.environ:
        sys.exit("set SLURM_CONF (source /tmp/hyperjob-slurm/env.sh) first")
    write(capture(dict(os.environ)))
    print(f"wrote {STORED}")
