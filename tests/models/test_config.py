"""MPTConfig parsing, presets and validation."""

from __future__ import annotations

import json

import pytest

import mpt_relax
from mpt_relax.models.mpt.config import PRESETS, MPTConfig, preset

REMOTE_CODE_7B = {
    "architectures": ["MPTForCausalLM"], "model_type": "mpt", "d_model": 4096, "n_heads": 32, "n_layers": 32,
    "expansion_ratio": 4, "max_seq_len": 2048, "vocab_size": 50432, "no_bias": True, "logit_scale": None,
    "norm_type": "low_precision_layernorm", "learned_pos_emb": True, "emb_pdrop": 0, "resid_pdrop": 0,
    "attn_config": {"alibi": True, "alibi_bias_max": 8, "attn_impl": "torch", "attn_pdrop": 0,
                    "attn_type": "multihead_attention", "clip_qkv": None, "prefix_lm": False, "qk_ln": False,
                    "softmax_scale": None, "attn_uses_sequence_id": False},
    "init_config": {"name": "kaiming_normal_"}, "torch_dtype": "bfloat16", "use_cache": False,
}


def test_remote_code_config_equals_preset(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(REMOTE_CODE_7B))
    cfg = MPTConfig.from_json(tmp_path)
    assert cfg == preset("mpt-7b")
    assert cfg.num_parameters() == 6_649_286_656


def test_hf_native_spelling_and_aliases():
    from transformers import MptConfig

    hf = MptConfig(d_model=128, n_heads=8, n_layers=3, attn_config={"attn_pdrop": 0, "clip_qkv": 2.0}).to_dict()
    cfg = MPTConfig.from_dict(hf)
    assert (cfg.d_model, cfg.n_heads, cfg.n_layers, cfg.clip_qkv) == (128, 8, 3, 2.0)
    alias = MPTConfig.from_dict({"hidden_size": 64, "num_attention_heads": 4, "num_hidden_layers": 2})
    assert (alias.d_model, alias.n_heads, alias.n_layers) == (64, 4, 2)


def test_nested_attn_and_ffn_config():
    cfg = MPTConfig.from_dict({
        "d_model": 96, "n_heads": 6, "n_layers": 1,
        "attn_config": {"attn_type": "grouped_query_attention", "kv_n_heads": 2, "qk_ln": True, "alibi_bias_max": 16},
        "ffn_config": {"ffn_type": "mptmlp", "ffn_hidden_size": 200},
    })
    assert (cfg.kv_n_heads, cfg.qk_ln, cfg.alibi_bias_max, cfg.ffn_hidden_size) == (2, True, 16.0, 200)
    assert MPTConfig.from_dict({"d_model": 64, "n_heads": 4, "n_layers": 1,
                                "attn_config": {"attn_type": "multiquery_attention"}}).kv_n_heads == 1
    assert MPTConfig.from_dict(cfg.to_dict()) == cfg


def test_every_preset_and_max_seq_len_override():
    for name in PRESETS:
        cfg = preset(name)
        assert cfg.vocab_size == 50432 and cfg.alibi
    assert preset("mosaicml/mpt-7b-storywriter").max_seq_len == 65536
    assert preset("mpt-7b-instruct", max_seq_len=4096).max_seq_len == 4096
    assert preset("mpt-30b").d_model == 7168 and preset("mpt-30b").n_layers == 48
    assert preset("mpt-7b-chat").prompt_template == "chatml"
    assert preset("mpt-7b-instruct").prompt_template == "dolly"


def test_alibi_slopes_mpt7b_and_non_power_of_two():
    slopes = preset("mpt-7b").alibi_slopes()
    assert slopes[0] == 2 ** -0.25 and slopes[-1] == 2 ** -8
    six = MPTConfig(d_model=96, n_heads=6, n_layers=1).alibi_slopes()
    eight = [2 ** -(i + 1) for i in range(8)]
    assert six == (eight[1::2] + eight[0::2])[:6]


@pytest.mark.parametrize("bad, field", [
    ({"d_model": 100, "n_heads": 6}, "'d_model'"),
    ({"n_heads": 0}, "'n_heads'"),
    ({"attn_config": {"attn_type": "grouped_query_attention", "kv_n_heads": 3}}, "'kv_n_heads'"),
    ({"attn_config": {"attn_type": "grouped_query_attention"}}, "attn_config.kv_n_heads"),
    ({"attn_config": {"clip_qkv": -1}}, "'clip_qkv'"),
    ({"logit_scale": "sqrt"}, "'logit_scale'"),
    ({"norm_type": "rmsnorm"}, "'norm_type'"),
    ({"ffn_config": {"ffn_type": "mptglu"}}, "ffn_type"),
    ({"attn_config": {"prefix_lm": True}}, "prefix_lm"),
    ({"model_type": "llama"}, "model_type"),
    ({"max_seq_len": -5}, "'max_seq_len'"),
])
def test_invalid_configs_name_the_field(bad, field):
    raw = {"d_model": 64, "n_heads": 4, "n_layers": 2, **bad}
    with pytest.raises(mpt_relax.ConfigError, match=field.replace(".", r"\.")):
        MPTConfig.from_dict(raw)


def test_missing_field_and_unknown_preset(tmp_path):
    with pytest.raises(mpt_relax.ConfigError, match="'n_layers'"):
        MPTConfig.from_dict({"d_model": 64, "n_heads": 4})
    with pytest.raises(mpt_relax.ConfigError, match="unknown model 'mpt-13b'"):
        preset("mpt-13b")
    with pytest.raises(mpt_relax.ConfigError, match="no config.json"):
        MPTConfig.from_json(tmp_path)
