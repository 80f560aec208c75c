"""A registry of named units (backends, schedulers): the built-in ones, plus any registered for a while.

One small mechanism so that every seam adds units the same way; each seam turns a missing name into its own
user-facing error (a config error for a backend, a CLI error for a scheduler).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator
from typing import Generic, TypeVar

T = TypeVar("T")


class Registry(Generic[T]):
    def __init__(
        self, kind: str, name_of: Callable[[T], str], builtin: Iterable[T], reserved: Iterable[str] = ()
    ) -> None:
        self.kind, self._name_of, self._reserved = kind, name_of, frozenset(reserved)
        self._items: dict[str, T] = {name_of(item): item for item in builtin}

    def names(self) -> list[str]:
        return sorted(self._items)

    def items(self) -> list[T]:
        return list(self._items.values())

    def find(self, name: str) -> T | None:
        return self._items.get(name)

    @contextlib.contextmanager
    def registered(self, item: T) -> Iterator[T]:
        """Make `item` available by its name for the duration of the block (extensions and tests)."""
        name = self._name_of(item)
        if not name or name in self._items or name in self._reserved:
            raise ValueError(f"{self.kind} name {name!r} is empty or taken")
        self._items[name] = item
        try:
            yield item
        finally:
            del self._items[name]
