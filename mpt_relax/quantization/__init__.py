"""Weight quantization schemes, registered by name (see :mod:`.group` for the group schemes)."""

from mpt_relax.quantization.group import (
    QUANTIZATIONS,
    GroupQuantEmbedding,
    GroupQuantLinear,
    Quantization,
    dequantize_weight,
    fuse_dequantize_matmul,
    get_quantization,
    quantize_module,
    quantize_param,
    quantize_weight,
    quantized_weight_names,
)

__all__ = [
    "QUANTIZATIONS",
    "GroupQuantEmbedding",
    "GroupQuantLinear",
    "Quantization",
    "dequantize_weight",
    "fuse_dequantize_matmul",
    "get_quantization",
    "quantize_module",
    "quantize_param",
    "quantize_weight",
    "quantized_weight_names",
]
