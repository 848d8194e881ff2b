"""The numpy group quantizer (what :func:`mpt_relax.quantization.quantize_weight` compiled to a
kernel): the oracle the kernel's bytes are checked against."""

from __future__ import annotations

import numpy as np

from mpt_relax.quantization import GroupQuantization, QuantizationError


def oracle_quantize(w: np.ndarray, q: GroupQuantization) -> dict[str, np.ndarray]:
    """w [out, in] float32 / float16 / bfloat16 -> {"q_weight": uint32 [out, in / pack], "q_scale": [out, in / group]}."""
    groups = w.astype(np.float32).reshape(w.shape[0], -1, q.group_size)
    scale = (_last_axis_max(np.abs(groups)) / q.max_int).astype(q.model_dtype)
    if not np.isfinite(scale).all():
        raise QuantizationError(f"{q.name}: non-finite scale")
    divisor = scale.astype(np.float32)
    divisor[divisor == 0] = 1.0  # all-zero (or underflowing) groups: every code is max_int, i.e. 0.0
    codes = np.rint(groups / divisor[..., None])
    np.clip(codes, -q.max_int, q.max_int, out=codes)
    # int8 cast (exact for |code| <= 127), then the +max_int offset in uint8 arithmetic, which
    # wraps modulo 256 to exactly code + max_int in [0, 2 * max_int]
    biased = codes.astype(np.int8).view(np.uint8) + np.uint8(q.max_int)
    return {"q_weight": _pack(biased.reshape(w.shape), q.bits), "q_scale": scale}


def _last_axis_max(x: np.ndarray) -> np.ndarray:
    """[..., n] -> [...]: max over the last axis (n a power of two), NaN propagating."""
    while x.shape[-1] > 1:
        half = x.shape[-1] // 2
        x = np.maximum(x[..., :half], x[..., half:])
    return x[..., 0]


def _pack(codes: np.ndarray, bits: int) -> np.ndarray:
    """uint8 codes [out, in] (each < 2**bits) -> uint32 words [out, in * bits / 32]."""
    per_byte = 8 // bits
    codes = codes.reshape(codes.shape[0], -1, per_byte)
    packed = codes[..., 0].copy()
    for k in range(1, per_byte):
        packed |= codes[..., k] << (bits * k)
    return packed.view("<u4").astype(np.uint32, copy=False)
