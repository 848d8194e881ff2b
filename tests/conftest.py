"""Shared fixtures: build a tiny checkpoint into an artifact and load it."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
os.environ.setdefault("TVM_NUM_THREADS", "2")

import mpt_relax  # noqa: E402


@pytest.fixture
def engine_for(tmp_path):
    """engine_for(checkpoint_dir, quantization="q0f32") -> Engine on the CPU."""

    def make(ckpt: Path, quantization: str = "q0f32", **kw) -> mpt_relax.Engine:
        out = tmp_path / f"art-{ckpt.name}-{quantization}"
        art = mpt_relax.build(ckpt, target="llvm", quantization=quantization, output=out, quiet=True, **kw)
        return mpt_relax.Engine(art, device="cpu")

    return make
