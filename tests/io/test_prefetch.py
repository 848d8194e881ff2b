"""mpt_relax.io.prefetch: items in order, errors in place, the thread gone after an early stop."""

from __future__ import annotations

import threading
import time

import pytest

from mpt_relax.io.prefetch import prefetched


def _threads(name: str) -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == name]


def test_items_in_order_and_thread_ends():
    assert list(prefetched(iter(range(50)), depth=2, name="t-order")) == list(range(50))
    assert _threads("t-order") == []


def test_runs_ahead_of_the_consumer():
    produced = []

    def items():
        for i in range(5):
            produced.append(i)
            yield i

    stream = prefetched(items(), depth=2, name="t-ahead")
    assert next(stream) == 0
    deadline = time.monotonic() + 5
    while len(produced) < 4 and time.monotonic() < deadline:  # item 0 taken, 1 and 2 queued, 3 waiting to go in
        time.sleep(0.01)
    assert produced == [0, 1, 2, 3]
    assert list(stream) == [1, 2, 3, 4]


def test_error_raised_at_its_place():
    def items():
        yield 1
        yield 2
        raise ValueError("shard 3 is corrupt")

    stream = prefetched(items(), name="t-error")
    assert [next(stream), next(stream)] == [1, 2]
    with pytest.raises(ValueError, match="shard 3 is corrupt"):
        next(stream)
    assert _threads("t-error") == []


def test_early_close_stops_the_producer():
    produced = []
    closed = threading.Event()

    def items():
        try:
            for i in range(10_000):
                produced.append(i)
                yield i
        finally:
            closed.set()

    stream = prefetched(items(), depth=1, name="t-close")
    assert next(stream) == 0
    stream.close()
    assert _threads("t-close") == []  # close() returns once the thread has exited
    assert closed.wait(5)  # the abandoned source was closed (its files released)
    assert len(produced) <= 3


def test_consumer_error_stops_the_producer():
    def consume():
        for item in prefetched(iter(range(10_000)), depth=1, name="t-consumer"):
            if item == 3:
                raise KeyboardInterrupt  # as Ctrl-C in the writing loop

    with pytest.raises(KeyboardInterrupt):
        consume()
    assert _threads("t-consumer") == []
