"""Causal ALiBi attention over a contiguous KV cache, as TE computes inside the Relax graph.

Shapes (one sequence, no batch axis):
    q: [n, H, hd]     the n new queries (positions t .. t+n-1, t = T - n cached tokens before them)
    k, v: [T, KV, hd] every key / value so far, cache first; query head h reads kv head h // (H / KV)
    out: [n, H, hd]

Scores, the ALiBi bias ``slope_h * (j - i)`` and the softmax are fp32 in every model dtype.
The model calls only :func:`causal_attention`, so the cache behind it can change freely.
"""

from __future__ import annotations

import numpy as np
from tvm import te, tirx
from tvm.relax.frontend import nn
from tvm.relax.frontend.nn import op

from .config import MPTConfig


def _scores_fn(cfg: MPTConfig):
    """TE: q [n,H,hd], k [T,KV,hd], slopes [H] -> masked, biased fp32 scores [H, n, T]."""
    group = cfg.n_heads // cfg.kv_n_heads
    scale = float(cfg.attn_scale)

    def compute(q: te.Tensor, k: te.Tensor, slopes: te.Tensor | None):
        n, n_heads, head_dim = q.shape
        total = k.shape[0]
        offset = total - n
        r = te.reduce_axis((0, head_dim), name="r")
        qk = te.compute(
            (n_heads, n, total),
            lambda h, i, j: te.sum(q[i, h, r].astype("float32") * k[j, h // group, r].astype("float32"), axis=r),
            name="qk",
        )

        def biased(h, i, j):
            s = qk[h, i, j] * tirx.const(scale, "float32")
            if slopes is not None:
                s = s + slopes[h] * (j - i - offset).astype("float32")
            return tirx.if_then_else(j <= i + offset, s, tirx.min_value("float32"))

        return te.compute((n_heads, n, total), biased, name="scores")

    return compute


def _weighted_values_fn(cfg: MPTConfig, dtype: str):
    """TE: probs [H, n, T] fp32, v [T,KV,hd] -> out [n, H, hd] in the model dtype.

    The probabilities are rounded to the model dtype first, as the reference implementation
    does before its ``probs @ v``; the sum itself accumulates in fp32.
    """
    group = cfg.n_heads // cfg.kv_n_heads

    def compute(probs: te.Tensor, v: te.Tensor):
        n_heads, n, total = probs.shape
        head_dim = v.shape[2]
        j = te.reduce_axis((0, total), name="j")
        acc = te.compute(
            (n, n_heads, head_dim),
            lambda i, h, d: te.sum(
                probs[h, i, j].astype(dtype).astype("float32") * v[j, h // group, d].astype("float32"), axis=j
            ),
            name="pv",
        )
        return te.compute((n, n_heads, head_dim), lambda i, h, d: acc[i, h, d].astype(dtype), name="pv_cast")

    return compute


def causal_attention(cfg: MPTConfig, q: nn.Tensor, k: nn.Tensor, v: nn.Tensor) -> nn.Tensor:
    """Attention of n new queries over all T keys (the last n of which are theirs).

    q [n, H, hd], k/v [T, KV, hd] -> [n, H, hd]; bottom-right causal mask, ALiBi if enabled.
    """
    slopes = nn.Tensor.from_const(_slopes_array(cfg)) if cfg.alibi else None
    args = [q, k] + ([slopes] if slopes is not None else [])
    scores_fn = _scores_fn(cfg)
    scores = op.tensor_expr_op(
        (lambda q_, k_, s_=None: scores_fn(q_, k_, s_)), "alibi_scores" if cfg.alibi else "causal_scores", args
    )
    probs = op.softmax(scores, axis=-1)
    return op.tensor_expr_op(_weighted_values_fn(cfg, q.dtype), "attn_pv", [probs, v])


def _slopes_array(cfg: MPTConfig) -> np.ndarray:
    return np.asarray(cfg.alibi_slopes(), dtype="float32")
