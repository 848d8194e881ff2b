"""ALiBi attention over TVM's paged KV cache.

TVM's ``PagedKVCache`` runtime object (``vm.builtin.paged_attention_kv_cache_create``) owns
the pages, the page tables and the sequence bookkeeping (add / remove / fork sequences, ragged
batches, ``begin_forward`` / ``end_forward``). It calls TIR attention kernels that it is handed
at creation; TVM's own kernels know only RoPE. This module hands it kernels that add the ALiBi
bias ``slope_h * (j - i)`` inside the online softmax instead, with RoPE mode NONE, so the cache
never rotates anything.

Positions. The runtime passes every kernel the absolute position of each query token
(``q_pos``, its "rope position map") and the absolute position of the first key of each
sequence chunk (``k_pos_offset``). The kernels take ``i = q_pos[token]`` and
``j = k_pos_offset[seq] + key index``, which is exact for ragged batches, cached prefixes and
forked sequences alike, and mask causally with ``j <= i``.

Numerics. Scores, the bias, the running max / sum and the output accumulator are fp32 for every
cache dtype; the softmax runs in base 2 (scores pre-multiplied by log2(e)), so the returned
log-sum-exp is base 2 as the runtime's merge kernel expects. Masked keys contribute exactly
zero (no -5e4 "phantom" entry), so large ALiBi biases at 65k+ tokens cannot be swamped.
For half-precision caches the CPU kernels also round the normalised probabilities to the cache
dtype before weighing the values, as MPT's reference attention does (two sweeps over the keys,
see ``_cpu_sweeps``); the GPU kernels keep one online sweep without that rounding.

Layouts (as the runtime stores them):
    pages:  [num_pages, 2, KV, page_size, hd]   (index 0 = K, 1 = V), one array per layer
    qkv:    [total_tokens, H + 2*KV, hd]          fused, split by the cache before attention
    output: [total_tokens, H, hd], lse: [total_tokens, H] fp32 (base-2 log-sum-exp)

Targets. llvm gets loop kernels (query rows in blocks, keys in page-sized tiles, heads in
parallel); every other target gets kernels tiled like TVM's GPU kernels and scheduled with TVM's
prefill schedule. Page-table upkeep (append, page copy on fork, state merge, debug read-back)
reuses TVM's position-free kernels.

Use from a model (one cache for all layers; ``page_size`` is baked into the kernels):

    def create_paged_kv_cache(self, max_batch_size, max_total_seq_len, prefill_chunk_size):
        return ALiBiPagedKVCache.create(cfg, dtype, target, max_batch_size,
                                        max_total_seq_len, prefill_chunk_size, page_size)
    # in layer i, with q [n, H, hd], k / v [n, KV, hd] for this forward's n new tokens:
    out = cache.attention(i, q, k, v, cfg.attn_scale)            # [n, H, hd]

and from an engine, around every call of an entry point that takes the cache:

    rt = PagedKVCacheRuntime(vm["create_paged_kv_cache"](*shape_tuples), page_size)
    rt.add_sequence(seq_id)                       # or rt.fork_sequence(parent, child, pos)
    rt.begin_forward(seq_ids, append_lengths)     # tokens of the call, concatenated in this order
    ... vm["prefill"](...) / vm["batch_decode"](...)
    rt.end_forward()
    rt.remove_sequence(seq_id)                    # frees its pages

Not supported: sliding-window attention and token-tree (speculative) attention; the runtime
refuses both (no sliding-window support, no tree-attention kernel).
"""

from __future__ import annotations

import dataclasses
import math

import tvm
from tvm import relax as rx
from tvm import tirx
from tvm.relax.frontend.nn import Tensor, op
from tvm.relax.frontend.nn.llm.kv_cache import (
    AttnKind,
    PagedKVCache,
    RopeMode,
    _compact_kv_copy,
    _compact_kv_copy_cpu,
    _copy_single_page,
    _copy_single_page_cpu,
    _kv_cache_debug_get_kv,
    _kv_cache_transpose_append,
    _merge_state_inplace,
    _merge_state_inplace_cpu,
)
from tvm.relax.frontend.nn.llm._kernel_common import (
    _get_prefill_kernel_config,
    _schedule_prefill_kernel,
    check_thread_limits,
    get_max_num_threads_per_block,
)
from tvm.script import tirx as T
from tvm.target import Target

from .config import MPTConfig

LOG2E = math.log2(math.e)
_NEG = -1.0e30  # running-max seed and empty-row lse: finite, so exp2(NEG - NEG) is defined


@dataclasses.dataclass(frozen=True)
class AttentionSpec:
    """What the attention kernels are specialised on.

    ``slopes`` is None when ALiBi is off (no bias), else one fp32 slope per query head.
    """

    n_heads: int
    kv_heads: int
    head_dim: int
    dtype: str
    page_size: int
    slopes: tuple[float, ...] | None

    @classmethod
    def from_config(cls, cfg: MPTConfig, dtype: str, page_size: int) -> "AttentionSpec":
        slopes = tuple(cfg.alibi_slopes()) if cfg.alibi else None
        return cls(cfg.n_heads, cfg.kv_n_heads, cfg.head_dim, dtype, page_size, slopes)

    @property
    def group(self) -> int:
        """Query heads per kv head: query head h reads kv head h // group."""
        return self.n_heads // self.kv_heads


def _slope_log2(spec: AttentionSpec, head):
    """fp32 ``slope[head] * log2(e)``: the baked slopes picked by a balanced select tree."""
    if spec.slopes is None:
        return tirx.const(0.0, "float32")

    def pick(lo: int, hi: int):
        if hi - lo == 1:
            return tirx.const(spec.slopes[lo] * LOG2E, "float32")
        mid = (lo + hi) // 2
        return tirx.Select(head < mid, pick(lo, mid), pick(mid, hi))

    return pick(0, len(spec.slopes))


def _alibi_bias(spec: AttentionSpec, slope_log2, key_pos, query_pos):
    """fp32 ALiBi term of a base-2 score: ``slope * log2(e) * (key_pos - query_pos)``, or 0."""
    if spec.slopes is None:
        return tirx.const(0.0, "float32")
    return slope_log2 * tirx.Cast("float32", key_pos - query_pos)


def _paged_kv_len(page_indptr, last_page_len, seq, page_size: int):
    """Tokens a sequence chunk holds in its pages: full pages plus the used part of the last."""
    num_pages = page_indptr[seq + 1] - page_indptr[seq]
    return T.if_then_else(num_pages > 0, (num_pages - 1) * page_size + last_page_len[seq], 0)


def _visible_keys(causal, kv_len, key_pos0, query_pos):
    """How many leading keys (positions key_pos0, key_pos0+1, ...) the query at query_pos sees."""
    return T.if_then_else(causal > 0, T.max(T.min(query_pos - key_pos0 + 1, kv_len), 0), kv_len)


# ------------------------------------------------------------------------ kernel signatures
# The runtime calls each attention role with the same arguments on every target; these wrap a
# body macro (CPU loops or GPU thread blocks) in that role's signature.


def _named(func: tirx.PrimFunc, name: str, attrs: dict) -> tirx.PrimFunc:
    for key, value in {"global_symbol": name, **attrs}.items():
        func = func.with_attr(key, value)
    return func


