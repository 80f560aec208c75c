"""Table-driven tests for the pure Slurm parsers, the state table and slurm.py's command handling.

The squeue and scontrol samples are real output of Slurm 22.05.8 (Debian 12), captured from the
single-node cluster of .ci/slurm/start.sh; the few states that cluster cannot produce (OOM, NODE_FAIL)
are covered by the state table alone.
"""

from __future__ import annotations

import subprocess
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
from slurm_captures import answer, stored

from hyperjob.schedule import slurm
from hyperjob.schedule.parsers import (
    SQUEUE_FORMAT,
    JobInfo,
    expand_hostlist,
    parse_duration,
    parse_sbatch_parsable,
    parse_scontrol_show_job,
    parse_squeue,
    split_scontrol_line,
)
from hyperjob.schedule.states import SLURM_STATES, StageState, from_slurm, normalize_slurm_state

S = StageState

# --- real `scontrol --oneliner show job ID` lines (Slurm 22.05.8) --------------------------------

SCONTROL_RUNNING = (
    "JobId=1 JobName=ok.sh UserId=root(0) GroupId=root(0) MCS_label=N/A Priority=4294901759 Nice=0 "
    "Account=(null) QOS=(null) JobState=RUNNING Reason=None Dependency=(null) Requeue=1 Restarts=0 BatchFlag=1 "
    "Reboot=0 ExitCode=0:0 RunTime=00:00:00 TimeLimit=365-00:00:00 TimeMin=N/A SubmitTime=2026-11-23T22:41:04 "
    "EligibleTime=2026-11-23T22:41:04 AccrueTime=2026-11-23T22:41:04 StartTime=2026-11-23T22:41:05 "
    "EndTime=2027-11-23T22:41:05 Deadline=N/A SuspendTime=None SecsPreSuspend=0 "
    "LastSchedEval=2026-11-23T22:41:05 Scheduler=Backfill Partition=debug AllocNode:Sid=localhost:2172 "
    "ReqNodeList=(null) ExcNodeList=(null) NodeList=vm BatchHost=vm NumNodes=1 NumCPUs=1 NumTasks=1 CPUs/Task=1 "
    "ReqB:S:C:T=0:0:*:* TRES=cpu=1,node=1,billing=1 Socks/Node=* NtasksPerN:B:S:C=0:0:*:* CoreSpec=* "
    "MinCPUsNode=1 MinMemoryNode=0 MinTmpDiskNode=0 Features=(null) DelayBoot=00:00:00 OverSubscribe=OK "
    "Contiguous=0 Licenses=(null) Network=(null) Command=/tmp/hjx/ok.sh 3 WorkDir=/tmp/hjx "
    "StdErr=/tmp/hjx/out-1.log StdIn=/dev/null StdOut=/tmp/hjx/out-1.log Power= "
)

SCONTROL_PENDING_DEP = (
    "JobId=2 JobName=my job name UserId=root(0) GroupId=root(0) MCS_label=N/A Priority=4294901758 Nice=0 "
    "Account=(null) QOS=(null) JobState=PENDING Reason=Dependency Dependency=afterok:1(unfulfilled) Requeue=1 "
    "Restarts=0 BatchFlag=1 Reboot=0 ExitCode=0:0 RunTime=00:00:00 TimeLimit=UNLIMITED TimeMin=N/A "
    "SubmitTime=2026-11-23T22:41:04 EligibleTime=Unknown AccrueTime=Unknown StartTime=Unknown EndTime=Unknown "
    "Deadline=N/A SuspendTime=None SecsPreSuspend=0 LastSchedEval=2026-11-23T22:41:04 Scheduler=Main "
    "Partition=debug AllocNode:Sid=localhost:2172 ReqNodeList=(null) ExcNodeList=(null) NodeList= NumNodes=1 "
    "NumCPUs=1 NumTasks=1 CPUs/Task=1 ReqB:S:C:T=0:0:*:* TRES=cpu=1,mem=22899M,node=1,billing=1 Socks/Node=* "
    "NtasksPerN:B:S:C=0:0:*:* CoreSpec=* MinCPUsNode=1 MinMemoryNode=0 MinTmpDiskNode=0 Features=(null) "
    "DelayBoot=00:00:00 OverSubscribe=OK Contiguous=0 Licenses=(null) Network=(null) Command=/tmp/hjx/ok.sh 1 "
    "WorkDir=/tmp/hjx StdErr=/tmp/hjx/slurm-2.out StdIn=/dev/null StdOut=/tmp/hjx/slurm-2.out Power= "
    "KillOInInvalidDependent=Yes "
)

