"""Decode GEMV on group-quantized weights, exact: ``y = x @ W^T`` for a few rows of x, W
q4f16_1 / q8f16_1 (:mod:`mpt_relax.quantization.group`), the math of the fused dequantize +
``NT_matmul`` it replaces: each weight ``(code - offset) * scale`` in the scale's dtype (fp16),
then fp32 products and sums; only the order of the sums differs.

- one weight row per parallel task, read front to back, prefetched ``PREFETCH_BYTES`` ahead
  (as :mod:`.float_gemv`);
- per group of 32 weights of a row, 16 lanes at a time: q4 looks its codes up in a table of the
  group's 16 possible weights (fp32, one ``vpermps`` per 16 codes: the low nibbles of the
  group's 16 bytes are k = 0, 2, ..., 30, the high ones k = 1, 3, ..., 31, so x is permuted once
  per call into that order); q8 converts its 16 code bytes and dequantizes in 16-lane fp16
  arithmetic;
- two groups per step into four accumulator vectors (independent FMA chains), summed by a
  halving tree; no vector is given a name (TVMScript would store each to a buffer: named
  tables and codes halved the q4 kernel's speed);
- the scales of ``SCALES`` groups converted to fp32 in one vector op into a per-row scratch
  row, from which each group's table broadcasts its own (one fp16 load and conversion per
  group cost the q4 kernel 17-20 % on a Zen 4 core: 12.0 -> 14.4 G weights/s from cache).

Needs AVX-512F (``vpermps``); :mod:`mpt_relax.compile.decode_gemv` puts it in the decode step of
llvm targets that have it.
"""

from __future__ import annotations

from tvm import tirx
from tvm.script import tirx as T

from mpt_relax.kernels.lanes import bound, dequantized, halving_sum, high_nibbles, nibble_lookup

from .float_gemv import PREFETCH_BYTES
from .int8_gemv import GROUP, code_offset, group_position, prefetch_l1

REQUIRED_FEATURES = ["avx512f"]
CHAINS = 4  # 16-lane fp32 accumulators per row: FMA chains that run side by side
SCALES = 8  # groups whose scales are converted at once (fewer where the group count needs)


def supported(out_features: int, in_features: int) -> bool:
    """Whether the kernel takes a [out, in] weight: in a multiple of two groups (64)."""
    return in_features % (2 * GROUP) == 0 and out_features > 0


def group_gemv(out_features: int, in_features: int, bits: int, x_dtype: str, out_dtype: str,
               scale_dtype: str = "float16") -> tirx.PrimFunc:
    """PrimFunc (q_weight uint32 [N, K*bits/32], q_scale ``scale_dtype`` [N, K/32], x [M, K]
    ``x_dtype``) -> y [M, N] ``out_dtype`` (the argument order of the fused kernel it replaces)."""
    N, K = out_features, in_features
    G, words, code_bytes, off = K // GROUP, K * bits // 32, K * bits // 8, code_offset(bits)
    group_bytes = GROUP * bits // 8
    ahead = max(1, PREFETCH_BYTES // code_bytes)  # rows between a load and its prefetch
    width = next(w for w in (SCALES, 4, 2) if G % w == 0)  # scales per conversion (G is even)

    def group(gw, g2, pair):
        """The group of step (g2, pair) of scale block gw (an expression: a named index, a TIR Let,
        cost the q4 kernel 12 %)."""
        return gw * width + g2 * 2 + pair

    def weights(codes, scale):
        """16 codes (integer lanes) -> their fp32 weights, dequantized in the scale's dtype."""
        return dequantized(codes, scale, off, scale_dtype)

    def nibble_products(qb, scale, xf, n, m, g):
        """float32x32: group ``g``'s weights (fp32 ``scale``) times x, the low nibbles' 16 (k even)
        then the high ones'; the group's 16 code bytes are widened to dwords once."""

        def products(codes):
            return T.Shuffle([nibble_lookup(weights(T.ramp(0, 1, 16), scale), index) * xf[m, T.ramp(g * 32 + h * 16, 1, 16)]
                              for h, index in enumerate((codes, high_nibbles(codes)))], list(range(32)))

        return bound(T.Cast("int32x16", qb[n, T.ramp(g * 16, 1, 16)]), products)

    @T.prim_func(private=True, s_tir=True)
    def func(qw_h: T.handle, qs_h: T.handle, x_h: T.handle, y_h: T.handle):
        T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True, "op_pattern": 8})  # kOpaque: never fused
        M = T.int64()
        qw = T.match_buffer(qw_h, (N, words), "uint32")
        qs = T.match_buffer(qs_h, (N, G), scale_dtype)
        x = T.match_buffer(x_h, (M, K), x_dtype)
        y = T.match_buffer(y_h, (M, N), out_dtype)
        with T.sblock("root"):
            qb = T.decl_buffer((N, code_bytes), "uint8", data=qw.data)  # the codes as bytes, little-endian
            xf = T.alloc_buffer((M, K), "float32")  # x in fp32, in the kernel's order
            for m, g, i in T.grid(M, G, GROUP):
                xf[m, g * GROUP + group_position(i, bits)] = T.Cast("float32", x[m, g * GROUP + i])
            for n in T.parallel(N):
                with T.sblock("row"):
                    acc = T.sblock_alloc_buffer((CHAINS * 16,), "float32")  # a row's accumulators (in registers)
                    sv = T.sblock_alloc_buffer((width,), "float32")  # a row's fp32 scales of ``width`` groups
                    for m in range(M):
                        acc[T.ramp(0, 1, CHAINS * 16)] = T.Broadcast(T.float32(0), CHAINS * 16)
                        for gw in range(G // width):
                            sv[T.ramp(0, 1, width)] = T.Cast(f"float32x{width}", qs[n, T.ramp(gw * width, 1, width)])
                            for g2, pair in T.grid(width // 2, 2):  # two groups per step: four independent FMA chains
                                prefetch_l1(qb, T.min(n + ahead, N - 1), group(gw, g2, pair) * group_bytes)
                                if bits == 4:  # (no named vectors: each would be a store to a buffer)
                                    acc[T.ramp(pair * 32, 1, 32)] = acc[T.ramp(pair * 32, 1, 32)] + nibble_products(
                                        qb, sv[g2 * 2 + pair], xf, n, m, group(gw, g2, pair))
                                else:
                                    for h in T.unroll(2):
                                        acc[T.ramp(pair * 32 + h * 16, 1, 16)] = acc[T.ramp(pair * 32 + h * 16, 1, 16)] + weights(
                                            qb[n, T.ramp(group(gw, g2, pair) * 32 + h * 16, 1, 16)], sv[g2 * 2 + pair]) * xf[
                                                m, T.ramp(group(gw, g2, pair) * 32 + h * 16, 1, 16)]
                        y[m, n] = T.Cast(out_dtype, halving_sum(acc[T.ramp(0, 1, CHAINS * 16)], CHAINS * 16)[0])

    return func
