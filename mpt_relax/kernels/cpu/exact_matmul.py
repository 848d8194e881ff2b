"""The exact prefill matmuls of the CPU kernels' schemes as plain TE PrimFuncs, tagged for
:mod:`mpt_relax.compile.amx_kernels`: ``x @ W^T`` with each weight dequantized as the exact path
does, fp32 products and sums. Untouched (on targets without AMX or AVX-512) they are fused and
scheduled like any matmul; the pass swaps a tagged one for :func:`~.amx_matmul.amx_matmul`.
"""

from __future__ import annotations

from tvm import te, tirx

KERNEL_ATTR = "mpt_relax.amx_matmul"  # func attr: {"bits", "in", "out", ...}; see compile.amx_kernels
FLOAT_BITS = {"float16": 16, "float32": 32}  # float weights: their dtype -> bits in the kernel tag


def exact_matmul(q, out_features: int, in_features: int, x_dtype: str, out_dtype: str,
                 dequantized) -> tirx.PrimFunc:
    """The exact path of a group-quantized weight as one TE PrimFunc: x [M, K] x_dtype, q_weight,
    q_scale -> y [M, N] (fp32 products and sums, like the fused dequantize + NT_matmul).
    ``dequantized(q, qw, qs, o, i)`` gives one weight element."""
    qw = te.placeholder(q.q_weight_shape(out_features, in_features), "uint32", name="q_weight")
    qs = te.placeholder(q.q_scale_shape(out_features, in_features), q.model_dtype, name="q_scale")
    return _tagged_matmul(out_features, in_features, x_dtype, out_dtype, [qw, qs],
                          lambda o, i: dequantized(q, qw, qs, o, i), q.bits, q.model_dtype)


def exact_float_matmul(out_features: int, in_features: int, w_dtype: str, x_dtype: str, out_dtype: str) -> tirx.PrimFunc:
    """The exact path of a float weight (q0f16, q0f32) as one TE PrimFunc: x [M, K], W [N, K]
    ``w_dtype`` -> y [M, N] (fp32 products and sums, like NT_matmul)."""
    w = te.placeholder((out_features, in_features), w_dtype, name="weight")
    return _tagged_matmul(out_features, in_features, x_dtype, out_dtype, [w], lambda o, i: w[o, i],
                          FLOAT_BITS[w_dtype], w_dtype)


def exact_block_matmul(block, out_features: int, in_features: int, x_dtype: str, out_dtype: str,
                       w_dtype: str) -> tirx.PrimFunc:
    """The exact path of a weight kept in GGUF blocks (:data:`~.block_chunks.BLOCK_TYPES`: Q4_K, Q5_K, Q6_K) as one TE
    PrimFunc: x [M, K], blocks uint8 -> y [M, N], each weight decoded and rounded to ``w_dtype``."""
    raw = te.placeholder(block.storage_shape(out_features, in_features), "uint8", name="q_blocks")
    return _tagged_matmul(out_features, in_features, x_dtype, out_dtype, [raw],
                          lambda o, i: block.decode(raw, o, i).astype(w_dtype), 0, w_dtype, block.name)


def _tagged_matmul(out_features, in_features, x_dtype, out_dtype, weights, weight, bits, w_dtype,
                   block: str = "") -> tirx.PrimFunc:
    """``x @ W^T`` (W[o, i] = ``weight(o, i)``, read from the placeholders ``weights``), tagged for
    :mod:`mpt_relax.compile.amx_kernels` (``block``: the GGUF block type, if any)."""
    m = tirx.Var("m", "int64")
    x = te.placeholder((m, in_features), x_dtype, name="x")
    w = te.compute((out_features, in_features), weight, name="dequantize")
    r = te.reduce_axis((0, in_features), name="r")
    y = te.compute((m, out_features), lambda i, j: te.sum(x[i, r].astype("float32") * w[j, r].astype("float32"),
                                                           axis=r), name="NT_matmul")
    if out_dtype != "float32":
        y = te.compute(y.shape, lambda i, j: y[i, j].astype(out_dtype), name="cast")
    func = te.create_prim_func([x, *weights, y]).without_attr("global_symbol")  # a private kernel
    return func.with_attr(KERNEL_ATTR, {"bits": bits, "in": in_features, "out": out_features, "block": block,
                                        "x_dtype": x_dtype, "out_dtype": out_dtype, "w_dtype": w_dtype})
