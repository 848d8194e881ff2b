"""Put prefill matmuls on the AMX tile units where the target has them.

- ``amx_prefill`` schemes (bf16 products): the model (:mod:`mpt_relax.quantization.group`) emits
  each prefill projection as one exact dequantize + matmul PrimFunc tagged
  :data:`~mpt_relax.kernels.cpu.amx_matmul.KERNEL_ATTR`; :func:`select_amx_kernels` replaces it
  with the bf16 tile kernel.
- Every other scheme, exactly: :func:`select_exact_amx_prefill` points each exact ``x @ W^T`` of
  ``prefill`` (:mod:`mpt_relax.compile.matmul_calls`) whose operands are fp16 at the exact tile
  kernel (``amx_matmul(exact=True)``: bf16 hi + lo parts of both operands, four tile products,
  the same fp32 products and sums as the FMA path in another order). fp32 models keep the FMA path.

Anywhere else (no AMX-BF16: a portable ``--mcpu x86-64-v3`` build, a GPU) the exact kernels
stay, fused with their epilogues and scheduled like any matmul.
"""

from __future__ import annotations

import tvm

from mpt_relax.compile.matmul_calls import Matmul, rewrite_matmuls
from mpt_relax.compile.targets import TargetSpec
from mpt_relax.kernels.cpu import amx_matmul
from mpt_relax.kernels.cpu.base import cpu_has

PREFILL_FUNCTION = "prefill"


def has_amx(spec: TargetSpec) -> bool:
    """Whether ``spec`` is a CPU target whose instruction sets include AMX-BF16 and the AVX-512
    subsets the kernel uses with it (every CPU with AMX so far has them)."""
    return cpu_has(spec.target, amx_matmul.REQUIRED_FEATURES)


def select_amx_kernels(spec: TargetSpec) -> tvm.transform.Pass:
    """Module pass: on AMX targets, every tagged prefill matmul becomes the AMX kernel."""

    @tvm.transform.module_pass(opt_level=0, name="SelectAMXKernels")
    def _run(mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        if not has_amx(spec):
            return mod
        for gvar, func in list(mod.functions.items()):
            info = func.attrs.get(amx_matmul.KERNEL_ATTR) if func.attrs is not None else None
            if info is not None:
                mod[gvar] = amx_matmul.amx_matmul(int(info["out"]), int(info["in"]), int(info["bits"]),
                                                  str(info["x_dtype"]), str(info["out_dtype"]), str(info["w_dtype"]),
                                                  str(info.get("block", "")))
        return mod

    return _run


def _exact_kernel(m: Matmul):
    """(name, maker, x first) of the exact AMX kernel for ``m``, or None."""
    if (m.x_dtype not in amx_matmul.EXACT_DTYPES or m.w_dtype not in amx_matmul.EXACT_DTYPES
            or not amx_matmul.supported(m.n, m.k)):
        return None
    if m.kind == "float":
        bits, block = amx_matmul.FLOAT_BITS.get(m.w_dtype), ""
    elif m.kind == "group":
        bits, block = m.scheme.bits, ""
    else:
        bits, block = 0, m.block
    if bits is None or (m.kind == "group" and bits not in (4, 8)) or (m.kind == "blocks" and block not in amx_matmul.BLOCK_TYPES):
        return None
    args = (m.n, m.k, bits, m.x_dtype, m.out_dtype, m.w_dtype, block)
    name = f"amx_exact_matmul_{block.lower() or bits}_{m.key()}"
    return name, lambda: amx_matmul.amx_matmul(*args, exact=True), True


def select_exact_amx_prefill(spec: TargetSpec) -> tvm.transform.Pass:
    """Module pass: on AMX targets, the prefill's exact fp16 matmuls become the exact tile kernel."""

    @tvm.transform.module_pass(opt_level=0, name="SelectExactAMXPrefill")
    def _run(mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        return rewrite_matmuls(mod, PREFILL_FUNCTION, _exact_kernel) if has_amx(spec) else mod

    return _run
