"""A pinned training environment: the one package set a backend's training stage runs with, checked and recorded.

A venv that drifts from its set fails deep inside a compiler or a trainer, so `hyperjob env` builds it from the
pins, records what it installed, and the stages refuse a mismatch with one line. The sets themselves (index URL,
versions) live in `neuron_env`; this module is what any set needs. Stdlib only: `hyperjob plan` and the CLI
import it.
"""

from __future__ import annotations

import importlib.metadata
import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from hyperjob import __version__

RECORD_NAME = "hyperjob-env.json"
# hyperjob's own core dependencies (pyproject's `dependencies`), installed beside its --no-deps source install.
CORE_DEPS = ("pydantic>=2.6", "jinja2>=3.1", "pyyaml>=6.0", "rich>=13.0")


@dataclass(frozen=True)
class Pin:
    """One pinned distribution: `dist` is the metadata name checked after install, `extras` only go to pip."""

    dist: str
    spec: str
    extras: tuple[str, ...] = ()

    @property
    def requirement(self) -> str:
        extras = f"[{','.join(self.extras)}]" if self.extras else ""
        return f"{self.dist}{extras}{self.spec}"


@dataclass(frozen=True)
class EnvSpec:
    """One backend's pinned set. `label` names it in messages ("optimum-neuron 0.4.5's Neuron 2.26 set"), `shown`
    the distributions `hyperjob plan` lists, `base_python` the interpreter `hyperjob env` tries first."""

    label: str
    sdk: str
    index_url: str
    python_versions: tuple[str, ...]
    pins: tuple[Pin, ...]
    shown: tuple[str, ...]
    base_python: str
    extra_index_urls: tuple[str, ...] = ()  # after index_url (PyTorch's CPU wheels, so pip pulls no CUDA torch)

    def index_options(self) -> list[str]:
        """pip options naming every index beside PyPI."""
        return [w for url in (self.index_url, *self.extra_index_urls) for w in ("--extra-index-url", url)]

    def requirements(self) -> list[str]:
        """The pip requirement strings of the pinned set, in install order."""
        return [pin.requirement for pin in self.pins]

    def installed_versions(self, dists: Iterable[str] | None = None) -> dict[str, str | None]:
        """Each distribution's installed version in this interpreter (default: the pinned ones), None when absent."""
        found: dict[str, str | None] = {}
        for dist in [pin.dist for pin in self.pins] if dists is None else dists:
            try:
                found[dist] = importlib.metadata.version(dist)
            except importlib.metadata.PackageNotFoundError:
                found[dist] = None
        return found

    def mismatch(self, installed: Mapping[str, str | None]) -> str | None:
        """None when every pin is satisfied, else one line: the first offender, found and expected, and the fix."""
        wrong = [(p, installed.get(p.dist)) for p in self.pins if not _satisfied(installed.get(p.dist), p.spec)]
        if not wrong:
            return None
        pin, version = wrong[0]
        found = f"{version} is installed" if version is not None else "is not installed"
        more = f" (and {len(wrong) - 1} more mismatch{'es' if len(wrong) > 2 else ''})" if len(wrong) > 1 else ""
        return (
            f"{pin.dist} {found}, {self.label} needs {pin.spec}{more}; "
            "rebuild the environment with: hyperjob env CONFIG --rebuild"
        )

    def make_record(self, python: str, installed: Mapping[str, str | None]) -> dict[str, Any]:
        """What `hyperjob env` writes into the venv root, last: its presence means the build completed."""
        return {
            "hyperjob": __version__,
            "neuron_sdk": self.sdk,
            "index_url": self.index_url,
            "python": python,
            "pins": self.requirements(),
            "installed": dict(installed),
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        }

    def record_is_current(self, record: Mapping[str, Any]) -> bool:
        """Built by this hyperjob version with these pins (a new release may move a pin or change hyperjob's code)."""
        return record.get("hyperjob") == __version__ and record.get("pins") == self.requirements()

    def plan_rows(self) -> list[tuple[str, str]]:
        """Rows for `hyperjob plan`: which stack the training stages expect, and where it comes from."""
        versions = ", ".join(f"{p.dist} {p.spec.lstrip('=~')}" for p in self.pins if p.dist in self.shown)
        return [
            ("Neuron environment", f"SDK {self.sdk}: {versions} (hyperjob env CONFIG builds it)"),
            ("Neuron pip index", self.index_url),
        ]


def _satisfied(version: str | None, spec: str) -> bool:
    return version is not None and version_matches(version, spec)


