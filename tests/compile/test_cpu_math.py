"""The CPU GELU rewrite: polynomial erf on llvm (vectorizable), exact GELU kept elsewhere."""

from __future__ import annotations

import numpy as np
import torch
import tvm
from tvm import relax
from tvm.relax.frontend import nn

from mpt_relax.compile import targets
from mpt_relax.compile.cpu_math import vectorized_gelu


class _Gelu(nn.Module):
    def forward(self, x: nn.Tensor) -> nn.Tensor:
        return nn.op.gelu(x, approximate="none")


def _module() -> tvm.IRModule:
    mod, _ = _Gelu().export_tvm(spec={"forward": {"x": nn.spec.Tensor((4, 4096), "float32")}})
    return mod


def _calls_gelu(mod: tvm.IRModule) -> bool:
    return "R.nn.gelu" in mod.script()


def test_llvm_gelu_matches_exact_erf_gelu():
    mod = vectorized_gelu("llvm")(_module())
    assert not _calls_gelu(mod)
    lib = tvm.compile(mod, targets.llvm_target().target)
    vm = relax.VirtualMachine(lib, tvm.cpu())
    x = np.concatenate([np.linspace(-10, 10, 4 * 4096 - 3), [0.0, -0.0, 30.0]]).astype(np.float32).reshape(4, 4096)
    got = vm["forward"](tvm.runtime.tensor(x)).numpy()
    ref = torch.nn.functional.gelu(torch.from_numpy(x).double(), approximate="none").numpy()
    np.testing.assert_allclose(got, ref, rtol=1e-6, atol=1e-6)


def test_gpu_targets_keep_the_exact_gelu():
    mod = _module()
    assert _calls_gelu(mod)
    for kind in ("cuda", "metal", "vulkan"):
        assert vectorized_gelu(kind)(mod).script() == mod.script()
