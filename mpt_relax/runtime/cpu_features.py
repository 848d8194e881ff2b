"""The host CPU's instruction sets, read without LLVM (the runtime runs without the compiler).

A library compiled for an ``mcpu`` records that CPU's instruction-set features (LLVM names, see
:func:`mpt_relax.compile.targets.isa_features`); the engine refuses to load it on a CPU that lacks
one, instead of dying of SIGILL. Names are compared in a normal form that LLVM's feature names and
Linux's ``/proc/cpuinfo`` flags share (``sse4.2`` ~ ``sse4_2``, ``amx-tile`` ~ ``amx_tile``).
"""

from __future__ import annotations

import functools
from pathlib import Path

# operand dtypes whose bf16 hi + lo parts hold them exactly: the models whose exact prefill runs
# on the AMX tiles (mpt_relax.kernels.cpu.amx_matmul)
AMX_EXACT_DTYPES = ("float16", "bfloat16")
_CPUINFO_ALIASES = {"pni": "sse3", "abm": "lzcnt", "bmi1": "bmi", "pclmulqdq": "pclmul", "shani": "sha"}


def normal_form(feature: str) -> str:
    """``'sse4.2'`` / ``'sse4_2'`` -> ``'sse42'``; cpuinfo's own spellings mapped to LLVM's."""
    key = feature.lower().replace("-", "").replace("_", "").replace(".", "")
    return _CPUINFO_ALIASES.get(key, key)


@functools.lru_cache(maxsize=1)
def host_features(cpuinfo: str = "/proc/cpuinfo") -> frozenset[str] | None:
    """Normal-form flags of this machine's x86 CPU, or None where they cannot be read here."""
    try:
        text = Path(cpuinfo).read_text()
    except OSError:
        return None
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "flags":
            return frozenset(normal_form(f) for f in value.split())
    return None


def missing_features(required: list[str], host: frozenset[str] | None = None) -> list[str]:
    """Those of ``required`` (LLVM names) the host lacks; [] when the host's flags are unknown."""
    host = host_features() if host is None else host
    if host is None:
        return []
    return sorted(f for f in required if normal_form(f) not in host)


_ARCH_REQ_XCOMP_PERM, _XFEATURE_XTILEDATA, _SYS_ARCH_PRCTL = 0x1023, 18, 158  # Linux x86-64


@functools.lru_cache(maxsize=1)
def request_amx() -> bool:
    """Ask Linux for the AMX tile state (``arch_prctl(ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA)``),
    once per process: without it the first AMX instruction raises SIGILL. True if granted;
    False where the CPU or the OS has no AMX."""
    import ctypes
    import platform

    features = host_features()
    if platform.system() != "Linux" or platform.machine() != "x86_64" or not features or "amxtile" not in features:
        return False
    libc = ctypes.CDLL(None, use_errno=True)
    return libc.syscall(_SYS_ARCH_PRCTL, _ARCH_REQ_XCOMP_PERM, _XFEATURE_XTILEDATA) == 0
