"""README claims that had no test: each runs the real thing and looks at the result from outside hyperjob.

- `--scheduler auto` (what the quickstart uses) runs locally without Slurm and queues on Slurm with it;
- when a later sbatch fails, the jobs already queued are cancelled (Slurm's own view, a real sbatch refusal);
- a multi-node script run outside an allocation fails loudly and launches nothing (the branch runs in bash);
- `logs --follow` streams a running stage and stops by itself when the stage ends;
- `--wait` outlives a restart of the controller (the test cluster's slurmctld, stopped long enough that
  squeue fails, then started again).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from fixtures_slurm import SlurmCluster
from run_helpers import config, hyperjob, only_run_dir, slow_python, slurm_view, states, wait_for

from hyperjob.config.load import load_config
from hyperjob.paths import RunPaths
from hyperjob.plan.planner import make_plan
from hyperjob.schedule.run import write_run_dir

SLURM_COMMANDS = {"sbatch", "squeue", "scontrol", "scancel", "srun", "sinfo", "salloc", "sacct", "sattach"}


def path_without_slurm(tmp_path: Path) -> str:
    """This PATH with every Slurm command left out: a machine without Slurm, as on a laptop."""
    bin_dir = tmp_path / "bin-no-slurm"
    bin_dir.mkdir()
    for directory in [Path(sys.executable).parent, *map(Path, os.environ["PATH"].split(os.pathsep))]:
        if not directory.is_dir():
            continue
        for exe in directory.iterdir():
            target = bin_dir / exe.name
            if exe.name not in SLURM_COMMANDS and not target.exists() and os.access(exe, os.X_OK):
                target.symlink_to(exe)
    return str(bin_dir)


def manifest(run_dir: Path) -> dict:  # type: ignore[type-arg]
    return json.loads((run_dir / "manifest.json").read_text())


# --- --scheduler auto --------------------------------------------------------------------------------------


def test_auto_without_slurm_runs_locally(tmp_path: Path) -> None:
    env = {"PATH": path_without_slurm(tmp_path)}
    assert shutil.which("sbatch", path=env["PATH"]) is None
    out = hyperjob("submit", str(config(tmp_path, ["download"])), "--wait", "--poll", "0.5", env=env)
    assert out.returncode == 0, out.stdout + out.stderr
    run_dir = only_run_dir(tmp_path)
    assert manifest(run_dir)["scheduler"] == "local"
    assert states(run_dir) == {"download": "COMPLETED"}


@pytest.mark.slurm
def test_auto_with_slurm_queues_on_slurm(tmp_path: Path, slurm_cluster: SlurmCluster) -> None:
    out = hyperjob("submit", str(config(tmp_path, ["download"])), "--wait", "--poll", "0.5")
    assert out.returncode == 0, out.stdout + out.stderr
    run_dir = only_run_dir(tmp_path)
    data = manifest(run_dir)
    assert data["scheduler"] == "slurm" and data["stages"][0]["job_id"].isdigit()
    assert states(run_dir) == {"download": "COMPLETED"}


# --- a failed sbatch cancels what was queued -----------------------------------------------------------------


@pytest.mark.slurm
def test_failed_sbatch_cancels_the_jobs_already_queued(tmp_path: Path, slurm_cluster: SlurmCluster) -> None:
    """The second sbatch is refused by Slurm itself (an unknown partition, added on that call only)."""
    real = shutil.which("sbatch")
    assert real is not None
    wrapper = tmp_path / "bin" / "sbatch"
    wrapper.parent.mkdir()
    count = tmp_path / "sbatch-calls"
    wrapper.write_text(
        "#!/bin/bash\n"
        f'n=$(( $(cat {count} 2>/dev/null || echo 0) + 1 )); echo "$n" > {count}\n'
        f'if [[ $n == 2 ]]; then exec {real} --partition=no-such-partition "$@"; fi\n'
        f'exec {real} "$@"\n'
    )
    wrapper.chmod(0o755)
    held = "--set=cluster.sbatch_extra=[--hold]"  # the first job must still be queued when the second fails
    env = {"PATH": f"{wrapper.parent}{os.pathsep}{os.environ['PATH']}"}
    out = hyperjob("submit", str(config(tmp_path, ["download", "train"])), "--scheduler", "slurm", held, env=env)
    assert out.returncode == 1, out.stdout + out.stderr
    assert "sbatch failed for stage train" in out.stderr and "Invalid partition name" in out.stderr, out.stderr
    first = manifest(only_run_dir(tmp_path))["stages"][0]["job_id"]
    assert re.search(rf"cancelled jobs \['{first}'\]", out.stderr), out.stderr
    try:
        wait_for("Slurm to cancel the queued job", lambda: slurm_view([first], {}) [first] in ("CANCELLED", "gone"),
                 timeout=30)  # fmt: skip
    finally:
        subprocess.run(["scancel", first], check=False, timeout=30)


# --- multi-node outside an allocation --------------------------------------------------------------------------


RECORDER = '#!/bin/bash\necho "$@" >> "{log}"\n'


@pytest.mark.parametrize("executor", ["local", "slurm"])
def test_multi_node_script_fails_loudly_outside_an_allocation(tmp_path: Path, executor: str) -> None:
    """Run the 2-node train script's rendezvous branch in bash with no allocation: exit 1, message, nothing run."""
    called = tmp_path / "called.log"
    recorder = tmp_path / "python"
    recorder.write_text(RECORDER.format(log=called))
    recorder.chmod(0o755)
    cfg = load_config(config(tmp_path, ["train"], cluster={"nodes": 2}, environment={"python": str(recorder)}))
    run_dir = tmp_path / "run"
    write_run_dir(cfg, make_plan(cfg), run_dir, scheduler=None)
    paths = RunPaths(run_dir)
    script = paths.scripts / "01-train.sbatch"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "SBATCH_", "SRUN_"))}
    env["HYPERJOB_EXECUTOR"] = executor
    env["PATH"] = f"{recorder.parent}{os.pathsep}{env['PATH']}"  # srun, torchrun or python would be recorded
    proc = subprocess.run(["bash", str(script)], cwd=run_dir, env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "a 2-node stage must run inside a Slurm allocation" in proc.stderr
    assert not called.exists(), called.read_text()
    assert "exit_code=1" in paths.outcome(1, "train").read_text()


# --- logs --follow ----------------------------------------------------------------------------------------------


def test_logs_follow_streams_a_running_stage(tmp_path: Path) -> None:
    python = slow_python(tmp_path, delay=4.0, ticks=8)
    cfg = config(tmp_path, ["download"], environment={"python": str(python)})
    assert hyperjob("submit", str(cfg), "--scheduler", "local").returncode == 0
    run_dir = only_run_dir(tmp_path)
    log = run_dir / "logs"
    wait_for("the first tick in the log", lambda: any("tick 1" in p.read_text() for p in log.glob("01-*")))
    follow = subprocess.Popen([sys.executable, "-m", "hyperjob", "logs", str(run_dir), "download", "--follow"],
                              stdout=subprocess.PIPE, text=True)  # fmt: skip
    got: list[tuple[float, str]] = []
    reader = threading.Thread(target=lambda: got.extend((time.monotonic(), line) for line in follow.stdout or []))
    reader.start()
    try:
        assert follow.wait(timeout=120) == 0
    finally:
        follow.kill()
        reader.join(timeout=10)
    ended = time.monotonic()
    assert states(run_dir) == {"download": "COMPLETED"}
    (log_file,) = log.glob("01-download-*.out")
    assert "".join(line for _, line in got) == log_file.read_text()  # all of it, once, in order
    when = {line.strip(): t for t, line in got if line.startswith("tick ")}
    assert list(when) == [f"tick {i}" for i in range(1, 9)]
    assert when["tick 8"] - when["tick 2"] > 1.5, "the lines arrived all at once, not as the stage wrote them"
    assert ended - when["tick 8"] < 30


# --- --wait through a controller restart ---------------------------------------------------------------------


def _slurmctld_pid(conf: Path) -> int:
    pid_file = re.search(r"(?m)^SlurmctldPidFile=(\S+)", conf.read_text())
    assert pid_file, f"no SlurmctldPidFile in {conf}"
    return int(Path(pid_file.group(1)).read_text().strip())


def _controller_answers() -> bool:
    return subprocess.run(["sinfo", "--noheader"], capture_output=True, timeout=60).returncode == 0


@pytest.mark.slurm
def test_wait_survives_a_controller_restart(tmp_path: Path, slurm_cluster: SlurmCluster) -> None:
    conf = Path(slurm_cluster.env["SLURM_CONF"])
    cfg = config(tmp_path, ["download"], environment={"python": str(slow_python(tmp_path, delay=8))})
    wait = subprocess.Popen([sys.executable, "-m", "hyperjob", "submit", str(cfg), "--scheduler", "slurm", "--wait",
                             "--poll", "1"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)  # fmt: skip
    try:
        # The step must be running: an srun that starts while the controller is down fails its job, as it should.
        wait_for("srun to start the stage", (tmp_path / "slow-python.started").exists)
        pid = _slurmctld_pid(conf)
        os.kill(pid, signal.SIGTERM)
        wait_for("slurmctld to stop", lambda: not Path(f"/proc/{pid}").exists(), timeout=60)
        time.sleep(25)  # longer than squeue's own retries: --wait sees its queries fail
    finally:
        subprocess.run(["slurmctld", "-f", str(conf)], check=True, timeout=60)
        wait_for("slurmctld to answer again", _controller_answers, timeout=60, poll=1)
    out, _ = wait.communicate(timeout=240)
    assert wait.returncode == 0, out
    assert "retrying" in out, out  # the outage was seen, and outlived
    assert re.search(r"download\s+COMPLETED", out), out
    assert states(only_run_dir(tmp_path)) == {"download": "COMPLETED"}
