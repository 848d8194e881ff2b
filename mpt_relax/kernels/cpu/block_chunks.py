"""GGUF K-quant blocks for the prefill matmuls of :mod:`.amx_matmul`: each type's bytes per 256
weights and its reader of 16 weights of a 32-weight chunk, decoded as the exact path decodes
them and rounded to the weights' dtype."""

from __future__ import annotations

import functools

from tvm.script import tirx as T

from .q4k_q5k_gemv import Q4_K, Q5_K, k_scale_min


def _kmin_chunk(layout, raw, d16, row, g, half, w_dtype):
    """fp32 [16]: weights 16 half .. + 15 of 32-weight chunk ``g`` of a Q4_K / Q5_K row
    (``layout``, :mod:`.q4k_q5k_gemv`), rounded to ``w_dtype`` (sub-block ``g % 8`` of block
    ``g // 8``: ``(d * scale) * q - dmin * min``)."""
    b, sub = g // 8, g % 8
    base = b * layout.block_bytes
    scale, minimum = k_scale_min(raw, row, base, sub)
    d = T.Cast("float32", T.reinterpret("float16", d16[row, base // 2]))
    dmin = T.Cast("float32", T.reinterpret("float16", d16[row, base // 2 + 1]))
    codes = T.shift_right(T.Cast("int32x16", raw[row, T.ramp(base + layout.nibbles + sub // 2 * 32 + half * 16, 1, 16)]),
                          T.Broadcast(sub % 2 * 4, 16)) & T.Broadcast(15, 16)
    if layout.fifth_bits is not None:  # bit ``sub`` of byte 16 half + i
        fifth = T.Cast("int32x16", raw[row, T.ramp(base + layout.fifth_bits + half * 16, 1, 16)])
        codes = codes | T.shift_left(T.shift_right(fifth, T.Broadcast(sub, 16)) & T.Broadcast(1, 16), T.Broadcast(4, 16))
    value = T.Broadcast(d * scale, 16) * T.Cast("float32x16", codes) - T.Broadcast(dmin * minimum, 16)
    return T.Cast("float32x16", T.Cast(f"{w_dtype}x16", value))


def _q6k_chunk(raw, d16, row, g, half, w_dtype):
    """fp32 [16]: weights 16 half .. + 15 of 32-weight chunk ``g`` of a Q6_K row, rounded to
    ``w_dtype`` (``(d * scale) * (q - 32)``; the layout of :mod:`.q6k_gemv`)."""
    b, c = g // 8, g % 8
    base = b * 210
    low = T.shift_right(T.Cast("int32x16", raw[row, T.ramp(base + c // 4 * 64 + c % 2 * 32 + half * 16, 1, 16)]),
                        T.Broadcast(c // 2 % 2 * 4, 16)) & T.Broadcast(15, 16)
    high = T.shift_right(T.Cast("int32x16", raw[row, T.ramp(base + 128 + c // 4 * 32 + half * 16, 1, 16)]),
                         T.Broadcast(c % 4 * 2, 16)) & T.Broadcast(3, 16)
    q = (low | T.shift_left(high, T.Broadcast(4, 16))) - T.Broadcast(32, 16)
    scale = T.Cast("float32", T.reinterpret("int8", raw[row, base + 192 + c * 2 + half]))
    d = T.Cast("float32", T.reinterpret("float16", d16[row, base // 2 + 104]))
    return T.Cast("float32x16", T.Cast(f"{w_dtype}x16", T.Broadcast(d * scale, 16) * T.Cast("float32x16", q)))


# GGUF blocks: bytes per 256 weights, a chunk's weights
BLOCK_TYPES = {"Q4_K": (Q4_K.block_bytes, functools.partial(_kmin_chunk, Q4_K)),
               "Q5_K": (Q5_K.block_bytes, functools.partial(_kmin_chunk, Q5_K)), "Q6_K": (210, _q6k_chunk)}
