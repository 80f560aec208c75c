"""Files shipped beside the code: `templates/`, `examples/`, `cloudformation/` and `lifecycle_scripts/` at the top
of a source checkout, `hyperjob/_<name>` inside an installed wheel (pyproject force-include)."""

from __future__ import annotations

from pathlib import Path

_PACKAGE = Path(__file__).resolve().parent


def shipped_dir(name: str) -> Path:
    """The directory `name` (templates, examples, cloudformation, lifecycle_scripts), wherever it is installed."""
    for candidate in (_PACKAGE / f"_{name}", _PACKAGE.parent / name):
        if candidate.is_dir():
            return candidate
    raise FileNotFoundError(f"{name}/ not found beside {_PACKAGE}: is the installation complete?")
