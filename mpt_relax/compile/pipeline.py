"""Target -> Relax pass pipeline -> dlight schedules -> compiled executable.

Every target shares one pipeline; a target differs only in its schedule list and its
export step (see :class:`TargetSpec`).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import platform
import re
from typing import Callable

import tvm
from tvm import relax
from tvm.s_tir import dlight as dl

from mpt_relax.kernels.cpu import default_rules
from mpt_relax.quantization import fuse_dequantize_matmul
from mpt_relax.errors import MPTRelaxError


class TargetError(MPTRelaxError):
    """A target that this TVM build cannot compile for; the message says what to use instead."""


@dataclasses.dataclass(frozen=True)
class TargetSpec:
    """How one kind of device is compiled for: its TVM target, schedules and library suffix."""

    name: str  # llvm | cuda | metal | vulkan
    target: tvm.target.Target
    schedules: Callable[[], list]  # dlight rules, tried in order on each unscheduled PrimFunc
    suffix: str  # file suffix of the exported library


def _cpu_schedules() -> list:
    return default_rules()


class _SimtMatmul(dl.gpu.Matmul):
    """dlight's GPU Matmul rule without its tensor-core branch.

    In TVM 0.27 that branch (taken for CUDA sm_70+) first imports ``tvm.s_tir.tensor_intrin``
    (40-120 s of start-up) and then segfaults inside Tensorize on our fp16 NT matmuls. The
    rule picks it only from the target's ``arch``, so it sees the target without one.
    """

    def apply(self, func, target, tunable):
        if target.kind.name == "cuda" and "arch" in target.attrs:
            target = _without_arch(str(target))
        return super().apply(func, target, tunable)


@functools.lru_cache(maxsize=None)
def _without_arch(target_json: str) -> tvm.target.Target:
    config = json.loads(target_json)
    config.pop("arch")
    return tvm.target.Target(config)


def _gpu_schedules(with_matmul: bool = True) -> list:
    rules = [_SimtMatmul()] if with_matmul else []
    return rules + [dl.gpu.GEMV(), dl.gpu.Reduction(), dl.gpu.GeneralReduction(),
                    dl.gpu.Fallback()]


def host_cpu(mcpu: str | None = None) -> str:
    """The LLVM CPU name to compile host code for: ``mcpu`` (e.g. ``x86-64-v3``, ``znver4``,
    ``apple-m1``) or, for None / ``"native"``, the build machine's own CPU."""
    if mcpu in (None, "native"):
        return tvm.target.codegen.llvm_get_system_cpu()
    if not tvm.target.codegen.llvm_is_valid_cpu(mcpu, tvm.target.codegen.llvm_get_system_triple()):
        raise TargetError(f"--mcpu {mcpu!r} is not a CPU LLVM knows for this machine; use 'native' or a name such as "
                          "x86-64-v3, x86-64-v4, skylake-avx512, znver4")
    return mcpu


# LLVM feature names that are instruction sets (the rest are tuning hints, harmless to lack)
_ISA_FEATURE = re.compile(r"^(avx|sse|ssse|fma|f16c|bmi|amx|popcnt|lzcnt|movbe|sha|aes|vaes|pclmul|vpclmul|gfni|adx|"
                          r"neon|sve|fp-armv8|fullfp16|fp16fml|dotprod|i8mm|bf16|crypto)")


def _features(mcpu: str) -> set[str]:
    return set(tvm.target.codegen.llvm_get_cpu_features(tvm.target.Target({"kind": "llvm", "mcpu": mcpu})))


def missing_isa_features(mcpu: str) -> list[str]:
    """Instruction-set features code built for ``mcpu`` may use that this machine's CPU lacks."""
    return sorted(f for f in _features(mcpu) - _features(host_cpu()) if _ISA_FEATURE.match(f))


def llvm_target(mcpu: str | None = None) -> TargetSpec:
    """The host CPU; ``mcpu`` defaults to the build machine's own CPU (fp16 needs it: without
    an mcpu LLVM emulates half precision in software). The library runs only on CPUs with
    every instruction-set feature of ``mcpu``: pick an older one to deploy elsewhere."""
    host = {"kind": "llvm", "mcpu": host_cpu(mcpu)}
    return TargetSpec("llvm", tvm.target.Target(host), _cpu_schedules, ".so")


def local_cuda_arch() -> str | None:
    """``sm_XY`` of GPU 0 if a CUDA device is present, else None."""
    dev = tvm.cuda(0)
    return "sm_" + dev.compute_version.replace(".", "") if dev.exist else None


