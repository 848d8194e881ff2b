"""The GPU kernels on a Vulkan device: the ALiBi paged-attention kernels (the ones CUDA gets)
against the dense fp64 reference of tests/attention_harness.py, and the LayerNorm kernel
that int64 thread indices broke on Vulkan.

How the tests know these are CUDA's kernels: the Vulkan build gets its attention PrimFuncs from
``attention_kernels(spec, target)``, the one factory every non-LLVM target (CUDA, Metal, Vulkan)
goes through (``kernels/attention/gpu.py``); ``test_vulkan_runs_the_attention_kernels_cuda_gets``
checks that the model's PrimFuncs are exactly what it returns, and that for a CUDA target with the
same thread / shared-memory limits it returns structurally equal functions (the tiling is the
only thing a target changes: with CUDA's own limits the prefill kernels are equal too and the
decode kernel differs only in its thread count).
"""

from __future__ import annotations

import numpy as np
import pytest
import tvm
from tvm import relax
from tvm.relax.frontend import nn

from attention_harness import GQA, MQA_6, AttentionModule, Harness
from mpt_relax.compile import pipeline, targets
from mpt_relax.compile.builder import export_irmodule
from mpt_relax.kernels.attention import attention_kernels
from mpt_relax.kernels.attention.common import AttentionSpec
from mpt_relax.models.mpt.config import MPTConfig
from mpt_relax.compile.kv_cache import DEFAULT_PAGE_SIZE
from mpt_relax.models.mpt.model import LPLayerNorm

pytestmark = pytest.mark.vulkan

ROLES = {"prefill_ragged": "alibi_prefill_ragged", "prefill_paged": "alibi_prefill_paged",
         "decode_paged": "alibi_decode_paged"}


@pytest.fixture(scope="module")
def spec(vulkan_device):
    return targets.vulkan_target()


def _cache_vm(cfg: MPTConfig, dtype: str, spec, device) -> relax.VirtualMachine:
    module = AttentionModule(cfg, dtype, spec.target)
    mod, _ = module.export_tvm(module.spec())
    return relax.VirtualMachine(pipeline.compile_module(mod, spec), device)  # the model's pipeline


# MHA fp32 and GQA / non-power-of-two heads run in the whole models (test_vulkan_engine.py)
@pytest.mark.parametrize("cfg, dtype", [(MQA_6, "float32"), (GQA, "float16")], ids=["mqa-6heads-fp32", "gqa-hd32-fp16"])
def test_ragged_prefill_cached_prefix_and_decode(cfg, dtype, spec, vulkan_device):
    h = Harness(cfg, dtype, vm=_cache_vm(cfg, dtype, spec, vulkan_device), device=vulkan_device)
    for seq in range(4):
        h.add(seq)
    h.check([(0, 15), (1, 16), (2, 17), (3, 33)])
    h.check([(2, 16), (0, 1), (3, 31)])  # page-crossing appends on cached prefixes
    h.check([(0, 1), (1, 1), (2, 1), (3, 1)])  # batched decode
    h.fork(3, 4, 21)  # mid-page fork: the child reads the parent's pages at its own positions
    h.check([(4, 6), (3, 2)])
    h.check([(4, 1), (3, 1)])
    h.remove(0)
    h.add(5)
    h.check([(5, 18), (1, 1)])


def test_vulkan_runs_the_attention_kernels_cuda_gets(spec):
    cfg = MPTConfig(d_model=128, n_heads=8, n_layers=1, kv_n_heads=2, vocab_size=256, max_seq_len=128)
    attn = AttentionSpec.from_config(cfg, "float16", DEFAULT_PAGE_SIZE)
    vulkan = attention_kernels(attn, spec.target)
    mod = export_irmodule(cfg, "q0f16", spec.target)
    for role, name in ROLES.items():
        tvm.ir.assert_structural_equal(mod[name], getattr(vulkan, role))  # the library's kernels come from there
    limits = {k: spec.target.attrs[k] for k in ("max_threads_per_block", "max_num_threads", "max_shared_memory_per_block",
                                                "thread_warp_size")}
    cuda_same_limits = tvm.target.Target({"kind": "cuda", "arch": "sm_80", **limits})
    cuda = attention_kernels(attn, cuda_same_limits)
    for role in ROLES:
        tvm.ir.assert_structural_equal(getattr(vulkan, role), getattr(cuda, role))
    real_cuda = attention_kernels(attn, targets.cuda_target("sm_80").target)  # 1024 threads, 48 KiB, warp 32
    for role in ("prefill_ragged", "prefill_paged"):
        tvm.ir.assert_structural_equal(getattr(vulkan, role), getattr(real_cuda, role))


class _Norm(nn.Module):
    def __init__(self, dim: int):
        self.norm = LPLayerNorm(dim, 1e-5, "float32")

    def forward(self, x):
        return self.norm(x)


@pytest.mark.parametrize("dim", [64, 96, 256])
def test_layer_norm_rows(dim, spec, vulkan_device):
    """The model's LayerNorm kernel (int64 shapes from Relax): 40x off on lavapipe before the
    vulkan pipeline narrowed thread indices to int32 (issue 17)."""
    module = _Norm(dim)
    mod, _ = module.export_tvm({"forward": {"x": nn.spec.Tensor(["n", dim], "float32"),
                                            "$": {"param_mode": "plain", "effect_mode": "none"}}})
    vm = relax.VirtualMachine(pipeline.compile_module(mod, spec), vulkan_device)
    rng = np.random.default_rng(dim)
    for n in (1, 7, 33):
        x = (rng.standard_normal((n, dim)) * 3 + 1).astype("float32")
        w = rng.standard_normal(dim).astype("float32")
        y = vm["forward"](tvm.runtime.tensor(x, vulkan_device), tvm.runtime.tensor(w, vulkan_device)).numpy()
        c = x - x.mean(-1, keepdims=True)
        expected = c / np.sqrt((c * c).mean(-1, keepdims=True) + 1e-5) * w
        np.testing.assert_allclose(y, expected, rtol=0, atol=2e-5 * np.abs(expected).max())
