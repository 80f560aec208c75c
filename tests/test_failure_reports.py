"""A failed stage explains itself: `status` and `submit --wait` show its error line, log and the resume command.

The log excerpts below are cut from real logs of failing tiny runs (local executor, torchrun with 2 ranks), with
paths anonymised; the Slurm ones follow what slurmstepd/srun 23.x print.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
from run_helpers import config, hyperjob, only_run_dir

from hyperjob.cli.report import failure_report
from hyperjob.plan.inputs import SAMPLE_ROWS
from hyperjob.schedule.errors import error_line, read_log_tail
from hyperjob.schedule.manifest import Manifest, StageRecord
from hyperjob.schedule.states import StageState

BANNER = "hyperjob: stage train of run tiny-cpu starting on vm at 2026-11-30T14:08:49+00:00 (job local)\n"

CHILD_FAILED = """\
W1130 14:09:05.382000 9793 torch/distributed/elastic/multiprocessing/api.py:1028] Sending process 9832 closing signal
E1130 14:09:05.446000 9793 torch/distributed/elastic/multiprocessing/api.py:1002] failed (exitcode: 2) local_rank: 1
Traceback (most recent call last):
  File "<frozen runpy>", line 198, in _run_module_as_main
  File "/venv/lib/python3.11/site-packages/torch/distributed/launcher/api.py", line 383, in launch_agent
    raise ChildFailedError(
torch.distributed.elastic.multiprocessing.errors.ChildFailedError: \n\
============================================================
hyperjob.stages.train FAILED
------------------------------------------------------------
Failures:
[1]:
  time      : 2026-11-30_14:09:05
  host      : localhost
  rank      : 0 (local_rank: 0)
  exitcode  : 2 (pid: 9832)
  error_file: <N/A>
  traceback : To enable traceback see: https://pytorch.org/docs/stable/elastic/errors.html
------------------------------------------------------------
Root Cause (first observed failure):
[0]:
  time      : 2026-11-30_14:09:05
  host      : localhost
  rank      : 1 (local_rank: 1)
  exitcode  : 2 (pid: 9833)
  error_file: <N/A>
  traceback : To enable traceback see: https://pytorch.org/docs/stable/elastic/errors.html
============================================================
"""

# A dataset whose rows lack the answer field: both ranks say so (stage's own line), then torchrun's summary.
MARKED_TWO_RANKS = f"""\
{BANNER}14:09:02 [train rank 1/2] INFO starting: world size 2, backend cpu, base /data/models/tiny-llama
hyperjob train (rank 1): error: /data/bad.jsonl:1: missing field 'response'
14:09:02 [train rank 0/2] INFO starting: world size 2, backend cpu, base /data/models/tiny-llama
hyperjob train (rank 0): error: /data/bad.jsonl:1: missing field 'response'
{CHILD_FAILED}"""

_RANK_TRACEBACK = """\
Traceback (most recent call last):
  File "<frozen runpy>", line 198, in _run_module_as_main
  File "/opt/app/hyperjob/stages/train.py", line 94, in train
    tokenizer = AutoTokenizer.from_pretrained(base)
                ^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^
  File "/usr/lib/python3.11/json/decoder.py", line 353, in raw_decode
    obj, end = self.scan_once(s, idx)
               ^^^^^^^^^^^^^^^^^^^^^^
json.decoder.JSONDecodeError: Expecting property name enclosed in double quotes: line 1 column 2 (char 1)
"""
# A corrupt tokenizer.json: an unexpected exception in both ranks, then torchrun's own ChildFailedError.
TRACEBACKS_UNDER_TORCHRUN = f"""\
{BANNER}14:09:19 [train rank 0/2] INFO starting: world size 2, backend cpu, base /data/models/tiny-llama
{_RANK_TRACEBACK}14:09:19 [train rank 1/2] INFO starting: world size 2, backend cpu, base /data/models/tiny-llama
{_RANK_TRACEBACK}{CHILD_FAILED.replace("exitcode  : 2 (pid: 9833)", "exitcode  : 1 (pid: 9833)")}"""
JSON_ERROR = "json.decoder.JSONDecodeError: Expecting property name enclosed in double quotes: line 1 column 2 (char 1)"

# torchrun --tee 3: every line of a rank carries `[rankN]:`, and two ranks' tracebacks interleave.
INTERLEAVED = """\
[rank0]:Traceback (most recent call last):
[rank1]:Traceback (most recent call last):
[rank1]:  File "/opt/app/hyperjob/stages/train.py", line 120, in train
[rank0]:  File "/opt/app/hyperjob/stages/train.py", line 120, in train
[rank1]:    trainer.train()
[rank1]:RuntimeError: Connection reset by peer
[rank0]:    trainer.train()
[rank0]:torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB
"""

TIME_LIMIT = (
    BANNER
    + """\
14:10:00 [train rank 0/2] INFO step 120/400 loss 1.93
slurmstepd: error: *** JOB 12 ON n1 CANCELLED AT 2026-11-30T14:39:02 DUE TO TIME LIMIT ***
slurmstepd: error: *** STEP 12.0 ON n1 CANCELLED AT 2026-11-30T14:39:02 DUE TO TIME LIMIT ***
W1130 14:39:02.001000 4242 torch/distributed/elastic/agent/server/api.py:704] Received 15 death signal
Traceback (most recent call last):
  File "/venv/lib/python3.11/site-packages/torch/distributed/elastic/multiprocessing/api.py", line 84, in _terminate
    raise SignalException(f"Process {os.getpid()} got signal: {sigval}", sigval=sigval)
