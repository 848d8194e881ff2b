"""Decode GEMVs on GGUF Q4_K and Q5_K weights (most of a llama.cpp Q4_K_M / Q5_K_M file):
``y = x @ W^T`` for a few rows of x, W kept in the file's blocks
(:mod:`mpt_relax.quantization.gguf_blocks`).

A 256-weight Q4_K block is 144 bytes: fp16 ``d`` and ``dmin``, 12 bytes of 6-bit (scale, min)
pairs for its eight sub-blocks of 32, then 128 bytes of nibbles; 32 bytes ``c`` (0..3) hold
weights 64c .. 64c + 31 in their low nibbles and the next 32 in their high ones, so one
64-lane vector of codes is those 32 bytes' low nibbles followed by their high ones. A Q5_K
block (176 bytes) puts 32 bytes of fifth bits between the scales and the nibbles: bit ``s`` of
byte ``i`` is the high bit of weight ``32 s + i``. A weight is ``(d * scale) * q - dmin * min``
in fp32 (q: 0..15, or 0..31 with the fifth bit).

- :func:`q4k_gemv` / :func:`q5k_gemv`, exact: each weight in fp32, fp32 products and sums; 16
  weights per FMA, four chains. Q4_K looks each nibble up in its sub-block's table of 16 such
  weights (one ``vpermps`` per 16 codes; 1.35-1.4x faster than computing every weight); Q5_K's
  32 possible codes would take a table as long as the sub-block, so each of its weights is
  computed. The fused dequantize (and prefill) rounds each weight to the model dtype first; not
  rounding (at most half an fp16 step apart) took one Zen 4 core from 9.8 to 12.3 (Q4_K) and
  from 6.7 to 10.0 (Q5_K) G weights/s, 3072 x 768 from DRAM.
- :func:`q4k_int8_gemv` / :func:`q5k_int8_gemv`, on x quantized per group of 32 (a sub-block)
  as :func:`mpt_relax.kernels.cpu.int8_gemv.quantize_activation` does for int8 weights::

      y[m, n] = sum_sub xs[m, g] * (d * scale * sum_k q[k] * xq[m, k] - dmin * min * sum_k xq[m, k])

  the inner sums exact integers. ``avx512vnni``: one 64-byte load of nibbles (chunks 2p and
  2p + 1) feeds two ``vpdpbusd``: its low nibbles are sub-blocks 4p and 4p + 2, its high ones
  4p + 1 and 4p + 3 (one mask, one shift), each in 8 of the 16 int32 lanes. x is re-laid once
  per call to match (per 128 inputs, groups 0, 2, 1, 3). Once per block, one 16-lane vector
  holds the eight ``d * scale * xs`` and the eight ``dmin * min * xs * sum xq`` (each group's
  ``xs`` and ``xs * sum xq`` laid out per block once per call); the mins' half is summed into
  its own accumulator, and each dot product takes its two factors with one ``vpermps``. One
  Zen 4 core, from cache: 14.7 -> 21.7 GB/s (Q4_K, 3072x768) against one ``vpdpbusd`` per
  32-byte chunk (a broadcast, shift and mask each) and two final lane sums.
  ``generic``: plain integer loops, the same numbers on any CPU.
"""

from __future__ import annotations

import dataclasses

from tvm import tirx
from tvm.script import tirx as T

from mpt_relax.kernels.lanes import bound, halving_sum, high_nibbles, nibble_lookup

from .float_gemv import PREFETCH_BYTES
from .int8_gemv import GROUP, block_kernel, prefetch, prefetch_l1

BLOCK = 256
CHAINS = 4  # 16-lane fp32 accumulators per row (exact kernel)
_DOT = "llvm.x86.avx512.vpdpbusd.512"


