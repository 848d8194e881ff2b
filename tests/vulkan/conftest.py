"""The Vulkan lane: tests that build for ``target="vulkan"`` and run on a Vulkan device.

They need a TVM built with USE_VULKAN=ON (the PyPI wheel has no SPIR-V codegen) and a Vulkan
device (CI: Mesa's lavapipe, a software Vulkan device on the CPU). Where either is missing every
test here is skipped with that reason; where both are present they run and a failure fails.
``MPT_RELAX_REQUIRE_VULKAN=1`` (set by the lane in .ci/run) turns the skip into a failure, so the
lane cannot pass by running nothing.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import tvm

import mpt_relax
from mpt_relax.compat import has_vulkan_codegen, has_vulkan_runtime


def unavailable_reason() -> str | None:
    """Why the Vulkan tests cannot run here, or None."""
    if not has_vulkan_codegen():
        return (f"TVM {tvm.__version__} has no Vulkan codegen (the PyPI wheel is built without it; "
                "the lane needs a TVM built with USE_VULKAN=ON)")
    if not has_vulkan_runtime():
        return f"TVM {tvm.__version__} has no Vulkan runtime"
    if not tvm.vulkan(0).exist:
        return "no Vulkan device (for a software one: apt-get install libvulkan1 mesa-vulkan-drivers)"
    return None


@pytest.fixture(scope="session", autouse=True)
def vulkan_device():
    """The Vulkan device the lane runs on (first fixture of every test here: skips or fails early)."""
    reason = unavailable_reason()
    if reason is not None:
        if os.environ.get("MPT_RELAX_REQUIRE_VULKAN") == "1":
            pytest.fail(f"MPT_RELAX_REQUIRE_VULKAN=1 but {reason}", pytrace=False)
        pytest.skip(reason)
    dev = tvm.vulkan(0)
    print(f"\nVulkan device: {dev.device_name}")
    return dev


@pytest.fixture(scope="session")
def vulkan_engine(tmp_path_factory, vulkan_device):
    """vulkan_engine(checkpoint_dir, quantization="q0f32", **build_kw) -> Engine on the Vulkan
    device; each (checkpoint, quantization, options) is compiled once per session."""
    built: dict[tuple, Path] = {}

    def make(ckpt: Path, quantization: str = "q0f32", **kw) -> mpt_relax.Engine:
        key = (str(ckpt), quantization, tuple(sorted(kw.items())))
        if key not in built:
            out = tmp_path_factory.mktemp(f"vk-{ckpt.name}-{quantization}")
            built[key] = mpt_relax.build(ckpt, target="vulkan", quantization=quantization, output=out / "art",
                                         quiet=True, **kw)
        return mpt_relax.Engine(built[key], device="vulkan")

    return make
