"""TVM names that differ between the TVM builds mpt_relax runs on.

The dependency is the PyPI wheel ``apache-tvm==0.27.0.post1``. TVM built from the main branch
of 2026-08 (how one gets Vulkan, see the README) spells a few names differently; everything
here is the one place that knows both spellings, so the rest of the package imports one name:

    ==========================  ==============================  ==============================
    name here                   PyPI 0.27.0.post1               TVM main (0.27.dev35)
    ==========================  ==============================  ==============================
    ``arith``                   ``tvm.sym``                     ``tvm.arith``
    ``BufferLoadType``          ``tvm.ir.TensorLoad``           ``tvm.tirx.BufferLoad`` (class)
    ``string_imm(s)``           ``tvm.ir.StringImm``            ``tvm.relax.StringImm``
    ==========================  ==============================  ==============================

``BufferLoadType`` is for ``isinstance`` checks only: in 0.27.0 ``tirx.BufferLoad`` is a
constructor function, not the class.
"""

from __future__ import annotations

import tvm

try:  # PyPI 0.27.0: the analyzer module was renamed to tvm.sym
    from tvm import sym as arith
except ImportError:  # TVM main of 2026-08 and older
    from tvm import arith  # type: ignore[no-redef]

BufferLoadType = getattr(tvm.ir, "TensorLoad", None)
if BufferLoadType is None:
    from tvm.tirx import BufferLoad as BufferLoadType  # type: ignore[no-redef]


def string_imm(value: str):
    """A string literal usable inside a Relax expression (e.g. a ``relax.Tuple`` field)."""
    cls = getattr(tvm.ir, "StringImm", None)
    if cls is None:
        from tvm import relax

        cls = relax.StringImm
    return cls(value)


def has_vulkan_codegen() -> bool:
    """Whether this TVM build can compile SPIR-V (built with ``USE_VULKAN=ON``); the PyPI wheel cannot."""
    return tvm.get_global_func("target.build.vulkan", allow_missing=True) is not None


def has_vulkan_runtime() -> bool:
    """Whether this TVM build can run Vulkan kernels (its runtime has the Vulkan device API)."""
    return bool(tvm.runtime.enabled("vulkan"))


__all__ = ["BufferLoadType", "arith", "has_vulkan_codegen", "has_vulkan_runtime", "string_imm"]
