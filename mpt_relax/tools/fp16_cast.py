"""bf16 / fp32 -> fp16 casts for the converter: the streaming chunk cast it writes with, and an
independent reference cast it verifies the output against (bit for bit).

Finite values beyond fp16's +-65504 are clamped (never inf); NaN and inf pass through.
"""

from __future__ import annotations

from typing import Iterator

import torch

from mpt_relax.io.checkpoint import FP16_MAX

CONVERTED_DTYPES = (torch.bfloat16, torch.float32)
CHUNK_ELEMENTS = 1 << 22  # 16 MiB fp32 temporaries; larger chunks measured slower, smaller no faster


def chunks(x: torch.Tensor) -> Iterator[torch.Tensor]:
    """``x`` flattened, in 1-D pieces of at most ``CHUNK_ELEMENTS`` elements."""
    flat = x.reshape(-1)
    for begin in range(0, flat.numel(), CHUNK_ELEMENTS):
        yield flat[begin : begin + CHUNK_ELEMENTS]


def cast_chunk(x: torch.Tensor, out: torch.Tensor) -> tuple[torch.Tensor, int, int, int]:
    """Cast a 1-D bf16/fp32 chunk into the fp16 tensor ``out`` (same length, reused between
    chunks to spare page faults); returns ``out`` and the (clamped, flushed, nonfinite) counts.

    Fast path when the chunk is finite and inside +-65504 (NaN fails both comparisons): a
    plain cast. Otherwise finite values are clamped to +-65504 in fp32 and NaN/inf kept.
    Flushed = non-zero inputs minus non-zero outputs: the cast never turns a zero into a
    non-zero, so the difference is exactly the values that became zero (NaN is non-zero on
    both sides).
    """
    lo, hi = torch.aminmax(x)
    if -FP16_MAX <= lo and hi <= FP16_MAX:
        out.copy_(x)
        clamped = nonfinite = 0
    else:
        x32 = x.to(torch.float32)
        finite = torch.isfinite(x32)
        nonfinite = x.numel() - int(finite.sum())
        clamped = int(((x32.abs() > FP16_MAX) & finite).sum())
        out.copy_(torch.where(finite, x32.clamp(-FP16_MAX, FP16_MAX), x32))
    flushed = int(torch.count_nonzero(x)) - int(torch.count_nonzero(out))
    return out, clamped, flushed, nonfinite


def reference_cast(x: torch.Tensor) -> torch.Tensor:
    """What the converter must write for source tensor ``x``: for bf16/fp32, the fp32 value
    clamped to +-65504 and cast to fp16, with inf/NaN kept; any other dtype unchanged."""
    if x.dtype not in CONVERTED_DTYPES:
        return x
    x32 = x.to(torch.float32)
    out = x32.clamp(-FP16_MAX, FP16_MAX).to(torch.float16)
    if x.numel() and not all(torch.isfinite(v) for v in torch.aminmax(x32)):  # inf or NaN somewhere
        inf = torch.isinf(x32)
        out[inf] = x32[inf].to(torch.float16)
    return out


def bits(x: torch.Tensor) -> torch.Tensor:
    """The raw bits of 1-D ``x`` as integers of the same width (so NaN compares equal to itself)."""
    return x.contiguous().view({1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[x.element_size()])
