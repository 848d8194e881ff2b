"""Options HF's MptForCausalLM ignores, checked against tests/reference.py (float64 torch)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import mpt_relax
import reference
from factory import raw_checkpoint
from mpt_relax.quantization import dequantize_weight, get_quantization, quantize_weight

BASE = dict(d_model=64, n_heads=4, n_layers=2, vocab_size=256, max_seq_len=96)
CASES = {
    "alibi-bias-max-16": dict(attn_config={"alibi_bias_max": 16}),
    "qk-ln": dict(attn_config={"qk_ln": True}),
    "mqa": dict(attn_config={"attn_type": "multiquery_attention"}),
    "gqa-h6-kv2": dict(d_model=96, n_heads=6, attn_config={"attn_type": "grouped_query_attention", "kv_n_heads": 2}),
    "biases": dict(no_bias=False),
    "logit-scale-float": dict(logit_scale=0.37),
    "logit-scale-inv-sqrt": dict(logit_scale="inv_sqrt_d_model"),
    "untied-head": dict(tie_word_embeddings=False),
    "learned-pos-emb": dict(attn_config={"alibi": False}, learned_pos_emb=True),
    "ffn-hidden-size": dict(ffn_config={"ffn_type": "mptmlp", "ffn_hidden_size": 96}, expansion_ratio=3),
    "expansion-ratio-2": dict(expansion_ratio=2),
    # ragged sizes no vector width divides (d 40, hd 10, vocab 203, ffn 120): CPU schedules must degrade, not miscompile
    "ragged-sizes": dict(d_model=40, n_heads=4, vocab_size=203, expansion_ratio=3, no_bias=False,
                         attn_config={"attn_type": "grouped_query_attention", "kv_n_heads": 2, "clip_qkv": 4.0,
                                      "qk_ln": True}),
    "everything": dict(d_model=96, n_heads=6, no_bias=False, logit_scale=0.5, tie_word_embeddings=False,
                       attn_config={"attn_type": "grouped_query_attention", "kv_n_heads": 3, "qk_ln": True,
                                    "clip_qkv": 0.8, "alibi_bias_max": 4, "softmax_scale": 0.3}),
}


@pytest.mark.parametrize("name", list(CASES))
def test_matches_independent_reference(name, tmp_path, engine_for):
    config = {**BASE, **CASES[name]}
    state = raw_checkpoint(tmp_path / name, config, seed=3)
    ids = np.random.default_rng(4).integers(0, config["vocab_size"], size=48)
    ref = reference.logits(config, state, ids.tolist()).numpy()

    eng32 = engine_for(tmp_path / name)
    err32 = float(np.abs(eng32.logits(ids) - ref).max() / np.abs(ref).max())
    # incremental decoding through the cache gives the same numbers as the reference
    seq = eng32.add_sequence()
    eng32.forward([seq], [ids[:40].tolist()])
    for i in range(40, 48):
        logits = eng32.forward([seq], [[int(ids[i])]])[0]
    err_dec = float(np.abs(logits - ref[47]).max() / np.abs(ref).max())

    eng16 = engine_for(tmp_path / name, "q0f16")
    err16 = float(np.abs(eng16.logits(ids) - ref).max() / np.abs(ref).max())
    print(f"{name}: fp32 {err32:.2e} decode {err_dec:.2e} fp16 {err16:.2e}")
    assert err32 < 1e-4 and err_dec < 1e-4
    assert err16 < 2e-2


@pytest.mark.parametrize("name", ["untied-head", "learned-pos-emb"])
def test_quantized_embeddings_match_the_reference(name, tmp_path):
    """--quantize-embedding where the embeddings are lookups only (untied head, learned positions):
    the same numbers as the reference running the dequantized weights."""
    config = {**BASE, **CASES[name]}
    state = raw_checkpoint(tmp_path / name, config, seed=3)
    q = get_quantization("q8f16_1", embedding=True)
    art = mpt_relax.build(tmp_path / name, quantization=q.name, quantize_embedding=True, output=tmp_path / "art",
                          quiet=True)
    quantized = [n for n in mpt_relax.Engine(art).meta["param_names"] if n.endswith(".q_weight")]
    assert {"transformer.wte.q_weight", "lm_head.q_weight" if name == "untied-head" else "transformer.wpe.q_weight"} <= set(quantized)
    deq = {}
    for key, w in state.items():  # every 2-D tensor of MPT is a Linear weight or an embedding
        packed = quantize_weight(w.float().numpy(), q) if w.ndim == 2 else None
        deq[key] = w if packed is None else torch.from_numpy(dequantize_weight(packed["q_weight"], packed["q_scale"], q, w.shape))
    ids = np.random.default_rng(4).integers(0, config["vocab_size"], size=48)
    ref = reference.logits(config, deq, ids.tolist()).numpy()
    err = float(np.abs(mpt_relax.Engine(art).logits(ids) - ref).max() / np.abs(ref).max())
    print(f"{name} q8f16_1+embedding vs reference on dequantized weights: {err:.2e}")
    assert err < 2e-2


def test_reference_agrees_with_hf_where_hf_implements_mpt(tmp_path):
    """The oracle itself is checked once against HF on a plain MPT config."""
    from transformers import MptForCausalLM

    config = {**BASE, "attn_config": {"clip_qkv": 0.6, "attn_pdrop": 0}}
    state = raw_checkpoint(tmp_path / "plain", config, seed=5)
    hf = MptForCausalLM.from_pretrained(tmp_path / "plain").eval()
    ids = [3, 1, 4, 1, 5, 9, 2, 6]
    with torch.no_grad():
        hf_out = hf(torch.tensor([ids])).logits[0].double()
    ref = reference.logits(config, state, ids)
    assert float((hf_out - ref).abs().max() / ref.abs().max()) < 1e-5
