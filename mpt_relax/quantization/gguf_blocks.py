"""GGML's weight encodings as TE element formulas: element [row, col] of a weight stored in a
GGUF file's own blocks, decoded to float32.

A row of ``in`` weights is ``in / block`` blocks of ``type_size`` bytes each, back to back,
stored as uint8 [out, in / block * type_size] (F32 and F16 are plain float arrays [out, in]).
Within the block holding ``col`` (``j = col % block``; ``d``, ``m``, ``dmin`` are float16,
little-endian)::

    BF16  (1, 2)      the upper half of a float32
    Q8_0  (32, 34)    d, int8 q[32]                          w = d * q[j]
    Q4_0  (32, 18)    d, 16 bytes of nibbles                 w = d * (q - 8)
    Q4_1  (32, 20)    d, m, 16 bytes of nibbles              w = d * q + m
    Q5_0  (32, 22)    d, 32 high bits, nibbles               w = d * (q - 16)
    Q5_1  (32, 24)    d, m, 32 high bits, nibbles            w = d * q + m
    Q4_K  (256, 144)  d, dmin, 12 bytes of 6-bit (scale, min) per 32, 128 bytes of nibbles
                      w = d * scale[j // 32] * q - dmin * min[j // 32]
    Q5_K  (256, 176)  as Q4_K plus 32 bytes of high bits (bit j // 32 of byte j % 32)
    Q6_K  (256, 210)  128 bytes of low nibbles, 64 of 2-bit highs, int8 scale per 16, d
                      w = d * scale[j // 16] * (q - 32)

Nibbles: in the 4-bit legacy types byte ``j % 16`` holds element j in its low nibble (j < 16)
or high nibble; in the K types a 64-element chunk ``j // 64`` reads 32 bytes, its first 32
elements from the low nibbles, the next 32 from the high ones. These are the layouts
``gguf.quants`` dequantizes, which the tests check every formula against.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

from tvm import te, tirx

from mpt_relax.kernels.cpu.q4k_q5k_gemv import k_scale_min


@dataclasses.dataclass(frozen=True)
class BlockType:
    """One GGML type: ``block`` weights in ``type_size`` bytes, decoded by ``decode(raw, row, col)``."""

    name: str
    block: int
    type_size: int
    decode: Callable[[te.Tensor, tirx.PrimExpr, tirx.PrimExpr], tirx.PrimExpr]

    @property
    def bits_per_weight(self) -> float:
        return 8 * self.type_size / self.block

    @property
    def storage_dtype(self) -> str:
        return {"F32": "float32", "F16": "float16"}.get(self.name, "uint8")

    def storage_shape(self, out_features: int, in_features: int) -> tuple[int, int]:
        """Shape of the stored weight of a [out, in] weight (``in`` a multiple of ``block``)."""
        if self.storage_dtype != "uint8":
            return (out_features, in_features)
        return (out_features, in_features // self.block * self.type_size)


def _byte(raw: te.Tensor, row: tirx.PrimExpr, i: tirx.PrimExpr) -> tirx.PrimExpr:
    return raw[row, i].astype("uint32")


def _half(raw: te.Tensor, row: tirx.PrimExpr, i: tirx.PrimExpr) -> tirx.PrimExpr:
    """The little-endian float16 at bytes i, i+1 of the row, as float32."""
    bits = (_byte(raw, row, i) | (_byte(raw, row, i + 1) << 8)).astype("uint16")
    return tirx.reinterpret("float16", bits).astype("float32")


def _signed(byte: tirx.PrimExpr) -> tirx.PrimExpr:
    """A uint32 holding a byte, read as int8, as float32."""
    return tirx.reinterpret("int8", byte.astype("uint8")).astype("float32")


def _float(x: tirx.PrimExpr) -> tirx.PrimExpr:
    return x.astype("float32")


def _nibble(raw: te.Tensor, row: tirx.PrimExpr, start: tirx.PrimExpr, j: tirx.PrimExpr) -> tirx.PrimExpr:
    """Element j (< 32) of a legacy block's 16 nibble bytes starting at byte ``start``."""
    return (_byte(raw, row, start + j % 16) >> (j // 16 * 4).astype("uint32")) & 0xF


def _high_bit(raw: te.Tensor, row: tirx.PrimExpr, start: tirx.PrimExpr, j: tirx.PrimExpr) -> tirx.PrimExpr:
    """Bit j of the 32 high bits at byte ``start``, as 16 or 0."""
    return ((_byte(raw, row, start + j // 8) >> (j % 8).astype("uint32")) & 1) << 4


def _at(t: BlockType, col: tirx.PrimExpr) -> tuple[tirx.PrimExpr, tirx.PrimExpr]:
    """(first byte of col's block, col's index j within it)."""
    return col // t.block * t.type_size, col % t.block


def _f32(raw, row, col):
    return raw[row, col]


def _f16(raw, row, col):
    return raw[row, col].astype("float32")


def _bf16(raw, row, col):
    bits = _byte(raw, row, 2 * col) | (_byte(raw, row, 2 * col + 1) << 8)
    return tirx.reinterpret("float32", bits << 16)


def _q8_0(raw, row, col):
    base, j = _at(Q8_0, col)
    return _half(raw, row, base) * _signed(_byte(raw, row, base + 2 + j))


def _q4_0(raw, row, col):
    base, j = _at(Q4_0, col)
    return _half(raw, row, base) * (_float(_nibble(raw, row, base + 2, j)) - 8.0)


def _q4_1(raw, row, col):
    base, j = _at(Q4_1, col)
    return _half(raw, row, base) * _float(_nibble(raw, row, base + 4, j)) + _half(raw, row, base + 2)


def _q5_0(raw, row, col):
    base, j = _at(Q5_0, col)
    q = _nibble(raw, row, base + 6, j) | _high_bit(raw, row, base + 2, j)
    return _half(raw, row, base) * (_float(q) - 16.0)


def _q5_1(raw, row, col):
    base, j = _at(Q5_1, col)
    q = _nibble(raw, row, base + 8, j) | _high_bit(raw, row, base + 4, j)
    return _half(raw, row, base) * _float(q) + _half(raw, row, base + 2)


def _k_nibble(raw, row, start, j) -> tirx.PrimExpr:
    """Element j (< 256) of a K block's 128 nibble bytes at ``start``."""
    return (_byte(raw, row, start + j // 64 * 32 + j % 32) >> (j // 32 % 2 * 4).astype("uint32")) & 0xF


def _q4_k(raw, row, col):
    base, j = _at(Q4_K, col)
    scale, minimum = k_scale_min(raw, row, base, j // 32)
    q = _float(_k_nibble(raw, row, base + 16, j))
    return _half(raw, row, base) * scale * q - _half(raw, row, base + 2) * minimum


def _q5_k(raw, row, col):
    base, j = _at(Q5_K, col)
    scale, minimum = k_scale_min(raw, row, base, j // 32)
    high = ((_byte(raw, row, base + 16 + j % 32) >> (j // 32).astype("uint32")) & 1) << 4
    q = _float(_k_nibble(raw, row, base + 48, j) | high)
    return _half(raw, row, base) * scale * q - _half(raw, row, base + 2) * minimum


def _q6_k(raw, row, col):
    base, j = _at(Q6_K, col)
    half, r = j // 128, j % 128
    low = (_byte(raw, row, base + half * 64 + r % 64) >> (r // 64 * 4).astype("uint32")) & 0xF
    high = (_byte(raw, row, base + 128 + half * 32 + r % 32) >> (r // 32 * 2).astype("uint32")) & 3
    scale = _signed(_byte(raw, row, base + 192 + j // 16))
    return _half(raw, row, base + 208) * scale * (_float(low | (high << 4)) - 32.0)


F32 = BlockType("F32", 1, 4, _f32)
F16 = BlockType("F16", 1, 2, _f16)
BF16 = BlockType("BF16", 1, 2, _bf16)
Q8_0 = BlockType("Q8_0", 32, 34, _q8_0)
Q4_0 = BlockType("Q4_0", 32, 18, _q4_0)
Q4_1 = BlockType("Q4_1", 32, 20, _q4_1)
Q5_0 = BlockType("Q5_0", 32, 22, _q5_0)
Q5_1 = BlockType("Q5_1", 32, 24, _q5_1)
Q4_K = BlockType("Q4_K", 256, 144, _q4_k)
Q5_K = BlockType("Q5_K", 256, 176, _q5_k)
Q6_K = BlockType("Q6_K", 256, 210, _q6_k)

BLOCK_TYPES = {t.name: t for t in (F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, Q4_K, Q5_K, Q6_K)}
