"""Schedulers by name: slurm, local and the dry run, one module each.

The CLI's `--scheduler` choices, `auto` and the scheduler recorded in a run's manifest all resolve here, so
adding a scheduler is one module and one entry in `_BUILTIN` (or `registered(...)` from an extension or a test).
"""

from __future__ import annotations

from hyperjob.registry import Registry
from hyperjob.schedule import scheduler_dry_run, scheduler_local, scheduler_slurm
from hyperjob.schedule.base import Scheduler

AUTO = "auto"
_BUILTIN = (scheduler_slurm.SCHEDULER, scheduler_local.SCHEDULER, scheduler_dry_run.SCHEDULER)
_REGISTRY: Registry[Scheduler] = Registry("scheduler", lambda s: s.name, _BUILTIN, reserved=(AUTO,))
registered = _REGISTRY.registered


class SchedulerChoiceError(ValueError):
    """The requested scheduler does not exist or cannot run here; the message says which can."""


def get(name: str) -> Scheduler:
    sched = _REGISTRY.find(name)
    if sched is None:
        raise SchedulerChoiceError(f"unknown scheduler {name!r} (known: {', '.join(_REGISTRY.names())})")
    return sched


def selectable() -> list[Scheduler]:
    """The schedulers a user may pick, in `auto`'s order of preference."""
    return sorted((s for s in _REGISTRY.items() if s.priority is not None), key=lambda s: s.priority or 0)


def choose(requested: str, *, dry_run: bool = False) -> Scheduler:
    """`auto`: the first selectable scheduler that can run here (for a dry run, the first, runnable or not)."""
    if requested == AUTO:
        for sched in selectable():
            if dry_run or sched.unavailable() is None:
                return sched
        raise SchedulerChoiceError("no scheduler can run here")
    sched = get(requested)
    why = None if dry_run else sched.unavailable()
    if why is not None:
        raise SchedulerChoiceError(f"--scheduler {requested}: {why}")
    return sched
