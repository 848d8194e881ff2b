"""What every mpt_relax command line shares: one line per error, no tracebacks, signal exit codes.

The contract (``python -m mpt_relax ...``, ``scripts/build.py``, ``bfloat16_to_float16.py``):

- any exception ends the command with one line ``error: ...`` on stderr and status 1;
  ``--verbose`` or ``MPT_RELAX_DEBUG=1`` prints the traceback first;
- a usage mistake is one line ``error: ... (see PROG --help)`` and status 2;
- Ctrl-C prints ``error: interrupted`` and exits 130; SIGTERM / SIGHUP are handled the same
  way (cleanup runs) and exit 143 / 129; a Ctrl-C while native libraries are being imported is
  held back until the import is over (:func:`mpt_relax.interrupts.deferred_interrupts`).

Imports only the standard library and TVM-free parts of the package.
"""

from __future__ import annotations

import argparse
import os
import sys
import traceback
from typing import Callable, Sequence

from mpt_relax.errors import MPTRelaxError
from mpt_relax.interrupts import StartupHold, Terminated, deferred_interrupts, exit_status, stop_requested, \
    terminate_as_interrupt

DEBUG_ENV = "MPT_RELAX_DEBUG"

__all__ = ["Parser", "deferred_interrupts", "int_at_least", "one_line", "run", "wants_traceback"]


class Parser(argparse.ArgumentParser):
    """argparse with a one-line error (``error: ... (see PROG --help)``, status 2) instead of the usage block."""

    def error(self, message: str):
        print(f"error: {message} (see {self.prog} --help)", file=sys.stderr)
        sys.exit(2)


def int_at_least(low: int) -> Callable[[str], int]:
    """An argparse ``type``: an integer >= ``low``."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be at least {low}, got {value}")
        return value

    parse.__name__ = f"integer >= {low}"
    return parse


def wants_traceback(argv: Sequence[str] | None) -> bool:
    """``--verbose`` among the arguments, or MPT_RELAX_DEBUG set to anything but "" / "0"."""
    args = sys.argv[1:] if argv is None else argv
    return "--verbose" in args or os.environ.get(DEBUG_ENV, "") not in ("", "0")


def one_line(err: BaseException) -> str:
    """A one-line description of ``err``.

    Our own errors are one line already. Others (TVM, the linker, the OS) may carry a C++
    traceback or a compiler log: the line that says what went wrong is picked (a "No space left"
    line, else the last line of a traceback, else the first line), prefixed with the type.
    """
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    if isinstance(err, MPTRelaxError):
        return " ".join(lines) or type(err).__name__
    if not lines:
        return type(err).__name__
    space = [line for line in lines if "No space left" in line]
    if space:
        text = space[0]
    elif lines[0].startswith("Traceback") or len(lines) > 1 and lines[-1].split(":")[0].endswith("Error"):
        text = lines[-1]
    else:
        text = lines[0]
    name = type(err).__name__
    return text if text.startswith(name) else f"{name}: {text}"


def _report_interrupt(err: KeyboardInterrupt, interrupted: str) -> int:
    what = str(err) if isinstance(err, Terminated) else "interrupted"
    print(f"error: {what}" + (f"; {interrupted}" if interrupted else ""), file=sys.stderr)
    return exit_status(err)


def run(body: Callable[[], int], argv: Sequence[str] | None = None, *, interrupted: str = "",
        hold: StartupHold | None = None) -> int:
    """Run a command's ``body`` under the contract above; returns the exit status.

    ``interrupted``: added to the interruption line (e.g. "nothing was written"); ``hold``: the
    :class:`~mpt_relax.interrupts.StartupHold` the entry point made before its imports.
    """
    verbose = wants_traceback(argv)
    try:
        if hold is not None:
            hold.release()  # a Ctrl-C during the imports is raised here, inside the guard
        with terminate_as_interrupt():
            return body()
    except KeyboardInterrupt as err:  # Ctrl-C, or SIGTERM / SIGHUP as Terminated
        return _report_interrupt(err, interrupted)
    except SystemExit as err:  # argparse: --help (0) or a usage error (2, its line already printed)
        return err.code if isinstance(err.code, int) else int(err.code is not None)
    except Exception as err:  # noqa: BLE001 - the contract: one line, whatever went wrong
        stopped = stop_requested()  # a signal's exception that native code re-raised as its own error
        if stopped is not None:
            return _report_interrupt(stopped, interrupted)
        if verbose:
            traceback.print_exc()
        hint = "" if isinstance(err, MPTRelaxError) or verbose else f" (--verbose or {DEBUG_ENV}=1 shows the traceback)"
        print(f"error: {one_line(err)}{hint}", file=sys.stderr)
        return 1
