"""Decode GEMV on GGUF Q6_K weights and int8 activations (``gguf`` built with
``--int8-activations``): ``y = x @ W^T``, x quantized per group of 32 as
:func:`mpt_relax.kernels.cpu.int8_gemv.quantize_activation` does for int8 weights (natural
order), the 6-bit codes multiplied with it in integer lanes.

The math, per 256-weight block (``d`` fp16, ``sc[j]`` the int8 scale of sub-block ``j`` of
16 weights, ``q`` the unsigned 6-bit code, ``xs[g]`` the activation scale of group ``g`` of 32)::

    y[m, n] = sum_blocks d * sum_j sc[j] * xs[m, g(j)] * sum_{k in j} (q[k] - 32) * xq[m, k]

The inner sums are exact integers; the only rounding beyond the exact path is x's (as for the
other int8-activation kernels), and the weights are not rounded to fp16 first (``d * sc * (q -
32)`` in fp32, which the exact kernel rounds).

``avx512vnni``: a block is four vectors of 64 codes (:func:`.q6k_gemv.codes`). One ``vpdpbusd`` per vector sums four
code-by-activation products into each of 16 int32 lanes, starting from ``-32 * (the four
activations' sum)`` (computed once per call), which folds the codes' offset in for free. Lane
``l`` belongs to sub-block ``4c + l // 4`` of vector ``c`` and to group ``l // 8``. Once per
block one 16-lane vector holds ``d * sc * xs`` of its 16 sub-blocks (each sub-block's ``xs``
laid out once per call); one ``vpermps`` gives each vector its lanes' factors and one fp32 FMA
applies them (per vector, four scales' conversions and products before: 1.2x from cache on a
Zen 4 core). ``generic``: plain integer loops, the same numbers on any CPU.
"""

from __future__ import annotations

from tvm import tirx
from tvm.script import tirx as T

from mpt_relax.kernels.lanes import bound, halving_sum

from .float_gemv import PREFETCH_BYTES
from .int8_gemv import GROUP, block_kernel, prefetch
from .q6k_gemv import BLOCK, BLOCK_BYTES, codes, supported  # noqa: F401  (the same shapes)

_DOT = "llvm.x86.avx512.vpdpbusd.512"


def q6k_int8_gemv(out_features: int, in_features: int, out_dtype: str, isa: str = "generic",
                  distance: int = PREFETCH_BYTES) -> tirx.PrimFunc:
    """PrimFunc (xq int8 [M, K], xs f32 [M, K/32], blocks uint8 [N, K / 256 * 210]) -> y [M, N]
    ``out_dtype``; see the module docstring. ``isa``: ``avx512vnni`` or ``generic``; ``distance``:
    how many bytes ahead the VNNI kernel prefetches (:func:`.float_gemv.prefetch_bytes`)."""
    builders = {"avx512vnni": lambda *shape: _vnni(*shape, distance), "generic": _generic}
    return block_kernel("Q6_K", builders, out_features, in_features, out_dtype, isa)


