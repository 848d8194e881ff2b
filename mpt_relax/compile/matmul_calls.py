"""Find the exact ``x @ W^T`` calls of one Relax function and point them at other kernels.

After ``FuseTransposeMatmul`` every ``x @ W^T`` of a float weight is a ``call_tir`` of an
``NT_matmul`` TE kernel, and after :func:`~mpt_relax.quantization.fuse_dequantize_matmul` every
exact quantized one a fused dequantize + ``NT_matmul`` kernel: ``fused_dequantize_<group
scheme>..._NT_matmul`` (q_weight, q_scale, x) or ``fused_dequantize_gguf_<type>..._NT_matmul``
(blocks, x). These kernels are shared by prefill and decode. :func:`rewrite_matmuls` reads each
such call of one function whose weights are static 2-D tensors as a :class:`Matmul` and asks a
``choose`` hook for the kernel that replaces it (the decode GEMVs, the exact AMX prefill); the
hand-written kernels are never fused, so a call's epilogues (bias, cast, residual) stay their
own small kernels.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import tvm
from tvm import relax, tirx

from mpt_relax.quantization import DEQUANTIZE_PREFIX, QUANTIZATIONS, GroupQuantization
from mpt_relax.quantization.gguf_blocks import BLOCK_TYPES

_CALL_TIR = tvm.ir.Op.get("relax.call_tir")
FLOATS = ("float16", "float32")
_FUSED_PREFIX = f"fused_{DEQUANTIZE_PREFIX}"
_GGUF_PREFIX = f"{_FUSED_PREFIX}gguf_"


@dataclasses.dataclass(frozen=True)
class Matmul:
    """One exact ``y [M, n] = x [M, k] @ W^T`` call. ``kind``: "float" (weights: (W,)), "group"
    (weights: (q_weight, q_scale), ``scheme`` set) or "blocks" (weights: (blocks,), ``block``
    the GGML type name, e.g. Q4_K). ``w_dtype``: the dtype the weights are used in."""

    kind: str
    n: int
    k: int
    x: relax.Expr
    weights: tuple
    x_dtype: str
    w_dtype: str
    out_dtype: str  # dtypes as strings
    scheme: GroupQuantization | None = None
    block: str = ""

    def key(self) -> str:
        """The shape and dtypes, for kernel names."""
        return f"{self.n}x{self.k}_{self.x_dtype}_{self.w_dtype}_{self.out_dtype}"


# choose(matmul) -> None (keep the call) or (kernel name, its maker, whether x is its first argument)
Choice = Callable[[Matmul], "tuple[str, Callable[[], tirx.PrimFunc], bool] | None"]


def _static_shape(sinfo) -> list[int] | None:
    shape = getattr(sinfo, "shape", None)
    if shape is None or not isinstance(shape, relax.ShapeExpr):
        return None
    return [v.value if isinstance(v, tirx.IntImm) else None for v in shape.values]


def _static_2d(sinfo) -> list[int] | None:
    shape = _static_shape(sinfo)
    return shape if shape is not None and len(shape) == 2 and None not in shape else None


def _group_scheme(callee: str) -> GroupQuantization | None:
    """The group scheme whose fused dequantize + NT_matmul ``callee`` is, if any."""
    rest = callee[len(_FUSED_PREFIX):]
    return next((q for q in QUANTIZATIONS.values() if isinstance(q, GroupQuantization) and rest.startswith(q.name)), None)


def _matmul(callee: str, args, out_info) -> Matmul | None:
    """The call as a :class:`Matmul`, if it is one with static weights and float x / y."""
    if not (callee.startswith("NT_matmul") or (callee.startswith(_FUSED_PREFIX) and "_NT_matmul" in callee)) \
            or not isinstance(out_info, relax.TensorType) or not args:
        return None
    x = args[0] if callee.startswith("NT_matmul") else args[-1]
    x_shape = _static_shape(x.ty)
    if x_shape is None or len(x_shape) != 2 or x_shape[1] is None or x.ty.dtype not in FLOATS \
            or out_info.dtype not in FLOATS:
        return None
    k = x_shape[1]
    if callee.startswith("NT_matmul") and len(args) == 2:
        w_shape = _static_2d(args[1].ty)
        if w_shape is None or w_shape[1] != k or args[1].ty.dtype not in FLOATS:
            return None
        return Matmul("float", w_shape[0], k, x, (args[1],), str(x.ty.dtype), str(args[1].ty.dtype), str(out_info.dtype))
    if callee.startswith(_GGUF_PREFIX) and len(args) == 2:
        b_shape = _static_2d(args[0].ty)
        if b_shape is None or args[0].ty.dtype != "uint8":
            return None
        rest = callee[len(_GGUF_PREFIX):]
        block = max((t for t in BLOCK_TYPES if rest.startswith(t.lower())), key=len, default="")
        return Matmul("blocks", b_shape[0], k, x, (args[0],), str(x.ty.dtype), str(x.ty.dtype), str(out_info.dtype),
                      block=block)
    q = _group_scheme(callee)
    if q is None or len(args) != 3:
        return None
    w_shape, s_shape = _static_2d(args[0].ty), _static_2d(args[1].ty)
    n = None if w_shape is None else w_shape[0]
    if (w_shape is None or s_shape is None or args[0].ty.dtype != "uint32" or args[1].ty.dtype != q.model_dtype
            or w_shape[1] * 32 != k * q.bits or s_shape != [n, k // q.group_size]):
        return None
    return Matmul("group", n, k, x, (args[0], args[1]), str(x.ty.dtype), q.model_dtype, str(out_info.dtype), scheme=q)


@relax.expr_functor.mutator
class _Rewriter(relax.PyExprMutator):
    """Rewrites the chosen matmul calls of one function (see :func:`rewrite_matmuls`)."""

    def __init__(self, mod: tvm.IRModule, choose: Choice):
        super().__init__(mod)
        self.choose = choose
        self.kernels: dict[str, relax.GlobalVar] = {}  # by name: each name spells out its kernel's arguments

    def visit_call_(self, call: relax.Call) -> relax.Expr:  # noqa: D102
        call = super().visit_call_(call)
        if not (call.op.same_as(_CALL_TIR) and isinstance(call.args[0], relax.GlobalVar)
                and isinstance(call.args[1], relax.Tuple)):
            return call
        out_info = call.ty_args[0]
        matmul = _matmul(call.args[0].name_hint, call.args[1].fields, out_info)
        choice = None if matmul is None else self.choose(matmul)
        if choice is None:
            return call
        name, make, x_first = choice
        if name not in self.kernels:
            self.kernels[name] = self.builder_.add_func(make(), name)
        args = (matmul.x, *matmul.weights) if x_first else (*matmul.weights, matmul.x)
        return relax.call_tir(self.kernels[name], relax.Tuple(list(args)), out_info)


def rewrite_matmuls(mod: tvm.IRModule, function: str, choose: Choice) -> tvm.IRModule:
    """``mod`` with the matmul calls of ``function`` that ``choose`` answers for replaced."""
    if function not in [g.name_hint for g in mod.get_global_vars()]:
        return mod
    rewriter = _Rewriter(mod, choose)
    gvar = mod.get_global_var(function)
    func = rewriter.visit_expr(mod[gvar])
    out = rewriter.builder_.get()
    out[gvar] = func
    return out
