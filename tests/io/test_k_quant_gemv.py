"""The kernels on GGUF Q6_K, Q4_K and Q5_K blocks. Exact decode GEMVs: each kernel against float64
numpy on the weights ``gguf.quants`` decodes (rounded to fp16, as the layer does), and the pass
that puts it in ``batch_decode`` of llvm targets. On int8 activations: each kernel against
float64 numpy on the same quantized activations, and the pass that picks the target's kernel.
The AMX prefill matmul (where this CPU has AMX): against numpy on bf16-rounded operands."""

from __future__ import annotations

import gguf
import numpy as np
import pytest
import tvm
from tvm import relax

from factory import bf16, callees, gemv_error, rel_err
from gguf_kit import encode
from mpt_relax.compile import targets
from mpt_relax.compile.builder import quantized_model
from mpt_relax.compile.decode_gemv import select_decode_gemv
from mpt_relax.compile.amx_kernels import has_amx, has_vector_units
from mpt_relax.compile.int8_kernels import best_isa, select_int8_kernels
from mpt_relax.kernels.cpu import q4k_q5k_gemv, q6k_gemv, q6k_int8_gemv
from mpt_relax.kernels.cpu.amx_matmul import amx_matmul
from mpt_relax.kernels.cpu.int8_gemv import BLOCK_KERNEL_ATTR, quantize_activation
from mpt_relax.models.mpt.config import MPTConfig
from mpt_relax.models.mpt.model import MPTForCausalLM
from mpt_relax.quantization import fuse_dequantize_matmul, get_quantization
from mpt_relax.runtime.cpu_features import request_amx

HOST = targets.llvm_target()
INT8_ISAS = ["generic"] + (["avx512vnni"] if best_isa(HOST.target) == "avx512vnni" else [])
# block type -> (its module, exact kernel, int8 kernel)
KERNELS = {"Q6_K": (q6k_gemv, q6k_gemv.q6k_gemv, q6k_int8_gemv.q6k_int8_gemv),
           "Q4_K": (q4k_q5k_gemv, q4k_q5k_gemv.q4k_gemv, q4k_q5k_gemv.q4k_int8_gemv),
           "Q5_K": (q4k_q5k_gemv, q4k_q5k_gemv.q5k_gemv, q4k_q5k_gemv.q5k_int8_gemv)}
SHAPES = [(1, 7, 256), (3, 130, 512), (2, 64, 768)]


