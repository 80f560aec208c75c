"""The one line of a failed stage's log that says why it failed, for `status` and the end-of-run summary.

A distributed stage's log ends in torchrun's `ChildFailedError` summary; the real message is further up: a
stage's own marked line (`hyperjob train (rank 1): error: ...`, from `run_stage`), else the exception of a
Python traceback, else what Slurm or the kernel said when they killed the job. Pure apart from `read_log_tail`.
"""

from __future__ import annotations

import re
from pathlib import Path

# Reading a whole multi-GB log to explain a failure would make `status` slow; the cause is near the end.
TAIL_BYTES = 256 * 1024

# What may precede a line's text: an ISO timestamp (log shippers), srun --label's `3: `, torchrun --tee's
# `[rank3]:` / `[default3]:`. The rank is kept so a traceback's line can say which process raised it.
_PREFIX = re.compile(
    r"^(?:\[?\d{4}-\d\d-\d\d[T ][\d:.,]+(?:Z|[+-]\d\d:?\d\d)?\]?\s+)?"
    r"(?:\s*(?P<label>\d+): |\[(?:rank|default)(?P<rank>\d+)\]:\s?)?"
)
# A stage entry point's or the CLI's own error line; the lookbehind skips paths such as `.../hyperjob/x.py`.
_MARKED = re.compile(r"(?<![\w./-])(hyperjob(?: [\w.-]+)?(?: \(rank \d+\))?: error: .*\S)")
# Each attempt of a stage script starts with this banner; a requeued job appends to the same log.
_BANNER = re.compile(r"^hyperjob: stage \S+ of run .* starting on ", re.MULTILINE)
_TRACEBACK = "Traceback (most recent call last):"
_EXCEPTION = re.compile(r"^(?:[A-Za-z_]\w*\.)*[A-Z]\w*(?:: .*|:)?$")
# Raised by the launcher because a child failed: they repeat the failure, never explain it.
_WRAPPERS = frozenset({"ChildFailedError", "CalledProcessError", "SignalException"})
# Slurm saying why it ended the job: the cause, even when processes left tracebacks as they were killed.
_SLURM_CAUSE = re.compile(
    r"(?:slurmstepd|srun): error: .*(?:\*\*\* JOB .*\*\*\*|DUE TO|oom_kill|OOM Killed|Out Of Memory).*"
)
# Slurm or bash noting a task's end: the first is the cause, the later ones its echo (--kill-on-bad-exit).
_SLURM_OTHER = re.compile(r"(?:slurmstepd|srun): error: .*|^\S+: line \d+: +\d+ Killed\b.*|^Killed$")
_ROOT_CAUSE = "Root Cause (first observed failure):"


def read_log_tail(path: Path, limit: int = TAIL_BYTES) -> str:
    """The last `limit` bytes of a log, from its first whole line; "" if it cannot be read."""
    try:
        with path.open("rb") as f:
            size = f.seek(0, 2)
            f.seek(max(0, size - limit))
            data = f.read()
    except OSError:
        return ""
    if size > limit:
        data = data.partition(b"\n")[2]
    return data.decode(errors="replace")


def error_line(log_text: str) -> str | None:
    """The line that says why the stage failed, or None when its log does not say."""
    banners = list(_BANNER.finditer(log_text))
    text = log_text[banners[-1].start() :] if banners else log_text
    lines = text.splitlines()
    for line in reversed(lines):
        marked = _MARKED.search(line)
        if marked:
            return marked.group(1)
    causes = [m.group(0).strip() for line in lines if (m := _SLURM_CAUSE.search(line))]
    if causes:
        return causes[-1]
    raised = _last_exception(lines)
    if raised:
        return raised
    root = _torchrun_root_cause(lines)
    if root:
        return root
    others = [m.group(0).strip() for line in lines if (m := _SLURM_OTHER.search(_strip(line)[1]))]
    return others[0] if others else None


def _strip(line: str) -> tuple[str | None, str]:
    """(rank or srun task from the prefix, the line without it)."""
    m = _PREFIX.match(line)
    assert m is not None  # every part of the pattern is optional
    return m.group("rank") or m.group("label"), line[m.end() :]


def _last_exception(lines: list[str]) -> str | None:
    """The exception line of the last traceback not raised by a launcher wrapper.

    Ranks write to one log, so lines interleave; each prefix (rank label) is followed as its own stream, and
    within a stream the exception is the first unindented line after the traceback header that looks like one
    (`pkg.Error: message`), which skips other processes' log lines interleaved without a prefix.
    """
    open_tb: dict[str | None, bool] = {}
    found: str | None = None
    for line in lines:
        who, body = _strip(line)
        if body.rstrip() == _TRACEBACK:
            open_tb[who] = True
            continue
        if not open_tb.get(who) or not body.strip() or body[0].isspace():
            continue
        if not _EXCEPTION.match(body.rstrip()):
            continue
        open_tb[who] = False
        if body.split(":", 1)[0].rsplit(".", 1)[-1] in _WRAPPERS:
            continue
        found = body.strip() if who is None else f"rank {who}: {body.strip()}"
    return found


def _torchrun_root_cause(lines: list[str]) -> str | None:
    """torchrun's summary of the first rank to fail (its exit code or signal), when no process said more."""
    try:
        start = max(i for i, line in enumerate(lines) if _strip(line)[1].strip() == _ROOT_CAUSE)
    except ValueError:
        return None
    fields: dict[str, str] = {}
    for line in lines[start + 1 : start + 12]:
        key, sep, value = _strip(line)[1].partition(":")
        if sep and key.strip() in ("rank", "exitcode", "traceback"):
            fields[key.strip()] = value.strip()
    rank = fields.get("rank", "?").split()[0]
    code = fields.get("exitcode", "").split()
    if not code or not code[0].lstrip("-").isdigit():
        return None
    signal = re.search(r"\((SIG\w+)\)", fields.get("exitcode", "") + fields.get("traceback", ""))
    if int(code[0]) < 0:
        name = f" ({signal.group(1)})" if signal else ""
        return f"torchrun: rank {rank} was killed by signal {-int(code[0])}{name}"
    return f"torchrun: rank {rank} exited with code {code[0]}"
