"""GGUF files for the tests, written with gguf.GGUFWriter from an HF MptForCausalLM.

``write_gguf`` stores each tensor in the type ``type_of(gguf name)`` picks: gguf.quants.quantize
where the package can encode the type, and for the K types (which it can only decode) random
blocks scaled to the tensor's spread. It returns the HF state dict of the values the file
holds (gguf.quants.dequantize of what was written): the oracle model loads those.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

import gguf
import numpy as np
import torch
from gguf import GGMLQuantizationType as T
from transformers import MptConfig, MptForCausalLM

TINY_MPT = Path(__file__).resolve().parents[2] / "mpt_relax" / "data" / "tiny-mpt"
_LAYER = {"norm_1": "attn_norm", "attn.Wqkv": "attn_qkv", "attn.out_proj": "attn_output", "norm_2": "ffn_norm",
          "ffn.up_proj": "ffn_up", "ffn.down_proj": "ffn_down"}
_TOP = {"transformer.wte": "token_embd", "transformer.norm_f": "output_norm", "lm_head": "output"}
# where a K block's float16 d (and dmin) sit, and dmin / d making the weights' mean about 0
_K_SCALES = {"Q4_K": (0, 2, 7.5), "Q5_K": (0, 2, 15.5), "Q6_K": (208, None, 0.0)}


def gguf_tensor_name(hf_name: str) -> str:
    module, suffix = hf_name.rsplit(".", 1)
    if module.startswith("transformer.blocks."):
        layer, inner = module.removeprefix("transformer.blocks.").split(".", 1)
        return f"blk.{layer}.{_LAYER[inner]}.{suffix}"
    return f"{_TOP[module]}.{suffix}"


def tiny_mpt() -> MptForCausalLM:
    """The bundled trained tiny MPT (d_model 256, 4 layers, vocab 4096) in float32."""
    return MptForCausalLM.from_pretrained(TINY_MPT, dtype=torch.float32).eval()


def encode(values: np.ndarray, type_name: str, seed: int = 0) -> np.ndarray:
    """float32 [rows, cols] -> the data a GGUF file stores for ``type_name``."""
    if type_name == "F32":
        return values.astype(np.float32)
    if type_name == "F16":
        return values.astype(np.float16)
    if type_name in _K_SCALES:
        return _random_k_blocks(values, type_name, seed)
    try:
        return gguf.quants.quantize(values, T[type_name])
    except NotImplementedError:  # a type the package cannot encode: all-zero blocks
        block, size = gguf.GGML_QUANT_SIZES[T[type_name]]
        return np.zeros((values.shape[0], values.shape[1] // block * size), np.uint8)


def _random_k_blocks(values: np.ndarray, type_name: str, seed: int) -> np.ndarray:
    block, size = gguf.GGML_QUANT_SIZES[T[type_name]]
    rows, cols = values.shape
    raw = np.random.default_rng(seed).integers(0, 256, (rows, cols // block, size), dtype=np.uint8)
    d_at, dmin_at, ratio = _K_SCALES[type_name]

    def set_scales(d: float) -> None:
        raw[..., d_at:d_at + 2] = np.float16(d).reshape(1).view(np.uint8)
        if dmin_at is not None:
            raw[..., dmin_at:dmin_at + 2] = np.float16(d * ratio).reshape(1).view(np.uint8)

    set_scales(1.0)
    spread = gguf.quants.dequantize(raw.reshape(rows, -1), T[type_name]).std()
    set_scales(float(values.std()) / spread)
    return raw.reshape(rows, -1)


def write_gguf(path: Path, model: MptForCausalLM, type_of: Callable[[str], str] = lambda name: "F32", *,
               meta: dict | None = None, tokenizer: Path | None = TINY_MPT / "tokenizer.json",
               name: str = "tiny-mpt", arch: str = "mpt") -> dict[str, torch.Tensor]:
    """Write ``model`` as a GGUF file at ``path``; ``meta`` overrides ``mpt.*`` / other keys
    (None drops one). Returns the float32 HF state dict of the values the file stores."""
    cfg: MptConfig = model.config
    keys = {"general.name": name, "mpt.context_length": cfg.max_seq_len, "mpt.embedding_length": cfg.d_model,
            "mpt.block_count": cfg.n_layers, "mpt.feed_forward_length": cfg.d_model * cfg.expansion_ratio,
            "mpt.attention.head_count": cfg.n_heads, "mpt.attention.layer_norm_epsilon": cfg.layer_norm_epsilon,
            "mpt.attention.max_alibi_bias": float(cfg.attn_config.alibi_bias_max)}
    keys.update(meta or {})
    writer = gguf.GGUFWriter(str(path), arch)
    for key, value in keys.items():
        if isinstance(value, str):
            writer.add_string(key, value)
        elif isinstance(value, int):
            writer.add_uint32(key, value)
        elif value is not None:
            writer.add_float32(key, value)
    if tokenizer is not None:
        _add_tokenizer(writer, tokenizer)
    stored = {}
    state = model.state_dict()
    for hf_name, tensor in state.items():
        if hf_name == "lm_head.weight" and cfg.tie_word_embeddings:
            continue
        gname = gguf_tensor_name(hf_name)
        values = tensor.float().numpy()
        type_name = type_of(gname) if values.ndim == 2 else "F32"
        data = encode(values, type_name, seed=len(stored))
        writer.add_tensor(gname, data, raw_dtype=None if type_name in ("F32", "F16") else T[type_name])
        try:
            stored[hf_name] = torch.from_numpy(gguf.quants.dequantize(data, T[type_name]).reshape(values.shape).copy())
        except NotImplementedError:  # a type the package cannot decode either: no oracle values
            pass
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    if cfg.tie_word_embeddings and "transformer.wte.weight" in stored:
        stored["lm_head.weight"] = stored["transformer.wte.weight"]
    return stored


def _add_tokenizer(writer: gguf.GGUFWriter, path: Path) -> None:
    spec = json.loads(path.read_text())
    vocab = spec["model"]["vocab"]
    tokens = sorted(vocab, key=vocab.get)
    special = {t["id"] for t in spec["added_tokens"] if t["special"]}
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(tokens)
    writer.add_token_types([3 if i in special else 1 for i in range(len(tokens))])
    writer.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in spec["model"]["merges"]])
    writer.add_bos_token_id(0)
    writer.add_eos_token_id(0)
    writer.add_pad_token_id(1)


def oracle(model: MptForCausalLM, stored: dict[str, torch.Tensor]) -> MptForCausalLM:
    """``model`` with the file's (dequantized) values loaded."""
    model.load_state_dict(stored, strict=True)
    return model
