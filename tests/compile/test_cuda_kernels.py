"""CUDA kernels compiled at build time (TVM 0.27 would compile the library's CUDA source when it
is loaded, which needs NVRTC or nvcc on the GPU machine)."""

from __future__ import annotations

import pytest
import tvm

import mpt_relax
from mpt_relax.compile import cuda_kernels
from mpt_relax.compile.pipeline import compile_module
from mpt_relax.compile.targets import resolve_target
from mpt_relax.runtime import tvm_backends

FATBIN_MAGIC = bytes.fromhex("50ed55ba")

pytestmark = pytest.mark.skipif(not cuda_kernels.nvcc_available(), reason="needs nvcc")


def test_precompiled_kernels_answer_the_load_time_compile_hook(tmp_path):
    spec = resolve_target("cuda", cuda_arch="sm_90")
    cfg = mpt_relax.MPTConfig(d_model=64, n_heads=4, n_layers=1, vocab_size=128, max_seq_len=64)
    executable = compile_module(mpt_relax.export_irmodule(cfg, "q4f16_1"), spec)
    [source] = cuda_kernels.cuda_sources(executable.mod)
    assert "__global__" in source
    written = cuda_kernels.precompile(executable, spec.target, tmp_path)
    assert written == [f"cuda-kernels/{tvm_backends.kernel_file_name(source)}"]
    binary = (tmp_path / written[0]).read_bytes()
    assert binary[:4] == FATBIN_MAGIC

    assert tvm_backends.use_precompiled_cuda(tmp_path)
    assert not tvm_backends.use_precompiled_cuda(tmp_path / "elsewhere")
    hook = tvm.get_global_func("tvm_callback_cuda_compile")
    assert bytes(hook(source)) == binary
