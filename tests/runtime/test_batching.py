"""Engine batching over the paged KV cache: a batch gives every sequence exactly the tokens it
gets alone (ragged prefill, staggered finishes, sequences joining mid-run, chunked prefill),
forked sequences, and the capacity errors. Tiny random model, LLVM."""

from __future__ import annotations

import numpy as np
import pytest

import mpt_relax
from factory import hf_checkpoint
from mpt_relax.runtime.engine import parse_bytes
from mpt_relax.runtime.kv_state import KVCacheCapacityError, bytes_per_page

PROMPTS = [[5, 17, 99], list(range(40, 57)), [7], list(range(100, 133))]  # 3, 17, 1, 33 tokens


@pytest.fixture(scope="module")
def artifact(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("batching")
    hf_checkpoint(tmp / "ckpt", seed=7, d_model=64, n_heads=4, n_layers=2, max_seq_len=128)
    return mpt_relax.build(tmp / "ckpt", target="llvm", output=tmp / "art", quantization="q0f32", quiet=True)


@pytest.fixture(scope="module")
def engine(artifact):
    return mpt_relax.Engine(artifact, device="cpu")


@pytest.fixture(scope="module")
def small_engine(artifact):
    """Forces chunked prefill and split decode batches."""
    return mpt_relax.Engine(artifact, device="cpu", max_batch_size=2, prefill_chunk_size=8)


def greedy_alone(eng: mpt_relax.Engine, prompt: list[int], steps: int) -> list[int]:
    """Greedy tokens of one sequence run by itself."""
    seq = eng.add_sequence()
    logits = eng.forward([seq], [prompt])[0]
    tokens = []
    for _ in range(steps):
        tokens.append(int(np.argmax(logits)))
        logits = eng.forward([seq], [[tokens[-1]]])[0]
    eng.remove_sequence(seq)
    return tokens


def greedy_together(eng: mpt_relax.Engine, requests: list[tuple[list[int], int, int]]) -> list[list[int]]:
    """Continuous batching: request ``(prompt, steps, join_step)`` enters the running batch at
    step ``join_step``; each step is one ``forward`` over every active sequence (prompts of
    the newcomers, the last token of the others); a sequence leaves once it has ``steps`` tokens."""
    out: list[list[int]] = [[] for _ in requests]
    active: dict[int, int] = {}  # request -> sequence id
    step = 0
    while any(len(o) < steps for o, (_, steps, _) in zip(out, requests)):
        members, seq_ids, tokens = [], [], []
        for r, (prompt, _, join) in enumerate(requests):
            if join == step:
                active[r] = eng.add_sequence()
                tokens.append(prompt)
            elif r in active:
                tokens.append([out[r][-1]])
            else:
                continue
            members.append(r)
            seq_ids.append(active[r])
        if members:
            for r, row in zip(members, eng.forward(seq_ids, tokens)):
                out[r].append(int(np.argmax(row)))
                if len(out[r]) == requests[r][1]:
                    eng.remove_sequence(active.pop(r))
        step += 1
    return out


@pytest.fixture(scope="module")
def alone(engine):
    """Single-run greedy tokens (12 steps) of every prompt."""
    tokens = [greedy_alone(engine, p, 12) for p in PROMPTS]
    assert len({t for seq in tokens for t in seq}) > 8, "degenerate random model: greedy output should vary"
    return tokens


@pytest.mark.parametrize("which", ["engine", "small_engine"])
def test_ragged_batch_gives_each_sequence_its_single_run_tokens(which, alone, request):
    eng = request.getfixturevalue(which)
    assert greedy_together(eng, [(p, 12, 0) for p in PROMPTS]) == alone
    assert eng._kv.available_pages() == eng.kv_pages  # every page given back


def test_sequences_finishing_at_different_steps(engine, alone):
    steps = [12, 4, 9, 1]
    got = greedy_together(engine, [(p, n, 0) for p, n in zip(PROMPTS, steps)])
    assert got == [a[:n] for a, n in zip(alone, steps)]


@pytest.mark.parametrize("which", ["engine", "small_engine"])
def test_sequences_joining_a_running_batch(which, alone, request):
    """Newcomers' prompts are prefilled in the same forward as the others' decode tokens."""
    eng = request.getfixturevalue(which)
    joins = [0, 3, 5, 5]
    assert greedy_together(eng, [(p, 12, j) for p, j in zip(PROMPTS, joins)]) == alone


def test_chunked_prefill_and_logits_match_unchunked(engine, small_engine):
    ids = list(range(3, 60))
    np.testing.assert_allclose(small_engine.logits(ids), engine.logits(ids), rtol=0, atol=1e-4)


def test_fork_continues_like_a_fresh_sequence_with_the_same_tokens(engine):
    prompt = PROMPTS[3]  # 33 tokens: forks mid-page and on a page boundary
    parent = engine.add_sequence()
    engine.forward([parent], [prompt])
    whole, head, boundary = engine.fork_sequence(parent), engine.fork_sequence(parent, 21), engine.fork_sequence(parent, 16)
    assert [engine.sequence_length(s) for s in (whole, head, boundary)] == [33, 21, 16]
    engine.remove_sequence(parent)  # the children keep the shared pages
    suffixes = {whole: [9, 8], head: [1, 2, 3], boundary: [4]}
    got = engine.forward(list(suffixes), list(suffixes.values()))
    for (seq, suffix), row in zip(suffixes.items(), got):
        fresh = prompt[: engine.sequence_length(seq) - len(suffix)] + suffix
        np.testing.assert_allclose(row, engine.logits(fresh)[-1], rtol=0, atol=1e-4)
        engine.remove_sequence(seq)
    with pytest.raises(mpt_relax.EngineError, match="unknown sequence id"):
        engine.fork_sequence(parent)


def test_capacity_error_before_any_work(artifact, engine):
    eng = mpt_relax.Engine(artifact, kv_memory=4 * bytes_per_page(engine.config, "float32", engine.page_size))
    assert eng.kv_pages == 4
    a, b = eng.add_sequence(), eng.add_sequence()
    eng.forward([a], [list(range(40))])  # 3 of the 4 pages
    with pytest.raises(KVCacheCapacityError, match=r"31 new tokens need 2 KV-cache pages of 16 tokens but only 1 of 4 "
                                                   r"are free .* larger kv_memory") as err:
        eng.forward([a, b], [[1], list(range(30))])
    assert "\n" not in str(err.value)
    assert (eng.sequence_length(a), eng.sequence_length(b)) == (40, 0)  # nothing ran
    eng.forward([a, b], [[1], list(range(10))])  # a stays within its 3 pages, b takes the last
    with pytest.raises(KVCacheCapacityError, match="only 0 of 4 are free"):
        eng.forward([a], [list(range(8))])
    eng.remove_sequence(a)
    assert eng.forward([b], [list(range(30))]).shape == (1, eng.vocab_size)
    with pytest.raises(KVCacheCapacityError, match=r"Engine\(kv_memory=1000\): .* holds 0 page"):
        mpt_relax.Engine(artifact, kv_memory="1KB")


def test_parse_bytes():
    assert parse_bytes(123) == 123
    assert parse_bytes("2GB") == 2 * 10**9
    assert parse_bytes("1.5 GiB") == 3 * 2**29
    assert parse_bytes("512mib") == 512 * 2**20
    with pytest.raises(mpt_relax.EngineError, match="not a size"):
        parse_bytes("lots")
