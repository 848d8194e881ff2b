"""Give the decode step's GEMVs the streaming CPU kernels (llvm targets only).

After ``FuseTransposeMatmul`` every ``x @ W^T`` of a float weight is a ``call_tir`` of an
``NT_matmul`` TE kernel, and after :func:`~mpt_relax.quantization.fuse_dequantize_matmul` every
exact group-quantized one a ``fused_dequantize_<scheme>..._NT_matmul`` kernel (q_weight,
q_scale, x); both are shared by prefill and decode. In ``batch_decode`` (a few rows of x) this
pass points each such call whose weights are static 2-D tensors at a hand-written kernel with the
same math:

- float weights (fp16/fp32): :func:`mpt_relax.kernels.cpu.float_gemv.float_gemv`;
- q4f16_1 / q8f16_1 weights, on targets with AVX-512F:
  :func:`mpt_relax.kernels.cpu.group_gemv.group_gemv`;
- GGUF Q6_K / Q4_K / Q5_K blocks (``fused_dequantize_gguf_q6_k..._NT_matmul``: blocks, x):
  :func:`mpt_relax.kernels.cpu.q6k_gemv.q6k_gemv`, :func:`mpt_relax.kernels.cpu.q4k_q5k_gemv.q4k_gemv`
  and ``q5k_gemv``.

Prefill keeps the packed GEMM; its epilogues (bias, cast, residual) run as their own small
kernels in decode, since the hand-written kernels are never fused.
"""

from __future__ import annotations

import tvm
from tvm import relax

from mpt_relax.compile.targets import TargetSpec
from mpt_relax.kernels.cpu import float_gemv, group_gemv, q4k_q5k_gemv, q6k_gemv
from mpt_relax.kernels.cpu.base import cpu_has
from mpt_relax.quantization import DEQUANTIZE_PREFIX, QUANTIZATIONS, GroupQuantization

DECODE_FUNCTION = "batch_decode"
_CALL_TIR = tvm.ir.Op.get("relax.call_tir")
_FLOATS = ("float16", "float32")
_GROUP_PREFIX = f"fused_{DEQUANTIZE_PREFIX}"
# GGUF blocks (of 256 weights) with an exact decode GEMV: the fused kernel's name prefix ->
# (whether a shape is supported, bytes per block, the kernel's maker)
_BLOCK_GEMVS = {f"fused_{DEQUANTIZE_PREFIX}gguf_q6_k": (q6k_gemv.supported, q6k_gemv.BLOCK_BYTES, q6k_gemv.q6k_gemv),
                f"fused_{DEQUANTIZE_PREFIX}gguf_q4_k": (q4k_q5k_gemv.supported, q4k_q5k_gemv.Q4_K.block_bytes,
                                                        q4k_q5k_gemv.q4k_gemv),
                f"fused_{DEQUANTIZE_PREFIX}gguf_q5_k": (q4k_q5k_gemv.supported, q4k_q5k_gemv.Q5_K.block_bytes,
                                                        q4k_q5k_gemv.q5k_gemv)}


def _static_shape(sinfo) -> list[int] | None:
    shape = getattr(sinfo, "shape", None)
    if shape is None or not isinstance(shape, relax.ShapeExpr):
        return None
    return [v.value if isinstance(v, tvm.tirx.IntImm) else None for v in shape.values]


def _static_2d(sinfo) -> list[int] | None:
    shape = _static_shape(sinfo)
    return shape if shape is not None and len(shape) == 2 and None not in shape else None


def _group_scheme(callee: str) -> GroupQuantization | None:
    """The group scheme whose fused dequantize + NT_matmul ``callee`` is, if any."""
    if not callee.startswith(_GROUP_PREFIX) or "_NT_matmul" not in callee:
        return None
    rest = callee[len(_GROUP_PREFIX):]
    return next((q for q in QUANTIZATIONS.values() if isinstance(q, GroupQuantization) and rest.startswith(q.name)), None)


