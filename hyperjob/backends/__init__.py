"""Backends by name: one module each (cpu, cuda, neuron, torchneuron), registered here.

`get(name)` is how the rest of hyperjob learns what differs between backends; a new backend is a module with a
`Backend` subclass and one entry in `_REGISTRY` (or `registered(...)` from an extension or a test).
"""

from __future__ import annotations

from hyperjob.backends import cpu, cuda, neuron, torchneuron
from hyperjob.backends.base import Backend, Runtime
from hyperjob.config.load import ConfigError
from hyperjob.registry import Registry

__all__ = ["Backend", "Runtime", "get", "names", "registered"]

_BUILTIN = (neuron.BACKEND, torchneuron.BACKEND, cuda.BACKEND, cpu.BACKEND)
_REGISTRY: Registry[Backend] = Registry("backend", lambda b: b.name, _BUILTIN)
names = _REGISTRY.names
registered = _REGISTRY.registered


def get(name: str) -> Backend:
    """The backend called `name`; a ConfigError on the `backend` key lists the allowed names otherwise."""
    backend = _REGISTRY.find(name)
    if backend is None:
        raise ConfigError([("backend", f"{name!r} is not a backend (allowed: {', '.join(names())})")])
    return backend
