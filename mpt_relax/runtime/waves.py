"""The generation loop over an engine's sequences, started in waves as KV-cache pages allow.

Engines with ``free_pages()`` / ``pages_needed(held, new)`` (the Engine; test doubles may lack
them, and then every sequence starts at once): a sequence starts only when the pages for its
prompt *and* all its ``max_new_tokens`` are free, counting what the running ones will still
take; a batch larger than the pool runs in waves (the rest waits for the pages that finishing
sequences free). A request that cannot fit even then raises
:class:`~mpt_relax.runtime.kv_state.KVCacheCapacityError` before any of its work. If pages run
out anyway mid-way (another thread's sequences took them), the running replies end with
``finish_reason="length"`` and keep what they produced.

The sequences are :class:`mpt_relax.runtime.generation._Sequence` objects (``feed``, ``params``,
``seq_id``, ``token_ids``, ``fed``, ``push``, ``choose``, ``pages_left``, ``cut_short``, times).
"""

from __future__ import annotations

import time
from typing import Iterator

import numpy as np

from mpt_relax.runtime.kv_state import KVCacheCapacityError


def _tracks_pages(engine) -> bool:
    return hasattr(engine, "free_pages") and hasattr(engine, "pages_needed")


def check_pages(engine, seqs: list) -> None:
    """Raise KVCacheCapacityError if the first sequence cannot start now (see the module docstring)."""
    if seqs and _tracks_pages(engine):
        need, free = seqs[0].pages_left(engine, started=False), engine.free_pages()
        if need > free:
            s = seqs[0]
            raise KVCacheCapacityError(
                f"{len(s.feed)} prompt tokens + max_new_tokens={s.params.max_new_tokens} need {need} KV-cache pages "
                f"but only {free} are free; lower max_new_tokens, remove finished sequences, or create the Engine "
                "with a larger kv_memory"
            )


def _admit(engine, pending: list, live: list) -> list:
    """The pending sequences (in order) whose pages fit beside what the live ones will still take."""
    if not _tracks_pages(engine):
        return list(pending)
    room = engine.free_pages() - sum(s.pages_left(engine, started=True) for s in live)
    admitted = []
    for s in pending:
        need = s.pages_left(engine, started=False)
        if need > room:
            break
        admitted.append(s)
        room -= need
    return admitted


def run(engine, seqs: list, keep: bool = False) -> Iterator[tuple[int, str]]:
    """Generate every sequence to its end; yields ``(index, text piece)`` as pieces complete.

    Sequences start in waves as KV pages allow (see the module docstring). Sequences without
    an id are added to the engine when they start. Unless ``keep``, each sequence is removed
    from the engine as it finishes, and all are when the run is abandoned or fails.
    """
    t_start = time.perf_counter()
    index = {id(s): i for i, s in enumerate(seqs)}
    pending, live, added = list(seqs), [], []  # added: in the engine, to remove at the end
    for s in seqs:
        s.t_start = t_start

    def finish(s) -> None:
        s.t_end = time.perf_counter()
        live.remove(s)
        if not keep:
            added.remove(s)
            engine.remove_sequence(s.seq_id)

    def sample_all(group: list, logits: np.ndarray) -> Iterator[tuple[int, str]]:
        for row, s in zip(logits, group):
            piece = s.push(s.choose(row))
            s.t_first = s.t_first or time.perf_counter()
            if s.finish_reason:
                finish(s)
            if piece:
                yield index[id(s)], piece

    try:
        while pending or live:
            if live:  # one decode step for everything running
                try:
                    logits = engine.forward([s.seq_id for s in live], [[s.token_ids[-1]] for s in live])
                except KVCacheCapacityError:
                    for s in list(live):  # out of pages after all: keep what was produced
                        piece = s.cut_short()
                        finish(s)
                        if piece:
                            yield index[id(s)], piece
                    continue
                group = list(live)
                for s in group:
                    s.fed += 1
                yield from sample_all(group, logits)
            wave = _admit(engine, pending, live) if pending else []
            if pending and not wave and not live:
                check_pages(engine, pending)  # raises: the next one cannot start even alone
                wave = pending[:1]  # the pool has room after all (pages freed meanwhile)
            if wave:
                t_wave = time.perf_counter()
                fresh = [s for s in wave if s.seq_id is None]
                for s in fresh:
                    s.seq_id = engine.add_sequence()
                added.extend(wave)
                try:
                    logits = engine.forward([s.seq_id for s in wave], [s.feed for s in wave])
                except KVCacheCapacityError:
                    if not live:
                        raise
                    for s in wave:  # another user took the pages: wait for ours to free some
                        added.remove(s)
                        if s in fresh:
                            engine.remove_sequence(s.seq_id)
                            s.seq_id = None
                    continue
                for s in wave:
                    pending.remove(s)
                    live.append(s)
                    s.prefill_s = time.perf_counter() - t_wave
                yield from sample_all(wave, logits)
    finally:
        if not keep:
            for s in added:
                engine.remove_sequence(s.seq_id)