def _ragged_prefill_kernel(spec: AttentionSpec, name: str, body, attrs: dict) -> tirx.PrimFunc:
    """q [n, H, hd], q_indptr = kv_indptr [b + 1], k/v [n, KV, hd], q_pos [n], k_pos_offset [b]
    -> output [n, H, hd], lse [n, H]; ``body(q, q_indptr, k, v, kv_indptr, q_pos, k_pos_offset,
    output, lse, causal, sm_scale, batch_size)``."""
    H, KV, D, dtype = spec.n_heads, spec.kv_heads, spec.head_dim, spec.dtype

    # fmt: off
    @T.prim_func(s_tir=True)
    def kernel(
        var_q: T.handle, var_q_indptr: T.handle, var_k: T.handle, var_v: T.handle,
        var_kv_indptr: T.handle, var_q_pos: T.handle, var_k_pos_offset: T.handle,
        var_output: T.handle, var_lse: T.handle,
        causal: T.int32, rotary_mode: T.int32, rope_scale: T.float32, rope_theta: T.float32,
        sm_scale: T.float32,
    ):
        batch_size, qo_len, kv_total = T.int32(), T.int32(), T.int32()
        q = T.match_buffer(var_q, (qo_len, H, D), dtype)
        q_indptr = T.match_buffer(var_q_indptr, (batch_size + 1,), "int32", elem_offset=T.int32())
        k = T.match_buffer(var_k, (kv_total, KV, D), dtype)
        v = T.match_buffer(var_v, (kv_total, KV, D), dtype)
        kv_indptr = T.match_buffer(var_kv_indptr, (batch_size + 1,), "int32", elem_offset=T.int32())
        q_pos = T.match_buffer(var_q_pos, (qo_len,), "int32", elem_offset=T.int32())
        k_pos_offset = T.match_buffer(var_k_pos_offset, (batch_size,), "int32", elem_offset=T.int32())
        output = T.match_buffer(var_output, (qo_len, H, D), dtype)
        lse = T.match_buffer(var_lse, (qo_len, H), "float32")
        body(q, q_indptr, k, v, kv_indptr, q_pos, k_pos_offset, output, lse, causal, sm_scale, batch_size)
    # fmt: on
    return _named(kernel, name, attrs)


def _paged_prefill_kernel(spec: AttentionSpec, name: str, body, attrs: dict) -> tirx.PrimFunc:
    """q [n, H, hd], q_indptr [b + 1], pages [P, 2, KV, page_size, hd], page_indptr [b + 1],
    page_values [nnz_pages], last_page_len [b], k_pos_offset [b], q_pos [n] -> output [n, H, hd],
    lse [n, H]; ``body(q, q_indptr, pages, page_indptr, page_values, last_page_len,
    k_pos_offset, q_pos, output, lse, causal, sm_scale, batch_size)``."""
    H, KV, D, dtype, page_size = spec.n_heads, spec.kv_heads, spec.head_dim, spec.dtype, spec.page_size

    # fmt: off
    @T.prim_func(s_tir=True)
    def kernel(
        var_q: T.handle, var_q_indptr: T.handle, var_pages: T.handle, var_page_indptr: T.handle,
        var_page_values: T.handle, var_last_page_len: T.handle, var_k_pos_offset: T.handle,
        var_q_pos: T.handle, var_output: T.handle, var_lse: T.handle,
        causal: T.int32, rotary_mode: T.int32, rope_scale: T.float32, rope_theta: T.float32,
        sm_scale: T.float32,
    ):
        batch_size, total_len, nnz_pages, max_num_pages = T.int32(), T.int32(), T.int32(), T.int32()
        q = T.match_buffer(var_q, (total_len, H, D), dtype)
        q_indptr = T.match_buffer(var_q_indptr, (batch_size + 1,), "int32", elem_offset=T.int32())
        pages = T.match_buffer(var_pages, (max_num_pages, 2, KV, page_size, D), dtype, elem_offset=T.int64())
        page_indptr = T.match_buffer(var_page_indptr, (batch_size + 1,), "int32", elem_offset=T.int32())
        page_values = T.match_buffer(var_page_values, (nnz_pages,), "int32", elem_offset=T.int32())
        last_page_len = T.match_buffer(var_last_page_len, (batch_size,), "int32", elem_offset=T.int32())
        k_pos_offset = T.match_buffer(var_k_pos_offset, (batch_size,), "int32", elem_offset=T.int32())
        q_pos = T.match_buffer(var_q_pos, (total_len,), "int32", elem_offset=T.int32())
        output = T.match_buffer(var_output, (total_len, H, D), dtype)
        lse = T.match_buffer(var_lse, (total_len, H), "float32")
        body(q, q_indptr, pages, page_indptr, page_values, last_page_len, k_pos_offset, q_pos, output, lse, causal, sm_scale, batch_size)
    # fmt: on
    return _named(kernel, name, attrs)


def _decode_kernel(spec: AttentionSpec, name: str, body, attrs: dict) -> tirx.PrimFunc:
    """q [b, H, hd], pages [P, 2, KV, page_size, hd], page_indptr [b + 1], page_values
    [nnz_pages], last_page_len [b], k_pos_offset [b], q_pos [b] -> output [b, H, hd], lse [b, H];
    ``body(q, pages, page_indptr, page_values, last_page_len, k_pos_offset, q_pos, output, lse,
    sm_scale, batch_size)``."""
    H, KV, D, dtype, page_size = spec.n_heads, spec.kv_heads, spec.head_dim, spec.dtype, spec.page_size

    # fmt: off
    @T.prim_func(s_tir=True)
    def kernel(
        var_q: T.handle, var_pages: T.handle, var_page_indptr: T.handle, var_page_values: T.handle,
        var_last_page_len: T.handle, var_k_pos_offset: T.handle, var_q_pos: T.handle,
        var_output: T.handle, var_lse: T.handle,
        rotary_mode: T.int32, rope_scale: T.float32, rope_theta: T.float32, sm_scale: T.float32,
    ):
        B, nnz_pages, max_num_pages = T.int32(), T.int32(), T.int32()
        q = T.match_buffer(var_q, (B, H, D), dtype)
        pages = T.match_buffer(var_pages, (max_num_pages, 2, KV, page_size, D), dtype, elem_offset=T.int64())
        page_indptr = T.match_buffer(var_page_indptr, (B + 1,), "int32", elem_offset=T.int32())
        page_values = T.match_buffer(var_page_values, (nnz_pages,), "int32", elem_offset=T.int32())
        last_page_len = T.match_buffer(var_last_page_len, (B,), "int32", elem_offset=T.int32())
        k_pos_offset = T.match_buffer(var_k_pos_offset, (B,), "int32", elem_offset=T.int32())
        q_pos = T.match_buffer(var_q_pos, (B,), "int32", elem_offset=T.int32())
        output = T.match_buffer(var_output, (B, H, D), dtype)
        lse = T.match_buffer(var_lse, (B, H), "float32")
        body(q, pages, page_indptr, page_values, last_page_len, k_pos_offset, q_pos, output, lse, sm_scale, B)
    # fmt: on
    return _named(kernel, name, attrs)


# ---------------------------------------------------------------------------- CPU (llvm) kernels
# A block of up to _CPU_ROWS query rows of one head walks the keys in tiles of one page: each K/V
# tile is loaded (and converted to fp32) once per block, scored for every row of the block with
# the tile as the vector axis, then folded into each row's running max / sum / accumulator with
# one rescale per tile. Query heads run in parallel.
#
# In every cache dtype but float32 the blocks walk the keys twice (two "sweeps"): the first finds
# each row's max and sum, the second weighs the values by the normalised probabilities rounded to
# the cache dtype, as MPT's reference attention (and HF's) does before its ``probs @ v``; the
# half-precision model's greedy tokens follow that rounding. In float32 the rounding is the
# identity and one online sweep does it all.

_CPU_ROWS = 16
_M, _D, _M_NEW, _RESCALE = range(4)  # slots of a row's softmax state


def _cpu_sweeps(spec: AttentionSpec) -> int:
    """Walks over the keys: 1 (online softmax) for float32, 2 (rounded probabilities) otherwise."""
    return 1 if spec.dtype == "float32" else 2


