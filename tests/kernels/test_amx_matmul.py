"""The AMX prefill matmuls (where this CPU has AMX): the bf16 kernel against numpy on
bf16-rounded operands, the exact kernel (hi + lo bf16 parts) against float64 on the fp16
operands; the exact kernel on AVX-512 vectors (where this CPU has AVX-512) against float64, the
bf16 one on ``vdpbf16ps`` (where it has AVX512-BF16) against numpy on bf16-rounded operands;
``amx_prefill`` builds against HF on the trained model and the exact path, and the pass that
puts the exact prefill on the tiles or the vectors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import tvm

import mpt_relax
from factory import bf16, callees, rel_err, with_top_codes
from mpt_relax.compile import targets
from mpt_relax.compile.amx_kernels import (has_amx, has_bf16_dots, has_vector_units, select_amx_kernels,
                                           select_exact_amx_prefill)
from mpt_relax.compile.builder import quantized_model
from mpt_relax.kernels.cpu.amx_matmul import DOT_ROWS, TILE_ROWS_MIN, amx_matmul
from mpt_relax.kernels.cpu.exact_matmul import KERNEL_ATTR
from mpt_relax.models.mpt.config import MPTConfig
from mpt_relax.quantization import fuse_dequantize_matmul
from mpt_relax.quantization import QuantizationError, dequantize_weight, get_quantization, quantize_weight
from mpt_relax.runtime.cpu_features import host_features, request_amx

TRAINED = Path(mpt_relax.__file__).resolve().parent / "data" / "tiny-mpt"
HOST = targets.llvm_target()
AMX = has_amx(HOST)
VECTOR = has_vector_units(HOST)
DOTS = has_bf16_dots(HOST)


def test_amx_is_detected_as_this_cpu_has_it():
    assert AMX == ("amxbf16" in (host_features() or ()))
    assert not has_amx(targets.llvm_target("x86-64-v3"))
    assert request_amx() == AMX


@pytest.mark.skipif(not AMX, reason="this CPU has no AMX-BF16: the kernel cannot run here (the exact path is tested)")
@pytest.mark.parametrize("bits", [4, 8, 16, 32])
@pytest.mark.parametrize("rows, n_out, k_in", [(1, 32, 64), (37, 96, 320), (128, 64, 768)])
def test_kernel_matches_numpy_on_bf16_operands(bits, rows, n_out, k_in):
    """q4/q8 codes dequantized as stored, or fp16/fp32 weights (bits 16/32), rounded to bf16."""
    rng = np.random.default_rng(rows + bits)
    weight = rng.standard_normal((n_out, k_in)).astype(np.float32) * 0.05
    x = rng.standard_normal((rows, k_in)).astype(np.float16)
    if bits in (16, 32):
        w_dtype = f"float{bits}"
        w = weight.astype(w_dtype)
        inputs = (x, w)
    else:
        q = get_quantization(f"q{bits}f16_1")
        packed = with_top_codes(quantize_weight(weight, q), bits)
        w_dtype = "float16"
        w = dequantize_weight(packed["q_weight"], packed["q_scale"], q, (n_out, k_in)).astype(np.float16)
        inputs = (x, packed["q_weight"], packed["q_scale"])
    expected = bf16(x).astype(np.float64) @ bf16(w).astype(np.float64).T
    lib = tvm.compile(tvm.IRModule({"main": amx_matmul(n_out, k_in, bits, "float16", "float32", w_dtype)
                                    .with_attr("global_symbol", "main")}), target=HOST.target)
    y = tvm.runtime.tensor(np.zeros((rows, n_out), np.float32))
    lib["main"](*(tvm.runtime.tensor(a) for a in inputs), y)
    assert rel_err(y.numpy(), expected) < 1e-5


def _weights(bits, n_out, k_in, rng):
    """(the kernel's weight inputs, their fp16 values) for q4/q8 codes or fp16 weights (16)."""
    weight = rng.standard_normal((n_out, k_in)).astype(np.float32) * 0.05
    if bits == 16:
        w = weight.astype(np.float16)
        return (w,), w
    q = get_quantization(f"q{bits}f16_1")
    packed = with_top_codes(quantize_weight(weight, q), bits)
    return (packed["q_weight"], packed["q_scale"]), dequantize_weight(
        packed["q_weight"], packed["q_scale"], q, (n_out, k_in)).astype(np.float16)


@pytest.mark.skipif(not AMX, reason="this CPU has no AMX-BF16: the kernel cannot run here (the exact path is tested)")
@pytest.mark.parametrize("bits", [4, 8, 16])
@pytest.mark.parametrize("rows", [1, TILE_ROWS_MIN - 1, TILE_ROWS_MIN, 37])
def test_exact_kernel_matches_float64(bits, rows):
    """fp32 sums of the exact products of the fp16 operands: as close to float64 as the FMA path
    (fewer rows than TILE_ROWS_MIN take the FMA loop over the same decoded weights)."""
    rng = np.random.default_rng(rows)
    n_out, k_in = 64, 512
    inputs, w = _weights(bits, n_out, k_in, rng)
    x = rng.standard_normal((rows, k_in)).astype(np.float16)
    lib = tvm.compile(tvm.IRModule({"main": amx_matmul(n_out, k_in, bits, "float16", "float32", "float16", exact=True)
                                    .with_attr("global_symbol", "main")}), target=HOST.target)
    y = tvm.runtime.tensor(np.full((rows, n_out), np.nan, np.float32))
    assert request_amx()  # the tile state, once per process
    lib["main"](tvm.runtime.tensor(x), *(tvm.runtime.tensor(a) for a in inputs), y)
    assert rel_err(y.numpy(), x.astype(np.float64) @ w.astype(np.float64).T) < 1e-6


def _vector_run(bits, x_dtype, rows, n_out, k_in, exact):
    """(y, x, w) of ``amx_matmul(units="vector")`` on random operands: q4/q8 codes or fp16 weights
    with fp16 x, fp32 weights (bits 32) with fp32 x."""
    rng = np.random.default_rng(rows + bits)
    if bits == 32:
        w = (rng.standard_normal((n_out, k_in)) * 0.05).astype(np.float32)
        inputs = (w,)
    else:
        inputs, w = _weights(bits, n_out, k_in, rng)
    x = rng.standard_normal((rows, k_in)).astype(x_dtype)
    kernel = amx_matmul(n_out, k_in, bits, x_dtype, "float32", "float32" if bits == 32 else "float16", exact=exact,
                        units="vector")
    lib = tvm.compile(tvm.IRModule({"main": kernel.with_attr("global_symbol", "main")}), target=HOST.target)
    y = tvm.runtime.tensor(np.full((rows, n_out), np.nan, np.float32))
    lib["main"](tvm.runtime.tensor(x), *(tvm.runtime.tensor(a) for a in inputs), y)
    return y.numpy(), x, w


@pytest.mark.skipif(not VECTOR, reason="this CPU has no AVX-512: the vector kernel cannot run here (the exact path is tested)")
@pytest.mark.parametrize("bits, x_dtype", [(4, "float16"), (8, "float16"), (16, "float16"), (32, "float32")])
@pytest.mark.parametrize("rows", [1, TILE_ROWS_MIN - 1, TILE_ROWS_MIN, 37])
def test_vector_kernel_matches_float64(bits, x_dtype, rows):
    """The exact kernel on AVX-512 FMAs (fp32 sums in k order; 37 rows: three full panels of 12
    and a last one of 1): as close to float64 as the FMA path, fp32 models included."""
    y, x, w = _vector_run(bits, x_dtype, rows, 64, 512, exact=True)
    assert rel_err(y, x.astype(np.float64) @ w.astype(np.float64).T) < 1e-6


@pytest.mark.skipif(not DOTS, reason="this CPU has no AVX512-BF16: the bf16 vector kernel cannot run here")
@pytest.mark.parametrize("bits, x_dtype", [(4, "float16"), (8, "float16"), (16, "float16"), (32, "float32")])
@pytest.mark.parametrize("rows", [1, TILE_ROWS_MIN - 1, TILE_ROWS_MIN, 37])
def test_bf16_vector_kernel_matches_numpy_on_bf16_operands(bits, x_dtype, rows):
    """``vdpbf16ps`` on bf16-rounded x and weights, fp32 sums (37 rows: panels of DOT_ROWS and a
    partial one); under TILE_ROWS_MIN rows the exact FMA loop, as close to float64 as the FMA path."""
    y, x, w = _vector_run(bits, x_dtype, rows, 128, 320, exact=False)
    exact = x.astype(np.float64) @ w.astype(np.float64).T
    if rows < TILE_ROWS_MIN:
        assert rel_err(y, exact) < 1e-6
    else:
        assert rel_err(y, bf16(x).astype(np.float64) @ bf16(w).astype(np.float64).T) < 1e-5
        assert 1e-4 < rel_err(y, exact) < 1e-2  # the bf16 rounding shows
    assert rows < 37 or rows % DOT_ROWS  # a partial panel is among the cases


def test_kernel_refusals():
    with pytest.raises(ValueError, match="exact AMX products need float16 / bfloat16 operands"):
        amx_matmul(32, 64, 32, "float32", "float32", "float32", exact=True)
    with pytest.raises(ValueError, match="bf16 vector products need out_features a multiple of 64, got 32"):
        amx_matmul(32, 64, 16, "float16", "float32", "float16", units="vector")
    with pytest.raises(ValueError, match="units 'tpu'"):
        amx_matmul(64, 64, 16, "float16", "float32", "float16", units="tpu")


def test_amx_prefill_kernels_follow_the_target():
    """amx_prefill's tagged matmuls: bf16 tiles on an AMX target, ``vdpbf16ps`` on AVX512-BF16
    without AMX (Zen 4), the exact FMA kernel on AVX-512 without BF16, untouched on AVX2."""
    cfg = MPTConfig(d_model=256, n_heads=2, n_layers=1, vocab_size=128, max_seq_len=32)
    for mcpu, marker in [("sapphirerapids", "tdpbf16ps"), ("znver4", "dpbf16ps.512"), ("skylake-avx512", "fmuladd"),
                         ("x86-64-v3", None)]:
        net, _ = quantized_model(cfg, get_quantization("q4f16_1", amx_prefill=True))
        mod, _ = net.export_tvm(spec=net.export_spec())  # a new module each time: the pass rewrites it in place
        tagged = [gv for gv, f in mod.functions.items() if f.attrs is not None and KERNEL_ATTR in f.attrs]
        assert len(tagged) == 4  # Wqkv, out_proj, up, down (the fp16 head is not tagged)
        out = select_amx_kernels(targets.llvm_target(mcpu))(mod)
        for gv in tagged:
            text = out[gv].script()
            assert (KERNEL_ATTR in (out[gv].attrs or {})) == (marker is None), mcpu
            if marker == "fmuladd":  # the exact vector kernel: no bf16 instruction at all
                assert "bf16" not in text, mcpu
            elif marker is not None:
                assert marker in text and (marker != "dpbf16ps.512" or "tdpbf16ps" not in text), mcpu


@pytest.mark.parametrize("scheme", ["q4f16_1", "q0f16", "q0f32"])
def test_exact_prefill_goes_on_the_tiles_of_amx_targets(scheme):
    """The prefill projections (every Linear; the tied head too) become the exact tile kernel on
    an AMX target (fp16 models; an fp32 model's the vector kernel), the exact vector kernel on an
    AVX-512 target without AMX, and stay on an AVX2 one; decode keeps its GEMVs."""
    cfg = MPTConfig(d_model=256, n_heads=2, n_layers=1, vocab_size=128, max_seq_len=32)
    net, _ = quantized_model(cfg, get_quantization(scheme))
    mod, _ = net.export_tvm(spec=net.export_spec())
    mod = tvm.transform.Sequential([tvm.relax.transform.DecomposeOpsForInference(), fuse_dequantize_matmul()])(mod)
    sapphire = targets.llvm_target("sapphirerapids")
    out = select_exact_amx_prefill(sapphire)(mod)
    tiles = [c for c in callees(out["prefill"]) if c.startswith("amx_exact_matmul_")]
    vectors = [c for c in callees(out["prefill"]) if c.startswith("vector_exact_matmul_")]
    assert (len(tiles), len(vectors)) == ((0, 5) if scheme == "q0f32" else (5, 0))  # Wqkv, out_proj, up, down, head
    assert not any(c.startswith(("amx_exact", "vector_exact")) for c in callees(out["batch_decode"]))
    zen4 = select_exact_amx_prefill(targets.llvm_target("znver4"))(mod)
    assert len([c for c in callees(zen4["prefill"]) if c.startswith("vector_exact_matmul_")]) == 5
    portable = select_exact_amx_prefill(targets.llvm_target("x86-64-v3"))(mod)
    assert not any(c.startswith(("amx_exact", "vector_exact")) for c in callees(portable["prefill"]))


@pytest.fixture(scope="module")
def trained_hf():
    from transformers import MptForCausalLM

    return MptForCausalLM.from_pretrained(str(TRAINED), dtype=torch.float32).eval()


def test_amx_prefill_against_hf_and_the_exact_path(trained_hf, tmp_path):
    """The trained model's logits with amx_prefill stay as close to HF fp32 as the exact q8 path
    (and closer than HF's own bf16); a portable build without AMX computes the exact path."""
    ids = list(range(3, 70))
    with torch.inference_mode():
        ref = trained_hf(torch.tensor([ids])).logits[0].numpy()
    exact = mpt_relax.build(TRAINED, target="llvm", quantization="q8f16_1", output=tmp_path / "exact", quiet=True)
    amx = mpt_relax.build(TRAINED, target="llvm", quantization="q8f16_1", amx_prefill=True,
                          output=tmp_path / "amx", quiet=True)
    portable = mpt_relax.build(TRAINED, target="llvm", quantization="q8f16_1", amx_prefill=True, mcpu="x86-64-v3",
                               output=tmp_path / "v3", quiet=True)
    portable_exact = mpt_relax.build(TRAINED, target="llvm", quantization="q8f16_1", mcpu="x86-64-v3",
                                     output=tmp_path / "v3-exact", quiet=True)
    logits = {a.name: mpt_relax.Engine(a, device="cpu").logits(ids) for a in (exact, amx, portable, portable_exact)}
    assert rel_err(logits["exact"], ref) < 3e-3 and rel_err(logits["amx"], ref) < 3e-3
    assert (rel_err(logits["amx"], logits["exact"]) > 1e-5) == (AMX or DOTS)  # bf16 products where AMX or vdpbf16ps runs
    assert rel_err(logits["v3"], logits["v3-exact"]) < 1e-5
    # the exact prefill on the tiles (where AMX) or on the FMA units: only the order of the fp32 sums
    # differs, which the fp16 activations then round apart (AVX-512 and AVX2 FMA builds: 1.8e-4)
    assert rel_err(logits["exact"], logits["v3-exact"]) < 5e-4
    greedy = [int(np.argmax(logits[n][-1])) for n in ("exact", "amx", "v3")]
    assert len(set(greedy)) == 1


def test_amx_prefill_on_float_weights(trained_hf, tmp_path):
    """q0f16 with amx_prefill: the Linears of prefill in bf16 on AMX or AVX512-BF16 (the tied head stays exact),
    as close to HF fp32 as bf16 products allow; decode stays exact."""
    ids = list(range(3, 70))
    with torch.inference_mode():
        ref = trained_hf(torch.tensor([ids])).logits[0].numpy()
    exact = mpt_relax.build(TRAINED, target="llvm", quantization="q0f16", output=tmp_path / "exact", quiet=True)
    amx = mpt_relax.build(TRAINED, target="llvm", quantization="q0f16", amx_prefill=True, output=tmp_path / "amx",
                          quiet=True)
    assert amx.name == "amx" and mpt_relax.Engine(amx, device="cpu").meta["quantization"]["tag"] == "q0f16+amx"
    logits = {a.name: mpt_relax.Engine(a, device="cpu").logits(ids) for a in (exact, amx)}
    assert rel_err(logits["exact"], ref) < 1e-3 and rel_err(logits["amx"], ref) < 2e-3
    assert (rel_err(logits["amx"], logits["exact"]) > 1e-5) == (AMX or DOTS)
    assert np.argmax(logits["amx"][-1]) == np.argmax(logits["exact"][-1])


def test_amx_prefill_tags_and_refusals():
    assert get_quantization("q0f16", amx_prefill=True).dir_tag == "q0f16-amx"
    assert get_quantization("q4f16_1", amx_prefill=True, int8_activations=True).dir_tag == "q4f16_1-a8-amx"
    with pytest.raises(QuantizationError, match="two prefill kernels; choose one"):
        get_quantization("q4f16_1", amx_prefill=True, int8_prefill=True)