SCONTROL_FAILED = (
    "JobId=7 JobName=ok.sh UserId=root(0) GroupId=root(0) MCS_label=N/A Priority=4294901754 Nice=0 "
    "Account=(null) QOS=(null) JobState=FAILED Reason=NonZeroExitCode Dependency=(null) Requeue=1 Restarts=0 "
    "BatchFlag=1 Reboot=0 ExitCode=3:0 RunTime=00:00:01 TimeLimit=UNLIMITED TimeMin=N/A "
    "SubmitTime=2026-11-23T22:41:43 EligibleTime=2026-11-23T22:41:43 AccrueTime=2026-11-23T22:41:43 "
    "StartTime=2026-11-23T22:41:43 EndTime=2026-11-23T22:41:44 Deadline=N/A SuspendTime=None SecsPreSuspend=0 "
    "LastSchedEval=2026-11-23T22:41:43 Scheduler=Main Partition=debug AllocNode:Sid=localhost:2172 "
    "ReqNodeList=(null) ExcNodeList=(null) NodeList=vm BatchHost=vm NumNodes=1 NumCPUs=1 NumTasks=1 CPUs/Task=1 "
    "ReqB:S:C:T=0:0:*:* TRES=cpu=1,node=1,billing=1 Socks/Node=* NtasksPerN:B:S:C=0:0:*:* CoreSpec=* "
    "MinCPUsNode=1 MinMemoryNode=0 MinTmpDiskNode=0 Features=(null) DelayBoot=00:00:00 OverSubscribe=OK "
    "Contiguous=0 Licenses=(null) Network=(null) Command=/tmp/hjx/ok.sh 1 3 WorkDir=/tmp/hjx StdErr=/dev/null "
    "StdIn=/dev/null StdOut=/dev/null Power= "
)

SCONTROL_DEP_NEVER = (
    "JobId=8 JobName=ok.sh UserId=root(0) GroupId=root(0) MCS_label=N/A Priority=4294901753 Nice=0 "
    "Account=(null) QOS=(null) JobState=CANCELLED Reason=DependencyNeverSatisfied Dependency=afterok:7(failed) "
    "Requeue=1 Restarts=0 BatchFlag=1 Reboot=0 ExitCode=0:0 RunTime=20780-22:41:45 TimeLimit=UNLIMITED "
    "TimeMin=N/A SubmitTime=2026-11-23T22:41:43 EligibleTime=Unknown AccrueTime=Unknown StartTime=Unknown "
    "EndTime=2026-11-23T22:41:45 Deadline=N/A SuspendTime=None SecsPreSuspend=0 "
    "LastSchedEval=2026-11-23T22:41:43 Scheduler=Main Partition=debug AllocNode:Sid=localhost:2172 "
    "ReqNodeList=(null) ExcNodeList=(null) NodeList= NumNodes=1 NumCPUs=1 NumTasks=N/A CPUs/Task=1 "
    "ReqB:S:C:T=0:0:*:* TRES=cpu=1,mem=22899M,node=1,billing=1 Socks/Node=* NtasksPerN:B:S:C=0:0:*:* CoreSpec=* "
    "MinCPUsNode=1 MinMemoryNode=0 MinTmpDiskNode=0 Features=(null) DelayBoot=00:00:00 OverSubscribe=OK "
    "Contiguous=0 Licenses=(null) Network=(null) Command=/tmp/hjx/ok.sh 0 WorkDir=/tmp/hjx StdErr=/dev/null "
    "StdIn=/dev/null StdOut=/dev/null Power= KillOInInvalidDependent=Yes "
)

SCONTROL_ARRAY_TASK = (
    "JobId=11 ArrayJobId=10 ArrayTaskId=0 JobName=ok.sh UserId=root(0) GroupId=root(0) MCS_label=N/A "
    "Priority=4294901751 Nice=0 Account=(null) QOS=(null) JobState=COMPLETED Reason=None Dependency=(null) "
    "Requeue=1 Restarts=0 BatchFlag=1 Reboot=0 ExitCode=0:0 RunTime=00:00:02 TimeLimit=UNLIMITED TimeMin=N/A "
    "SubmitTime=2026-11-23T22:41:43 EligibleTime=2026-11-23T22:41:43 AccrueTime=2026-11-23T22:41:43 "
    "StartTime=2026-11-23T22:41:43 EndTime=2026-11-23T22:41:45 Deadline=N/A SuspendTime=None SecsPreSuspend=0 "
    "LastSchedEval=2026-11-23T22:41:43 Scheduler=Main Partition=debug AllocNode:Sid=localhost:2172 "
    "ReqNodeList=(null) ExcNodeList=(null) NodeList=vm BatchHost=vm NumNodes=1 NumCPUs=1 NumTasks=1 CPUs/Task=1 "
    "ReqB:S:C:T=0:0:*:* TRES=cpu=1,node=1,billing=1 Socks/Node=* NtasksPerN:B:S:C=0:0:*:* CoreSpec=* "
    "MinCPUsNode=1 MinMemoryNode=0 MinTmpDiskNode=0 Features=(null) DelayBoot=00:00:00 OverSubscribe=OK "
    "Contiguous=0 Licenses=(null) Network=(null) Command=/tmp/hjx/ok.sh 2 WorkDir=/tmp/hjx StdErr=/dev/null "
    "StdIn=/dev/null StdOut=/dev/null Power= "
)

