"""Pure parsers for Slurm command output (sbatch, squeue, scontrol, host lists).

No subprocess here: hyperjob.schedule.slurm runs the commands and hands their stdout to these
functions, so every format quirk is table-tested without a cluster. The formats are the text ones of
Slurm 22.05 and later; `--json` output is avoided on purpose because its schema changes between
Slurm releases and needs a plugin that is not always installed.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from hyperjob.schedule.states import StageState, from_slurm

# squeue --format: job id, long state, elapsed, node list, reason. The reason is last because it is
# the only free-text column: a "|" inside it cannot shift the other columns (split at most 4 times).
SQUEUE_FORMAT = "%i|%T|%M|%N|%r"
_SQUEUE_COLUMNS = SQUEUE_FORMAT.count("|") + 1

# Values that Slurm prints for "nothing here".
_NULLS = frozenset({"", "(null)", "None", "N/A", "None assigned"})
_NO_TIME = frozenset({"", "INVALID", "N/A", "NONE", "NOT_SET", "UNKNOWN", "UNLIMITED", "PARTITION_LIMIT"})
_MAX_HOSTS = 100_000


@dataclass(frozen=True)
class JobInfo:
    """What hyperjob knows about one Slurm job at one moment.

    `exit_code`/`signal` come from `scontrol` (squeue does not show them) and only for finished jobs;
    `elapsed` is in seconds, None when Slurm has no start time; `stdout` is the resolved log path.
    """

    job_id: str
    state: StageState
    raw_state: str
    reason: str | None = None
    exit_code: int | None = None
    nodes: tuple[str, ...] = ()
    elapsed: int | None = None
    stdout: Path | None = None
    signal: int | None = None


# --- sbatch --------------------------------------------------------------------------------------

_PARSABLE = re.compile(r"(\d+)(?:;(\S+))?")


def parse_sbatch_parsable(stdout: str) -> str:
    """The job id from `sbatch --parsable` output: `123` or `123;cluster` (federation/multi-cluster)."""
    lines = [line.strip() for line in stdout.splitlines() if line.strip()]
    if len(lines) != 1:
        raise ValueError(f"sbatch --parsable: expected one line `<jobid>[;<cluster>]`, got {stdout!r}")
    match = _PARSABLE.fullmatch(lines[0])
    if match is None:
        raise ValueError(f"sbatch --parsable: expected `<jobid>[;<cluster>]`, got {lines[0]!r}")
    return match.group(1)


# --- durations and host lists --------------------------------------------------------------------

_DURATION = re.compile(r"(?:(\d+)-)?(?:(\d+):)?(\d+):(\d+)")


def parse_duration(text: str) -> int | None:
    """Seconds in a Slurm duration: `M:SS`, `H:MM:SS`, `D-HH:MM:SS` (squeue %M, scontrol RunTime)."""
    text = text.strip()
    if text.upper() in _NO_TIME:
        return None
    match = _DURATION.fullmatch(text)
    if match is None:
        raise ValueError(f"not a Slurm duration: {text!r}")
    days, hours, minutes, seconds = (int(g) if g else 0 for g in match.groups())
    return ((days * 24 + hours) * 60 + minutes) * 60 + seconds


def _split_top_level(text: str) -> Iterator[str]:
    """Split on commas outside brackets: `a[1,2],b` -> `a[1,2]`, `b`."""
    depth, start = 0, 0
    for i, char in enumerate(text):
        if char == "[":
            depth += 1
            if depth > 1:
                raise ValueError(f"nested brackets in host list {text!r}")
        elif char == "]":
            depth -= 1
            if depth < 0:
                raise ValueError(f"unbalanced ']' in host list {text!r}")
        elif char == "," and depth == 0:
            yield text[start:i]
            start = i + 1
    if depth != 0:
        raise ValueError(f"unbalanced '[' in host list {text!r}")
    yield text[start:]


def _expand_range(body: str, whole: str) -> list[str]:
    """`01-03,7` -> `01 02 03 7`; the width of the low end sets the zero padding, as in Slurm."""
    numbers: list[str] = []
    for item in body.split(","):
        low, sep, high = item.partition("-")
        if not low.isdigit() or (sep and not high.isdigit()):
            raise ValueError(f"bad range {item!r} in host list {whole!r}")
        if not sep:
            numbers.append(low)
            continue
        if int(high) < int(low):
            raise ValueError(f"descending range {item!r} in host list {whole!r}")
        if int(high) - int(low) >= _MAX_HOSTS:
            raise ValueError(f"range {item!r} in host list {whole!r} is too large")
        numbers.extend(str(n).zfill(len(low)) for n in range(int(low), int(high) + 1))
    return numbers


def _expand_host(part: str, whole: str) -> list[str]:
    """Expand every bracket group of one host pattern (cartesian product, left to right)."""
    open_at = part.find("[")
    if open_at < 0:
        return [part]
    close_at = part.index("]", open_at)
    prefix, body, rest = part[:open_at], part[open_at + 1 : close_at], part[close_at + 1 :]
    tails = _expand_host(rest, whole)
    return [f"{prefix}{number}{tail}" for number in _expand_range(body, whole) for tail in tails]


def expand_hostlist(hostlist: str) -> list[str]:
    """Expand a Slurm host list (`node[01-03,07],gpu5`) into host names, in order.

    For tests and offline reading of saved output; job scripts use `scontrol show hostnames`.
    """
    text = hostlist.strip()
    if text in _NULLS:
        return []
    hosts: list[str] = []
    for part in _split_top_level(text):
        if not part.strip():
            raise ValueError(f"empty host name in host list {hostlist!r}")
        hosts.extend(_expand_host(part.strip(), hostlist))
        if len(hosts) > _MAX_HOSTS:
            raise ValueError(f"host list {hostlist!r} expands to more than {_MAX_HOSTS} hosts")
    return hosts


def _reason(text: str) -> str | None:
    text = text.strip()
    return None if text in _NULLS else text


# --- squeue --------------------------------------------------------------------------------------


def parse_squeue(stdout: str) -> dict[str, JobInfo]:
    """Jobs from `squeue --noheader --format=SQUEUE_FORMAT`, keyed by squeue's job id.

    Array tasks keep squeue's spelling (`10_3`, pending `10_[4-7]`). squeue shows no exit code or log
    path; pending jobs carry their reason (`Dependency`, `DependencyNeverSatisfied`, `Resources`).
    """
    jobs: dict[str, JobInfo] = {}
    for line in stdout.splitlines():
        if not line.strip():
            continue
        columns = line.split("|", _SQUEUE_COLUMNS - 1)
        if len(columns) != _SQUEUE_COLUMNS:
            raise ValueError(f"squeue: expected {_SQUEUE_COLUMNS} columns of {SQUEUE_FORMAT!r}, got {line!r}")
        job_id, raw_state, elapsed, nodelist, reason = (c.strip() for c in columns)
        if not job_id or not raw_state:
            raise ValueError(f"squeue: empty job id or state in {line!r}")
        jobs[job_id] = JobInfo(
            job_id=job_id,
            state=from_slurm(raw_state),
            raw_state=raw_state,
            reason=_reason(reason),
            nodes=tuple(expand_hostlist(nodelist)),
            elapsed=parse_duration(elapsed),
        )
    return jobs


# --- scontrol show job -o ------------------------------------------------------------------------

# Keys whose values are free text that may contain spaces and even `X=y` (job names, command lines).
# Paths (WorkDir, StdOut, ...) may contain spaces too, but a ` Key=` inside a path is rare enough that
# any key ends them, which keeps a key added by a newer Slurm from being swallowed into a log path.
_FREE_TEXT_KEYS = frozenset({"JobName", "Command", "Comment", "AdminComment"})
# Keys printed by `scontrol show job` (22.05-24.x). Inside a free-text value only these end the value,
# so `Command=/x/train.sh LR=1e-4` keeps its argument; elsewhere any `CamelCase=` starts a new field.
# fmt: off
_KNOWN_KEYS = frozenset({
    "JobId", "ArrayJobId", "ArrayTaskId", "ArrayTaskThrottle", "HetJobId", "HetJobOffset", "HetJobIdSet", "JobName",
    "UserId", "GroupId", "MCS_label", "Priority", "Nice", "Account", "QOS", "JobState", "Reason", "Dependency",
    "Requeue", "Restarts", "BatchFlag", "Reboot", "ExitCode", "DerivedExitCode", "RunTime", "TimeLimit", "TimeMin",
    "SubmitTime", "EligibleTime", "AccrueTime", "StartTime", "EndTime", "Deadline", "PreemptEligibleTime",
    "PreemptTime", "SuspendTime", "SecsPreSuspend", "LastSchedEval", "Scheduler", "Partition", "AllocNode:Sid",
    "ReqNodeList", "ExcNodeList", "NodeList", "SchedNodeList", "BatchHost", "NumNodes", "NumCPUs", "NumTasks",
    "CPUs/Task", "ReqB:S:C:T", "TRES", "ReqTRES", "AllocTRES", "Socks/Node", "NtasksPerN:B:S:C", "CoreSpec",
    "MinCPUsNode", "MinMemoryNode", "MinMemoryCPU", "MinTmpDiskNode", "Features", "Prefer", "ClusterFeatures",
    "DelayBoot", "OverSubscribe", "Contiguous", "Licenses", "LicensesAlloc", "Network", "Command", "WorkDir",
    "AdminComment", "Comment", "StdErr", "StdIn", "StdOut", "Power", "KillOInInvalidDependent", "MailUser",
    "MailType", "Reservation", "TresPerNode", "TresPerJob", "TresPerTask", "TresPerSocket", "CpusPerTres",
    "MemPerTres", "TresBind", "TresFreq", "NtasksPerTRES", "CPU_Bind", "Container", "ContainerID", "SubmitLine",
    "Switches", "Wait-for-Switch", "Partitions", "ResizeTime"
})
# fmt: on
_KEY = re.compile(r"(?<!\S)([A-Z][A-Za-z0-9_:/-]*)=")


def split_scontrol_line(line: str) -> dict[str, str]:
    """`Key=value` pairs of one `scontrol -o` line; values keep inner spaces and `=` (`TRES=cpu=1,node=1`)."""
    pairs: dict[str, str] = {}
    key: str | None = None
    value_start = 0
    for match in _KEY.finditer(line):
        name = match.group(1)
        if key is not None:
            if key in _FREE_TEXT_KEYS and name not in _KNOWN_KEYS:
                continue  # `X=y` inside a path, job name or command line
            pairs[key] = line[value_start : match.start()].strip()
        elif line[: match.start()].strip():
            raise ValueError(f"scontrol: text before the first Key=value: {line!r}")
        key, value_start = name, match.end()
    if key is None:
        raise ValueError(f"scontrol: no Key=value pairs in {line!r}")
    pairs[key] = line[value_start:].strip()
    return pairs


def _scontrol_job_id(fields: dict[str, str]) -> str:
    """squeue's spelling of the id: plain `7`, array task `10_0` / pending tasks `10_[1-3]`, het `5+1`."""
    array_job, array_task = fields.get("ArrayJobId"), fields.get("ArrayTaskId")
    if array_job and array_task and array_task not in _NULLS:
        return f"{array_job}_{array_task}" if array_task.isdigit() else f"{array_job}_[{array_task}]"
    het_job, het_offset = fields.get("HetJobId"), fields.get("HetJobOffset")
    if het_job and het_offset and het_offset not in _NULLS:
        return f"{het_job}+{het_offset}"
    return fields["JobId"]


