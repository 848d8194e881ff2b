"""Put prefill matmuls on the AMX tile units where the target has them, else on AVX-512 register tiles.

- ``amx_prefill`` schemes (bf16 products): the model (:mod:`mpt_relax.quantization.group`) emits
  each prefill projection as one exact dequantize + matmul PrimFunc tagged
  :data:`~mpt_relax.kernels.cpu.exact_matmul.KERNEL_ATTR`; :func:`select_amx_kernels` replaces it
  with the bf16 tile kernel, or on AVX512-BF16 CPUs without AMX (AMD Zen 4) with the same bf16
  products on ``vdpbf16ps`` (``amx_matmul(units="vector")``).
- Every other scheme, exactly: :func:`select_exact_amx_prefill` points each exact ``x @ W^T`` of
  ``prefill`` (:mod:`mpt_relax.compile.matmul_calls`) whose operands are fp16 at the exact tile
  kernel (``amx_matmul(exact=True)``: bf16 hi + lo parts of both operands, four tile products,
  the same fp32 products and sums as the FMA path in another order).

On AVX-512 targets without AMX-BF16 (an AMD EPYC), and for fp32 operands anywhere on AVX-512, the
exact matmuls (and the tagged ones where ``vdpbf16ps`` is missing) go on
``amx_matmul(exact=True, units="vector")`` instead: the same exact
fp32 products and sums, FMAs on 2 x 12 accumulator vectors. Anywhere else (a portable ``--mcpu
x86-64-v3`` build, a GPU) the exact kernels stay, fused with their epilogues and scheduled like
any matmul.
"""

from __future__ import annotations

import tvm

from mpt_relax.compile.matmul_calls import Matmul, rewrite_matmuls
from mpt_relax.compile.targets import TargetSpec
from mpt_relax.kernels.cpu import amx_matmul, exact_matmul
from mpt_relax.kernels.cpu.base import cpu_has

PREFILL_FUNCTION = "prefill"


def has_amx(spec: TargetSpec) -> bool:
    """Whether ``spec`` is a CPU target whose instruction sets include AMX-BF16 and the AVX-512
    subsets the kernel uses with it (every CPU with AMX so far has them)."""
    return cpu_has(spec.target, amx_matmul.REQUIRED_FEATURES)


def has_vector_units(spec: TargetSpec) -> bool:
    """Whether ``spec`` is a CPU target with the AVX-512 subsets of ``amx_matmul(units="vector")``."""
    return cpu_has(spec.target, amx_matmul.VECTOR_FEATURES)


def has_bf16_dots(spec: TargetSpec) -> bool:
    """Whether ``spec`` is a CPU target with ``vdpbf16ps`` (and the AVX-512 subsets around it)."""
    return cpu_has(spec.target, amx_matmul.DOT_FEATURES)


def select_amx_kernels(spec: TargetSpec) -> tvm.transform.Pass:
    """Module pass: every tagged prefill matmul becomes the bf16 AMX kernel on AMX targets, the
    bf16 vector kernel on other AVX512-BF16 targets (its width permitting), else the exact vector
    kernel on AVX-512 targets."""

    @tvm.transform.module_pass(opt_level=0, name="SelectAMXKernels")
    def _run(mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        tiles, dots = has_amx(spec), has_bf16_dots(spec)
        if not (tiles or has_vector_units(spec)):
            return mod
        for gvar, func in list(mod.functions.items()):
            info = func.attrs.get(exact_matmul.KERNEL_ATTR) if func.attrs is not None else None
            if info is not None:
                n = int(info["out"])
                bf16 = tiles or (dots and n % amx_matmul.DOT_BLOCK == 0)
                mod[gvar] = amx_matmul.amx_matmul(n, int(info["in"]), int(info["bits"]),
                                                  str(info["x_dtype"]), str(info["out_dtype"]), str(info["w_dtype"]),
                                                  str(info.get("block", "")), exact=not bf16,
                                                  units="tiles" if tiles else "vector")
        return mod

    return _run


def _exact_kernel(m: Matmul, tiles: bool, vector: bool):
    """(name, maker, x first) of the exact kernel for ``m``: on the AMX tiles where ``tiles`` and
    both operands split into bf16 parts, else on the vector units where ``vector``; or None."""
    if not amx_matmul.supported(m.n, m.k):
        return None
    units = "tiles" if tiles and m.x_dtype in amx_matmul.EXACT_DTYPES and m.w_dtype in amx_matmul.EXACT_DTYPES \
        else "vector" if vector else None
    if units is None:
        return None
    if m.kind == "float":
        bits, block = exact_matmul.FLOAT_BITS.get(m.w_dtype), ""
    elif m.kind == "group":
        bits, block = m.scheme.bits, ""
    else:
        bits, block = 0, m.block
    if bits is None or (m.kind == "group" and bits not in (4, 8)) or (m.kind == "blocks" and block not in amx_matmul.BLOCK_TYPES):
        return None
    args = (m.n, m.k, bits, m.x_dtype, m.out_dtype, m.w_dtype, block)
    name = f"{'amx' if units == 'tiles' else 'vector'}_exact_matmul_{block.lower() or bits}_{m.key()}"
    return name, lambda: amx_matmul.amx_matmul(*args, exact=True, units=units), True


def select_exact_amx_prefill(spec: TargetSpec) -> tvm.transform.Pass:
    """Module pass: the prefill's exact matmuls become the exact tile kernel (AMX targets, fp16
    operands) or the exact vector kernel (other AVX-512 targets and operands)."""

    @tvm.transform.module_pass(opt_level=0, name="SelectExactAMXPrefill")
    def _run(mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        tiles, vector = has_amx(spec), has_vector_units(spec)
        if not (tiles or vector):
            return mod
        return rewrite_matmuls(mod, PREFILL_FUNCTION, lambda m: _exact_kernel(m, tiles, vector))

    return _run