SCONTROL_SPACES = (
    "JobId=15 JobName=train stage=1 UserId=root(0) GroupId=root(0) MCS_label=N/A Priority=4294901749 Nice=0 "
    "Account=(null) QOS=(null) JobState=RUNNING Reason=None Dependency=(null) Requeue=1 Restarts=0 BatchFlag=1 "
    "Reboot=0 ExitCode=0:0 RunTime=00:00:03 TimeLimit=365-00:00:00 TimeMin=N/A SubmitTime=2026-11-23T22:42:01 "
    "EligibleTime=2026-11-23T22:42:01 AccrueTime=2026-11-23T22:42:01 StartTime=2026-11-23T22:42:02 "
    "EndTime=2027-11-23T22:42:02 Deadline=N/A SuspendTime=None SecsPreSuspend=0 "
    "LastSchedEval=2026-11-23T22:42:02 Scheduler=Backfill Partition=debug AllocNode:Sid=localhost:2172 "
    "ReqNodeList=(null) ExcNodeList=(null) NodeList=vm BatchHost=vm NumNodes=1 NumCPUs=1 NumTasks=1 CPUs/Task=1 "
    "ReqB:S:C:T=0:0:*:* TRES=cpu=1,node=1,billing=1 Socks/Node=* NtasksPerN:B:S:C=0:0:*:* CoreSpec=* "
    "MinCPUsNode=1 MinMemoryNode=0 MinTmpDiskNode=0 Features=(null) DelayBoot=00:00:00 OverSubscribe=OK "
    "Contiguous=0 Licenses=(null) Network=(null) Command=dir with space/my script.sh 30 WorkDir=/tmp/hjx/dir "
    "with space Comment=note a=b  StdErr=/tmp/hjx/dir with space/slurm-15.out StdIn=/dev/null "
    "StdOut=/tmp/hjx/dir with space/slurm-15.out Power= "
)

SCONTROL_TIMEOUT = (
    "JobId=14 JobName=wrap UserId=root(0) GroupId=root(0) MCS_label=N/A Priority=4294901750 Nice=0 "
    "Account=(null) QOS=(null) JobState=TIMEOUT Reason=TimeLimit Dependency=(null) Requeue=1 Restarts=0 "
    "BatchFlag=1 Reboot=0 ExitCode=0:15 RunTime=00:01:27 TimeLimit=00:01:00 TimeMin=N/A "
    "SubmitTime=2026-11-23T22:42:01 EligibleTime=2026-11-23T22:42:01 AccrueTime=2026-11-23T22:42:01 "
    "StartTime=2026-11-23T22:42:02 EndTime=2026-11-23T22:43:29 Deadline=N/A SuspendTime=None SecsPreSuspend=0 "
    "LastSchedEval=2026-11-23T22:42:02 Scheduler=Backfill Partition=debug AllocNode:Sid=localhost:2172 "
    "ReqNodeList=(null) ExcNodeList=(null) NodeList=vm BatchHost=vm NumNodes=1 NumCPUs=1 NumTasks=1 CPUs/Task=1 "
    "ReqB:S:C:T=0:0:*:* TRES=cpu=1,node=1,billing=1 Socks/Node=* NtasksPerN:B:S:C=0:0:*:* CoreSpec=* "
    "MinCPUsNode=1 MinMemoryNode=0 MinTmpDiskNode=0 Features=(null) DelayBoot=00:00:00 OverSubscribe=OK "
    "Contiguous=0 Licenses=(null) Network=(null) Command=(null) WorkDir=/tmp/hjx StdErr=/dev/null "
    "StdIn=/dev/null StdOut=/dev/null Power= "
)

SCONTROL_ARRAY_PENDING = (
    "JobId=18 ArrayJobId=18 ArrayTaskId=0-3%2 ArrayTaskThrottle=2 JobName=wrap UserId=root(0) GroupId=root(0) "
    "MCS_label=N/A Priority=0 Nice=0 Account=(null) QOS=(null) JobState=CANCELLED Reason=JobHeldUser "
    "Dependency=(null) Requeue=1 Restarts=0 BatchFlag=1 Reboot=0 ExitCode=0:0 RunTime=00:00:00 "
    "TimeLimit=UNLIMITED TimeMin=N/A SubmitTime=2026-11-23T22:45:06 EligibleTime=Unknown AccrueTime=Unknown "
    "StartTime=2026-11-23T22:45:06 EndTime=2026-11-23T22:45:06 Deadline=N/A SuspendTime=None SecsPreSuspend=0 "
    "LastSchedEval=2026-11-23T22:45:06 Scheduler=Main Partition=debug AllocNode:Sid=localhost:2172 "
    "ReqNodeList=(null) ExcNodeList=(null) NodeList= NumNodes=1 NumCPUs=1 NumTasks=N/A CPUs/Task=1 "
    "ReqB:S:C:T=0:0:*:* TRES=cpu=1,mem=22899M,node=1,billing=1 Socks/Node=* NtasksPerN:B:S:C=0:0:*:* CoreSpec=* "
    "MinCPUsNode=1 MinMemoryNode=0 MinTmpDiskNode=0 Features=(null) DelayBoot=00:00:00 OverSubscribe=OK "
    "Contiguous=0 Licenses=(null) Network=(null) Command=(null) WorkDir=/tmp/hjx StdErr=/dev/null "
    "StdIn=/dev/null StdOut=/dev/null Power= "
)

