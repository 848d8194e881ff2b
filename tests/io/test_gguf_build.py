"""Building from a GGUF file: every kept block type decodes exactly like gguf.quants, and the
artifact's logits / greedy tokens equal HF MptForCausalLM's on the values the file holds."""

from __future__ import annotations

import json

import gguf
import numpy as np
import pytest
import torch
import tvm
from tvm import relax
from tvm.relax.frontend import nn

import mpt_relax
from mpt_relax.compile import targets
from mpt_relax.compile.amx_kernels import has_amx, has_bf16_dots
from mpt_relax.compile.builder import quantized_model
from mpt_relax.io.gguf_file import GGUFFile
from mpt_relax.models.mpt import gguf_loader
from mpt_relax.models.mpt.config import MPTConfig
from factory import callees, hf_greedy, hf_logits, hf_model, our_greedy, prefill_then_decode, rel_err
from gguf_kit import encode, oracle, tiny_mpt, write_gguf
from mpt_relax.quantization import dequantize_weight, fuse_dequantize_matmul, get_quantization, quantize_weight
from mpt_relax.quantization.gguf_blocks import BLOCK_TYPES
from mpt_relax.quantization.gguf_repack import GROUP_SCHEMES, repack
from mpt_relax.quantization.gguf_scheme import GGUFEmbedding, GGUFLinear

