"""Tests for mpt_relax.quantization: numpy reference, packing layout, Relax layer, module rewrite."""

import numpy as np
import pytest
import tvm
from tvm import relax
from tvm.relax.frontend import nn

from mpt_relax.quantization import (
    QUANTIZATIONS,
    GroupQuantEmbedding,
    GroupQuantLinear,
    GroupQuantization,
    QuantizationError,
    dequantize_weight,
    fuse_dequantize_matmul,
    get_quantization,
    quantize_weight,
)

Q4 = QUANTIZATIONS["q4f16_1"]
Q8 = QUANTIZATIONS["q8f16_1"]
GROUP_SCHEMES = [Q4, Q8]


def unpack_codes(q_weight: np.ndarray, bits: int) -> np.ndarray:
    """Independent unpacking: uint32 [out, n] -> int64 codes [out, n * 32 / bits], element
    pack*j + k taken from bits [bits*k, bits*(k+1)) of word j."""
    pack = 32 // bits
    words = q_weight.astype(np.int64)
    codes = np.empty((words.shape[0], words.shape[1] * pack), np.int64)
    for k in range(pack):
        codes[:, k::pack] = (words >> (bits * k)) & ((1 << bits) - 1)
    return codes


def reference_dequantize(q_weight: np.ndarray, q_scale: np.ndarray, q: GroupQuantization) -> np.ndarray:
    codes = unpack_codes(q_weight, q.bits)
    scale = np.repeat(q_scale.astype(np.float32), q.group_size, axis=1)
    return (codes - q.max_int).astype(np.float32) * scale


def random_weight(shape, dtype=np.float16, std=0.02, seed=0):
    return (np.random.default_rng(seed).standard_normal(shape) * std).astype(dtype)


# ------------------------------------------------------------------------------ registry
def test_registry_fields():
    assert list(QUANTIZATIONS) == ["q0f32", "q0f16", "q4f16_1", "q8f16_1", "gguf"]
    assert (Q4.kind, Q4.bits, Q4.group_size, Q4.model_dtype, Q4.pack_factor, Q4.max_int) == (
        "group", 4, 32, "float16", 8, 7
    )
    assert (Q8.kind, Q8.bits, Q8.group_size, Q8.model_dtype, Q8.pack_factor, Q8.max_int) == (
        "group", 8, 32, "float16", 4, 127
    )
    assert not get_quantization("q0f16").is_quantized and get_quantization("q0f16").model_dtype == "float16"
    assert get_quantization("q0f32").model_dtype == "float32"
    assert Q4.q_weight_shape(12288, 4096) == (12288, 512) and Q4.q_scale_shape(12288, 4096) == (12288, 128)


def test_unknown_name_lists_valid_names():
    with pytest.raises(ValueError) as err:
        get_quantization("q4f16_0")
    message = str(err.value)
    assert "\n" not in message and "q4f16_0" in message
    assert all(name in message for name in QUANTIZATIONS)


@pytest.mark.parametrize("bits, group_size", [(3, 32), (4, 4), (4, 48)])
def test_invalid_scheme(bits, group_size):
    with pytest.raises(ValueError):
        GroupQuantization("bad", bits, "float16", group_size)
    with pytest.raises(ValueError):
        get_quantization("sparse")


# ------------------------------------------------------------------------------ numpy
def test_q4_packing_layout():
    codes = np.arange(32) % 15  # 0..14, 0..14, 0, 1
    w = (codes - 7).astype(np.float32)[None, :]  # max |w| = 7 -> scale exactly 1
    out = quantize_weight(w, Q4)
    assert out["q_weight"].dtype == np.uint32 and out["q_scale"].dtype == np.float16
    assert out["q_scale"].tolist() == [[1.0]]
    assert out["q_weight"].tolist() == [[0x76543210, 0x0EDCBA98, 0x87654321, 0x10EDCBA9]]


def test_q8_packing_layout():
    codes = 8 * np.arange(32)  # 0, 8, ..., 248
    w = (codes - 127).astype(np.float32)[None, :]  # max |w| = 127 -> scale exactly 1
    out = quantize_weight(w, Q8)
    assert out["q_scale"].tolist() == [[1.0]]
    words = out["q_weight"][0]
    assert words.shape == (8,)
    assert words[0] == 0x18100800 and words[1] == 0x38302820 and words[7] == 0xF8F0E8E0