SCONTROL_CANCELLED_PENDING = (
    "JobId=16 JobName=wrap UserId=root(0) GroupId=root(0) MCS_label=N/A Priority=4294901748 Nice=0 "
    "Account=(null) QOS=(null) JobState=CANCELLED Reason=Resources Dependency=(null) Requeue=1 Restarts=0 "
    "BatchFlag=1 Reboot=0 ExitCode=0:0 RunTime=00:00:00 TimeLimit=UNLIMITED TimeMin=N/A "
    "SubmitTime=2026-11-23T22:42:01 EligibleTime=2026-11-23T22:42:01 AccrueTime=2026-11-23T22:42:01 "
    "StartTime=2026-11-23T22:42:03 EndTime=2026-11-23T22:42:03 Deadline=N/A SuspendTime=None SecsPreSuspend=0 "
    "LastSchedEval=2026-11-23T22:42:03 Scheduler=Main Partition=debug AllocNode:Sid=localhost:2172 "
    "ReqNodeList=(null) ExcNodeList=(null) NodeList= SchedNodeList=vm NumNodes=1 NumCPUs=1 NumTasks=N/A "
    "CPUs/Task=1 ReqB:S:C:T=0:0:*:* TRES=cpu=1,mem=22899M,node=1,billing=1 Socks/Node=* NtasksPerN:B:S:C=0:0:*:* "
    "CoreSpec=* MinCPUsNode=1 MinMemoryNode=0 MinTmpDiskNode=0 Features=(null) DelayBoot=00:00:00 "
    "OverSubscribe=OK Contiguous=0 Licenses=(null) Network=(null) Command=(null) WorkDir=/tmp/hjx "
    "StdErr=/dev/null StdIn=/dev/null StdOut=/dev/null Power= "
)

SCONTROL_CANCELLED = (
    "JobId=19 JobName=wrap UserId=root(0) GroupId=root(0) MCS_label=N/A Priority=4294901747 Nice=0 "
    "Account=(null) QOS=(null) JobState=CANCELLED Reason=None Dependency=(null) Requeue=1 Restarts=0 BatchFlag=1 "
    "Reboot=0 ExitCode=0:15 RunTime=00:00:02 TimeLimit=365-00:00:00 TimeMin=N/A SubmitTime=2026-11-23T22:45:36 "
    "EligibleTime=2026-11-23T22:45:36 AccrueTime=2026-11-23T22:45:36 StartTime=2026-11-23T22:45:36 "
    "EndTime=2026-11-23T22:45:38 Deadline=N/A SuspendTime=None SecsPreSuspend=0 "
    "LastSchedEval=2026-11-23T22:45:36 Scheduler=Backfill Partition=debug AllocNode:Sid=localhost:2172 "
    "ReqNodeList=(null) ExcNodeList=(null) NodeList=vm BatchHost=vm NumNodes=1 NumCPUs=1 NumTasks=1 CPUs/Task=1 "
    "ReqB:S:C:T=0:0:*:* TRES=cpu=1,node=1,billing=1 Socks/Node=* NtasksPerN:B:S:C=0:0:*:* CoreSpec=* "
    "MinCPUsNode=1 MinMemoryNode=0 MinTmpDiskNode=0 Features=(null) DelayBoot=00:00:00 OverSubscribe=OK "
    "Contiguous=0 Licenses=(null) Network=(null) Command=(null) WorkDir=/tmp/hjx StdErr=/dev/null "
    "StdIn=/dev/null StdOut=/dev/null Power= "
)

# --- states --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("PENDING", S.PENDING),
        ("PD", S.PENDING),
        ("RESV_DEL_HOLD", S.PENDING),
        ("RUNNING", S.RUNNING),
        ("R", S.RUNNING),
        ("CONFIGURING", S.RUNNING),
        ("COMPLETING", S.RUNNING),
        ("CG", S.RUNNING),
        ("RESIZING", S.RUNNING),
        ("SIGNALING", S.RUNNING),
        ("STAGE_OUT", S.RUNNING),
        ("SUSPENDED", S.SUSPENDED),
        ("STOPPED", S.SUSPENDED),
        ("REQUEUED", S.REQUEUED),
        ("REQUEUE_HOLD", S.REQUEUED),
        ("REQUEUE_FED", S.REQUEUED),
        ("SPECIAL_EXIT", S.REQUEUED),
        ("COMPLETED", S.COMPLETED),
        ("CD", S.COMPLETED),
        ("FAILED", S.FAILED),
        ("F", S.FAILED),
        ("CANCELLED", S.CANCELLED),
        ("CANCELLED by 0", S.CANCELLED),
        ("CANCELLED by 1000", S.CANCELLED),
        ("REVOKED", S.CANCELLED),
        ("TIMEOUT", S.TIMEOUT),
        ("DEADLINE", S.TIMEOUT),
        ("OUT_OF_MEMORY", S.OUT_OF_MEMORY),
        ("OOM", S.OUT_OF_MEMORY),
        ("NODE_FAIL", S.NODE_FAIL),
        ("BOOT_FAIL", S.NODE_FAIL),
        ("PREEMPTED", S.PREEMPTED),
        ("  running\n", S.RUNNING),
        ("RUNNING+", S.RUNNING),
        ("", S.UNKNOWN),
        ("LAUNCH_FAILED", S.UNKNOWN),
        ("Dependency", S.UNKNOWN),
        ("bogus state", S.UNKNOWN),
    ],
)
def test_from_slurm(raw: str, expected: StageState) -> None:
    assert from_slurm(raw) is expected


