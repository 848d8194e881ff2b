"""Lane arithmetic on TIR vector expressions, shared by the hand-written CPU kernels."""

from __future__ import annotations

from tvm import tirx
from tvm.script import tirx as T


def prefetch_line(address, locality: int = 3):
    """The call that asks for the cache line at ``address`` (a ``T.address_of``) for reading:
    into L1 (``locality`` 3) or L2 (2)."""
    return T.call_llvm_intrin("void", "llvm.prefetch.p0", address, T.int32(0), T.int32(locality), T.int32(1))


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


def transposed_16x16(rows: list) -> list:
    """Variables holding the 16 rows of the transpose of the 16 x 16 block whose rows are
    ``rows`` (16 expressions of 16 32-bit lanes): four stages of two-row shuffles with constant
    masks (``vpermt2ps``), stage ``s`` trading bit ``s`` of the row number for bit ``s`` of the
    lane number, each stage's rows bound to variables (registers). Call it while a TIR function
    is being parsed (from a macro): the bindings go into the current frame."""
    for stage in range(4):
        bit = 1 << stage
        rows = [T.bind(T.Shuffle([rows[r & ~bit], rows[r | bit]],
                                 [(lane >> stage & 1) * 16 + (lane & ~bit | (r >> stage & 1) << stage) for lane in range(16)]))
                for r in range(16)]
    return rows


def emit_rows(rows: list, store) -> None:
    """``store(i, rows[i])`` for each row, in order: the statements ``store`` emits (through the
    IR builder, e.g. ``T.buffer_store``) go into the function being parsed, as from a macro."""
    for i, row in enumerate(rows):
        store(i, row)


def nibble_lookup(table, codes):
    """float32x16: ``table`` (float32x16) at each lane's index ``codes & 15`` (``vpermps`` reads
    the low 4 bits of an int32x16 index, so the codes need no mask; AVX-512F)."""
    return T.call_llvm_pure_intrin("float32x16", "llvm.x86.avx512.permvar.sf.512", table, codes)


def high_nibbles(codes):
    """int32x16: code bytes widened to dwords, shifted right by 4 in dword lanes (``vpsrld``): the
    high nibbles as :func:`nibble_lookup` indices. A plain shift of the widened bytes let LLVM
    shift the bytes and widen them a second time (4-12 % slower q4 GEMVs)."""
    return T.call_llvm_pure_intrin("int32x16", "llvm.x86.avx512.psrli.d.512", codes, T.int32(4))


def dequantized(codes, scale, offset: int, dtype: str):
    """float32x16: ``(code - offset) * scale`` of 16 integer codes, rounded to ``dtype`` (the
    scale's) as the exact path computes it in that dtype, but in fp32 lanes: the difference is an
    integer (exact), its product with the scale has at most 8 + 11 significant bits (exact in
    fp32), so one rounding to ``dtype`` gives the dtype's own product. Without AVX512-FP16 (AMD Zen
    4) LLVM ran each fp16 operation through fp32 and back: q8 decode GEMVs took 2.6x as long."""
    diff = T.Cast("float32x16", T.Cast("int32x16", codes) - T.Broadcast(T.int32(offset), 16))
    return T.Cast("float32x16", T.Cast(f"{dtype}x16", diff * T.Broadcast(T.Cast("float32", scale), 16)))
