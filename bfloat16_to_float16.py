#!/usr/bin/env python3
"""Convert a bfloat16 MPT checkpoint to float16 safetensors (a thin CLI over mpt_relax.convert).

    python bfloat16_to_float16.py --model mpt-7b-instruct
        dist/models/mpt-7b-instruct -> dist/models/mpt-7b-instruct-float16
    python bfloat16_to_float16.py --model-path DIR [--output OUT]
        DIR -> OUT (default: DIR-float16 beside DIR)

Errors print one line on stderr and exit with status 1 (130 on Ctrl-C); nothing is left behind.
"""

from __future__ import annotations

import argparse
import logging
import re
import sys
from pathlib import Path

MODELS_DIR = Path(__file__).resolve().parent / "dist" / "models"
_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}


def parse_size(text: str) -> int:
    """Bytes in a size such as "2GB" (10**9), "1.5GiB" (2**30), "500MB" or "4096"."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*", text)
    if not match or match.group(2).upper() not in _UNITS:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (use e.g. 2GB, 1.5GiB, 500MB)")
    size = int(float(match.group(1)) * _UNITS[match.group(2).upper()])
    if size <= 0:
        raise argparse.ArgumentTypeError(f"size must be positive: {text!r}")
    return size


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Command-line arguments; --model or --model-path is required."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--model", help=f"checkpoint name under {MODELS_DIR}")
    source.add_argument("--model-path", type=Path, help="any checkpoint directory")
    parser.add_argument("--output", type=Path, help="destination directory (default: <source>-float16)")
    parser.add_argument("--strict", action="store_true", help="fail instead of clamping values beyond +-65504")
    parser.add_argument("--force", action="store_true", help="replace an existing destination")
    parser.add_argument("--no-verify", action="store_true", help="skip re-reading and checking the output")
    parser.add_argument("--any-arch", action="store_true", help="convert checkpoints whose model_type is not mpt")
    parser.add_argument("--quiet", action="store_true", help="no progress bar, no per-tensor/file details")
    parser.add_argument("--shard-size", type=parse_size, default="2GiB", help="output shard bound (default 2GiB)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Run the conversion; returns the process exit status."""
    args = parse_args(argv)
    logging.basicConfig(format="warning: %(message)s", level=logging.WARNING, stream=sys.stderr)
    from mpt_relax.io.checkpoint import CheckpointError
    from mpt_relax.tools.convert import ConversionError, convert_checkpoint

    src = MODELS_DIR / args.model if args.model else args.model_path
    dst = args.output or src.with_name(src.name + "-float16")
    try:
        report = convert_checkpoint(
            src,
            dst,
            strict=args.strict,
            force=args.force,
            verify=not args.no_verify,
            any_arch=args.any_arch,
            shard_size=args.shard_size,
            progress=False if args.quiet else None,
        )
    except (ConversionError, CheckpointError) as err:
        print(f"error: {str(err).replace(chr(10), ' ')}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted: nothing was written", file=sys.stderr)
        return 130
    print(report.summary(details=not args.quiet))
    return 0


if __name__ == "__main__":
    sys.exit(main())