IDS = np.random.default_rng(3).integers(2, 4096, size=24).tolist()
# one file per family, each tensor in its own type (as llama.cpp's mixes do: Q4_K_M, ...)
LEGACY = ["Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "BF16", "F16", "F32"]
K_QUANTS = ["Q4_K", "Q5_K", "Q6_K"]


def _cycle(types: list[str]):
    order = {}

    def type_of(name: str) -> str:
        return types[order.setdefault(name, len(order)) % len(types)]

    return type_of


def _vm(mod: tvm.IRModule) -> relax.VirtualMachine:
    return relax.VirtualMachine(tvm.compile(fuse_dequantize_matmul()(mod), tvm.target.Target({"kind": "llvm"})), tvm.cpu())


@pytest.mark.parametrize("type_name", list(BLOCK_TYPES))
def test_each_block_type_decodes_like_gguf(type_name):
    rows, cols = 8, 512
    values = np.random.default_rng(1).standard_normal((rows, cols)).astype(np.float32) * 0.1
    raw = encode(values, type_name)
    expected = gguf.quants.dequantize(raw, gguf.GGMLQuantizationType[type_name]).reshape(rows, cols)
    block = BLOCK_TYPES[type_name]
    layer = GGUFLinear(cols, rows, block, "float32")
    assert layer.q_blocks.dtype == block.storage_dtype and tuple(layer.q_blocks.shape) == raw.shape
    mod, _ = layer.export_tvm(spec={"forward": {"x": nn.spec.Tensor([cols, cols], "float32")}})
    eye = np.eye(cols, dtype=np.float32)  # x = I: y = W^T, every product exact
    y = _vm(mod)["forward"](tvm.runtime.tensor(eye), tvm.runtime.tensor(raw)).numpy()
    np.testing.assert_array_equal(y.T, expected)
    assert block.bits_per_weight == 8 * raw.nbytes / values.size


def test_embedding_lookup_and_head_decode_the_rows():
    table = np.random.default_rng(2).standard_normal((64, 256)).astype(np.float32)
    raw = encode(table, "Q6_K")
    expected = gguf.quants.dequantize(raw, gguf.GGMLQuantizationType.Q6_K).reshape(table.shape)
    emb = GGUFEmbedding(64, 256, BLOCK_TYPES["Q6_K"], "float32")
    spec = {"forward": {"ids": nn.spec.Tensor([3], "int32")}, "head": {"x": nn.spec.Tensor([2, 256], "float32")}}
    vm = _vm(emb.export_tvm(spec=spec)[0])
    rows = vm["forward"](tvm.runtime.tensor(np.array([5, 0, 99], np.int32)), tvm.runtime.tensor(raw)).numpy()
    np.testing.assert_array_equal(rows, expected[[5, 0, 63]])  # out of range: clipped
    x = np.random.default_rng(4).standard_normal((2, 256)).astype(np.float32)
    np.testing.assert_allclose(vm["head"](tvm.runtime.tensor(x), tvm.runtime.tensor(raw)).numpy(), x @ expected.T,
                               rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("family", [LEGACY, K_QUANTS], ids=["legacy", "k-quants"])
def test_gguf_scheme_matches_hf_on_the_files_values(family, tmp_path):
    model = tiny_mpt()
    stored = write_gguf(tmp_path / "tiny.gguf", model, _cycle(family))
    art = mpt_relax.build(tmp_path / "tiny.gguf", target="llvm", output=tmp_path / "art", quiet=True)
    meta = json.loads((art / "mpt-config.json").read_text())
    assert meta["quantization"]["name"] == "gguf" and set(meta["quantization"]["ggml_types"]) == set(family)
    records = [r for s in json.loads((art / "tensor-cache.json").read_text())["records"] for r in s["records"]]
    kept = {r["quantization"]["source"]: r["quantization"]["ggml_type"] for r in records if "quantization" in r}
    assert kept["token_embd.weight"] == family[0] and len(kept) == 1 + 4 * 4
    repacked = {r["quantization"]["source"]: r["quantization"].get("repacked_as") for r in records if "quantization" in r}
    assert all((repacked[src] is not None) == (t in ("Q4_0", "Q8_0")) for src, t in kept.items())
    roles = {r["quantization"]["source"]: r["quantization"]["role"] for r in records if "quantization" in r}
    assert all((roles[src] == "weight") == (t == "F16") for src, t in kept.items())  # F16: a plain fp16 weight
    eng = mpt_relax.Engine(art, device="cpu")
    ref = oracle(model, stored)
    err = rel_err(eng.logits(IDS), hf_logits(ref, IDS))
    print(f"gguf {'/'.join(family)}: logits vs HF on the file's values {err:.2e}")
    assert err < 2e-2
    assert our_greedy(eng, IDS, 12) == hf_greedy(ref, IDS, 12)
    assert meta["tokenizer_files"] == ["tokenizer.json", "special_tokens_map.json"]
    reply = eng.generate("def read_config(path):", max_new_tokens=6, temperature=0.0, ignore_eos=True)
    assert len(reply.token_ids) == 6 and isinstance(reply.text, str)


@pytest.mark.parametrize("type_name", ["Q4_0", "Q8_0"])
def test_repacked_blocks_keep_every_weight(type_name):
    """Q4_0 / Q8_0 blocks as q4f16_1 / q8f16_1 codes and scales: the same float16 weights
    (Q8_0's -128 included, which becomes code 255)."""
    rows, cols = 6, 256
    values = np.random.default_rng(5).standard_normal((rows, cols)).astype(np.float32)
    raw = encode(values, type_name)
    if type_name == "Q8_0":
        raw.reshape(rows, -1, 34)[0, 0, 2] = np.uint8(128)  # q = -128
    expected = gguf.quants.dequantize(raw, gguf.GGMLQuantizationType[type_name]).reshape(rows, cols)
    packed = repack(type_name, raw, (rows, cols))
    q = get_quantization(GROUP_SCHEMES[type_name][0])
    got = dequantize_weight(packed["q_weight"], packed["q_scale"], q, (rows, cols))
    np.testing.assert_array_equal(got.astype(np.float16), expected.astype(np.float16))
    assert packed["q_weight"].shape == q.q_weight_shape(rows, cols) and packed["q_scale"].dtype == np.float16


@pytest.mark.parametrize("flags", [dict(int8_activations=True), dict(int8_prefill=True)], ids=["a8", "p8"])
def test_repacked_gguf_weights_take_the_int8_kernels(flags, tmp_path):
    """A Q4_0 / Q8_0 / Q6_K / Q4_K / Q5_K file built with an int8 kernel option: the repacked layers take it (and
    the K ones, for decode). With int8 decode activations prefill is unchanged and the decode
    step moves by their rounding only; with int8 prefill the prefill moves, and the decode over
    its cache stays close."""
    model = tiny_mpt()
    write_gguf(tmp_path / "m.gguf", model, _cycle(["Q4_1", "Q4_0", "Q8_0", "Q6_K", "Q4_K", "Q5_K"]))
    exact = mpt_relax.build(tmp_path / "m.gguf", target="llvm", output=tmp_path / "exact", quiet=True)
    fast = mpt_relax.build(tmp_path / "m.gguf", target="llvm", output=tmp_path / "fast", quiet=True, **flags)
    meta = json.loads((fast / "mpt-config.json").read_text())["quantization"]
    assert meta["tag"] == "gguf+" + ("a8" if "int8_activations" in flags else "p8")
    assert meta["repacked"] == {"Q4_0": "q4f16_1", "Q8_0": "q8f16_1"}
    (p_exact, d_exact), (p_fast, d_fast) = prefill_then_decode(exact, IDS), prefill_then_decode(fast, IDS)
    if "int8_activations" in flags:
        np.testing.assert_array_equal(p_fast, p_exact)
    else:
        assert 0 < rel_err(p_fast, p_exact) < 3e-2
    assert 0 < rel_err(d_fast, d_exact) < 3e-2


def test_k_quant_prefill_on_amx(tmp_path):
    """A Q4_K / Q5_K / Q6_K file built with --amx-prefill: its prefill projections are the tagged AMX
    kernel (bf16 products on the tiles or on ``vdpbf16ps``, the exact one where the CPU has neither);
    with bf16 products the prefill moves by their rounding only, and the decode step over that cache
    stays close."""
    model = tiny_mpt()
    write_gguf(tmp_path / "m.gguf", model, _cycle(["Q4_K", "Q5_K", "Q6_K"]))
    exact = mpt_relax.build(tmp_path / "m.gguf", target="llvm", output=tmp_path / "exact", quiet=True)
    amx = mpt_relax.build(tmp_path / "m.gguf", target="llvm", output=tmp_path / "amx", quiet=True, amx_prefill=True)
    q = gguf_loader.bind(get_quantization("gguf", amx_prefill=True), GGUFFile(tmp_path / "m.gguf"))
    net, _ = quantized_model(MPTConfig.from_dict(json.loads((amx / "mpt-config.json").read_text())["model_config"]), q)
    mod, _ = net.export_tvm(spec=net.export_spec())
    kernels = [c for c in callees(mod["prefill"]) if c.startswith("amx_matmul_gguf_")]
    assert {c[:len("amx_matmul_gguf_q4_k")] for c in kernels} == {f"amx_matmul_gguf_q{b}_k" for b in (4, 5, 6)}
    (p_exact, d_exact), (p_amx, d_amx) = prefill_then_decode(exact, IDS), prefill_then_decode(amx, IDS)
    if has_amx(targets.llvm_target()) or has_bf16_dots(targets.llvm_target()):
        assert 0 < rel_err(p_amx, p_exact) < 3e-2 and rel_err(d_amx, d_exact) < 3e-2
    else:
        np.testing.assert_array_equal(p_amx, p_exact)


def _requantized(model, scheme: str):
    """The HF model with each Linear weight (not the tied head) through ``scheme``'s quantizer."""
    q = get_quantization(scheme)
    with torch.no_grad():
        for name, mod in model.named_modules():
            if isinstance(mod, torch.nn.Linear) and name != "lm_head":
                packed = quantize_weight(mod.weight.numpy(), q)
                w = dequantize_weight(packed["q_weight"], packed["q_scale"], q, tuple(mod.weight.shape))
                mod.weight.copy_(torch.from_numpy(w))
    return model


@pytest.mark.parametrize("scheme, tol", [("q0f32", 1e-4), ("q0f16", 2e-2), ("q4f16_1", 2e-2)])
def test_our_schemes_from_a_gguf_file(scheme, tol, tmp_path):
    model = tiny_mpt()
    stored = write_gguf(tmp_path / "tiny.gguf", model, lambda name: "Q8_0")
    art = mpt_relax.build(tmp_path / "tiny.gguf", target="llvm", quantization=scheme, output=tmp_path / "art",
                          quiet=True)
    ref = oracle(model, stored)
    if scheme == "q4f16_1":
        ref = _requantized(ref, scheme)
    eng = mpt_relax.Engine(art, device="cpu")
    err = rel_err(eng.logits(IDS), hf_logits(ref, IDS))
    print(f"{scheme} from a Q8_0 file: logits vs HF {err:.2e}")
    assert err < tol
    assert our_greedy(eng, IDS, 8) == hf_greedy(ref, IDS, 8)


def test_untied_head_and_clamp_kqv(tmp_path):
    model = hf_model(seed=1, tie_word_embeddings=False, attn_config={"clip_qkv": 0.5})
    stored = write_gguf(tmp_path / "m.gguf", model, lambda name: "Q4_1" if name == "output.weight" else "Q8_0",
                        meta={"mpt.attention.clamp_kqv": 0.5}, tokenizer=None)
    art = mpt_relax.build(tmp_path / "m.gguf", target="llvm", output=tmp_path / "art", quiet=True)
    cfg = json.loads((art / "mpt-config.json").read_text())["model_config"]
    assert cfg["clip_qkv"] == 0.5 and not cfg["tie_word_embeddings"]
    eng = mpt_relax.Engine(art, device="cpu")
    ids = [i % 256 for i in IDS[:16]]
    ref = oracle(model, stored)
    assert rel_err(eng.logits(ids), hf_logits(ref, ids)) < 2e-2
    assert our_greedy(eng, ids, 8) == hf_greedy(ref, ids, 8)
