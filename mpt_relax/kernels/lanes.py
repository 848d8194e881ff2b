"""Lane arithmetic on TIR vector expressions, shared by the hand-written CPU kernels."""

from __future__ import annotations

from tvm.script import tirx as T


def halving_sum(v, width: int, until: int = 1):
    """Fold a [width] vector ``v`` by adding its two halves while the width is even and above
    ``until``: returns (the folded vector, its width). Each fold is one vector add, so a power
    of two reaches ``until`` (or 1) in log2 steps; an odd rest is left to the caller."""
    while width > until and width % 2 == 0:
        width //= 2
        v = T.Shuffle([v], list(range(width))) + T.Shuffle([v], list(range(width, 2 * width)))
    return v, width