def _exit_status(text: str | None) -> tuple[int | None, int | None]:
    """`ExitCode=3:0` -> (3, 0): exit status and terminating signal."""
    if text is None:
        return None, None
    status, _, signal = text.partition(":")
    if not status.isdigit() or (signal and not signal.isdigit()):
        raise ValueError(f"scontrol: bad ExitCode {text!r}")
    return int(status), int(signal) if signal else None


def parse_scontrol_show_job(stdout: str) -> dict[str, JobInfo]:
    """Jobs from `scontrol --oneliner show job ID` (one line per job or array task), keyed like squeue.

    The exit code is reported only for finished jobs (Slurm prints `0:0` before a job ends). `elapsed`
    is None without a start time: a job cancelled while pending may have `StartTime=Unknown` and a
    RunTime counted from 1970 (`20780-22:41:45`); with a backfill estimate as StartTime it shows 0.
    """
    jobs: dict[str, JobInfo] = {}
    for line in stdout.splitlines():
        if not line.strip():
            continue
        fields = split_scontrol_line(line)
        if "JobId" not in fields or "JobState" not in fields:
            raise ValueError(f"scontrol: no JobId or JobState in {line!r}")
        job_id = _scontrol_job_id(fields)
        raw_state = fields["JobState"]
        state = from_slurm(raw_state)
        exit_code, signal = _exit_status(fields.get("ExitCode")) if state.is_terminal else (None, None)
        started = fields.get("StartTime", "Unknown").upper() not in _NO_TIME
        stdout_path = fields.get("StdOut", "")
        jobs[job_id] = JobInfo(
            job_id=job_id,
            state=state,
            raw_state=raw_state,
            reason=_reason(fields.get("Reason", "")),
            exit_code=exit_code,
            nodes=tuple(expand_hostlist(fields.get("NodeList", ""))),
            elapsed=parse_duration(fields.get("RunTime", "")) if started else None,
            stdout=None if stdout_path in _NULLS else Path(stdout_path),
            signal=signal,
        )
    return jobs
