"""Fixtures of the fault suite: one tiny checkpoint (with a tokenizer) and its artifact, built once."""

from __future__ import annotations

import shutil
import signal
from pathlib import Path

import pytest

import mpt_relax
from mpt_relax.tools import demo

TINY = dict(d_model=32, n_heads=2, n_layers=1, vocab_size=320, max_seq_len=128, expansion_ratio=2)


@pytest.fixture(scope="session", autouse=True)
def ctrl_c_raises():
    """Ctrl-C raises KeyboardInterrupt here and in the CLIs this suite starts, even when the suite
    itself was started with SIGINT ignored (a background job of a shell without job control, as
    ``nohup cmd &``): an ignored signal stays ignored across exec, a handled one is reset."""
    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    yield


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory) -> Path:
    """A random MPT checkpoint with a byte-level BPE tokenizer (do not modify: copy it)."""
    return demo.write_checkpoint(tmp_path_factory.mktemp("faults") / "tiny", TINY)


@pytest.fixture(scope="session")
def tiny_art(tiny_ckpt) -> Path:
    """Its q0f32 CPU artifact, built once (do not modify: copy it)."""
    return mpt_relax.build(tiny_ckpt, target="llvm", quantization="q0f32", output=tiny_ckpt.parent / "tiny-art",
                           quiet=True)


@pytest.fixture(scope="session")
def tiny_engine(tiny_art):
    return mpt_relax.Engine(tiny_art, device="cpu")


@pytest.fixture
def art_copy(tiny_art, tmp_path) -> Path:
    """A private copy of the artifact, to break."""
    return Path(shutil.copytree(tiny_art, tmp_path / "art"))
