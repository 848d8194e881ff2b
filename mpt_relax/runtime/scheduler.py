"""Continuous batching: many generations share every step of one engine.

A :class:`Scheduler` keeps generations (:class:`Request`) in a FIFO queue and a running set.
Requests join and leave between steps. One :meth:`Scheduler.step`:

1. drops the requests cancelled since the last step: their engine sequences, and so their KV
   pages, are freed here;
2. admits queued requests, oldest first, while fewer than ``max_batch_size`` run and the KV
   pages the oldest one may need (prompt + ``max_new_tokens``) are free once the running
   requests' remaining needs are set aside. A request that does not fit waits, and so do the
   ones behind it (no overtaking);
3. decodes: every running request that has a sampled token to feed gets it appended, all in
   one ``engine.forward`` of one token per sequence (one ``batch_decode`` call);
4. prefills one chunk: at most ``prefill_chunk_size`` prompt tokens of the requests still
   being prefilled, oldest first, in one ragged ``engine.forward``; a long prompt is thus
   spread over several steps and never stalls the decoding requests for more than a chunk.
   A request whose prompt is complete samples its first token.

What happens to one token (sampling, stop tokens and strings, incremental detokenization,
the result) is the business of the sequence object a request carries, generation's
``_Sequence``; the scheduler only decides which sequences run when. The Python API
(``Engine.generate`` / ``stream`` / ``chat``) drives a private Scheduler on the caller's
thread; the server drives one from a :class:`SchedulerThread`, the only thread that touches
its engine.

Engine contract: ``add_sequence``, ``remove_sequence``, ``forward``; for page accounting also
``page_size``, ``kv_pages``, ``free_kv_pages()`` and ``sequence_length`` (an engine without
``page_size`` is treated as unbounded), and ``max_batch_size`` / ``prefill_chunk_size`` for the
defaults.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from typing import Any, Callable, Iterable

import numpy as np

from mpt_relax.errors import MPTRelaxError
from mpt_relax.runtime.kv_state import KVCacheCapacityError, pages_to_append

log = logging.getLogger(__name__)
QUEUED, PREFILL, DECODE, DONE = "queued", "prefill", "decode", "done"


class SchedulerError(MPTRelaxError):
    """The scheduler cannot take a request now (full queue, not started, shutting down)."""


class QueueFullError(SchedulerError):
    """The wait queue holds ``max_queue`` requests already; try again later."""


class SchedulerClosedError(SchedulerError):
    """The scheduler is not running (still loading, failed to load, or shutting down)."""


class RequestCancelled(SchedulerError):
    """The request was cancelled (by its client or by shutdown) before it finished."""


class Request:
    """One generation handed to a scheduler.

    ``seq``: the sequence state (generation's ``_Sequence``); its ``seq_id`` may name an engine
    sequence that already holds tokens (a chat turn), else one is added on admission.
    ``keep``: leave the engine sequence in place when the request ends (the caller frees it).
    ``top_logprobs``: None for no log-probabilities, else how many alternatives per token.
    ``on_event``: called on the stepping thread with each :class:`Event` of this request.
    """

    def __init__(self, seq, *, keep: bool = False, top_logprobs: int | None = None,
                 on_event: Callable[["Event"], None] | None = None, tag: Any = None):
        self.seq = seq
        self.keep = keep
        self.top_logprobs = top_logprobs
        self.on_event = on_event
        self.tag = tag
        self.state = QUEUED
        self.cancelled = False
        self.error: BaseException | None = None
        self.prefilled = 0  # tokens of seq.feed in the cache
        self.held = 0  # tokens the engine sequence held when the request was admitted
        self.pages_needed = 0  # pages the request may add, reserved on admission
        self.t_submit = time.perf_counter()
        self.t_admit = self.t_last = 0.0

    @property
    def finished(self) -> bool:
        return self.state == DONE

    def _appended(self) -> int:
        """Tokens this request has added to its engine sequence so far."""
        return self.prefilled + self.seq.fed

    def _pages_outstanding(self, page_size: int) -> int:
        """Pages reserved for the request that it has not taken yet."""
        return self.pages_needed - pages_to_append(self.held, self._appended(), page_size)


class Event:
    """What one step did for one request: a sampled token (``token_id``, the text ``piece`` it
    completed, maybe "", and its ``logprobs`` entry when asked for), and/or the end
    (``finished``; ``error`` set when it failed or was cancelled)."""

    __slots__ = ("request", "token_id", "piece", "logprobs", "finished", "error", "time")

    def __init__(self, request: Request, token_id: int | None = None, piece: str = "", logprobs=None,
                 finished: bool = False, error: BaseException | None = None):
        self.request, self.token_id, self.piece, self.logprobs = request, token_id, piece, logprobs
        self.finished, self.error, self.time = finished, error, time.perf_counter()


def token_logprobs(logits: np.ndarray, token_id: int, top: int) -> dict:
    """``{"token_id", "logprob", "top": [(id, logprob), ...]}`` from one row of logits (the
    model's distribution, before any sampling transform)."""
    x = logits.astype(np.float64)
    shifted = x - x.max()
    logp = shifted - np.log(np.exp(shifted).sum())
    best = []
    if top > 0:
        ids = np.argpartition(-logp, min(top, logp.size - 1))[:top]
        ids = ids[np.argsort(-logp[ids], kind="stable")]
        best = [(int(i), float(logp[i])) for i in ids]
    return {"token_id": int(token_id), "logprob": float(logp[token_id]), "top": best}


class Scheduler:
    """Continuous batching over one engine (see the module docstring).

    :meth:`submit` and :meth:`cancel` may be called from any thread; :meth:`step` (and
    :meth:`close`) from one thread at a time, the one that owns the engine.
    ``max_queue``: most requests waiting for admission (None: no limit).
    """

    def __init__(self, engine, *, max_batch_size: int | None = None, prefill_chunk_size: int | None = None,
                 max_queue: int | None = None):
        self.engine = engine
        self.max_batch_size = max_batch_size or getattr(engine, "max_batch_size", 8)
        chunk = getattr(engine, "prefill_chunk_size", None)
        self.prefill_chunk_size = min(x for x in (prefill_chunk_size, chunk, 1 << 30) if x)
        self.max_queue = max_queue
        self.page_size = getattr(engine, "page_size", None)  # None: no page accounting
        self.running: list[Request] = []
        self._queue: collections.deque[Request] = collections.deque()
        self._cond = threading.Condition()
        self._cancels = 0
        self._woken = False
        self.closed = False
        self.steps = 0
        self.tokens_generated = 0
        self.prompt_tokens = 0

    # ------------------------------------------------------------ any thread
    @property
    def queued(self) -> int:
        return len(self._queue)

    @property
    def busy(self) -> bool:
        """Whether a step would do anything."""
        return bool(self.running or self._queue or self._cancels)

    def submit(self, request: Request) -> Request:
        """Queue ``request``. Raises :class:`QueueFullError` when ``max_queue`` wait already,
        :class:`SchedulerClosedError` after :meth:`close`, and KVCacheCapacityError when the
        request needs more KV pages than the whole cache has (it could never run)."""
        if self.page_size is not None and request.seq.seq_id is None:
            need = pages_to_append(0, len(request.seq.feed) + request.seq.params.max_new_tokens, self.page_size)
            if need > self.engine.kv_pages:
                raise KVCacheCapacityError(
                    f"{len(request.seq.feed)} prompt tokens + {request.seq.params.max_new_tokens} new tokens need "
                    f"{need} KV-cache pages of {self.page_size} tokens but the cache has {self.engine.kv_pages}; "
                    "shorten the request or create the Engine with a larger kv_memory"
                )
        with self._cond:
            if self.closed:
                raise SchedulerClosedError("the scheduler is shut down and takes no more requests")
            if self.max_queue is not None and len(self._queue) >= self.max_queue:
                raise QueueFullError(f"{len(self._queue)} requests are waiting already (max_queue={self.max_queue})")
            request.t_submit = time.perf_counter()
            request.seq.t_start = request.t_submit
            self._queue.append(request)
            self._cond.notify_all()
        return request

    def cancel(self, request: Request) -> None:
        """Stop ``request``; its sequence and pages are freed at the next step."""
        with self._cond:
            if request.state != DONE and not request.cancelled:
                request.cancelled = True
                self._cancels += 1
                self._cond.notify_all()

    def wait_for_work(self, timeout: float | None = None) -> bool:
        """Block until a step has something to do (or ``timeout``); returns :attr:`busy`."""
        with self._cond:
            self._cond.wait_for(lambda: self.busy or self._woken, timeout)
            self._woken = False
            return self.busy

    def wake(self) -> None:
        """End a :meth:`wait_for_work` early (e.g. to let its thread see a stop request)."""
        with self._cond:
            self._woken = True
            self._cond.notify_all()

    # ------------------------------------------------------------ the stepping thread
    def step(self) -> list[Event]:
        """One scheduling step; returns its events (also handed to each request's ``on_event``)."""
        events: list[Event] = []
        self._reap(events)
        self._admit(events)
        decoding = [r for r in self.running if r.state == DECODE]
        if decoding:
            self._forward(decoding, [[r.seq.token_ids[-1]] for r in decoding], events, decode=True)
        chunk = self._prefill_chunk()
        if chunk:
            self._forward([r for r, _ in chunk], [p for _, p in chunk], events, decode=False)
        self.running = [r for r in self.running if r.state != DONE]
        self.steps += 1
        for ev in events:
            if ev.request.on_event is not None:
                ev.request.on_event(ev)
        return events

    def close(self, error: BaseException | None = None) -> list[Event]:
        """Cancel every request (queued and running), free their sequences, take no more."""
        with self._cond:
            self.closed = True
            for r in list(self._queue) + self.running:
                if not r.cancelled and r.state != DONE:
                    r.cancelled = True
                    self._cancels += 1
        events: list[Event] = []
        self._reap(events, error)
        for ev in events:
            if ev.request.on_event is not None:
                ev.request.on_event(ev)
        return events

    def _reap(self, events: list[Event], error: BaseException | None = None) -> None:
        with self._cond:
            if not self._cancels:
                return
            queued = [r for r in self._queue if r.cancelled]
            self._queue = collections.deque(r for r in self._queue if not r.cancelled)
            self._cancels = 0
        for r in queued + [r for r in self.running if r.cancelled]:
            self._finish(r, events, error or RequestCancelled("the request was cancelled"))
        self.running = [r for r in self.running if r.state != DONE]

    def _admit(self, events: list[Event]) -> None:
        while len(self.running) < self.max_batch_size:
            with self._cond:
                if not self._queue:
                    return
                r = self._queue[0]
            try:
                if not self._fits(r):
                    if self.running:
                        return  # wait for running requests to free pages
                    raise KVCacheCapacityError(
                        f"the request needs {r.pages_needed} KV-cache pages but only {self.engine.free_kv_pages()} are "
                        "free and nothing else is running to free more; remove other sequences or enlarge kv_memory"
                    )
                if r.seq.seq_id is None:
                    r.seq.seq_id = self.engine.add_sequence()
            except Exception as err:  # noqa: BLE001 - the request fails, the scheduler goes on
                with self._cond:
                    self._queue.popleft()
                self._finish(r, events, err)
                continue
            with self._cond:
                self._queue.popleft()
            r.state, r.t_admit = PREFILL, time.perf_counter()
            self.running.append(r)

    def _fits(self, r: Request) -> bool:
        """Set ``r``'s page reservation; whether it fits beside the running requests' reservations."""
        if self.page_size is None:
            return True
        r.held = self.engine.sequence_length(r.seq.seq_id) if r.seq.seq_id is not None else 0
        r.pages_needed = pages_to_append(r.held, len(r.seq.feed) + r.seq.params.max_new_tokens, self.page_size)
        outstanding = sum(x._pages_outstanding(self.page_size) for x in self.running)
        return r.pages_needed <= self.engine.free_kv_pages() - outstanding

    def _prefill_chunk(self) -> list[tuple[Request, list[int]]]:
        """This step's prefill: for each prefilling request (in order) its next piece up to the next
        multiple of ``prefill_chunk_size`` of its own prompt, if the whole piece fits the room left.

        Pieces never straddle a request's own chunk boundaries, so a prompt is cut where a run of
        it alone cuts it and its attention sums (cached prefix + this chunk) are the same: batching
        does not change its tokens. The first prefilling request always fits an empty chunk.
        """
        chunk, room, size = [], self.prefill_chunk_size, self.prefill_chunk_size
        for r in self.running:
            if r.state != PREFILL:
                continue
            n = min(len(r.seq.feed) - r.prefilled, size - r.prefilled % size)
            if n > room:
                continue
            chunk.append((r, r.seq.feed[r.prefilled : r.prefilled + n]))
            room -= n
        return chunk

    def _forward(self, reqs: list[Request], tokens: list[list[int]], events: list[Event], decode: bool) -> None:
        try:
            logits = self.engine.forward([r.seq.seq_id for r in reqs], tokens)
        except KVCacheCapacityError as err:
            if not decode:
                for r in reqs:
                    self._finish(r, events, err)
                return
            # another user of the engine took the pages reserved for these replies: end them as if
            # max_new_tokens were reached, keeping every token and character they produced
            for r in reqs:
                r.seq.t_end = time.perf_counter()
                self._finish(r, events, None, Event(r, None, r.seq.cut_short(), finished=True))
            return
        except Exception as err:  # noqa: BLE001 - every request of the forward fails; the others go on
            for r in reqs:
                self._finish(r, events, err)
            return
        now = time.perf_counter()
        for r, row, fed in zip(reqs, logits, tokens):
            if decode:
                r.seq.fed += 1
            else:
                r.prefilled += len(fed)
                if r.prefilled < len(r.seq.feed):
                    continue
                r.state, r.seq.prefill_s = DECODE, now - r.t_admit
                self.prompt_tokens += len(r.seq.feed)
            try:
                self._sample(r, row, events)
            except Exception as err:  # noqa: BLE001 - sampling or decoding failed for this request only
                self._finish(r, events, err)

    def _sample(self, r: Request, row: np.ndarray, events: list[Event]) -> None:
        seq = r.seq
        token = seq.choose(row)
        piece = seq.push(token)
        now = time.perf_counter()
        seq.t_first = seq.t_first or now
        self.tokens_generated += 1
        logprobs = token_logprobs(row, token, r.top_logprobs) if r.top_logprobs is not None else None
        if seq.finish_reason is None:
            events.append(Event(r, token, piece, logprobs))
        else:
            seq.t_end = now
            self._finish(r, events, None, Event(r, token, piece, logprobs, finished=True))
        r.t_last = now

    def _finish(self, r: Request, events: list[Event], error: BaseException | None, last: Event | None = None) -> None:
        """End ``r``: free its engine sequence (unless ``keep``), record the final event."""
        r.state, r.error = DONE, error
        if not r.keep and r.seq.seq_id is not None:
            try:
                self.engine.remove_sequence(r.seq.seq_id)
            except Exception:  # noqa: BLE001 - already gone (e.g. a failed add); nothing to free
                pass
        events.append(last or Event(r, finished=True, error=error))


class SchedulerThread:
    """A :class:`Scheduler` stepped on its own thread, which also creates the engine
    (``engine_factory()``), so that no other thread ever touches it.

    ``ready`` is set once the engine is loaded (or failed to: ``load_error``). ``stats`` is a
    snapshot (a dict) taken after every step: running, queued, KV pages total / free, steps,
    tokens generated; safe to read from any thread.
    """

    def __init__(self, engine_factory: Callable[[], Any], *, max_batch_size: int | None = None,
                 max_queue: int | None = 64, prefill_chunk_size: int | None = None, name: str = "mpt-relax-scheduler"):
        self._factory = engine_factory
        self._limits = dict(max_batch_size=max_batch_size, max_queue=max_queue, prefill_chunk_size=prefill_chunk_size)
        self.scheduler: Scheduler | None = None
        self.engine = None
        self.ready = threading.Event()
        self.load_error: BaseException | None = None
        self.stats: dict = {}
        self._stop = self._close = False
        self._thread = threading.Thread(target=self._main, name=name, daemon=True)

    def start(self) -> "SchedulerThread":
        self._thread.start()
        return self

    @property
    def alive(self) -> bool:
        return self.ready.is_set() and self.scheduler is not None and not self.scheduler.closed

    def submit(self, request: Request) -> Request:
        if not self.alive:
            raise SchedulerClosedError(
                "the model is still loading" if not self.ready.is_set() else "the scheduler is not running"
            )
        return self.scheduler.submit(request)

    def cancel(self, request: Request) -> None:
        if self.scheduler is not None:
            self.scheduler.cancel(request)

    def cancel_all(self) -> None:
        """Cancel everything running or waiting and take no more requests; the thread frees
        them at its next step and stays up until :meth:`stop`."""
        self._close = True
        if self.scheduler is not None:
            self.scheduler.wake()

    def stop(self, timeout: float | None = 30.0) -> None:
        """Cancel whatever still runs or waits, free it, and end the thread (waits ``timeout``)."""
        self._stop = True
        if self.scheduler is not None:
            self.scheduler.wake()
        self._thread.join(timeout)

    def _main(self) -> None:
        try:
            self.engine = self._factory()
            self.scheduler = Scheduler(self.engine, **self._limits)
        except BaseException as err:  # noqa: BLE001 - reported through load_error / health
            self.load_error = err
            return
        finally:
            self._snapshot()
            self.ready.set()
        sched = self.scheduler
        while not self._stop:
            if self._close and not sched.closed:
                sched.close(SchedulerClosedError("the server is shutting down"))
                self._snapshot()
            if not sched.wait_for_work(timeout=0.5):
                continue
            try:
                sched.step()
            except Exception as err:  # noqa: BLE001 - a bug must not leave every client waiting forever
                log.exception("scheduler step failed; cancelling the running and queued requests")
                sched.close(err)
                self.scheduler = sched = Scheduler(self.engine, **self._limits)
            self._snapshot()
        sched.close(SchedulerClosedError("the server is shutting down"))
        self._snapshot()

    def _snapshot(self) -> None:
        s, eng = self.scheduler, self.engine
        stats = {"ready": s is not None, "running": 0, "queued": 0, "steps": 0, "tokens_generated": 0,
                 "prompt_tokens": 0, "kv_pages_total": 0, "kv_pages_free": 0}
        if s is not None:
            stats.update(running=len(s.running), queued=s.queued, steps=s.steps, tokens_generated=s.tokens_generated,
                         prompt_tokens=s.prompt_tokens)
            if s.page_size is not None:
                stats.update(kv_pages_total=eng.kv_pages, kv_pages_free=eng.free_kv_pages(),
                             sequences=len(getattr(eng, "_sequences", ())))
        self.stats = stats


def drive(scheduler: Scheduler, requests: Iterable[Request]) -> Iterable[Event]:
    """Run ``requests`` to their end on the calling thread, yielding every event; an abandoned
    or failed run cancels and frees what is left (kept sequences stay)."""
    for r in requests:
        scheduler.submit(r)
    try:
        while scheduler.busy:
            yield from scheduler.step()
    finally:
        scheduler.close()
