"""The Relax pass that fuses each dequantize into the matmul that reads it."""

from __future__ import annotations

import tvm
from tvm import relax
from tvm.relax.dpl import GlobalVarPattern, is_op, is_tuple, wildcard

from mpt_relax.quantization.base import DEQUANTIZE_PREFIX


def fuse_dequantize_matmul() -> tvm.transform.Pass:
    """Relax pass: fuse each quantized layer's dequantize into its matmul.

    Relax's FuseOps never fuses an injective producer into a matmul (only elementwise
    consumers into it), so without this pass the dequantized [out, in] weight (and its
    transpose) is written to memory on every call. Steps:

    1. ``FuseTransposeMatmul`` turns every ``matmul(x, permute_dims(w))`` into one ``NT_matmul``
       TE kernel reading w untransposed (for float ``nn.Linear`` and a tied LM head too).
    2. Each ``NT_matmul(x, dequantize_*(q_weight, q_scale))`` pair is grouped
       (FuseOpsByPattern) and merged into one PrimFunc (FuseTIR).

    Apply before LegalizeOps. The target's usual ``AnnotateTIROpPattern -> FuseOps -> FuseTIR``
    then marks the merged kernels kOutEWiseFusable and fuse their epilogues (bias, GELU,
    residual add) into them; dlight's GEMV rules inline the dequantize into the reduction.
    """
    dequantize = is_op("relax.call_tir")(GlobalVarPattern(""), wildcard())
    matmul = is_op("relax.call_tir")(GlobalVarPattern(""), is_tuple([wildcard(), dequantize]))

    def is_dequantize_matmul(ctx: relax.transform.PatternCheckContext) -> bool:
        return ctx.annotated_expr["matmul"].args[0].name_hint.startswith("NT_matmul") and ctx.annotated_expr[
            "dequantize"
        ].args[0].name_hint.startswith(DEQUANTIZE_PREFIX)

    group = relax.transform.FuseOpsByPattern(
        [("dequantize_matmul", matmul, {"matmul": matmul, "dequantize": dequantize}, is_dequantize_matmul)],
        bind_constants=False,
    )
    return tvm.transform.Sequential(
        [relax.transform.FuseTransposeMatmul(), group, relax.transform.FuseTIR()], name="FuseDequantizeMatmul"
    )
