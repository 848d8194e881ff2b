"""Decode GEMV on GGUF Q6_K weights, exact: ``y = x @ W^T`` for a few rows of x, W kept in
the file's Q6_K blocks (:mod:`mpt_relax.quantization.gguf_blocks`): each weight ``(d * scale)
* (q - 32)`` in fp32, then fp32 products and sums. The fused dequantize + ``NT_matmul`` it
replaces rounds each weight to fp16 first (at most half an fp16 step apart).

llama.cpp's Q4_0 and Q4_K_M files keep the tied embedding, MPT's LM head, in Q6_K: the largest
matmul of a decode step. Per 256-weight block (210 bytes: 128 of low nibbles, 64 of 2-bit
highs, 16 int8 scales, the fp16 ``d``), 64 codes at a time come from a few byte-wide vector ops
(:func:`codes`, shared with the int8 kernel), then each sub-block of 16 is widened, scaled
and FMA'd into one of four accumulator chains. One weight row per parallel task, read front to
back, prefetched ``PREFETCH_BYTES`` ahead; a row's accumulators and codes are a small buffer of
its task, kept in registers (6.5 -> 6.8 G weights/s on one Zen 4 core against a per-row scratch
in memory). Rounding each weight to fp16 (two conversions) kept it at 6.7; without, 9.2 (3072 x
768 from DRAM); :mod:`.q6k_int8_gemv` reaches ~27.
"""

from __future__ import annotations

from tvm import tirx
from tvm.script import tirx as T

from mpt_relax.kernels.lanes import halving_sum

from .float_gemv import PREFETCH_BYTES
from .int8_gemv import prefetch_l1

BLOCK, BLOCK_BYTES = 256, 210
CHAINS = 4  # 16-lane fp32 accumulators per row


def supported(out_features: int, in_features: int) -> bool:
    """Whether the kernel takes a [out, in] weight: whole blocks (any CPU: plain vector code)."""
    return in_features % BLOCK == 0 and out_features > 0


def codes(raw, n, b, h, part):
    """uint8 [64]: the 6-bit codes of weights ``128 h + 64 part`` .. ``+ 63`` of block ``b`` of row
    ``n``. Half ``h`` of a block is 64 bytes of low nibbles ``ql`` and 32 bytes of 2-bit highs
    ``qh``; with ``qhv`` = ``qh`` followed by ``qh >> 2``, its weights 0..63 are ``(ql & 15) |
    ((qhv << 4) & 48)`` and 64..127 ``(ql >> 4) | (qhv & 48)``, byte for byte in order."""
    def bcast(value, lanes=64):
        return T.broadcast(T.Cast("uint8", value), lanes)

    ql = raw[n, T.ramp(b * BLOCK_BYTES + h * 64, 1, 64)]
    qh = raw[n, T.ramp(b * BLOCK_BYTES + 128 + h * 32, 1, 32)]
    qhv = T.Shuffle([qh, T.shift_right(qh, bcast(2, 32))], list(range(64)))
    low = T.bitwise_and(T.shift_right(ql, bcast(part * 4)), bcast(15))
    return T.bitwise_or(low, T.bitwise_and(T.shift_left(qhv, bcast(4 - part * 4)), bcast(48)))


def q6k_gemv(out_features: int, in_features: int, x_dtype: str, out_dtype: str) -> tirx.PrimFunc:
    """PrimFunc (blocks uint8 [N, K / 256 * 210], x [M, K] ``x_dtype``) -> y [M, N] ``out_dtype``
    (the argument order of the fused kernel it replaces)."""
    N, K = out_features, in_features
    B, row_bytes = K // BLOCK, K // BLOCK * BLOCK_BYTES
    ahead = max(1, PREFETCH_BYTES // row_bytes)

    def scaled(sc, d16, n, b, s):
        """``d * scale`` of sub-block ``s`` of block ``b``, fp32."""
        return T.Cast("float32", T.reinterpret("float16", d16[n, b * (BLOCK_BYTES // 2) + 104])) * T.Cast(
            "float32", sc[n, b * BLOCK_BYTES + 192 + s])

    def weights(cb, sc, d16, n, b, s, quarter):
        """The 16 weights of sub-block ``s`` (their codes at ``cb[16 quarter:]``), fp32."""
        q = T.Cast("int32x16", cb[T.ramp(quarter * 16, 1, 16)]) - T.Broadcast(32, 16)
        return T.Broadcast(scaled(sc, d16, n, b, s), 16) * T.Cast("float32x16", q)

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
            for m, k in T.grid(M, K):
                xf[m, k] = T.Cast("float32", x[m, k])
            for n in T.parallel(N):
                with T.sblock("row"):  # a row's scratch: small, global scope, so in registers
                    acc = T.sblock_alloc_buffer((CHAINS * 16,), "float32")
                    cb = T.sblock_alloc_buffer((64,), "uint8")  # the codes of one vector (:func:`codes`)
                    for m in range(M):
                        acc[T.ramp(0, 1, CHAINS * 16)] = T.Broadcast(T.float32(0), CHAINS * 16)
                        for b in range(B):
                            for line in T.unroll(4):  # the block's 210 bytes span up to 4 cache lines
                                prefetch_l1(raw, T.min(n + ahead, N - 1), b * BLOCK_BYTES + line * 64)
                            for h, part in T.grid(2, 2):  # unrolled by LLVM (constant trip counts)
                                cb[T.ramp(0, 1, 64)] = codes(raw, n, b, h, part)
                                for quarter in T.unroll(4):  # (no named vectors: each would be a store to a buffer)
                                    acc[T.ramp(quarter * 16, 1, 16)] = acc[T.ramp(quarter * 16, 1, 16)] + weights(
                                        cb, sc, d16, n, b, h * 8 + part * 4 + quarter, quarter) * xf[
                                        m, T.ramp(b * BLOCK + h * 128 + part * 64 + quarter * 16, 1, 16)]
                        y[m, n] = T.Cast(out_dtype, halving_sum(acc[T.ramp(0, 1, CHAINS * 16)], CHAINS * 16)[0])

    return func
