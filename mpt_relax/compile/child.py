"""Compile an artifact's libraries in a child process while the parent streams the weights.

The libraries depend on the model's shapes, the quantization and the targets, never on the
weight values, and both jobs are long for a 7B checkpoint (the weights are read, quantized
and written; the IRModule is lowered and LLVM generates code). A second process does the
compile on another core: a thread would share the interpreter lock with the quantizer and
take Python's signal handling away from the main thread. On Linux the child is forked
(:func:`start_method`): it starts with TVM already imported, 2.5 s sooner than a spawned one;
elsewhere, or while other Python threads run, it is spawned.

:func:`compile_in_child` returns a :class:`LibraryJob`; :meth:`LibraryJob.result` waits for it
and returns ``{target: library file}``, or re-raises the child's error in the parent. Leaving
the ``with`` block early (an error, Ctrl-C, SIGTERM) stops the child and waits for it, so
nothing writes into the staging directory after it is removed. On Linux the child also asks to
receive SIGTERM if the parent dies (SIGKILL), so it never outlives a killed build.
"""

from __future__ import annotations

import ctypes
import multiprocessing
import pickle
import signal
import sys
import threading
import warnings
from pathlib import Path

from mpt_relax.errors import MPTRelaxError
from mpt_relax.interrupts import STOP_SIGNALS, deferred_interrupts

_PR_SET_PDEATHSIG = 1
_STOP_WAIT_S = 10


class ChildCompileError(MPTRelaxError):
    """The compile process died without reporting (killed, out of memory)."""


class LibraryJob:
    """A running compile process (see the module docstring); a context manager."""

    def __init__(self, process: multiprocessing.Process, conn):
        self._process, self._conn = process, conn

    def result(self) -> dict[str, str]:
        """Wait for the child: ``{target name: library file name}``; its error is raised here."""
        try:
            status, value = self._conn.recv()
        except EOFError:
            self._process.join()
            raise ChildCompileError(
                f"the library compile process died (exit code {self._process.exitcode}) without an error "
                "message; out of memory? rebuild, or free memory first"
            ) from None
        self._process.join()
        if status == "error":
            raise value
        return value

    def stop(self) -> None:
        """Terminate the child if it still runs, and wait for it."""
        if self._process.is_alive():
            self._process.terminate()
            self._process.join(_STOP_WAIT_S)
            if self._process.is_alive():
                self._process.kill()
                self._process.join()
        self._conn.close()

    def __enter__(self) -> "LibraryJob":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def compile_in_child(request: dict) -> LibraryJob:
    """Start :func:`_child_main` on ``request`` (picklable keyword arguments of
    :func:`mpt_relax.compile.builder.compile_libraries`, the targets as ``resolve_target`` arguments)."""
    context = multiprocessing.get_context(start_method())
    parent_conn, child_conn = context.Pipe(duplex=False)
    process = context.Process(
        target=_child_main, args=(child_conn, request), name="mpt_relax-compile", daemon=True
    )
    job = None
    try:
        # deferred: a signal mid-start would leave a half-fed child printing a traceback. Python 3.12+
        # warns of any fork beside native threads; start_method says why this one is safe.
        with deferred_interrupts(), warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*multi-threaded, use of fork", category=DeprecationWarning)
            process.start()
            child_conn.close()
            job = LibraryJob(process, parent_conn)
    except BaseException:
        if job is not None:
            job.stop()
        raise
    return job


def start_method() -> str:
    """``fork`` on Linux while no other Python thread runs (one could hold a lock the child
    needs), else ``spawn``. Idle native pools (OpenBLAS's, started by importing numpy; TVM's)
    are harmless: the child only compiles, it runs no kernel on them."""
    return "fork" if sys.platform.startswith("linux") and threading.active_count() == 1 else "spawn"


def _die_with_parent() -> None:
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0)
        except (OSError, AttributeError):  # no prctl: the parent's stop() still ends the child
            pass


def _portable(exc: Exception) -> Exception:
    """``exc`` if it survives a pickle round trip (the parent unpickles it), else its text."""
    try:
        pickle.loads(pickle.dumps(exc))
        return exc
    except Exception:  # noqa: BLE001 - any failure to pickle or unpickle
        return RuntimeError(f"{type(exc).__name__}: {exc}")


def _child_main(conn, request: dict) -> None:
    _die_with_parent()
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a terminal's Ctrl-C reaches the parent too, which stops us
    for signum in STOP_SIGNALS:  # a forked child has the parent's handlers: SIGTERM must end it
        signal.signal(signum, signal.SIG_DFL)
    from mpt_relax.compile import builder, targets

    try:
        specs = [targets.resolve_target(name, cuda_arch=cuda_arch, mcpu=mcpu)
                 for name, cuda_arch, mcpu in request.pop("targets")]
        request["tmp"] = Path(request["tmp"])
        conn.send(("ok", builder.compile_libraries(specs=specs, **request)))
    except Exception as exc:  # noqa: BLE001 - every error goes to the parent, which raises it
        conn.send(("error", _portable(exc)))
    finally:
        conn.close()
