"""Build recipes, one per row of :data:`mpt_relax.targets.TARGET_TABLE`: the TVM target, the
schedule rules and the library suffix of each kind of hardware.

Every target shares one pass pipeline (:mod:`.pipeline`); a target differs only in its schedule
list, its attention kernels (chosen from the target's kind when the KV cache is dispatched) and
its export step.
"""

from __future__ import annotations

import dataclasses
import platform
import re
from typing import Callable

import tvm

from mpt_relax.errors import MPTRelaxError
from mpt_relax.kernels.cpu import default_rules
from mpt_relax.kernels.gpu_rules import gpu_rules
from mpt_relax.targets import BY_TARGET, TARGET_NAMES


class TargetError(MPTRelaxError):
    """A target that this TVM build cannot compile for; the message says what to use instead."""


@dataclasses.dataclass(frozen=True)
class TargetSpec:
    """How one kind of device is compiled for: its TVM target, schedules and library suffix."""

    name: str  # llvm | cuda | metal | vulkan
    target: tvm.target.Target
    schedules: Callable[[], list]  # dlight rules, tried in order on each unscheduled PrimFunc
    suffix: str  # file suffix of the exported library
    mcpu: str | None = None  # the CPU its host code is compiled for (llvm and cuda)

    @property
    def isa_features(self) -> list[str]:
        """Instruction sets the library's CPU code may use (recorded in the artifact)."""
        return isa_features(self.mcpu) if self.mcpu else []


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


def isa_features(mcpu: str) -> list[str]:
    """The instruction-set features (LLVM names) code compiled for ``mcpu`` may use."""
    features = tvm.target.codegen.llvm_get_cpu_features(tvm.target.Target({"kind": "llvm", "mcpu": mcpu}))
    return sorted(f for f in features if _ISA_FEATURE.match(f))


def missing_isa_features(mcpu: str) -> list[str]:
    """Instruction-set features code built for ``mcpu`` may use that this machine's CPU lacks."""
    return sorted(set(isa_features(mcpu)) - set(isa_features(host_cpu())))


def llvm_target(mcpu: str | None = None) -> TargetSpec:
    """The host CPU; ``mcpu`` defaults to the build machine's own CPU (fp16 needs it: without
    an mcpu LLVM emulates half precision in software). The library runs only on CPUs with
    every instruction-set feature of ``mcpu``: pick an older one to deploy elsewhere."""
    cpu = host_cpu(mcpu)
    return TargetSpec("llvm", tvm.target.Target({"kind": "llvm", "mcpu": cpu}), default_rules, ".so", cpu)


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
    cpu = host_cpu(mcpu)
    return TargetSpec("cuda", tvm.target.Target(cuda, host={"kind": "llvm", "mcpu": cpu}), gpu_rules, ".so", cpu)


def metal_target() -> TargetSpec:
    """Apple GPUs. On macOS a .dylib; elsewhere a .tar of arm64 objects + Metal shaders to link
    on the Mac. dlight's gpu.Matmul rule crashes in tensorize for Metal, so it is left out."""
    on_mac = platform.system() == "Darwin"
    host = {"kind": "llvm"} if on_mac else {"kind": "llvm", "mtriple": "arm64-apple-macos"}
    metal = {"kind": "metal", "max_threads_per_block": 256, "thread_warp_size": 32, "max_shared_memory_per_block": 32768}
    return TargetSpec("metal", tvm.target.Target(metal, host=host), lambda: gpu_rules(with_matmul=False),
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
    return TargetSpec("vulkan", tvm.target.Target(vulkan, host={"kind": "llvm"}), gpu_rules, ".so")


def auto_target() -> str:
    """What this machine can run: a CUDA GPU, else Metal on macOS, else the CPU."""
    if tvm.cuda(0).exist:
        return "cuda"
    if platform.system() == "Darwin" and tvm.metal(0).exist:
        return "metal"
    return "llvm"


RECIPES: dict[str, Callable[[str | None, str | None], TargetSpec]] = {
    "llvm": lambda cuda_arch, mcpu: llvm_target(mcpu),
    "cuda": cuda_target,
    "metal": lambda cuda_arch, mcpu: metal_target(),
    "vulkan": lambda cuda_arch, mcpu: vulkan_target(),
}
assert set(RECIPES) == set(BY_TARGET), "every row of mpt_relax.targets.TARGET_TABLE needs a recipe"


def resolve_target(name: str, *, cuda_arch: str | None = None, mcpu: str | None = None) -> TargetSpec:
    """A TargetSpec by name (``auto`` picks :func:`auto_target`, ``cpu`` means llvm); raises
    :class:`TargetError`. ``mcpu`` applies to the CPU code of the llvm and cuda targets."""
    name = {"auto": auto_target(), "cpu": "llvm"}.get(name, name)
    if name not in RECIPES:
        raise TargetError(f"unknown target {name!r}; choose from: {', '.join(TARGET_NAMES)}")
    return RECIPES[name](cuda_arch, mcpu)
