"""The exact decode GEMV on group-quantized weights: the kernel against float64 numpy on the
dequantized weights, and the pass that puts it in ``batch_decode`` of llvm targets with AVX2 + FMA only."""

from __future__ import annotations

import numpy as np
import pytest

from factory import callees, gemv_error, with_top_codes
from mpt_relax.compile import targets
from mpt_relax.compile.decode_gemv import select_decode_gemv
from mpt_relax.kernels.cpu.base import cpu_has
from mpt_relax.kernels.cpu.group_gemv import REQUIRED_FEATURES, group_gemv, supported
from mpt_relax.quantization import dequantize_weight, get_quantization, quantize_weight
from test_float_gemv import _exported

HOST = targets.llvm_target()
RUNS_HERE = cpu_has(HOST.target, REQUIRED_FEATURES)
# the kernel as this CPU builds it, and as an AVX2 build (x86-64-v3) where this CPU has AVX-512
BUILDS = [HOST] + ([targets.llvm_target("x86-64-v3")] if cpu_has(HOST.target, ["avx512f"]) else [])


@pytest.mark.skipif(not RUNS_HERE, reason="this CPU has no AVX2 + FMA: the pass leaves the dlight GEMV")
@pytest.mark.parametrize("build", BUILDS, ids=lambda b: str(b.target.attrs.get("mcpu", "host")))
@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("out_dtype", ["float32", "float16"])
@pytest.mark.parametrize("rows, n_out, k_in", [(1, 7, 128), (3, 130, 384), (2, 96, 768)])  # q4: 1, 3, 6 chunks
def test_kernel_matches_numpy(build, bits, out_dtype, rows, n_out, k_in):
    """fp32 sums of x times the weights dequantized in fp32 (not rounded to fp16 as the fused
    dequantize does: at most half an fp16 step apart, so also within 1e-3 of that)."""
    rng = np.random.default_rng(rows * 10 + bits)
    q = get_quantization(f"q{bits}f16_1")
    packed = with_top_codes(quantize_weight(rng.standard_normal((n_out, k_in)).astype(np.float32) * 0.05, q), bits)
    w = dequantize_weight(packed["q_weight"], packed["q_scale"], q, (n_out, k_in))
    x = rng.standard_normal((rows, k_in)).astype(np.float16)
    func = group_gemv(n_out, k_in, bits, "float16", out_dtype)
    inputs = (packed["q_weight"], packed["q_scale"], x)
    assert gemv_error(func, build.target, inputs, x, w, out_dtype) < (1e-6 if out_dtype == "float32" else 1e-3)
    assert gemv_error(func, build.target, inputs, x, w.astype(np.float16), out_dtype) < 1e-3


def test_supported_shapes():
    """Whole chunks of 16 uint32 words: 128 q4 / 64 q8 weights."""
    assert supported(50432, 768, 4) and supported(7, 128, 4) and supported(7, 64, 8)
    assert not supported(64, 64, 4) and not supported(64, 96, 8) and not supported(0, 128, 4)


@pytest.mark.parametrize("quantization, embedding, expected", [("q4f16_1", False, 4), ("q8f16_1", True, 5)])
def test_pass_rewrites_exact_decode_only(quantization, embedding, expected):
    """The exact q4/q8 GEMVs of decode (with a quantized embedding, the head too); prefill keeps its
    GEMM; GPU targets and CPUs without AVX2 + FMA keep the fused dequantize + NT_matmul."""
    mod = _exported(quantization, embedding=embedding)
    if RUNS_HERE:
        out = select_decode_gemv(HOST)(mod)
        assert sum(c.startswith("group_gemv_") for c in callees(out["batch_decode"])) == expected
        assert not any(c.startswith("fused_dequantize") for c in callees(out["batch_decode"]))
        assert not any(c.startswith("group_gemv_") for c in callees(out["prefill"]))
    for other in (targets.resolve_target("cuda"), targets.llvm_target("x86-64-v2")):
        kept = select_decode_gemv(other)(mod)
        assert not any(c.startswith("group_gemv_") for c in callees(kept["batch_decode"]))


def test_pass_leaves_int8_activation_schemes_alone():
    """Decode on int8 activations has no exact GEMV left to rewrite."""
    out = select_decode_gemv(HOST)(_exported("q4f16_1", int8_activations=True))
    assert not any(c.startswith("group_gemv_") for c in callees(out["batch_decode"]))
