"""The streaming float-weight decode GEMV: the kernel against float64 numpy, and the pass that
puts it in ``batch_decode`` only, on llvm targets only. And the machine code of the decode GEMVs:
where they prefetch to, and their accumulators kept in registers."""

from __future__ import annotations

import re

import numpy as np
import pytest
import tvm
from tvm import relax

from factory import callees, gemv_error
from mpt_relax.compile import targets
from mpt_relax.compile.builder import quantized_model
from mpt_relax.compile.decode_gemv import select_decode_gemv
from mpt_relax.kernels.cpu.float_gemv import (PREFETCH_BYTES, ZEN_FP32_PREFETCH_BYTES, ZEN_PREFETCH_BYTES, float_gemv,
                                              prefetch_bytes, supported, weight_distance)
from mpt_relax.kernels.cpu.group_gemv import group_gemv
from mpt_relax.kernels.cpu.int8_gemv import int8_gemv
from mpt_relax.kernels.cpu.q4k_q5k_gemv import q4k_int8_gemv
from mpt_relax.kernels.cpu.q6k_gemv import q6k_gemv
from mpt_relax.kernels.cpu.q6k_int8_gemv import q6k_int8_gemv
from mpt_relax.models.mpt.config import MPTConfig
from mpt_relax.quantization import fuse_dequantize_matmul, get_quantization

HOST = targets.llvm_target().target


@pytest.mark.parametrize("x_dtype, w_dtype, out_dtype", [("float16", "float16", "float32"),
                                                         ("float32", "float32", "float32"),
                                                         ("float16", "float16", "float16")])
@pytest.mark.parametrize("rows, n_out, k_in", [(1, 1000, 768), (3, 130, 64), (2, 7, 96)])
def test_kernel_matches_numpy(x_dtype, w_dtype, out_dtype, rows, n_out, k_in):
    """Every row (blocks of 4 and single rows), fp32 sums of the exact products."""
    rng = np.random.default_rng(rows + n_out)
    x = rng.standard_normal((rows, k_in)).astype(x_dtype)
    w = rng.standard_normal((n_out, k_in)).astype(w_dtype)
    err = gemv_error(float_gemv(n_out, k_in, x_dtype, w_dtype, out_dtype), HOST, (x, w), x, w, out_dtype)
    assert err < (1e-6 if out_dtype == "float32" else 1e-3)


@pytest.mark.parametrize("distance", [0, 64, 1 << 20])
def test_kernel_matches_numpy_at_any_prefetch_distance(distance):
    """A prefetch of the line being read, of the next line or past the end of W: the same sums."""
    rng = np.random.default_rng(distance)
    x, w = rng.standard_normal((2, 96)).astype(np.float16), rng.standard_normal((130, 96)).astype(np.float16)
    assert gemv_error(float_gemv(130, 96, "float16", "float16", "float32", distance), HOST, (x, w), x, w, "float32") < 1e-6


def test_prefetch_distance_follows_the_cpu():
    assert prefetch_bytes(targets.llvm_target("znver4").target) == ZEN_PREFETCH_BYTES < PREFETCH_BYTES
    assert prefetch_bytes(targets.llvm_target("sapphirerapids").target) == PREFETCH_BYTES
    assert prefetch_bytes(targets.llvm_target("x86-64-v3").target) == PREFETCH_BYTES
    assert prefetch_bytes(targets.llvm_target("znver4").target, zen=8192) == 8192  # the K-quant kernels' distance
    assert prefetch_bytes(targets.llvm_target("x86-64-v3").target, zen=8192) == PREFETCH_BYTES
    assert prefetch_bytes(targets.llvm_target("znver4").target, 0, 16384) == 0  # the q8 int8 GEMV's
    assert prefetch_bytes(targets.llvm_target("sapphirerapids").target, 0, 16384) == 16384
    # the float GEMV's by weight dtype: fp32 weights nearer on Zen
    assert weight_distance(targets.llvm_target("znver4").target, "float32") == ZEN_FP32_PREFETCH_BYTES < ZEN_PREFETCH_BYTES
    assert weight_distance(targets.llvm_target("znver4").target, "float16") == ZEN_PREFETCH_BYTES
    assert weight_distance(targets.llvm_target("sapphirerapids").target, "float32") == PREFETCH_BYTES


