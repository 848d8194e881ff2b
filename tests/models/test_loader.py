"""Checkpoint formats and the weight map's errors."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import mpt_relax
from factory import hf_checkpoint


def _split_state(model) -> list[dict[str, torch.Tensor]]:
    state = {k: v.contiguous() for k, v in model.state_dict().items() if k != "lm_head.weight"}
    names = sorted(state)
    return [{k: state[k] for k in names[: len(names) // 2]}, {k: state[k] for k in names[len(names) // 2:]}]


def write_bin_shards(path, model) -> None:
    path.mkdir()
    (path / "config.json").write_text(model.config.to_json_string())
    weight_map = {}
    for i, part in enumerate(_split_state(model)):
        fname = f"pytorch_model-0000{i + 1}-of-00002.bin"
        torch.save(part, path / fname)
        weight_map.update({k: fname for k in part})
    (path / "pytorch_model.bin.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


def write_safetensors_shards(path, model) -> None:
    path.mkdir()
    (path / "config.json").write_text(model.config.to_json_string())
    weight_map = {}
    for i, part in enumerate(_split_state(model)):
        fname = f"model-0000{i + 1}-of-00002.safetensors"
        save_file(part, str(path / fname))
        weight_map.update({k: fname for k in part})
    (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


def write_single_bin(path, model) -> None:
    path.mkdir()
    (path / "config.json").write_text(model.config.to_json_string())
    torch.save({k: v for part in _split_state(model) for k, v in part.items()}, path / "pytorch_model.bin")


@pytest.fixture(scope="module")
def bf16_model(tmp_path_factory):
    src = tmp_path_factory.mktemp("src")
    model = hf_checkpoint(src / "single", seed=11, dtype=torch.bfloat16)
    return model.to(torch.bfloat16), src / "single"


def test_all_formats_give_identical_logits(bf16_model, tmp_path, engine_for):
    model, single_safetensors = bf16_model
    write_bin_shards(tmp_path / "bin-shards", model)
    write_safetensors_shards(tmp_path / "st-shards", model)
    write_single_bin(tmp_path / "bin-single", model)
    ids = [1, 2, 3, 50, 60, 70, 200]
    results = {
        name: engine_for(path).logits(ids)
        for name, path in [("safetensors-single", single_safetensors), ("bin-shards", tmp_path / "bin-shards"),
                           ("safetensors-shards", tmp_path / "st-shards"), ("bin-single", tmp_path / "bin-single")]
    }
    first = results.pop("safetensors-single")
    for name, logits in results.items():
        assert np.array_equal(first, logits), name


def test_bf16_checkpoint_loads_directly_in_fp32_and_fp16(bf16_model, engine_for):
    model, path = bf16_model
    ids = [9, 8, 7, 6]
    with torch.no_grad():
        ref = model.float()(torch.tensor([ids])).logits[0].numpy()
    model.to(torch.bfloat16)
    for quant, tol in (("q0f32", 1e-4), ("q0f16", 2e-2)):
        got = engine_for(path, quant).logits(ids)
        assert np.abs(got - ref).max() / np.abs(ref).max() < tol, quant


def test_mismatched_checkpoint_lists_every_problem(tmp_path):
    model = hf_checkpoint(tmp_path / "ok", seed=1)
    state = {k: v.contiguous() for k, v in model.state_dict().items() if k != "lm_head.weight"}
    state.pop("transformer.blocks.1.norm_2.weight")
    state["transformer.blocks.0.attn.Wqkv.weight"] = torch.zeros(10, 64)
    state["transformer.extra.weight"] = torch.zeros(3)
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "config.json").write_text(model.config.to_json_string())
    save_file(state, str(bad / "model.safetensors"))
    with pytest.raises(mpt_relax.WeightMapError) as err:
        mpt_relax.build(bad, output=tmp_path / "out", quantization="q0f32", quiet=True)
    msg = str(err.value)
    assert "missing: transformer.blocks.1.norm_2.weight" in msg
    assert "unexpected: transformer.extra.weight" in msg
    assert "transformer.blocks.0.attn.Wqkv.weight expected [192, 64] found [10, 64]" in msg
    assert "\n" not in msg
    assert not (tmp_path / "out").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]


def test_index_naming_a_missing_shard(bf16_model, tmp_path):
    model, _ = bf16_model
    write_bin_shards(tmp_path / "ck", model)
    (tmp_path / "ck" / "pytorch_model-00002-of-00002.bin").unlink()
    with pytest.raises(mpt_relax.CheckpointError, match="missing shard"):
        mpt_relax.build(tmp_path / "ck", output=tmp_path / "out", quantization="q0f32", quiet=True)