@pytest.mark.parametrize("q", GROUP_SCHEMES, ids=lambda q: q.name)
@pytest.mark.parametrize("dtype", [np.float16, np.float32])
def test_round_trip_matches_independent_unpacking(q, dtype):
    w = random_weight((96, 256), dtype)
    out = quantize_weight(w, q)
    assert out["q_weight"].shape == (96, 256 // q.pack_factor)
    assert out["q_scale"].shape == (96, 256 // 32)
    deq = dequantize_weight(out["q_weight"], out["q_scale"], q, w.shape)
    assert deq.dtype == np.float32 and deq.shape == w.shape
    np.testing.assert_array_equal(deq, reference_dequantize(out["q_weight"], out["q_scale"], q))


@pytest.mark.parametrize("q", GROUP_SCHEMES, ids=lambda q: q.name)
def test_error_bound_and_scales(q):
    w = random_weight((64, 512), np.float32, std=1.0, seed=1)
    out = quantize_weight(w, q)
    groups = np.abs(w).reshape(64, -1, 32).max(axis=-1) / q.max_int
    np.testing.assert_array_equal(out["q_scale"], groups.astype(np.float16))
    codes = unpack_codes(out["q_weight"], q.bits)
    assert codes.min() >= 0 and codes.max() <= 2 * q.max_int
    scale = np.repeat(out["q_scale"].astype(np.float32), 32, axis=1)
    exact_scale = np.repeat(groups, 32, axis=1)
    bound = scale / 2 + q.max_int * np.abs(scale - exact_scale) + 1e-6 * scale
    deq = dequantize_weight(out["q_weight"], out["q_scale"], q, w.shape)
    assert np.all(np.abs(w - deq) <= bound)


@pytest.mark.parametrize("q", GROUP_SCHEMES, ids=lambda q: q.name)
def test_all_zero_groups(q):
    w = random_weight((4, 128), np.float32, std=1.0)
    w[0] = 0.0  # a whole zero row
    w[1, 32:64] = 0.0  # one zero group
    w[2, :32] = 1e-9  # a group whose scale underflows float16
    out = quantize_weight(w, q)
    assert np.isfinite(out["q_scale"]).all()
    assert out["q_scale"][0].tolist() == [0.0] * 4 and out["q_scale"][1, 1] == 0 and out["q_scale"][2, 0] == 0
    deq = dequantize_weight(out["q_weight"], out["q_scale"], q, w.shape)
    assert not np.isnan(deq).any()
    assert (deq[0] == 0).all() and (deq[1, 32:64] == 0).all() and (deq[2, :32] == 0).all()
    assert (unpack_codes(out["q_weight"], q.bits)[0] == q.max_int).all()


def test_quantize_weight_errors():
    with pytest.raises(ValueError, match="multiple of the group size"):
        quantize_weight(np.ones((4, 48), np.float16), Q4)
    with pytest.raises(ValueError, match="2-D"):
        quantize_weight(np.ones(64, np.float16), Q4)
    with pytest.raises(ValueError, match="does not quantize"):
        quantize_weight(np.ones((4, 64), np.float16), get_quantization("q0f16"))
    with pytest.raises(ValueError, match="non-finite"):
        quantize_weight(np.full((4, 64), np.inf, np.float32), Q8)
    out = quantize_weight(np.ones((4, 64), np.float16), Q4)
    with pytest.raises(ValueError, match="do not describe"):
        dequantize_weight(out["q_weight"], out["q_scale"], Q4, (4, 128))


# ------------------------------------------------------------------------------ relax
def compile_cpu(mod: tvm.IRModule, fuse: bool = True) -> relax.VirtualMachine:
    if fuse:
        mod = fuse_dequantize_matmul()(mod)
    return relax.VirtualMachine(tvm.compile(mod, tvm.target.Target({"kind": "llvm"})), tvm.cpu())


def run(vm: relax.VirtualMachine, *arrays: np.ndarray) -> np.ndarray:
    return vm["forward"](*[tvm.runtime.tensor(a, tvm.cpu()) for a in arrays]).numpy()


def test_group_quant_linear_parameters():
    layer = GroupQuantLinear(128, 64, Q4, bias=True)
    params = dict(layer.named_parameters())
    assert list(params) == ["q_weight", "q_scale", "bias"]
    assert params["q_weight"].shape == [64, 16] and params["q_weight"].dtype == "uint32"
    assert params["q_scale"].shape == [64, 4] and params["q_scale"].dtype == "float16"
    assert params["bias"].dtype == "float16"
    layer.to("float32")  # like nn.Linear.to: the bias follows, codes and scales do not
    assert (layer.q_weight.dtype, layer.q_scale.dtype, layer.bias.dtype) == ("uint32", "float16", "float32")
    with pytest.raises(ValueError, match="multiple of the group size"):
        GroupQuantLinear(48, 64, Q4)
    with pytest.raises(ValueError, match="does not quantize"):
        GroupQuantLinear(64, 64, get_quantization("q0f32"))


@pytest.mark.parametrize("q", GROUP_SCHEMES, ids=lambda q: q.name)
@pytest.mark.parametrize("fuse", [True, False], ids=["fused", "unfused"])
def test_group_quant_linear_matches_numpy(q, fuse):
    in_features, out_features = 128, 96
    w = random_weight((out_features, in_features), std=0.1)
    bias = random_weight((out_features,), std=0.1, seed=2)
    x = random_weight((3, in_features), std=1.0, seed=3)
    packed = quantize_weight(w, q)
    mod, _ = GroupQuantLinear(in_features, out_features, q).export_tvm(
        spec={"forward": {"x": nn.spec.Tensor([3, in_features], "float16")}}
    )
    y = run(compile_cpu(mod, fuse), x, packed["q_weight"], packed["q_scale"], bias)
    assert y.dtype == np.float16 and y.shape == (3, out_features)
    deq = dequantize_weight(packed["q_weight"], packed["q_scale"], q, w.shape)
    expected = x.astype(np.float32) @ deq.T + bias
    np.testing.assert_allclose(y.astype(np.float32), expected, rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("q", GROUP_SCHEMES, ids=lambda q: q.name)
def test_group_quant_embedding_lookup_and_head(q):
    vocab, dim = 96, 64
    packed = quantize_weight(random_weight((vocab, dim), std=0.1), q)
    table = dequantize_weight(packed["q_weight"], packed["q_scale"], q, (vocab, dim))

    class LookupThenHead(nn.Module):
        def __init__(self):
            self.wte = GroupQuantEmbedding(vocab, dim, q)

        def forward(self, ids):
            return self.wte(ids), self.wte.head(self.wte(ids))

    spec = {"forward": {"ids": nn.spec.Tensor([5], "int32")}}
    mod, params = LookupThenHead().export_tvm(spec=spec)
    assert [name for name, _ in params] == ["wte.q_weight", "wte.q_scale"]
    ids = np.array([0, 95, 7, 7, 42], np.int32)
    ids_out_of_range = np.array([-3, 96, 7, 7, 500], np.int32)  # clipped like a take in clip mode
    forward = compile_cpu(mod)["forward"]
    out = forward(*[tvm.runtime.tensor(a) for a in (ids, packed["q_weight"], packed["q_scale"])])
    rows, logits = out[0].numpy(), out[1].numpy()
    assert rows.dtype == np.float16 and logits.dtype == np.float32 and logits.shape == (5, vocab)
    np.testing.assert_array_equal(rows, table[ids].astype(np.float16))  # code * scale, rounded once to fp16
    np.testing.assert_allclose(logits, table[ids] @ table.T, rtol=1e-3, atol=1e-3)
    out = forward(*[tvm.runtime.tensor(a) for a in (ids_out_of_range, packed["q_weight"], packed["q_scale"])])
    np.testing.assert_array_equal(out[0].numpy(), table[[0, 95, 7, 7, 95]].astype(np.float16))


def test_quantize_module_with_embeddings():
    q = get_quantization("q4f16_1", embedding=True)
    assert q.tag == "q4f16_1+embedding" and Q4.tag == "q4f16_1"
    model = TinyModel()
    assert q.quantized_names(model) == {f"{p}.weight" for p in LINEAR_PATHS + ["wte"]}
    q.quantize_model(model)
    assert isinstance(model.wte, GroupQuantEmbedding)
    assert {"wte.q_weight", "wte.q_scale"} <= {name for name, _ in model.named_parameters()}
    with pytest.raises(ValueError, match="cannot quantize the embedding"):
        get_quantization("q0f16", embedding=True)


def test_embedding_in_8_bits_under_q4():
    """``embedding=8``: the Linear layers in q4f16_1, the tables in q8f16_1 (kernel options shared);
    the scheme's own bits are the plain ``embedding=True``."""
    q = get_quantization("q4f16_1", embedding=8, int8_activations=True)
    assert q.tag == "q4f16_1+embedding8+a8" and q.dir_tag == "q4f16_1-emb8-a8"
    assert q.embedding_scheme.name == "q8f16_1" and q.embedding_scheme.int8_activations
    assert get_quantization("q8f16_1", embedding=8) == get_quantization("q8f16_1", embedding=True)
    model = TinyModel()
    names = q.quantized_names(model)
    assert names.embeddings == {"wte.weight"} and "wte.weight" in names
    table = np.random.default_rng(0).standard_normal((80, 64)).astype(np.float32)
    stored = q.quantize_param("wte.weight", table, names)
    assert stored["wte.q_weight"].shape == (80, 64 * 8 // 32)
    q.quantize_model(model)
    assert model.wte.quantization.bits == 8 and model.blocks[0].attn.Wqkv.quantization.bits == 4
    with pytest.raises(QuantizationError, match="4 or 8 bits"):
        get_quantization("q4f16_1", embedding=6)


# ------------------------------------------------------------------------------ module rewrite
class Attention(nn.Module):
    def __init__(self, d: int, bias: bool):
        self.Wqkv = nn.Linear(d, 3 * d, bias=bias, dtype="float16")
        self.out_proj = nn.Linear(3 * d, d, bias=bias, dtype="float16")

    def forward(self, x):
        return self.out_proj(self.Wqkv(x))


class FFN(nn.Module):
    def __init__(self, d: int, bias: bool):
        self.up_proj = nn.Linear(d, 4 * d, bias=bias, dtype="float16")
        self.down_proj = nn.Linear(4 * d, d, bias=bias, dtype="float16")

    def forward(self, x):
        return self.down_proj(nn.op.relu(self.up_proj(x)))


class Block(nn.Module):
    def __init__(self, d: int, bias: bool):
        self.norm_1 = nn.LayerNorm(d, dtype="float16")
        self.attn = Attention(d, bias)
        self.ffn = FFN(d, bias)

    def forward(self, x):
        x = x + self.attn(self.norm_1(x))
        return x + self.ffn(x)


class TinyModel(nn.Module):
    """A stand-in for the MPT module: tied embedding, ModuleList of blocks, optional lm_head."""

    def __init__(self, d: int = 64, vocab: int = 80, n_blocks: int = 2, bias: bool = False, untied: bool = False):
        self.wte = nn.Embedding(vocab, d, dtype="float16")
        self.blocks = nn.ModuleList([Block(d, bias) for _ in range(n_blocks)])
        self.lm_head = nn.Linear(d, vocab, bias=False, dtype="float16") if untied else None

    def forward(self, x):
        for block in self.blocks:
            x = block(x)
        if self.lm_head is not None:
            return self.lm_head(x)
        return nn.op.matmul(x, nn.op.permute_dims(self.wte.weight))


LINEAR_PATHS = [
    f"blocks.{i}.{m}" for i in range(2) for m in ("attn.Wqkv", "attn.out_proj", "ffn.up_proj", "ffn.down_proj")
]


def test_quantize_module_replaces_linears_only():
    model = TinyModel(bias=True, untied=True)
    float_names = {name for name, _ in model.named_parameters()}
    assert Q4.quantized_names(model) == {f"{p}.weight" for p in LINEAR_PATHS + ["lm_head"]}
    assert Q4.quantize_model(model) is model
    assert isinstance(model.blocks[1].attn.Wqkv, GroupQuantLinear)
    assert isinstance(model.blocks[0].ffn.down_proj, GroupQuantLinear) and isinstance(model.lm_head, GroupQuantLinear)
    assert isinstance(model.wte, nn.Embedding) and isinstance(model.blocks[0].norm_1, nn.LayerNorm)
    params = dict(model.named_parameters())
    expected = set(float_names)
    for path in LINEAR_PATHS + ["lm_head"]:
        expected.remove(f"{path}.weight")
        expected |= {f"{path}.q_weight", f"{path}.q_scale"}
    assert set(params) == expected
    assert params["blocks.0.attn.Wqkv.q_weight"].shape == [192, 8]
    assert params["blocks.0.attn.Wqkv.q_scale"].shape == [192, 2]
    assert params["blocks.0.attn.Wqkv.bias"].dtype == "float16"
    assert params["wte.weight"].dtype == "float16" and params["wte.weight"].shape == [80, 64]
    assert Q4.quantized_names(model) == {f"{p}.weight" for p in LINEAR_PATHS + ["lm_head"]}


def test_quantize_module_without_quantization_and_errors():
    model = TinyModel()
    names = [name for name, _ in model.named_parameters()]
    assert get_quantization("q0f16").quantize_model(model) is model
    assert [name for name, _ in model.named_parameters()] == names
    assert isinstance(model.blocks[0].attn.Wqkv, nn.Linear)
    with pytest.raises(ValueError, match=r"blocks\.0\.attn\.Wqkv: .*multiple of the group size"):
        Q4.quantize_model(TinyModel(d=48))


def test_quantize_param_names_and_dtypes():
    linears = Q4.quantized_names(TinyModel(bias=True))
    w = random_weight((192, 64), np.float32)
    out = Q4.quantize_param("blocks.0.attn.Wqkv.weight", w, linears)
    assert set(out) == {"blocks.0.attn.Wqkv.q_weight", "blocks.0.attn.Wqkv.q_scale"}
    assert out["blocks.0.attn.Wqkv.q_weight"].dtype == np.uint32
    assert out["blocks.0.attn.Wqkv.q_weight"].shape == (192, 8)
    assert out["blocks.0.attn.Wqkv.q_scale"].dtype == np.float16
    assert out["blocks.0.attn.Wqkv.q_scale"].shape == (192, 2)
    others = {"wte.weight": (80, 64), "blocks.1.norm_1.weight": (64,), "blocks.0.attn.Wqkv.bias": (192,)}
    for name, shape in others.items():
        kept = Q8.quantize_param(name, np.ones(shape, np.float32), linears)
        assert list(kept) == [name] and kept[name].dtype == np.float16 and kept[name].shape == shape
    plain = get_quantization("q0f32").quantize_param("blocks.0.attn.Wqkv.weight", w, linears)
    assert list(plain) == ["blocks.0.attn.Wqkv.weight"] and plain["blocks.0.attn.Wqkv.weight"].dtype == np.float32


def fused_kernel_names(mod: tvm.IRModule) -> list[str]:
    """Names of the PrimFuncs that the forward function calls after fusion."""
    with tvm.target.Target({"kind": "llvm"}):
        mod = tvm.transform.Sequential(
            [
                fuse_dequantize_matmul(),
                relax.transform.LegalizeOps(),
                relax.transform.AnnotateTIROpPattern(),
                relax.transform.FuseOps(),
                relax.transform.FuseTIR(),
            ]
        )(mod)
    calls = []

    def visit(expr):
        if isinstance(expr, relax.Call) and expr.op.name == "relax.call_tir":
            calls.append(expr.args[0].name_hint)

    relax.analysis.post_order_visit(mod["forward"].body, visit)
    return calls


@pytest.mark.parametrize("q", GROUP_SCHEMES, ids=lambda q: q.name)
def test_quantized_model_end_to_end(q):
    """Float weights -> quantize_param (as the loader will) -> compiled quantized model -> numpy."""
    d, vocab, n = 64, 80, 3
    model = TinyModel(d, vocab)
    float_params = [
        (name, random_weight(p.shape, np.float32, std=0.05, seed=i))
        for i, (name, p) in enumerate(model.named_parameters())
    ]
    linears = q.quantized_names(model)
    arrays = {}
    for name, array in float_params:
        arrays.update(q.quantize_param(name, array, linears))
    mod, params = q.quantize_model(model).export_tvm(spec={"forward": {"x": nn.spec.Tensor([n, d], "float16")}})
    assert [name for name, _ in params] == list(arrays)

    kernels = fused_kernel_names(mod)
    assert not [k for k in kernels if "dequantize" in k and "NT_matmul" not in k]
    assert sum("dequantize" in k for k in kernels) == len(LINEAR_PATHS)
    assert sum("dequantize" in k and k.endswith("_relu") for k in kernels) == 2  # epilogues join in
    assert sum("dequantize" in k and k.endswith("_add") for k in kernels) == 4  # residual adds
    assert kernels[-1].startswith("NT_matmul")  # the tied head: transpose folded, not quantized

    x = random_weight((n, d), std=1.0, seed=99)
    y = run(compile_cpu(mod), x, *arrays.values())

    weights = {name: a.astype(np.float32) for name, a in arrays.items()}
    for path in LINEAR_PATHS:
        shape = dict(float_params)[f"{path}.weight"].shape
        weights[f"{path}.weight"] = dequantize_weight(arrays[f"{path}.q_weight"], arrays[f"{path}.q_scale"], q, shape)
    h = x.astype(np.float32)
    for i in range(2):
        p = f"blocks.{i}."
        normed = (h - h.mean(-1, keepdims=True)) / np.sqrt(h.var(-1, keepdims=True) + 1e-5)
        normed = normed * weights[p + "norm_1.weight"] + weights[p + "norm_1.bias"]
        h = h + normed @ weights[p + "attn.Wqkv.weight"].T @ weights[p + "attn.out_proj.weight"].T
        h = h + np.maximum(h @ weights[p + "ffn.up_proj.weight"].T, 0) @ weights[p + "ffn.down_proj.weight"].T
    expected = h @ weights["wte.weight"].T
    assert y.shape == (n, vocab)
    assert np.linalg.norm(y.astype(np.float32) - expected) <= 5e-3 * np.linalg.norm(expected)
