"""The GGUF reader: config and tokenizer from the metadata, and one clear error line for every
bad file (truncated, wrong magic or version, unsupported types, metadata the tensors contradict)."""

from __future__ import annotations

import json

import gguf
import pytest
from tokenizers import Tokenizer

import mpt_relax
from factory import hf_model
from faults.faultkit import BUILD, assert_one_line, run
from gguf_kit import TINY_MPT, tiny_mpt, write_gguf
from mpt_relax.io.gguf_file import GGUFError, GGUFFile
from mpt_relax.models.mpt.loader import WeightMapError
from mpt_relax.quantization import QuantizationError

TEXTS = ["def read_config(path):\n    return json.load(open(path))", "  two  spaces, tabs\tand ünïcödé ✓ 🙂",
         "<|endoftext|>after the special token", ""]


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    path = tmp_path_factory.mktemp("gguf") / "tiny-mpt.gguf"
    write_gguf(path, tiny_mpt(), lambda name: "Q8_0")
    return path


def _build(path, tmp_path, **kw):
    return mpt_relax.build(path, target="llvm", output=tmp_path / "art", quiet=True, **kw)


def _one_line(err: pytest.ExceptionInfo, *words: str) -> str:
    text = str(err.value)
    assert "\n" not in text and all(w in text for w in words), text
    return text


# ------------------------------------------------------------------ config, tensors, tokenizer
def test_config_and_tensors_come_from_the_metadata(tiny_gguf):
    f = GGUFFile(tiny_gguf)
    cfg = f.config()
    assert (cfg.d_model, cfg.n_heads, cfg.n_layers, cfg.vocab_size, cfg.max_seq_len, cfg.ffn_hidden_size) == (
        256, 4, 4, 4096, 512, 1024)
    assert cfg.tie_word_embeddings and cfg.no_bias and cfg.alibi and cfg.clip_qkv is None
    assert cfg.layer_norm_epsilon == 1e-5 and cfg.alibi_bias_max == 8.0  # float32 in the file, read as written
    qkv = f.tensors["blk.0.attn_qkv.weight"]
    assert (qkv.type_name, qkv.shape, qkv.raw.dtype.name, qkv.raw.shape) == ("Q8_0", (768, 256), "uint8", (768, 272))
    assert f.tensors["blk.0.attn_norm.weight"].shape == (256,) and f.name == "tiny-mpt"


def test_optional_keys_and_tensors_set_the_options(tmp_path):
    model = hf_model(tie_word_embeddings=False, attn_config={"clip_qkv": 6.0})
    write_gguf(tmp_path / "m.gguf", model, tokenizer=None,
               meta={"mpt.attention.clamp_kqv": 6.0, "mpt.attention.head_count_kv": 2, "mpt.context_length": 64})
    cfg = GGUFFile(tmp_path / "m.gguf").config()
    assert not cfg.tie_word_embeddings and cfg.clip_qkv == 6.0 and cfg.kv_n_heads == 2 and cfg.max_seq_len == 64
    assert GGUFFile(tmp_path / "m.gguf").write_tokenizer(tmp_path) == []  # no vocabulary in the file


def test_tokenizer_is_rebuilt_from_the_vocabulary(tiny_gguf, tmp_path):
    assert GGUFFile(tiny_gguf).write_tokenizer(tmp_path) == ["tokenizer.json", "special_tokens_map.json"]
    ours, theirs = Tokenizer.from_file(str(tmp_path / "tokenizer.json")), Tokenizer.from_file(str(TINY_MPT / "tokenizer.json"))
    for text in TEXTS:
        ids = theirs.encode(text).ids
        assert ours.encode(text).ids == ids, text
        assert ours.decode(ids, skip_special_tokens=False) == theirs.decode(ids, skip_special_tokens=False)
    assert ours.token_to_id("<|endoftext|>") == 0 and ours.get_added_tokens_decoder()[0].special
    specials = json.loads((tmp_path / "special_tokens_map.json").read_text())
    assert specials == {"bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>", "pad_token": "<|padding|>"}


# ------------------------------------------------------------------ bad files: one line each
def _patched(path, tmp_path, offset: int, data: bytes):
    out = tmp_path / "bad.gguf"
    blob = bytearray(path.read_bytes())
    blob[offset:offset + len(data)] = data
    out.write_bytes(bytes(blob))
    return out


def test_wrong_magic(tiny_gguf, tmp_path):
    with pytest.raises(GGUFError) as err:
        GGUFFile(_patched(tiny_gguf, tmp_path, 0, b"GGML"))
    _one_line(err, "is not a GGUF file", "b'GGML'")


def test_unsupported_version(tiny_gguf, tmp_path):
    with pytest.raises(GGUFError) as err:
        GGUFFile(_patched(tiny_gguf, tmp_path, 4, (9).to_bytes(4, "little")))
    _one_line(err, "GGUF version 9", "supported: 2, 3")


