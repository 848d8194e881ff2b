"""The nn-level ALiBi paged KV cache the model attends through, and the pass that gives it a
target's attention kernels.

The model is target-free: its ``create_paged_kv_cache`` emits :meth:`ALiBiPagedKVCache.create_generic`,
a call of the placeholder ``mpt_relax.create_alibi_paged_kv_cache`` that carries only the model's
attention shape (layers, heads, head dim, dtype, ALiBi slopes). :func:`dispatch_kv_cache` (the first
pass of every target's pipeline) replaces it with the runtime's real creation call, handing it the
TIR kernels made for that target and page size, so one exported IRModule serves every target.
"""

from __future__ import annotations

import tvm
from tvm import relax as rx
from tvm import tirx
from tvm.relax.frontend.nn import Tensor, op
from tvm.relax.frontend.nn.llm.kv_cache import (
    AttnKind,
    PagedKVCache,
    RopeMode,
    _kv_cache_debug_get_kv,
    _kv_cache_transpose_append,
)
from tvm.target import Target

from mpt_relax.kernels.attention import attention_kernels
from mpt_relax.kernels.attention.common import AttentionSpec, split_fused_qkv
from mpt_relax.models.mpt.config import MPTConfig

GENERIC_CREATE = "mpt_relax.create_alibi_paged_kv_cache"
DEFAULT_PAGE_SIZE = 16


class ALiBiPagedKVCache(PagedKVCache):  # pylint: disable=too-few-public-methods
    """TVM's paged KV cache runtime object driven by the ALiBi kernels of :mod:`mpt_relax.kernels.attention`.

    Inherits ``attention_with_fused_qkv(layer_id, qkv [b, s, H + 2*KV, hd], num_qo_heads,
    sm_scale) -> [b, s, H, hd]`` from ``PagedKVCache``; :meth:`attention` is the same call in
    the shapes the MPT attention block already has.
    """

    @classmethod
    def create_generic(
        cls,
        cfg: MPTConfig,
        dtype: str,
        max_batch_size: tirx.PrimExpr | int,
        max_total_seq_len: tirx.PrimExpr | int,
        prefill_chunk_size: tirx.PrimExpr | int,
        name: str = "paged_kv_cache",
    ) -> "ALiBiPagedKVCache":
        """The target-free creation, for :func:`dispatch_kv_cache` to complete.

        ``max_batch_size`` (sequences per forward), ``max_total_seq_len`` (token capacity) and
        ``prefill_chunk_size`` (most tokens in one forward) may be symbolic, bound at run time.
        """
        slopes = cfg.alibi_slopes() if cfg.alibi else []
        expr = rx.call_pure_packed(
            GENERIC_CREATE,
            rx.ShapeExpr([max_batch_size, max_total_seq_len, prefill_chunk_size]),
            rx.ShapeExpr([cfg.n_layers, cfg.n_heads, cfg.kv_n_heads, cfg.head_dim]),
            rx.op.zeros((), dtype),  # carries the cache dtype
            *(rx.prim_value(tirx.FloatImm("float64", s)) for s in slopes),
            ty_args=rx.AnyType(),
        )
        return cls(_expr=expr, _name=name)

    @classmethod
    def create(  # pylint: disable=too-many-arguments
        cls,
        cfg: MPTConfig,
        dtype: str,
        target: Target,
        max_batch_size: tirx.PrimExpr | int,
        max_total_seq_len: tirx.PrimExpr | int,
        prefill_chunk_size: tirx.PrimExpr | int,
        page_size: int,
        name: str = "paged_kv_cache",
    ) -> "ALiBiPagedKVCache":
        """Emit the creation for one target directly (for kernel tests: no dispatch pass needed)."""
        spec = AttentionSpec.from_config(cfg, dtype, _checked_page_size(page_size))
        sizes = (max_batch_size, max_total_seq_len, prefill_chunk_size)
        return cls(_expr=_creation(rx.BlockBuilder.current(), spec, cfg.n_layers, target, sizes), _name=name)

    def attention(self, layer_id: int, q: Tensor, k: Tensor, v: Tensor, sm_scale: float) -> Tensor:
        """Append this forward's k/v to layer ``layer_id`` and attend over the whole sequence.

        q [n, H, hd], k/v [n, KV, hd] (the n new tokens of every sequence in the batch, in
        ``begin_forward`` order) -> [n, H, hd].
        """
        return self.attention_qkv(layer_id, op.concat([q, k, v], dim=1), q.shape[1], sm_scale)

    def attention_qkv(self, layer_id: int, qkv: Tensor, n_heads: int, sm_scale: float) -> Tensor:
        """:meth:`attention` with q, k and v already side by side: qkv [n, H + 2 KV, hd] -> [n, H, hd]."""
        n, _, head_dim = qkv.shape
        out = self.attention_with_fused_qkv(layer_id, op.reshape(qkv, (1, *qkv.shape)), n_heads, sm_scale)
        return op.reshape(out, (n, n_heads, head_dim))


