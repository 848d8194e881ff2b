"""Configs of the wrong shape, type or range: one ConfigError line naming the field, nothing written."""

from __future__ import annotations

import json
import math
import shutil

import pytest
from faultkit import assert_one_line, build_main, tree_hash

import mpt_relax
from mpt_relax.models.mpt.config import MPTConfig

BASE = dict(d_model=32, n_heads=2, n_layers=1, vocab_size=320, max_seq_len=128)
BAD = [  # (config.json content, words the error line must hold)
    ([1, 2], ("JSON object", "list")),
    ({"layer_norm_epsilon": "tiny"}, ("layer_norm_epsilon", "number")),
    ({"layer_norm_epsilon": math.nan}, ("layer_norm_epsilon", "finite")),
    ({"layer_norm_epsilon": -1e-5}, ("layer_norm_epsilon",)),
    ({"expansion_ratio": "4"}, ("expansion_ratio", "number")),
    ({"expansion_ratio": math.inf}, ("expansion_ratio", "finite")),
    ({"attn_config": 5}, ("attn_config", "object")),
    ({"d_model": None}, ("d_model", "integer")),
    ({"d_model": 32.5}, ("d_model", "integer")),
    ({"n_layers": True}, ("n_layers", "integer")),
    ({"logit_scale": [1]}, ("logit_scale",)),
    ({"logit_scale": math.nan}, ("logit_scale", "finite")),
    ({"attn_config": {"alibi_bias_max": math.nan}}, ("alibi_bias_max", "finite")),
    ({"attn_config": {"clip_qkv": -1}}, ("clip_qkv",)),
    ({"attn_config": {"softmax_scale": "x"}}, ("softmax_scale", "number")),
    ({"attn_config": {"alibi": "yes"}}, ("alibi", "true or false")),
    ({"ffn_config": {"ffn_hidden_size": 0.5}}, ("ffn_hidden_size", "integer")),
    ({"vocab_size": 10**12}, ("vocab_size",)),
    ({"max_seq_len": 0}, ("max_seq_len",)),
]


def content(bad):
    return bad if isinstance(bad, list) else {"model_type": "mpt", **BASE, **bad}


@pytest.mark.parametrize("bad,words", BAD, ids=[json.dumps(b, default=str)[:40] for b, _ in BAD])
def test_bad_config_is_one_config_error(bad, words):
    with pytest.raises(mpt_relax.ConfigError) as err:
        MPTConfig.from_dict(content(bad))
    assert "\n" not in str(err.value)
    for word in words:
        assert word in str(err.value)


@pytest.mark.parametrize("bad,words", BAD[:8], ids=[json.dumps(b, default=str)[:40] for b, _ in BAD[:8]])
def test_build_cli_with_bad_config(tiny_ckpt, tmp_path, capsys, bad, words):
    ckpt = shutil.copytree(tiny_ckpt, tmp_path / "ckpt")
    (ckpt / "config.json").write_text(json.dumps(content(bad)))
    before = tree_hash(tmp_path)
    rc, err = build_main(capsys, "--model", ckpt, "--output", tmp_path / "art")
    assert rc == 1
    assert_one_line(err, "config.json", *words)
    assert tree_hash(tmp_path) == before


def test_valid_configs_still_load():
    cfg = MPTConfig.from_dict({**BASE, "expansion_ratio": 4, "attn_config": {"alibi_bias_max": 8, "clip_qkv": 0},
                               "logit_scale": "inv_sqrt_d_model", "layer_norm_epsilon": 1e-5})
    assert cfg.ffn_hidden_size == 128 and cfg.clip_qkv is None and cfg.alibi_bias_max == 8.0
