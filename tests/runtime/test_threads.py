"""The default CPU thread count: one per physical core, unless the user chose one."""

from __future__ import annotations

from pathlib import Path

import pytest

from mpt_relax.runtime import threads


def fake_topology(root: Path, cores: dict[int, tuple[int, int]]) -> str:
    """CPU number -> (package, core) as Linux's sysfs lays it out; returns the path pattern."""
    for cpu, (package, core) in cores.items():
        base = root / f"cpu{cpu}" / "topology"
        base.mkdir(parents=True)
        (base / "physical_package_id").write_text(f"{package}\n")
        (base / "core_id").write_text(f"{core}\n")
    return str(root / "cpu{}" / "topology")


def test_physical_cores_counts_smt_siblings_once(tmp_path):
    smt = fake_topology(tmp_path / "smt", {0: (0, 0), 1: (0, 1), 2: (0, 0), 3: (0, 1)})
    assert threads.physical_cores({0, 1, 2, 3}, smt) == 2
    assert threads.physical_cores({0, 2}, smt) == 1  # an affinity mask of one core's two threads
    no_smt = fake_topology(tmp_path / "vm", {0: (0, 0), 1: (0, 1)})
    assert threads.physical_cores({0, 1}, no_smt) == 2  # TVM's own default would be 1 here
    two_sockets = fake_topology(tmp_path / "numa", {0: (0, 0), 1: (1, 0)})
    assert threads.physical_cores({0, 1}, two_sockets) == 2  # core ids repeat across packages
    assert threads.physical_cores({0, 1, 5}, no_smt) == 3  # unreadable topology: the logical count


@pytest.mark.parametrize("user", [{"TVM_NUM_THREADS": "3"}, {"OMP_NUM_THREADS": "5"}])
def test_a_users_thread_count_stands(user):
    environ = dict(user)
    assert threads.use_physical_cores(environ) is None
    assert environ == user


def test_default_is_the_physical_core_count():
    environ = {"TVM_NUM_THREADS": ""}
    assert threads.use_physical_cores(environ) == threads.physical_cores()
    assert environ["TVM_NUM_THREADS"] == str(threads.physical_cores())