def cuda_target(arch: str | None = None, mcpu: str | None = None) -> TargetSpec:
    """CUDA for ``arch`` (default: the local GPU's, else sm_80); nvcc builds it without a GPU.
    ``mcpu``: the CPU of the host code, as for :func:`llvm_target`."""
    arch = arch or local_cuda_arch() or "sm_80"
    if not arch.startswith("sm_") or not arch[3:].isdigit():
        raise TargetError(f"--cuda-arch must look like sm_80 or sm_90, got {arch!r}")
    cuda = {"kind": "cuda", "arch": arch, "max_shared_memory_per_block": 49152, "max_threads_per_block": 1024,
            "thread_warp_size": 32}
    host = {"kind": "llvm", "mcpu": host_cpu(mcpu)}
    return TargetSpec("cuda", tvm.target.Target(cuda, host=host), _gpu_schedules, ".so")


def metal_target() -> TargetSpec:
    """Apple GPUs. On macOS a .dylib; elsewhere a .tar of arm64 objects + Metal shaders to link
    on the Mac. dlight's gpu.Matmul rule crashes in tensorize for Metal, so it is left out."""
    on_mac = platform.system() == "Darwin"
    host = {"kind": "llvm"} if on_mac else {"kind": "llvm", "mtriple": "arm64-apple-macos"}
    metal = {"kind": "metal", "max_threads_per_block": 256, "thread_warp_size": 32, "max_shared_memory_per_block": 32768}
    return TargetSpec("metal", tvm.target.Target(metal, host=host), lambda: _gpu_schedules(with_matmul=False),
                      ".dylib" if on_mac else ".tar")


def vulkan_target() -> TargetSpec:
    """Vulkan, where the installed TVM has SPIR-V codegen; the PyPI wheel does not."""
    if tvm.get_global_func("target.build.vulkan", allow_missing=True) is None:
        raise TargetError(
            "this TVM build has no Vulkan codegen (target.build.vulkan is not registered; the PyPI apache-tvm wheel "
            "is built without it): build TVM from source with USE_VULKAN=ON and USE_SPIRV=ON to compile for vulkan"
        )
    vulkan = {"kind": "vulkan", "max_threads_per_block": 256, "thread_warp_size": 1,
              "supports_float16": True, "supports_int64": True}
    return TargetSpec("vulkan", tvm.target.Target(vulkan, host={"kind": "llvm"}), _gpu_schedules, ".so")


def auto_target() -> str:
    """What this machine can run: a CUDA GPU, else Metal on macOS, else the CPU."""
    if tvm.cuda(0).exist:
        return "cuda"
    if platform.system() == "Darwin" and tvm.metal(0).exist:
        return "metal"
    return "llvm"


TARGETS = ("auto", "cuda", "metal", "vulkan", "llvm")


def resolve_target(name: str, *, cuda_arch: str | None = None, mcpu: str | None = None) -> TargetSpec:
    """A TargetSpec by name (``auto`` picks :func:`auto_target`); raises :class:`TargetError`.
    ``mcpu`` applies to the CPU code of the llvm and cuda targets."""
    name = auto_target() if name == "auto" else name
    makers = {"llvm": lambda: llvm_target(mcpu), "cpu": lambda: llvm_target(mcpu),
              "cuda": lambda: cuda_target(cuda_arch, mcpu),
              "metal": metal_target, "vulkan": vulkan_target}
    if name not in makers:
        raise TargetError(f"unknown target {name!r}; choose from: {', '.join(TARGETS)}")
    return makers[name]()


def pipeline(spec: TargetSpec) -> tvm.transform.Pass:
    """Legalize, fuse, schedule with dlight, plan memory and lower for the VM."""
    passes = [
        relax.transform.DecomposeOpsForInference(),
        fuse_dequantize_matmul(),  # x @ W^T (and dequantize) as one kernel: no weight transposes at run time
        relax.transform.LegalizeOps(),
        relax.transform.AnnotateTIROpPattern(),
        relax.transform.FoldConstant(),
        relax.transform.FuseOps(),
        relax.transform.FuseTIR(),
        relax.transform.DeadCodeElimination(),
        dl.ApplyDefaultSchedule(*spec.schedules()),
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


def compile_module(mod: tvm.IRModule, spec: TargetSpec) -> relax.VMExecutable:
    """Compile an exported model IRModule for one target."""
    return tvm.compile(mod, spec.target, relax_pipeline=pipeline(spec))
