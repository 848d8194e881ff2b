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

from tvm import tirx
from tvm.relax.frontend.nn.llm.kv_cache import (
    _compact_kv_copy,
    _compact_kv_copy_cpu,
    _copy_single_page,
    _copy_single_page_cpu,
    _merge_state_inplace,
    _merge_state_inplace_cpu,
)
from tvm.target import Target
from .common import AttentionSpec
from .cpu import decode_paged_cpu, prefill_paged_cpu, prefill_ragged_cpu
from .gpu import decode_paged_gpu, prefill_paged_gpu, prefill_ragged_gpu


@dataclasses.dataclass(frozen=True)
class AttentionKernels:
    """The TIR functions one target needs, in the runtime's roles."""

    prefill_ragged: tirx.PrimFunc
    prefill_paged: tirx.PrimFunc
    decode_paged: tirx.PrimFunc
    merge_state: tirx.PrimFunc
    copy_single_page: tirx.PrimFunc
    compact_kv_copy: tirx.PrimFunc


def attention_kernels(spec: AttentionSpec, target: Target) -> AttentionKernels:
    """CPU loop kernels for llvm, tiled GPU kernels for every other target."""
    H, KV, D, dtype, page_size = spec.n_heads, spec.kv_heads, spec.head_dim, spec.dtype, spec.page_size
    if target.kind.name == "llvm":
        return AttentionKernels(
            prefill_ragged_cpu(spec),
            prefill_paged_cpu(spec),
            decode_paged_cpu(spec),
            _merge_state_inplace_cpu(dtype),
            _copy_single_page_cpu(KV, page_size, D, dtype),
            _compact_kv_copy_cpu(KV, D, dtype, page_size),
        )
    return AttentionKernels(
        prefill_ragged_gpu(spec, target),
        prefill_paged_gpu(spec, target),
        decode_paged_gpu(spec, target),
        _merge_state_inplace(H, D, dtype, target, "alibi_attention_merge_state"),
        _copy_single_page(KV, page_size, D, dtype, target),
        _compact_kv_copy(KV, D, dtype, target, page_size),
    )


