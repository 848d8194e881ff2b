"""Give the decode step's float-weight GEMVs the streaming CPU kernel (llvm targets only).

After ``FuseTransposeMatmul`` every ``x @ W^T`` of a float weight is a ``call_tir`` of an
``NT_matmul`` TE kernel, shared by prefill and decode. In ``batch_decode`` (a few rows of x)
this pass points each such call whose W is a static 2-D fp16/fp32 tensor at
:func:`mpt_relax.kernels.cpu.float_gemv.float_gemv` instead: the same fp32 math, with the
weights prefetched. Prefill keeps the packed GEMM; its epilogues (bias, cast, residual) run as
their own small kernels in decode, since the hand-written kernel is never fused.
"""

from __future__ import annotations

import tvm
from tvm import relax

from mpt_relax.compile.targets import TargetSpec
from mpt_relax.kernels.cpu import float_gemv

DECODE_FUNCTION = "batch_decode"
_CALL_TIR = tvm.ir.Op.get("relax.call_tir")
_FLOATS = ("float16", "float32")


def _static_shape(sinfo) -> list[int] | None:
    shape = getattr(sinfo, "shape", None)
    if shape is None or not isinstance(shape, relax.ShapeExpr):
        return None
    return [v.value if isinstance(v, tvm.tirx.IntImm) else None for v in shape.values]


@relax.expr_functor.mutator
class _DecodeGEMVs(relax.PyExprMutator):
    """Rewrites the qualifying NT_matmul calls of one function (see the module docstring)."""

    def __init__(self, mod: tvm.IRModule):
        super().__init__(mod)
        self.kernels: dict[tuple, relax.GlobalVar] = {}

    def visit_call_(self, call: relax.Call) -> relax.Expr:
        call = super().visit_call_(call)
        if not (call.op.same_as(_CALL_TIR) and isinstance(call.args[0], relax.GlobalVar)
                and call.args[0].name_hint.startswith("NT_matmul") and isinstance(call.args[1], relax.Tuple)
                and len(call.args[1].fields) == 2):
            return call
        x, w = call.args[1].fields
        x_info, w_info, out_info = x.ty, w.ty, call.ty_args[0]
        w_shape, x_shape = _static_shape(w_info), _static_shape(x_info)
        if (w_shape is None or None in w_shape or len(w_shape) != 2 or x_shape is None or len(x_shape) != 2
                or x_shape[1] != w_shape[1] or w_info.dtype not in _FLOATS or x_info.dtype not in _FLOATS
                or out_info.dtype not in _FLOATS or not float_gemv.supported(*w_shape)):
            return call
        key = (*w_shape, x_info.dtype, w_info.dtype, out_info.dtype)
        if key not in self.kernels:
            name = "float_gemv_{}x{}_{}_{}_{}".format(*key)
            self.kernels[key] = self.builder_.add_func(float_gemv.float_gemv(*key), name)
        return relax.call_tir(self.kernels[key], relax.Tuple([x, w]), out_info)


def select_float_gemv(spec: TargetSpec) -> tvm.transform.Pass:
    """Module pass: on llvm targets, the decode step's float GEMVs become the streaming kernel."""

    @tvm.transform.module_pass(opt_level=0, name="SelectFloatGEMV")
    def _run(mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        if spec.name != "llvm" or DECODE_FUNCTION not in [g.name_hint for g in mod.get_global_vars()]:
            return mod
        rewriter = _DecodeGEMVs(mod)
        gvar = mod.get_global_var(DECODE_FUNCTION)
        func = rewriter.visit_expr(mod[gvar])
        out = rewriter.builder_.get()
        out[gvar] = func
        return out

    return _run
