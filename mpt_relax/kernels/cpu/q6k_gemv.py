"""Decode GEMV on GGUF Q6_K weights, exact: ``y = x @ W^T`` for a few rows of x, W kept in
the file's Q6_K blocks (:mod:`mpt_relax.quantization.gguf_blocks`), the math of the fused
dequantize + ``NT_matmul`` it replaces: each weight ``float16((d * scale) * (q - 32))`` with
float32 products, then fp32 products and sums; only the order of the sums differs.

llama.cpp's Q4_0 and Q4_K_M files keep the tied embedding, MPT's LM head, in Q6_K: the largest
matmul of a decode step. Per 256-weight block (210 bytes: 128 of low nibbles, 64 of 2-bit
highs, 16 int8 scales, the fp16 ``d``), 16 weights at a time: the 16 low and 16 high parts
are one byte load each (a sub-block's 16 elements sit in 16 consecutive bytes, the shifts are
constants), then the scale, the fp16 rounding and an FMA into one of four accumulator chains.
One weight row per parallel task, read front to back, prefetched ``PREFETCH_BYTES`` ahead.
"""

from __future__ import annotations

from tvm import tirx
from tvm.script import tirx as T

from mpt_relax.kernels.lanes import halving_sum

from .float_gemv import PREFETCH_BYTES
from .int8_gemv import prefetch

BLOCK, BLOCK_BYTES = 256, 210
CHAINS = 4  # 16-lane fp32 accumulators per row


def supported(out_features: int, in_features: int) -> bool:
    """Whether the kernel takes a [out, in] weight: whole blocks (any CPU: plain vector code)."""
    return in_features % BLOCK == 0 and out_features > 0


def q6k_gemv(out_features: int, in_features: int, x_dtype: str, out_dtype: str) -> tirx.PrimFunc:
    """PrimFunc (blocks uint8 [N, K / 256 * 210], x [M, K] ``x_dtype``) -> y [M, N] ``out_dtype``
    (the argument order of the fused kernel it replaces). Each weight is rounded to ``x_dtype``,
    the model dtype, which the layer dequantizes to."""
    N, K = out_features, in_features
    B, row_bytes = K // BLOCK, K // BLOCK * BLOCK_BYTES
    ahead = max(1, PREFETCH_BYTES // row_bytes)

    def bits16(raw, n, start, shift, mask):
        """(16 bytes from ``start`` >> shift) & mask as int32 lanes."""
        return T.bitwise_and(T.shift_right(T.Cast("int32x16", raw[n, T.ramp(start, 1, 16)]), T.Broadcast(shift, 16)),
                             T.Broadcast(mask, 16))

    def weights(raw, sc, d16, n, b, s):
        """The 16 weights of sub-block ``s`` (0..15) of block ``b``, rounded to ``x_dtype``, in fp32."""
        half, r = s * 16 // 128, s * 16 % 128
        base = b * BLOCK_BYTES
        low = bits16(raw, n, base + half * 64 + r % 64, r // 64 * 4, 15)
        high = bits16(raw, n, base + 128 + half * 32 + r % 32, r // 32 * 2, 3)
        q = T.bitwise_or(low, T.shift_left(high, T.Broadcast(4, 16))) - T.Broadcast(32, 16)
        ds = T.Cast("float32", T.reinterpret("float16", d16[n, b * (BLOCK_BYTES // 2) + 104])) * T.Cast(
            "float32", sc[n, base + 192 + s])
        return T.Cast("float32x16", T.Cast(f"{x_dtype}x16", T.Broadcast(ds, 16) * T.Cast("float32x16", q)))

    @T.prim_func(private=True, s_tir=True)
    def func(raw_h: T.handle, x_h: T.handle, y_h: T.handle):
        T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True, "op_pattern": 8})  # kOpaque: never fused
        M = T.int64()
        raw = T.match_buffer(raw_h, (N, row_bytes), "uint8")
        x = T.match_buffer(x_h, (M, K), x_dtype)
        y = T.match_buffer(y_h, (M, N), out_dtype)
        with T.sblock("root"):
            sc = T.decl_buffer((N, row_bytes), "int8", data=raw.data)  # the int8 scales
            d16 = T.decl_buffer((N, row_bytes // 2), "uint16", data=raw.data)  # the fp16 d (even offsets)
            xf = T.alloc_buffer((M, K), "float32")
            acc = T.alloc_buffer((N, CHAINS * 16), "float32")
            for m, k in T.grid(M, K):
                xf[m, k] = T.Cast("float32", x[m, k])
            for n in T.parallel(N):
                for m in range(M):
                    acc[n, T.ramp(0, 1, CHAINS * 16)] = T.Broadcast(T.float32(0), CHAINS * 16)
                    for b in range(B):
                        for line in T.unroll(4):  # the block's 210 bytes span up to 4 cache lines
                            prefetch(raw, T.min(n + ahead, N - 1), b * BLOCK_BYTES + line * 64)
                        for s in T.unroll(16):  # (no named vectors: each would be a store to a buffer)
                            acc[n, T.ramp(s % CHAINS * 16, 1, 16)] = acc[n, T.ramp(s % CHAINS * 16, 1, 16)] + weights(
                                raw, sc, d16, n, b, s) * xf[m, T.ramp(b * BLOCK + s * 16, 1, 16)]
                    y[m, n] = T.Cast(out_dtype, halving_sum(acc[n, T.ramp(0, 1, CHAINS * 16)], CHAINS * 16)[0])

    return func
