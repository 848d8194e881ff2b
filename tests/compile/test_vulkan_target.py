"""The Vulkan target and the TVM compatibility names, on any TVM (no Vulkan codegen or device needed).

The kernels themselves run on a Vulkan device in tests/vulkan/ (the lane with a Vulkan-enabled TVM).
"""

from __future__ import annotations

import dataclasses
import re

import pytest
import tvm
from tvm import relax, tirx

from mpt_relax.compat import BufferLoadType, arith, has_vulkan_codegen, string_imm
from mpt_relax.compile import pipeline, targets
from mpt_relax.compile import vulkan
from mpt_relax.compile.builder import export_irmodule
from mpt_relax.errors import MPTRelaxError
from mpt_relax.models.mpt.config import MPTConfig


def _vulkan_spec() -> targets.TargetSpec:
    """The vulkan TargetSpec with the explicit attributes, built even where TVM has no SPIR-V
    codegen (the Relax and TIR passes run on any TVM; only the final codegen needs Vulkan)."""
    target = tvm.target.Target(vulkan.target_config(from_device=False), host={"kind": "llvm"})
    return dataclasses.replace(targets.cuda_target("sm_80"), name="vulkan", target=target)  # the GPU schedules


def test_explicit_attributes_cover_what_the_kernels_need():
    config = vulkan.target_config(from_device=False)
    target = tvm.target.Target(config)
    for name in vulkan.REQUIRED:
        assert target.attrs[name], name
    assert int(target.attrs["max_threads_per_block"]) == 256 and int(target.attrs["max_num_threads"]) == 256
    assert int(target.attrs["max_shared_memory_per_block"]) == 32768
    assert int(target.attrs["thread_warp_size"]) == 1


def test_device_attributes_keep_features_and_cap_limits():
    big = {"device_name": "big", "supports_float16": True, "supports_16bit_buffer": True, "supports_8bit_buffer": True,
           "supports_int8": True, "max_threads_per_block": 1024, "max_num_threads": 1024,
           "max_shared_memory_per_block": 65536, "supports_integer_dot_product": True, "tag": "", "keys": ["vulkan"]}
    config = vulkan.config_from_device_attrs(big)
    assert config["max_threads_per_block"] == 256 and config["max_shared_memory_per_block"] == 32768
    assert config["supports_integer_dot_product"] and "tag" not in config and "keys" not in config
    small = vulkan.config_from_device_attrs({**big, "max_threads_per_block": 128, "max_shared_memory_per_block": 16384})
    assert small["max_threads_per_block"] == 128 and small["max_shared_memory_per_block"] == 16384
    tvm.target.Target(small)  # a valid target


def test_a_device_without_16bit_buffers_is_refused_with_the_feature_named():
    with pytest.raises(vulkan.VulkanDeviceError, match="'old' lacks supports_16bit_buffer") as err:
        vulkan.config_from_device_attrs({"device_name": "old", "supports_float16": True, "supports_8bit_buffer": True,
                                         "supports_int8": True})
    assert isinstance(err.value, MPTRelaxError)


@pytest.mark.skipif(has_vulkan_codegen(), reason="this TVM has Vulkan codegen (the refusal is for builds without it)")
def test_vulkan_target_needs_codegen():
    with pytest.raises(targets.TargetError, match="USE_VULKAN=ON"):
        targets.vulkan_target()


def _thread_extents(func: tirx.PrimFunc) -> list[tuple[str, str]]:
    """(thread tag, extent as printed) of every thread-bound loop of a scheduled PrimFunc."""
    return re.findall(r'T\.thread_binding\((.+?), thread="([a-zA-Z]+\.[xyz])"', func.script())


def test_vulkan_kernels_bind_int32_thread_indices():
    """Regression (issue 17): dlight bound int64 threadIdx for kernels Relax legalized with int64
    shapes (LayerNorm, quantized GEMV ...); on lavapipe the shared-memory tree reduction over an int64
    threadIdx kept only thread 0's partial sum (LayerNorm 40x off). The vulkan pipeline narrows them."""
    spec = _vulkan_spec()
    cfg = MPTConfig(d_model=64, n_heads=4, n_layers=1, vocab_size=256, max_seq_len=128)
    with spec.target:
        mod = pipeline.pipeline(spec)(export_irmodule(cfg, "q4f16_1"))
    funcs = {gv.name_hint: f for gv, f in mod.functions.items() if isinstance(f, tirx.PrimFunc)}
    bound = {name: _thread_extents(f) for name, f in funcs.items()}
    assert any("layer_norm" in name and extents for name, extents in bound.items())  # the kernel that failed
    assert any("dequantize" in name and extents for name, extents in bound.items())
    int64 = {name: extents for name, extents in bound.items() if any(e.startswith("T.int64(") for e, _ in extents)}
    assert not int64


def test_the_check_sees_int64_thread_indices_without_the_narrowing():
    """The assertion above is not vacuous: without the vulkan index passes it finds them."""
    spec = dataclasses.replace(_vulkan_spec(), name="vulkan-without-narrowing")
    cfg = MPTConfig(d_model=64, n_heads=4, n_layers=1, vocab_size=256, max_seq_len=128)
    with spec.target:
        mod = pipeline.pipeline(spec)(export_irmodule(cfg, "q0f32"))
    norm = [f for gv, f in mod.functions.items() if isinstance(f, tirx.PrimFunc) and "layer_norm" in gv.name_hint]
    assert norm and any(e.startswith("T.int64(") for e, _ in _thread_extents(norm[0]))


def test_compat_names():
    x = tirx.Var("x", "int32")
    assert arith.Analyzer().can_prove_equal(x * 2, x + x)
    buf = tirx.decl_buffer((4,), "float32", "b")
    assert isinstance(tirx.BufferLoad(buf, [tirx.const(0, "int32")]), BufferLoadType)
    assert not isinstance(tirx.const(1.0, "float32"), BufferLoadType)
    tup = relax.Tuple([string_imm("tirx"), relax.Tuple([])])
    assert len(tup.fields) == 2
