"""Stage states and the explicit table that maps Slurm job states onto them.

Slurm has about twenty job states and spells them differently per tool (squeue `%T` long names, `%t`
compact codes, `scontrol` `JobState=`, sacct's `CANCELLED by 0`). hyperjob reasons about a handful,
so every Slurm name is mapped here, in one reviewed table; anything not in it becomes UNKNOWN rather
than a guess.
"""

from __future__ import annotations

from collections.abc import Mapping
from enum import Enum
from types import MappingProxyType


class StageState(str, Enum):
    """The state of one stage of a run, as hyperjob reports it."""

    RENDERED = "RENDERED"  # script written, not submitted yet
    PENDING = "PENDING"
    RUNNING = "RUNNING"
    SUSPENDED = "SUSPENDED"
    REQUEUED = "REQUEUED"
    COMPLETED = "COMPLETED"
    FAILED = "FAILED"
    CANCELLED = "CANCELLED"
    TIMEOUT = "TIMEOUT"
    OUT_OF_MEMORY = "OUT_OF_MEMORY"
    NODE_FAIL = "NODE_FAIL"
    PREEMPTED = "PREEMPTED"
    LOST = "LOST"  # the scheduler forgot the job and the stage left no outcome record (never from Slurm)
    UNKNOWN = "UNKNOWN"

    @property
    def is_terminal(self) -> bool:
        """True when Slurm will not run this job again on its own (polling can stop)."""
        return self in _TERMINAL

    @property
    def is_success(self) -> bool:
        """True only for a finished job that exited 0; dependents with afterok may run."""
        return self is StageState.COMPLETED

    def __str__(self) -> str:
        return self.value


_TERMINAL = frozenset(
    {
        StageState.COMPLETED,
        StageState.FAILED,
        StageState.CANCELLED,
        StageState.TIMEOUT,
        StageState.OUT_OF_MEMORY,
        StageState.NODE_FAIL,
        StageState.PREEMPTED,
        StageState.LOST,
    }
)

_S = StageState

# Every job state of Slurm 22.05-24.x (src/common/slurm_protocol_defs.c, job_state_string and
# job_state_string_compact), long name and compact code. Choices that are not obvious:
# - CONFIGURING (nodes booting for an allocated job), COMPLETING (ended, epilog still running, final
#   state and exit code not known yet), RESIZING, SIGNALING and STAGE_OUT hold nodes and are not final,
#   so they count as RUNNING.
# - REQUEUE_HOLD, REQUEUE_FED and SPECIAL_EXIT are requeued jobs waiting (possibly held): REQUEUED.
# - BOOT_FAIL is a node failure; DEADLINE is a time limit; REVOKED (federation) is a cancellation.
# - PREEMPTED is reported only when preemption ends the job (PreemptMode=CANCEL); with
#   PreemptMode=REQUEUE Slurm shows REQUEUED/PENDING instead, so PREEMPTED is terminal.
SLURM_STATES: Mapping[str, StageState] = MappingProxyType(
    {
        "PENDING": _S.PENDING,
        "PD": _S.PENDING,
        "RESV_DEL_HOLD": _S.PENDING,
        "RD": _S.PENDING,
        "RUNNING": _S.RUNNING,
        "R": _S.RUNNING,
        "CONFIGURING": _S.RUNNING,
        "CF": _S.RUNNING,
        "COMPLETING": _S.RUNNING,
        "CG": _S.RUNNING,
        "RESIZING": _S.RUNNING,
        "RS": _S.RUNNING,
        "SIGNALING": _S.RUNNING,
        "SI": _S.RUNNING,
        "STAGE_OUT": _S.RUNNING,
        "SO": _S.RUNNING,
        "SUSPENDED": _S.SUSPENDED,
        "S": _S.SUSPENDED,
        "STOPPED": _S.SUSPENDED,
        "ST": _S.SUSPENDED,
        "REQUEUED": _S.REQUEUED,
        "RQ": _S.REQUEUED,
        "REQUEUE_HOLD": _S.REQUEUED,
        "RH": _S.REQUEUED,
        "REQUEUE_FED": _S.REQUEUED,
        "RF": _S.REQUEUED,
        "SPECIAL_EXIT": _S.REQUEUED,
        "SE": _S.REQUEUED,
        "COMPLETED": _S.COMPLETED,
        "CD": _S.COMPLETED,
        "FAILED": _S.FAILED,
        "F": _S.FAILED,
        "CANCELLED": _S.CANCELLED,
        "CA": _S.CANCELLED,
        "REVOKED": _S.CANCELLED,
        "RV": _S.CANCELLED,
        "TIMEOUT": _S.TIMEOUT,
        "TO": _S.TIMEOUT,
        "DEADLINE": _S.TIMEOUT,
        "DL": _S.TIMEOUT,
        "OUT_OF_MEMORY": _S.OUT_OF_MEMORY,
        "OOM": _S.OUT_OF_MEMORY,
        "NODE_FAIL": _S.NODE_FAIL,
        "NF": _S.NODE_FAIL,
        "BOOT_FAIL": _S.NODE_FAIL,
        "BF": _S.NODE_FAIL,
        "PREEMPTED": _S.PREEMPTED,
        "PR": _S.PREEMPTED,
    }
)


def normalize_slurm_state(raw: str) -> str:
    """The bare state name: `CANCELLED by 0` (sacct) -> `CANCELLED`, `RUNNING+` (truncated) -> `RUNNING`."""
    words = raw.strip().split()
    return words[0].rstrip("+").upper() if words else ""


def from_slurm(raw: str) -> StageState:
    """Map any Slurm spelling of a job state to a StageState; UNKNOWN for names not in the table."""
    return SLURM_STATES.get(normalize_slurm_state(raw), StageState.UNKNOWN)
