"""The Engine: integer ids only, thread safety, KV-cache capacity without lost replies, memory
checks, corrupt artifact files named, one directory version per Engine."""

from __future__ import annotations

import json
import shutil
import threading

import numpy as np
import pytest

import mpt_relax
from mpt_relax.io import artifact
from mpt_relax.runtime import engine as engine_module


@pytest.mark.parametrize("ids", [[1.7, 2.2], [True, 2], [[1, 2], [3]], np.array([[1, 2]]), np.array([1.0, 2.0]),
                                 "12", [1, "2"], [np.bool_(True)], [2**70]])
def test_logits_takes_integers_only(tiny_engine, ids):
    with pytest.raises(mpt_relax.EngineError, match="integer"):
        tiny_engine.logits(ids)
    with pytest.raises(mpt_relax.EngineError, match="integer"):
        seq = tiny_engine.add_sequence()
        try:
            tiny_engine.forward([seq], [ids])
        finally:
            tiny_engine.remove_sequence(seq)


def test_integer_kinds_are_accepted(tiny_engine):
    ref = tiny_engine.logits([1, 2, 3])
    for ids in ((1, 2, 3), np.array([1, 2, 3], np.int32), np.array([1, 2, 3], np.uint16), [np.int64(1), 2, 3]):
        np.testing.assert_array_equal(tiny_engine.logits(ids), ref)


def _work(k: int) -> dict:
    return dict(prompt=[1 + k % 50, 7, 3 + k % 11], max_new_tokens=6, temperature=0.8 if k % 2 else 0.0, seed=k,
                ignore_eos=True)


def _generate(eng, k):
    w = _work(k)
    return eng.generate(w.pop("prompt"), **w).token_ids


def test_two_threads_on_one_engine(tiny_engine):
    expected = {k: _generate(tiny_engine, k) for k in range(100)}
    got, errors = {}, []

    def worker(ks):
        try:
            for k in ks:
                got[k] = _generate(tiny_engine, k)
        except BaseException as err:  # noqa: BLE001 - reported below
            errors.append(err)

    threads = [threading.Thread(target=worker, args=(range(start, 100, 2),)) for start in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    assert not errors and got == expected
    assert tiny_engine.free_kv_pages() == tiny_engine.kv_pages  # every sequence was removed


@pytest.fixture(scope="module")
def small_engine(tiny_art):
    """An engine whose KV pool holds 4 pages of 16 tokens."""
    eng = mpt_relax.Engine(tiny_art, device="cpu", kv_memory=4 * _page_bytes(tiny_art))
    assert eng.kv_pages == 4 and eng.page_size == 16
    return eng


def _page_bytes(art):
    meta = artifact.read_config(art)
    cfg = mpt_relax.MPTConfig.from_dict(meta["model_config"])
    return engine_module.bytes_per_page(cfg, meta["model_dtype"], meta["page_size"])


def test_request_larger_than_the_free_pages_fails_before_any_work(small_engine):
    with pytest.raises(mpt_relax.KVCacheCapacityError, match="max_new_tokens=70 need 5 KV-cache pages"):
        small_engine.stream("hello", max_new_tokens=70)  # the prompt fits, prompt + new tokens do not
    assert small_engine.free_kv_pages() == 4


def test_pages_taken_mid_reply_end_it_with_length_keeping_the_text(small_engine, monkeypatch):
    reference = small_engine.generate([5, 6, 7], max_new_tokens=40, ignore_eos=True)
    forward, calls, hog = small_engine.forward, [], []

    def forward_with_a_rival(seq_ids, tokens):  # at the 5th step another user fills the pool
        calls.append(1)
        if len(calls) == 5:
            hog.append(small_engine.add_sequence())
            forward(hog, [[1] * (small_engine.free_kv_pages() * small_engine.page_size)])
        return forward(seq_ids, tokens)

    monkeypatch.setattr(small_engine, "forward", forward_with_a_rival)
    stream = small_engine.stream([5, 6, 7], max_new_tokens=40, ignore_eos=True)
    text = "".join(stream)
    result = stream.result
    assert result.finish_reason == "length" and 4 <= len(result.token_ids) < 40
    assert result.token_ids == reference.token_ids[: len(result.token_ids)] and text == result.text
    monkeypatch.undo()
    small_engine.remove_sequence(hog[0])
    assert small_engine.free_kv_pages() == 4


def test_batch_larger_than_the_pool_runs_in_waves(small_engine):
    prompts = [[3 + k, 9, 4] for k in range(6)]  # each needs 2 pages (3 + 20 tokens): 3 waves of 2
    alone = [small_engine.generate(p, max_new_tokens=20, ignore_eos=True).token_ids for p in prompts]
    batch = small_engine.generate(prompts, max_new_tokens=20, ignore_eos=True)
    assert [r.token_ids for r in batch] == alone
    assert all(r.finish_reason == "length" for r in batch) and small_engine.free_kv_pages() == 4


def test_kv_memory_beyond_the_device_is_refused_first(tiny_art, monkeypatch):
    loaded = []
    monkeypatch.setattr(engine_module.artifact, "read_params", lambda *a: loaded.append(1) or iter(()))
    with pytest.raises(mpt_relax.KVCacheCapacityError, match="exceed the .* of memory") as err:
        mpt_relax.Engine(tiny_art, device="cpu", kv_memory="200TB")
    assert "\n" not in str(err.value) and not loaded


@pytest.mark.parametrize("name,content", [("tensor-cache.json", "{oops"), ("tensor-cache.json", '{"records": 5}'),
                                          ("mpt-config.json", ""), ("mpt-config.json", "[1]"),
                                          ("mpt-config.json", None), ("tokenizer.json", '{"model": 3}')])
def test_corrupt_artifact_file_is_named(art_copy, name, content):
    path = art_copy / name
    if content is None:  # a mpt-config.json whose model config is out of range
        meta = json.loads(path.read_text())
        meta["model_config"]["layer_norm_epsilon"] = -1
        content = json.dumps(meta)
    path.write_text(content)
    with pytest.raises(mpt_relax.ArtifactError) as err:
        mpt_relax.Engine(art_copy, device="cpu")
    message = str(err.value)
    assert str(path) in message and "rebuild" in message and "\n" not in message and "/proc/" not in message


def test_engine_reads_one_version_of_the_directory(tiny_art, tiny_ckpt, tmp_path, monkeypatch):
    """A rebuild that renames a new artifact into place while an Engine loads: the Engine keeps
    reading the version it opened (config, library and weights of one build)."""
    old = shutil.copytree(tiny_art, tmp_path / "art")
    other_ckpt = mpt_relax.tools.demo.write_checkpoint(tmp_path / "ckpt2", dict(
        d_model=32, n_heads=2, n_layers=1, vocab_size=320, max_seq_len=128, expansion_ratio=2), seed=1)
    new = mpt_relax.build(other_ckpt, target="llvm", quantization="q0f32", output=tmp_path / "new", quiet=True)
    real = engine_module.load_tokenizer

    def swap_then_load(root):
        (tmp_path / "art").rename(tmp_path / "art-moved")  # what publish_directory does mid-load
        new.rename(tmp_path / "art")
        return real(root)

    monkeypatch.setattr(engine_module, "load_tokenizer", swap_then_load)
    eng = mpt_relax.Engine(old, device="cpu")
    monkeypatch.undo()
    reference = mpt_relax.Engine(tmp_path / "art-moved", device="cpu")
    np.testing.assert_array_equal(eng.logits([1, 2, 3]), reference.logits([1, 2, 3]))
