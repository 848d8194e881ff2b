"""How many threads the CPU kernels run on by default: one per physical core this process may use.

TVM's own default assumes every x86 core runs two hardware threads and takes half of the logical
CPUs. On a machine (or VM) without SMT that is half the cores: on a 2-vCPU cloud VM every kernel
ran on one thread, at about 60 % of the two-thread decode speed. :func:`use_physical_cores` sets
``TVM_NUM_THREADS`` to the real count unless the user chose one (``TVM_NUM_THREADS`` or
``OMP_NUM_THREADS``, which TVM also reads). TVM reads it when a thread first runs a parallel
kernel, so it is called before the engine runs anything.
"""

from __future__ import annotations

import os
from pathlib import Path

_TOPOLOGY = "/sys/devices/system/cpu/cpu{}/topology"
USER_VARIABLES = ("TVM_NUM_THREADS", "OMP_NUM_THREADS")


def usable_cpus() -> set[int]:
    """The logical CPUs this process may run on."""
    try:
        return set(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        return set(range(os.cpu_count() or 1))


def physical_cores(cpus: set[int] | None = None, topology: str = _TOPOLOGY) -> int:
    """Distinct (package, core) pairs among ``cpus`` (default: :func:`usable_cpus`); the logical
    CPU count where the topology cannot be read (not Linux)."""
    cpus = usable_cpus() if cpus is None else cpus
    cores = set()
    for cpu in cpus:
        base = Path(topology.format(cpu))
        try:
            cores.add(((base / "physical_package_id").read_text().strip(), (base / "core_id").read_text().strip()))
        except OSError:
            return len(cpus)
    return max(len(cores), 1)


def use_physical_cores(environ: dict | None = None) -> int | None:
    """Set ``TVM_NUM_THREADS`` to :func:`physical_cores` unless a user variable is set; returns
    the count set, or None where the user's choice stands."""
    environ = os.environ if environ is None else environ
    if any(environ.get(name) for name in USER_VARIABLES):
        return None
    count = physical_cores()
    environ["TVM_NUM_THREADS"] = str(count)
    return count
