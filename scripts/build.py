#!/usr/bin/env python3
"""Compile an MPT checkpoint into dist/<model>-<quant>/: ``python -m mpt_relax build`` under its old name.

    python scripts/build.py --model mpt-7b-instruct --target cuda --quantization q4f16_1
"""

from __future__ import annotations

import sys

from mpt_relax.__main__ import main

if __name__ == "__main__":
    sys.exit(main(["build", *sys.argv[1:]]))