@pytest.mark.parametrize(
    ("raw", "expected"),
    [("CANCELLED by 0", "CANCELLED"), ("running", "RUNNING"), ("COMPLETED+", "COMPLETED"), ("   ", "")],
)
def test_normalize_slurm_state(raw: str, expected: str) -> None:
    assert normalize_slurm_state(raw) == expected


def test_state_table_keys_are_normalized_and_cover_every_slurm_outcome() -> None:
    assert all(normalize_slurm_state(name) == name for name in SLURM_STATES)
    produced = set(SLURM_STATES.values())
    assert produced == set(StageState) - {S.RENDERED, S.UNKNOWN, S.LOST}  # LOST is hyperjob's, never Slurm's


@pytest.mark.parametrize(
    ("state", "terminal", "success"),
    [
        (S.RENDERED, False, False),
        (S.PENDING, False, False),
        (S.RUNNING, False, False),
        (S.SUSPENDED, False, False),
        (S.REQUEUED, False, False),
        (S.UNKNOWN, False, False),
        (S.COMPLETED, True, True),
        (S.FAILED, True, False),
        (S.CANCELLED, True, False),
        (S.TIMEOUT, True, False),
        (S.OUT_OF_MEMORY, True, False),
        (S.NODE_FAIL, True, False),
        (S.PREEMPTED, True, False),
        (S.LOST, True, False),
    ],
)
def test_state_properties(state: StageState, terminal: bool, success: bool) -> None:
    assert state.is_terminal is terminal
    assert state.is_success is success
    assert StageState(state.value) is state
    assert str(state) == state.value


# --- sbatch --parsable ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("stdout", "expected"),
    [("4\n", "4"), ("123456", "123456"), ("42;hyperjob\n", "42"), ("\n  77  \n\n", "77")],
)
def test_parse_sbatch_parsable(stdout: str, expected: str) -> None:
    assert parse_sbatch_parsable(stdout) == expected


@pytest.mark.parametrize(
    "stdout",
    ["", "\n", "Submitted batch job 123\n", "abc\n", "12 34\n", "123;\n", "-1\n", "123\n456\n", "123_4\n"],
)
def test_parse_sbatch_parsable_rejects(stdout: str) -> None:
    with pytest.raises(ValueError, match="sbatch --parsable"):
        parse_sbatch_parsable(stdout)


# --- durations and host lists --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("0:00", 0),
        ("0:03", 3),
        ("1:27", 87),
        ("00:01:27", 87),
        ("1:02:03", 3723),
        ("365-00:00:00", 365 * 86400),
        ("1-02:03:04", 93784),
        ("20780-22:41:45", 20780 * 86400 + 22 * 3600 + 41 * 60 + 45),
        ("", None),
        ("INVALID", None),
        ("N/A", None),
        ("UNLIMITED", None),
        ("Unknown", None),
    ],
)
def test_parse_duration(text: str, expected: int | None) -> None:
    assert parse_duration(text) == expected


@pytest.mark.parametrize("text", ["abc", "1:2:3:4", "-1:00", "5", "1-", "1:xx"])
def test_parse_duration_rejects(text: str) -> None:
    with pytest.raises(ValueError, match="not a Slurm duration"):
        parse_duration(text)


@pytest.mark.parametrize(
    ("hostlist", "expected"),
    [
        ("vm", ["vm"]),
        ("node[01-03,07],gpu5", ["node01", "node02", "node03", "node07", "gpu5"]),
        ("node[8-10]", ["node8", "node9", "node10"]),
        ("node[08-10]", ["node08", "node09", "node10"]),
        ("n[1]", ["n1"]),
        ("a,b,c", ["a", "b", "c"]),
        ("rack[1-2]-node[01-02]", ["rack1-node01", "rack1-node02", "rack2-node01", "rack2-node02"]),
        ("ip-10-1-2-[3-4]", ["ip-10-1-2-3", "ip-10-1-2-4"]),
        ("trn1-[001-002].suffix", ["trn1-001.suffix", "trn1-002.suffix"]),
        ("", []),
        ("(null)", []),
        ("None assigned", []),
    ],
)
def test_expand_hostlist(hostlist: str, expected: list[str]) -> None:
    assert expand_hostlist(hostlist) == expected


