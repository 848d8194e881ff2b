"""Lane helpers of the hand-written CPU kernels, run on their own."""

from __future__ import annotations

import numpy as np
import tvm
from tvm.script import tirx as T

from mpt_relax.compile import targets
from mpt_relax.kernels.lanes import emit_rows, transposed_16x16

HOST = targets.llvm_target().target


def test_transposed_16x16_gives_the_rows_of_the_transpose():
    @T.prim_func(s_tir=True)
    def main(a_h: T.handle, b_h: T.handle):
        T.func_attr({"tirx.noalias": True})
        a = T.match_buffer(a_h, (256,), "float32")
        b = T.match_buffer(b_h, (16, 16), "float32")
        emit_rows(transposed_16x16([a[T.ramp(r * 16, 1, 16)] for r in range(16)]),
                  lambda i, row: T.buffer_store(b, row, [i, T.ramp(0, 1, 16)]))

    lib = tvm.compile(tvm.IRModule({"main": main}), target=HOST)
    block = np.random.default_rng(0).standard_normal((16, 16)).astype(np.float32)
    out = tvm.runtime.tensor(np.full((16, 16), np.nan, np.float32))
    lib["main"](tvm.runtime.tensor(block.ravel()), out)
    np.testing.assert_array_equal(out.numpy(), block.T)
