"""The Vulkan target: device features and limits, read from the device when one is present.

SPIR-V code generation needs to know what the device supports: fp16 weights and KV pages need
16-bit storage buffers, int8 codes need 8-bit storage buffers and int8 arithmetic. Where a
Vulkan device is present at build time its features and limits are read from it
(``{"kind": "vulkan", "from_device": 0}``); where none is (a build machine without a GPU), the
library is compiled for :data:`DEFAULT_ATTRS`, a baseline that current desktop and mobile GPUs
(NVIDIA, AMD, Intel, Apple through MoltenVK, Adreno, Mali) and Mesa's lavapipe all meet.

Either way the workgroup size and workgroup (shared) memory are capped at :data:`LIMITS` or
the device's own limit, whichever is lower: the dlight schedules and the attention kernels
size their tiles from these attributes.
"""

from __future__ import annotations

import tvm

from mpt_relax.compat import has_vulkan_runtime
from mpt_relax.errors import MPTRelaxError

# The Vulkan spec's minima are lower (128 invocations, 16 KiB of shared memory); for a device
# below these, build where it is present (its limits are then read from it).
LIMITS = {
    "max_threads_per_block": 256,
    "max_num_threads": 256,
    "max_shared_memory_per_block": 32768,
}
DEFAULT_ATTRS = {
    "supports_float16": True,  # fp16 arithmetic (q0f16, the f16 scales of q4f16_1 / q8f16_1)
    "supports_16bit_buffer": True,  # fp16 tensors in storage buffers (StorageBuffer16BitAccess)
    "supports_8bit_buffer": True,  # int8 / uint8 tensors in storage buffers (StorageBuffer8BitAccess)
    "supports_int8": True,
    "supports_int16": True,
    "supports_int64": True,
    "supports_storage_buffer_storage_class": True,
    "thread_warp_size": 1,  # no subgroup (warp) shuffles: reductions go through shared memory
    **LIMITS,
}
# without these the SPIR-V codegen refuses the module (fp16 models, quantized weights)
REQUIRED = ("supports_float16", "supports_16bit_buffer", "supports_8bit_buffer", "supports_int8")
# queried attributes that describe the device rather than what code may use
_NOT_TARGET_ATTRS = ("tag", "keys", "kind")


class VulkanDeviceError(MPTRelaxError):
    """The Vulkan device lacks a feature the compiled kernels need."""


def index_passes(target_name: str) -> list:
    """TIR passes the vulkan target needs after scheduling: every index narrowed to int32.

    Relax legalizes shapes as int64, so dlight's schedules bind int64 thread indices; the SPIR-V
    for a cross-thread (shared-memory tree) reduction over an int64 ``threadIdx`` then returns
    only thread 0's partial sum on lavapipe (LayerNorm rows 40x off, issue 17); 64-bit
    arithmetic is also slow on GPUs. Every buffer of the model has fewer than 2**31 elements
    (Vulkan storage buffers are limited to ``max_storage_buffer_range`` bytes anyway).
    """
    if target_name != "vulkan":
        return []
    return [tvm.tirx.transform.ForceNarrowIndexToInt32()]


def device_present() -> bool:
    """Whether this TVM has the Vulkan runtime and sees a Vulkan device 0."""
    return has_vulkan_runtime() and bool(tvm.vulkan(0).exist)


def target_config(from_device: bool | None = None) -> dict:
    """The vulkan target's attributes (a dict for ``tvm.target.Target``).

    ``from_device`` (default: whether a device is present): query device 0; else
    :data:`DEFAULT_ATTRS`. Raises :class:`VulkanDeviceError` for a device without :data:`REQUIRED`.
    """
    if from_device is None:
        from_device = device_present()
    if not from_device:
        return {"kind": "vulkan", **DEFAULT_ATTRS}
    return config_from_device_attrs(dict(tvm.target.Target({"kind": "vulkan", "from_device": 0}).attrs))


def config_from_device_attrs(queried: dict) -> dict:
    """Target attributes from what a device reported: its features as reported, the workgroup
    limits capped at :data:`LIMITS`; :class:`VulkanDeviceError` if it lacks :data:`REQUIRED`."""
    missing = [name for name in REQUIRED if not queried.get(name)]
    if missing:
        raise VulkanDeviceError(
            f"the Vulkan device {queried.get('device_name', 0)!r} lacks {', '.join(missing)}, which the compiled "
            "kernels need (fp16 arithmetic, 8- and 16-bit storage buffers, int8)"
        )
    config = {k: v for k, v in queried.items() if k not in _NOT_TARGET_ATTRS}
    for name, cap in LIMITS.items():
        config[name] = min(int(queried.get(name, cap)), cap)
    return {"kind": "vulkan", **config}
