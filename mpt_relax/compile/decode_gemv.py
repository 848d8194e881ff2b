"""Give the decode step's GEMVs the streaming CPU kernels (llvm targets only).

In ``batch_decode`` (a few rows of x) this pass points each exact ``x @ W^T`` call
(:mod:`mpt_relax.compile.matmul_calls`) at a hand-written kernel with the same math (except
that the group-quantized and GGUF kernels do not round each weight to fp16 first):

- float weights (fp16/fp32): :func:`mpt_relax.kernels.cpu.float_gemv.float_gemv`;
- q4f16_1 / q8f16_1 weights, on x86 targets with AVX2 and FMA:
  :func:`mpt_relax.kernels.cpu.group_gemv.group_gemv`;
- GGUF Q6_K / Q4_K / Q5_K blocks: :func:`mpt_relax.kernels.cpu.q6k_gemv.q6k_gemv`,
  :func:`mpt_relax.kernels.cpu.q4k_q5k_gemv.q4k_gemv` and ``q5k_gemv``.

Prefill keeps the packed GEMM (or, on AMX CPUs, :mod:`mpt_relax.compile.amx_kernels`' exact tile
kernel).
"""

from __future__ import annotations

import tvm

from mpt_relax.compile.matmul_calls import Matmul, rewrite_matmuls
from mpt_relax.compile.targets import TargetSpec
from mpt_relax.kernels.cpu import float_gemv, group_gemv, q4k_q5k_gemv, q6k_gemv
from mpt_relax.kernels.cpu.base import cpu_has

DECODE_FUNCTION = "batch_decode"
# GGUF blocks (of 256 weights) with an exact decode GEMV: type -> (whether a shape is supported,
# bytes per block, the kernel's maker)
_BLOCK_GEMVS = {"Q6_K": (q6k_gemv.supported, q6k_gemv.BLOCK_BYTES, q6k_gemv.q6k_gemv),
                "Q4_K": (q4k_q5k_gemv.supported, q4k_q5k_gemv.Q4_K.block_bytes, q4k_q5k_gemv.q4k_gemv),
                "Q5_K": (q4k_q5k_gemv.supported, q4k_q5k_gemv.Q5_K.block_bytes, q4k_q5k_gemv.q5k_gemv)}


def _decode_kernel(m: Matmul, group_kernels: bool, target: tvm.target.Target):
    """(name, maker, x first) of the decode GEMV for ``m`` on ``target``, or None."""
    if m.kind == "float":
        if not float_gemv.supported(m.n, m.k):
            return None
        key = (m.n, m.k, m.x_dtype, m.w_dtype, m.out_dtype)
        distance = float_gemv.weight_distance(target, m.w_dtype)
        return "float_gemv_{}x{}_{}_{}_{}".format(*key), lambda: float_gemv.float_gemv(*key, distance), True
    if m.kind == "group":
        if not group_kernels or not group_gemv.supported(m.n, m.k, m.scheme.bits):
            return None
        key = (m.n, m.k, m.scheme.bits, m.x_dtype, m.out_dtype, m.scheme.model_dtype)
        distance = group_gemv.prefetch_distance(target)
        return "group_gemv_{}x{}_q{}_{}_{}_{}".format(*key), lambda: group_gemv.group_gemv(*key, distance), False
    supported, block_bytes, make = _BLOCK_GEMVS.get(m.block, (None, None, None))
    if make is None or not supported(m.n, m.k) or m.weights[0].ty.shape.values[1].value != m.k // 256 * block_bytes:
        return None
    key = (m.n, m.k, m.x_dtype, m.out_dtype)
    return "{}_{}x{}_{}_{}".format(make.__name__, *key), lambda: make(*key), False


def select_decode_gemv(spec: TargetSpec) -> tvm.transform.Pass:
    """Module pass: on llvm targets, the decode step's float, exact group-quantized and GGUF Q6_K /
    Q4_K / Q5_K GEMVs become the streaming kernels (the group one where the target has AVX2 and FMA)."""

    @tvm.transform.module_pass(opt_level=0, name="SelectDecodeGEMV")
    def _run(mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        if spec.name != "llvm":
            return mod
        group_kernels = cpu_has(spec.target, group_gemv.REQUIRED_FEATURES)
        return rewrite_matmuls(mod, DECODE_FUNCTION, lambda m: _decode_kernel(m, group_kernels, spec.target))

    return _run
