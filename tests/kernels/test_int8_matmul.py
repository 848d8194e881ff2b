"""The int8-activation prefill GEMM (``--int8-prefill``): the VNNI kernel against the generic
int8 GEMV (the same math), quantize_activation's parallel rows against numpy, and the model built
with ``int8_prefill`` against HF and the exact path on the trained model."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import tvm

import mpt_relax
from factory import hf_checkpoint, rel_err, with_top_codes
from mpt_relax.compile import targets
from mpt_relax.compile.int8_kernels import best_isa
from mpt_relax.compile.targets import TargetError
from mpt_relax.io import artifact
from mpt_relax.kernels.cpu.int8_gemv import PARALLEL_ROWS, int8_gemv, quantize_activation
from mpt_relax.kernels.cpu.int8_matmul import MR, int8_matmul, supported
from mpt_relax.quantization import QuantizationError, get_quantization, quantize_weight

HOST = targets.llvm_target().target
HAS_VNNI512 = best_isa(HOST) == "avx512vnni"
TRAINED = Path(mpt_relax.__file__).resolve().parent / "data" / "tiny-mpt"


def _compile(func):
    return tvm.compile(tvm.IRModule({"main": func.with_attr("global_symbol", "main")}), target=HOST)["main"]


def _quantized_rows(x: np.ndarray, bits: int):
    dev = tvm.cpu()
    rows, k = x.shape
    out = [tvm.runtime.tensor(np.zeros(s, d), dev) for s, d in
           [((rows, k), np.int8), ((rows, k // 32), np.float32), ((rows, k // 32), np.float32)]]
    _compile(quantize_activation(k, bits, "float16"))(tvm.runtime.tensor(x, dev), *out)
    return out


@pytest.mark.parametrize("bits", [4, 8])
def test_parallel_rows_quantize_like_serial_ones(bits):
    """Rows at and above PARALLEL_ROWS take the parallel loop: the same bytes as one row at a time."""
    x = np.random.default_rng(bits).standard_normal((PARALLEL_ROWS + 3, 96)).astype(np.float16)
    x[2, 32:64] = 0
    many = [t.numpy() for t in _quantized_rows(x, bits)]
    for i in range(x.shape[0]):
        one = [t.numpy() for t in _quantized_rows(x[i:i + 1], bits)]
        for a, b in zip(many, one):
            np.testing.assert_array_equal(a[i:i + 1], b)


@pytest.mark.skipif(not HAS_VNNI512, reason="the int8 GEMM needs AVX512-VNNI; this CPU takes the GEMV kernels")
@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("rows, n_out, k_in", [(1, 64, 320), (MR + 1, 96, 768), (3 * MR, 32, 64), (37, 128, 128)])
def test_gemm_matches_the_generic_gemv(bits, rows, n_out, k_in):
    """Every row tile, the ragged last one included, equals the generic kernel's integer math
    (up to the order of the fp32 sums)."""
    rng = np.random.default_rng(bits * rows)
    packed = with_top_codes(quantize_weight(rng.standard_normal((n_out, k_in)).astype(np.float32),
                                            get_quantization(f"q{bits}f16_1")), bits)
    dev = tvm.cpu()
    qw, qs = tvm.runtime.tensor(packed["q_weight"], dev), tvm.runtime.tensor(packed["q_scale"], dev)
    x = rng.standard_normal((rows, k_in)).astype(np.float16)
    x[0, :32] = 0
    xq, xs, xc = _quantized_rows(x, bits)
    outputs = []
    for func in (int8_gemv(n_out, k_in, bits, "float32", "float16", "generic"), int8_matmul(n_out, k_in, bits, "float32")):
        y = tvm.runtime.tensor(np.full((rows, n_out), np.nan, np.float32), dev)
        _compile(func)(xq, xs, xc, qw, qs, y)
        outputs.append(y.numpy())
    assert np.isfinite(outputs[1]).all()
    assert rel_err(outputs[1], outputs[0]) < 2e-6


def test_supported_shapes():
    assert supported(768, 3072) and supported(32, 32)
    assert not supported(80, 64) and not supported(64, 48)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = tmp_path_factory.mktemp("p8") / "ckpt"
    hf_checkpoint(path, d_model=128, n_heads=4, n_layers=2, vocab_size=256, max_seq_len=64)
    return path


@pytest.fixture(scope="module")
def trained_ref():
    from transformers import MptForCausalLM

    ids = list(range(3, 70))
    with torch.inference_mode():
        hf = MptForCausalLM.from_pretrained(str(TRAINED), dtype=torch.float32).eval()
        return ids, hf(torch.tensor([ids])).logits[0].numpy()


@pytest.mark.parametrize("quantization, to_hf", [("q8f16_1", 5e-3), ("q4f16_1", 2.5e-2)])
def test_model_prefills_on_int8_activations(trained_ref, tmp_path, quantization, to_hf):
    """On the trained model the prefill logits move from the exact path by the activation
    rounding only (~3e-3 of their range; q4's own weight rounding is 2e-2 from HF fp32); the
    portable build (generic kernels) agrees up to fp16 roundings of the outputs; greedy agrees."""
    ids, ref = trained_ref
    arts = {name: mpt_relax.build(TRAINED, target="llvm", quantization=quantization, output=tmp_path / name,
                                  quiet=True, **options)
            for name, options in [("exact", {}), ("p8", {"int8_prefill": True}),
                                  ("v3", {"int8_prefill": True, "mcpu": "x86-64-v3"})]}
    assert artifact.read_config(arts["p8"])["quantization"]["tag"] == f"{quantization}+p8"
    assert artifact.read_config(arts["p8"])["quantization"]["prefill"].startswith("int8")
    logits = {name: mpt_relax.Engine(art, device="cpu").logits(ids) for name, art in arts.items()}
    assert rel_err(logits["p8"], ref) < to_hf
    assert 1e-5 < rel_err(logits["p8"], logits["exact"]) < 5e-3
    assert rel_err(logits["v3"], logits["p8"]) < 2e-3
    assert len({int(np.argmax(logits[n][-1])) for n in logits}) == 1


def test_refused_where_it_cannot_run(tiny, tmp_path):
    with pytest.raises(TargetError, match="CPU kernels.*--int8-prefill"):
        mpt_relax.build(tiny, target="cuda", quantization="q8f16_1", int8_prefill=True, output=tmp_path / "x")
    with pytest.raises(QuantizationError, match="int8 prefill needs q4f16_1 or q8f16_1"):
        get_quantization("q0f32", int8_prefill=True)
    with pytest.raises(QuantizationError, match="choose one"):
        get_quantization("q4f16_1", amx_prefill=True, int8_prefill=True)
    assert not (tmp_path / "x").exists()
