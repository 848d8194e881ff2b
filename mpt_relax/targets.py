"""The one table of what mpt_relax compiles for and runs on.

Each row pairs a build target (the ``--target`` name, TVM's target kind) with the runtime device
that runs its library and the device HF torch uses for the same hardware in benchmarks. The
compiler side (:mod:`mpt_relax.compile.targets`) keeps one recipe per row; the runtime reads this
table alone, so a serving process never imports the compiler. Adding a target is a row here and
a recipe there (a test checks that every row has one).
"""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class TargetInfo:
    """One kind of hardware: ``name`` is the build target, ``device`` the runtime device."""

    name: str  # llvm | cuda | metal | vulkan
    device: str  # cpu | cuda | metal | vulkan (tvm.runtime.device name)
    hf_device: str | None  # torch's name for the same hardware, None where torch has none
    gpu: bool


TARGET_TABLE: tuple[TargetInfo, ...] = (
    TargetInfo("llvm", "cpu", "cpu", gpu=False),
    TargetInfo("cuda", "cuda", "cuda", gpu=True),
    TargetInfo("metal", "metal", "mps", gpu=True),
    TargetInfo("vulkan", "vulkan", None, gpu=True),
)
BY_TARGET = {t.name: t for t in TARGET_TABLE}
BY_DEVICE = {t.device: t for t in TARGET_TABLE}
TARGET_NAMES = ("auto", *BY_TARGET)  # --target choices; auto: cuda if present, else metal on macOS, else llvm
DEVICE_NAMES = ("auto", *BY_DEVICE)  # --device choices; auto: the first GPU present that was built for, else cpu
AUTO_DEVICE_ORDER = ("cuda", "metal")
