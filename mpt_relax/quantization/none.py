"""Unquantized schemes: every weight stored in the model dtype (q0f32, q0f16).

With ``amx_prefill`` (``--amx-prefill``) every ``nn.Linear`` becomes an :class:`AMXPrefillLinear`:
in prefill it emits the exact float matmul tagged for :mod:`mpt_relax.compile.amx_kernels`, which
puts the bf16 AMX tile kernel in its place where the target has AMX-BF16 (the weights rounded to
bf16 per call, as PyTorch's bf16 path holds them) and leaves the exact kernel elsewhere; decode
stays exact. Parameter names do not change, so checkpoints load as they are.
"""

from __future__ import annotations

import dataclasses

from tvm.relax.frontend import nn

from mpt_relax.kernels.cpu import amx_matmul, exact_matmul
from mpt_relax.quantization.base import Quantization, is_decoding, rows_op


class AMXPrefillLinear(nn.Linear):
    """``nn.Linear`` whose prefill matmul may run on the AMX tiles (see the module docstring)."""

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> AMXPrefillLinear:
        """The same features, weight dtype, bias presence and out_dtype as ``linear``."""
        return cls(linear.in_features, linear.out_features, linear.bias is not None, linear.weight.dtype,
                   linear.out_dtype)

    def forward(self, x: nn.Tensor) -> nn.Tensor:
        """x: [*B, in] -> [*B, out] (``out_dtype`` if set, else x's dtype)."""
        if is_decoding() or not amx_matmul.supported(self.out_features, self.in_features):
            return super().forward(x)
        out_dtype = self.out_dtype or x.dtype
        func = exact_matmul.exact_float_matmul(self.out_features, self.in_features, self.weight.dtype, x.dtype, out_dtype)
        return rows_op(x, func, "amx_matmul_float", [self.weight], self.out_features, out_dtype, self.bias)


@dataclasses.dataclass(frozen=True)
class FloatQuantization(Quantization):
    """Float weights in ``model_dtype``; with ``amx_prefill``, AMX prefill Linears."""

    def quantize_model(self, model: nn.Module) -> nn.Module:
        """``model`` with, under ``amx_prefill``, every ``nn.Linear`` replaced in place by an
        :class:`AMXPrefillLinear` (the tied LM head is no Linear and stays)."""
        if not self.amx_prefill:
            return model

        class Replace(nn.Mutator):
            def visit_module(self, path: str, node: nn.Module) -> nn.Module:
                if isinstance(node, nn.Linear) and not isinstance(node, AMXPrefillLinear):
                    return AMXPrefillLinear.from_linear(node)
                return self.visit(path, node)

        return Replace().visit("", model)


Q0F32 = FloatQuantization("q0f32", 32, "float32")
Q0F16 = FloatQuantization("q0f16", 16, "float16")
