"""The library compile in a child process (big checkpoints): same artifact, errors and signals reach
the parent, and the child never outlives the build."""

from __future__ import annotations

import signal
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from faultkit import SIGNAL_RC, assert_one_line, leftovers, signal_and_wait, start, wait_for

import mpt_relax
from mpt_relax.compile import builder, child
from mpt_relax.compile.targets import TargetError

# scripts/build.py with every checkpoint counted as big
OVERLAPPED_BUILD = ("import runpy, sys; import mpt_relax.compile.builder as b; b.OVERLAP_MIN_BYTES = 0; "
                    "sys.argv = ['build.py', *sys.argv[1:]]; runpy.run_path({script!r}, run_name='__main__')")


def _children(pid: int) -> list[int]:
    path = Path(f"/proc/{pid}/task/{pid}/children")
    return [int(p) for p in path.read_text().split()] if path.exists() else []


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state != "Z"


def _gone(pids: list[int], timeout: float = 30) -> bool:
    """Whether every process of ``pids`` has ended within ``timeout`` seconds (multiprocessing's
    resource tracker, a second child, exits once it sees its parent go)."""
    end = time.monotonic() + timeout
    while any(_alive(p) for p in pids):
        if time.monotonic() > end:
            return False
        time.sleep(0.05)
    return True


def test_overlapped_build_matches_the_sequential_one(tiny_ckpt, tiny_art, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(builder, "OVERLAP_MIN_BYTES", 0)
    art = mpt_relax.build(tiny_ckpt, target="llvm", quantization="q0f32", output=tmp_path / "art")
    assert "wait for the library compile" in capsys.readouterr().err
    ids = [1, 2, 3, 4, 5]
    got = mpt_relax.Engine(art, device="cpu").logits(ids)
    want = mpt_relax.Engine(tiny_art, device="cpu").logits(ids)
    np.testing.assert_array_equal(got, want)


def _request(tmp_path: Path, target: str) -> dict:
    from mpt_relax.models.mpt.config import MPTConfig
    from mpt_relax.quantization import get_quantization

    config = MPTConfig(d_model=32, n_heads=2, n_layers=1, vocab_size=320, max_seq_len=64, expansion_ratio=2)
    return dict(config=config, q=get_quantization("q0f32"), src_name="t", quantization="q0f32", page_size=16,
                tmp=str(tmp_path), quiet=True, targets=[(target, None, None)])


def test_child_error_is_raised_in_the_parent(tmp_path):
    with child.compile_in_child(_request(tmp_path, "no-such-target")) as job, pytest.raises(TargetError, match="no-such-target"):
        job.result()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="fork is chosen on Linux only")
def test_child_is_forked_unless_another_python_thread_runs(tmp_path, monkeypatch):
    """Forked, the child starts with TVM imported; beside a running Python thread it is spawned,
    and either way it compiles and reports the library. (The suite may have left threads of its
    own running, so the fork case counts only this one.)"""
    release = threading.Event()
    other = threading.Thread(target=release.wait)
    other.start()
    try:
        assert child.start_method() == "spawn"
        with child.compile_in_child(_request(tmp_path, "llvm")) as job:
            assert type(job._process).__name__ == "SpawnProcess"
            libraries = job.result()
        assert (tmp_path / libraries["llvm"]).is_file()
    finally:
        release.set()
        other.join()
    monkeypatch.setattr(child.threading, "active_count", lambda: 1)
    assert child.start_method() == "fork"
    (tmp_path / "forked").mkdir()
    with child.compile_in_child(_request(tmp_path / "forked", "llvm")) as job:
        assert type(job._process).__name__ == "ForkProcess"
        assert (tmp_path / "forked" / job.result()["llvm"]).is_file()


def test_child_killed_is_one_clear_error(tmp_path):
    with child.compile_in_child(_request(tmp_path, "llvm")) as job:
        job._process.kill()
        with pytest.raises(child.ChildCompileError, match="died"):
            job.result()


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_signal_stops_the_child_and_cleans_up(tiny_ckpt, tmp_path, sig):
    script = Path(builder.__file__).resolve().parents[2] / "scripts" / "build.py"
    out = tmp_path / "art"
    proc = start(["-c", OVERLAPPED_BUILD.format(script=str(script)), "--model", tiny_ckpt, "--output", out,
                  "--target", "llvm", "--quantization", "q0f32"])
    wait_for(lambda: leftovers(tmp_path, "art") and _children(proc.pid), 120, proc)
    kids = _children(proc.pid)
    rc, err = signal_and_wait(proc, sig)
    assert rc == SIGNAL_RC[sig], err
    assert_one_line(err, "interrupted" if sig == signal.SIGINT else "SIGTERM", "nothing was written")
    assert sorted(p.name for p in tmp_path.iterdir()) == []
    assert _gone(kids), [k for k in kids if _alive(k)]


def test_killed_build_takes_its_child_along(tiny_ckpt, tmp_path):
    script = Path(builder.__file__).resolve().parents[2] / "scripts" / "build.py"
    proc = start(["-c", OVERLAPPED_BUILD.format(script=str(script)), "--model", tiny_ckpt, "--output",
                  tmp_path / "art", "--target", "llvm", "--quantization", "q0f32"])
    wait_for(lambda: _children(proc.pid), 120, proc)
    kids = _children(proc.pid)
    proc.kill()
    proc.wait(30)
    assert _gone(kids), "the compile process outlived its SIGKILLed build"
