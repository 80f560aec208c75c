"""Skipped tests are counted and named at the end of every run; in CI (HYPERJOB_FORBID_SKIPS=1) any skip fails it.

A skip is a test that proved nothing: without this, a CI machine that lost Slurm, torch or peft would stay green.
CI sets the variable when it runs as root, where the project's Slurm and every dependency are installed.
"""

from __future__ import annotations

import os

import pytest

__all__ = ["pytest_runtest_logreport", "pytest_sessionfinish", "pytest_terminal_summary"]

FORBID_ENV = "HYPERJOB_FORBID_SKIPS"
_skipped: list[str] = []


def _reason(report: pytest.TestReport) -> str:
    longrepr = report.longrepr
    return str(longrepr[2]) if isinstance(longrepr, tuple) else str(longrepr)


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    if report.skipped and not hasattr(report, "wasxfail"):
        _skipped.append(f"{report.nodeid}: {_reason(report)}")


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    terminalreporter.write_line(f"skipped tests: {len(_skipped)}")
    for line in _skipped:
        terminalreporter.write_line(f"  {line}")
    if _skipped and os.environ.get(FORBID_ENV) == "1":
        terminalreporter.write_line(f"{FORBID_ENV}=1: a skipped test fails the run", red=True)


@pytest.hookimpl(trylast=True)
def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    if _skipped and os.environ.get(FORBID_ENV) == "1" and exitstatus == pytest.ExitCode.OK:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
