"""Prefill matmul on the AMX tile units: ``y = x @ W^T`` in bfloat16 products with fp32 sums,
W group-quantized (q4f16_1, q8f16_1).

``tdpbf16ps`` multiplies a 16 x 32 bf16 tile A by a 32 x 16 bf16 tile B into a 16 x 16 fp32
tile: 8192 multiply-adds per instruction. B must hold pairs of consecutive k per column
(``[K/2, 16, 2]``), A is plain row-major. The kernel computes ``y^T = W @ x^T``, so that the
operand rebuilt for every block of output columns (the weights) is the row-major one:

1. x is converted once per call into B tiles' layout (``[K/2, M, 2]`` bf16, M padded to 16);
2. per block of 32 output columns (blocks in parallel) the 32 weight rows are dequantized once
   into bf16 rows (two A tiles per 32 k, contiguous, vectorised stores);
3. for each 16 rows of x: two accumulator tiles, K / 32 steps of two A and one B tile loads
   and two ``tdpbf16ps``; the tiles (``[n, m]``) are stored and written into y transposed.

Numerics: x and the dequantized weights are rounded to bfloat16 (8 significant bits, round to
nearest even) before the products: about 0.4 % relative per factor, as PyTorch's bf16 path.
A process must ask Linux for the tile state before its first AMX instruction
(:func:`mpt_relax.runtime.cpu_features.request_amx`), or it dies of SIGILL.

The Linear layers emit :func:`exact_matmul` tagged with :data:`KERNEL_ATTR`;
:mod:`mpt_relax.compile.amx_kernels` swaps in :func:`amx_matmul` where the target has AMX-BF16
and leaves the exact kernel (fused and scheduled as usual) elsewhere.
"""

from __future__ import annotations

from tvm import te, tirx
from tvm.script import tirx as T

KERNEL_ATTR = "mpt_relax.amx_matmul"  # func attr: {"bits", "in", "out", ...}; see compile.amx_kernels
TILE = 16  # rows of x and columns of W per tile
BLOCK = 32  # output columns per parallel task (two B tiles)


def supported(out_features: int, in_features: int) -> bool:
    """Whether the kernel takes a [out, in] weight: out a multiple of 32, in of 32."""
    return out_features % BLOCK == 0 and in_features % 32 == 0


def exact_matmul(q, out_features: int, in_features: int, x_dtype: str, out_dtype: str,
                 dequantized) -> tirx.PrimFunc:
    """The exact path as one TE PrimFunc: x [M, K] x_dtype, q_weight, q_scale -> y [M, N] (fp32
    products and sums, like the fused dequantize + NT_matmul). ``dequantized(q, qw, qs, o, i)``
    gives one weight element."""
    m = tirx.Var("m", "int64")
    x = te.placeholder((m, in_features), x_dtype, name="x")
    qw = te.placeholder(q.q_weight_shape(out_features, in_features), "uint32", name="q_weight")
    qs = te.placeholder(q.q_scale_shape(out_features, in_features), q.model_dtype, name="q_scale")
    w = te.compute((out_features, in_features), lambda o, i: dequantized(q, qw, qs, o, i), name="dequantize")
    r = te.reduce_axis((0, in_features), name="r")
    y = te.compute((m, out_features), lambda i, j: te.sum(x[i, r].astype("float32") * w[j, r].astype("float32"),
                                                           axis=r), name="NT_matmul")
    if out_dtype != "float32":
        y = te.compute(y.shape, lambda i, j: y[i, j].astype(out_dtype), name="cast")
    func = te.create_prim_func([x, qw, qs, y]).without_attr("global_symbol")  # a private kernel
    return func.with_attr(KERNEL_ATTR, {"bits": q.bits, "in": in_features, "out": out_features,
                                        "x_dtype": x_dtype, "out_dtype": out_dtype, "scale_dtype": q.model_dtype})


