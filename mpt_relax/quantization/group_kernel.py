"""The group quantizer as a compiled CPU kernel: one 2-D weight -> packed codes + scales.

One TIR PrimFunc per (in_features, bits, group size, source dtype, scale dtype), compiled for
this machine's CPU with ``tvm.compile`` the first time it is needed and cached in the process;
rows run in parallel on TVM's thread pool, each group as whole vectors. The bytes are exactly
those the scheme defines (:mod:`.group`'s docstring), per group of ``group_size`` inputs::

    amax   = max |w|, in float32 (taken over the bit patterns of |w|: NaN > inf > any finite
             value, so a NaN or an inf reaches the scale, where the caller sees it)
    scale  = scale_dtype(amax / max_int)            # float32 division, then rounded to nearest even
    d      = float32(scale), or 1.0 where it is 0
    code   = clip(nearbyint(w / d), -max_int, max_int) + max_int     # true division, half to even

The kernel reads the weight two elements per word (uint32 for 16-bit sources, uint64 for
float32; element 2i in the low half), so widening is a shift or a mask: a bfloat16 is its
bits in the high half of a float32. It writes each pair of codes ``c0 | c1 << bits`` as one
uint8 (int4) or uint16 (int8): on a little-endian host these are exactly the bytes of the uint32
words ``sum_k code[pack*j + k] << (bits*k)``.
"""

from __future__ import annotations

import functools

import ml_dtypes
import numpy as np
import tvm
import tvm_ffi
from tvm.script import tirx as T

from mpt_relax.kernels.lanes import halving_sum

SOURCES = {np.dtype(np.float32): "float32", np.dtype(np.float16): "float16",
           np.dtype(ml_dtypes.bfloat16): "bfloat16"}  # numpy dtype -> source dtype the kernel reads
_PAIR = {"float32": "uint64", "float16": "uint32", "bfloat16": "uint32"}  # two source elements


def quantize(w: np.ndarray, bits: int, group_size: int, scale_dtype: str) -> tuple[np.ndarray, np.ndarray]:
    """w [out, in] C-contiguous, writeable, a dtype of :data:`SOURCES` ->
    (q_weight uint32 [out, in * bits / 32], q_scale ``scale_dtype`` [out, in / group_size])."""
    out_features, in_features = w.shape
    source = SOURCES[w.dtype]
    q_weight = np.empty((out_features, in_features * bits // 32), np.uint32)
    q_scale = np.empty((out_features, in_features // group_size), scale_dtype)
    if out_features:
        kernel = _kernel(in_features, bits, group_size, source, scale_dtype)
        arrays = (w.view(_PAIR[source]), q_weight.view(f"uint{2 * bits}"), q_scale)
        kernel(*(tvm_ffi.from_dlpack(a) for a in arrays))  # no copies; alignment not required
    return q_weight, q_scale


@functools.lru_cache(maxsize=None)
def _kernel(in_features: int, bits: int, group_size: int, source: str, scale_dtype: str) -> tvm_ffi.Function:
    """The compiled kernel (w pairs, code pairs, q_scale), for any number of rows."""
    func = _prim_func(in_features, bits, group_size, source, scale_dtype)
    target = tvm.target.Target({"kind": "llvm", "mcpu": tvm.target.codegen.llvm_get_system_cpu()})
    return tvm.compile(tvm.IRModule({"main": func}), target=target)["main"]


def _prim_func(in_features: int, bits: int, group_size: int, source: str, scale_dtype: str) -> tvm.tirx.PrimFunc:
    """TIR: pairs [M, K / 2] (two source elements per word) -> code pairs [M, K / 2] (uint8 for
    int4, uint16 for int8: the bytes of q_weight), q_scale [M, K / group_size]."""
    K, S, max_int = in_features, group_size, 2 ** (bits - 1) - 1
    G, P = K // S, group_size // 2  # groups per row, pairs per group
    pair, out = _PAIR[source], f"uint{2 * bits}"

    def halves(u):  # a pair word -> its two elements (even, odd) as float32, exactly
        if source == "bfloat16":
            return (T.reinterpret("float32", T.shift_left(u, T.uint32(16))),
                    T.reinterpret("float32", T.bitwise_and(u, T.uint32(0xFFFF0000))))
        if source == "float16":
            return tuple(T.Cast("float32", T.reinterpret("float16", T.Cast("uint16", h)))
                         for h in (u, T.shift_right(u, T.uint32(16))))
        return tuple(T.reinterpret("float32", T.Cast("uint32", h)) for h in (u, T.shift_right(u, T.uint64(32))))

    def magnitude(x):  # |x| as its bit pattern: ordered like |x|, NaN above inf
        return T.bitwise_and(T.reinterpret("uint32", x), T.uint32(0x7FFFFFFF))

    def code(x, divisor):  # stored code of one element, uint32 in [0, 2 * max_int]
        q = T.max(T.min(T.nearbyint(x / divisor), T.float32(max_int)), T.float32(-max_int))
        return T.Cast("uint32", T.Cast("int32", q) + max_int)

    # fmt: off
    @T.prim_func(s_tir=True)
    def func(w_h: T.handle, qw_h: T.handle, qs_h: T.handle):
        T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True})
        M = T.int64()
        w = T.match_buffer(w_h, (M, K // 2), pair, align=1)
        qw = T.match_buffer(qw_h, (M, K // 2), out, align=1)
        qs = T.match_buffer(qs_h, (M, G), scale_dtype, align=1)
        for m in T.parallel(M):
            with T.sblock("row"):
                # three passes over the row's groups, each a short dependency chain per group (one
                # pass per group chained ~70 cycles of latency, max -> scale -> divisor -> codes,
                # and ran at the latency: a third of the speed)
                amax = T.sblock_alloc_buffer((P,), "uint32")
                top = T.sblock_alloc_buffer((G,), "uint32")
                divisor = T.sblock_alloc_buffer((G,), "float32")
                for g in T.serial(G):
                    for i in T.vectorized(P):
                        amax[i] = T.max(magnitude(halves(w[m, g * P + i])[0]), magnitude(halves(w[m, g * P + i])[1]))
                    top[g] = halving_sum(amax[T.ramp(0, 1, P)], P, combine=T.max)[0]
                for g in T.serial(G):
                    qs[m, g] = T.Cast(scale_dtype, T.reinterpret("float32", top[g]) / T.float32(max_int))
                    divisor[g] = T.if_then_else(qs[m, g] == T.Cast(scale_dtype, 0), T.float32(1), T.Cast("float32", qs[m, g]))
                for g in T.serial(G):
                    for i in T.vectorized(P):
                        qw[m, g * P + i] = T.Cast(out, T.bitwise_or(
                            code(halves(w[m, g * P + i])[0], divisor[g]),
                            T.shift_left(code(halves(w[m, g * P + i])[1], divisor[g]), T.uint32(bits))))
    # fmt: on
    return func
