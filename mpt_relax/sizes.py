"""Byte sizes as users write them: ``2147483648``, ``"2GB"`` (10^9), ``"2GiB"`` (2^30), ``"512 MB"``."""

from __future__ import annotations

import re

from mpt_relax.errors import MPTRelaxError

_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


class SizeError(MPTRelaxError):
    """A size that is not a number of bytes or a number with a unit."""


def parse_bytes(size: int | str, what: str = "size") -> int:
    """Bytes in ``size`` (an int, or a string with an optional unit B/KB/MB/GB/TB/KiB/MiB/GiB/TiB)."""
    if isinstance(size, int) and not isinstance(size, bool):
        return size
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]*)\s*", str(size))
    if match is None or match.group(2).upper() not in _UNITS:
        raise SizeError(f"{what} {size!r} is not a size; give bytes (int) or a string like '2GB' or '512MiB'")
    return int(float(match.group(1)) * _UNITS[match.group(2).upper()])
