"""The decode GEMVs on GGUF Q6_K blocks. Exact: the kernel against float64 numpy on the weights
``gguf.quants`` decodes (rounded to fp16, as the layer does), and the pass that puts it in
``batch_decode`` of llvm targets. On int8 activations: each kernel against float64 numpy on the
same quantized activations, and the pass that picks the target's kernel."""

from __future__ import annotations

import gguf
import numpy as np
import pytest
import tvm
from tvm import relax

from factory import callees, gemv_error, rel_err
from gguf_kit import encode
from mpt_relax.compile import targets
from mpt_relax.compile.builder import quantized_model
from mpt_relax.compile.decode_gemv import select_decode_gemv
from mpt_relax.compile.int8_kernels import best_isa, select_int8_kernels
from mpt_relax.kernels.cpu import q6k_int8_gemv
from mpt_relax.kernels.cpu.int8_gemv import quantize_activation
from mpt_relax.kernels.cpu.q6k_gemv import q6k_gemv, supported
from mpt_relax.models.mpt.config import MPTConfig
from mpt_relax.models.mpt.model import MPTForCausalLM
from mpt_relax.quantization import fuse_dequantize_matmul, get_quantization

HOST = targets.llvm_target()
INT8_ISAS = ["generic"] + (["avx512vnni"] if best_isa(HOST.target) == "avx512vnni" else [])


def _q6k(n_out: int, k_in: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(Q6_K blocks, the float64 weights they hold) of a random [n_out, k_in] weight."""
    rng = np.random.default_rng(seed)
    raw = encode(rng.standard_normal((n_out, k_in)).astype(np.float32) * 0.1, "Q6_K", seed=seed)
    return raw, gguf.quants.dequantize(raw, gguf.GGMLQuantizationType.Q6_K).reshape(n_out, k_in).astype(np.float64)


@pytest.mark.parametrize("out_dtype", ["float32", "float16"])
@pytest.mark.parametrize("rows, n_out, k_in", [(1, 7, 256), (3, 130, 512), (2, 64, 768)])
def test_kernel_matches_numpy(out_dtype, rows, n_out, k_in):
    raw, w = _q6k(n_out, k_in, rows)
    w = w.astype(np.float16)
    x = np.random.default_rng(rows + n_out).standard_normal((rows, k_in)).astype(np.float16)
    err = gemv_error(q6k_gemv(n_out, k_in, "float16", out_dtype), HOST.target, (raw, x), x, w, out_dtype)
    assert err < (1e-6 if out_dtype == "float32" else 1e-3)


def test_supported_shapes():
    assert supported(50432, 768) and supported(3, 256)
    assert not supported(64, 128) and not supported(0, 256)


def test_pass_rewrites_the_q6_k_decode_gemvs():
    """A GGUF model kept in Q6_K: every decode GEMV (the tied head included) takes the kernel,
    prefill keeps the fused dequantize + NT_matmul, and so does a GPU target."""
    cfg = MPTConfig(d_model=256, n_heads=2, n_layers=1, vocab_size=128, max_seq_len=32)
    weights = {n: "Q6_K" for n, p in MPTForCausalLM(cfg, "float16").named_parameters() if len(p.shape) == 2}
    q = get_quantization("gguf").bind(weights, {n: 1 for n in weights})
    net, _ = quantized_model(cfg, q)
    mod, _ = net.export_tvm(spec=net.export_spec())
    mod = tvm.transform.Sequential([relax.transform.DecomposeOpsForInference(), fuse_dequantize_matmul()])(mod)
    out = select_decode_gemv(HOST)(mod)
    assert sum(c.startswith("q6k_gemv_") for c in callees(out["batch_decode"])) == len(weights)
    assert not any(c.startswith("q6k_gemv_") for c in callees(out["prefill"]))
    gpu = select_decode_gemv(targets.resolve_target("cuda"))(mod)
    assert not any(c.startswith("q6k_gemv_") for c in callees(gpu["batch_decode"]))



def _compile(func):
    return tvm.compile(tvm.IRModule({"main": func.with_attr("global_symbol", "main")}), target=HOST.target)


@pytest.mark.parametrize("isa", INT8_ISAS)
@pytest.mark.parametrize("rows, n_out, k_in", [(1, 7, 256), (3, 130, 512), (2, 64, 768)])
def test_int8_kernel_matches_numpy(isa, rows, n_out, k_in):
    """y = (xq * xs) @ W^T on the activations quantize_activation gives (an all-zero group included)."""
    raw, w = _q6k(n_out, k_in, rows)
    x = np.random.default_rng(n_out).standard_normal((rows, k_in)).astype(np.float16)
    x[0, 32:64] = 0
    dev = tvm.cpu()
    xq, xs, xc = (tvm.runtime.tensor(np.zeros(s, d), dev) for s, d in
                  [((rows, k_in), np.int8), ((rows, k_in // 32), np.float32), ((rows, k_in // 32), np.float32)])
    _compile(quantize_activation(k_in, 8, "float16"))["main"](tvm.runtime.tensor(x, dev), xq, xs, xc)
    expected = (xq.numpy() * np.repeat(xs.numpy(), 32, axis=1)).astype(np.float64) @ w.T
    y = tvm.runtime.tensor(np.full((rows, n_out), np.nan, np.float32), dev)
    _compile(q6k_int8_gemv.q6k_int8_gemv(n_out, k_in, "float32", isa))["main"](xq, xs, tvm.runtime.tensor(raw, dev), y)
    assert rel_err(y.numpy(), expected) < 1e-6


def test_int8_decode_takes_the_targets_kernel():
    """gguf + int8 activations: every Q6_K decode GEMV (the tied head included) is the int8 one,
    the VNNI kernel where the target has it, the generic one for x86-64-v3; prefill stays exact."""
    cfg = MPTConfig(d_model=256, n_heads=2, n_layers=1, vocab_size=128, max_seq_len=32)
    weights = {n: "Q6_K" for n, p in MPTForCausalLM(cfg, "float16").named_parameters() if len(p.shape) == 2}
    q = get_quantization("gguf", int8_activations=True).bind(weights, {n: 1 for n in weights})
    net, _ = quantized_model(cfg, q)
    mod, _ = net.export_tvm(spec=net.export_spec())
    assert sum(c.startswith("q6k_int8_gemv") for c in callees(mod["batch_decode"])) == len(weights)
    assert not any(c.startswith("q6k_int8_gemv") for c in callees(mod["prefill"]))
    for target, isa in [(HOST, INT8_ISAS[-1]), (targets.llvm_target("x86-64-v3"), "generic")]:
        out = select_int8_kernels(target)(mod)
        kernels = [f for g, f in out.functions.items() if g.name_hint.startswith("q6k_int8_gemv")]
        assert kernels and {str(f.attrs[q6k_int8_gemv.KERNEL_ATTR]["isa"]) for f in kernels} == {isa}