@pytest.mark.parametrize("keep", [lambda n: 12, lambda n: 200, lambda n: n // 2, lambda n: n - 1],
                         ids=["in-header", "in-metadata", "half", "last-byte"])
def test_truncated_file(tiny_gguf, tmp_path, keep):
    blob = tiny_gguf.read_bytes()
    (tmp_path / "cut.gguf").write_bytes(blob[:keep(len(blob))])
    with pytest.raises(GGUFError) as err:
        GGUFFile(tmp_path / "cut.gguf")
    _one_line(err, "truncated")


def test_truncated_file_on_the_command_line(tiny_gguf, tmp_path):
    (tmp_path / "cut.gguf").write_bytes(tiny_gguf.read_bytes()[:-100])
    proc = run([BUILD, "--model", tmp_path / "cut.gguf", "--target", "llvm", "--output", tmp_path / "art"])
    assert proc.returncode == 1
    assert_one_line(proc.stderr, "cut.gguf", "truncated")
    assert not (tmp_path / "art").exists()


def test_another_architecture(tmp_path):
    write_gguf(tmp_path / "llama.gguf", tiny_mpt(), arch="llama", tokenizer=None)
    with pytest.raises(GGUFError) as err:
        GGUFFile(tmp_path / "llama.gguf").config()
    _one_line(err, "architecture 'llama', not 'mpt'")


@pytest.mark.parametrize("meta, words", [
    ({"mpt.attention.head_count": None}, ["lacks the metadata key mpt.attention.head_count"]),
    ({"mpt.attention.head_count": 3}, ["cannot describe an MPT", "divisible"]),
    ({"mpt.block_count": "four"}, ["mpt.block_count = 'four', not an integer"]),
], ids=["missing", "invalid", "wrong-type"])
def test_bad_metadata(tmp_path, meta, words):
    write_gguf(tmp_path / "m.gguf", tiny_mpt(), meta=meta, tokenizer=None)
    with pytest.raises(GGUFError) as err:
        GGUFFile(tmp_path / "m.gguf").config()
    _one_line(err, *words)


@pytest.mark.parametrize("meta, words", [
    ({"mpt.embedding_length": 128}, ["wrong shape:", "blk.0.attn_qkv.weight expected [384, 128] found [768, 256]"]),
    ({"mpt.block_count": 5}, ["missing: blk.4.attn_norm.weight"]),
], ids=["width", "depth"])
def test_metadata_that_the_tensors_contradict(tmp_path, meta, words):
    write_gguf(tmp_path / "m.gguf", tiny_mpt(), meta=meta, tokenizer=None)
    with pytest.raises(WeightMapError) as err:
        _build(tmp_path / "m.gguf", tmp_path, quantization="q0f16")
    _one_line(err, "does not match the model config", *words)
    assert not (tmp_path / "art").exists()


def _one_weight_in(type_name: str):
    return lambda name: type_name if name == "blk.1.ffn_up.weight" else "Q8_0"


def test_a_type_the_gguf_scheme_cannot_keep(tmp_path):
    write_gguf(tmp_path / "m.gguf", tiny_mpt(), _one_weight_in("Q2_K"), tokenizer=None)
    with pytest.raises(QuantizationError) as err:
        _build(tmp_path / "m.gguf", tmp_path)
    _one_line(err, "tensor blk.1.ffn_up.weight has GGML type Q2_K", "cannot keep")


def test_a_type_that_cannot_be_dequantized(tmp_path):
    write_gguf(tmp_path / "m.gguf", tiny_mpt(), _one_weight_in("Q8_1"), tokenizer=None)
    with pytest.raises(GGUFError) as err:
        _build(tmp_path / "m.gguf", tmp_path, quantization="q0f16")
    _one_line(err, "tensor blk.1.ffn_up.weight has GGML type Q8_1, which cannot be dequantized")


def test_gguf_scheme_needs_a_gguf_file(tmp_path):
    with pytest.raises(QuantizationError) as err:
        _build(TINY_MPT, tmp_path, quantization="gguf")
    _one_line(err, "build from a .gguf file")
    with pytest.raises(QuantizationError) as err:
        _build(TINY_MPT, tmp_path, quantization="gguf", quantize_embedding=True)
    _one_line(err, "drop --quantize-embedding")


@pytest.mark.parametrize("shift, words", [(1, ["off the 32-byte alignment"]), (1 << 40, ["truncated"])],
                         ids=["misaligned", "past-the-end"])
def test_tensor_offsets_are_checked(tiny_gguf, tmp_path, shift, words):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(tiny_gguf.read_bytes())
    offset = gguf.GGUFReader(bad, "r+").tensors[0].field.parts[5]  # the first tensor's data offset, mapped
    offset[0] += shift
    offset.base.flush()
    with pytest.raises(GGUFError) as err:
        GGUFFile(bad)
    _one_line(err, *words)
