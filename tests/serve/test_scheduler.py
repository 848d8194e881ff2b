"""The continuous-batching scheduler on a real engine, without HTTP: what each step runs,
admission by batch size and KV pages (FIFO), the queue bound, cancellation, and that the
Python API runs on it."""

from __future__ import annotations

import numpy as np
import pytest

import mpt_relax
from mpt_relax.runtime import generation
from mpt_relax.runtime.scheduler import QueueFullError, Request, RequestCancelled, Scheduler, SchedulerThread
from mpt_relax.models.mpt.templates import get_template


def ids(seed: int, n: int) -> list[int]:
    return np.random.default_rng(seed).integers(2, 300, n).tolist()


def seq(engine, prompt: list[int], n: int):
    params = mpt_relax.SamplingParams(max_new_tokens=n, ignore_eos=True)
    return generation._sequences(engine, [prompt], get_template("none"), params)[0]


class Spy:
    """Records every engine.forward as (sequence ids, token counts)."""

    def __init__(self, engine, monkeypatch):
        self.calls = []
        forward = engine.forward

        def spy(seq_ids, tokens):
            self.calls.append((list(seq_ids), [len(t) for t in tokens]))
            return forward(seq_ids, tokens)

        monkeypatch.setattr(engine, "forward", spy)


@pytest.fixture(scope="module")
def engine(serve_artifact):
    return mpt_relax.Engine(serve_artifact, device="cpu", max_batch_size=4, prefill_chunk_size=8)


@pytest.fixture(scope="module")
def whole(serve_artifact):
    """Reference: default chunking, one request at a time."""
    return mpt_relax.Engine(serve_artifact, device="cpu")


def run_all(sched: Scheduler) -> None:
    while sched.busy:
        sched.step()


def test_long_prompt_is_prefilled_in_chunks_between_decode_steps(engine, whole, monkeypatch):
    sched = Scheduler(engine)
    a = sched.submit(Request(seq(engine, ids(1, 5), 12)))
    sched.step()  # a's prefill (5 tokens), its first token
    spy = Spy(engine, monkeypatch)
    b = sched.submit(Request(seq(engine, ids(2, 30), 6)))
    for _ in range(4):  # b's 30 tokens: chunks of 8, 8, 8, 6 while a decodes every step
        sched.step()
    assert spy.calls == [([a.seq.seq_id], [1]), ([b.seq.seq_id], [8])] * 3 + \
        [([a.seq.seq_id], [1]), ([b.seq.seq_id], [6])]
    sched.step()
    assert spy.calls[-1] == ([a.seq.seq_id, b.seq.seq_id], [1, 1])  # one batched decode of both
    run_all(sched)
    for r, (p, n) in zip((a, b), ((ids(1, 5), 12), (ids(2, 30), 6))):
        assert r.seq.token_ids == whole.generate(p, max_new_tokens=n, ignore_eos=True).token_ids
    assert engine.free_kv_pages() == engine.kv_pages


def test_admission_by_kv_pages_is_fifo(serve_artifact, engine):
    page_bytes = engine.kv_memory // engine.kv_pages
    eng = mpt_relax.Engine(serve_artifact, device="cpu", max_batch_size=3, kv_memory=page_bytes * 10)
    assert eng.kv_pages == 10
    p = eng.page_size
    sched = Scheduler(eng)
    # prompt + max_new_tokens = 3 pages + 8 tokens: 4 pages each, so two fit in 10 and the third waits
    big = [sched.submit(Request(seq(eng, ids(i, 2 * p + 8), p))) for i in range(3)]
    small = sched.submit(Request(seq(eng, ids(9, 3), 2)))  # 1 page, free, but it may not overtake
    sched.step()
    assert [r.state for r in big] == ["decode", "decode", "queued"] and small.state == "queued"
    while not big[0].finished:
        sched.step()
        assert big[2].state == "queued" or big[0].finished
    sched.step()
    assert big[2].state == "decode" and small.state == "decode"
    run_all(sched)
    assert all(r.finished and r.error is None for r in big + [small])
    assert eng.free_kv_pages() == 10
    with pytest.raises(mpt_relax.KVCacheCapacityError):  # more than the whole cache: refused at once
        sched.submit(Request(seq(eng, ids(1, 6 * p), 5 * p)))