@pytest.mark.parametrize(
    ("hostlist", "message"),
    [
        ("node[01-", "unbalanced"),
        ("node]", "unbalanced"),
        ("node[[1]]", "nested"),
        ("node[3-1]", "descending"),
        ("node[a-b]", "bad range"),
        ("node[1-]", "bad range"),
        ("node[]", "bad range"),
        ("a,,b", "empty host"),
        ("node[0-9999999]", "too large"),
    ],
)
def test_expand_hostlist_rejects(hostlist: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        expand_hostlist(hostlist)


# --- squeue --------------------------------------------------------------------------------------

# Real `squeue --noheader --jobs=... --format='%i|%T|%M|%N|%r'` outputs.
SQUEUE_CHAIN = "2|PENDING|0:00||Dependency\n3|PENDING|0:00||Dependency\n1|RUNNING|0:00|vm|None\n"
SQUEUE_ARRAY = (
    "8|PENDING|0:00||Dependency\n9|PENDING|0:00||Dependency\n10_[1-3]|PENDING|0:00||Resources\n"
    "7|RUNNING|0:01|vm|None\n10_0|RUNNING|0:01|vm|None\n"
)
SQUEUE_MIXED = (
    "6|PENDING|0:00||DependencyNeverSatisfied\n17|PENDING|0:00||JobHeldUser\n18_[0-3%2]|PENDING|0:00||JobHeldUser\n"
    "19|COMPLETING|0:02|vm|None\n"
)
# With --states=all squeue also lists finished jobs (kept for MinJobAge).
SQUEUE_ALL_STATES = (
    "3|FAILED|0:01|vm|NonZeroExitCode\n5|CANCELLED|0:00||DependencyNeverSatisfied\n"
    "14|TIMEOUT|1:27|vm|TimeLimit\n15|COMPLETED|0:30|vm|None\n"
)


def _squeue_job(job_id: str, raw: str, reason: str | None, nodes: tuple[str, ...] = (), elapsed: int = 0) -> JobInfo:
    return JobInfo(job_id, from_slurm(raw), raw, reason=reason, nodes=nodes, elapsed=elapsed)


@pytest.mark.parametrize(
    ("stdout", "expected"),
    [
        ("", []),
        ("\n", []),
        (
            SQUEUE_CHAIN,
            [
                _squeue_job("2", "PENDING", "Dependency"),
                _squeue_job("3", "PENDING", "Dependency"),
                _squeue_job("1", "RUNNING", None, ("vm",)),
            ],
        ),
        (
            SQUEUE_ARRAY,
            [
                _squeue_job("8", "PENDING", "Dependency"),
                _squeue_job("9", "PENDING", "Dependency"),
                _squeue_job("10_[1-3]", "PENDING", "Resources"),
                _squeue_job("7", "RUNNING", None, ("vm",), 1),
                _squeue_job("10_0", "RUNNING", None, ("vm",), 1),
            ],
        ),
        (
            SQUEUE_MIXED,
            [
                _squeue_job("6", "PENDING", "DependencyNeverSatisfied"),
                _squeue_job("17", "PENDING", "JobHeldUser"),
                _squeue_job("18_[0-3%2]", "PENDING", "JobHeldUser"),
                _squeue_job("19", "COMPLETING", None, ("vm",), 2),
            ],
        ),
        (
            SQUEUE_ALL_STATES,
            [
                _squeue_job("3", "FAILED", "NonZeroExitCode", ("vm",), 1),
                _squeue_job("5", "CANCELLED", "DependencyNeverSatisfied"),
                _squeue_job("14", "TIMEOUT", "TimeLimit", ("vm",), 87),
                _squeue_job("15", "COMPLETED", None, ("vm",), 30),
            ],
        ),
        (
            "7|RUNNING|1-02:03:04|node[01-02]|None\n8|PENDING|0:00||(ReqNodeNotAvail, a|b)\n",
            [
                _squeue_job("7", "RUNNING", None, ("node01", "node02"), 93784),
                _squeue_job("8", "PENDING", "(ReqNodeNotAvail, a|b)"),
            ],
        ),
    ],
)
def test_parse_squeue(stdout: str, expected: list[JobInfo]) -> None:
    jobs = parse_squeue(stdout)
    assert list(jobs.values()) == expected
    assert list(jobs) == [job.job_id for job in expected]


def test_real_squeue_answer_in_our_format_parses() -> None:
    """The stored answer is real squeue output for SQUEUE_FORMAT (re-captured and compared by a slurm test)."""
    captured = stored()["squeue-held-and-unknown"]
    assert f"--format={SQUEUE_FORMAT}" in captured.argv
    jobs = parse_squeue(answer("squeue-held-and-unknown", job="41")[1])
    assert list(jobs) == ["41"]
    assert (jobs["41"].state, jobs["41"].reason, jobs["41"].nodes) == (S.PENDING, "JobHeldUser", ())


@pytest.mark.parametrize(
    ("stdout", "message"),
    [
        ("1|RUNNING|0:00|vm\n", "columns"),
        ("1 RUNNING 0:00 vm None\n", "columns"),
        ("|RUNNING|0:00|vm|None\n", "empty job id"),
        ("1||0:00|vm|None\n", "empty job id"),
        ("1|RUNNING|abc|vm|None\n", "duration"),
        ("1|RUNNING|0:00|node[1-|None\n", "host list"),
    ],
)
def test_parse_squeue_rejects(stdout: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_squeue(stdout)


# --- scontrol show job ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        (
            SCONTROL_RUNNING,
            JobInfo("1", S.RUNNING, "RUNNING", None, None, ("vm",), 0, Path("/tmp/hjx/out-1.log")),
        ),
        (
            SCONTROL_PENDING_DEP,
            JobInfo("2", S.PENDING, "PENDING", "Dependency", None, (), None, Path("/tmp/hjx/slurm-2.out")),
        ),
        (
            SCONTROL_FAILED,
            JobInfo("7", S.FAILED, "FAILED", "NonZeroExitCode", 3, ("vm",), 1, Path("/dev/null"), signal=0),
        ),
        (
            SCONTROL_DEP_NEVER,
            JobInfo("8", S.CANCELLED, "CANCELLED", "DependencyNeverSatisfied", 0, (), None, Path("/dev/null"), 0),
        ),
        (
            SCONTROL_ARRAY_TASK,
            JobInfo("10_0", S.COMPLETED, "COMPLETED", None, 0, ("vm",), 2, Path("/dev/null"), 0),
        ),
        (
            SCONTROL_SPACES,
            JobInfo("15", S.RUNNING, "RUNNING", None, None, ("vm",), 3, Path("/tmp/hjx/dir with space/slurm-15.out")),
        ),
        (
            SCONTROL_TIMEOUT,
            JobInfo("14", S.TIMEOUT, "TIMEOUT", "TimeLimit", 0, ("vm",), 87, Path("/dev/null"), signal=15),
        ),
        (
            SCONTROL_ARRAY_PENDING,
            JobInfo("18_[0-3%2]", S.CANCELLED, "CANCELLED", "JobHeldUser", 0, (), 0, Path("/dev/null"), 0),
        ),
        (
            SCONTROL_CANCELLED_PENDING,
            JobInfo("16", S.CANCELLED, "CANCELLED", "Resources", 0, (), 0, Path("/dev/null"), 0),
        ),
        (
            SCONTROL_CANCELLED,
            JobInfo("19", S.CANCELLED, "CANCELLED", None, 0, ("vm",), 2, Path("/dev/null"), signal=15),
        ),
    ],
    ids=[
        "running",
        "pending-dep",
        "failed",
        "dep-never",
        "array-task",
        "spaces",
        "timeout",
        "array-pending",
        "cancelled-pending",
        "cancelled-running",
    ],
)
def test_parse_scontrol_show_job(line: str, expected: JobInfo) -> None:
    assert parse_scontrol_show_job(line + "\n") == {expected.job_id: expected}