@relax.expr_functor.mutator
class _DecodeGEMVs(relax.PyExprMutator):
    """Rewrites the qualifying GEMV calls of one function (see the module docstring)."""

    def __init__(self, mod: tvm.IRModule, group_kernels: bool):
        super().__init__(mod)
        self.group_kernels = group_kernels
        self.kernels: dict[str, relax.GlobalVar] = {}  # by name: each name spells out its kernel's arguments

    def _kernel(self, name: str, make) -> relax.GlobalVar:
        if name not in self.kernels:
            self.kernels[name] = self.builder_.add_func(make(), name)
        return self.kernels[name]

    def visit_call_(self, call: relax.Call) -> relax.Expr:  # noqa: D102
        call = super().visit_call_(call)
        if not (call.op.same_as(_CALL_TIR) and isinstance(call.args[0], relax.GlobalVar)
                and isinstance(call.args[1], relax.Tuple)):
            return call
        callee, args, out_info = call.args[0].name_hint, call.args[1].fields, call.ty_args[0]
        new = None
        if callee.startswith("NT_matmul") and len(args) == 2:
            new = self._float(args, out_info)
        elif self.group_kernels and len(args) == 3 and (scheme := _group_scheme(callee)) is not None:
            new = self._group(scheme, args, out_info)
        elif "_NT_matmul" in callee and len(args) == 2 and (
                block := next((v for p, v in _BLOCK_GEMVS.items() if callee.startswith(p)), None)) is not None:
            new = self._blocks(*block, args, out_info)
        return call if new is None else new

    def _float(self, args, out_info) -> relax.Call | None:
        x, w = args
        w_shape, x_shape = _static_2d(w.ty), _static_shape(x.ty)
        if (w_shape is None or x_shape is None or len(x_shape) != 2 or x_shape[1] != w_shape[1]
                or w.ty.dtype not in _FLOATS or x.ty.dtype not in _FLOATS or out_info.dtype not in _FLOATS
                or not float_gemv.supported(*w_shape)):
            return None
        key = (*w_shape, x.ty.dtype, w.ty.dtype, out_info.dtype)
        kernel = self._kernel("float_gemv_{}x{}_{}_{}_{}".format(*key), lambda: float_gemv.float_gemv(*key))
        return relax.call_tir(kernel, relax.Tuple([x, w]), out_info)

    def _group(self, q: GroupQuantization, args, out_info) -> relax.Call | None:
        q_weight, q_scale, x = args
        w_shape, s_shape, x_shape = _static_2d(q_weight.ty), _static_2d(q_scale.ty), _static_shape(x.ty)
        if w_shape is None or s_shape is None or x_shape is None or len(x_shape) != 2:
            return None
        n, k = w_shape[0], x_shape[1]
        if (q_weight.ty.dtype != "uint32" or q_scale.ty.dtype != q.model_dtype or w_shape[1] * 32 != k * q.bits
                or s_shape != [n, k // q.group_size] or x.ty.dtype not in _FLOATS or out_info.dtype not in _FLOATS
                or not group_gemv.supported(n, k)):
            return None
        key = (n, k, q.bits, x.ty.dtype, out_info.dtype, q.model_dtype)
        kernel = self._kernel("group_gemv_{}x{}_q{}_{}_{}_{}".format(*key), lambda: group_gemv.group_gemv(*key))
        return relax.call_tir(kernel, relax.Tuple([q_weight, q_scale, x]), out_info)

    def _blocks(self, supported, block_bytes, make, args, out_info) -> relax.Call | None:
        blocks, x = args
        b_shape, x_shape = _static_2d(blocks.ty), _static_shape(x.ty)
        if b_shape is None or x_shape is None or len(x_shape) != 2:
            return None
        n, k = b_shape[0], x_shape[1]
        if (blocks.ty.dtype != "uint8" or not supported(n, k) or b_shape[1] != k // 256 * block_bytes
                or x.ty.dtype not in _FLOATS or out_info.dtype not in _FLOATS):
            return None
        key = (n, k, x.ty.dtype, out_info.dtype)
        kernel = self._kernel("{}_{}x{}_{}_{}".format(make.__name__, *key), lambda: make(*key))
        return relax.call_tir(kernel, relax.Tuple([blocks, x]), out_info)


def select_decode_gemv(spec: TargetSpec) -> tvm.transform.Pass:
    """Module pass: on llvm targets, the decode step's float, exact group-quantized and GGUF Q6_K /
    Q4_K / Q5_K GEMVs become the streaming kernels (the group one where the target has AVX-512F)."""

    @tvm.transform.module_pass(opt_level=0, name="SelectDecodeGEMV")
    def _run(mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        if spec.name != "llvm" or DECODE_FUNCTION not in [g.name_hint for g in mod.get_global_vars()]:
            return mod
        rewriter = _DecodeGEMVs(mod, group_kernels=cpu_has(spec.target, group_gemv.REQUIRED_FEATURES))
        gvar = mod.get_global_var(DECODE_FUNCTION)
        func = rewriter.visit_expr(mod[gvar])
        out = rewriter.builder_.get()
        out[gvar] = func
        return out

    return _run