def amx_matmul(out_features: int, in_features: int, bits: int, x_dtype: str, out_dtype: str,
               scale_dtype: str = "float16") -> tirx.PrimFunc:
    """PrimFunc (x [M, K], q_weight uint32 [N, K*bits/32], q_scale [N, K/32]) -> y [M, N]; see the
    module docstring."""
    N, K = out_features, in_features
    words, per_word, mask, off = K * bits // 32, 32 // bits, (1 << bits) - 1, 2 ** (bits - 1) - 1
    k_steps = K // 32
    w_stride, c_stride = T.int64(K * 2), T.int64(64)  # bytes per tile row

    def tile(op, *args):
        return T.call_llvm_intrin("void", op, *args)

    def bf16_bits(value):
        """float32 -> its bfloat16 bits (round to nearest even), as uint16: bf16 buffers would be
        widened to float32 by TVM's bf16 legalization, and the tiles read raw bits."""
        u = T.reinterpret(value, dtype="uint32")
        return T.Cast("uint16", (u + T.uint32(0x7FFF) + ((u >> T.uint32(16)) & T.uint32(1))) >> T.uint32(16))

    def weight_bits(qw, qs, n, w, code):
        """bf16 bits of weight element ``w * per_word + code`` of row n, dequantized in the scale dtype."""
        value = (T.Cast(scale_dtype, (qw[n, w] >> T.uint32(code * bits)) & T.uint32(mask)) - T.Cast(scale_dtype, off)) \
            * qs[n, w * per_word // 32]
        return bf16_bits(T.Cast("float32", value))

    @T.prim_func(private=True, s_tir=True)
    def func(x_h: T.handle, qw_h: T.handle, qs_h: T.handle, y_h: T.handle):
        T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True, "op_pattern": 8})  # kOpaque: never fused
        M = T.int64()
        x = T.match_buffer(x_h, (M, K), x_dtype)
        qw = T.match_buffer(qw_h, (N, words), "uint32")
        qs = T.match_buffer(qs_h, (N, K // 32), scale_dtype)
        y = T.match_buffer(y_h, (M, N), out_dtype)
        with T.sblock("root"):
            # x^T as B tiles: xb[k // 2, m, k % 2] (pairs of k per row m), rows past M zero
            xb = T.alloc_buffer((K // 2, (M + 15) // 16 * 16, 2), "uint16")
            for kk in T.parallel(K // 2):
                for i, p in T.grid((M + 15) // 16 * 16, 2):
                    xb[kk, i, p] = T.if_then_else(
                        i < M, bf16_bits(T.Cast("float32", x[T.min(i, M - 1), kk * 2 + p])), T.uint16(0))
            for nb in T.parallel(N // 32):
                cfg = T.alloc_buffer((64,), "uint8")
                w = T.alloc_buffer((32, K), "uint16")  # the block's 32 weight rows, bf16, row-major: A tiles
                c = T.alloc_buffer((2, 16, 16), "float32")  # y^T tiles: [n, m]
                for j in range(32):
                    for wo in range(words):
                        for code in T.vectorized(per_word):
                            w[j, wo * per_word + code] = weight_bits(qw, qs, nb * 32 + j, wo, code)
                for i in range(64):
                    cfg[i] = T.uint8(0)
                cfg[0] = T.uint8(1)  # palette 1
                for t in range(5):  # tiles 0, 1: C; 2, 3: A (weights); 4: B (x); each 16 rows of 64 bytes
                    cfg[16 + 2 * t] = T.uint8(64)
                    cfg[48 + t] = T.uint8(16)
                tile("llvm.x86.ldtilecfg", T.address_of(cfg[0]))
                for mb in range((M + 15) // 16):
                    tile("llvm.x86.tilezero", T.int8(0))
                    tile("llvm.x86.tilezero", T.int8(1))
                    for kc in range(k_steps):
                        tile("llvm.x86.tileloadd64", T.int8(2), T.address_of(w[0, kc * 32]), w_stride)
                        tile("llvm.x86.tileloadd64", T.int8(3), T.address_of(w[16, kc * 32]), w_stride)
                        tile("llvm.x86.tileloadd64", T.int8(4), T.address_of(xb[kc * 16, mb * 16, 0]),
                             T.Cast("int64", ((M + 15) // 16 * 16) * 4))
                        tile("llvm.x86.tdpbf16ps", T.int8(0), T.int8(2), T.int8(4))
                        tile("llvm.x86.tdpbf16ps", T.int8(1), T.int8(3), T.int8(4))
                    tile("llvm.x86.tilestored64", T.int8(0), T.address_of(c[0, 0, 0]), c_stride)
                    tile("llvm.x86.tilestored64", T.int8(1), T.address_of(c[1, 0, 0]), c_stride)
                    for i, t, j in T.grid(16, 2, 16):
                        if mb * 16 + i < M:
                            y[mb * 16 + i, nb * 32 + t * 16 + j] = T.Cast(out_dtype, c[t, j, i])
                tile("llvm.x86.tilerelease")

    return func
