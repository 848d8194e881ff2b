"""Lane helpers of the hand-written CPU kernels, run on their own."""

from __future__ import annotations

import numpy as np
import pytest
import tvm
from tvm.script import tirx as T
from mpt_relax.kernels.cpu.base import cpu_has

from mpt_relax.compile import targets
from mpt_relax.kernels.lanes import transpose_16x16

HOST = targets.llvm_target().target


@pytest.mark.skipif(not cpu_has(HOST, ["avx512f"]), reason="this CPU has no AVX-512F (vpermi2ps)")
def test_transpose_16x16_transposes_in_place():
    @T.prim_func(s_tir=True)
    def main(a_h: T.handle):
        T.func_attr({"tirx.noalias": True})
        a = T.match_buffer(a_h, (2, 256), "float32")
        transpose_16x16(a)

    lib = tvm.compile(tvm.IRModule({"main": main}), target=HOST)
    block = np.random.default_rng(0).standard_normal((16, 16)).astype(np.float32)
    buf = tvm.runtime.tensor(np.stack([block.ravel(), np.full(256, np.nan, np.float32)]))
    lib["main"](buf)
    np.testing.assert_array_equal(buf.numpy()[0].reshape(16, 16), block.T)
