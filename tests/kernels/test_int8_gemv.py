"""The int8-activation decode GEMV: every kernel against a numpy model of its math, and the
model built with ``int8_activations`` against the exact path and HF."""

from __future__ import annotations

import numpy as np
import pytest
import tvm

import mpt_relax
from factory import hf_checkpoint, prefill_then_decode, rel_err, with_top_codes
from mpt_relax.compile import targets
from mpt_relax.io import artifact
from mpt_relax.compile.int8_kernels import best_isa
from mpt_relax.compile.targets import TargetError
from mpt_relax.kernels.cpu.int8_gemv import ISAS, PREFETCH_BYTES, code_offset, int8_gemv, quantize_activation
from mpt_relax.quantization import QuantizationError, dequantize_weight, get_quantization, quantize_weight

HOST = targets.llvm_target().target
HOST_ISA = best_isa(HOST)
# the kernels this CPU can run: its best one and everything below it
RUNNABLE = ISAS[ISAS.index(HOST_ISA):]


def _compile(func):
    return tvm.compile(tvm.IRModule({"main": func.with_attr("global_symbol", "main")}), target=HOST)


def _numpy_quantize(x: np.ndarray):
    """x [M, K] -> (int8 codes [M, K] in natural order, scales [M, K/32]), as the docstring defines them."""
    g = x.astype(np.float32).reshape(x.shape[0], -1, 32)
    amax = np.abs(g).max(-1)
    inv = np.where(amax > 0, np.float32(127) / np.where(amax > 0, amax, 1), 0).astype(np.float32)
    return np.clip(np.rint(g * inv[..., None]), -127, 127).reshape(x.shape), amax / np.float32(127)


@pytest.mark.parametrize("bits", [4, 8])
# int4 with K a multiple of 128 (768: chunks of 8 groups, 384: of 4) takes the four-group kernel,
# 320 and 64 the two-group one
@pytest.mark.parametrize("rows, n_out, k_in", [(1, 256, 768), (3, 48, 384), (3, 96, 320), (2, 10, 64)])
def test_kernels_match_numpy(bits, rows, n_out, k_in):
    rng = np.random.default_rng(bits + rows)
    q = get_quantization(f"q{bits}f16_1")
    packed = with_top_codes(quantize_weight(rng.standard_normal((n_out, k_in)).astype(np.float32), q), bits)
    x = rng.standard_normal((rows, k_in)).astype(np.float16)
    x[0, :32] = 0  # an all-zero group: scale 0, codes 0
    dev = tvm.cpu()
    xq, xs, xc = (tvm.runtime.tensor(np.zeros(s, d), dev) for s, d in
                  [((rows, k_in), np.int8), ((rows, k_in // 32), np.float32), ((rows, k_in // 32), np.float32)])
    _compile(quantize_activation(k_in, bits, "float16"))["main"](tvm.runtime.tensor(x, dev), xq, xs, xc)
    codes, scales = _numpy_quantize(x)
    np.testing.assert_array_equal(xs.numpy(), scales)
    stored = xq.numpy().reshape(rows, -1, 32).astype(np.float32)
    if bits == 4:  # evens first, then odds, within each group
        stored = np.stack([stored[..., :16], stored[..., 16:]], -1).reshape(stored.shape)
    np.testing.assert_array_equal(stored.reshape(rows, k_in), codes)
    np.testing.assert_allclose(xc.numpy(), scales * code_offset(bits) * codes.reshape(rows, -1, 32).sum(-1), rtol=1e-6)

    w = dequantize_weight(packed["q_weight"], packed["q_scale"], q, (n_out, k_in)).astype(np.float64)
    expected = (codes * np.repeat(scales, 32, axis=1)).astype(np.float64) @ w.T
    for isa, distance in [(isa, d) for isa in RUNNABLE for d in ((PREFETCH_BYTES, 0) if isa != "generic" else (PREFETCH_BYTES,))]:
        y = tvm.runtime.tensor(np.zeros((rows, n_out), np.float32), dev)
        _compile(int8_gemv(n_out, k_in, bits, "float32", "float16", isa, distance=distance))["main"](
            xq, xs, xc, tvm.runtime.tensor(packed["q_weight"], dev), tvm.runtime.tensor(packed["q_scale"], dev), y)
        assert rel_err(y.numpy(), expected) < 2e-6, (isa, distance)


def test_this_machine_gets_its_best_kernel():
    flags = open("/proc/cpuinfo").read()
    expected = "avx512vnni" if "avx512_vnni" in flags else "avxvnni" if "avx_vnni" in flags else "generic"
    assert HOST_ISA == expected
    assert best_isa(targets.llvm_target("x86-64-v3").target) == "generic"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = tmp_path_factory.mktemp("a8") / "ckpt"
    hf_checkpoint(path, d_model=128, n_heads=4, n_layers=2, vocab_size=256, max_seq_len=64)
    return path


@pytest.mark.parametrize("quantization, embedding", [("q4f16_1", False), ("q8f16_1", False), ("q4f16_1", 8)])
def test_model_decodes_on_int8_activations(tiny, tmp_path, quantization, embedding):
    """Prefill is the exact path, bit for bit; a decode step moves the logits by the activation
    rounding only: close to the exact path and to HF on the same dequantized weights (with
    ``embedding=8`` the tied head decodes on the q8 int8 kernel)."""
    path = tiny
    ids = [3, 17, 99, 4, 250, 8, 61]
    options = dict(target="llvm", quantization=quantization, quantize_embedding=embedding, quiet=True)
    exact = mpt_relax.build(path, output=tmp_path / "exact", **options)
    a8 = mpt_relax.build(path, int8_activations=True, output=tmp_path / "a8", **options)
    tag = quantization + ("+embedding8" if embedding else "") + "+a8"
    assert a8.name == "a8" and artifact.read_config(a8)["quantization"]["tag"] == tag
    (p_exact, d_exact), (p_a8, d_a8) = prefill_then_decode(exact, ids), prefill_then_decode(a8, ids)
    np.testing.assert_array_equal(p_a8, p_exact)
    bound = 3e-2 if quantization == "q4f16_1" else 2e-2
    assert 0 < rel_err(d_a8, d_exact) < bound


def test_portable_build_uses_the_generic_kernel(tiny, tmp_path):
    """--mcpu x86-64-v3 (no VNNI) still builds and runs int8 activations, with the same math."""
    path = tiny
    ids = [5, 6, 7, 8]
    fast = mpt_relax.build(path, target="llvm", quantization="q4f16_1", int8_activations=True,
                           output=tmp_path / "fast", quiet=True)
    portable = mpt_relax.build(path, target="llvm", quantization="q4f16_1", int8_activations=True,
                               mcpu="x86-64-v3", output=tmp_path / "v3", quiet=True)
    # the same up to fp32 summation order (the int8 decode moves logits ~1e-2 from the exact path)
    assert rel_err(prefill_then_decode(portable, ids)[1], prefill_then_decode(fast, ids)[1]) < 1e-4


def test_refused_where_it_cannot_run(tiny, tmp_path):
    path = tiny
    with pytest.raises(TargetError, match="CPU kernels.*without --int8-activations"):
        mpt_relax.build(path, target="cuda", quantization="q4f16_1", int8_activations=True, output=tmp_path / "x")
    with pytest.raises(QuantizationError, match="int8 activations need q4f16_1 or q8f16_1"):
        get_quantization("q0f16", int8_activations=True)
    assert not (tmp_path / "x").exists()
