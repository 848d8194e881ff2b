"""CUDA kernels compiled at build time, so that a GPU machine needs no CUDA compiler.

TVM 0.27 stores the CUDA *source* in an exported library and compiles it when the library is
loaded (through the ``tvm_callback_cuda_compile`` hook: NVRTC from the ``cuda-bindings``
package, or nvcc), which a bare GPU box or a container usually lacks, and which costs seconds
at every load. :func:`precompile` compiles each CUDA source module of an executable here, with
nvcc, into a fatbin named by the source's SHA-256 in ``<artifact>/cuda-kernels/``; the runtime
(:func:`mpt_relax.runtime.tvm_backends.use_precompiled_cuda`) answers the hook from there.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import tvm

from mpt_relax.runtime.tvm_backends import KERNEL_DIR, kernel_file_name


def cuda_sources(module: tvm.runtime.Module) -> list[str]:
    """The CUDA source of every CUDA module imported (directly or not) by ``module``."""
    found, stack = [], [module]
    while stack:
        mod = stack.pop()
        if mod.kind == "cuda":
            source = mod.inspect_source("")
            if source:
                found.append(source)
        stack.extend(mod.imports)
    return found


def nvcc_available() -> bool:
    try:
        from tvm.support.nvcc import find_cuda_path

        return shutil.which("nvcc") is not None or Path(find_cuda_path(), "bin", "nvcc").is_file()
    except (RuntimeError, OSError):
        return False


def precompile(executable, target: tvm.target.Target, out_dir: Path) -> list[str]:
    """Compile the executable's CUDA sources for ``target``'s arch into ``out_dir/cuda-kernels``;
    returns the files written ([] when nvcc is missing: the library then compiles at load)."""
    from tvm.support import nvcc

    if not nvcc_available():
        return []
    kernel_dir = out_dir / KERNEL_DIR
    kernel_dir.mkdir(exist_ok=True)
    written = []
    for source in cuda_sources(executable.mod):
        name = kernel_file_name(source)
        with target:
            binary = nvcc.compile_cuda(source, target_format="fatbin", arch=str(target.attrs["arch"]), compiler="nvcc")
        (kernel_dir / name).write_bytes(bytes(binary))
        written.append(f"{KERNEL_DIR}/{name}")
    return written
