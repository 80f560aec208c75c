"""Files shipped beside the code: `templates/` and `examples/` at the top of a source checkout,
`hyperjob/_templates` and `hyperjob/_examples` inside an installed wheel (pyproject force-include)."""

from __future__ import annotations

from pathlib import Path

_PACKAGE = Path(__file__).resolve().parent


def shipped_dir(name: str) -> Path:
    """The directory `name` ("templates" or "examples"), wherever this installation keeps it."""
    for candidate in (_PACKAGE / f"_{name}", _PACKAGE.parent / name):
        if candidate.is_dir():
            return candidate
    raise FileNotFoundError(f"{name}/ not found beside {_PACKAGE}: is the installation complete?")