# --- PEP 440, the subset the pins use: ==X, ==X.*, ~=X.Y[.Z] ------------------------------------------------------

_VERSION = re.compile(
    r"^v?(?P<release>\d+(?:\.\d+)*)"
    r"(?:[-_.]?(?P<pre>a|b|rc|c|alpha|beta|pre|preview)[-_.]?(?P<pre_n>\d*))?"
    r"(?:-(?P<post_implicit>\d+)|[-_.]?(?:post|rev|r)[-_.]?(?P<post>\d*))?"
    r"(?:[-_.]?dev[-_.]?(?P<dev>\d*))?"
    r"(?:\+(?P<local>[a-z0-9]+(?:[-_.][a-z0-9]+)*))?$",
    re.IGNORECASE,
)
_PRE_RANK = {"a": 0, "alpha": 0, "b": 1, "beta": 1, "rc": 2, "c": 2, "pre": 2, "preview": 2}
_INF = float("inf")

_Key = tuple[tuple[int, ...], tuple[float, float], float, float]


def _parse(version: str) -> tuple[_Key, str] | None:
    """(sort key of the public version, local label), None when `version` is not PEP 440."""
    m = _VERSION.match(version.strip())
    if m is None:
        return None
    release = tuple(int(p) for p in m["release"].split("."))
    while len(release) > 1 and release[-1] == 0:
        release = release[:-1]
    post_text = m["post_implicit"] if m["post_implicit"] is not None else m["post"]
    post = -_INF if post_text is None else float(post_text or 0)
    dev = _INF if m["dev"] is None else float(m["dev"] or 0)
    if m["pre"] is not None:
        pre: tuple[float, float] = (_PRE_RANK[m["pre"].lower()], float(m["pre_n"] or 0))
    elif m["dev"] is not None and post_text is None:
        pre = (-_INF, 0.0)  # 1.0.dev1 sorts before 1.0a1
    else:
        pre = (_INF, 0.0)
    return (release, pre, post, dev), (m["local"] or "").lower()


def _release(version: str) -> tuple[int, ...] | None:
    m = _VERSION.match(version.strip())
    return None if m is None else tuple(int(p) for p in m["release"].split("."))


def _prefix_match(found: str, prefix: str) -> bool:
    """`==prefix.*`: the release starts with prefix (zero-padded); pre-release, post and local parts are ignored."""
    have, want = _release(found), _release(prefix)
    if have is None or want is None:
        return False
    padded = have + (0,) * max(0, len(want) - len(have))
    return padded[: len(want)] == want


def version_matches(found: str, spec: str) -> bool:
    """Whether version `found` satisfies `spec` (==X, ==X.*, ~=X.Y[.Z]); an unparsable `found` never does.

    As PEP 440 says, a spec without a local label ignores the candidate's (`2.8.0+cpu` is `==2.8.0`).
    """
    spec = spec.strip()
    if spec.startswith("~="):
        base = spec[2:].strip()
        parts = base.split(".")
        have, want = _parse(found), _parse(base)
        if len(parts) < 2 or want is None or want[1]:
            raise ValueError(f"spec {spec!r}: ~= needs a public version of at least two parts, e.g. ~=4.57.1")
        return have is not None and have[0] >= want[0] and _prefix_match(found, ".".join(parts[:-1]))
    if spec.startswith("==") and not spec.startswith("==="):
        target = spec[2:].strip()
        if target.endswith(".*"):
            return _prefix_match(found, target[:-2])
        have, want = _parse(found), _parse(target)
        if want is None:
            raise ValueError(f"spec {spec!r}: {target!r} is not a PEP 440 version")
        if have is None:
            return False
        return have[0] == want[0] and (not want[1] or have[1] == want[1])
    raise ValueError(f"spec {spec!r} is not supported (allowed: ==X, ==X.*, ~=X.Y[.Z])")


# --- the record a finished build leaves in the venv, and where the venv is ----------------------------------


def read_record(venv: Path) -> dict[str, Any] | None:
    """The venv's record; None when absent or unreadable (an unfinished build, or a venv made by hand)."""
    try:
        data = json.loads((venv / RECORD_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


_INTERPRETER = re.compile(r"python(3(\.\d+)?)?")


def venv_of(interpreter: str) -> Path | None:
    """The venv root of an absolute `<venv>/bin/python[3[.N]]` path; None otherwise (a bare `python3`)."""
    path = Path(interpreter)
    if not path.is_absolute() or path.parent.name != "bin" or not _INTERPRETER.fullmatch(path.name):
        return None
    venv = path.parent.parent
    return None if venv == Path(venv.anchor) else venv
