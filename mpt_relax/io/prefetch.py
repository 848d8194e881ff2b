"""Run an iterator ahead in a thread, so that the stages of a weight stream overlap.

A build reads a tensor, quantizes it and writes it; file reads and writes and the compiled
quantizer all release the GIL, so with each stage in its own thread the stream takes about as
long as its slowest stage instead of their sum.
"""

from __future__ import annotations

import queue
import threading
from typing import Iterable, Iterator, TypeVar

Item = TypeVar("Item")
_POLL_S = 0.1  # how often a blocked producer checks whether the consumer has stopped


def prefetched(items: Iterable[Item], depth: int = 1, name: str = "prefetch") -> Iterator[Item]:
    """Yield the items of ``items`` in order, produced by a thread that runs up to ``depth`` items ahead.

    An exception raised by ``items`` is raised here, at its place in the order. When the consumer
    stops early (an error, Ctrl-C, ``close()``), the thread finishes the item it is producing,
    drops the rest and exits; this generator returns once it has.
    """
    ready: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def put(entry) -> bool:
        while not stop.is_set():
            try:
                ready.put(entry, timeout=_POLL_S)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        try:
            for item in items:
                if not put((True, item)):
                    return
            put((False, None))
        except BaseException as err:  # handed to the consumer, raised there
            put((False, err))

    thread = threading.Thread(target=produce, name=name, daemon=True)
    thread.start()
    try:
        while True:
            more, item = ready.get()
            if not more:
                if item is not None:
                    raise item
                return
            yield item
            del item
    finally:
        stop.set()
        thread.join()
