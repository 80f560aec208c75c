"""How long does `hyperjob submit` take to queue the 6-stage Trainium DAG on a real Slurm?

Goal: < 2 s for the whole DAG. Runs against the cluster in SLURM_CONF (start one with
`.ci/slurm/start.sh`). Jobs are submitted held (#SBATCH --hold) and cancelled right after,
so nothing runs. Prints a markdown table for bench/RESULTS.md.

    .venv/bin/python bench/submit.py [--repeat 5]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from hyperjob.config.load import load_config
from hyperjob.plan.planner import make_plan
from hyperjob.schedule import slurm
from hyperjob.schedule.registry import get
from hyperjob.schedule.run import new_run_dir, submit_run, write_run_dir

REPO = Path(__file__).resolve().parent.parent
EXAMPLE = REPO / "examples" / "trainium-llama3-8b.yaml"
# Default partition, this interpreter, and every job held so nothing runs.
HELD = ["cluster.partition=null", f"environment.python={sys.executable}", "cluster.sbatch_extra=[--hold]"]


def one_submission(workdir: Path) -> tuple[float, float, list[str]]:
    """(render + write seconds, sbatch-chain seconds, job ids) for one run, in-process."""
    overrides = [f"workdir={workdir}", *HELD]
    t0 = time.perf_counter()
    cfg = load_config(EXAMPLE, overrides, check_inputs=False)
    plan = make_plan(cfg)
    run_dir = new_run_dir(cfg)
    manifest = write_run_dir(cfg, plan, run_dir, "slurm")
    assert manifest is not None
    t1 = time.perf_counter()
    manifest, _ = submit_run(get("slurm"), run_dir, manifest, echo=lambda _line: None)
    t2 = time.perf_counter()
    return t1 - t0, t2 - t1, [s.job_id for s in manifest.stages if s.job_id]


def cli_submission(workdir: Path) -> float:
    """Wall time of the whole `hyperjob submit` command, interpreter start-up included."""
    sets = [f"--set={o}" for o in (f"workdir={workdir}", *HELD)]
    cmd = [sys.executable, "-m", "hyperjob", "submit", str(EXAMPLE), "--scheduler", "slurm", *sets]
    t0 = time.perf_counter()
    out = subprocess.run(cmd, capture_output=True, text=True, check=True)
    elapsed = time.perf_counter() - t0
    ids = [line.split("job ")[1].split()[0] for line in out.stdout.splitlines() if " job " in line]
    slurm.cancel(ids)
    return elapsed


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    if not slurm.available():
        sys.exit("sbatch not on PATH: start a cluster with .ci/slurm/start.sh and source its env.sh")
    render, chain, cli = [], [], []
    with tempfile.TemporaryDirectory(prefix="hyperjob-bench-") as tmp:
        for _ in range(args.repeat):
            r, c, ids = one_submission(Path(tmp))
            slurm.cancel(ids)
            assert len(ids) == 6 and len(set(ids)) == 6
            render.append(r)
            chain.append(c)
        for _ in range(args.repeat):
            cli.append(cli_submission(Path(tmp)))
    print(f"6-stage Trainium DAG, {args.repeat} runs each, Slurm 22.05 single node (median / min / max, seconds)\n")
    print("| step | median | min | max |")
    print("| --- | --- | --- | --- |")
    for label, xs in (("render + write run dir", render), ("6 x sbatch with afterok", chain),
                      ("whole `hyperjob submit` command", cli)):  # fmt: skip
        print(f"| {label} | {statistics.median(xs):.3f} | {min(xs):.3f} | {max(xs):.3f} |")
    ok = statistics.median(cli) < 2.0
    print(f"\ngoal < 2 s for the whole command: {'met' if ok else 'NOT met'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