def _checked_page_size(page_size: int) -> int:
    if not isinstance(page_size, int) or isinstance(page_size, bool) or page_size <= 0:
        raise ValueError(f"page_size must be a positive int baked into the kernels, got {page_size!r}")
    return page_size


def _creation(bb: rx.BlockBuilder, spec: AttentionSpec, n_layers: int, target: Target, sizes) -> rx.Call:
    """The runtime's ``paged_attention_kv_cache_create`` call with ``target``'s kernels added to ``bb``."""
    kernels = attention_kernels(spec, target)
    KV, D, dtype, page_size = spec.kv_heads, spec.head_dim, spec.dtype, spec.page_size
    none = rx.Tuple([])

    def tir(func: tirx.PrimFunc, name: str) -> rx.Tuple:
        """An attention kernel in the runtime's ("tirx", function) form."""
        return rx.Tuple([tvm.ir.StringImm("tirx"), bb.add_func(func, name)])

    args = [
        # sliding window off; the per-layer window size must still be positive, so TVM's default
        rx.ShapeExpr([*sizes, page_size, 0, 1024]),
        rx.ShapeExpr([0, n_layers]),
        rx.prim_value(spec.n_heads),
        rx.prim_value(KV),
        rx.prim_value(D),
        rx.prim_value(D),
        rx.ShapeExpr([int(AttnKind.MHA)] * n_layers),
        rx.prim_value(False),  # enable_disaggregation
        rx.prim_value(int(RopeMode.NONE)),
        rx.prim_value(1),  # rope_scale (unused)
        rx.prim_value(1),  # rope_theta (unused)
        rx.prim_value(0),  # rope_ext_factors: none
        bb.normalize(rx.op.zeros((), dtype)),
        bb.add_func(_kv_cache_transpose_append(KV, D, dtype, page_size), "kv_cache_transpose_append"),
        rx.prim_value(0),  # f_transpose_append_mla: none
        tir(kernels.prefill_ragged, "alibi_attention_prefill_ragged"),
        tir(kernels.prefill_paged, "alibi_attention_prefill"),
        tir(kernels.decode_paged, "alibi_attention_decode"),
        none,  # prefill, sliding window: ALiBi models do not slide
        none,  # decode, sliding window
        none,  # prefill with token-tree mask over paged kv (speculative decoding)
        none,  # prefill with token-tree mask over ragged kv
        none,  # MLA prefill
        rx.Tuple([bb.add_func(kernels.merge_state, "alibi_attention_merge_state")]),
        bb.add_func(split_fused_qkv(spec), "alibi_split_qkv"),
        bb.add_func(kernels.copy_single_page, "kv_cache_copy_single_page"),
        bb.add_func(_kv_cache_debug_get_kv(n_layers, KV, D, dtype), "kv_cache_debug_get_kv"),
        bb.add_func(kernels.compact_kv_copy, "kv_cache_compact_kv_copy"),
    ]
    return rx.call_pure_packed("vm.builtin.paged_attention_kv_cache_create", *args, ty_args=rx.AnyType())


@rx.expr_functor.mutator
class _Dispatcher(rx.PyExprMutator):
    """Replaces every generic creation call with the target's real one."""

    def __init__(self, mod: tvm.IRModule, target: Target, page_size: int):
        super().__init__(mod)
        self.mod, self.target, self.page_size = mod, target, page_size
        self.dispatched = 0

    def run(self) -> tvm.IRModule:
        for gv, func in list(self.mod.functions_items()):
            if isinstance(func, rx.Function):
                self.builder_.update_func(gv, self.visit_expr(func))
        return self.builder_.finalize()

    def visit_call_(self, call: rx.Call) -> rx.Expr:  # noqa: D102
        call = super().visit_call_(call)
        if not (call.op.same_as(tvm.ir.Op.get("relax.call_pure_packed")) and isinstance(call.args[0], rx.ExternFunc)
                and call.args[0].global_symbol == GENERIC_CREATE):
            return call
        sizes, shape, dtype_carrier, *slopes = call.args[1:]
        n_layers, n_heads, kv_heads, head_dim = (int(v) for v in shape.values)
        dtype = str(dtype_carrier.ty.dtype)
        spec = AttentionSpec(n_heads, kv_heads, head_dim, dtype, self.page_size,
                             tuple(float(s.value) for s in slopes) or None)
        self.dispatched += 1
        return _creation(self.builder_, spec, n_layers, self.target, list(sizes.values))


def dispatch_kv_cache(target: Target, page_size: int = DEFAULT_PAGE_SIZE) -> tvm.transform.Pass:
    """Module pass: give every generic ALiBi cache creation ``target``'s kernels for ``page_size``
    tokens per page (a module without one is returned unchanged)."""
    _checked_page_size(page_size)

    @tvm.transform.module_pass(opt_level=0, name="DispatchALiBiKVCache")
    def _pass(mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        return _Dispatcher(mod, target, page_size).run()

    return _pass
