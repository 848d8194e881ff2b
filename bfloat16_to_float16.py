#!/usr/bin/env python3
"""Convert a bfloat16 MPT checkpoint to float16 safetensors: ``python -m mpt_relax convert`` under its
old name, with ``--model NAME`` looked up in this repository's dist/models.

    python bfloat16_to_float16.py --model mpt-7b-instruct
        dist/models/mpt-7b-instruct -> dist/models/mpt-7b-instruct-float16
    python bfloat16_to_float16.py --model-path DIR [--output OUT]
        DIR -> OUT (default: DIR-float16 beside DIR)

Errors print one line on stderr and exit with status 1 (2 for a usage mistake, 130 on Ctrl-C, 143 on
SIGTERM); nothing is left behind. No TVM is imported.
"""

from __future__ import annotations

import sys
from pathlib import Path

from mpt_relax.interrupts import StartupHold

_HOLD = StartupHold() if __name__ == "__main__" else None  # a Ctrl-C during the imports: one line
MODELS_DIR = Path(__file__).resolve().parent / "dist" / "models"


def main(argv: list[str] | None = None) -> int:
    """Run the conversion; returns the process exit status."""
    from mpt_relax.__main__ import main as cli

    return cli(["convert", "--models-dir", str(MODELS_DIR), *(sys.argv[1:] if argv is None else argv)], hold=_HOLD)


if __name__ == "__main__":
    sys.exit(main())