def test_batch_size_limits_the_running_set(engine):
    sched = Scheduler(engine, max_batch_size=2)
    reqs = [sched.submit(Request(seq(engine, ids(i, 4), 3))) for i in range(5)]
    sched.step()
    assert len(sched.running) == 2 and sched.queued == 3
    run_all(sched)
    assert all(r.finished for r in reqs) and engine.free_kv_pages() == engine.kv_pages


def test_queue_bound_and_cancellation_free_pages_at_the_next_step(engine):
    sched = Scheduler(engine, max_batch_size=1, max_queue=2)
    events = []
    running = sched.submit(Request(seq(engine, ids(1, 20), 50), on_event=events.append))
    sched.step()
    queued = [sched.submit(Request(seq(engine, ids(i, 4), 4))) for i in (2, 3)]
    with pytest.raises(QueueFullError):
        sched.submit(Request(seq(engine, ids(4, 4), 4)))
    sched.step()
    held = engine.free_kv_pages()
    assert held < engine.kv_pages
    sched.cancel(running)
    sched.cancel(queued[0])
    assert engine.free_kv_pages() == held  # nothing happens until the next step
    sched.step()
    assert running.finished and isinstance(running.error, RequestCancelled) and queued[0].finished
    assert events[-1].finished and isinstance(events[-1].error, RequestCancelled)
    run_all(sched)
    assert queued[1].finished and queued[1].error is None and len(queued[1].seq.token_ids) == 4
    assert engine.free_kv_pages() == engine.kv_pages and not engine._sequences


def test_python_api_runs_on_the_scheduler(engine, whole, monkeypatch):
    """Engine.generate with more prompts than max_batch_size: admitted as others finish, chunked
    prefill, the same tokens as one at a time."""
    prompts = [ids(i, 3 + 7 * i) for i in range(6)]
    steps = []
    original = Scheduler.step
    monkeypatch.setattr(Scheduler, "step", lambda self: steps.append(len(self.running)) or original(self))
    batch = engine.generate(prompts, max_new_tokens=5)
    assert max(steps) == engine.max_batch_size
    assert [r.token_ids for r in batch] == [whole.generate(p, max_new_tokens=5).token_ids for p in prompts]
    assert engine.free_kv_pages() == engine.kv_pages


def test_scheduler_thread_loads_the_engine_on_its_own_thread(serve_artifact):
    import threading

    seen = []

    def load():
        seen.append(threading.current_thread().name)
        return mpt_relax.Engine(serve_artifact, device="cpu")

    thread = SchedulerThread(load, name="sched-test").start()
    assert thread.ready.wait(60) and thread.load_error is None and seen == ["sched-test"]
    done = threading.Event()
    r = thread.submit(Request(seq(thread.engine, ids(1, 6), 5), on_event=lambda ev: ev.finished and done.set()))
    assert done.wait(60) and len(r.seq.token_ids) == 5
    thread.stop()
    assert not thread._thread.is_alive() and thread.stats["kv_pages_free"] == thread.stats["kv_pages_total"]

    failing = SchedulerThread(lambda: 1 / 0).start()
    assert failing.ready.wait(10) and isinstance(failing.load_error, ZeroDivisionError)


def test_a_failing_request_ends_alone(engine):
    sched = Scheduler(engine)
    good = sched.submit(Request(seq(engine, ids(1, 6), 6)))
    bad = sched.submit(Request(seq(engine, ids(2, 6), 6)))

    def broken(logits):
        raise RuntimeError("boom")

    bad.seq.choose = broken
    run_all(sched)
    assert isinstance(bad.error, RuntimeError) and good.error is None and len(good.seq.token_ids) == 6
    assert engine.free_kv_pages() == engine.kv_pages and not engine._sequences
