"""A stop signal whose exception native code swallowed or re-wrapped still stops the command
cleanly: the staging directory publishes nothing and the error line says which signal."""

from __future__ import annotations

import os
import signal

import pytest

from mpt_relax.interrupts import StartupHold, Terminated, deferred_interrupts, stop_requested, terminate_as_interrupt
from mpt_relax.io.staging import publish_directory
from mpt_relax.tools import cli


def _signal_swallowed(sig: int) -> None:
    """Deliver ``sig`` to this process and swallow its exception, as some native code does."""
    try:
        os.kill(os.getpid(), sig)
        for _ in range(1000):  # the handler runs at a bytecode boundary
            pass
    except KeyboardInterrupt:
        pass
    else:
        raise AssertionError("the signal's handler did not raise")


@pytest.mark.parametrize("sig, rc, word", [(signal.SIGTERM, 143, "SIGTERM"), (signal.SIGINT, 130, "interrupted")])
def test_a_signal_rewrapped_as_another_error_reports_the_signal(capsys, sig, rc, word):
    def body():
        _signal_swallowed(sig)
        raise RuntimeError("SafetensorError: something a native library made of the interrupt")

    assert cli.run(body, [], interrupted="nothing was written") == rc
    err = capsys.readouterr().err
    assert err.startswith("error: ") and word in err and "nothing was written" in err and "Safetensor" not in err


def test_a_swallowed_signal_publishes_nothing(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(Terminated):
        with publish_directory(out, is_ours=lambda p: True, what="a test output") as tmp:
            (tmp / "half.bin").write_bytes(b"x")
            _signal_swallowed(signal.SIGTERM)
    assert list(tmp_path.iterdir()) == []


def test_the_record_starts_empty_in_each_outermost_block():
    with terminate_as_interrupt():
        _signal_swallowed(signal.SIGTERM)
        assert isinstance(stop_requested(), Terminated)
    with terminate_as_interrupt():
        assert stop_requested() is None
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL


def test_an_ignored_ctrl_c_stays_ignored_while_interrupts_are_held():
    """A command started with SIGINT ignored (nohup, a background job) is not stopped by one,
    not even while it holds interrupts back for its imports."""
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        hold = StartupHold()
        with deferred_interrupts():
            os.kill(os.getpid(), signal.SIGINT)
            for _ in range(1000):  # a handler would run at a bytecode boundary
                pass
        hold.release()
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGINT, previous)
