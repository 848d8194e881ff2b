"""GGUF's Q4_0 and Q8_0 blocks rewritten, without loss, as q4f16_1 / q8f16_1 codes and scales.

Both pairs store 32 weights per block with one float16 scale; only the code offset and the
sign convention differ (:mod:`.gguf_blocks`, :mod:`.group`)::

    Q4_0   w = d * (q - 8),   q in [0, 15]      q4f16_1   w = s * (c - 7),    c in [0, 15]
    Q8_0   w = d * q,         q in [-128, 127]  q8f16_1   w = s * (c - 127),  c in [0, 255]

With ``s = -d`` and ``c = 15 - q`` (Q4_0) or ``c = 127 - q`` (Q8_0) the real products are the
same, and both formats round that product once to float16, so every dequantized weight keeps
its bits (round to nearest even is symmetric under negation). A repacked weight then runs on
every kernel of the group schemes: the decode GEMVs, the int8-activation and AMX kernels. A
Q8_0 code of -128 becomes c = 255 (q8f16_1's own quantizer stops at 254); the kernels take the
whole byte.
"""

from __future__ import annotations

import numpy as np

GROUP_SCHEMES = {"Q4_0": ("q4f16_1", 4), "Q8_0": ("q8f16_1", 8)}  # GGML type -> (group scheme, bits) it repacks into
_BLOCK = 32
_BLOCK_BYTES = {"Q4_0": 18, "Q8_0": 34}


def repack(type_name: str, raw: np.ndarray, shape: tuple[int, int]) -> dict[str, np.ndarray]:
    """A GGUF tensor's blocks (uint8 [out, in / 32 * block bytes]) of weight ``shape`` [out, in]
    -> ``{"q_weight": uint32 [out, in * bits / 32], "q_scale": float16 [out, in / 32]}``."""
    out_features, in_features = shape
    blocks = np.ascontiguousarray(raw).reshape(out_features, in_features // _BLOCK, _BLOCK_BYTES[type_name])
    scale = -blocks[:, :, :2].copy().view(np.float16)[:, :, 0]
    if type_name == "Q8_0":
        codes = (127 - blocks[:, :, 2:].view(np.int8).astype(np.int16)).astype(np.uint8)
        return {"q_weight": codes.reshape(out_features, -1).view(np.uint32), "q_scale": scale}
    nibbles = blocks[:, :, 2:]
    q = np.concatenate([nibbles & 0xF, nibbles >> 4], axis=2)  # element j < 16: low nibble of byte j
    codes = (15 - q).reshape(out_features, in_features // 8, 8).astype(np.uint32)
    words = np.bitwise_or.reduce(codes << (4 * np.arange(8, dtype=np.uint32)), axis=2)
    return {"q_weight": words, "q_scale": scale}
