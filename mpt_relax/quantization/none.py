"""Unquantized schemes: every weight stored in the model dtype."""

from __future__ import annotations

from mpt_relax.quantization.base import Quantization

Q0F32 = Quantization("q0f32", 32, "float32")
Q0F16 = Quantization("q0f16", 16, "float16")
