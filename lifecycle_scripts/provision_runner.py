"""Every side effect of provisioning goes through a Runner, so `--dry-run` shows exactly what a node would do.

In dry-run mode nothing is run or written: commands are printed shell-quoted, files as here-documents and comments
as `# ...`, so the output reads (and runs) as a shell script and tests can assert the plan line by line. In real
mode each command is logged with a time stamp, its output is echoed to the log, and a failure raises CommandFailed
naming the command, its exit code and its last line of output.
"""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
import tempfile
import time
from typing import Callable, Sequence, TextIO

BACKUP_SUFFIX = ".before-hyperjob"


class CommandFailed(Exception):
    """A provisioning step failed; the message is the one line on-create.sh ends with."""


class Runner:
    def __init__(self, dry_run: bool, out: TextIO | None = None, sleep: Callable[[float], None] = time.sleep) -> None:
        self.dry_run = dry_run
        self.out = out or sys.stdout
        self._sleep = sleep

    def _emit(self, line: str) -> None:
        self.out.write(line + "\n")
        self.out.flush()

    def note(self, message: str) -> None:
        """A line for the log: what is being done and why (a comment in dry-run output)."""
        self._emit(f"# {message}" if self.dry_run else f"[{time.strftime('%H:%M:%S')}] {message}")

    def run(self, argv: Sequence[str], attempts: int = 1, delay: float = 0.0, allow_failure: bool = False) -> bool:
        """Run a command, trying up to `attempts` times `delay` seconds apart. True when it succeeded; a final
        failure raises CommandFailed unless `allow_failure`, which logs it and returns False."""
        command = shlex.join(argv)
        if self.dry_run:
            if attempts > 1:
                self._emit(f"# up to {attempts} attempts, {delay:g} s apart")
            self._emit(command + (" || true" if allow_failure else ""))
            return True
        rc, last = 0, ""
        for attempt in range(1, attempts + 1):
            self.note(f"+ {command}" + (f"  (attempt {attempt} of {attempts})" if attempts > 1 else ""))
            rc, last = self._execute(argv)
            if rc == 0:
                return True
            if attempt < attempts:
                self.note(f"exit code {rc}; retrying in {delay:g} s")
                self._sleep(delay)
        failure = f"`{command}` failed with exit code {rc}" + (f" after {attempts} attempts" if attempts > 1 else "")
        failure += f": {last}" if last else ""
        if allow_failure:
            self.note(f"{failure} (tolerated)")
            return False
        raise CommandFailed(failure)

    def _execute(self, argv: Sequence[str]) -> tuple[int, str]:
        """(exit code, last non-empty output line); the output is copied to the log."""
        try:
            done = subprocess.run(list(argv), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, check=False)
        except OSError as exc:  # not installed, not executable
            return 127, f"{argv[0]}: {exc.strerror}"
        lines = [line for line in done.stdout.splitlines() if line.strip()]
        for line in lines:
            self._emit(f"    {line}")
        return done.returncode, lines[-1].strip() if lines else ""

    def write_file(self, path: str, content: str, mode: int = 0o644) -> None:
        """Write a file whole (atomically); a different file already there is kept once as PATH.before-hyperjob."""
        if self.dry_run:
            self._emit(f"cat > {shlex.quote(path)} <<'EOF'\n{content.rstrip(chr(10))}\nEOF")
            return
        self.note(f"write {path}")
        if os.path.exists(path) and not os.path.exists(path + BACKUP_SUFFIX):
            with open(path) as old:
                if old.read() != content:
                    os.rename(path, path + BACKUP_SUFFIX)
        directory = os.path.dirname(path) or "."
        os.makedirs(directory, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=directory, prefix=".hyperjob-")
        with os.fdopen(fd, "w") as handle:
            handle.write(content)
        os.chmod(tmp, mode)
        os.replace(tmp, path)

    def ensure_line(self, path: str, line: str) -> None:
        """Append `line` to a file unless it is already there (an /etc/fstab entry on a re-run)."""
        if self.dry_run:
            self._emit(
                f"grep -qxF {shlex.quote(line)} {shlex.quote(path)} || echo {shlex.quote(line)} >> {shlex.quote(path)}"
            )
            return
        existing = ""
        if os.path.exists(path):
            with open(path) as handle:
                existing = handle.read()
        if line in existing.splitlines():
            self.note(f"{path} already has: {line}")
            return
        self.note(f"append to {path}: {line}")
        with open(path, "a") as handle:
            handle.write(("" if existing.endswith("\n") or not existing else "\n") + line + "\n")
