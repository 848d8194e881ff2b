"""Weight quantization schemes, one class per kind, registered by name (MLC-LLM's names).

=========  =====  ====  =====  =========
name       kind   bits  group  model
=========  =====  ====  =====  =========
q0f32      none   32    -      float32
q0f16      none   16    -      float16
q4f16_1    group  4     32     float16
q8f16_1    group  8     32     float16
gguf       gguf   file  file   float16
=========  =====  ====  =====  =========

``gguf`` keeps a GGUF file's own blocks (Q4_K, Q8_0, ...; see :mod:`.gguf_scheme`); it is the
default for a ``.gguf`` model and valid only there (the build binds it to the file's types).

A scheme is a :class:`~.base.Quantization`: it rewrites the float model for export, names the
float weights it replaces and quantizes one checkpoint tensor at a time while the loader streams
them. Adding a scheme is a class (or an instance of one) and one :func:`register` call; the
build driver, the loader and the fusion pass only talk to that interface.
"""

from __future__ import annotations

import dataclasses

from mpt_relax.quantization.base import DEQUANTIZE_PREFIX, Quantization, QuantizationError, QuantizedNames
from mpt_relax.quantization.fuse import fuse_dequantize_matmul
from mpt_relax.quantization.group import (
    GroupQuantEmbedding,
    GroupQuantization,
    GroupQuantLinear,
    dequantize_weight,
    quantize_weight,
)
from mpt_relax.quantization.gguf_scheme import GGUFQuantization
from mpt_relax.quantization.none import Q0F16, Q0F32

QUANTIZATIONS: dict[str, Quantization] = {}


def register(q: Quantization) -> Quantization:
    """Make ``q`` buildable by its name (``--quantization NAME``)."""
    if q.name in QUANTIZATIONS:
        raise QuantizationError(f"a quantization named {q.name!r} is already registered")
    QUANTIZATIONS[q.name] = q
    return q


for _q in (Q0F32, Q0F16, GroupQuantization("q4f16_1", 4, "float16", 32), GroupQuantization("q8f16_1", 8, "float16", 32),
           GGUFQuantization("gguf", 0, "float16")):
    register(_q)


def get_quantization(name: str, embedding: bool | int = False, int8_activations: bool = False,
                     amx_prefill: bool = False, int8_prefill: bool = False) -> Quantization:
    """The registered scheme called ``name`` (with ``embedding``: quantizing the embeddings too,
    True in the scheme's own bits, 4 or 8 in that many; ``int8_activations``: decoding on int8
    activations; ``amx_prefill``: prefill in bf16 on AMX; ``int8_prefill``: prefill on int8
    activations); :class:`QuantizationError` listing the valid names otherwise."""
    try:
        q = QUANTIZATIONS[name]
    except (KeyError, TypeError):
        raise QuantizationError(f"unknown quantization {name!r}; valid: {', '.join(QUANTIZATIONS)}") from None
    bits = 0 if isinstance(embedding, bool) else int(embedding)
    if embedding or int8_activations or amx_prefill or int8_prefill:
        q = dataclasses.replace(q, embedding=bool(embedding) or q.embedding,
                                int8_activations=int8_activations or q.int8_activations,
                                amx_prefill=amx_prefill or q.amx_prefill, int8_prefill=int8_prefill or q.int8_prefill,
                                **({"embedding_bits": bits} if bits else {}))
    return q


__all__ = [
    "DEQUANTIZE_PREFIX",
    "GGUFQuantization",
    "QUANTIZATIONS",
    "GroupQuantEmbedding",
    "GroupQuantLinear",
    "GroupQuantization",
    "Quantization",
    "QuantizationError",
    "QuantizedNames",
    "dequantize_weight",
    "fuse_dequantize_matmul",
    "get_quantization",
    "quantize_weight",
    "register",
]
