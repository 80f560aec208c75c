"""Inject faults into real runs of the tiny CPU pipeline and check that hyperjob recovers without losing data.

Every run is `examples/tiny-cpu.yaml` (a random tiny Llama, LoRA-trained by 2 processes over gloo) with the stages
download -> train -> merge, short training and a checkpoint every few steps. For each scheduler the script first
times an uninterrupted run of the same config (the baseline), then runs the same config once per fault:

  after-save  (local, slurm)  train fails on purpose right after saving checkpoint N (HYPERJOB_FAULT_AFTER_SAVE=N),
                              `hyperjob submit --wait` exits 1, then `hyperjob resume RUN --wait` finishes the run
  usr2        (slurm)         `scancel --signal=USR2 --batch JOB` on train once its first checkpoint exists (what
                              Slurm sends before the time limit): train saves, stops and requeues itself
  requeue     (slurm)         `scontrol requeue JOB` on train once its first checkpoint exists
  merge-kill  (local)         SIGKILL to the merge stage's python (found by `hyperjob.stages.merge` and the run dir
                              in its command line) while it writes the merged model: once its `.merged.*.partial`
                              directory holds shard files. `merged/` must not exist afterwards, then
                              `hyperjob resume RUN --wait` redoes the merge alone. The write takes ~10 ms on the
                              tiny model (merge.max_memory cannot stretch it: its floor, 16 MiB reserve + 1 MiB
                              chunk, already holds every tensor of the tiny model, and below it the merge refuses
                              to start), so the script polls every 0.2 ms and kills at once; a try that misses
                              (the merge finished first) is repeated on a fresh run, up to --merge-tries
  node-freeze (slurm2)        with --two-node: a 2 nodes x 2 processes train on the two-node test Slurm, one node
                              frozen mid-training (SIGSTOP to every process in its network namespace) with
                              cluster.requeue true; once Slurm has requeued the job the node is "rebooted" (its
                              processes killed, its slurmd started again) and the job must resume and complete

Columns: recovered = every stage COMPLETED and every hyperjob command exited as expected; data lost = the final
outputs differ from the baseline's: the losses of the last checkpoint's trainer_state.json step for step
(tolerance 1e-5), the adapter tensors and, for merge-kill, the merged model's tensors (max |diff| <= 1e-5; the
worst difference is printed); wall = seconds from `hyperjob submit` to the end of the run (the resume included);
overhead = wall / the baseline's wall of the same scheduler, measured in this invocation (the machine's load moves
both, so compare ratios, not seconds across invocations). evidence = what shows the fault happened and how the run
came back (log lines, restarts, the checkpoint train resumed from).

Slurm rows use the single-node cluster of `.ci/slurm/start.sh` if it runs (--slurm auto), start it (--slurm yes;
stopped again at the end if started here) or are skipped (--slurm no). --two-node starts
`.ci/slurm/start-2node.sh` if needed (root) and stops it at the end if it started it.

Exit status: 0 every fault recovered with no data lost; 1 some fault was not recovered or lost data; 3 all that
ran recovered, but some fault could not be injected where it should (e.g. training ended before the signal).

    .venv/bin/python bench/faults.py                 # local + single-node Slurm: ~4 min on 2 cores
    .venv/bin/python bench/faults.py --quick         # shorter training, one baseline run each: ~3 min
    .venv/bin/python bench/faults.py --two-node      # also the node freeze (root): ~3 min more
    .venv/bin/python bench/faults.py --faults after-save,merge-kill --slurm no
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parent.parent
TINY = REPO / "examples" / "tiny-cpu.yaml"
DOLLY = REPO / "examples" / "data" / "dolly-tiny.jsonl"
SLURM1_BASE = Path(os.environ.get("HYPERJOB_SLURM_BASE", "/tmp/hyperjob-slurm"))
SLURM2_BASE = Path(os.environ.get("HYPERJOB_SLURM2_BASE", "/tmp/hyperjob-slurm2"))
STAGES = ["download", "train", "merge"]
TOL = 1e-5
FAULT_ENV = "HYPERJOB_FAULT_AFTER_SAVE"
ALL_FAULTS = ("after-save", "usr2", "requeue", "merge-kill", "node-freeze")
TERMINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "LOST", "NODE_FAIL", "OUT_OF_MEMORY"}


class Missed(Exception):
    """The fault could not be injected where it should (too early or too late)."""


class NotRecovered(Exception):
    """hyperjob did not bring the run back."""


@dataclass
class Row:
    fault: str
    scheduler: str
    recovered: str = "no"  # yes / no / missed / skipped / -
    data: str = ""
    wall: float | None = None
    overhead: float | None = None
    evidence: str = ""
    lost: bool = False

    def cells(self) -> list[str]:
        wall = f"{self.wall:.1f}" if self.wall is not None else "-"
        over = f"{self.overhead:.2f}x" if self.overhead is not None else "-"
        cells = [self.fault, self.scheduler, self.recovered, self.data or "-", wall, over, self.evidence or "-"]
        return [" ".join(c.split()).replace("|", "\\|") for c in cells]  # one markdown cell each


@dataclass
class Setup:
    """One scheduler's way of running the pipeline: its config sections, environment, and baseline."""

    name: str  # local / slurm / slurm2
    scheduler: str  # what `--scheduler` gets
    training: dict[str, Any]
    cluster: dict[str, Any] = field(default_factory=dict)
    env: dict[str, str] = field(default_factory=dict)
    cluster_base: Path | None = None  # the Slurm test cluster's state directory (its slurmctld pid file)
    baseline: Path | None = None
    baseline_wall: float | None = None


