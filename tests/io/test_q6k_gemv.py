"""The exact decode GEMV on GGUF Q6_K blocks: the kernel against float64 numpy on the weights
``gguf.quants`` decodes (rounded to fp16, as the layer does), and the pass that puts it in
``batch_decode`` of llvm targets."""

from __future__ import annotations

import gguf
import numpy as np
import pytest
import tvm
from tvm import relax

from factory import callees, gemv_error
from gguf_kit import encode
from mpt_relax.compile import targets
from mpt_relax.compile.builder import quantized_model
from mpt_relax.compile.decode_gemv import select_decode_gemv
from mpt_relax.kernels.cpu.q6k_gemv import q6k_gemv, supported
from mpt_relax.models.mpt.config import MPTConfig
from mpt_relax.models.mpt.model import MPTForCausalLM
from mpt_relax.quantization import fuse_dequantize_matmul, get_quantization

HOST = targets.llvm_target()


@pytest.mark.parametrize("out_dtype", ["float32", "float16"])
@pytest.mark.parametrize("rows, n_out, k_in", [(1, 7, 256), (3, 130, 512), (2, 64, 768)])
def test_kernel_matches_numpy(out_dtype, rows, n_out, k_in):
    rng = np.random.default_rng(rows + n_out)
    raw = encode(rng.standard_normal((n_out, k_in)).astype(np.float32) * 0.1, "Q6_K", seed=rows)
    w = gguf.quants.dequantize(raw, gguf.GGMLQuantizationType.Q6_K).reshape(n_out, k_in).astype(np.float16)
    x = rng.standard_normal((rows, k_in)).astype(np.float16)
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