@dataclasses.dataclass(frozen=True)
class Layout:
    """Where a block type keeps its parts: ``block_bytes`` per 256 weights, the 128 nibble bytes
    at ``nibbles``, the 32 bytes of fifth bits at ``fifth_bits`` (None: 4-bit codes)."""

    name: str
    block_bytes: int
    nibbles: int
    fifth_bits: int | None

    @property
    def cache_lines(self) -> int:
        """Lines a block's bytes are prefetched as."""
        return -(-self.block_bytes // 64)


Q4_K = Layout("Q4_K", 144, 16, None)
Q5_K = Layout("Q5_K", 176, 48, 16)


def supported(out_features: int, in_features: int) -> bool:
    """Whether the kernels take a [out, in] weight: whole blocks."""
    return in_features % BLOCK == 0 and out_features > 0


def k_scale_min(raw, row, base, sub) -> tuple[tirx.PrimExpr, tirx.PrimExpr]:
    """The 6-bit (scale, min) of sub-block ``sub`` (0..7) of a Q4_K / Q5_K block at byte ``base``
    of row ``row``, as float32 (``raw``: a TE tensor or a TIR buffer of the blocks' bytes; also
    :mod:`mpt_relax.quantization.gguf_blocks`' formula)."""
    k = sub % 4
    low_s, low_m, mixed = (raw[row, base + start + k].astype("uint32") for start in (4, 8, 12))
    scale = tirx.Select(sub < 4, low_s & 63, (mixed & 0xF) | ((low_s >> 2) & 0x30))
    minimum = tirx.Select(sub < 4, low_m & 63, (mixed >> 4) | ((low_m >> 2) & 0x30))
    return scale.astype("float32"), minimum.astype("float32")


def _half(layout, d16, n, b, offset: int):
    """The fp16 at byte ``offset`` (0: d, 2: dmin) of block ``b``, as fp32."""
    return T.Cast("float32", T.reinterpret("float16", d16[n, b * (layout.block_bytes // 2) + offset // 2]))


def _d_dmin(layout, d16, n, b):
    """fp32 [16]: block ``b``'s ``d`` in lanes 0-7, its ``dmin`` in 8-15."""
    pair = d16[n, T.ramp(b * (layout.block_bytes // 2), 1, 2)]
    return T.Cast("float32x16", T.reinterpret(T.Shuffle([pair] * 8, [0] * 8 + [1] * 8), dtype="float16x16"))


def _scales_mins(layout, raw, n, b):
    """int32x16: the block's eight 6-bit scales (lanes 0-7), then its eight mins (8-15). Bytes
    4-15 of a block are the low scales ``ls``, the low mins ``lm`` and the ``mixed`` highs (4
    each); sub-blocks 0-3 keep 6 bits of ``ls`` / ``lm``, 4-7 a nibble of ``mixed`` plus the
    top 2 bits of ``ls`` / ``lm``: a few 16-lane ops with per-lane shifts and masks."""
    def runs(*values):
        """A constant int32x16 of four runs of 4 lanes."""
        return T.Shuffle([T.Broadcast(T.int32(v), 4) for v in values], list(range(16)))

    def use(v):  # v: bytes 4..19 as int32 lanes (the last 4 unused)
        lows = T.Shuffle([v], [0, 1, 2, 3, 0, 1, 2, 3, 4, 5, 6, 7, 4, 5, 6, 7])  # ls, ls, lm, lm
        mixed = T.Shuffle([v], [8, 9, 10, 11] * 4)
        return ((T.shift_right(mixed, runs(0, 0, 4, 4)) & runs(0, 15, 0, 15))
                | (T.shift_right(lows, runs(0, 2, 0, 2)) & runs(63, 48, 63, 48)))

    return bound(T.Cast("int32x16", raw[n, T.ramp(b * layout.block_bytes + 4, 1, 16)]), use)


def _shifted(bytes64, right, left):
    """``bytes64`` (uint8 [64]) as eight 64-bit lanes, shifted right by ``right[0]`` then left by
    ``left[0]`` in the lower half and by ``right[1]`` / ``left[1]`` in the upper (constants
    once unrolled, so a zero shift folds away); bits that cross into a neighbouring byte are
    masked off by the caller."""
    def counts(pair):
        return T.Shuffle([T.Broadcast(T.Cast("uint64", pair[0]), 4), T.Broadcast(T.Cast("uint64", pair[1]), 4)],
                         list(range(8)))

    words = T.reinterpret(bytes64, dtype="uint64x8")
    return T.reinterpret(T.shift_left(T.shift_right(words, counts(right)), counts(left)), dtype="uint8x64")


def _codes(layout, raw, n, b, c):
    """uint8 [64]: the codes of weights 64c .. 64c + 63 of block ``b`` (``c`` an unrolled loop
    variable): the 32 nibble bytes in both halves (one broadcast load), low nibbles then high,
    plus Q5_K's fifth bits."""
    base = b * layout.block_bytes
    qs = raw[n, T.ramp(base + layout.nibbles + c * 32, 1, 32)]
    codes = _shifted(T.Shuffle([qs, qs], list(range(32)) * 2), (0, 4), (0, 0)) & T.Broadcast(T.uint8(15), 64)
    if layout.fifth_bits is None:
        return codes
    # weight 64c + i takes bit s = 2c of byte i, weight 64c + 32 + i bit s = 2c + 1
    return codes | _fifth_bits(layout, raw, n, b, 2 * c, 2 * c + 1)


def _fifth_bits(layout, raw, n, b, low_bit, high_bit):
    """uint8 [64]: Q5_K block ``b``'s 32 bytes of fifth bits twice, bit ``low_bit`` of each byte
    moved to bit 4 in the lower 32 lanes and bit ``high_bit`` in the upper, all else zero."""
    qh = raw[n, T.ramp(b * layout.block_bytes + layout.fifth_bits, 1, 32)]
    fifth = _shifted(T.Shuffle([qh, qh], list(range(32)) * 2), (T.max(low_bit - 4, 0), T.max(high_bit - 4, 0)),
                     (T.max(4 - low_bit, 0), T.max(4 - high_bit, 0)))
    return fifth & T.Broadcast(T.uint8(16), 64)


def _nibble_half(layout, raw, n, b, p, high):
    """uint8 [64]: the codes of sub-blocks 4p and 4p + 2 of block ``b`` (``high`` = 1: 4p + 1 and
    4p + 3; ``p``, ``high`` unrolled loop variables), 32 each: the low (high) nibbles of one
    64-byte load of chunks 2p and 2p + 1, plus Q5_K's fifth bits."""
    qs = raw[n, T.ramp(b * layout.block_bytes + layout.nibbles + p * 64, 1, 64)]
    codes = T.shift_right(qs, T.Broadcast(T.Cast("uint8", high * 4), 64)) & T.Broadcast(T.uint8(15), 64)
    if layout.fifth_bits is None:
        return codes
    return codes | _fifth_bits(layout, raw, n, b, 4 * p + high, 4 * p + 2 + high)


def _table_products(layout, raw, sm, xf, n, m, b, c):
    """float32x64: weights 64c .. 64c + 63 of Q4_K block ``b`` times x, each weight looked up by
    its nibble (``vpermps`` reads an index's low 4 bits) in the table of its sub-block's 16
    possible weights, ``(d * scale) * q - dmin * min`` in fp32 (``sm``: the
    block's factors). The 32 code bytes are widened to dwords once; the high nibbles (the odd
    sub-block) are those dwords shifted right by 4."""
    base = b * layout.block_bytes + layout.nibbles + c * 32

    def table(sub):
        return T.Broadcast(sm[n, sub], 16) * T.Cast("float32x16", T.ramp(0, 1, 16)) - T.Broadcast(sm[n, 8 + sub], 16)

    def products(lo, hi, even, odd):
        parts = (nibble_lookup(even, lo), nibble_lookup(even, hi), nibble_lookup(odd, high_nibbles(lo)),
                 nibble_lookup(odd, high_nibbles(hi)))
        return T.Shuffle([part * xf[m, T.ramp(b * BLOCK + c * 64 + quarter * 16, 1, 16)] for quarter, part in enumerate(parts)],
                         list(range(64)))

    return bound(T.Cast("int32x16", raw[n, T.ramp(base, 1, 16)]), lambda lo: bound(
        T.Cast("int32x16", raw[n, T.ramp(base + 16, 1, 16)]), lambda hi: bound(
            table(2 * c), lambda even: bound(table(2 * c + 1), lambda odd: products(lo, hi, even, odd)))))


def q4k_gemv(out_features: int, in_features: int, x_dtype: str, out_dtype: str) -> tirx.PrimFunc:
    """PrimFunc (blocks uint8 [N, K / 256 * 144], x [M, K] ``x_dtype``) -> y [M, N] ``out_dtype``
    (the argument order of the fused kernel it replaces), exact."""
    return _exact(Q4_K, out_features, in_features, x_dtype, out_dtype)


def q5k_gemv(out_features: int, in_features: int, x_dtype: str, out_dtype: str) -> tirx.PrimFunc:
    """As :func:`q4k_gemv` on Q5_K blocks (uint8 [N, K / 256 * 176])."""
    return _exact(Q5_K, out_features, in_features, x_dtype, out_dtype)


def _exact(layout, N, K, x_dtype, out_dtype):
    B, row_bytes = K // BLOCK, K // BLOCK * layout.block_bytes
    ahead = max(1, PREFETCH_BYTES // row_bytes)

    @T.prim_func(private=True, s_tir=True)
    def func(raw_h: T.handle, x_h: T.handle, y_h: T.handle):
        T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True, "op_pattern": 8})  # kOpaque: never fused
        M = T.int64()
        raw = T.match_buffer(raw_h, (N, row_bytes), "uint8")
        x = T.match_buffer(x_h, (M, K), x_dtype)
        y = T.match_buffer(y_h, (M, N), out_dtype)
        with T.sblock("root"):
            d16 = T.decl_buffer((N, row_bytes // 2), "uint16", data=raw.data)
            xf = T.alloc_buffer((M, K), "float32")
            acc = T.alloc_buffer((N, CHAINS * 16), "float32")
            cb = T.alloc_buffer((N, 64) if layout.fifth_bits is not None else (1, 1), "uint8")  # one vector of codes (Q5_K)
            sm = T.alloc_buffer((N, 16), "float32")  # the block's d * scale (0..7), dmin * min (8..15)
            for m, k in T.grid(M, K):
                xf[m, k] = T.Cast("float32", x[m, k])
            for n in T.parallel(N):
                for m in range(M):
                    acc[n, T.ramp(0, 1, CHAINS * 16)] = T.Broadcast(T.float32(0), CHAINS * 16)
                    for b in range(B):
                        for line in T.unroll(layout.cache_lines):
                            prefetch_l1(raw, T.min(n + ahead, N - 1), b * layout.block_bytes + line * 64)
                        sm[n, T.ramp(0, 1, 16)] = T.Cast("float32x16", _scales_mins(layout, raw, n, b)) * _d_dmin(layout, d16, n, b)
                        for c in T.unroll(4):
                            if layout.fifth_bits is None:  # Q4_K: through its sub-blocks' tables
                                acc[n, T.ramp(0, 1, 64)] = acc[n, T.ramp(0, 1, 64)] + _table_products(
                                    layout, raw, sm, xf, n, m, b, c)
                            else:
                                cb[n, T.ramp(0, 1, 64)] = _codes(layout, raw, n, b, c)
                                for quarter in T.unroll(4):  # sub-block 2c + quarter // 2
                                    acc[n, T.ramp(quarter * 16, 1, 16)] = acc[n, T.ramp(quarter * 16, 1, 16)] + (
                                        T.Broadcast(sm[n, c * 2 + quarter // 2], 16) * T.Cast("float32x16", cb[n, T.ramp(quarter * 16, 1, 16)])
                                        - T.Broadcast(sm[n, 8 + c * 2 + quarter // 2], 16)) * xf[m, T.ramp(b * BLOCK + c * 64 + quarter * 16, 1, 16)]
                    y[m, n] = T.Cast(out_dtype, halving_sum(acc[n, T.ramp(0, 1, CHAINS * 16)], CHAINS * 16)[0])

    return func


def q4k_int8_gemv(out_features: int, in_features: int, out_dtype: str, isa: str = "generic",
                  distance: int = PREFETCH_BYTES) -> tirx.PrimFunc:
    """PrimFunc (xq int8 [M, K], xs f32 [M, K/32], blocks uint8 [N, K / 256 * 144]) -> y [M, N]
    ``out_dtype``; see the module docstring. ``isa``: ``avx512vnni`` or ``generic``; ``distance``:
    how many bytes ahead the VNNI kernel prefetches (:func:`.float_gemv.prefetch_bytes`)."""
    return _int8(Q4_K, out_features, in_features, out_dtype, isa, distance)


def q5k_int8_gemv(out_features: int, in_features: int, out_dtype: str, isa: str = "generic",
                  distance: int = PREFETCH_BYTES) -> tirx.PrimFunc:
    """As :func:`q4k_int8_gemv` on Q5_K blocks (uint8 [N, K / 256 * 176])."""
    return _int8(Q5_K, out_features, in_features, out_dtype, isa, distance)


def _int8(layout, out_features, in_features, out_dtype, isa, distance):
    builders = {"avx512vnni": lambda *shape: _vnni(layout, *shape, distance), "generic": lambda *shape: _generic(layout, *shape)}
    return block_kernel(layout.name, builders, out_features, in_features, out_dtype, isa)


def _generic(layout, N, K, out_dtype):
    B, G, row_bytes = K // BLOCK, K // GROUP, K // BLOCK * layout.block_bytes

    def code(raw, n, k):
        base, j = k // BLOCK * layout.block_bytes, k % BLOCK
        q = T.shift_right(T.Cast("int32", raw[n, base + layout.nibbles + j // 64 * 32 + j % 32]), j // 32 % 2 * 4) & 15
        if layout.fifth_bits is None:
            return q
        return q | T.shift_left(T.shift_right(T.Cast("int32", raw[n, base + layout.fifth_bits + j % 32]), j // 32) & 1, 4)

    @T.prim_func(private=True, s_tir=True)
    def func(xq_h: T.handle, xs_h: T.handle, raw_h: T.handle, y_h: T.handle):
        T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True, "op_pattern": 8})  # kOpaque: never fused
        M = T.int64()
        xq = T.match_buffer(xq_h, (M, K), "int8")
        xs = T.match_buffer(xs_h, (M, G), "float32")
        raw = T.match_buffer(raw_h, (N, row_bytes), "uint8")
        y = T.match_buffer(y_h, (M, N), out_dtype)
        with T.sblock("root"):
            d16 = T.decl_buffer((N, row_bytes // 2), "uint16", data=raw.data)
            dot = T.alloc_buffer((N, 2), "int32")  # sum q * xq, sum xq of one sub-block
            acc = T.alloc_buffer((N,), "float32")
            for n in T.parallel(N):
                for m in range(M):
                    acc[n] = T.float32(0)
                    for b, sub in T.grid(B, 8):
                        dot[n, 0] = 0
                        dot[n, 1] = 0
                        for i in range(GROUP):
                            k = b * BLOCK + sub * GROUP + i
                            dot[n, 0] = dot[n, 0] + code(raw, n, k) * T.Cast("int32", xq[m, k])
                            dot[n, 1] = dot[n, 1] + T.Cast("int32", xq[m, k])
                        acc[n] = acc[n] + xs[m, b * 8 + sub] * (
                            _half(layout, d16, n, b, 0) * k_scale_min(raw, n, b * layout.block_bytes, sub)[0] * T.Cast(
                                "float32", dot[n, 0])
                            - _half(layout, d16, n, b, 2) * k_scale_min(raw, n, b * layout.block_bytes, sub)[1] * T.Cast(
                                "float32", dot[n, 1]))
                    y[m, n] = T.Cast(out_dtype, acc[n])

    return func


def _vnni(layout, N, K, out_dtype, distance):
    B, G, row_bytes = K // BLOCK, K // GROUP, K // BLOCK * layout.block_bytes
    ahead = max(1, distance // row_bytes)

    @T.prim_func(private=True, s_tir=True)
    def func(xq_h: T.handle, xs_h: T.handle, raw_h: T.handle, y_h: T.handle):
        T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True, "op_pattern": 8})  # kOpaque: never fused
        M = T.int64()
        xq = T.match_buffer(xq_h, (M, K), "int8")
        xs = T.match_buffer(xs_h, (M, G), "float32")
        raw = T.match_buffer(raw_h, (N, row_bytes), "uint8")
        y = T.match_buffer(y_h, (M, N), out_dtype)
        with T.sblock("root"):
            d16 = T.decl_buffer((N, row_bytes // 2), "uint16", data=raw.data)
            # per block of x: its 8 groups' xs (lanes 0-7), then xs * the group's sum of xq (8-15)
            block_xs = T.alloc_buffer((M, B * 16), "float32")
            xr = T.alloc_buffer((M, K), "int8")  # x's groups per 128 inputs in the order 0, 2, 1, 3
            for m, h, q in T.grid(M, K // 128, 4):
                xr[m, T.ramp(h * 128 + q * 32, 1, 32)] = xq[m, T.ramp(h * 128 + (q % 2 * 2 + q // 2) * 32, 1, 32)]
            for m, g in T.grid(M, G):
                block_xs[m, g // 8 * 16 + g % 8] = xs[m, g]
                block_xs[m, g // 8 * 16 + 8 + g % 8] = xs[m, g] * T.Cast("float32", halving_sum(
                    T.Cast(f"int32x{GROUP}", xq[m, T.ramp(g * GROUP, 1, GROUP)]), GROUP)[0])
            for n in T.parallel(N):
                with T.sblock("row"):
                    acc = T.sblock_alloc_buffer((32,), "float32")  # two 16-lane chains
                    low = T.sblock_alloc_buffer((16,), "float32")  # lanes 8-15: the mins' term per sub-block
                    fac = T.sblock_alloc_buffer((16,), "float32")  # the block's d * scale * xs (0-7), dmin * min * xs * sum xq (8-15)
                    for m in range(M):
                        acc[T.ramp(0, 1, 32)] = T.Broadcast(T.float32(0), 32)
                        low[T.ramp(0, 1, 16)] = T.Broadcast(T.float32(0), 16)
                        for b in range(B):
                            for line in T.unroll(layout.cache_lines):
                                prefetch(raw, T.min(n + ahead, N - 1), b * layout.block_bytes + line * 64)
                            fac[T.ramp(0, 1, 16)] = T.Cast("float32x16", _scales_mins(layout, raw, n, b)) * _d_dmin(
                                layout, d16, n, b) * block_xs[m, T.ramp(b * 16, 1, 16)]
                            low[T.ramp(0, 1, 16)] = low[T.ramp(0, 1, 16)] + fac[T.ramp(0, 1, 16)]
                            for p in T.unroll(2):
                                for high in T.unroll(2):  # lanes 0-7: sub-block 4p + high, 8-15: 4p + 2 + high
                                    acc[T.ramp(high * 16, 1, 16)] = acc[T.ramp(high * 16, 1, 16)] + T.Cast(
                                        "float32x16", T.call_llvm_pure_intrin(
                                            T.llvm_lookup_intrinsic_id(_DOT), T.Broadcast(T.int32(0), 16),
                                            T.reinterpret(_nibble_half(layout, raw, n, b, p, high), dtype="int8x64"),
                                            T.reinterpret(xr[m, T.ramp(b * BLOCK + p * 128 + high * 64, 1, 64)], dtype="int8x64"), dtype="int32x16")
                                    ) * T.Shuffle([fac[T.ramp(0, 1, 16)]], [4 * p + high] * 8 + [4 * p + 2 + high] * 8)
                        y[m, n] = T.Cast(out_dtype, halving_sum(acc[T.ramp(0, 1, 16)] + acc[T.ramp(16, 1, 16)] - T.Shuffle(
                            [low[T.ramp(0, 1, 16)], T.Broadcast(T.float32(0), 16)], [16] * 8 + list(range(8, 16))), 16)[0])

    return func
