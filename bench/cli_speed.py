"""How snappy is the `hyperjob` command? Start-up time of the light verbs against a bare Python baseline.

Every verb runs in a fresh child process (what a user waits for), N times; the median wall time is compared with
the baseline `python -c "import yaml"` (the interpreter plus the one library every verb needs). Ratios, not
seconds, are the figures to compare across machines. Goals (issue 16): `hyperjob --help` < 2x the baseline,
`hyperjob plan examples/tiny-cpu.yaml` < 4x. A last case times the import plan cannot avoid (the pydantic config
models), its floor. Children are run one after the other, interleaved per round, so a burst of load on a shared
machine hits every case alike.

    .venv/bin/python bench/cli_speed.py              # 21 rounds
    .venv/bin/python bench/cli_speed.py --runs 51 --json
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
TINY = REPO / "examples" / "tiny-cpu.yaml"
GOALS = {"hyperjob --help": 2.0, "hyperjob plan": 4.0}


def cases(python: str) -> dict[str, list[str]]:
    """Name -> command. `python -m hyperjob` is what the console script runs, minus the wrapper's own import."""
    return {
        "baseline: python -c 'import yaml'": [python, "-c", "import yaml"],
        "hyperjob --help": [python, "-m", "hyperjob", "--help"],
        "hyperjob plan": [python, "-m", "hyperjob", "plan", str(TINY)],
        # What plan cannot avoid: the typed config (pydantic and the schema of every section).
        "floor: import hyperjob.config.load": [python, "-c", "import hyperjob.config.load"],
    }


def time_once(cmd: list[str]) -> float:
    start = time.perf_counter()
    subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=True, cwd=REPO)
    return time.perf_counter() - start


def measure(commands: dict[str, list[str]], runs: int) -> dict[str, float]:
    """Median seconds per case; one warm-up round first (page cache, .pyc files)."""
    for cmd in commands.values():
        time_once(cmd)
    samples: dict[str, list[float]] = {name: [] for name in commands}
    for _ in range(runs):
        for name, cmd in commands.items():
            samples[name].append(time_once(cmd))
    return {name: statistics.median(s) for name, s in samples.items()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=21, help="rounds per case (default 21)")
    parser.add_argument("--python", default=sys.executable, help="interpreter with hyperjob installed")
    parser.add_argument("--json", action="store_true", help="print the figures as JSON")
    args = parser.parse_args()
    medians = measure(cases(args.python), args.runs)
    base = next(iter(medians.values()))
    rows = [
        {"case": name, "median_ms": round(sec * 1000, 1), "ratio": round(sec / base, 2), "goal": GOALS.get(name)}
        for name, sec in medians.items()
    ]
    if args.json:
        print(json.dumps({"runs": args.runs, "results": rows}, indent=2))
    else:
        print(f"median of {args.runs} runs each (fresh process per run)")
        for r in rows:
            verdict = "met" if r["goal"] is not None and r["ratio"] < r["goal"] else "MISSED"
            goal = "" if r["goal"] is None else f"  goal < {r['goal']}x: {verdict}"
            print(f"  {r['case']:<36} {r['median_ms']:8.1f} ms  {r['ratio']:5.2f}x{goal}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
