"""What a secret looks like, so that one never reaches a message, a script or a stored config.

The Hugging Face token is read at run time from `model.token_env` or `model.token_file`; these patterns catch
it (and anything named like a credential) where it must not be.
"""

from __future__ import annotations

import re

SECRET_NAME = re.compile(r"token|secret|password|passwd|api_?key|credential", re.IGNORECASE)
SECRET_VALUE = re.compile(r"\bhf_[A-Za-z0-9]{8,}")


def redact(text: str) -> str:
    """Hide anything shaped like a Hugging Face token."""
    return SECRET_VALUE.sub("hf_***", text)


def looks_secret(name: str, value: str) -> bool:
    """A variable whose name or value says it holds a credential."""
    return bool(SECRET_NAME.search(name) or SECRET_VALUE.search(value))
