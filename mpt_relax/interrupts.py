"""Signals as exceptions: SIGTERM (and SIGHUP) handled like Ctrl-C, and Ctrl-C held back while
native libraries are being imported.

``kill``, systemd, Docker and CI stop a process with SIGTERM; Python's default is to die at
once, leaving half-written temporary directories. :func:`terminate_as_interrupt` turns it into
:class:`Terminated` (a ``KeyboardInterrupt``), so every ``finally`` / ``except BaseException``
that cleans up after Ctrl-C cleans up after SIGTERM too.

A ``KeyboardInterrupt`` raised while a C++ extension is importing (TVM, torch, tokenizers) can
surface inside a native callback and abort the process (``terminate called ...``, rc 134).
:func:`deferred_interrupts` records a Ctrl-C during such a block and raises it once the block
has finished, from plain Python.

An exception raised from a signal handler can also be lost or rewritten on its way out of
native code (a Rust or C++ extension that swallows it, or wraps it in its own error type). So
every stop signal is also *recorded*: :func:`raise_if_stopped` re-raises a recorded one (the
staging directory calls it before it publishes anything), and :func:`stop_requested` lets an
error guard report "interrupted" rather than the wrapped error.

This module imports nothing but the standard library.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from typing import Iterator

STOP_SIGNALS = tuple(s for s in (getattr(signal, "SIGTERM", None), getattr(signal, "SIGHUP", None)) if s is not None)


class Terminated(KeyboardInterrupt):
    """The process was asked to stop by ``signum`` (SIGTERM, SIGHUP); cleaned up like Ctrl-C."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum

    def __str__(self) -> str:
        return f"terminated by {signal.Signals(self.signum).name}"


def exit_status(interrupt: KeyboardInterrupt) -> int:
    """The shell's status for a process stopped by this interrupt: 128 + the signal number."""
    return 128 + (interrupt.signum if isinstance(interrupt, Terminated) else signal.SIGINT)


_requested: list[int] = []  # stop signals received inside terminate_as_interrupt, first first


def _interrupt_for(signum: int) -> KeyboardInterrupt:
    return KeyboardInterrupt() if signum == signal.SIGINT else Terminated(signum)


def _raise_terminated(signum, frame) -> None:
    _requested.append(signum)
    raise _interrupt_for(signum)


def stop_requested() -> KeyboardInterrupt | None:
    """The interrupt for the first stop signal recorded since the outermost
    :func:`terminate_as_interrupt` began, or None."""
    return _interrupt_for(_requested[0]) if _requested else None


def raise_if_stopped() -> None:
    """Raise the recorded stop signal's interrupt, in case native code swallowed the first raise."""
    interrupt = stop_requested()
    if interrupt is not None:
        raise interrupt


def _main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


def _heeded(sigs) -> list[int]:
    """The signals of ``sigs`` this process is not ignoring: a command started with a signal
    ignored (``nohup``, a background job of a shell without job control) keeps ignoring it."""
    return [sig for sig in sigs if signal.getsignal(sig) is not signal.SIG_IGN]


@contextlib.contextmanager
def terminate_as_interrupt() -> Iterator[None]:
    """Within the block, SIGTERM / SIGHUP raise :class:`Terminated` in the main thread, and every
    stop signal (Ctrl-C too) is recorded for :func:`stop_requested`.

    Only signals still at their default disposition are taken over (a program that installed
    its own handler keeps it); the previous handlers come back on exit. The outermost block
    starts with no signal recorded. Outside the main thread Python cannot install handlers,
    and the block runs unchanged.
    """
    previous = {}
    if _main_thread():
        defaults = {signal.SIGINT: signal.default_int_handler, **{sig: signal.SIG_DFL for sig in STOP_SIGNALS}}
        if not any(signal.getsignal(sig) is _raise_terminated for sig in defaults):
            _requested.clear()  # the outermost block
        for sig, default in defaults.items():
            if signal.getsignal(sig) is default:
                previous[sig] = signal.signal(sig, _raise_terminated)
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


@contextlib.contextmanager
def deferred_interrupts() -> Iterator[None]:
    """Hold back Ctrl-C and SIGTERM/SIGHUP during the block; raise the first one after it
    (an ignored one stays ignored).

    For imports of native libraries, which must not see an exception mid-way (see the module
    docstring). A no-op outside the main thread.
    """
    if not _main_thread():
        yield
        return
    caught: list[int] = []
    sigs = _heeded((signal.SIGINT, *STOP_SIGNALS))
    previous = {sig: signal.signal(sig, lambda signum, frame: caught.append(signum)) for sig in sigs}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if caught:
        raise KeyboardInterrupt() if caught[0] == signal.SIGINT else Terminated(caught[0])


class StartupHold:
    """Hold back Ctrl-C and SIGTERM/SIGHUP from now until :meth:`release`, which re-raises the
    first one caught. A command line creates one as its first statement, so that a signal during
    its own imports is raised inside its error guard (one line) instead of as a traceback."""

    def __init__(self):
        self.caught: list[int] = []
        self._previous = {}
        if _main_thread():
            for sig in _heeded((signal.SIGINT, *STOP_SIGNALS)):
                self._previous[sig] = signal.signal(sig, self._record)

    def _record(self, signum, frame) -> None:
        self.caught.append(signum)

    def release(self) -> None:
        """Put the previous handlers back; raise the first signal caught meanwhile, if any."""
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}
        if self.caught:
            first, self.caught = self.caught[0], []
            raise KeyboardInterrupt() if first == signal.SIGINT else Terminated(first)
