"""Perplexity of a built artifact over a text file, optionally against HF on the same checkpoint.

    python -m mpt_relax perplexity --artifact DIR --text FILE [--context N --stride S] [--compare-hf] [--json]

The text is tokenized with the artifact's tokenizer as one sequence (no special tokens added)
and scored with the sliding-window recipe that Hugging Face documents for fixed-length models:
windows of ``context`` tokens start every ``stride`` tokens, and each window scores only the
tokens that the previous window did not reach, so every token after the first is scored once,
with up to ``context - stride`` tokens of history before it (the first window scores all of its
tokens but the first). ``stride == context`` gives disjoint windows; a smaller stride gives
more history per token at more compute. Perplexity is ``exp(mean negative log-likelihood)``
over the scored tokens, with the log-softmax taken in float64 on the host from each runtime's
float32 logits.

``--decode`` scores each window the way generation computes logits: the unscored history is
prefilled, then every scored token comes from a one-token decode step (teacher-forced). This
measures the decode kernels, e.g. a build with ``--int8-activations``, whose prefill is exact.

``--compare-hf`` loads transformers' ``MptForCausalLM`` from the checkpoint the artifact was
built from (``source`` in mpt-config.json, or ``--hf-model``) in fp32 on the CPU and scores the
same windows of the same token ids in the same run.

tokens/s counts scored tokens over the wall time of the scoring loop (the model forwards plus
the host-side log-softmax); with ``stride < context`` each token is forwarded about
``context / stride`` times.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

from mpt_relax.errors import MPTRelaxError
from mpt_relax.io.artifact import param_records, read_config
from mpt_relax.runtime.engine import Engine

LogitsFn = Callable[[list[int], int], np.ndarray]  # (window ids, scored) -> logits [len(window), vocab]


class PerplexityError(MPTRelaxError):
    """A bad perplexity request: missing or empty text, a window that does not fit."""


def windows(n_tokens: int, context: int, stride: int) -> list[tuple[int, int, int]]:
    """``(start, end, scored)`` per window over ``n_tokens`` tokens: the window is
    ``ids[start:end]`` and its last ``scored`` tokens are scored (each against the logits of
    the position before it)."""
    if context < 2:
        raise PerplexityError(f"context must be at least 2 tokens (got {context})")
    if not 0 < stride <= context:
        raise PerplexityError(f"stride must be in 1..context ({context}), got {stride}")
    out, prev_end = [], 0
    for start in range(0, max(n_tokens - 1, 1), stride):
        end = min(start + context, n_tokens)
        out.append((start, end, min(end - prev_end, end - start - 1)))
        prev_end = end
        if end == n_tokens:
            break
    return out


def token_nll(logits: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """Negative log-likelihood of ``targets`` [n] under ``logits`` [n, vocab], in float64."""
    x = logits.astype(np.float64)
    top = x.max(axis=1, keepdims=True)
    lse = np.log(np.exp(x - top).sum(axis=1)) + top[:, 0]
    return lse - x[np.arange(len(targets)), targets]


def score(logits_fn: LogitsFn, ids: list[int], context: int, stride: int) -> dict[str, Any]:
    """Sliding-window perplexity of ``ids`` with ``logits_fn(window_ids, scored) -> float32 [n, vocab]``
    (only the rows before the last ``scored`` tokens are read)."""
    if len(ids) < 2:
        raise PerplexityError(f"the text has {len(ids)} token(s); perplexity needs at least 2")
    total, scored, forwarded = 0.0, 0, 0
    plan = windows(len(ids), context, stride)
    t0 = time.perf_counter()
    for start, end, new in plan:
        window = ids[start:end]
        logits = np.asarray(logits_fn(window, new))
        nll = token_nll(logits[-new - 1:-1], np.asarray(window[-new:]))
        total += float(nll.sum())
        scored += new
        forwarded += len(window)
    seconds = time.perf_counter() - t0
    return {"perplexity": math.exp(total / scored), "mean_nll": total / scored, "scored_tokens": scored,
            "windows": len(plan), "forwarded_tokens": forwarded, "seconds": seconds,
            "tokens_per_s": scored / seconds if seconds > 0 else float("inf")}


def weight_bytes(artifact: str | Path) -> dict[str, Any]:
    """Bytes of the artifact's weights and of the checkpoint parameters they stand for
    (a quantized tensor's codes and scales count once for the source tensor)."""
    total, params, seen = 0, 0, set()
    for _, rec in param_records(Path(artifact)):
        total += rec["nbytes"]
        q = rec.get("quantization")
        if q is None:
            params += math.prod(rec["shape"])
        elif q["source"] not in seen:
            seen.add(q["source"])
            params += math.prod(q["source_shape"])
    return {"weight_bytes": total, "parameters": params, "bytes_per_weight": total / params if params else None}


def hf_logits_fn(hf_dir: str | Path) -> LogitsFn:
    """Logits of transformers' MptForCausalLM in fp32 on the CPU, one fresh forward per call."""
    import torch
    from transformers import MptForCausalLM  # imported here: slow, and only --compare-hf needs it

    model = MptForCausalLM.from_pretrained(str(hf_dir), dtype=torch.float32).eval()

    def fn(ids: list[int], scored: int) -> np.ndarray:
        with torch.inference_mode():
            return model(torch.tensor([ids]), use_cache=False).logits[0].float().numpy()

    return fn


def prefill_logits_fn(eng: Engine) -> LogitsFn:
    """Logits of every position from one prefill of the window (a fresh sequence per call)."""
    return lambda ids, scored: eng.logits(ids)


def decode_logits_fn(eng: Engine) -> LogitsFn:
    """The history prefilled, then each scored token's logits from a one-token decode step."""

    def fn(ids: list[int], scored: int) -> np.ndarray:
        history = len(ids) - scored
        out = np.full((len(ids), eng.vocab_size), np.nan, np.float32)
        seq = eng.add_sequence()
        try:
            out[history - 1] = eng.forward([seq], [ids[:history]])[0]
            for pos in range(history, len(ids) - 1):
                out[pos] = eng.forward([seq], [ids[pos : pos + 1]])[0]
        finally:
            eng.remove_sequence(seq)
        return out

    return fn


def read_text(path: str | Path) -> str:
    path = Path(path)
    if not path.is_file():
        raise PerplexityError(f"text file {path} not found")
    text = path.read_text(encoding="utf-8", errors="replace")
    if not text.strip():
        raise PerplexityError(f"text file {path} is empty")
    return text


def run(artifact: str | Path, text_file: str | Path, *, context: int | None = None, stride: int | None = None,
        compare_hf: bool = False, hf_model: str | Path | None = None, device: str = "auto",
        decode: bool = False) -> dict[str, Any]:
    """Score ``text_file`` with the artifact (and HF with ``compare_hf``); the report as a dict.
    ``decode``: the scored tokens' logits come from decode steps (see the module docstring).

    ``context`` defaults to the artifact's context window, ``stride`` to half the context.
    """
    meta = read_config(Path(artifact))
    window = int(meta["context_window_size"])
    context = window if context is None else int(context)
    if context > window:
        raise PerplexityError(f"--context {context} is larger than the artifact's context window of {window}")
    stride = max(1, context // 2) if stride is None else int(stride)
    windows(2, context, stride)  # validates context and stride before any loading
    text = read_text(text_file)
    if compare_hf:
        hf_model = hf_model or meta.get("source")
        if not hf_model or not (Path(hf_model) / "config.json").is_file():
            raise PerplexityError(f"--compare-hf needs the HF checkpoint: {hf_model or 'no source recorded'} is "
                                  "not one; pass --hf-model DIR")

    eng = Engine(artifact, device, max_batch_size=1, kv_memory=None)
    if eng.tokenizer is None:
        raise PerplexityError(f"{artifact} has no tokenizer.json to tokenize the text with")
    ids = eng.tokenizer.encode(text, add_special_tokens=False).ids
    report: dict[str, Any] = {
        "artifact": str(artifact), "model": meta["model_name"],
        "quantization": meta["quantization"].get("tag", meta["quantization"]["name"]),
        "device": str(eng.device), "text": str(text_file), "characters": len(text), "tokens": len(ids),
        "context": context, "stride": stride, "logits_from": "decode" if decode else "prefill", **weight_bytes(artifact),
        "mpt_relax": score((decode_logits_fn if decode else prefill_logits_fn)(eng), ids, context, stride),
        "hf": None, "relative_difference": None,
    }
    if compare_hf:
        report["hf_model"] = str(hf_model)
        report["hf"] = score(hf_logits_fn(hf_model), ids, context, stride)
        report["relative_difference"] = report["mpt_relax"]["perplexity"] / report["hf"]["perplexity"] - 1
    return report


def format_report(report: dict[str, Any]) -> str:
    ours, hf = report["mpt_relax"], report["hf"]
    lines = [f"{report['model']} ({report['quantization']}, {report['bytes_per_weight']:.3f} bytes/weight) on "
             f"{report['device']}: {report['text']}, {report['tokens']} tokens, context {report['context']}, "
             f"stride {report['stride']}, {ours['scored_tokens']} scored in {ours['windows']} windows "
             f"(logits from {report['logits_from']})",
             f"mpt_relax perplexity {ours['perplexity']:.4f} ({ours['tokens_per_s']:.0f} tokens/s)"]
    if hf:
        lines.append(f"HF fp32    perplexity {hf['perplexity']:.4f} ({hf['tokens_per_s']:.0f} tokens/s); "
                     f"mpt_relax / HF - 1 = {report['relative_difference']:+.2e}")
    return "\n".join(lines)
