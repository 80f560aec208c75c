"""Skip pydantic's plugin search while hyperjob's own models are built.

pydantic looks for plugins in every installed distribution's entry points when it builds a model class: ~100 ms of
every CLI verb in a full training venv. hyperjob's models use none. A module that defines models calls
`plugin_search_off()` before them and the function it returns after them; a user's own PYDANTIC_DISABLE_PLUGINS is
left as it is.
"""

from __future__ import annotations

import os
from collections.abc import Callable

_ENV = "PYDANTIC_DISABLE_PLUGINS"


def plugin_search_off() -> Callable[[], None]:
    """Turn the search off (unless the user set the variable); return what turns it back on."""
    if _ENV in os.environ:
        return lambda: None
    os.environ[_ENV] = "__all__"

    def restore() -> None:
        os.environ.pop(_ENV, None)

    return restore