torch.distributed.elastic.multiprocessing.api.SignalException: Process 4242 got signal: 15
"""
)

TIME_LIMIT_LINE = "slurmstepd: error: *** STEP 12.0 ON n1 CANCELLED AT 2026-11-30T14:39:02 DUE TO TIME LIMIT ***"

OOM_SLURM = """\
14:10:00 [merge rank 0/1] INFO merging 7 adapters
slurmstepd: error: Detected 1 oom_kill event in StepId=12.0. Some of the step tasks have been OOM Killed.
srun: error: n1: task 0: Out Of Memory
"""

TASK_EXIT = """\
srun: error: n1: task 0: Exited with exit code 1
srun: Terminating StepId=12.0
slurmstepd: error: *** STEP 12.0 ON n1 CANCELLED AT 2026-11-30T14:39:02 ***
"""

CASES = [
    pytest.param(MARKED_TWO_RANKS, "hyperjob train (rank 0): error: /data/bad.jsonl:1: missing field 'response'",
                 id="marked-two-ranks-under-torchrun"),
    pytest.param("14:00:01 [merge rank 0/1] INFO loading\nhyperjob merge: error: no adapter in /data/run/adapter\n",
                 "hyperjob merge: error: no adapter in /data/run/adapter", id="marked-single-process"),
    pytest.param("[rank1]:hyperjob train (rank 1): error: cannot read /data/x\n",
                 "hyperjob train (rank 1): error: cannot read /data/x", id="marked-with-tee-prefix"),
    pytest.param("  3: 2026-11-30T14:09:02.123Z hyperjob evaluate: error: bad prompt\n",
                 "hyperjob evaluate: error: bad prompt", id="marked-with-srun-label-and-timestamp"),
    pytest.param("hyperjob: error: config.yaml: training.lr: must be > 0\n",
                 "hyperjob: error: config.yaml: training.lr: must be > 0", id="cli-error-line"),
    pytest.param(f"hyperjob train (rank 0): error: no data\n{_RANK_TRACEBACK}",
                 "hyperjob train (rank 0): error: no data", id="marked-line-beats-a-later-traceback"),
    pytest.param(TRACEBACKS_UNDER_TORCHRUN, JSON_ERROR, id="tracebacks-under-torchrun-childfailed"),
    pytest.param(_RANK_TRACEBACK, JSON_ERROR, id="traceback-single-process"),
    pytest.param("Traceback (most recent call last):\n  File \"x.py\", line 1, in <module>\nKeyError: 'a'\n\n"
                 "During handling of the above exception, another exception occurred:\n\n"
                 "Traceback (most recent call last):\n  File \"x.py\", line 3, in <module>\n"
                 "ValueError: bad value\n  second line of the message\n",
                 "ValueError: bad value", id="chained-exceptions-last-wins"),
    pytest.param("Traceback (most recent call last):\n  File \"x.py\", line 1, in <module>\n"
                 "14:00:01 [train rank 1/2] INFO interleaved line\nKeyboardInterrupt\n",
                 "KeyboardInterrupt", id="exception-without-message-skips-interleaved-log-line"),
    pytest.param(INTERLEAVED, "rank 0: torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB",
                 id="interleaved-ranks-by-prefix"),
    pytest.param(TIME_LIMIT, TIME_LIMIT_LINE, id="time-limit-beats-torchrun-signal-traceback"),
    pytest.param(OOM_SLURM, "srun: error: n1: task 0: Out Of Memory", id="slurm-oom-kill"),
    pytest.param(TASK_EXIT, "srun: error: n1: task 0: Exited with exit code 1", id="srun-task-exit-first-not-echo"),
    pytest.param("14:00:01 [merge rank 0/1] INFO loading shards\n"
                 "/data/run/scripts/03-merge.sh: line 60:  4242 Killed                  \"$PYTHON\" -m x\n",
                 "/data/run/scripts/03-merge.sh: line 60:  4242 Killed                  \"$PYTHON\" -m x",
                 id="bash-killed-local-oom"),
    pytest.param(CHILD_FAILED.replace("exitcode  : 2 (pid: 9833)", "exitcode  : -9 (pid: 9833)")
                 .replace("traceback : To enable traceback see: https://pytorch.org/docs/stable/elastic/errors.html\n=",
                          "traceback : Signal 9 (SIGKILL) received by PID 9833\n="),
                 "torchrun: rank 1 was killed by signal 9 (SIGKILL)", id="torchrun-root-cause-signal"),
    pytest.param(CHILD_FAILED, "torchrun: rank 1 exited with code 2", id="torchrun-root-cause-exit-only"),
    pytest.param(f"hyperjob train (rank 0): error: old attempt\n{TIME_LIMIT}",
                 TIME_LIMIT_LINE,
                 id="requeued-log-only-last-attempt"),
    pytest.param(f"{BANNER}14:00:01 [train rank 0/1] INFO step 3\nhyperjob: stage train finished at now\n", None,
                 id="nothing-useful"),
    pytest.param("  File \"/opt/hyperjob/x.py\", line 3\nWARNING: /srv/hyperjob/x: error: y\n", None,
                 id="hyperjob-in-a-path-is-no-marked-line"),
    pytest.param("", None, id="empty"),
]  # fmt: skip


@pytest.mark.parametrize(("log", "expected"), CASES)
def test_error_line(log: str, expected: str | None) -> None:
    assert error_line(log) == expected


def test_read_log_tail_is_bounded_and_starts_at_a_whole_line(tmp_path: Path) -> None:
    log = tmp_path / "big.out"
    log.write_text("hyperjob train: error: early\n" + "".join(f"line {i}\n" for i in range(1000)))
    tail = read_log_tail(log, limit=100)
    assert len(tail.encode()) <= 100 and tail.startswith("line ") and tail.endswith("line 999\n")
    assert error_line(tail) is None  # the early error is beyond the bound
    assert error_line(read_log_tail(log)) == "hyperjob train: error: early"
    assert read_log_tail(tmp_path / "missing.out") == ""


def _manifest(run_dir: Path, *stages: StageRecord) -> Manifest:
    return Manifest("r", str(run_dir), "h", "slurm", "now", "0", stages)


def test_failure_report_names_state_signal_reason_and_cancelled(tmp_path: Path) -> None:
    log = tmp_path / "02-train-12.out"
    log.write_text(TIME_LIMIT)
    manifest = _manifest(
        tmp_path / "my run",
        StageRecord(1, "download", "s1", "11", StageState.COMPLETED, exit_code="0:0"),
        StageRecord(2, "train", "s2", "12", StageState.TIMEOUT, exit_code="0:15", log=str(log)),
        StageRecord(3, "merge", "s3", "13", StageState.LOST, reason="the scheduler forgot job 13"),
        StageRecord(4, "evaluate", "s4", "14", StageState.CANCELLED, reason="DependencyNeverSatisfied"),
    )
    assert failure_report(manifest) == [
        f"stage train failed (TIMEOUT, killed by signal 15): {TIME_LIMIT_LINE}",
        f"log: {log}",
        "stage merge failed (LOST): the scheduler forgot job 13",
        "log: (none)",
        "cancelled: evaluate (a stage before it failed)",
        f"resume with: hyperjob resume '{tmp_path}/my run'",
    ]


def test_failure_report_shows_a_short_tail_only_without_an_error_line(tmp_path: Path) -> None:
    log = tmp_path / "01-train-1.out"
    log.write_text("".join(f"step {i}\n" for i in range(10)))
    rec = StageRecord(1, "train", "s1", "1", StageState.FAILED, exit_code="1:0", log=str(log))
    report = failure_report(_manifest(tmp_path, rec), tail_lines=3)
    assert report[0] == "stage train failed (exit 1): its log names no error"
    assert report[2:5] == ["  | step 7", "  | step 8", "  | step 9"]
    assert failure_report(_manifest(tmp_path, StageRecord(1, "train", "s1", "1", StageState.COMPLETED))) == []


# --- end to end: a real failing local run ---------------------------------------------------------------------

# either rank; the first SAMPLE_ROWS rows are good (plan and submit check those), the train stage finds the next
MARKED = rf"hyperjob train \(rank [01]\): error: /\S+/no-answers\.jsonl:{SAMPLE_ROWS + 1}: missing field 'response'"


@pytest.fixture(scope="module")
def failed_run(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> tuple[Path, str]:
    """A local run whose train stage fails at run time (rows without the answer field) under torchrun, 2 ranks."""
    tmp = tmp_path_factory.mktemp("failed-run")
    shutil.copytree(tiny_model_dir, tmp / "work" / "models" / "tiny-llama")  # no download stage needed
    data = tmp / "no-answers.jsonl"
    rows = [{"instruction": f"q{i}", "context": "", "response": f"a{i}"} for i in range(SAMPLE_ROWS)]
    rows += [{"instruction": f"q{i}", "context": ""} for i in range(SAMPLE_ROWS, SAMPLE_ROWS + 4)]
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    cfg = config(tmp, ["train", "merge", "evaluate"], dataset={"path": str(data)}, training={"epochs": 1})
    out = hyperjob("submit", str(cfg), "--scheduler", "local", "--wait", "--poll", "0.5")
    assert out.returncode == 1, out.stdout + out.stderr
    return only_run_dir(tmp), out.stdout


def test_submit_wait_names_the_error_not_the_torchrun_tail(failed_run: tuple[Path, str]) -> None:
    run_dir, stdout = failed_run
    summary = stdout.split("run failed at stage train (FAILED)\n", 1)[1]
    assert re.fullmatch(rf"stage train failed \(exit 1\): {MARKED}", summary.splitlines()[0])
    assert "ChildFailedError" not in summary and "  | " not in summary  # no tail when the error line was found
    assert "cancelled: merge, evaluate (a stage before them failed)" in summary
    assert summary.rstrip().endswith(f"resume with: hyperjob resume {run_dir}")


def test_status_json_has_the_error_of_the_failed_stage_only(failed_run: tuple[Path, str]) -> None:
    run_dir, _ = failed_run
    out = hyperjob("status", str(run_dir), "--json")
    assert out.returncode == 1, out.stderr  # a stage failed
    stages = {s["name"]: s for s in json.loads(out.stdout)["stages"]}
    assert (stages["train"]["state"], stages["train"]["exit_code"]) == ("FAILED", "1:0")
    assert re.fullmatch(MARKED, stages["train"]["error"])
    assert stages["merge"]["error"] is None and stages["evaluate"]["error"] is None
    assert "error" not in (run_dir / "manifest.json").read_text()  # computed at display time, not stored


def test_status_prints_the_failure_and_the_resume_command(failed_run: tuple[Path, str]) -> None:
    run_dir, _ = failed_run
    out = hyperjob("status", str(run_dir))
    assert out.returncode == 1, out.stderr  # a stage failed
    lines = out.stdout.splitlines()
    at = next(i for i, line in enumerate(lines) if re.fullmatch(rf"stage train failed \(exit 1\): {MARKED}", line))
    log = next(run_dir.joinpath("logs").glob("*-train-*"))
    assert lines[at + 1 :] == [
        f"log: {log}",
        "cancelled: merge, evaluate (a stage before them failed)",
        f"resume with: hyperjob resume {run_dir}",
    ]
