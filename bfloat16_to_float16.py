#!/usr/bin/env python3
"""Convert a bfloat16 MPT checkpoint to float16 safetensors: ``python -m mpt_relax convert`` under its
old name, with ``--model NAME`` looked up in this repository's dist/models.

    python bfloat16_to_float16.py --model mpt-7b-instruct
        dist/models/mpt-7b-instruct -> dist/models/mpt-7b-instruct-float16
    python bfloat16_to_float16.py --model-path DIR [--output OUT]
        DIR -> OUT (default: DIR-float16 beside DIR)

Errors print one line on stderr and exit with status 1 (130 on Ctrl-C); nothing is left behind.
"""

from __future__ import annotations

import sys
from pathlib import Path

MODELS_DIR = Path(__file__).resolve().parent / "dist" / "models"


def main(argv: list[str] | None = None) -> int:
    """Run the conversion; returns the process exit status."""
    from mpt_relax.__main__ import main as cli

    return cli(["convert", "--models-dir", str(MODELS_DIR), *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
