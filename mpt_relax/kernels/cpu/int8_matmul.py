"""Prefill GEMM on int8 activations: ``y = x @ W^T`` for many rows of x, W group-quantized
(q4f16_1, q8f16_1), x quantized per group of 32 by :func:`.int8_gemv.quantize_activation`.

The math is :mod:`.int8_gemv`'s (same inputs, same numbers up to the order of the fp32 sums);
the layout is a GEMM's. ``vpdpbusd`` lanes run over output columns instead of over k:

1. per block of ``BLOCK`` = 32 output columns (blocks in parallel) the codes are repacked once
   into ``wp[g, quad, column]`` uint32, each word 4 code bytes of one column in xq's order
   (q8: a stored word as is; q4: the low nibbles of a word are k = 0, 2, 4, 6 of it, the high
   ones k = 1, 3, 5, 7: xq's evens-then-odds order makes each such quad 4 consecutive bytes
   of xq), and the scales into ``ws[g, column]`` fp32;
2. for every ``MR`` rows of x: per group, 8 quads x MR rows x 2 vectors of ``vpdpbusd`` (the
   4 bytes of x broadcast to all 16 lanes, 64 products each) into int32 accumulators, then
   per row and vector ``acc += ws * (float(dot) * xs - xc)``; MR x 2 int32 and fp32 vectors
   stay in registers.

No weight is ever converted to float: the repack is masks and a transpose, and each weight
byte feeds MR rows from L1. :func:`supported` shapes only (N a multiple of 32); the model
falls back to the GEMV kernels otherwise, as on targets without AVX512-VNNI.
"""

from __future__ import annotations

from tvm import tirx
from tvm.script import tirx as T

from .int8_gemv import GROUP

BLOCK = 32  # output columns per parallel task: two vectors of 16 int32 lanes
MR = 6  # rows of x per register tile: 2 * MR int32 + 2 * MR fp32 accumulators
QUADS = GROUP // 4  # vpdpbusd steps per group (4 bytes of k per lane)
_DOT = "llvm.x86.avx512.vpdpbusd.512"


def supported(out_features: int, in_features: int) -> bool:
    """Whether the kernel takes a [out, in] weight: out a multiple of 32, in of 32."""
    return out_features % BLOCK == 0 and in_features % GROUP == 0


def int8_matmul(out_features: int, in_features: int, bits: int, out_dtype: str,
                scale_dtype: str = "float16") -> tirx.PrimFunc:
    """PrimFunc (xq int8 [M, K], xs, xc f32 [M, K/32], q_weight uint32 [N, K*bits/32], q_scale
    ``scale_dtype`` [N, K/32]) -> y [M, N] ``out_dtype``, AVX512-VNNI; see the module docstring."""
    N, K = out_features, in_features
    G, words = K // GROUP, K * bits // 32
    wpg = GROUP * bits // 32  # stored words per group: 4 (q4) or 8 (q8)

    mask = T.uint32(0x0F0F0F0F if bits == 4 else 0xFFFFFFFF)

    def packed(qw, n, g, quad):
        """The 4 code bytes of row n that xq's quad ``quad`` of group g multiplies (q4: quads 0-3
        are the words' low nibbles, 4-7 their high ones)."""
        return (qw[n, g * wpg + quad % wpg] >> T.Cast("uint32", quad // wpg * 4)) & mask

    def dot(acc, codes, xb):
        return T.call_llvm_pure_intrin(T.llvm_lookup_intrinsic_id(_DOT), acc, T.reinterpret(codes, dtype="int8x64"),
                                       T.reinterpret(xb, dtype="int8x64"), dtype="int32x16")

    @T.prim_func(private=True, s_tir=True)
    def func(xq_h: T.handle, xs_h: T.handle, xc_h: T.handle, qw_h: T.handle, qs_h: T.handle, y_h: T.handle):
        T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True, "op_pattern": 8})  # kOpaque: never fused
        M = T.int64()
        xq = T.match_buffer(xq_h, (M, K), "int8")
        xs = T.match_buffer(xs_h, (M, G), "float32")
        xc = T.match_buffer(xc_h, (M, G), "float32")
        qw = T.match_buffer(qw_h, (N, words), "uint32")
        qs = T.match_buffer(qs_h, (N, G), scale_dtype)
        y = T.match_buffer(y_h, (M, N), out_dtype)
        with T.sblock("root"):
            x4 = T.decl_buffer((M, K // 4), "int32", data=xq.data)  # xq as words: one quad per load
            for nb in T.parallel(N // BLOCK):
                wp = T.alloc_buffer((G, QUADS, BLOCK), "uint32")
                ws = T.alloc_buffer((G, BLOCK), "float32")
                for j, g in T.grid(BLOCK, G):
                    ws[g, j] = T.Cast("float32", qs[nb * BLOCK + j, g])
                    for quad in T.unroll(QUADS):
                        wp[g, quad, j] = packed(qw, nb * BLOCK + j, g, quad)
                for mb in range((M + MR - 1) // MR):
                    dots = T.alloc_buffer((MR, BLOCK), "int32", scope="local")
                    acc = T.alloc_buffer((MR, BLOCK), "float32", scope="local")
                    for r in T.unroll(MR):
                        acc[r, T.ramp(0, 1, 16)] = T.broadcast(T.float32(0), 16)
                        acc[r, T.ramp(16, 1, 16)] = T.broadcast(T.float32(0), 16)
                    for g in range(G):
                        for r in T.unroll(MR):
                            dots[r, T.ramp(0, 1, 16)] = T.broadcast(T.int32(0), 16)
                            dots[r, T.ramp(16, 1, 16)] = T.broadcast(T.int32(0), 16)
                        for quad in T.unroll(QUADS):
                            for r in T.unroll(MR):
                                for v in T.unroll(2):
                                    dots[r, T.ramp(v * 16, 1, 16)] = dot(
                                        dots[r, T.ramp(v * 16, 1, 16)], wp[g, quad, T.ramp(v * 16, 1, 16)],
                                        T.broadcast(x4[T.min(mb * MR + r, M - 1), g * QUADS + quad], 16))
                        for r in T.unroll(MR):
                            for v in T.unroll(2):
                                acc[r, T.ramp(v * 16, 1, 16)] = acc[r, T.ramp(v * 16, 1, 16)] + ws[g, T.ramp(v * 16, 1, 16)] * (
                                    T.Cast("float32x16", dots[r, T.ramp(v * 16, 1, 16)])
                                    * T.broadcast(xs[T.min(mb * MR + r, M - 1), g], 16)
                                    - T.broadcast(xc[T.min(mb * MR + r, M - 1), g], 16))
                    for r in T.unroll(MR):
                        if mb * MR + r < M:
                            for j in T.vectorized(BLOCK):
                                y[mb * MR + r, nb * BLOCK + j] = T.Cast(out_dtype, acc[r, j])

    return func
