"""Next-token choice from one row of logits: repetition penalty, temperature, top-k, top-p.

Runs in numpy on the host: the engine returns float32 logits ``[batch, vocab]`` and each row
is sampled here. (TVM ships sampling kernels that could run this on the device later; at
batch sizes of a few sequences the copy of one logits row per sequence is small.)
"""

from __future__ import annotations

from typing import Iterable

import numpy as np


def apply_repetition_penalty(logits: np.ndarray, history: Iterable[int], penalty: float) -> np.ndarray:
    """CTRL's penalty, as in HF: every token id in ``history`` has its logit divided by
    ``penalty`` if positive, multiplied if negative. ``logits`` [vocab] -> a new [vocab] array."""
    if penalty == 1.0:
        return logits
    ids = np.unique(np.fromiter(history, dtype=np.int64))
    out = logits.copy()
    seen = out[ids]
    out[ids] = np.where(seen < 0, seen * penalty, seen / penalty)
    return out


def sample(logits: np.ndarray, rng: np.random.Generator, temperature: float, top_k: int, top_p: float) -> int:
    """One token id from ``logits`` [vocab].

    ``temperature == 0`` or ``top_k == 1`` is greedy (argmax, lowest id on ties). Otherwise
    softmax(logits / temperature) restricted to the ``top_k`` largest (0: no limit) and then
    to the smallest set of most likely tokens whose mass reaches ``top_p``, renormalized,
    sampled with ``rng``.
    """
    if temperature == 0 or top_k == 1:
        return int(np.argmax(logits))
    x = logits.astype(np.float64) / temperature
    if 0 < top_k < x.size:
        kth = np.partition(x, -top_k)[-top_k]
        x = np.where(x >= kth, x, -np.inf)
    p = np.exp(x - x.max())
    p /= p.sum()
    if top_p < 1.0:
        order = np.argsort(-p, kind="stable")
        mass_before = np.cumsum(p[order]) - p[order]
        keep = order[mass_before < top_p]
        kept = np.zeros_like(p)
        kept[keep] = p[keep]
        p = kept
    candidates = np.flatnonzero(p)
    cdf = np.cumsum(p[candidates])
    pick = int(np.searchsorted(cdf, rng.random() * cdf[-1], side="right"))
    return int(candidates[min(pick, candidates.size - 1)])