def test_parse_scontrol_show_job_several_lines() -> None:
    jobs = parse_scontrol_show_job(f"{SCONTROL_FAILED}\n\n{SCONTROL_DEP_NEVER}\n{SCONTROL_ARRAY_TASK}\n")
    assert list(jobs) == ["7", "8", "10_0"]
    assert [job.state for job in jobs.values()] == [S.FAILED, S.CANCELLED, S.COMPLETED]


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        ("JobId=1 TRES=cpu=1,mem=22899M,node=1 Power=", {"JobId": "1", "TRES": "cpu=1,mem=22899M,node=1", "Power": ""}),
        (
            "JobId=2 JobName=train stage=1 UserId=root(0)",
            {"JobId": "2", "JobName": "train stage=1", "UserId": "root(0)"},
        ),
        (
            "JobId=3 Command=/x/train.sh LR=1e-4 --flag WorkDir=/data/my run StdOut=/data/my run/o.log Power=",
            {
                "JobId": "3",
                "Command": "/x/train.sh LR=1e-4 --flag",
                "WorkDir": "/data/my run",
                "StdOut": "/data/my run/o.log",
                "Power": "",
            },
        ),
        ("JobId=4 Comment=note a=b  StdErr=/e", {"JobId": "4", "Comment": "note a=b", "StdErr": "/e"}),
        (
            "JobId=5 AllocNode:Sid=localhost:2172 CPUs/Task=1",
            {"JobId": "5", "AllocNode:Sid": "localhost:2172", "CPUs/Task": "1"},
        ),
        ("JobId=6 Power= NewKeyFromSlurm25=x", {"JobId": "6", "Power": "", "NewKeyFromSlurm25": "x"}),
    ],
)
def test_split_scontrol_line(line: str, expected: dict[str, str]) -> None:
    assert split_scontrol_line(line) == expected


