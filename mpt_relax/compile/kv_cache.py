"""The nn-level ALiBi paged KV cache the model attends through."""

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

# ---------------------------------------------------------------------------- the nn-level cache


class ALiBiPagedKVCache(PagedKVCache):  # pylint: disable=too-few-public-methods
    """TVM's paged KV cache runtime object driven by the ALiBi kernels of this module.

    Inherits ``attention_with_fused_qkv(layer_id, qkv [b, s, H + 2*KV, hd], num_qo_heads,
    sm_scale) -> [b, s, H, hd]`` from ``PagedKVCache``; :meth:`attention` is the same call in
    the shapes the MPT attention block already has.
    """

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
        """Emit the cache creation for all ``cfg.n_layers`` layers inside an nn function.

        ``max_batch_size`` (sequences per forward), ``max_total_seq_len`` (token capacity: the
        runtime allocates ``ceil(max_total_seq_len / page_size) + 1`` pages per layer) and
        ``prefill_chunk_size`` (most tokens in one forward) may be symbolic ``tirx.Var``s
        bound at run time. ``page_size`` is baked into the kernels, so it is a build option.
        """
        if not isinstance(page_size, int) or page_size <= 0:
            raise ValueError(f"page_size must be a positive int baked into the kernels, got {page_size!r}")
        spec = AttentionSpec.from_config(cfg, dtype, page_size)
        bb = rx.BlockBuilder.current()
        kernels = attention_kernels(spec, target)
        none = rx.Tuple([])

        def tir(func: tirx.PrimFunc, name: str) -> rx.Tuple:
            """An attention kernel in the runtime's ("tirx", function) form."""
            return rx.Tuple([tvm.ir.StringImm("tirx"), bb.add_func(func, name)])

        args = [
            # sliding window off; the per-layer window size must still be positive, so TVM's default
            rx.ShapeExpr([max_batch_size, max_total_seq_len, prefill_chunk_size, page_size, 0, 1024]),
            rx.ShapeExpr([0, cfg.n_layers]),
            rx.prim_value(cfg.n_heads),
            rx.prim_value(cfg.kv_n_heads),
            rx.prim_value(cfg.head_dim),
            rx.prim_value(cfg.head_dim),
            rx.ShapeExpr([int(AttnKind.MHA)] * cfg.n_layers),
            rx.prim_value(False),  # enable_disaggregation
            rx.prim_value(int(RopeMode.NONE)),
            rx.prim_value(1),  # rope_scale (unused)
            rx.prim_value(1),  # rope_theta (unused)
            rx.prim_value(0),  # rope_ext_factors: none
            rx.op.zeros((), dtype),
            bb.add_func(_kv_cache_transpose_append(cfg.kv_n_heads, cfg.head_dim, dtype, page_size), "kv_cache_transpose_append"),
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
            bb.add_func(_kv_cache_debug_get_kv(cfg.n_layers, cfg.kv_n_heads, cfg.head_dim, dtype), "kv_cache_debug_get_kv"),
            bb.add_func(kernels.compact_kv_copy, "kv_cache_compact_kv_copy"),
        ]
        expr = rx.call_pure_packed("vm.builtin.paged_attention_kv_cache_create", *args, ty_args=rx.AnyType())
        return cls(_expr=expr, _name=name)

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


