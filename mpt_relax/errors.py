"""The package's error hierarchy: everything mpt_relax raises on bad input derives from
:class:`MPTRelaxError`, so a caller (or a CLI) can catch one class and print one line.

It subclasses ``ValueError`` because almost every failure is a bad value handed in (a path, a
config field, a token id, a size); the per-area classes below say which layer refused it.
"""

from __future__ import annotations


class MPTRelaxError(ValueError):
    """Base class of every error mpt_relax raises on purpose; the message says what to do."""