def _generic(N, K, out_dtype):
    B, row_bytes = K // BLOCK, K // BLOCK * BLOCK_BYTES

    def code(raw, n, k):
        """The unsigned 6-bit code of weight k of row n."""
        b, j = k // BLOCK, k % BLOCK
        half, r = j // 128, j % 128
        low = T.shift_right(T.Cast("int32", raw[n, b * BLOCK_BYTES + half * 64 + r % 64]), r // 64 * 4) & 15
        high = T.shift_right(T.Cast("int32", raw[n, b * BLOCK_BYTES + 128 + half * 32 + r % 32]), r // 32 * 2) & 3
        return low | T.shift_left(high, 4)

    @T.prim_func(private=True, s_tir=True)
    def func(xq_h: T.handle, xs_h: T.handle, raw_h: T.handle, y_h: T.handle):
        T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True, "op_pattern": 8})  # kOpaque: never fused
        M = T.int64()
        xq = T.match_buffer(xq_h, (M, K), "int8")
        xs = T.match_buffer(xs_h, (M, K // GROUP), "float32")
        raw = T.match_buffer(raw_h, (N, row_bytes), "uint8")
        y = T.match_buffer(y_h, (M, N), out_dtype)
        with T.sblock("root"):
            sc = T.decl_buffer((N, row_bytes), "int8", data=raw.data)
            d16 = T.decl_buffer((N, row_bytes // 2), "uint16", data=raw.data)
            dot = T.alloc_buffer((N,), "int32")
            acc = T.alloc_buffer((N,), "float32")
            for n in T.parallel(N):
                for m in range(M):
                    acc[n] = T.float32(0)
                    for b, j in T.grid(B, 16):
                        dot[n] = 0
                        for i in range(16):
                            k = b * BLOCK + j * 16 + i
                            dot[n] = dot[n] + (code(raw, n, k) - 32) * T.Cast("int32", xq[m, k])
                        acc[n] = acc[n] + T.Cast("float32", T.reinterpret("float16", d16[n, b * (BLOCK_BYTES // 2) + 104])) * T.Cast(
                            "float32", sc[n, b * BLOCK_BYTES + 192 + j]) * xs[m, (b * BLOCK + j * 16) // GROUP] * T.Cast("float32", dot[n])
                    y[m, n] = T.Cast(out_dtype, acc[n])

    return func


def _vnni(N, K, out_dtype, distance):
    B, row_bytes = K // BLOCK, K // BLOCK * BLOCK_BYTES
    ahead = max(1, distance // row_bytes)
    i8 = "int8x64"

    def factors(sc, d16, sub_xs, n, m, b):
        """fp32 [16]: ``d * sc * xs`` of the block's 16 sub-blocks."""
        d = T.Cast("float32", T.reinterpret("float16", d16[n, b * (BLOCK_BYTES // 2) + 104]))
        return T.Cast("float32x16", sc[n, T.ramp(b * BLOCK_BYTES + 192, 1, 16)]) * T.broadcast(d, 16) * sub_xs[m, T.ramp(b * 16, 1, 16)]

    def step(raw, xq, offset, fac, m, n, b, h, part):
        """fp32 [16]: one vector's lanes, scaled (lane l is sub-block 8h + 4part + l // 4)."""
        k = b * BLOCK + h * 128 + part * 64
        dot = T.call_llvm_pure_intrin(T.llvm_lookup_intrinsic_id(_DOT), offset[m, T.ramp(k // 4, 1, 16)],
                                      T.reinterpret(codes(raw, n, b, h, part), dtype=i8), T.reinterpret(xq[m, T.ramp(k, 1, 64)], dtype=i8),
                                      dtype="int32x16")
        return T.Cast("float32x16", dot) * T.Shuffle([fac], [h * 8 + part * 4 + lane // 4 for lane in range(16)])

    def block(raw, sc, d16, xq, offset, sub_xs, m, n, b):
        """fp32 [16]: the block's four vectors, scaled and summed."""
        return bound(factors(sc, d16, sub_xs, n, m, b), lambda fac: (
            step(raw, xq, offset, fac, m, n, b, 0, 0) + step(raw, xq, offset, fac, m, n, b, 0, 1))
            + (step(raw, xq, offset, fac, m, n, b, 1, 0) + step(raw, xq, offset, fac, m, n, b, 1, 1)))

    @T.prim_func(private=True, s_tir=True)
    def func(xq_h: T.handle, xs_h: T.handle, raw_h: T.handle, y_h: T.handle):
        T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True, "op_pattern": 8})  # kOpaque: never fused
        M = T.int64()
        xq = T.match_buffer(xq_h, (M, K), "int8")
        xs = T.match_buffer(xs_h, (M, K // GROUP), "float32")
        raw = T.match_buffer(raw_h, (N, row_bytes), "uint8")
        y = T.match_buffer(y_h, (M, N), out_dtype)
        with T.sblock("root"):
            sc = T.decl_buffer((N, row_bytes), "int8", data=raw.data)
            d16 = T.decl_buffer((N, row_bytes // 2), "uint16", data=raw.data)
            offset = T.alloc_buffer((M, K // 4), "int32")  # -32 * the sum of each 4 activations
            sub_xs = T.alloc_buffer((M, K // 16), "float32")  # each sub-block's activation scale
            for m, lane in T.grid(M, K // 4):
                offset[m, lane] = T.int32(-32) * (T.Cast("int32", xq[m, lane * 4]) + T.Cast("int32", xq[m, lane * 4 + 1])
                                                  + T.Cast("int32", xq[m, lane * 4 + 2]) + T.Cast("int32", xq[m, lane * 4 + 3]))
            for m, j in T.grid(M, K // 16):
                sub_xs[m, j] = xs[m, j * 16 // GROUP]
            for n in T.parallel(N):
                with T.sblock("row"):
                    acc = T.sblock_alloc_buffer((16,), "float32")
                    for m in range(M):
                        acc[T.ramp(0, 1, 16)] = T.broadcast(T.float32(0), 16)
                        for b in range(B):
                            for line in T.unroll(4):  # the block's 210 bytes span up to 4 cache lines
                                prefetch(raw, T.min(n + ahead, N - 1), b * BLOCK_BYTES + line * 64)
                            acc[T.ramp(0, 1, 16)] = acc[T.ramp(0, 1, 16)] + block(raw, sc, d16, xq, offset, sub_xs, m, n, b)
                        y[m, n] = T.Cast(out_dtype, halving_sum(acc[T.ramp(0, 1, 16)], 16)[0])

    return func