# --- driving hyperjob --------------------------------------------------------------------------------------------


def base_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != FAULT_ENV}
    return {**env, **(extra or {})}


def hyperjob(args: list[str], env: dict[str, str], timeout: float) -> subprocess.CompletedProcess[str]:
    try:
        return subprocess.run([sys.executable, "-m", "hyperjob", *args], capture_output=True, text=True,
                              timeout=timeout, env=base_env(env), cwd=REPO)  # fmt: skip
    except subprocess.TimeoutExpired as e:
        raise NotRecovered(f"`hyperjob {' '.join(args[:2])}` still running after {timeout:.0f}s") from e


def hyperjob_bg(args: list[str], env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    out = log.open("wb")
    return subprocess.Popen([sys.executable, "-m", "hyperjob", *args], stdout=out, stderr=subprocess.STDOUT,
                            env=base_env(env), cwd=REPO)  # fmt: skip


def finish(proc: subprocess.Popen[bytes], log: Path, timeout: float) -> tuple[int, str]:
    try:
        rc = proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired as e:
        proc.kill()
        proc.wait()
        raise NotRecovered(f"`hyperjob submit --wait` still running after {timeout:.0f}s") from e
    return rc, log.read_text(errors="replace")


def write_config(where: Path, setup: Setup) -> Path:
    """The tiny example with its workdir under `where`: what tests/run_helpers.py's config() writes."""
    data = yaml.safe_load(TINY.read_text())
    data["workdir"] = str(where / "work")
    data["dataset"]["path"] = str(DOLLY)
    data["stages"] = STAGES
    data["training"].update(setup.training)
    data["cluster"].update(setup.cluster)
    where.mkdir(parents=True, exist_ok=True)
    path = where / "c.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def run_dirs(where: Path) -> list[Path]:
    """Finished run directories (hyperjob writes one as `.NAME.*.partial` and renames it when complete)."""
    runs = where / "work" / "runs"
    return [p for p in runs.iterdir() if not p.name.startswith(".")] if runs.is_dir() else []


def only_run_dir(where: Path) -> Path:
    (run_dir,) = run_dirs(where)
    return run_dir


def wait_run_dir(where: Path, proc: subprocess.Popen[bytes], timeout: float = 120) -> Path:
    wait_for("the run directory", lambda: bool(run_dirs(where)) or proc.poll() is not None, timeout)
    if not run_dirs(where):
        raise NotRecovered(f"hyperjob submit exited {proc.returncode} before making a run directory")
    return only_run_dir(where)


def status(run_dir: Path, env: dict[str, str]) -> dict[str, dict[str, Any]]:
    out = hyperjob(["status", str(run_dir), "--json"], env, 60)
    if out.returncode != 0:
        raise NotRecovered(f"hyperjob status failed: {out.stderr.strip()[-300:]}")
    return {s["name"]: s for s in json.loads(out.stdout)["stages"]}


def states(run_dir: Path, env: dict[str, str]) -> dict[str, str]:
    return {name: s["state"] for name, s in status(run_dir, env).items()}


def wait_for(what: str, done: Callable[[], bool], timeout: float, poll: float = 0.02) -> None:
    deadline = time.monotonic() + timeout
    while not done():
        if time.monotonic() > deadline:
            raise Missed(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(poll)


def train_job(run_dir: Path) -> str:
    stages = json.loads((run_dir / "manifest.json").read_text())["stages"]
    return str(next(s for s in stages if s["name"] == "train")["job_id"])


def train_log(run_dir: Path) -> str:
    return "".join(p.read_text(errors="replace") for p in sorted((run_dir / "logs").glob("02-train-*.out")))


def summary(run_dir: Path) -> dict[str, Any]:
    return json.loads((run_dir / "train_summary.json").read_text())


def newest_checkpoint(run_dir: Path) -> int:
    steps = [int(p.name.split("-")[1]) for p in (run_dir / "checkpoints").glob("checkpoint-*")
             if (p / "trainer_state.json").is_file()]  # fmt: skip
    return max(steps, default=0)


def checkpoint_ready(run_dir: Path, step: int) -> Callable[[], bool]:
    return lambda: (run_dir / "checkpoints" / f"checkpoint-{step}" / "trainer_state.json").is_file()


def require_completed(run_dir: Path, env: dict[str, str]) -> None:
    got = states(run_dir, env)
    if any(s != "COMPLETED" for s in got.values()):
        raise NotRecovered("stages: " + ", ".join(f"{k} {v}" for k, v in got.items()))


def slurm(env: dict[str, str], *cmd: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(cmd), capture_output=True, text=True, timeout=60, env=base_env(env), check=False)


# --- comparing outputs -------------------------------------------------------------------------------------------


def losses(run_dir: Path, steps: int) -> dict[int, float]:
    state = json.loads((run_dir / "checkpoints" / f"checkpoint-{steps}" / "trainer_state.json").read_text())
    return {e["step"]: e["loss"] for e in state["log_history"] if "loss" in e}


def tensors(files: list[Path]) -> dict[str, Any]:
    from safetensors.torch import load_file

    out: dict[str, Any] = {}
    for f in files:
        out.update(load_file(str(f)))
    return out


def worst_tensor_diff(a: dict[str, Any], b: dict[str, Any], what: str) -> float:
    if a.keys() != b.keys():
        raise NotRecovered(f"{what} tensor names differ: {sorted(a.keys() ^ b.keys())[:3]}")
    worst = 0.0
    for k in a:
        if a[k].shape != b[k].shape:
            return float("inf")
        if a[k].numel():
            worst = max(worst, (a[k].double() - b[k].double()).abs().max().item())
    return worst


def compare(run_dir: Path, baseline: Path, steps: int, merged: bool) -> tuple[bool, str]:
    """(lost?, text) for the final outputs of run_dir against the baseline's."""
    mine, ref = losses(run_dir, steps), losses(baseline, steps)
    if mine.keys() != ref.keys():
        return True, f"logged steps differ: {sorted(mine.keys() ^ ref.keys())[:5]}"
    d_loss = max(abs(mine[k] - ref[k]) for k in ref)
    d_adapter = worst_tensor_diff(tensors([run_dir / "adapter" / "adapter_model.safetensors"]),
                                  tensors([baseline / "adapter" / "adapter_model.safetensors"]), "adapter")  # fmt: skip
    parts = [f"loss {d_loss:.1e}", f"adapter {d_adapter:.1e}"]
    worst = max(d_loss, d_adapter)
    if merged:
        shards = [sorted((d / "merged").glob("*.safetensors")) for d in (run_dir, baseline)]
        d_merged = worst_tensor_diff(tensors(shards[0]), tensors(shards[1]), "merged")
        parts.append(f"merged {d_merged:.1e}")
        worst = max(worst, d_merged)
    lost = not worst <= TOL
    return lost, ("YES: " if lost else "none: ") + ", ".join(parts)


# --- the faults --------------------------------------------------------------------------------------------------


class Bench:
    def __init__(self, args: argparse.Namespace, root: Path) -> None:
        self.args = args
        self.root = root
        self.timeout = args.timeout
        self.live: list[tuple[Path, dict[str, str]]] = []  # runs to cancel if we stop early

    def where(self, name: str) -> Path:
        path = self.root / name
        shutil.rmtree(path, ignore_errors=True)
        return path

    def submit_wait(self, where: Path, setup: Setup, env: dict[str, str] | None = None) -> tuple[int, str, Path]:
        cfg = write_config(where, setup)
        proc = hyperjob_bg(["submit", str(cfg), "--scheduler", setup.scheduler, "--wait", "--poll", "1"],
                           {**setup.env, **(env or {})}, where / "submit.log")  # fmt: skip
        run_dir = wait_run_dir(where, proc)
        self.live.append((run_dir, setup.env))
        rc, out = finish(proc, where / "submit.log", self.timeout)
        return rc, out, run_dir

    def baseline(self, setup: Setup) -> Row:
        """The uninterrupted run, --baselines times: its wall is the median, its outputs the first run's (the
        others must match them: the pipeline is deterministic, or no comparison below would mean anything)."""
        row = Row("none (baseline)", setup.name)
        walls, agree = [], []
        setup.baseline = setup.baseline_wall = None
        for i in range(1, self.args.baselines + 1):
            where = self.where(f"{setup.name}-baseline-{i}")
            t0 = time.monotonic()
            rc, out, run_dir = self.submit_wait(where, setup)
            walls.append(time.monotonic() - t0)
            if rc != 0:
                raise NotRecovered(f"the uninterrupted run failed (exit {rc}): {out.strip()[-400:]}")
            require_completed(run_dir, setup.env)
            if setup.baseline is None:
                setup.baseline = run_dir
                continue
            lost, text = compare(run_dir, setup.baseline, setup.training["max_steps"], merged=True)
            if lost:
                raise NotRecovered(f"two uninterrupted runs differ ({text}): the pipeline is not deterministic")
            agree.append(text.split(": ", 1)[1])
        row.wall = setup.baseline_wall = statistics.median(walls)
        row.recovered, row.overhead, row.data = "-", 1.0, "(reference)"
        assert setup.baseline is not None
        s = summary(setup.baseline)
        row.evidence = f"{s['steps']} steps, world size {s['world_size']}; wall of {len(walls)} run(s): " + ", ".join(
            f"{w:.1f}" for w in walls
        )
        if agree:
            row.evidence += f"; the runs agree ({'; '.join(agree)})"
        return row

    def finish_row(self, row: Row, setup: Setup, run_dir: Path, t0: float, merged: bool = False) -> Row:
        row.wall = time.monotonic() - t0
        require_completed(run_dir, setup.env)
        assert setup.baseline is not None and setup.baseline_wall
        row.lost, row.data = compare(run_dir, setup.baseline, setup.training["max_steps"], merged)
        row.overhead = row.wall / setup.baseline_wall
        row.recovered = "yes"
        return row

    def resume(self, run_dir: Path, setup: Setup) -> str:
        out = hyperjob(["resume", str(run_dir), "--wait", "--poll", "1"], setup.env, self.timeout)
        if out.returncode != 0:
            raise NotRecovered(f"hyperjob resume exited {out.returncode}: {(out.stdout + out.stderr).strip()[-400:]}")
        return out.stdout

    # 1. train fails right after saving checkpoint N, then `hyperjob resume --wait`
    def after_save(self, setup: Setup) -> Row:
        row = Row(f"train fails after saving checkpoint {self.args.fault_step}", setup.name)
        where = self.where(f"{setup.name}-after-save")
        t0 = time.monotonic()
        rc, out, run_dir = self.submit_wait(where, setup, {FAULT_ENV: str(self.args.fault_step)})
        failed = states(run_dir, setup.env)
        if rc != 1 or failed.get("train") != "FAILED":
            raise Missed(f"submit exited {rc}, stages {failed}: the fault did not fail train: {out.strip()[-300:]}")
        resumed = self.resume(run_dir, setup)
        self.finish_row(row, setup, run_dir, t0)
        kept = [line.split()[0] for line in resumed.splitlines() if "  keep" in line]
        row.evidence = (f"submit exit 1, train FAILED; resume kept {', '.join(kept) or 'nothing'}, train resumed "
                        f"from {summary(run_dir)['resumed_from']}")  # fmt: skip
        if summary(run_dir)["resumed_from"] != f"checkpoint-{self.args.fault_step}":
            raise NotRecovered(f"train resumed from {summary(run_dir)['resumed_from']}, not the fault's checkpoint")
        return row

    def _mid_training(self, setup: Setup, name: str, inject: Callable[[Path, str], str]) -> tuple[Row, Path, float]:
        """Submit, wait for the first checkpoint, inject, wait for the end; returns the row (to finish), run, t0."""
        where = self.where(f"{setup.name}-{name}")
        save = setup.training["save_steps"]
        cfg = write_config(where, setup)
        t0 = time.monotonic()
        proc = hyperjob_bg(["submit", str(cfg), "--scheduler", setup.scheduler, "--wait", "--poll", "1"], setup.env,
                           where / "submit.log")  # fmt: skip
        run_dir = wait_run_dir(where, proc)
        self.live.append((run_dir, setup.env))
        try:
            wait_for(f"checkpoint-{save}", lambda: checkpoint_ready(run_dir, save)() or proc.poll() is not None,
                     self.timeout)  # fmt: skip
            at = newest_checkpoint(run_dir)
            if proc.poll() is not None or at >= setup.training["max_steps"]:
                raise Missed(f"training ended before the fault (newest checkpoint {at})")
            note = inject(run_dir, train_job(run_dir))
        except BaseException:
            with contextlib.suppress(Exception):
                finish(proc, where / "submit.log", self.timeout)
            raise
        rc, out = finish(proc, where / "submit.log", self.timeout)
        if rc != 0:
            raise NotRecovered(f"submit --wait exited {rc}: {out.strip()[-400:]}")
        row = Row(name, setup.name)
        row.evidence = f"injected at checkpoint {at}; {note}"
        return row, run_dir, t0

    # 2. USR2 to the train batch script: save, stop, requeue
    def usr2(self, setup: Setup) -> Row:
        def inject(run_dir: Path, job: str) -> str:
            out = slurm(setup.env, "scancel", "--signal=USR2", "--batch", job)
            if out.returncode != 0:
                raise Missed(f"scancel --signal=USR2 failed: {out.stderr.strip()}")
            return "scancel --signal=USR2 --batch"

        row, run_dir, t0 = self._mid_training(setup, "usr2", inject)
        row.fault = "USR2 to train's batch script mid-training"
        self.finish_row(row, setup, run_dir, t0)
        log = train_log(run_dir)
        outcome = (run_dir / "outcomes" / "02-train.outcome").read_text()
        restarts = next((ln.split("=")[1] for ln in outcome.splitlines() if ln.startswith("restarts=")), "?")
        saved = "asking train to save a checkpoint and stop" in log and "requeueing job" in log
        if not saved or restarts == "0":
            raise NotRecovered(f"no save-stop-requeue in train's log (restarts={restarts}): it ran to the end")
        row.evidence += (f"; train saved, stopped, requeued (restarts={restarts}), resumed from "
                         f"{summary(run_dir)['resumed_from']}")  # fmt: skip
        return row

    # 3. `scontrol requeue` mid-training
    def requeue(self, setup: Setup) -> Row:
        def inject(run_dir: Path, job: str) -> str:
            out = slurm(setup.env, "scontrol", "requeue", job)
            if out.returncode != 0:
                raise Missed(f"scontrol requeue failed: {out.stderr.strip()}")
            return "scontrol requeue"

        row, run_dir, t0 = self._mid_training(setup, "requeue", inject)
        row.fault = "`scontrol requeue` of train mid-training"
        self.finish_row(row, setup, run_dir, t0)
        resumed = summary(run_dir)["resumed_from"]
        if not resumed:
            raise NotRecovered("train did not resume from a checkpoint after the requeue")
        row.evidence += f"; requeued, resumed from {resumed}"
        return row

    # 4. SIGKILL of the merge stage's python while it writes merged/
    def merge_kill(self, setup: Setup) -> Row:
        misses = []
        for attempt in range(1, self.args.merge_tries + 1):
            where = self.where(f"{setup.name}-merge-kill")
            cfg = write_config(where, setup)
            t0 = time.monotonic()
            proc = hyperjob_bg(["submit", str(cfg), "--scheduler", setup.scheduler, "--wait", "--poll", "1"],
                               setup.env, where / "submit.log")  # fmt: skip
            run_dir = wait_run_dir(where, proc)
            self.live.append((run_dir, setup.env))
            try:
                killed = kill_mid_merge(run_dir, proc, self.timeout)
            finally:
                rc, out = finish(proc, where / "submit.log", self.timeout)
            if killed is None:
                misses.append("merge finished before the kill")
                continue
            pid, names = killed
            files = f"{sum(n.endswith('.safetensors') for n in names)} shard(s) of {len(names)} file(s)"
            merged_after_kill = (run_dir / "merged").exists()
            failed = states(run_dir, setup.env)
            if merged_after_kill and failed.get("merge") == "COMPLETED":
                misses.append("merge completed before the kill landed")
                continue
            if merged_after_kill:
                raise NotRecovered(f"a merged/ directory exists after merge was killed mid-write ({files} in the "
                                   f"partial dir): a partial model at the final path")  # fmt: skip
            if rc != 1 or failed.get("merge") != "FAILED":
                raise NotRecovered(f"after the kill: submit exit {rc}, stages {failed}: {out.strip()[-300:]}")
            resumed = self.resume(run_dir, setup)
            row = self.finish_row(Row("kill -9 of merge's python mid-merge", setup.name), setup, run_dir, t0,
                                  merged=True)  # fmt: skip
            left = [p.name for p in run_dir.glob(".merged.*.partial")]
            redo = [line.split()[0] for line in resumed.splitlines() if "  redo" in line]
            if left:
                raise NotRecovered(f"partial merge directories left after resume: {left}")
            row.evidence = (f"try {attempt}: killed pid {pid} with {files} in .merged.*.partial; merged/ "
                            f"absent after the kill; submit exit 1, merge FAILED; resume redid "
                            f"{', '.join(redo)}; no .partial left")  # fmt: skip
            if misses:
                row.evidence += f" (earlier tries: {'; '.join(misses)})"
            return row
        raise Missed(f"not caught mid-merge in {self.args.merge_tries} tries: {'; '.join(misses)}")

    # 5. a node frozen mid-step on the two-node Slurm, cluster.requeue true
    def node_freeze(self, setup: Setup, cluster: TwoNode) -> Row:
        def inject(run_dir: Path, job: str) -> str:
            node = cluster.nodes[1]
            t = time.monotonic()
            cluster.freeze(node)
            try:
                wait_for("Slurm to requeue train", lambda: cluster.restarts(job) > 0, 300, poll=1)
            finally:
                took = time.monotonic() - t
                cluster.reboot(node)
            return f"froze {node}; Slurm requeued train after {took:.0f}s; node rebooted"

        row, run_dir, t0 = self._mid_training(setup, "node-freeze", inject)
        row.fault = "node frozen mid-step (SIGSTOP of its namespace), cluster.requeue"
        self.finish_row(row, setup, run_dir, t0)
        s = summary(run_dir)
        if not s["resumed_from"] or s["world_size"] != 4:
            raise NotRecovered(f"train did not resume on 2 nodes: {s['resumed_from']}, world {s['world_size']}")
        row.evidence += f"; resumed from {s['resumed_from']} on world size {s['world_size']}"
        return row

    def cancel_live(self) -> None:
        for run_dir, env in self.live:
            with contextlib.suppress(Exception):
                hyperjob(["cancel", str(run_dir)], env, 60)


def proc_cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def find_merge_python(run_dir: Path) -> int | None:
    for proc in Path("/proc").glob("[0-9]*"):
        cmd = proc_cmdline(int(proc.name))
        if "hyperjob.stages.merge" in cmd and str(run_dir) in cmd and "python" in cmd.split(" ", 1)[0]:
            return int(proc.name)
    return None


def alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def merge_writing(run_dir: Path) -> list[str] | None:
    """The files of the merge's `.merged.*.partial` directory once it holds a shard (the writer has started)."""
    for entry in os.scandir(run_dir):
        if entry.name.startswith(".merged.") and entry.name.endswith(".partial"):
            with contextlib.suppress(OSError):
                names = os.listdir(entry.path)
                if any(n.endswith(".safetensors") for n in names):
                    return names
    return None


def kill_mid_merge(run_dir: Path, submit: subprocess.Popen[bytes], timeout: float) -> tuple[int, list[str]] | None:
    """SIGKILL the merge python once it writes shards into its partial output directory: (pid, what the directory
    held just before the kill), or None if the merge ended first."""
    deadline = time.monotonic() + timeout
    pid = None
    while pid is None:
        if submit.poll() is not None or time.monotonic() > deadline:
            raise NotRecovered(f"merge never started (submit exited {submit.returncode})")
        pid = find_merge_python(run_dir)
        time.sleep(0.02)
    old = os.getpriority(os.PRIO_PROCESS, 0)
    with contextlib.suppress(OSError):  # root only: react faster than the merge writes on a loaded machine
        os.setpriority(os.PRIO_PROCESS, 0, -10)
    try:
        n = 0
        while (names := merge_writing(run_dir)) is None:
            n += 1
            if n % 200 == 0 and not alive(pid):
                return None
            time.sleep(0.0002)
        os.kill(pid, signal.SIGKILL)
    finally:
        with contextlib.suppress(OSError):
            os.setpriority(os.PRIO_PROCESS, 0, old)
    return pid, names


# --- clusters ----------------------------------------------------------------------------------------------------


def conf_if_running(base: Path) -> str | None:
    """SLURM_CONF from a start script's env.sh, if its slurmctld is alive."""
    try:
        pid = int((base / "run" / "slurmctld.pid").read_text().strip())
        if "slurmctld" not in proc_cmdline(pid) or not alive(pid):
            return None
        lines = (base / "env.sh").read_text().splitlines()
    except (OSError, ValueError):
        return None
    return next((ln.split("=", 1)[1].strip() for ln in lines if ln.startswith("export SLURM_CONF=")), None)


def controller(base: Path | None) -> tuple[str, str] | None:
    """(pid, start time) of the cluster's slurmctld: changes when it is restarted."""
    if base is None:
        return None
    try:
        pid = (base / "run" / "slurmctld.pid").read_text().strip()
        return pid, Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def run_script(name: str, timeout: float = 900) -> None:
    proc = subprocess.run(["bash", str(REPO / ".ci" / "slurm" / name)], capture_output=True, text=True,
                          timeout=timeout, check=False)  # fmt: skip
    if proc.returncode != 0:
        raise RuntimeError(f"{name} failed (exit {proc.returncode}): {proc.stderr[-2000:]}")


@dataclass
class TwoNode:
    env: dict[str, str]
    partition: str
    nodes: tuple[str, ...]

    @classmethod
    def connect(cls, conf: str) -> TwoNode:
        env = {"SLURM_CONF": conf}
        rows = [ln.split() for ln in slurm(env, "sinfo", "--noheader", "--format=%P %N").stdout.splitlines() if ln]
        partition, nodelist = next((r for r in rows if r[0].endswith("*")), rows[0])
        hosts = slurm(env, "scontrol", "show", "hostnames", nodelist).stdout.split()
        return cls(env, partition.rstrip("*"), tuple(hosts))

    def pids(self, node: str) -> list[int]:
        out = subprocess.run(["ip", "netns", "pids", node], capture_output=True, text=True, timeout=30, check=True)
        return [int(p) for p in out.stdout.split()]

    def freeze(self, node: str) -> None:
        for pid in self.pids(node):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGSTOP)

    def reboot(self, node: str) -> None:
        for pid in self.pids(node):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        wait_for(f"{node}'s processes to die", lambda: not self.pids(node), 30, poll=0.2)
        run_script("start-2node.sh", 120)

    def restarts(self, job: str) -> int:
        out = slurm(self.env, "scontrol", "--oneliner", "show", "job", job).stdout
        return int(out.split("Restarts=", 1)[1].split()[0]) if "Restarts=" in out else 0


# --- main --------------------------------------------------------------------------------------------------------


def table(rows: list[Row]) -> str:
    head = ["fault", "scheduler", "recovered", "data lost (worst abs diff vs baseline)", "wall s", "overhead",
            "evidence"]  # fmt: skip
    lines = ["| " + " | ".join(head) + " |", "| " + " | ".join("---" for _ in head) + " |"]
    return "\n".join([*lines, *("| " + " | ".join(r.cells()) + " |" for r in rows)])


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--quick",
        action="store_true",
        help="shorter training (30 steps instead of 60; 100 instead of 200 on two nodes)",
    )
    p.add_argument(
        "--workdir",
        type=Path,
        default=None,
        help="parent of this invocation's temporary directory (default: the system temp dir)",
    )
    p.add_argument("--keep", action="store_true", help="keep the run directories (printed at the end)")
    p.add_argument(
        "--faults",
        default=",".join(ALL_FAULTS),
        help=f"comma-separated subset of {', '.join(ALL_FAULTS)} (node-freeze needs --two-node)",
    )
    p.add_argument("--slurm", choices=("auto", "yes", "no"), default="auto",
                   help="single-node Slurm rows: auto = if .ci/slurm/start.sh's cluster runs; yes = start it if "
                        "needed (stopped at the end if started here); no = skip them")  # fmt: skip
    p.add_argument(
        "--two-node",
        action="store_true",
        help="also freeze a node of the two-node Slurm (.ci/slurm/start-2node.sh; root)",
    )
    p.add_argument(
        "--baselines",
        type=int,
        default=None,
        help="uninterrupted runs per scheduler; the median wall is the reference (default 2, --quick 1)",
    )
    p.add_argument("--merge-tries", type=int, default=4, help="fresh runs to try catching the merge mid-write")
    p.add_argument("--timeout", type=float, default=600, help="seconds any one hyperjob command may take")
    args = p.parse_args(argv)
    args.faults = [f.strip() for f in args.faults.split(",") if f.strip()]
    if unknown := set(args.faults) - set(ALL_FAULTS):
        p.error(f"unknown faults {sorted(unknown)}; choose from {', '.join(ALL_FAULTS)}")
    args.steps, args.save_steps = (30, 5) if args.quick else (60, 5)
    args.fault_step = args.steps // 2
    if args.baselines is None:
        args.baselines = 1 if args.quick else 2
    args.steps2 = 100 if args.quick else 200
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    started = datetime.now(timezone.utc)
    t_all = time.monotonic()
    if args.workdir:
        args.workdir.mkdir(parents=True, exist_ok=True)
    root = Path(tempfile.mkdtemp(prefix="hyperjob-faults-", dir=args.workdir))
    bench = Bench(args, root)
    training = {"max_steps": args.steps, "save_steps": args.save_steps, "logging_steps": 1, "warmup": 0}
    stopped: list[str] = []
    rows: list[Row] = []
    started_here: list[str] = []

    def run_row(fault: str, setup: Setup, fn: Callable[[], Row]) -> Row:
        """One row; retried once if the cluster's slurmctld was restarted meanwhile (not by us: on a shared
        machine another test session may restart the test cluster, cancelling every job)."""
        for attempt in (1, 2):
            print(f"[{time.monotonic() - t_all:6.0f}s] {fault} ({setup.name}) ...", flush=True)
            before = controller(setup.cluster_base)
            try:
                row = fn()
            except Missed as e:
                row = Row(fault, setup.name, "missed", evidence=f"not injected: {e}")
            except (NotRecovered, AssertionError, OSError, subprocess.SubprocessError, KeyError, ValueError) as e:
                row = Row(fault, setup.name, "no", evidence=f"{type(e).__name__}: {e}")
            restarted = controller(setup.cluster_base) != before
            print(f"         -> recovered {row.recovered}; data {row.data or '-'}; "
                  f"wall {row.wall and round(row.wall, 1)}; {row.evidence}", flush=True)  # fmt: skip
            if restarted and attempt == 1 and row.recovered in ("no", "missed"):
                print("         (slurmctld was restarted during this row by something else: trying it again)")
                bench.cancel_live()
                continue
            if restarted:
                row.evidence += " (slurmctld was restarted by something else during this row)"
            if attempt == 2:
                row.evidence += " (second try: slurmctld was restarted by something else during the first)"
            break
        rows.append(row)
        return row

    try:
        setups: list[Setup] = [Setup("local", "local", training)]
        conf = conf_if_running(SLURM1_BASE)
        if conf is None and args.slurm == "yes":
            run_script("start.sh")
            started_here.append("stop.sh")
            conf = conf_if_running(SLURM1_BASE)
        if conf is not None and args.slurm != "no" and shutil.which("sbatch"):
            setups.append(Setup("slurm", "slurm", training, env={"SLURM_CONF": conf}, cluster_base=SLURM1_BASE))
        elif args.slurm != "no":
            stopped.append("no single-node Slurm running (start: bash .ci/slurm/start.sh, or --slurm yes)")
        two: TwoNode | None = None
        if args.two_node and "node-freeze" in args.faults:
            conf2 = conf_if_running(SLURM2_BASE)
            if conf2 is None:
                run_script("start-2node.sh")
                started_here.append("stop-2node.sh")
                conf2 = conf_if_running(SLURM2_BASE)
            assert conf2 is not None, "start-2node.sh left no slurmctld running"
            two = TwoNode.connect(conf2)
            training2 = {**training, "max_steps": args.steps2, "save_steps": 10}
            cluster2 = {"nodes": 2, "devices_per_node": 2, "partition": two.partition, "time": "00:20:00",
                        "requeue": True}  # fmt: skip
            setups.append(Setup("slurm2", "slurm", training2, cluster2, env=two.env, cluster_base=SLURM2_BASE))

        plan: dict[str, list[tuple[str, Callable[[Setup], Row]]]] = {
            "local": [("after-save", bench.after_save), ("merge-kill", bench.merge_kill)],
            "slurm": [("after-save", bench.after_save), ("usr2", bench.usr2), ("requeue", bench.requeue)],
            "slurm2": [("node-freeze", lambda s: bench.node_freeze(s, two))],  # type: ignore[arg-type]
        }
        for setup in setups:
            todo = [(f, fn) for f, fn in plan[setup.name] if f in args.faults]
            if not todo:
                continue
            base = run_row("none (baseline)", setup, lambda s=setup: bench.baseline(s))  # type: ignore[misc]
            if base.recovered != "-":
                stopped.append(f"{setup.name}: the baseline failed, its faults were not run")
                continue
            for fault, fn in todo:
                run_row(fault, setup, lambda fn=fn, s=setup: fn(s))  # type: ignore[misc]
    except KeyboardInterrupt:
        stopped.append("interrupted")
    finally:
        bench.cancel_live()
        for script in started_here:
            with contextlib.suppress(Exception):
                run_script(script, 300)
        if args.keep:
            print(f"runs kept under {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)

    total = time.monotonic() - t_all
    print()
    two_text = f"; two-node: {args.steps2} steps (save every 10)" if args.two_node else ""
    print(
        f"{started:%Y-%m-%d %H:%M} UTC, {os.cpu_count()} CPUs; local and slurm: {args.steps} steps (save every "
        f"{args.save_steps}){two_text}; {args.baselines} baseline run(s) per scheduler; whole benchmark {total:.0f} s\n"
    )
    print(table(rows))
    for line in stopped:
        print(f"\nnote: {line}")
    if any(r.recovered == "no" or r.lost for r in rows):
        return 1
    return 3 if any(r.recovered == "missed" for r in rows) or "interrupted" in stopped else 0


if __name__ == "__main__":
    raise SystemExit(main())
