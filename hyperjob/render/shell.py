"""The Jinja environment for sbatch scripts: every interpolated value is shell-quoted.

Quoting is applied by Jinja's `finalize` hook to every `{{ ... }}`, so a template
cannot forget it; template code opts out only with the `raw` filter, for text it
has composed itself from already-quoted parts.
"""

from __future__ import annotations

import re
import shlex
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jinja2

from hyperjob.resources import shipped_dir


class Raw(str):
    """Text that is already valid shell and must be emitted as is."""


def quote(value: Any) -> str:
    if isinstance(value, Raw):
        return str(value)
    if isinstance(value, bool):
        return "1" if value else "0"
    if isinstance(value, int):
        return str(value)
    if value is None:
        raise ValueError("a template interpolated None: the renderer must not pass optional values unchecked")
    text = str(value)
    if "\\" in text:
        # sbatch reads `#SBATCH` lines with its own quoting, where a backslash escapes the next character even inside
        # single quotes, so shlex's '...\...' loses it there. In double quotes with \ " $ ` escaped, bash and sbatch
        # both read the text back unchanged.
        return '"' + re.sub(r'([\\"$`])', r"\\\1", text) + '"'
    return shlex.quote(text)


def quote_list(values: Any) -> Raw:
    """`{{ args | qlist }}`: each element quoted, joined by spaces."""
    return Raw(" ".join(quote(v) for v in values))


def comment(value: Any) -> Raw:
    """Text inside a `#` comment: control characters are escaped so nothing can end the comment."""
    text = str(value)
    return Raw("".join(c if c.isprintable() else repr(c)[1:-1] for c in text))


def slurm_filename(path: Any) -> str:
    """Escape `%` so Slurm's filename patterns (%j, %x) leave literal percent signs alone."""
    return str(path).replace("%", "%%")


def make_env(extra_dirs: Sequence[Path] = ()) -> jinja2.Environment:
    """The shipped templates first, then the directories of stages added from outside the package."""
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader([str(shipped_dir("templates")), *(str(d) for d in extra_dirs)]),
        undefined=jinja2.StrictUndefined,
        finalize=quote,
        autoescape=False,
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
    )
    env.filters["raw"] = Raw
    env.filters["qlist"] = quote_list
    env.filters["slurm_filename"] = slurm_filename
    env.filters["comment"] = comment
    return env
