"""The Relax pass pipeline every target shares: legalize, fuse, schedule, lower for the VM.

A target differs only in its schedule list and export step (:mod:`.targets`).
"""

from __future__ import annotations


import tvm
from tvm import relax
from tvm.s_tir import dlight as dl

from mpt_relax.compile.kv_cache import DEFAULT_PAGE_SIZE, dispatch_kv_cache
from mpt_relax.compile import vulkan as vulkan_config
from mpt_relax.compile.amx_kernels import select_amx_kernels, select_exact_amx_prefill
from mpt_relax.compile.cpu_math import vectorized_gelu
from mpt_relax.compile.decode_gemv import select_decode_gemv
from mpt_relax.compile.int8_kernels import select_int8_kernels
from mpt_relax.compile.targets import TargetSpec
from mpt_relax.quantization import fuse_dequantize_matmul


def pipeline(spec: TargetSpec, page_size: int = DEFAULT_PAGE_SIZE) -> tvm.transform.Pass:
    """Give the KV cache this target's kernels (``page_size`` tokens per page), then legalize,
    fuse, schedule with dlight, plan memory and lower for the VM."""
    passes = [
        dispatch_kv_cache(spec.target, page_size),
        select_int8_kernels(spec),  # int8-activation GEMVs: the target's VNNI kernel (CPU only)
        select_amx_kernels(spec),  # amx_prefill schemes: bf16 tile matmuls where the CPU has AMX (else exact on AVX-512)
        relax.transform.DecomposeOpsForInference(),
        vectorized_gelu(spec.name),  # llvm: a polynomial erf instead of one libm call per element
        fuse_dequantize_matmul(),  # x @ W^T (and dequantize) as one kernel: no weight transposes at run time
        select_decode_gemv(spec),  # llvm: decode GEMVs (float, exact q4/q8) stream with prefetches
        select_exact_amx_prefill(spec),  # the prefill's exact matmuls on the AMX tiles or AVX-512 register tiles
        relax.transform.LegalizeOps(),
        relax.transform.AnnotateTIROpPattern(),
        relax.transform.FoldConstant(),
        relax.transform.FuseOps(),
        relax.transform.FuseTIR(),
        relax.transform.DeadCodeElimination(),
        dl.ApplyDefaultSchedule(*spec.schedules()),
        *vulkan_config.index_passes(spec.name),  # vulkan: int32 thread indices (see compile/vulkan.py)
        relax.transform.RewriteDataflowReshape(),
        relax.transform.ToNonDataflow(),
        relax.transform.RemovePurityChecking(),
        relax.transform.CallTIRRewrite(),
        relax.transform.StaticPlanBlockMemory(),
        relax.transform.LowerAllocTensor(),
        relax.transform.KillAfterLastUse(),
        relax.transform.LowerRuntimeBuiltin(),
        relax.transform.ComputePrimValue(),
        relax.transform.VMShapeLower(),
        relax.transform.AttachGlobalSymbol(),
    ]

    @tvm.transform.module_pass(opt_level=0, name="mpt_relax_pipeline")
    def _run(mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        with spec.target:
            return tvm.transform.Sequential(passes)(mod)

    return _run


def compile_module(mod: tvm.IRModule, spec: TargetSpec, page_size: int = DEFAULT_PAGE_SIZE) -> relax.VMExecutable:
    """Compile an exported (target-free) model IRModule for one target."""
    return tvm.compile(mod, spec.target, relax_pipeline=pipeline(spec, page_size))
