#!/usr/bin/env python3
"""Write a random-weight MPT checkpoint (HF layout, fp32 safetensors, small BPE tokenizer).

For speed measurements at real sizes without downloading weights, e.g. a ~125M model:

    python scripts/make_random_checkpoint.py --d-model 768 --n-layers 12 --n-heads 12 --vocab 50432 \\
        dist/models/mpt-125m-random
    python -c "import mpt_relax; mpt_relax.build('dist/models/mpt-125m-random', quantization='q0f32')"
    python -m mpt_relax bench --artifact dist/mpt-125m-random-q0f32 --prompt-len 128 --gen-len 128 --compare-hf

The tokenizer is trained on mpt_relax.tools.demo's small built-in text, so it has far fewer ids
than --vocab (like MPT's 50277 of 50432); token-id prompts, as bench uses, cover the whole
vocabulary. Errors print one line on stderr and exit with status 1.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mpt_relax.tools.demo import write_checkpoint  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("output", type=Path)
    p.add_argument("--d-model", type=int, default=768)
    p.add_argument("--n-layers", type=int, default=12)
    p.add_argument("--n-heads", type=int, default=12)
    p.add_argument("--vocab", type=int, default=50432)
    p.add_argument("--max-seq-len", type=int, default=2048)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    if args.output.exists() and (not args.output.is_dir() or any(args.output.iterdir())):
        print(f"error: {args.output} exists and is not empty", file=sys.stderr)
        return 1
    cfg = dict(d_model=args.d_model, n_heads=args.n_heads, n_layers=args.n_layers, vocab_size=args.vocab,
               max_seq_len=args.max_seq_len, expansion_ratio=4)
    try:
        write_checkpoint(args.output, cfg, args.seed)
    except (OSError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(f"wrote {args.output}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
