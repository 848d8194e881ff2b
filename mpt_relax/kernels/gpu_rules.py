"""The dlight schedule rules every GPU target gets."""

from __future__ import annotations

import functools
import json

import tvm
from tvm.s_tir import dlight as dl


class SimtMatmul(dl.gpu.Matmul):
    """dlight's GPU Matmul rule without its tensor-core branch.

    In TVM 0.27 that branch (taken for CUDA sm_70+) first imports ``tvm.s_tir.tensor_intrin``
    (40-120 s of start-up) and then segfaults inside Tensorize on our fp16 NT matmuls. The
    rule picks it only from the target's ``arch``, so it sees the target without one.
    """

    def apply(self, func, target, tunable):
        if target.kind.name == "cuda" and "arch" in target.attrs:
            target = _without_arch(str(target))
        return super().apply(func, target, tunable)


@functools.lru_cache(maxsize=None)
def _without_arch(target_json: str) -> tvm.target.Target:
    config = json.loads(target_json)
    config.pop("arch")
    return tvm.target.Target(config)


def gpu_rules(with_matmul: bool = True) -> list:
    """dlight's GPU rules in the order they are tried; Metal leaves Matmul out (it crashes there)."""
    rules = [SimtMatmul()] if with_matmul else []
    return rules + [dl.gpu.GEMV(), dl.gpu.Reduction(), dl.gpu.GeneralReduction(), dl.gpu.Fallback()]
