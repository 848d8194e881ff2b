"""Decode GEMV on float weights: ``y = x @ W^T`` for a few rows of x, W fp16 or fp32 [N, K]
(q0f16 / q0f32 Linears, the tied LM head kept in fp16), the exact path's math.

Every product and sum is fp32, as in the scheduled ``NT_matmul`` it replaces; only the order of
the sums differs. The kernel streams W once per call at memory speed:

- one weight row per parallel task, read front to back: the whole of W is one forward stream
  (four rows interleaved per task, sharing each load of x, streamed at half the speed here);
- k in chunks of ``LANES`` (one vector of fp32 per row, the weight chunk converted in registers);
- the weights are prefetched into L2 a distance ahead in W's bytes (:func:`weight_distance`; a
  distance shorter than a row reaches into the next rows), one cache line per chunk and row (the
  hardware prefetchers alone leave a GEMV at about half the bandwidth, as for the int8 GEMV);
- each row's vector is summed with a halving tree of vector adds.

:mod:`mpt_relax.compile.float_gemv` puts it in the decode function of llvm targets.
"""

from __future__ import annotations

from tvm import DataType, tirx
from tvm.script import tirx as T

from mpt_relax.kernels.lanes import halving_sum

from .int8_gemv import prefetch

LANES = 32  # fp32 lanes per accumulator: 64 bytes of fp16 weights, one cache line
PREFETCH_BYTES = 65536  # how far ahead the weights are asked for (on an Intel Xeon 16 KiB was ~10 % slower)
ZEN_PREFETCH_BYTES = 16384  # on AMD Zen cores: 64 KiB was 15-25 % slower (one Zen 4 core, fp16 head and FFN)
# fp32 weights on AMD Zen: one Zen 4 core from DRAM read 31.5-32.7 GB/s at 1-4 KiB (3072x768, 768x3072;
# the 50432x768 head 26-27), 28-29 at 6 KiB, 22-24 at 8-16 KiB, 12-13 without prefetches; fp16 weights
# take 2-4x as many instructions per byte and want 12-16 KiB (19-23 GB/s at 2-4 KiB)
ZEN_FP32_PREFETCH_BYTES = 4096


def supported(out_features: int, in_features: int) -> bool:
    """Whether the kernel takes a [out, in] weight: in a multiple of 32."""
    return in_features % LANES == 0 and out_features > 0


def prefetch_bytes(target, zen: int = ZEN_PREFETCH_BYTES, other: int = PREFETCH_BYTES) -> int:
    """How far ahead a kernel asks for weights on ``target``'s CPU (by its LLVM CPU name): ``zen``
    on AMD Zen cores, else ``other``."""
    return zen if str(target.attrs.get("mcpu", "")).startswith("znver") else other


def weight_distance(target, w_dtype: str) -> int:
    """How many bytes of W ahead :func:`float_gemv` prefetches ``w_dtype`` weights on ``target``'s CPU."""
    return prefetch_bytes(target, ZEN_FP32_PREFETCH_BYTES if w_dtype == "float32" else ZEN_PREFETCH_BYTES)


def float_gemv(out_features: int, in_features: int, x_dtype: str, w_dtype: str, out_dtype: str,
               distance: int = PREFETCH_BYTES) -> tirx.PrimFunc:
    """PrimFunc (x [M, K] ``x_dtype``, W [N, K] ``w_dtype``) -> y [M, N] ``out_dtype``; the weights
    prefetched ``distance`` bytes of W ahead (:func:`weight_distance`)."""
    N, K = out_features, in_features
    itemsize = DataType(w_dtype).bits // 8
    line = 64 // itemsize  # elements per cache line
    ahead = distance // itemsize  # elements of W between a load and its prefetch (none at 0)
    f32 = f"float32x{LANES}"

    @T.prim_func(private=True, s_tir=True)
    def func(x_h: T.handle, w_h: T.handle, y_h: T.handle):
        T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True, "op_pattern": 8})  # kOpaque: never fused
        M = T.int64()
        x = T.match_buffer(x_h, (M, K), x_dtype)
        w = T.match_buffer(w_h, (N, K), w_dtype)
        y = T.match_buffer(y_h, (M, N), out_dtype)
        with T.sblock("root"):
            flat = T.decl_buffer((1, N * K), w_dtype, data=w.data)  # W as one stream, for the prefetches
            for n in T.parallel(N):
                with T.sblock("row"):
                    acc = T.sblock_alloc_buffer((LANES,), "float32")  # small, global scope: in registers
                    for m in range(M):
                        acc[T.ramp(0, 1, LANES)] = T.broadcast(T.float32(0), LANES)
                        for c in range(K // LANES):
                            if ahead > 0:
                                for p in T.unroll(LANES // line):
                                    prefetch(flat, 0, T.min(n * K + c * LANES + p * line + ahead, N * K - 1))
                            acc[T.ramp(0, 1, LANES)] = acc[T.ramp(0, 1, LANES)] + T.Cast(
                                f32, w[n, T.ramp(c * LANES, 1, LANES)]) * T.Cast(f32, x[m, T.ramp(c * LANES, 1, LANES)])
                        y[m, n] = T.Cast(out_dtype, halving_sum(acc[T.ramp(0, 1, LANES)], LANES)[0])

    return func
