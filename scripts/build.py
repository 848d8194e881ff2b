#!/usr/bin/env python3
"""Compile an MPT checkpoint into dist/<model>-<quant>/: ``python -m mpt_relax build`` under its old name.

    python scripts/build.py --model mpt-7b-instruct --target cuda --quantization q4f16_1
"""

from __future__ import annotations

import sys

from mpt_relax.interrupts import StartupHold

_HOLD = StartupHold() if __name__ == "__main__" else None  # a Ctrl-C during the imports: one line

from mpt_relax.__main__ import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["build", *sys.argv[1:]], hold=_HOLD))