def _blocks(type_name: str, n_out: int, k_in: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(blocks, the float64 weights they hold) of a random [n_out, k_in] weight."""
    rng = np.random.default_rng(seed)
    raw = encode(rng.standard_normal((n_out, k_in)).astype(np.float32) * 0.1, type_name, seed=seed)
    kind = getattr(gguf.GGMLQuantizationType, type_name)
    return raw, gguf.quants.dequantize(raw, kind).reshape(n_out, k_in).astype(np.float64)


@pytest.mark.parametrize("type_name", list(KERNELS))
@pytest.mark.parametrize("out_dtype", ["float32", "float16"])
@pytest.mark.parametrize("rows, n_out, k_in", SHAPES)
def test_kernel_matches_numpy(type_name, out_dtype, rows, n_out, k_in):
    """fp32 sums of x times the blocks' weights in fp32 (not rounded to fp16 as the fused
    dequantize does: at most half an fp16 step apart, so also within 1e-3 of that)."""
    raw, w = _blocks(type_name, n_out, k_in, rows)
    x = np.random.default_rng(rows + n_out).standard_normal((rows, k_in)).astype(np.float16)
    func = KERNELS[type_name][1](n_out, k_in, "float16", out_dtype)
    assert gemv_error(func, HOST.target, (raw, x), x, w, out_dtype) < (1e-6 if out_dtype == "float32" else 1e-3)
    assert gemv_error(func, HOST.target, (raw, x), x, w.astype(np.float16), out_dtype) < 1e-3


def test_supported_shapes():
    for module in (q6k_gemv, q4k_q5k_gemv):
        assert module.supported(50432, 768) and module.supported(3, 256)
        assert not module.supported(64, 128) and not module.supported(0, 256)


def _kept_model(type_name: str, **options):
    """The 1-layer export of a GGUF model whose every 2-D weight is kept in ``type_name``."""
    cfg = MPTConfig(d_model=256, n_heads=2, n_layers=1, vocab_size=128, max_seq_len=32)
    weights = {n: type_name for n, p in MPTForCausalLM(cfg, "float16").named_parameters() if len(p.shape) == 2}
    q = get_quantization("gguf", **options).bind(weights, {n: 1 for n in weights})
    net, _ = quantized_model(cfg, q)
    mod, _ = net.export_tvm(spec=net.export_spec())
    return mod, len(weights)


@pytest.mark.parametrize("type_name", list(KERNELS))
def test_pass_rewrites_the_decode_gemvs(type_name):
    """Every decode GEMV (the tied head included) takes the kernel, prefill keeps the fused
    dequantize + NT_matmul, and so does a GPU target."""
    mod, count = _kept_model(type_name)
    mod = tvm.transform.Sequential([relax.transform.DecomposeOpsForInference(), fuse_dequantize_matmul()])(mod)
    name = KERNELS[type_name][1].__name__ + "_"
    out = select_decode_gemv(HOST)(mod)
    assert sum(c.startswith(name) for c in callees(out["batch_decode"])) == count
    assert not any(c.startswith(name) for c in callees(out["prefill"]))
    gpu = select_decode_gemv(targets.resolve_target("cuda"))(mod)
    assert not any(c.startswith(name) for c in callees(gpu["batch_decode"]))


def _compile(func):
    return tvm.compile(tvm.IRModule({"main": func.with_attr("global_symbol", "main")}), target=HOST.target)


@pytest.mark.parametrize("type_name", list(KERNELS))
@pytest.mark.parametrize("isa", INT8_ISAS)
@pytest.mark.parametrize("rows, n_out, k_in", SHAPES)
def test_int8_kernel_matches_numpy(type_name, isa, rows, n_out, k_in):
    """y = (xq * xs) @ W^T on the activations quantize_activation gives (an all-zero group included)."""
    raw, w = _blocks(type_name, n_out, k_in, rows)
    x = np.random.default_rng(n_out).standard_normal((rows, k_in)).astype(np.float16)
    x[0, 32:64] = 0
    dev = tvm.cpu()
    xq, xs, xc = (tvm.runtime.tensor(np.zeros(s, d), dev) for s, d in
                  [((rows, k_in), np.int8), ((rows, k_in // 32), np.float32), ((rows, k_in // 32), np.float32)])
    _compile(quantize_activation(k_in, 8, "float16"))["main"](tvm.runtime.tensor(x, dev), xq, xs, xc)
    expected = (xq.numpy() * np.repeat(xs.numpy(), 32, axis=1)).astype(np.float64) @ w.T
    y = tvm.runtime.tensor(np.full((rows, n_out), np.nan, np.float32), dev)
    int8 = KERNELS[type_name][2]
    _compile(int8(n_out, k_in, "float32", isa))["main"](xq, xs, tvm.runtime.tensor(raw, dev), y)
    assert rel_err(y.numpy(), expected) < 1e-6


@pytest.mark.parametrize("type_name", list(KERNELS))
def test_int8_decode_takes_the_targets_kernel(type_name):
    """gguf + int8 activations: every decode GEMV (the tied head included) is the int8 one, the
    VNNI kernel where the target has it, the generic one for x86-64-v3; prefill stays exact."""
    mod, count = _kept_model(type_name, int8_activations=True)
    int8 = KERNELS[type_name][2]
    assert sum(c.startswith(int8.__name__) for c in callees(mod["batch_decode"])) == count
    assert not any(c.startswith(int8.__name__) for c in callees(mod["prefill"]))
    for target, isa in [(HOST, INT8_ISAS[-1]), (targets.llvm_target("x86-64-v3"), "generic")]:
        out = select_int8_kernels(target)(mod)
        kernels = [f for g, f in out.functions.items() if g.name_hint.startswith(int8.__name__)]
        infos = [f.attrs[BLOCK_KERNEL_ATTR] for f in kernels]
        assert kernels and {(str(i["block"]), str(i["isa"])) for i in infos} == {(type_name, isa)}


@pytest.mark.skipif(not has_amx(HOST), reason="this CPU has no AMX-BF16: the kernel cannot run here (the exact path is tested)")
@pytest.mark.parametrize("block", ["Q4_K", "Q5_K", "Q6_K"])
@pytest.mark.parametrize("rows, n_out, k_in", [(1, 32, 256), (37, 96, 512)])
@pytest.mark.parametrize("exact", [False, True], ids=["bf16", "exact"])
def test_kernel_on_gguf_blocks(block, rows, n_out, k_in, exact):
    """GGUF Q4_K / Q5_K / Q6_K rows decoded as ``gguf.quants`` does, rounded to fp16, then to bf16
    (the bf16 kernel) or split into exact bf16 parts (the exact kernel: as close as fp32 sums)."""
    raw = encode(np.random.default_rng(rows).standard_normal((n_out, k_in)).astype(np.float32), block, seed=rows)
    w = gguf.quants.dequantize(raw, getattr(gguf.GGMLQuantizationType, block)).reshape(n_out, k_in).astype(np.float16)
    x = np.random.default_rng(n_out).standard_normal((rows, k_in)).astype(np.float16)
    expected = (x.astype(np.float64) @ w.astype(np.float64).T if exact
                else bf16(x).astype(np.float64) @ bf16(w).astype(np.float64).T)
    lib = tvm.compile(tvm.IRModule({"main": amx_matmul(n_out, k_in, 0, "float16", "float32", "float16", block, exact)
                                    .with_attr("global_symbol", "main")}), target=HOST.target)
    y = tvm.runtime.tensor(np.zeros((rows, n_out), np.float32))
    assert request_amx()  # the tile state, once per process
    lib["main"](tvm.runtime.tensor(x), tvm.runtime.tensor(raw), y)
    assert rel_err(y.numpy(), expected) < (1e-6 if exact else 1e-5)


@pytest.mark.skipif(not has_vector_units(HOST), reason="this CPU has no AVX-512: the vector kernel cannot run here")
@pytest.mark.parametrize("block", ["Q4_K", "Q5_K", "Q6_K"])
def test_vector_kernel_on_gguf_blocks(block):
    """The exact prefill kernel on AVX-512 FMAs decodes the blocks as ``gguf.quants`` does (rounded
    to fp16): fp32 sums as close to float64 as the FMA path."""
    rows, n_out, k_in = 37, 96, 512
    raw = encode(np.random.default_rng(rows).standard_normal((n_out, k_in)).astype(np.float32), block, seed=rows)
    w = gguf.quants.dequantize(raw, getattr(gguf.GGMLQuantizationType, block)).reshape(n_out, k_in).astype(np.float16)
    x = np.random.default_rng(n_out).standard_normal((rows, k_in)).astype(np.float16)
    kernel = amx_matmul(n_out, k_in, 0, "float16", "float32", "float16", block, exact=True, units="vector")
    lib = tvm.compile(tvm.IRModule({"main": kernel.with_attr("global_symbol", "main")}), target=HOST.target)
    y = tvm.runtime.tensor(np.zeros((rows, n_out), np.float32))
    lib["main"](tvm.runtime.tensor(x), tvm.runtime.tensor(raw), y)
    assert rel_err(y.numpy(), x.astype(np.float64) @ w.astype(np.float64).T) < 1e-6