def test_supported_shapes():
    assert supported(50432, 768) and supported(7, 32)
    assert not supported(64, 48)


def _exported(quantization: str, **options):
    cfg = MPTConfig(d_model=128, n_heads=2, n_layers=1, vocab_size=128, max_seq_len=32)  # whole q4 chunks
    net, _ = quantized_model(cfg, get_quantization(quantization, **options))
    mod, _ = net.export_tvm(spec=net.export_spec())
    return tvm.transform.Sequential([relax.transform.DecomposeOpsForInference(), fuse_dequantize_matmul()])(mod)


@pytest.mark.parametrize("quantization, expected", [("q0f16", 5), ("q0f32", 5), ("q4f16_1", 1)])
def test_pass_rewrites_decode_only(quantization, expected):
    """Each float weight's decode GEMV (q4f16_1: the fp16 tied head only); prefill keeps NT_matmul;
    a GPU target keeps everything."""
    mod = _exported(quantization)
    out = select_decode_gemv(targets.resolve_target("llvm"))(mod)
    assert sum(c.startswith("float_gemv_") for c in callees(out["batch_decode"])) == expected
    assert not any(c.startswith("float_gemv_") for c in callees(out["prefill"]))
    gpu = select_decode_gemv(targets.resolve_target("cuda"))(mod)
    assert not any(c.startswith("float_gemv_") for c in callees(gpu["batch_decode"]))


def _asm(func, mcpu: str) -> str:
    lib = tvm.compile(tvm.IRModule({"main": func.with_attr("global_symbol", "main")}), target=targets.llvm_target(mcpu).target)
    return lib.mod.imports[0].inspect_source("asm") if lib.mod.imports else lib.mod.inspect_source("asm")


def _row_task(asm: str) -> str:
    """The code of the kernel's parallel task (its rows)."""
    body = asm[asm.index(".L__tvm_parallel_lambda:"):]
    return body[:body.index(".Lfunc_end")]


def test_gemv_accumulators_stay_in_registers():
    """A row's accumulators are a small buffer of its task (no per-row scratch in memory, no
    workspace call): the only stores of a task are its outputs."""
    for func in (float_gemv(64, 256, "float16", "float16", "float32"), int8_gemv(64, 256, 4, "float32", isa="avx512vnni"),
                 int8_gemv(64, 256, 8, "float32", isa="avx512vnni"), group_gemv(64, 256, 4, "float16", "float32"),
                 q6k_int8_gemv(64, 256, "float32", "avx512vnni"), q4k_int8_gemv(64, 256, "float32", "avx512vnni"),
                 q6k_gemv(64, 256, "float16", "float32")):
        task = _row_task(_asm(func, "znver4"))
        assert re.findall(r"\tv\w+\s+%[yz]mm\d+, -?\d*\(%\w+[^)]*\)", task) == []  # vector stores
        assert "TVMBackendAllocWorkspace" not in task


def test_streaming_gemvs_prefetch_into_l2_and_the_exact_dequantizing_ones_into_l1():
    """The kernels that stream weights at memory speed (float, int8) ask for them into L2
    (``prefetcht1``); the compute-bound exact group GEMV into L1 (``prefetcht0``)."""
    for func in (float_gemv(64, 256, "float16", "float16", "float32"), int8_gemv(64, 256, 4, "float32", isa="avx512vnni")):
        asm = _asm(func, "znver4")
        assert "prefetcht1" in asm and "prefetcht0" not in asm
    asm = _asm(group_gemv(64, 256, 4, "float16", "float32"), "znver4")
    assert "prefetcht0" in asm and "prefetcht1" not in asm
    assert "prefetch" not in _asm(int8_gemv(64, 256, 8, "float32", isa="avx512vnni", distance=0), "znver4")