def _cpu_macros(spec: AttentionSpec):
    """Macros shared by the CPU kernels; the caller allocates the scratch buffers.

    For a block of ``n_rows`` query rows ``row0 ..`` of query head ``head``:
    q_f32 [R, hd]: query * sm_scale * log2(e); acc [R, hd]: unnormalised output;
    state [R, 4]: running max, running sum, the tile's new max, the rescale factor;
    visible [R]: keys each row sees; k_tile_t [hd, page_size] (transposed), v_tile
    [page_size, hd]: the current key / value tile in fp32; scores [page_size].
    ``sweep``: 0 for the online pass, 1 for the value pass of a two-sweep dtype
    (see :func:`_cpu_sweeps`), which only reads the tile's keys in its first sweep.
    """
    D, dtype, TILE = spec.head_dim, spec.dtype, spec.page_size
    rounded = _cpu_sweeps(spec) == 2

    @T.macro
    def start_rows(q, q_pos, row0, n_rows, head, sm_scale, causal, kv_len, key_pos0, q_f32, acc, state, visible, max_visible):
        max_visible[0] = 0
        for r in T.serial(n_rows):
            for x in T.serial(D):
                q_f32[r, x] = T.cast(q[row0 + r, head, x], "float32") * sm_scale * LOG2E
                acc[r, x] = T.float32(0)
            state[r, _M] = T.float32(_NEG)
            state[r, _D] = T.float32(0)
            visible[r] = _visible_keys(causal, kv_len, key_pos0, q_pos[row0 + r])
            max_visible[0] = T.max(max_visible[0], visible[r])

    @T.macro
    def fold_tile(q_pos, row0, n_rows, slope, tile, key_pos0, k_tile_t, v_tile, scores, q_f32, acc, state, visible, sweep):
        for r in T.serial(n_rows):
            if visible[r] > tile * TILE:
                for t in T.vectorized(TILE):
                    scores[t] = _alibi_bias(spec, slope, key_pos0 + tile * TILE + t, q_pos[row0 + r])
                for x in T.serial(D):
                    for t in T.vectorized(TILE):
                        scores[t] += q_f32[r, x] * k_tile_t[x, t]
                if sweep == 0:
                    state[r, _M_NEW] = state[r, _M]
                    for t in T.serial(T.min(TILE, visible[r] - tile * TILE)):
                        state[r, _M_NEW] = T.max(state[r, _M_NEW], scores[t])
                    state[r, _RESCALE] = T.exp2(state[r, _M] - state[r, _M_NEW])
                    state[r, _D] *= state[r, _RESCALE]
                    if not rounded:
                        for x in T.vectorized(D):
                            acc[r, x] *= state[r, _RESCALE]
                    for t in T.vectorized(TILE):
                        scores[t] = T.if_then_else(t < visible[r] - tile * TILE, T.exp2(scores[t] - state[r, _M_NEW]), T.float32(0))
                    for t in T.serial(T.min(TILE, visible[r] - tile * TILE)):
                        state[r, _D] += scores[t]
                        if not rounded:
                            for x in T.vectorized(D):
                                acc[r, x] += scores[t] * v_tile[t, x]
                    state[r, _M] = state[r, _M_NEW]
                else:
                    for t in T.vectorized(TILE):
                        scores[t] = T.cast(T.cast(T.exp2(scores[t] - state[r, _M]) / state[r, _D], dtype), "float32")
                    for t in T.serial(T.min(TILE, visible[r] - tile * TILE)):
                        for x in T.vectorized(D):
                            acc[r, x] += scores[t] * v_tile[t, x]

    @T.macro
    def finish_rows(output, lse, row0, n_rows, head, acc, state):
        for r in T.serial(n_rows):
            for x in T.serial(D):
                if rounded:  # acc already holds the normalised sum (0 for a row without keys)
                    output[row0 + r, head, x] = T.cast(acc[r, x], dtype)
                else:
                    output[row0 + r, head, x] = T.cast(T.if_then_else(state[r, _D] > 0, acc[r, x] / state[r, _D], T.float32(0)), dtype)
            lse[row0 + r, head] = T.if_then_else(state[r, _D] > 0, state[r, _M] + T.log2(state[r, _D]), T.float32(_NEG))

    return start_rows, fold_tile, finish_rows


def _cpu_scratch(spec: AttentionSpec):
    """Allocate the scratch buffers of :func:`_cpu_macros` inside the current block."""
    R, D, TILE = _CPU_ROWS, spec.head_dim, spec.page_size
    return (
        T.sblock_alloc_buffer((R, D), "float32"),  # q_f32
        T.sblock_alloc_buffer((R, D), "float32"),  # acc
        T.sblock_alloc_buffer((R, 4), "float32"),  # state
        T.sblock_alloc_buffer((R,), "int32"),  # visible
        T.sblock_alloc_buffer((1,), "int32"),  # max_visible
        T.sblock_alloc_buffer((D, TILE), "float32"),  # k_tile_t
        T.sblock_alloc_buffer((TILE, D), "float32"),  # v_tile
        T.sblock_alloc_buffer((TILE,), "float32"),  # scores
    )


