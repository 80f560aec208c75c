"""Byte sizes as config, the CLI and the benchmarks write them ('5GB', '1.5GiB'), for merge and consolidation."""

from __future__ import annotations

import re

_UNITS = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}


def parse_size(size: str | int) -> int:
    """'200KB' -> 200000, '1.5GiB' -> bytes; what config's merge sizes and the CLI's --max-memory accept."""
    if isinstance(size, int):
        return size
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]+)\s*", size)
    if not m or m.group(2).upper() not in _UNITS:
        raise ValueError(f"size {size!r} must be a number followed by one of B, KB, MB, GB, KiB, MiB, GiB")
    return int(float(m.group(1)) * _UNITS[m.group(2).upper()])
