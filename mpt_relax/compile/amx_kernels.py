"""Put the prefill matmuls of an ``amx_prefill`` scheme on the AMX tile units where the target has them.

The model (:mod:`mpt_relax.quantization.group`) emits each prefill projection as one exact
dequantize + matmul PrimFunc tagged :data:`~mpt_relax.kernels.cpu.amx_matmul.KERNEL_ATTR`. On an
llvm target with AMX-BF16 this pass replaces it with the bf16 tile kernel; anywhere else the
exact kernel stays (fused with its epilogues and scheduled like any matmul), so a portable
``--mcpu x86-64-v3`` build or a GPU build computes exactly.
"""

from __future__ import annotations

import tvm

from mpt_relax.compile.targets import TargetSpec
from mpt_relax.kernels.cpu import amx_matmul
from mpt_relax.kernels.cpu.base import cpu_has


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
