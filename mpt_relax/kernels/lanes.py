"""Lane arithmetic on TIR vector expressions, shared by the hand-written CPU kernels."""

from __future__ import annotations

from tvm import tirx
from tvm.script import tirx as T


def bound(value, use):
    """``use(v)`` with ``value`` bound to a variable ``v`` once (a TIR ``Let``), so that an
    expression using a vector several times does not copy its expression tree each time (the
    copies double per level of a tree of shuffles, which the TIR passes then walk)."""
    if isinstance(value, (tirx.Var, tirx.IntImm, tirx.FloatImm)):
        return use(value)
    var = tirx.Var("v", value.ty)
    return tirx.Let(var, value, use(var))


def halving_sum(v, width: int, until: int = 1, combine=lambda a, b: a + b):
    """Fold a [width] vector ``v`` by adding (or ``combine``-ing) its two halves while the width
    is even and above ``until``: returns (the folded vector, its width). Each fold is one vector
    op, so a power of two reaches ``until`` (or 1) in log2 steps; an odd rest is left to the caller."""
    while width > until and width % 2 == 0:
        width //= 2
        v = combine(T.Shuffle([v], list(range(width))), T.Shuffle([v], list(range(width, 2 * width))))
    return v, width


def transposed_sums(vectors: list, width: int):
    """The [n] vector of the lane sums of ``n`` [width] vectors (n == width, a power of two):
    lane t is ``sum(vectors[t])``. A tree of two-vector shuffles and adds: each level pairs the
    vectors and halves the lanes each one's keys hold, n - 1 adds in all (n horizontal sums would
    take n * log2(width)). Each vector is used twice, so it is :func:`bound` first."""
    keys = 1  # sums each vector of the level holds, in order, width // keys lanes each
    while len(vectors) > 1:
        lanes, paired = width // keys, []
        low = [k * lanes + i + part * width for part in (0, 1) for k in range(keys) for i in range(lanes // 2)]
        high = [i + lanes // 2 for i in low]
        for a, b in zip(vectors[::2], vectors[1::2]):
            paired.append(bound(a, lambda a, b=b: bound(b, lambda b, a=a: T.Shuffle([a, b], low) + T.Shuffle([a, b], high))))
        vectors, keys = paired, keys * 2
    return vectors[0]


def _butterfly_index(stage, row):
    """``vpermi2ps`` lane indices of ``row`` in stage ``stage`` of :func:`transpose_16x16`: lane
    ``l`` takes lane ``l ^ bit`` or ``l`` of the pair's first (index < 16) or second row, so that
    bit ``stage`` of the row number and of the lane number trade places."""
    lane = T.ramp(0, 1, 16)
    lane_bit = T.shift_right(lane, T.Broadcast(stage, 16)) & T.Broadcast(1, 16)
    row_bit = T.Broadcast(T.shift_right(row, stage) & 1, 16)
    return (lane ^ T.shift_left(lane_bit ^ row_bit, T.Broadcast(stage, 16))) + lane_bit * T.Broadcast(16, 16)


def _butterfly_row(stage, row, second: bool):
    """First element of the pair of rows (bit ``stage`` clear, or set if ``second``) that row
    ``row`` reads from in stage ``stage``."""
    first = row - (T.shift_right(row, stage) & 1) * T.shift_left(1, stage)
    return (first + T.shift_left(1, stage) if second else first) * 16


@T.macro
def transpose_16x16(buf):
    """Transpose the 16 x 16 block of 32-bit values ``buf[0, 0:256]`` (row-major) in place, via
    ``buf[1, :]``: four stages of 16 two-row ``vpermi2ps`` (AVX-512F) permutes, stage s swapping
    bit s of the row number with bit s of the lane number. ``buf``: float32 [2, 256]; the loops
    are unrolled, so every lane index is a constant."""
    for stage in T.unroll(4):
        for row in T.unroll(16):
            buf[(stage + 1) % 2, T.ramp(row * 16, 1, 16)] = T.call_llvm_pure_intrin(
                "float32x16", "llvm.x86.avx512.vpermi2var.ps.512",
                buf[stage % 2, T.ramp(_butterfly_row(stage, row, False), 1, 16)], _butterfly_index(stage, row),
                buf[stage % 2, T.ramp(_butterfly_row(stage, row, True), 1, 16)])
