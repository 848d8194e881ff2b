"""Signals against real processes: SIGINT and SIGTERM clean up, SIGKILL's leftovers go at the next run."""

from __future__ import annotations

import shutil
import signal
from pathlib import Path

import pytest
import torch
from faultkit import BUILD, CONVERT, SIGNAL_RC, assert_one_line, leftovers, run, signal_and_wait, start, tree_hash, \
    wait_for
from safetensors.torch import save_file

BUILD_ARGS = ["--target", "llvm", "--quantization", "q0f32"]


def staging_dirs(parent, name):
    return [n for n in leftovers(parent, name) if ".tmp-" in n]


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_build_interrupted_leaves_nothing(tiny_ckpt, tmp_path, sig):
    out = tmp_path / "art"
    proc = start([BUILD, "--model", tiny_ckpt, "--output", out, *BUILD_ARGS])
    wait_for(lambda: staging_dirs(tmp_path, "art"), 120, proc)
    rc, err = signal_and_wait(proc, sig)
    assert rc == SIGNAL_RC[sig], err
    assert_one_line(err, "interrupted" if sig == signal.SIGINT else "SIGTERM", "nothing was written")
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_build_killed_then_rerun_cleans_up(tiny_ckpt, tiny_art, tmp_path):
    out = shutil.copytree(tiny_art, tmp_path / "art")
    before = tree_hash(out)
    proc = start([BUILD, "--model", tiny_ckpt, "--output", out, *BUILD_ARGS, "--force"])
    wait_for(lambda: staging_dirs(tmp_path, "art"), 120, proc)
    proc.kill()
    proc.wait(30)
    assert staging_dirs(tmp_path, "art"), "SIGKILL leaves the staging directory (no handler can run)"
    assert tree_hash(out) == before  # the old artifact is intact
    again = run([BUILD, "--model", tiny_ckpt, "--output", out, *BUILD_ARGS])  # up to date: quick
    assert again.returncode == 0 and "up to date" in again.stderr
    assert leftovers(tmp_path, "art") == [] and tree_hash(out) == before


@pytest.fixture(scope="module")
def bf16_ckpt(tmp_path_factory):
    """A bf16 checkpoint of ~40 MB: conversion takes long enough to be interrupted mid-way."""
    path = tmp_path_factory.mktemp("bf16") / "src"
    path.mkdir()
    (path / "config.json").write_text('{"model_type": "mpt", "d_model": 64, "n_heads": 4, "n_layers": 1}')
    gen = torch.Generator().manual_seed(0)
    save_file({f"w{i}": torch.randn(1024, 2048, generator=gen).to(torch.bfloat16) for i in range(10)},
              str(path / "model.safetensors"))
    return path


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_converter_interrupted_leaves_nothing(bf16_ckpt, tmp_path, sig):
    out = tmp_path / "out"
    before = tree_hash(bf16_ckpt)
    proc = start([CONVERT, "--model-path", bf16_ckpt, "--output", out, "--quiet"])
    wait_for(lambda: staging_dirs(tmp_path, "out") and any((tmp_path / staging_dirs(tmp_path, "out")[0]).iterdir()),
             120, proc)
    rc, err = signal_and_wait(proc, sig)
    assert rc == SIGNAL_RC[sig], err
    assert_one_line(err, "nothing was written")
    assert sorted(p.name for p in tmp_path.iterdir()) == [] and tree_hash(bf16_ckpt) == before


def test_converter_killed_then_rerun_cleans_up(bf16_ckpt, tmp_path):
    out = tmp_path / "out"
    proc = start([CONVERT, "--model-path", bf16_ckpt, "--output", out, "--quiet"])
    wait_for(lambda: staging_dirs(tmp_path, "out"), 120, proc)
    proc.kill()
    proc.wait(30)
    assert staging_dirs(tmp_path, "out") and not out.exists()
    again = run([CONVERT, "--model-path", bf16_ckpt, "--output", out, "--quiet", "--no-verify"])
    assert again.returncode == 0, again.stderr
    assert leftovers(tmp_path, "out") == [] and (out / "model.safetensors.index.json").is_file()


def _mapped(proc, library: str) -> bool:
    try:
        return library in Path(f"/proc/{proc.pid}/maps").read_text()
    except OSError:
        return False


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="watches /proc/PID/maps")
@pytest.mark.parametrize("sig,library", [(signal.SIGINT, "_multiarray_umath"), (signal.SIGINT, "libtvm"),
                                         (signal.SIGTERM, "_multiarray_umath")])
def test_ctrl_c_during_start_up_is_one_line(tiny_art, sig, library):
    """SIGINT while the CLI imports numpy, then while it imports TVM; SIGTERM likewise: one line."""
    proc = start(["-m", "mpt_relax", "generate", "--artifact", tiny_art, "--prompt", "hi"])
    wait_for(lambda: _mapped(proc, library), 120, proc, step=0.001)
    rc, err = signal_and_wait(proc, sig)
    assert rc == SIGNAL_RC[sig], err
    assert_one_line(err, "interrupted" if sig == signal.SIGINT else "terminated by SIGTERM")
