"""TVM's per-device runtime libraries when TVM runs without its compiler.

A full TVM loads ``libtvm_runtime_cuda.so`` (and its siblings) at import. With
``TVM_USE_RUNTIME_LIB=1``, or a TVM whose ``libtvm_compiler.so`` is absent, TVM skips that
step: ``tvm.cuda(0).exist`` is then False and a CUDA library cannot be loaded, on a machine
with a GPU. :func:`ensure_device_runtime` loads the one a device needs, once.

TVM also compiles a CUDA library's kernels from source when it is loaded; an artifact built
with nvcc carries them compiled (:func:`use_precompiled_cuda`), so the GPU machine needs no
CUDA compiler.
"""

from __future__ import annotations

import ctypes
import hashlib
from pathlib import Path

import tvm_ffi
from tvm import base

_LIBRARIES = {"cuda": "tvm_runtime_cuda", "rocm": "tvm_runtime_rocm", "metal": "tvm_runtime_metal",
              "vulkan": "tvm_runtime_vulkan", "opencl": "tvm_runtime_opencl"}
_FAILED: dict[str, str] = {}


def _library_dir() -> Path:
    return Path(base._LOADED_LIBS["tvm_runtime"]._name).resolve().parent


def ensure_device_runtime(device: str) -> str | None:
    """Load TVM's runtime library for ``device`` unless TVM has (or it does not exist: then the
    device is built into libtvm_runtime or not in this TVM). Returns why loading failed (e.g.
    no GPU driver: ``libcuda.so.1`` missing), else None."""
    name = _LIBRARIES.get(device)
    if name is None or name in base._LOADED_LIBS:
        return None
    if name in _FAILED:
        return _FAILED[name]
    matches = sorted(_library_dir().glob(f"lib{name}.*"))
    if not matches:
        return None
    try:
        base._LOADED_LIBS[name] = ctypes.CDLL(str(matches[0]), mode=ctypes.RTLD_LOCAL)  # registers on load
    except OSError as err:
        _FAILED[name] = str(err)
        return _FAILED[name]
    return None


# ---------------------------------------------------------------------------- precompiled CUDA

KERNEL_DIR = "cuda-kernels"  # <artifact>/cuda-kernels/<sha256 of the CUDA source>.fatbin (compile/cuda_kernels.py)
_KERNEL_DIRS: list[Path] = []
_FALLBACK = []  # TVM's own hook (NVRTC / nvcc at load time), for sources built elsewhere


def kernel_file_name(source: str) -> str:
    """The file a CUDA source's compiled kernels are stored under."""
    return f"{hashlib.sha256(source.encode()).hexdigest()}.fatbin"


def _compile_hook(code, *rest):
    name = kernel_file_name(code if isinstance(code, str) else bytes(code).decode())
    for kernel_dir in _KERNEL_DIRS:
        if (kernel_dir / name).is_file():
            return (kernel_dir / name).read_bytes()
    if _FALLBACK and _FALLBACK[0] is not None:
        return _FALLBACK[0](code, *rest)
    raise RuntimeError("no precompiled CUDA kernels for this library and no CUDA compiler hook; rebuild the artifact "
                       "on a machine with nvcc")


def use_precompiled_cuda(artifact_dir: Path) -> bool:
    """Answer TVM's load-time CUDA compile hook from ``artifact_dir/cuda-kernels`` (if it exists);
    other sources still go to TVM's own hook. Returns whether the directory was found."""
    kernel_dir = Path(artifact_dir) / KERNEL_DIR
    if not kernel_dir.is_dir():
        return False
    if not _FALLBACK:
        _FALLBACK.append(tvm_ffi.get_global_func("tvm_callback_cuda_compile", allow_missing=True))
        tvm_ffi.register_global_func("tvm_callback_cuda_compile", _compile_hook, override=True)
    if kernel_dir.resolve() not in _KERNEL_DIRS:
        _KERNEL_DIRS.insert(0, kernel_dir.resolve())
    return True