def prefill_ragged_cpu(spec: AttentionSpec):
    """Causal attention of a ragged batch over its own new k/v (no cache), for llvm.

    q [n, H, hd], q_indptr = kv_indptr [b + 1], k/v [n, KV, hd], q_pos [n], k_pos_offset [b]
    -> output [n, H, hd], lse [n, H].
    """
    H, D, TILE, R, group = spec.n_heads, spec.head_dim, spec.page_size, _CPU_ROWS, spec.group
    start_rows, fold_tile, finish_rows = _cpu_macros(spec)
    SWEEPS = _cpu_sweeps(spec)

    # fmt: off
    @T.macro
    def body(q, q_indptr, k, v, kv_indptr, q_pos, k_pos_offset, output, lse, causal, sm_scale, batch_size):
        for h in T.parallel(H):
            with T.sblock("attn"):
                q_f32, acc, state, visible, max_visible, k_tile_t, v_tile, scores = _cpu_scratch(spec)
                slope: T.let[T.float32] = _slope_log2(spec, h)
                for b in T.serial(batch_size):
                    for block in T.serial(T.ceildiv(q_indptr[b + 1] - q_indptr[b], R)):
                        row0: T.let[T.int32] = q_indptr[b] + block * R
                        n_rows: T.let[T.int32] = T.min(R, q_indptr[b + 1] - row0)
                        start_rows(q, q_pos, row0, n_rows, h, sm_scale, causal, kv_indptr[b + 1] - kv_indptr[b], k_pos_offset[b], q_f32, acc, state, visible, max_visible)
                        for sweep, tile in T.grid(SWEEPS, T.ceildiv(max_visible[0], TILE)):
                            for t, x in T.grid(T.min(TILE, max_visible[0] - tile * TILE), D):
                                k_tile_t[x, t] = T.cast(k[kv_indptr[b] + tile * TILE + t, h // group, x], "float32")
                                if sweep == SWEEPS - 1:
                                    v_tile[t, x] = T.cast(v[kv_indptr[b] + tile * TILE + t, h // group, x], "float32")
                            fold_tile(q_pos, row0, n_rows, slope, tile, k_pos_offset[b], k_tile_t, v_tile, scores, q_f32, acc, state, visible, sweep)
                        finish_rows(output, lse, row0, n_rows, h, acc, state)
    # fmt: on
    return _ragged_prefill_kernel(spec, "alibi_prefill_ragged_cpu", body, {"tirx.is_scheduled": True, "tirx.noalias": True})


def prefill_paged_cpu(spec: AttentionSpec):
    """Attention of a ragged batch of queries over the keys in the cache pages, for llvm.

    q [n, H, hd], q_indptr [b + 1], pages [P, 2, KV, page_size, hd], page_indptr [b + 1],
    page_values [nnz_pages], last_page_len [b], k_pos_offset [b], q_pos [n]
    -> output [n, H, hd], lse [n, H]. The runtime calls it with causal = 0.
    """
    H, D, TILE, R, group = spec.n_heads, spec.head_dim, spec.page_size, _CPU_ROWS, spec.group
    start_rows, fold_tile, finish_rows = _cpu_macros(spec)
    SWEEPS = _cpu_sweeps(spec)

    # fmt: off
    @T.macro
    def body(q, q_indptr, pages, page_indptr, page_values, last_page_len, k_pos_offset, q_pos, output, lse, causal, sm_scale, batch_size):
        for h in T.parallel(H):
            with T.sblock("attn"):
                q_f32, acc, state, visible, max_visible, k_tile_t, v_tile, scores = _cpu_scratch(spec)
                slope: T.let[T.float32] = _slope_log2(spec, h)
                for b in T.serial(batch_size):
                    for block in T.serial(T.ceildiv(q_indptr[b + 1] - q_indptr[b], R)):
                        row0: T.let[T.int32] = q_indptr[b] + block * R
                        n_rows: T.let[T.int32] = T.min(R, q_indptr[b + 1] - row0)
                        start_rows(q, q_pos, row0, n_rows, h, sm_scale, causal, _paged_kv_len(page_indptr, last_page_len, b, TILE), k_pos_offset[b], q_f32, acc, state, visible, max_visible)
                        for sweep, tile in T.grid(SWEEPS, T.ceildiv(max_visible[0], TILE)):
                            page: T.let[T.int32] = page_values[page_indptr[b] + tile]
                            for t, x in T.grid(T.min(TILE, max_visible[0] - tile * TILE), D):
                                k_tile_t[x, t] = T.cast(pages[page, 0, h // group, t, x], "float32")
                                if sweep == SWEEPS - 1:
                                    v_tile[t, x] = T.cast(pages[page, 1, h // group, t, x], "float32")
                            fold_tile(q_pos, row0, n_rows, slope, tile, k_pos_offset[b], k_tile_t, v_tile, scores, q_f32, acc, state, visible, sweep)
                        finish_rows(output, lse, row0, n_rows, h, acc, state)
    # fmt: on
    return _paged_prefill_kernel(spec, "alibi_prefill_paged_cpu", body, {"tirx.is_scheduled": True, "tirx.noalias": True})


def decode_paged_cpu(spec: AttentionSpec):
    """One query per sequence over every key in its pages (its own new key included), for llvm.

    q [b, H, hd], pages [P, 2, KV, page_size, hd], page_indptr [b + 1], page_values [nnz_pages],
    last_page_len [b], k_pos_offset [b], q_pos [b] -> output [b, H, hd], lse [b, H].
    """
    H, D, TILE, group = spec.n_heads, spec.head_dim, spec.page_size, spec.group
    start_rows, fold_tile, finish_rows = _cpu_macros(spec)
    SWEEPS = _cpu_sweeps(spec)

    # fmt: off
    @T.macro
    def body(q, pages, page_indptr, page_values, last_page_len, k_pos_offset, q_pos, output, lse, sm_scale, B):
        for h in T.parallel(H):
            with T.sblock("attn"):
                q_f32, acc, state, visible, max_visible, k_tile_t, v_tile, scores = _cpu_scratch(spec)
                slope: T.let[T.float32] = _slope_log2(spec, h)
                for b in T.serial(B):
                    start_rows(q, q_pos, b, 1, h, sm_scale, 0, _paged_kv_len(page_indptr, last_page_len, b, TILE), k_pos_offset[b], q_f32, acc, state, visible, max_visible)
                    for sweep, tile in T.grid(SWEEPS, T.ceildiv(max_visible[0], TILE)):
                        page: T.let[T.int32] = page_values[page_indptr[b] + tile]
                        for t, x in T.grid(T.min(TILE, max_visible[0] - tile * TILE), D):
                            k_tile_t[x, t] = T.cast(pages[page, 0, h // group, t, x], "float32")
                            if sweep == SWEEPS - 1:
                                v_tile[t, x] = T.cast(pages[page, 1, h // group, t, x], "float32")
                        fold_tile(q_pos, b, 1, slope, tile, k_pos_offset[b], k_tile_t, v_tile, scores, q_f32, acc, state, visible, sweep)
                    finish_rows(output, lse, b, 1, h, acc, state)
    # fmt: on
    return _decode_kernel(spec, "alibi_decode_paged_cpu", body, {"tirx.is_scheduled": True, "tirx.noalias": True})


# ---------------------------------------------------------------------------- GPU kernels
# Tiled like TVM's own paged-attention kernels (and scheduled by TVM's prefill schedule, which
# keys on the block names Q_load / K_load / V_load / S_gemm / S_store / O_init / O_gemm /
# O_store / lse_store): a thread block owns tile_x (query token, head-in-group) rows of one kv
# head, walks the keys tile_z at a time through shared memory, and keeps a per-row running max
# and sum. The ALiBi bias and the causal mask are applied per row while the tile's max is taken.


def _gpu_prefill_macros(spec: AttentionSpec, tile_x: int, tile_z: int, bdx: int, num_warps: int):
    """Macros of the tiled prefill kernels (shared by the paged and the ragged one)."""
    D, group, dtype, page_size = spec.head_dim, spec.group, spec.dtype, spec.page_size
    threads = bdx * num_warps
    rows_per_thread = -(-tile_x // threads)

    def token_of(LH_start, row):
        return (LH_start + row) // group

    def head_of(by, LH_start, row):
        return by * group + (LH_start + row) % group

    def visible(causal, col, kv_len, key_pos0, query_pos):
        return tirx.all(col < kv_len, tirx.any(causal == 0, key_pos0 + col <= query_pos))

    @T.macro
    def load_q(q, Q_smem, q_begin, q_len, by, LH_start):
        for li, lj in T.grid(tile_x, D):
            with T.sblock("Q_load"):
                i, j = T.axis.remap("SS", [li, lj])
                T.reads()
                T.writes()
                if token_of(LH_start, i) < q_len:
                    Q_smem[i, j] = q[q_begin + token_of(LH_start, i), head_of(by, LH_start, i), j]
                else:
                    Q_smem[i, j] = T.cast(0, dtype)

    @T.macro
    def init_state(m_smem, d_smem, O_local, ty, tx):
        for i in T.serial(rows_per_thread):
            row: T.let[T.int32] = i * threads + ty * bdx + tx
            if row < tile_x:
                m_smem[row] = T.float32(_NEG)
                d_smem[row] = T.float32(0)
        for li, lj in T.grid(tile_x, D):
            with T.sblock("O_init"):
                i, j = T.axis.remap("SS", [li, lj])
                O_local[i, j] = T.float32(0)
        T.tvm_storage_sync("shared")

    @T.macro
    def score_tile(Q_smem, K_smem, S_local, S_smem, sm_scale):
        with T.sblock():
            for li, lj, lk in T.grid(tile_x, tile_z, D):
                with T.sblock("S_gemm"):
                    i, j, k = T.axis.remap("SSR", [li, lj, lk])
                    with T.init():
                        S_local[i, j] = T.float32(0)
                    S_local[i, j] += T.cast(Q_smem[i, k], "float32") * T.cast(K_smem[j, k], "float32") * sm_scale * LOG2E
        T.tvm_storage_sync("shared")
        for li, lj in T.grid(tile_x, tile_z):
            with T.sblock("S_store"):
                i, j = T.axis.remap("SS", [li, lj])
                S_smem[i, j] = S_local[i, j]
        T.tvm_storage_sync("shared")

    def query_pos_of(q_pos, q_begin, q_len, LH_start, row):
        return q_pos[q_begin + T.min(token_of(LH_start, row), q_len - 1)]

    def biased(S_smem, row, j, by, LH_start, L_kv_start, q_pos, q_begin, q_len, key_pos0):
        """Row ``row``'s base-2 score for key ``L_kv_start + j`` with its ALiBi bias."""
        slope = _slope_log2(spec, head_of(by, LH_start, row))
        key_pos = key_pos0 + L_kv_start + j
        return S_smem[row, j] + _alibi_bias(spec, slope, key_pos, query_pos_of(q_pos, q_begin, q_len, LH_start, row))

    def seen(row, j, LH_start, L_kv_start, q_pos, q_begin, q_len, causal, kv_len, key_pos0):
        """Whether row ``row`` is a real query that sees key ``L_kv_start + j``."""
        query_pos = query_pos_of(q_pos, q_begin, q_len, LH_start, row)
        return tirx.all(token_of(LH_start, row) < q_len, visible(causal, L_kv_start + j, kv_len, key_pos0, query_pos))

    @T.macro
    def softmax_tile(S_smem, m_smem, d_smem, m_prev_smem, m_prev, m_new, d_new, ty, tx, by, LH_start, L_kv_start, q_pos, q_begin, q_len, causal, kv_len, key_pos0):
        # Each thread owns whole rows. Three passes (max, exp, sum) so that the syncs the
        # planner puts between them stay outside the row predicate.
        for i in T.serial(rows_per_thread):
            row: T.let[T.int32] = i * threads + ty * bdx + tx
            if row < tile_x:
                with T.sblock("softmax_max"):
                    m_prev[i] = m_smem[row]
                    m_new[i] = m_smem[row]
                    for j in T.serial(tile_z):
                        if seen(row, j, LH_start, L_kv_start, q_pos, q_begin, q_len, causal, kv_len, key_pos0):
                            m_new[i] = T.max(m_new[i], biased(S_smem, row, j, by, LH_start, L_kv_start, q_pos, q_begin, q_len, key_pos0))
                    d_new[i] = d_smem[row] * T.exp2(m_prev[i] - m_new[i])
        for i in T.serial(rows_per_thread):
            row: T.let[T.int32] = i * threads + ty * bdx + tx
            with T.sblock("softmax_exp"):
                for j in T.serial(tile_z):
                    if row < tile_x:
                        S_smem[row, j] = T.if_then_else(
                            seen(row, j, LH_start, L_kv_start, q_pos, q_begin, q_len, causal, kv_len, key_pos0),
                            T.exp2(biased(S_smem, row, j, by, LH_start, L_kv_start, q_pos, q_begin, q_len, key_pos0) - m_new[i]),
                            T.float32(0),
                        )
        for i in T.serial(rows_per_thread):
            row: T.let[T.int32] = i * threads + ty * bdx + tx
            if row < tile_x:
                with T.sblock("softmax_sum"):
                    for j in T.serial(tile_z):
                        d_new[i] += S_smem[row, j]
                    m_prev_smem[row] = m_prev[i]
                    m_smem[row] = m_new[i]
                    d_smem[row] = d_new[i]
        T.tvm_storage_sync("shared")

    @T.macro
    def accumulate_tile(S_smem, V_smem, O_local, m_prev_smem, m_smem):
        with T.sblock():
            for li, lj, lk in T.grid(tile_x, D, tile_z):
                with T.sblock("O_gemm"):
                    i, j, k = T.axis.remap("SSR", [li, lj, lk])
                    with T.init():
                        O_local[i, j] *= T.exp2(m_prev_smem[i] - m_smem[i])
                    O_local[i, j] += S_smem[i, k] * T.cast(V_smem[k, j], "float32")

    @T.macro
    def store(output, lse, O_local, m_smem, d_smem, q_begin, q_len, by, LH_start):
        for li, lj in T.grid(tile_x, D):
            with T.sblock("O_store"):
                i, j = T.axis.remap("SS", [li, lj])
                if token_of(LH_start, i) < q_len:
                    output[q_begin + token_of(LH_start, i), head_of(by, LH_start, i), j] = T.cast(
                        T.if_then_else(d_smem[i] > 0, O_local[i, j] / d_smem[i], T.float32(0)), dtype
                    )
        for li in T.grid(tile_x):
            with T.sblock("lse_store"):
                i = T.axis.remap("S", [li])
                if token_of(LH_start, i) < q_len:
                    lse[q_begin + token_of(LH_start, i), head_of(by, LH_start, i)] = T.if_then_else(
                        d_smem[i] > 0, m_smem[i] + T.log2(d_smem[i]), T.float32(_NEG)
                    )

    @T.macro
    def load_kv_paged(pages, page_values, first_page, by, L_kv_start, kv_len, K_smem, V_smem):
        for lz, ly in T.grid(tile_z, D):
            with T.sblock("K_load"):
                i, j = T.axis.remap("SS", [lz, ly])
                T.reads()
                T.writes()
                if L_kv_start + i < kv_len:
                    K_smem[i, j] = pages[page_values[first_page + (L_kv_start + i) // page_size], 0, by, (L_kv_start + i) % page_size, j]
                else:
                    K_smem[i, j] = T.cast(0, dtype)
        T.tvm_storage_sync("shared")
        for lz, ly in T.grid(tile_z, D):
            with T.sblock("V_load"):
                i, j = T.axis.remap("SS", [lz, ly])
                T.reads()
                T.writes()
                if L_kv_start + i < kv_len:
                    V_smem[i, j] = pages[page_values[first_page + (L_kv_start + i) // page_size], 1, by, (L_kv_start + i) % page_size, j]
                else:
                    V_smem[i, j] = T.cast(0, dtype)
        T.tvm_storage_sync("shared")

    @T.macro
    def load_kv_ragged(k, v, kv_begin, by, L_kv_start, kv_len, K_smem, V_smem):
        # K_load declares no access regions: the ragged schedule transposes its write layout.
        for lz, ly in T.grid(tile_z, D):
            with T.sblock("K_load"):
                i, j = T.axis.remap("SS", [lz, ly])
                if L_kv_start + i < kv_len:
                    K_smem[i, j] = k[kv_begin + L_kv_start + i, by, j]
                else:
                    K_smem[i, j] = T.cast(0, dtype)
        T.tvm_storage_sync("shared")
        for lz, ly in T.grid(tile_z, D):
            with T.sblock("V_load"):
                i, j = T.axis.remap("SS", [lz, ly])
                T.reads()
                T.writes()
                if L_kv_start + i < kv_len:
                    V_smem[i, j] = v[kv_begin + L_kv_start + i, by, j]
                else:
                    V_smem[i, j] = T.cast(0, dtype)
        T.tvm_storage_sync("shared")

    @T.macro
    def next_work(tile_id, batch_idx, batch_tiles, q_indptr, batch_size):
        # Persistent blocks: skip past the sequences whose tiles are all taken.
        while tile_id[0] >= batch_tiles[0] and batch_idx[0] < batch_size:
            tile_id[0] -= batch_tiles[0]
            batch_idx[0] += 1
            if batch_idx[0] < batch_size:
                batch_tiles[0] = T.ceildiv((q_indptr[batch_idx[0] + 1] - q_indptr[batch_idx[0]]) * group, tile_x)

    def kv_tiles(causal, kv_len, key_pos0, q_pos, q_begin, q_len, LH_start):
        """Key tiles the query tile needs: under causal masking, up to its last row's position."""
        last = q_pos[q_begin + T.min(token_of(LH_start, tile_x - 1), q_len - 1)]
        return T.ceildiv(_visible_keys(causal, kv_len, key_pos0, last), tile_z)

    return load_q, load_kv_paged, load_kv_ragged, init_state, score_tile, softmax_tile, accumulate_tile, store, next_work, kv_tiles


def _gpu_prefill_config(spec: AttentionSpec, target: Target):
    """TVM's prefill tiling for this head shape / dtype / target (query tile must span hd)."""
    NUM_BLKS, LOAD_VEC, _, bdx, num_warps, tile_x, tile_y, tile_z = _get_prefill_kernel_config(
        spec.kv_heads, spec.n_heads, spec.head_dim, spec.dtype, target
    )
    if tile_y != spec.head_dim:
        raise ValueError(f"no prefill tiling for head_dim {spec.head_dim} on {target.kind.name} (got tile_y {tile_y})")
    return NUM_BLKS, LOAD_VEC, bdx, num_warps, tile_x, tile_z


def _gpu_prefill_scratch(spec: AttentionSpec, tile_x: int, tile_z: int, rows_per_thread: int):
    """Shared / local buffers of the tiled prefill kernels."""
    D, dtype = spec.head_dim, spec.dtype
    return (
        T.sblock_alloc_buffer((tile_x, D), dtype, scope="shared"),  # Q_smem
        T.sblock_alloc_buffer((tile_z, D), dtype, scope="shared"),  # K_smem
        T.sblock_alloc_buffer((tile_z, D), dtype, scope="shared"),  # V_smem
        T.sblock_alloc_buffer((tile_x, tile_z), "float32", scope="local"),  # S_local
        T.sblock_alloc_buffer((tile_x, tile_z), "float32", scope="shared"),  # S_smem
        T.sblock_alloc_buffer((tile_x, D), "float32", scope="local"),  # O_local
        T.sblock_alloc_buffer((tile_x,), "float32", scope="shared"),  # m_smem
        T.sblock_alloc_buffer((tile_x,), "float32", scope="shared"),  # m_prev_smem
        T.sblock_alloc_buffer((tile_x,), "float32", scope="shared"),  # d_smem
        T.sblock_alloc_buffer((rows_per_thread,), "float32", scope="local"),  # m_prev
        T.sblock_alloc_buffer((rows_per_thread,), "float32", scope="local"),  # m_new
        T.sblock_alloc_buffer((rows_per_thread,), "float32", scope="local"),  # d_new
    )


def _gpu_walk_state():
    """Per-thread scalars of the persistent tile walk: tile id, sequence, its tiles, kv length."""
    return tuple(T.sblock_alloc_buffer((1,), "int32", scope="local") for _ in range(4))


def _gpu_prefill_walk(spec: AttentionSpec, tile_x: int, tile_z: int, bdx: int, num_warps: int, num_blocks: int,
                      paged: bool):
    """The body of a tiled prefill kernel as a macro: persistent blocks walk the query tiles of
    every sequence, each over the key tiles it sees.

    ``kv`` is ``(pages, page_values, page_indptr, last_page_len)`` when ``paged`` (keys in
    the cache pages) and ``(k, v, kv_indptr)`` otherwise (the batch's own new keys).
    """
    rows_per_thread = -(-tile_x // (bdx * num_warps))
    load_q, load_kv_paged, load_kv_ragged, init_state, score_tile, softmax_tile, accumulate_tile, store, next_work, kv_tiles = _gpu_prefill_macros(spec, tile_x, tile_z, bdx, num_warps)
    load_kv = load_kv_paged if paged else load_kv_ragged

    def kv_length(kv, b):
        return _paged_kv_len(kv[2], kv[3], b, spec.page_size) if paged else kv[2][b + 1] - kv[2][b]

    # fmt: off
    @T.macro
    def walk(q, q_indptr, q_pos, k_pos_offset, output, lse, causal, sm_scale, batch_size, kv):
        for lbx in T.thread_binding(num_blocks, thread="blockIdx.x"):
            for lby in T.thread_binding(spec.kv_heads, thread="blockIdx.y"):
                for lty in T.thread_binding(num_warps, thread="threadIdx.y"):
                    for ltx in T.thread_binding(bdx, thread="threadIdx.x"):
                        with T.sblock("attn"):
                            bx, by, ty, tx = T.axis.remap("SSSS", [lbx, lby, lty, ltx])
                            T.reads()
                            T.writes()
                            tile_id, batch_idx, batch_tiles, kv_len = _gpu_walk_state()
                            Q_smem, K_smem, V_smem, S_local, S_smem, O_local, m_smem, m_prev_smem, d_smem, m_prev, m_new, d_new = _gpu_prefill_scratch(spec, tile_x, tile_z, rows_per_thread)
                            tile_id[0] = bx
                            batch_idx[0] = 0
                            batch_tiles[0] = T.ceildiv((q_indptr[1] - q_indptr[0]) * spec.group, tile_x)
                            while T.tvm_thread_invariant(batch_idx[0] < batch_size):
                                next_work(tile_id, batch_idx, batch_tiles, q_indptr, batch_size)
                                if T.tvm_thread_invariant(batch_idx[0] < batch_size):
                                    b: T.let[T.int32] = batch_idx[0]
                                    LH_start: T.let[T.int32] = tile_id[0] * tile_x
                                    q_begin: T.let[T.int32] = q_indptr[b]
                                    q_len: T.let[T.int32] = q_indptr[b + 1] - q_indptr[b]
                                    kv_begin: T.let[T.int32] = kv[2][b]  # first page, or first key row
                                    kv_len[0] = kv_length(kv, b)
                                    T.tvm_storage_sync("shared")
                                    init_state(m_smem, d_smem, O_local, ty, tx)
                                    load_q(q, Q_smem, q_begin, q_len, by, LH_start)
                                    T.tvm_storage_sync("shared")
                                    for iterator in T.serial(kv_tiles(causal, kv_len[0], k_pos_offset[b], q_pos, q_begin, q_len, LH_start)):
                                        L_kv_start: T.let[T.int32] = iterator * tile_z
                                        load_kv(kv[0], kv[1], kv_begin, by, L_kv_start, kv_len[0], K_smem, V_smem)
                                        score_tile(Q_smem, K_smem, S_local, S_smem, sm_scale)
                                        softmax_tile(S_smem, m_smem, d_smem, m_prev_smem, m_prev, m_new, d_new, ty, tx, by, LH_start, L_kv_start, q_pos, q_begin, q_len, causal, kv_len[0], k_pos_offset[b])
                                        accumulate_tile(S_smem, V_smem, O_local, m_prev_smem, m_smem)
                                    store(output, lse, O_local, m_smem, d_smem, q_begin, q_len, by, LH_start)
                                    tile_id[0] += num_blocks
    # fmt: on
    return walk


def _scheduled_prefill(func: tirx.PrimFunc, load_vec: int, bdx: int, num_warps: int, tile_x: int, spec: AttentionSpec,
                       tile_z: int, ragged: bool) -> tirx.PrimFunc:
    sch = _schedule_prefill_kernel(tvm.s_tir.Schedule(func), load_vec, bdx, num_warps, tile_x, spec.head_dim, tile_z,
                                   ragged, False)
    return sch.mod["main"].with_attr("tirx.is_scheduled", True)


def prefill_paged_gpu(spec: AttentionSpec, target: Target):
    """GPU version of :func:`prefill_paged_cpu` (same signature and semantics)."""
    NUM_BLKS, LOAD_VEC, bdx, num_warps, tile_x, tile_z = _gpu_prefill_config(spec, target)
    walk = _gpu_prefill_walk(spec, tile_x, tile_z, bdx, num_warps, NUM_BLKS, paged=True)

    # fmt: off
    @T.macro
    def body(q, q_indptr, pages, page_indptr, page_values, last_page_len, k_pos_offset, q_pos, output, lse, causal, sm_scale, batch_size):
        walk(q, q_indptr, q_pos, k_pos_offset, output, lse, causal, sm_scale, batch_size, (pages, page_values, page_indptr, last_page_len))
    # fmt: on
    kernel = _paged_prefill_kernel(spec, "alibi_prefill_paged", body, {})
    return _scheduled_prefill(kernel, LOAD_VEC, bdx, num_warps, tile_x, spec, tile_z, ragged=False)


def prefill_ragged_gpu(spec: AttentionSpec, target: Target):
    """GPU version of :func:`prefill_ragged_cpu` (same signature and semantics)."""
    NUM_BLKS, LOAD_VEC, bdx, num_warps, tile_x, tile_z = _gpu_prefill_config(spec, target)
    walk = _gpu_prefill_walk(spec, tile_x, tile_z, bdx, num_warps, NUM_BLKS, paged=False)

    # fmt: off
    @T.macro
    def body(q, q_indptr, k, v, kv_indptr, q_pos, k_pos_offset, output, lse, causal, sm_scale, batch_size):
        walk(q, q_indptr, q_pos, k_pos_offset, output, lse, causal, sm_scale, batch_size, (k, v, kv_indptr))
    # fmt: on
    kernel = _ragged_prefill_kernel(spec, "alibi_prefill_ragged", body, {})
    return _scheduled_prefill(kernel, LOAD_VEC, bdx, num_warps, tile_x, spec, tile_z, ragged=True)


def _gpu_decode_config(spec: AttentionSpec, target: Target):
    """Thread shape of the decode kernel.

    bdx threads split head_dim (vec elements each) and reduce the dot product among themselves;
    bdy query heads of one kv group share each loaded key; bdz thread groups take different
    keys and merge their softmax states at the end; gdz blocks cover groups larger than bdy.
    """
    itemsize = (tvm.runtime.DataType(spec.dtype).bits + 7) // 8
    vec = min(max(8 // itemsize, spec.head_dim // 32), 4)
    bdx = spec.head_dim // vec
    thread_limit = min(get_max_num_threads_per_block(target), 512)
    bdy = spec.group
    while bdx * bdy > thread_limit and bdy > 1:
        bdy //= 2
    gdz = spec.group // bdy
    bdz = max(thread_limit // (bdx * bdy), 1)
    keys_per_thread = 2 if spec.group == 1 else 1  # keys each (tz, ty) loads per step
    check_thread_limits(target, bdx=bdx, bdy=bdy, bdz=bdz, gdz=1)
    return vec, bdx, bdy, bdz, gdz, keys_per_thread


def decode_paged_gpu(spec: AttentionSpec, target: Target):
    """GPU version of :func:`decode_paged_cpu` (same signature and semantics)."""
    KV, D, dtype, group, page_size = spec.kv_heads, spec.head_dim, spec.dtype, spec.group, spec.page_size
    VEC, bdx, bdy, bdz, gdz, per_thread = _gpu_decode_config(spec, target)
    slice_keys = bdy * per_thread  # keys one tz slice scores per step
    step_keys = bdz * slice_keys  # keys the block loads per step

    # fmt: off
    @T.macro
    def body(q, pages, page_indptr, page_values, last_page_len, k_pos_offset, q_pos, output, lse, sm_scale, B):
        for bx in T.thread_binding(B, thread="blockIdx.x"):
            for fused_by_bz in T.thread_binding(KV * gdz, thread="blockIdx.y"):
                for ty in T.thread_binding(bdy, thread="threadIdx.y"):
                    for tx in T.thread_binding(bdx, thread="threadIdx.x"):
                        for tz in T.thread_binding(bdz, thread="threadIdx.z"):
                            with T.sblock("attn"):
                                q_f32 = T.sblock_alloc_buffer((VEC,), "float32", scope="local")
                                K_smem = T.sblock_alloc_buffer((step_keys, D), dtype, scope="shared")
                                V_smem = T.sblock_alloc_buffer((step_keys, D), dtype, scope="shared")
                                O_merge = T.sblock_alloc_buffer((bdz, bdy, D), "float32", scope="shared")
                                md_merge = T.sblock_alloc_buffer((bdz, bdy, 2), "float32", scope="shared")
                                kv_len = T.sblock_alloc_buffer((1,), "int32", scope="local")
                                partial = T.sblock_alloc_buffer((1,), "float32", scope="local")
                                dot = T.sblock_alloc_buffer((1,), "float32", scope="local")
                                S_local = T.sblock_alloc_buffer((slice_keys,), "float32", scope="local")
                                O_local = T.sblock_alloc_buffer((VEC,), "float32", scope="local")
                                m = T.sblock_alloc_buffer((1,), "float32", scope="local")
                                d = T.sblock_alloc_buffer((1,), "float32", scope="local")
                                m_prev = T.sblock_alloc_buffer((1,), "float32", scope="local")
                                other_scale = T.sblock_alloc_buffer((1,), "float32", scope="local")

                                by: T.let[T.int32] = fused_by_bz % KV
                                head: T.let[T.int32] = by * group + (fused_by_bz // KV) * bdy + ty
                                first_page: T.let[T.int32] = page_indptr[bx]
                                slope: T.let[T.float32] = _slope_log2(spec, head)
                                kv_len[0] = _paged_kv_len(page_indptr, last_page_len, bx, page_size)
                                m[0] = T.float32(_NEG)
                                d[0] = T.float32(0)
                                for vec in T.vectorized(VEC):
                                    O_local[vec] = T.float32(0)
                                    q_f32[vec] = T.cast(q[bx, head, tx * VEC + vec], "float32") * sm_scale * LOG2E

                                for step in T.serial(T.ceildiv(kv_len[0], step_keys)):
                                    # (tz, ty) loads per_thread keys; tx loads VEC features of each.
                                    for j in T.serial(per_thread):
                                        with T.sblock("KV_load"):
                                            T.reads()
                                            T.writes()
                                            key: T.let[T.int32] = step * step_keys + (tz * bdy + ty) * per_thread + j
                                            slot: T.let[T.int32] = (tz * bdy + ty) * per_thread + j
                                            if key < kv_len[0]:
                                                for vec in T.vectorized(VEC):
                                                    K_smem[slot, tx * VEC + vec] = pages[page_values[first_page + key // page_size], 0, by, key % page_size, tx * VEC + vec]
                                                    V_smem[slot, tx * VEC + vec] = pages[page_values[first_page + key // page_size], 1, by, key % page_size, tx * VEC + vec]
                                            else:
                                                for vec in T.vectorized(VEC):
                                                    K_smem[slot, tx * VEC + vec] = T.cast(0, dtype)
                                                    V_smem[slot, tx * VEC + vec] = T.cast(0, dtype)
                                    T.tvm_storage_sync("shared")
                                    # Score this tz slice's keys: dot product reduced across tx.
                                    m_prev[0] = m[0]
                                    for j in T.serial(slice_keys):
                                        partial[0] = T.float32(0)
                                        for vec in T.unroll(VEC):
                                            partial[0] += q_f32[vec] * T.cast(K_smem[tz * slice_keys + j, tx * VEC + vec], "float32")
                                        with T.sblock("dot_allreduce"):
                                            T.reads(partial[0])
                                            T.writes(dot[0])
                                            T.attr(T.comm_reducer(lambda x0, y0: x0 + y0, [T.float32(0)]), "reduce_scope", T.int32(0))
                                            T.tvm_thread_allreduce(T.uint32(1), partial[0], True, dot[0], tx, dtype="void")
                                        S_local[j] = dot[0] + _alibi_bias(spec, slope, k_pos_offset[bx] + step * step_keys + tz * slice_keys + j, q_pos[bx])
                                        if step * step_keys + tz * slice_keys + j < kv_len[0]:
                                            m[0] = T.max(m[0], S_local[j])
                                    d[0] *= T.exp2(m_prev[0] - m[0])
                                    for vec in T.vectorized(VEC):
                                        O_local[vec] *= T.exp2(m_prev[0] - m[0])
                                    for j in T.serial(slice_keys):
                                        S_local[j] = T.if_then_else(step * step_keys + tz * slice_keys + j < kv_len[0], T.exp2(S_local[j] - m[0]), T.float32(0))
                                        d[0] += S_local[j]
                                        for vec in T.vectorized(VEC):
                                            O_local[vec] += S_local[j] * T.cast(V_smem[tz * slice_keys + j, tx * VEC + vec], "float32")
                                    T.tvm_storage_sync("shared")

                                if bdz > 1:
                                    # Merge the bdz slices' (max, sum, accumulator) states.
                                    for vec in T.vectorized(VEC):
                                        O_merge[tz, ty, tx * VEC + vec] = O_local[vec]
                                    md_merge[tz, ty, 0] = m[0]
                                    md_merge[tz, ty, 1] = d[0]
                                    T.tvm_storage_sync("shared")
                                    m[0] = T.float32(_NEG)
                                    d[0] = T.float32(0)
                                    for vec in T.vectorized(VEC):
                                        O_local[vec] = T.float32(0)
                                    for z in T.serial(bdz):
                                        m_prev[0] = m[0]
                                        m[0] = T.max(m[0], md_merge[z, ty, 0])
                                        other_scale[0] = T.exp2(md_merge[z, ty, 0] - m[0])
                                        d[0] = d[0] * T.exp2(m_prev[0] - m[0]) + md_merge[z, ty, 1] * other_scale[0]
                                        for vec in T.vectorized(VEC):
                                            O_local[vec] = O_local[vec] * T.exp2(m_prev[0] - m[0]) + O_merge[z, ty, tx * VEC + vec] * other_scale[0]

                                for vec in T.vectorized(VEC):
                                    output[bx, head, tx * VEC + vec] = T.cast(T.if_then_else(d[0] > 0, O_local[vec] / d[0], T.float32(0)), dtype)
                                lse[bx, head] = T.if_then_else(d[0] > 0, m[0] + T.log2(d[0]), T.float32(_NEG))
    # fmt: on
    return _decode_kernel(spec, "alibi_decode_paged", body, {"tirx.is_scheduled": True})


# ---------------------------------------------------------------------------- shared helpers


def split_fused_qkv(spec: AttentionSpec):
    """Split fused qkv [n, H + 2*KV, hd] into q [n, H, hd], k, v [n, KV, hd] (no rotary).

    Keeps the runtime's ``f_split_rotary`` signature; the position map and the rotary flag
    are ignored because ALiBi rotates nothing.
    """
    H, KV, D, dtype = spec.n_heads, spec.kv_heads, spec.head_dim, spec.dtype

    @T.prim_func(s_tir=True)
    def alibi_split_qkv(
        var_qkv: T.handle, var_position_map: T.handle, var_q: T.handle, var_k: T.handle, var_v: T.handle,
        apply_rope: T.int64,
    ):
        T.func_attr({"op_pattern": 8, "tirx.noalias": True})
        seq_len = T.int32()
        qkv = T.match_buffer(var_qkv, (seq_len, H + 2 * KV, D), dtype)
        q = T.match_buffer(var_q, (seq_len, H, D), dtype)
        k = T.match_buffer(var_k, (seq_len, KV, D), dtype)
        v = T.match_buffer(var_v, (seq_len, KV, D), dtype)
        for i, h, x in T.grid(seq_len, H + 2 * KV, D):
            with T.sblock("split_qkv"):
                vi, vh, vx = T.axis.remap("SSS", [i, h, x])
                if vh < H:
                    q[vi, vh, vx] = qkv[vi, vh, vx]
                elif vh < H + KV:
                    k[vi, vh - H, vx] = qkv[vi, vh, vx]
                else:
                    v[vi, vh - H - KV, vx] = qkv[vi, vh, vx]

    return alibi_split_qkv


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
        kernels = _attention_kernels(spec, target)
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


@dataclasses.dataclass(frozen=True)
class _Kernels:
    """The TIR functions one target needs, in the runtime's roles."""

    prefill_ragged: tirx.PrimFunc
    prefill_paged: tirx.PrimFunc
    decode_paged: tirx.PrimFunc
    merge_state: tirx.PrimFunc
    copy_single_page: tirx.PrimFunc
    compact_kv_copy: tirx.PrimFunc


def _attention_kernels(spec: AttentionSpec, target: Target) -> _Kernels:
    """CPU loop kernels for llvm, tiled GPU kernels for every other target."""
    H, KV, D, dtype, page_size = spec.n_heads, spec.kv_heads, spec.head_dim, spec.dtype, spec.page_size
    if target.kind.name == "llvm":
        return _Kernels(
            prefill_ragged_cpu(spec),
            prefill_paged_cpu(spec),
            decode_paged_cpu(spec),
            _merge_state_inplace_cpu(dtype),
            _copy_single_page_cpu(KV, page_size, D, dtype),
            _compact_kv_copy_cpu(KV, D, dtype, page_size),
        )
    return _Kernels(
        prefill_ragged_gpu(spec, target),
        prefill_paged_gpu(spec, target),
        decode_paged_gpu(spec, target),
        _merge_state_inplace(H, D, dtype, target, "alibi_attention_merge_state"),
        _copy_single_page(KV, page_size, D, dtype, target),
        _compact_kv_copy(KV, D, dtype, target, page_size),
    )


# ---------------------------------------------------------------------------- capacity


class KVCacheCapacityError(ValueError):
    """A KV cache budget or a forward request that does not fit in the cache's pages."""


def bytes_per_page(cfg: MPTConfig, dtype: str, page_size: int) -> int:
    """Bytes one page takes across all layers: 2 (K and V) * L * page_size * KV * hd * itemsize."""
    itemsize = (tvm.runtime.DataType(dtype).bits + 7) // 8
    return 2 * cfg.n_layers * page_size * cfg.kv_n_heads * cfg.head_dim * itemsize


def pages_for_budget(cfg: MPTConfig, dtype: str, page_size: int, budget_bytes: int) -> int:
    """How many pages of ``page_size`` tokens fit in ``budget_bytes`` of KV memory.

    Counts the pages only (the runtime's per-forward scratch, proportional to
    ``prefill_chunk_size``, comes on top). Raises :class:`KVCacheCapacityError` when the budget
    holds fewer than the two pages the runtime needs at minimum.
    """
    per_page = bytes_per_page(cfg, dtype, page_size)
    pages = int(budget_bytes) // per_page
    if pages < 2:
        raise KVCacheCapacityError(
            f"a KV cache budget of {budget_bytes} bytes holds {pages} page(s), but at least 2 are needed: "
            f"one page of {page_size} tokens takes {per_page} bytes ({cfg.n_layers} layers x {cfg.kv_n_heads} kv heads "
            f"x head_dim {cfg.head_dim} x K and V in {dtype}); raise the budget or lower page_size"
        )
    return pages


def max_total_seq_len_for_pages(num_pages: int, page_size: int) -> int:
    """The ``max_total_seq_len`` that makes the runtime allocate exactly ``num_pages`` pages.

    The runtime allocates ``ceil(max_total_seq_len / page_size) + 1`` pages per layer.
    """
    return (num_pages - 1) * page_size


def pages_to_append(current_length: int, append_length: int, page_size: int) -> int:
    """New pages a sequence of ``current_length`` tokens needs to take ``append_length`` more.

    Exact also for forked sequences: their own last block starts on a page boundary.
    """
    return -(-(current_length + append_length) // page_size) - -(-current_length // page_size)


class PagedKVCacheRuntime:
    """Engine-side handle on a cache object returned by the compiled ``create_paged_kv_cache``.

    Wraps the runtime's packed functions; :meth:`begin_forward` checks the page budget first so
    a request that cannot fit fails with :class:`KVCacheCapacityError` before the runtime has
    changed any sequence.
    """

    def __init__(self, cache, page_size: int):
        self.cache = cache
        self.page_size = page_size
        get = tvm.get_global_func
        self._add = get("vm.builtin.kv_state_add_sequence")
        self._remove = get("vm.builtin.kv_state_remove_sequence")
        self._fork = get("vm.builtin.kv_state_fork_sequence")
        self._begin = get("vm.builtin.kv_state_begin_forward")
        self._end = get("vm.builtin.kv_state_end_forward")
        self._available = get("vm.builtin.attention_kv_cache_get_num_available_pages")
        self._length = get("vm.builtin.attention_kv_cache_get_sequence_length")

    def add_sequence(self, seq_id: int) -> None:
        self._add(self.cache, seq_id)

    def remove_sequence(self, seq_id: int) -> None:
        """Drop a sequence and free the pages no other sequence shares."""
        self._remove(self.cache, seq_id)

    def fork_sequence(self, parent_id: int, child_id: int, fork_pos: int = -1) -> None:
        """Start ``child_id`` as a copy of the first ``fork_pos`` tokens of the parent (-1: all)."""
        self._fork(self.cache, parent_id, child_id, fork_pos)

    def available_pages(self) -> int:
        return int(self._available(self.cache))

    def sequence_length(self, seq_id: int) -> int:
        return int(self._length(self.cache, seq_id))

    def begin_forward(self, seq_ids: list[int], append_lengths: list[int]) -> None:
        """Declare the next forward: ``append_lengths[i]`` new tokens for ``seq_ids[i]``.

        The entry point that follows takes their tokens concatenated in this order.
        """
        needed = [pages_to_append(self.sequence_length(s), n, self.page_size) for s, n in zip(seq_ids, append_lengths)]
        available = self.available_pages()
        if sum(needed) > available:
            detail = ", ".join(f"sequence {s}: +{p}" for s, p in zip(seq_ids, needed) if p)
            raise KVCacheCapacityError(
                f"this forward needs {sum(needed)} new KV pages ({detail}) but only {available} are free; "
                "finish or remove sequences, shorten the request, or build the cache with a larger "
                "max_total_seq_len (see pages_for_budget)"
            )
        self._begin(self.cache, tvm.runtime.ShapeTuple(seq_ids), tvm.runtime.ShapeTuple(append_lengths), None)

    def end_forward(self) -> None:
        self._end(self.cache)
