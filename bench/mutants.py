"""Apply each mutant named in issue 12 to a clean clone of HEAD and show the test meant to catch it failing.

A mutant is a deliberate, realistic break of one claim (cancel that never calls scancel, a token written into
a marker file, ...). For each: clone HEAD into a temporary directory, replace one exact piece of text, run the
named tests against the clone (PYTHONPATH points there, so subprocesses and rendered scripts import the mutated
package too) and report KILLED when they fail, SURVIVED when they pass. `--baseline` first runs every named test
unmutated, which must pass. Slurm mutants need the project's Slurm (`source /tmp/hyperjob-slurm/env.sh`).

    .venv/bin/python bench/mutants.py [--baseline] [NAME ...]

Not run by CI (minutes, and it restarts the test cluster's controller); run it after changing a named test.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Mutant:
    name: str
    claim: str
    edits: tuple[tuple[str, str, str], ...]  # (file, exact old text, new text)
    tests: tuple[str, ...]
    command: tuple[str, ...] = ()  # instead of pytest on `tests`: killed when it exits non-zero
    env: dict[str, str] = field(default_factory=dict)


def edit(file: str, old: str, new: str) -> tuple[tuple[str, str, str], ...]:
    return ((file, old, new),)


TEMPLATE_NOTE = ("templates/_macros.sbatch.j2", "# Outcome record:", "# Outcome record (changed):")

MUTANTS = [
    Mutant("tilde-model-id", "a model.id like ~nobody/x is a ConfigError, not a traceback",
           edit("hyperjob/config/load.py", "except RuntimeError:  # `~name/...`", "except LookupError:  # `~name/...`"),
           ("tests/test_hostile.py::test_dangerous_string_in_every_field",)),
    Mutant("cancel-never-calls-scancel", "cancel stops the run's Slurm jobs",
           edit("hyperjob/schedule/scheduler_slurm.py", "        if ids:\n            slurm.cancel(ids)",
                "        pass"),
           ("tests/test_failures.py::test_cancel_slurm_run",)),
    Mutant("cancel-kills-only-the-executor", "cancel stops every process of a local run",
           edit("hyperjob/schedule/local.py", "os.kill(manifest.local_pid, signal.SIGTERM)",
                "os.kill(manifest.local_pid, signal.SIGKILL)"),
           ("tests/test_failures.py::test_cancel_local_background_run",)),
    Mutant("golden-update-in-ci", "CI compares golden files, never rewrites them", (TEMPLATE_NOTE,), (),
           command=("bash", ".ci/test.sh", "-k", "golden"), env={"HYPERJOB_UPDATE_GOLDEN": "1"}),
    Mutant("golden-rewritten-tree-dirty", "CI fails when the tests leave the tree different from the commit",
           (TEMPLATE_NOTE, ("tests/test_render.py", 'if os.environ.get("HYPERJOB_UPDATE_GOLDEN") == "1":', "if True:")),
           (), command=("bash", "-c", "before=$(bash .ci/tree-state.sh); python -m pytest -q -x tests/test_render.py "
                        '-k golden && [[ "$(bash .ci/tree-state.sh)" == "$before" ]]')),
    Mutant("token-in-download-marker", "the HF token is never written to any file",
           edit("hyperjob/stages/download.py", "write_marker(staging, repo_id, revision)",
                'write_marker(staging, repo_id, f"{revision} {token}")'),
           ("tests/test_hub.py::test_hub_token_reaches_the_hub_and_nowhere_else",)),
    Mutant("slurm-tests-skipped", "CI as root fails when a slurm test is skipped",
           edit("tests/fixtures_slurm.py", "    found = _answering_cluster()\n    started = False",
                '    pytest.skip("mutant: no Slurm")\n    found = _answering_cluster()\n    started = False'),
           ("tests/test_slurm_real.py",), env={"HYPERJOB_FORBID_SKIPS": "1"}),
    Mutant("token-rendered", "no rendered script holds the token",
           edit("hyperjob/render/scripts.py", 'return f"${cfg.model.token_env}" if cfg.model.token_env',
                'return __import__("os").environ.get(cfg.model.token_env) if cfg.model.token_env'),
           ("tests/test_render.py::test_token_never_rendered",)),
    Mutant("squeue-format-drift", "the squeue format is the one the parser reads",
           edit("hyperjob/schedule/parsers.py", 'SQUEUE_FORMAT = "%i|%T|%M|%N|%r"', 'SQUEUE_FORMAT = "%i|%T|%M|%r|%N"'),
           ("tests/test_slurm_parsers.py::test_real_squeue_answer_in_our_format_parses",)),
    Mutant("examples-lose-a-section", "each example's values are what the loaded config holds",
           edit("hyperjob/config/load.py", "return HyperjobConfig.model_validate(data)",
                'return HyperjobConfig.model_validate({k: v for k, v in data.items() if k != "lora"})'),
           ("tests/test_config.py::test_examples_validate",)),
    Mutant("data-order-by-hash", "every rank builds the same examples",
           edit("hyperjob/stages/data.py", "    for i, row in enumerate(rows):",
                "    for i, row in enumerate(sorted(rows, key=lambda r: hash(str(r)))):"),
           ("tests/test_stages_data.py::test_every_process_builds_the_same_examples",)),
    Mutant("auto-prefers-local", "--scheduler auto queues on Slurm when Slurm is there",
           edit("hyperjob/schedule/registry.py", "for sched in selectable():", "for sched in reversed(selectable()):"),
           ("tests/test_readme_claims.py::test_auto_with_slurm_queues_on_slurm",)),
    Mutant("failed-sbatch-leaves-queued", "a failed sbatch cancels the jobs already queued",
           edit("hyperjob/schedule/scheduler_slurm.py", "            if queued:\n                slurm.cancel(queued)",
                "            pass"),
           ("tests/test_readme_claims.py::test_failed_sbatch_cancels_the_jobs_already_queued",)),
    Mutant("multi-node-localhost-fallback", "a multi-node script outside an allocation fails loudly",
           (("templates/_macros.sbatch.j2", 'must run inside a Slurm allocation" >&2\n  exit 1',
             'must run inside a Slurm allocation" >&2\n  rdzv_host=localhost SLURM_JOB_ID=0'),
            ("templates/_macros.sbatch.j2", 'rdzv_host=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)',
             'rdzv_host=${rdzv_host:-$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)}')),
           ("tests/test_readme_claims.py::test_multi_node_script_fails_loudly_outside_an_allocation",)),
    Mutant("logs-follow-stops-at-once", "logs --follow keeps printing until the stage ends",
           edit("hyperjob/cli/cmd_run.py", "if not args.follow or state.is_terminal:", "if True:"),
           ("tests/test_readme_claims.py::test_logs_follow_streams_a_running_stage",)),
    Mutant("wait-gives-up-on-scheduler-error", "--wait outlives a controller restart",
           edit("hyperjob/schedule/run.py", "if time.monotonic() - failing_since > QUERY_FAILURE_GRACE_S:", "if True:"),
           ("tests/test_readme_claims.py::test_wait_survives_a_controller_restart",)),
]  # fmt: skip


def clone(dest: Path) -> None:
    subprocess.run(["git", "clone", "-q", "--local", "--no-hardlinks", str(REPO), str(dest)], check=True)
    (dest / ".venv").symlink_to(REPO / ".venv")  # .ci/test.sh finds the installed environment
    with (dest / ".git" / "info" / "exclude").open("a") as f:
        f.write(".venv\n")  # a symlink: `/.venv/` in .gitignore matches only a directory


def apply(m: Mutant, root: Path) -> None:
    for file, old, new in m.edits:
        path = root / file
        text = path.read_text()
        if text.count(old) != 1:
            raise SystemExit(f"{m.name}: expected exactly one {old!r} in {file}, found {text.count(old)}")
        path.write_text(text.replace(old, new))


def run_tests(m: Mutant, root: Path, *, baseline: bool = False) -> tuple[int, str, float]:
    pytest = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *m.tests]
    command = pytest if baseline else list(m.command) or pytest
    env = {**os.environ, "PYTHONPATH": str(root), **({} if baseline else m.env)}
    start = time.monotonic()
    proc = subprocess.run(command, cwd=root, env=env, capture_output=True, text=True, timeout=1800)
    return proc.returncode, (proc.stdout + proc.stderr)[-3000:], time.monotonic() - start


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("names", nargs="*", help=f"mutants to run (default: all): {', '.join(m.name for m in MUTANTS)}")
    parser.add_argument("--baseline", action="store_true", help="first check each named test passes unmutated")
    parser.add_argument("--verbose", "-v", action="store_true", help="print the tail of each run's output")
    args = parser.parse_args(argv)
    unknown = set(args.names) - {m.name for m in MUTANTS}
    if unknown:
        parser.error(f"unknown mutants: {', '.join(sorted(unknown))}")
    chosen = [m for m in MUTANTS if not args.names or m.name in args.names]
    survived = 0
    with tempfile.TemporaryDirectory(prefix="hyperjob-mutants-") as tmp:
        for m in chosen:
            root = Path(tmp) / m.name
            clone(root)
            if args.baseline and m.tests:
                code, out, took = run_tests(m, root, baseline=True)
                if code != 0:
                    print(f"BASELINE FAILS  {m.name} ({took:.0f}s)\n{out}")
                    return 2
            apply(m, root)
            code, out, took = run_tests(m, root)
            verdict = "KILLED  " if code != 0 else "SURVIVED"
            survived += code == 0
            print(f"{verdict} {m.name:<36} {took:6.1f}s  {m.claim}", flush=True)
            if args.verbose or code == 0:
                print("    " + "\n    ".join(out.strip().splitlines()[-8:]))
    print(f"{len(chosen) - survived} of {len(chosen)} mutants killed")
    return 1 if survived else 0


if __name__ == "__main__":
    raise SystemExit(main())
