#!/usr/bin/env python3
"""Compile an MPT checkpoint into dist/<model>-<quant>/: a thin CLI over mpt_relax.build.

    python scripts/build.py --model mpt-7b-instruct --target cuda --quantization q4f16_1
"""

from __future__ import annotations

import argparse
import sys

import mpt_relax
from mpt_relax.compile.pipeline import TARGETS
from mpt_relax.quantization import QUANTIZATIONS


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="preset name (looked up under DIST/models/) or checkpoint directory")
    p.add_argument("--target", nargs="+", default=["auto"], choices=TARGETS, help="one library per target")
    p.add_argument("--quantization", default="q4f16_1", help=f"one of {', '.join(QUANTIZATIONS)} (default q4f16_1)")
    p.add_argument("--quantize-embedding", action="store_true",
                   help="q4f16_1/q8f16_1: quantize the token embedding (the tied LM head) too (default: kept fp16)")
    p.add_argument("--max-seq-len", type=int, help="context window to build for (ALiBi extrapolates)")
    p.add_argument("--cuda-arch", help="e.g. sm_90 (default: the local GPU's, else sm_80)")
    p.add_argument("--mcpu", help="CPU to compile CPU code for: native (default, this machine) or an LLVM name "
                   "such as x86-64-v3 to run the artifact on other machines")
    p.add_argument("--output", help="artifact directory (default DIST/<model>-<quantization>)")
    p.add_argument("--dist", default="dist", help="dist root (default ./dist)")
    p.add_argument("--force", action="store_true", help="rebuild even if the artifact is up to date")
    p.add_argument("--quiet", action="store_true", help="no progress output")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        mpt_relax.build(args.model, target=args.target, quantization=args.quantization, output=args.output,
                        quantize_embedding=args.quantize_embedding, max_seq_len=args.max_seq_len,
                        cuda_arch=args.cuda_arch, mcpu=args.mcpu, force=args.force, dist_root=args.dist,
                        quiet=args.quiet)
    except (ValueError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("error: interrupted; nothing was written", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
