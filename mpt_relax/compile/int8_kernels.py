"""Choose, per target, the kernel behind each int8-activation GEMV the model emitted.

The model (:mod:`mpt_relax.quantization.group`, schemes built with ``int8_activations``) emits
the portable ``generic`` kernel of :mod:`mpt_relax.kernels.cpu.int8_gemv`; this pass replaces
it with the fastest one the target's instruction sets allow: AVX512-VNNI (512-bit
``vpdpbusd``), else AVX-VNNI (256-bit), else the generic integer loops, which give the same
numbers more slowly (e.g. ``--mcpu x86-64-v3``). GGUF Q6_K, Q4_K and Q5_K weights
(:mod:`mpt_relax.kernels.cpu.q6k_int8_gemv`, :mod:`mpt_relax.kernels.cpu.q4k_q5k_gemv`) have an
AVX512-VNNI kernel and the generic one, prefetching 64 KiB ahead as the float GEMV does, but
:data:`ZEN_BLOCK_PREFETCH_BYTES` on AMD Zen (one Zen 4 core streamed the Q6_K head from DRAM at
16.4 GB/s with 64 KiB, 18.3-19.7 with 16 KiB, 20.2-21.2 with 8 KiB); the q8 GEMV prefetches
nothing there (:data:`ZEN_Q8_PREFETCH_BYTES`). A prefill's GEMV (``int8_prefill`` schemes)
becomes the GEMM of :mod:`mpt_relax.kernels.cpu.int8_matmul` on AVX512-VNNI. The kernels are CPU code: a GPU target is
refused with one line.
"""

from __future__ import annotations

import tvm

from mpt_relax.compile.targets import TargetError, TargetSpec
from mpt_relax.kernels.cpu import float_gemv, int8_gemv, int8_matmul
from mpt_relax.kernels.cpu.base import cpu_has
from mpt_relax.quantization import Quantization
from mpt_relax.quantization.gguf_scheme import INT8_GEMVS

# how far ahead the K-quant kernels prefetch on AMD Zen (gguf Q4_K_M decode, alternated with 16 KiB:
# 173 -> 180 tokens/s at one thread, 250 -> 273 at two)
ZEN_BLOCK_PREFETCH_BYTES = 8192
# the q8 int8 GEMV on AMD Zen leaves the weights to the hardware prefetchers (one Zen 4 core from DRAM,
# 3072x768 and 768x3072: 23.8-24.8 GB/s so, 20.5-21.3 prefetching 16 KiB ahead into L2); q4 keeps its
# prefetches (17-19 GB/s without, 24-25 with)
ZEN_Q8_PREFETCH_BYTES = 0


def check_targets(q: Quantization, specs: list[TargetSpec]) -> None:
    """Raise TargetError if ``q`` decodes on int8 activations and a target is not the CPU."""
    gpus = [s.name for s in specs if s.name != "llvm"]
    if (q.int8_activations or q.int8_prefill) and gpus:
        raise TargetError(f"int8 activations ({q.tag}) are CPU kernels; build {', '.join(gpus)} without "
                          "--int8-activations / --int8-prefill (or target llvm only)")


def best_isa(target: tvm.target.Target) -> str:
    """The int8 GEMV kernel for ``target``: avx512vnni, avxvnni or generic."""
    if cpu_has(target, ["avx512vnni", "avx512bw"]):
        return "avx512vnni"
    if cpu_has(target, ["avxvnni"]):
        return "avxvnni"
    return "generic"


def select_int8_kernels(spec: TargetSpec) -> tvm.transform.Pass:
    """Module pass: every int8 GEMV gets :func:`best_isa`'s kernel for ``spec``'s target."""

    @tvm.transform.module_pass(opt_level=0, name="SelectInt8Kernels")
    def _run(mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        isa = None
        distance = float_gemv.prefetch_bytes(spec.target, zen=ZEN_BLOCK_PREFETCH_BYTES)  # the K-quant kernels
        q8_distance = float_gemv.prefetch_bytes(spec.target, ZEN_Q8_PREFETCH_BYTES, int8_gemv.PREFETCH_BYTES)
        for gvar, func in list(mod.functions.items()):
            attrs = func.attrs if func.attrs is not None else {}
            key = next((k for k in (int8_gemv.KERNEL_ATTR, int8_gemv.BLOCK_KERNEL_ATTR) if attrs.get(k) is not None), None)
            if key is None:
                continue
            if spec.name != "llvm":
                raise TargetError(f"{gvar.name_hint} is an int8-activation CPU kernel; target {spec.name} cannot run it "
                                  "(build without --int8-activations / --int8-prefill)")
            isa = isa or best_isa(spec.target)
            info = attrs[key]
            if key == int8_gemv.BLOCK_KERNEL_ATTR:
                make = INT8_GEMVS[str(info["block"])]
                kernel = make(int(info["out"]), int(info["in"]), str(info["out_dtype"]),
                              isa if isa in int8_gemv.BLOCK_ISAS else "generic", distance)
            else:
                shape = (int(info["out"]), int(info["in"]), int(info["bits"]), str(info["out_dtype"]),
                         str(info["scale_dtype"]))
                if bool(info["prefill"]) and isa == "avx512vnni" and int8_matmul.supported(*shape[:2]):
                    kernel = int8_matmul.int8_matmul(*shape)
                else:
                    kernel = int8_gemv.int8_gemv(*shape, isa, bool(info["prefill"]),
                                                 q8_distance if shape[2] == 8 else int8_gemv.PREFETCH_BYTES)
            for name, value in func.attrs.items():
                if name != key:
                    kernel = kernel.with_attr(name, value)
            mod[gvar] = kernel
        return mod

    return _run