@pytest.mark.parametrize(
    ("stdout", "message"),
    [
        ("garbage without pairs\n", "no Key=value"),
        ("leading JobId=1 JobState=RUNNING\n", "text before"),
        ("JobId=1 JobName=x\n", "no JobId or JobState"),
        ("JobName=x JobState=RUNNING\n", "no JobId or JobState"),
        ("JobId=1 JobState=FAILED ExitCode=x:y\n", "bad ExitCode"),
        ("JobId=1 JobState=RUNNING StartTime=2026-11-23T22:41:05 RunTime=soon\n", "duration"),
    ],
)
def test_parse_scontrol_show_job_rejects(stdout: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_scontrol_show_job(stdout)


def test_job_info_is_frozen_and_hashable() -> None:
    info = parse_scontrol_show_job(SCONTROL_FAILED)["7"]
    with pytest.raises(AttributeError):
        info.state = S.COMPLETED  # type: ignore[misc]
    assert len({info, info}) == 1


# --- slurm.py with a fake runner: command lines and error handling -------------------------------


class FakeRun:
    """Stands in for subprocess.run: records argument lists, answers from a table keyed by argv[0]."""

    def __init__(self, answers: dict[str, list[tuple[int, str, str]]]) -> None:
        self.answers = answers
        self.calls: list[list[str]] = []

    def __call__(self, cmd: Sequence[str], **kwargs: Any) -> subprocess.CompletedProcess[str]:
        assert isinstance(cmd, list) and "shell" not in kwargs
        self.calls.append(cmd)
        rc, out, err = self.answers[cmd[0]].pop(0)
        return subprocess.CompletedProcess(cmd, rc, out, err)


@pytest.fixture
def fake_run(monkeypatch: pytest.MonkeyPatch) -> FakeRun:
    fake = FakeRun({})
    monkeypatch.setattr(slurm.subprocess, "run", fake)
    return fake


@pytest.mark.parametrize(
    ("deps", "expected_dep_args"),
    [([], []), (["12"], ["--dependency=afterok:12"]), (["12", "13"], ["--dependency=afterok:12:13"])],
)
def test_sbatch_command(fake_run: FakeRun, deps: list[str], expected_dep_args: list[str], tmp_path: Path) -> None:
    fake_run.answers["sbatch"] = [(0, "99\n", "")]
    assert slurm.sbatch(tmp_path / "a.sbatch", deps, cwd=tmp_path) == "99"
    assert fake_run.calls == [
        ["sbatch", "--parsable", "--kill-on-invalid-dep=yes", *expected_dep_args, str(tmp_path / "a.sbatch")]
    ]


@pytest.mark.parametrize(
    ("answer", "message"),
    [
        (answer("sbatch-missing-script"), "Unable to open file"),
        (answer("sbatch-unreachable"), "Unable to contact slurm controller"),
        ((0, "Submitted batch job 5\n", ""), "expected `<jobid>"),
    ],
)
def test_sbatch_errors(fake_run: FakeRun, answer: tuple[int, str, str], message: str, tmp_path: Path) -> None:
    fake_run.answers["sbatch"] = [answer]
    with pytest.raises(slurm.SlurmError, match=message) as info:
        slurm.sbatch(Path("/nonexist"), [], cwd=tmp_path)
    assert info.value.cmd[0] == "sbatch"


def test_sbatch_rejects_bad_dependency(fake_run: FakeRun, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="not Slurm job ids"):
        slurm.sbatch(tmp_path / "a.sbatch", ["12", "afterany:3"], cwd=tmp_path)
    assert fake_run.calls == []


def test_query_falls_back_to_scontrol(fake_run: FakeRun) -> None:
    fake_run.answers["squeue"] = [(0, "3|PENDING|0:00||Dependency\n", "")]
    fake_run.answers["scontrol"] = [(0, SCONTROL_FAILED + "\n", ""), answer("scontrol-unknown")]
    jobs = slurm.query(["3", "7", "9999", "3"])
    assert {k: v.state for k, v in jobs.items()} == {"3": S.PENDING, "7": S.FAILED}
    assert fake_run.calls == [
        ["squeue", "--noheader", "--jobs=3,7,9999", f"--format={SQUEUE_FORMAT}"],
        ["scontrol", "--oneliner", "show", "job", "7"],
        ["scontrol", "--oneliner", "show", "job", "9999"],
    ]


def test_query_array_job_answered_by_squeue(fake_run: FakeRun) -> None:
    fake_run.answers["squeue"] = [(0, "10_[1-3]|PENDING|0:00||Resources\n10_0|RUNNING|0:01|vm|None\n", "")]
    assert set(slurm.query(["10"])) == {"10_[1-3]", "10_0"}
    assert len(fake_run.calls) == 1


def test_query_all_unknown_and_errors(fake_run: FakeRun) -> None:
    fake_run.answers["squeue"] = [answer("squeue-unknown"), answer("squeue-unreachable"), (0, "", "")]
    fake_run.answers["scontrol"] = [answer("scontrol-unknown"), answer("scontrol-unreachable")]
    assert slurm.query(["9999"]) == {}
    with pytest.raises(slurm.SlurmError, match="Unable to contact"):
        slurm.query(["1"])
    with pytest.raises(slurm.SlurmError, match="Unable to contact"):
        slurm.query(["2"])  # squeue answered (nothing): scontrol's failure is not "purged"
    assert slurm.query([]) == {}


@pytest.mark.parametrize(
    ("captured", "message"),
    [
        ("scancel-unknown", None),  # real scancel says nothing about an unknown job (only with -v)
        ("scancel-finished", None),
        ("scancel-denied", "Access/permission denied"),
        ("scancel-unreachable", "Unable to contact slurm controller"),
        ("scancel-bad-id", "Invalid job id abc"),
    ],
)
def test_cancel(fake_run: FakeRun, captured: str, message: str | None) -> None:
    fake_run.answers["scancel"] = [answer(captured)]
    if message:
        with pytest.raises(slurm.SlurmError, match=message):
            slurm.cancel(["1", "9999"])
    else:
        slurm.cancel(["1", "9999"])
    assert fake_run.calls == [["scancel", "1", "9999"]]


@pytest.mark.parametrize(
    "stderr",
    [  # scancel -v's wording for jobs with nothing left to cancel (Slurm's own messages, printed with -v)
        "scancel: error: Kill job error on job id 9999: Invalid job id specified\n",
        "scancel: error: Kill job error on job id 1: Job/step already completing or completed\n",
    ],
)
def test_cancel_nothing_left_is_not_an_error(fake_run: FakeRun, stderr: str) -> None:
    fake_run.answers["scancel"] = [(0, "", stderr)]
    slurm.cancel(["1", "9999"])


def test_missing_binary_is_a_slurm_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", "/nonexistent")
    assert not slurm.available()
    with pytest.raises(slurm.SlurmError, match="not found on PATH"):
        slurm.cancel(["1"])
