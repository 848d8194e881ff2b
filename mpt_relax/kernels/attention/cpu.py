"""ALiBi attention kernels for the CPU (llvm): query-row blocks over page-sized key tiles."""

from __future__ import annotations

import tvm
from tvm.script import tirx as T
from mpt_relax.kernels.lanes import halving_sum, prefetch_line, transposed_sums
from .common import (
    alibi_bias,
    AttentionSpec,
    decode_kernel,
    fast_exp2,
    LOG2E,
    NEG,
    paged_kv_len,
    paged_prefill_kernel,
    ragged_prefill_kernel,
    slope_log2,
    visible_keys,
)


# ---------------------------------------------------------------------------- CPU (llvm) kernels
# A block of up to _CPU_ROWS query rows of one head walks the keys in tiles of one page, the rows
# being the vector lanes. The block's queries are transposed once (q_t [hd, R]); each K/V tile is
# converted to fp32 as stored ([page_size, hd], once per block) and scored transposed:
# per key a vector over the rows, summed from one broadcast key element times a q_t row per head
# dim step, the tile's sums in registers. The block's softmax state (running max and sum) is a
# vector over the rows too, so the tile's max, exponentials and sums are elementwise vector
# operations over its keys; the values are then weighed row by row. Query heads run in parallel.
#
# In every cache dtype but float32 the blocks walk the keys twice (two "sweeps"): the first finds
# each row's max and sum, the second weighs the values by the normalised probabilities rounded to
# the cache dtype, as MPT's reference attention (and HF's) does before its ``probs @ v``; the
# half-precision model's greedy tokens follow that rounding. The first sweep keeps the block's
# scores of every key (16 x 4 bytes per key), so the second reads only the values. In float32
# the rounding is the identity and one online sweep does it all.

_CPU_ROWS = 16  # query rows per block: the lanes of the scores and of the softmax state
_M, _D, _M_NEW, _RESCALE = range(4)  # rows of the block's softmax state [4, R]


def _cpu_sweeps(spec: AttentionSpec) -> int:
    """Walks over the keys: 1 (online softmax) for float32, 2 (rounded probabilities) otherwise."""
    return 1 if spec.dtype == "float32" else 2


def _cpu_macros(spec: AttentionSpec):
    """Macros shared by the CPU prefill kernels; the caller allocates the scratch buffers.

    For a block of ``n_rows`` query rows ``row0 ..`` of query head ``head`` (lane r: row
    ``row0 + r``; lanes past n_rows repeat the last row's position and see no keys):
    q_t [hd, R]: query * sm_scale * log2(e), transposed; acc [R, hd]: unnormalised output;
    state [4, R]: running max, running sum, the tile's new max, the rescale factor;
    visible [R]: keys each row sees; pos [R]: each row's position; k_tile, v_tile
    [page_size, hd]: the current key / value tile in fp32; probs [page_size, R]: the tile's
    probabilities; tile_scores [page_size, R] (registers): its scores; kept [keys * R]: a
    two-sweep dtype's scores of every key, from the first sweep for the second; row_acc [hd]
    (registers): one row's acc. ``sweep``: 0 for the online pass, 1 for the value pass of a
    two-sweep dtype (see :func:`_cpu_sweeps`); the keys are read in the first sweep only, the
    values in the last.
    """
    D, dtype, TILE, R = spec.head_dim, spec.dtype, spec.page_size, _CPU_ROWS
    rounded = _cpu_sweeps(spec) == 2
    fR = f"float32x{R}"

    def lanes():
        return T.ramp(0, 1, R)

    @T.macro
    def start_rows(q, q_pos, row0, n_rows, head, sm_scale, causal, kv_len, key_pos0, q_t, acc, state, visible, pos,
                   max_visible):
        max_visible[0] = 0
        for r in T.serial(R):
            pos[r] = q_pos[row0 + T.min(r, n_rows - 1)]
            visible[r] = T.if_then_else(r < n_rows, visible_keys(causal, kv_len, key_pos0, pos[r]), 0)
            max_visible[0] = T.max(max_visible[0], visible[r])
            for x in T.serial(D):  # rows past n_rows are zeros: the block's score GEMM computes them too
                q_t[x, r] = T.if_then_else(r < n_rows, T.cast(q[row0 + T.min(r, n_rows - 1), head, x], "float32")
                                           * sm_scale * LOG2E, T.float32(0))
            for x in T.vectorized(D):
                acc[r, x] = T.float32(0)
        state[_M, lanes()] = T.Broadcast(T.float32(NEG), R)
        state[_D, lanes()] = T.Broadcast(T.float32(0), R)

    @T.macro
    def add_values(acc, r, probs, v_tile, n_keys, row_acc):
        """acc[r] += sum over the tile's first n_keys keys t of probs[t, r] * v_tile[t]."""
        for x in T.vectorized(D):
            row_acc[x] = acc[r, x]
        for t in T.serial(n_keys):
            for x in T.vectorized(D):
                row_acc[x] += probs[t, r] * v_tile[t, x]
        for x in T.vectorized(D):
            acc[r, x] = row_acc[x]

    @T.macro
    def fold_tile(n_rows, slope, tile, key_pos0, k_tile, v_tile, probs, tile_scores, kept, q_t, acc, state, visible,
                  pos, row_acc, sweep):
        if sweep == 0:  # keys t < visible - tile * TILE count for each row
            # the tile's scores, transposed: one vector over the rows per key, the sums in registers
            for t in T.unroll(TILE):
                tile_scores[t, lanes()] = alibi_bias(spec, slope, key_pos0 + tile * TILE + t, pos[lanes()])
            for x in T.serial(D):
                for t in T.unroll(TILE):
                    tile_scores[t, lanes()] += T.Broadcast(k_tile[t, x], R) * q_t[x, lanes()]
            if rounded:  # for the second sweep
                for t in T.unroll(TILE):
                    kept[T.ramp((tile * TILE + t) * R, 1, R)] = tile_scores[t, lanes()]
            state[_M_NEW, lanes()] = state[_M, lanes()]
            for t in T.unroll(TILE):
                state[_M_NEW, lanes()] = T.max(state[_M_NEW, lanes()], T.Select(
                    T.Broadcast(tile * TILE + t, R) < visible[lanes()], tile_scores[t, lanes()],
                    T.Broadcast(T.float32(NEG), R)))
            state[_RESCALE, lanes()] = fast_exp2(state[_M, lanes()] - state[_M_NEW, lanes()])
            state[_D, lanes()] = state[_D, lanes()] * state[_RESCALE, lanes()]
            for t in T.unroll(TILE):
                probs[t, lanes()] = T.Select(T.Broadcast(tile * TILE + t, R) < visible[lanes()],
                                             fast_exp2(tile_scores[t, lanes()] - state[_M_NEW, lanes()]),
                                             T.Broadcast(T.float32(0), R))
                state[_D, lanes()] = state[_D, lanes()] + probs[t, lanes()]
            state[_M, lanes()] = state[_M_NEW, lanes()]
            if not rounded:
                for r in T.serial(n_rows):
                    if visible[r] > tile * TILE:
                        for x in T.vectorized(D):
                            acc[r, x] *= state[_RESCALE, r]
                        add_values(acc, r, probs, v_tile, T.min(TILE, visible[r] - tile * TILE), row_acc)
        else:
            for t in T.unroll(TILE):
                probs[t, lanes()] = T.Cast(fR, T.Cast(f"{dtype}x{R}", fast_exp2(
                    kept[T.ramp((tile * TILE + t) * R, 1, R)] - state[_M, lanes()]) / state[_D, lanes()]))
            for r in T.serial(n_rows):
                if visible[r] > tile * TILE:
                    add_values(acc, r, probs, v_tile, T.min(TILE, visible[r] - tile * TILE), row_acc)

    @T.macro
    def finish_rows(output, lse, row0, n_rows, head, acc, state):
        for r in T.serial(n_rows):
            for x in T.serial(D):
                if rounded:  # acc already holds the normalised sum (0 for a row without keys)
                    output[row0 + r, head, x] = T.cast(acc[r, x], dtype)
                else:
                    output[row0 + r, head, x] = T.cast(T.if_then_else(state[_D, r] > 0, acc[r, x] / state[_D, r], T.float32(0)), dtype)
            lse[row0 + r, head] = T.if_then_else(state[_D, r] > 0, state[_M, r] + T.log2(state[_D, r]), T.float32(NEG))

    return start_rows, fold_tile, finish_rows


def _cpu_scratch(spec: AttentionSpec, max_keys):
    """Allocate the scratch buffers of :func:`_cpu_macros` inside the current block (``max_keys``:
    a bound on one sequence's keys, in whole tiles)."""
    R, D, TILE = _CPU_ROWS, spec.head_dim, spec.page_size
    return (
        T.sblock_alloc_buffer((D, R), "float32"),  # q_t
        T.sblock_alloc_buffer((R, D), "float32"),  # acc
        T.sblock_alloc_buffer((4, R), "float32"),  # state
        T.sblock_alloc_buffer((R,), "int32"),  # visible
        T.sblock_alloc_buffer((R,), "int32"),  # pos
        T.sblock_alloc_buffer((1,), "int32"),  # max_visible
        T.sblock_alloc_buffer((TILE, D), "float32"),  # k_tile
        T.sblock_alloc_buffer((TILE, D), "float32"),  # v_tile
        T.sblock_alloc_buffer((TILE, R), "float32"),  # probs
        T.sblock_alloc_buffer((TILE, R), "float32", scope="local"),  # tile_scores
        T.sblock_alloc_buffer(((max_keys if _cpu_sweeps(spec) == 2 else 1) * R,), "float32"),  # kept
        T.sblock_alloc_buffer((D,), "float32", scope="local"),  # row_acc
    )


def _cpu_attend(spec: AttentionSpec, load_tile):
    """The walk every CPU kernel shares: ``attend`` takes ``n_rows`` query rows from ``row0`` of
    head ``h`` over ``kv_len`` keys from position ``key_pos0``, tile by tile through ``load_tile``;
    ``attend_blocks`` does that for the query rows of sequence ``b`` in blocks of ``_CPU_ROWS``.

    ``load_tile(kv_a, kv_b, base, tile, n_keys, sweep, kv_head, k_tile, v_tile)`` copies
    ``n_keys`` keys (in the first sweep) and values (in the last) of tile ``tile`` into the fp32 tiles; what
    ``kv_a`` / ``kv_b`` / ``base`` are is the loader's own business (k, v and the sequence's
    first row; or the pages, the page table and the sequence's first entry in it).
    """
    TILE, group, R = spec.page_size, spec.group, _CPU_ROWS
    start_rows, fold_tile, finish_rows = _cpu_macros(spec)
    SWEEPS = _cpu_sweeps(spec)

    # fmt: off
    @T.macro
    def attend(q, q_pos, output, lse, row0, n_rows, h, sm_scale, causal, kv_len, key_pos0, slope, kv_a, kv_b, base, scratch):
        q_t, acc, state, visible, pos, max_visible, k_tile, v_tile, probs, tile_scores, kept, row_acc = scratch
        start_rows(q, q_pos, row0, n_rows, h, sm_scale, causal, kv_len, key_pos0, q_t, acc, state, visible, pos, max_visible)
        # a first access outside the tile loop: a buffer is allocated where all its accesses meet,
        # and kept must live from the first sweep to the second
        kept[T.ramp(0, 1, R)] = T.Broadcast(T.float32(NEG), R)
        for sweep, tile in T.grid(SWEEPS, T.ceildiv(max_visible[0], TILE)):
            load_tile(kv_a, kv_b, base, tile, T.min(TILE, max_visible[0] - tile * TILE), sweep, h // group, k_tile, v_tile)
            fold_tile(n_rows, slope, tile, key_pos0, k_tile, v_tile, probs, tile_scores, kept, q_t, acc, state, visible,
                      pos, row_acc, sweep)
        finish_rows(output, lse, row0, n_rows, h, acc, state)

    @T.macro
    def attend_blocks(q, q_indptr, q_pos, output, lse, b, h, sm_scale, causal, kv_len, key_pos0, slope, kv_a, kv_b, base,
                      scratch):
        for block in T.serial(T.ceildiv(q_indptr[b + 1] - q_indptr[b], R)):
            row0: T.let[T.int32] = q_indptr[b] + block * R
            n_rows: T.let[T.int32] = T.min(R, q_indptr[b + 1] - row0)
            attend(q, q_pos, output, lse, row0, n_rows, h, sm_scale, causal, kv_len, key_pos0, slope, kv_a, kv_b, base,
                   scratch)
    # fmt: on
    return attend, attend_blocks


def _tile_loader(spec: AttentionSpec, element):
    """``load_tile`` of :func:`_cpu_attend` over ``element(kv_a, kv_b, base, tile, t, which, kv_head, x)``:
    element ``x`` of key (``which`` 0) or value (1) ``t`` of tile ``tile``."""
    D, last = spec.head_dim, _cpu_sweeps(spec) - 1

    @T.macro
    def load(kv_a, kv_b, base, tile, n_keys, sweep, kv_head, k_tile, v_tile):
        for t in T.serial(n_keys):
            if sweep == 0:
                for x in T.vectorized(D):
                    k_tile[t, x] = T.cast(element(kv_a, kv_b, base, tile, t, 0, kv_head, x), "float32")
            if sweep == last:
                for x in T.vectorized(D):
                    v_tile[t, x] = T.cast(element(kv_a, kv_b, base, tile, t, 1, kv_head, x), "float32")

    return load


def _ragged_tile_loader(spec: AttentionSpec):
    """Keys and values of a tile from the ragged k/v of this forward (``base``: the sequence's first row)."""
    return _tile_loader(spec, lambda k, v, base, tile, t, which, kv_head, x:
                        (k, v)[which][base + tile * spec.page_size + t, kv_head, x])


def _paged_tile_loader(spec: AttentionSpec):
    """Keys and values of a tile from the cache pages (``base``: the sequence's first page-table entry)."""
    return _tile_loader(spec, lambda pages, page_values, base, tile, t, which, kv_head, x:
                        pages[page_values[base + tile], which, kv_head, t, x])


_CPU_ATTRS = {"tirx.is_scheduled": True, "tirx.noalias": True}


def prefill_ragged_cpu(spec: AttentionSpec):
    """Causal attention of a ragged batch over its own new k/v (no cache), for llvm.

    q [n, H, hd], q_indptr = kv_indptr [b + 1], k/v [n, KV, hd], q_pos [n], k_pos_offset [b]
    -> output [n, H, hd], lse [n, H].
    """
    H, TILE = spec.n_heads, spec.page_size
    _, attend_blocks = _cpu_attend(spec, _ragged_tile_loader(spec))

    # fmt: off
    @T.macro
    def body(q, q_indptr, k, v, kv_indptr, q_pos, k_pos_offset, output, lse, causal, sm_scale, batch_size):
        for h in T.parallel(H):
            with T.sblock("attn"):
                scratch = _cpu_scratch(spec, T.ceildiv(k.shape[0], TILE) * TILE)
                slope: T.let[T.float32] = slope_log2(spec, h)
                for b in T.serial(batch_size):
                    attend_blocks(q, q_indptr, q_pos, output, lse, b, h, sm_scale, causal, kv_indptr[b + 1] - kv_indptr[b],
                                  k_pos_offset[b], slope, k, v, kv_indptr[b],
                                  scratch)
    # fmt: on
    return ragged_prefill_kernel(spec, "alibi_prefill_ragged_cpu", body, _CPU_ATTRS)


def prefill_paged_cpu(spec: AttentionSpec):
    """Attention of a ragged batch of queries over the keys in the cache pages, for llvm.

    q [n, H, hd], q_indptr [b + 1], pages [P, 2, KV, page_size, hd], page_indptr [b + 1],
    page_values [nnz_pages], last_page_len [b], k_pos_offset [b], q_pos [n]
    -> output [n, H, hd], lse [n, H]. The runtime calls it with causal = 0.
    """
    H, TILE = spec.n_heads, spec.page_size
    _, attend_blocks = _cpu_attend(spec, _paged_tile_loader(spec))

    # fmt: off
    @T.macro
    def body(q, q_indptr, pages, page_indptr, page_values, last_page_len, k_pos_offset, q_pos, output, lse, causal, sm_scale, batch_size):
        for h in T.parallel(H):
            with T.sblock("attn"):
                scratch = _cpu_scratch(spec, page_values.shape[0] * TILE)
                slope: T.let[T.float32] = slope_log2(spec, h)
                for b in T.serial(batch_size):
                    attend_blocks(q, q_indptr, q_pos, output, lse, b, h, sm_scale, causal,
                                  paged_kv_len(page_indptr, last_page_len, b, TILE), k_pos_offset[b], slope,
                                  pages, page_values, page_indptr[b],
                                  scratch)
    # fmt: on
    return paged_prefill_kernel(spec, "alibi_prefill_paged_cpu", body, _CPU_ATTRS)


def _row_dot(q_vec, k_vec, width: int):
    """sum(q_vec * k_vec) of two fp32 [width] vectors: halving vector adds, then the odd rest serially."""
    v, width = halving_sum(q_vec * k_vec, width)
    if width == 1:
        return v
    total = T.Shuffle([v], [0])
    for lane in range(1, width):
        total = total + T.Shuffle([v], [lane])
    return total


def decode_paged_cpu(spec: AttentionSpec):
    """One query per sequence over every key in its pages (its own new key included), for llvm.

    q [b, H, hd], pages [P, 2, KV, page_size, hd], page_indptr [b + 1], page_values [nnz_pages],
    last_page_len [b], k_pos_offset [b], q_pos [b] -> output [b, H, hd], lse [b, H].

    A single query row needs no key tile: keys and value rows are read straight from their
    pages. With a head dim that is a multiple of 16 the keys are scored 16 at a time
    (:func:`_scores_of_16_keys`), and the softmax's max, exponentials and sums run on those 16
    lanes; otherwise one key at a time. The softmax is the same either way: online in float32,
    two sweeps with rounded probabilities otherwise; the second reads the first's scores back
    from a per-head buffer instead of the keys, so every key and value row is read once.
    """
    H, D, TILE, group, dtype = spec.n_heads, spec.head_dim, spec.page_size, spec.group, spec.dtype
    rounded = _cpu_sweeps(spec) == 2
    fold_keys = _fold_16_keys(spec) if D % _KEYS == 0 else _fold_one_key_at_a_time(spec)
    prefetch = _page_prefetch(spec)

    # fmt: off
    @T.macro
    def body(q, pages, page_indptr, page_values, last_page_len, k_pos_offset, q_pos, output, lse, sm_scale, B):
        for h in T.parallel(H):
            with T.sblock("attn"):
                T.reads()  # none declared: inferring regions trips over the per-tile lets, and nothing schedules this block
                T.writes()
                q_f32 = T.sblock_alloc_buffer((D,), "float32")
                acc = T.sblock_alloc_buffer((D,), "float32")
                scores = T.sblock_alloc_buffer((T.max(TILE, _KEYS),), "float32")
                state = T.sblock_alloc_buffer((4,), "float32")
                # the first sweep's scores, read again by the second: room for the longest sequence
                kept = T.sblock_alloc_buffer((page_values.shape[0] * TILE + _KEYS,), "float32")
                slope: T.let[T.float32] = slope_log2(spec, h)
                for b in T.serial(B):
                    kv_len: T.let[T.int32] = paged_kv_len(page_indptr, last_page_len, b, TILE)
                    for x in T.vectorized(D):
                        q_f32[x] = T.cast(q[b, h, x], "float32") * sm_scale * LOG2E
                        acc[x] = T.float32(0)
                    state[_M] = T.float32(NEG)
                    state[_D] = T.float32(0)
                    # touched out here, so that TVM's allocation planner keeps the buffer alive across
                    # the sweeps (it would move it into the innermost loop its accesses share)
                    kept[0] = T.float32(NEG)
                    for sweep, tile in T.grid(_cpu_sweeps(spec), T.ceildiv(kv_len, TILE)):
                        for part in T.serial(2):  # what this sweep reads of the page _PAGES_AHEAD on
                            if not rounded or part == sweep:
                                prefetch(pages, page_values[page_indptr[b] + T.min(tile + _PAGES_AHEAD, T.ceildiv(kv_len, TILE) - 1)],
                                         part, h // group)
                        fold_keys(pages, page_values[page_indptr[b] + tile], h // group, tile * TILE,
                                  T.min(TILE, kv_len - tile * TILE), k_pos_offset[b], q_pos[b], slope, sweep,
                                  q_f32, acc, scores, state, kept)
                    for x in T.serial(D):
                        if rounded:  # acc holds the normalised sum
                            output[b, h, x] = T.cast(acc[x], dtype)
                        else:
                            output[b, h, x] = T.cast(T.if_then_else(state[_D] > 0, acc[x] / state[_D], T.float32(0)), dtype)
                    lse[b, h] = T.if_then_else(state[_D] > 0, state[_M] + T.log2(state[_D]), T.float32(NEG))
    # fmt: on
    return decode_kernel(spec, "alibi_decode_paged_cpu", body, _CPU_ATTRS)


_KEYS = 16  # keys scored per vector by the decode kernel
# pages ahead the decode kernel asks for a head's keys / values: a head's rows of a page are 2 KiB
# runs a page apart, too short for the hardware prefetchers (one Zen 4 core, a 1536-token fp16
# cache: 11 GB/s without, 17 with prefetches into L2, 10.5-12 into L1)
_PAGES_AHEAD = 4


def _page_prefetch(spec: AttentionSpec):
    """``prefetch(pages, page, part, kv_head)``: one kv head's keys (``part`` 0) or values (1) in ``page``, into L2."""
    D = spec.head_dim
    per_line = 512 // tvm.DataType(spec.dtype).bits  # cache elements per 64-byte line

    @T.macro
    def prefetch(pages, page, part, kv_head):
        for line in T.serial(-(-spec.page_size * D // per_line)):
            T.evaluate(prefetch_line(T.address_of(pages[page, part, kv_head, line * per_line // D, line * per_line % D]), locality=2))

    return prefetch


def _scores_of_16_keys(spec: AttentionSpec, pages, page, kv_head, key0, n_keys, q_f32):
    """fp32 [16] scores q . k of keys ``key0 ..`` of ``page`` (lanes from ``n_keys`` on: NEG):
    one [16] vector of partial products per key, then :func:`transposed_sums`. Keys past the
    page's end (a page size that is no multiple of 16) are not read."""
    D, TILE = spec.head_dim, spec.page_size
    partials = []
    for t in range(_KEYS):
        total = None
        for chunk in range(D // _KEYS):
            x = T.ramp(chunk * _KEYS, 1, _KEYS)
            term = q_f32[x] * T.Cast(f"float32x{_KEYS}", pages[page, 0, kv_head, key0 + t, x])
            total = term if total is None else total + term
        if TILE % _KEYS:
            total = T.if_then_else(key0 + t < TILE, total, T.Broadcast(T.float32(0), _KEYS))
        partials.append(total)
    lane = T.ramp(0, 1, _KEYS)
    return T.Select(lane < T.Broadcast(n_keys - key0, _KEYS), transposed_sums(partials, _KEYS),
                    T.Broadcast(T.float32(NEG), _KEYS))


def _fold_16_keys(spec: AttentionSpec):
    """``fold(pages, page, kv_head, pos0, n_keys, key_pos_offset, query_pos, slope, sweep, q_f32,
    acc, scores, state, kept)``: fold the ``n_keys`` keys of one page (positions ``pos0 ..`` of
    the sequence) into the softmax state and ``acc``, 16 keys per step; ``kept`` holds the first
    sweep's scores by position for the second."""
    D, dtype = spec.head_dim, spec.dtype
    rounded = _cpu_sweeps(spec) == 2

    def hmax(v):
        return halving_sum(v, _KEYS, combine=T.max)[0]

    def hsum(v):
        return halving_sum(v, _KEYS)[0]

    def weighed(pages, page, kv_head, key0, scores, chunk):
        """fp32 [16]: lanes ``16 chunk ..`` of the 16 keys' values weighed by their probabilities,
        summed as a tree (one update of acc per 16 keys, not one per key)."""
        terms = [T.Broadcast(scores[t], _KEYS) * T.Cast(f"float32x{_KEYS}", pages[page, 1, kv_head, key0 + t, T.ramp(chunk * _KEYS, 1, _KEYS)])
                 for t in range(_KEYS)]
        return halving_sum(T.Shuffle(terms, list(range(_KEYS * _KEYS))), _KEYS * _KEYS, until=_KEYS)[0]

    @T.macro
    def add_values(pages, page, kv_head, key0, n_keys, scores, acc):
        if n_keys - key0 >= _KEYS:
            for chunk in T.unroll(D // _KEYS):
                acc[T.ramp(chunk * _KEYS, 1, _KEYS)] = acc[T.ramp(chunk * _KEYS, 1, _KEYS)] + weighed(
                    pages, page, kv_head, key0, scores, chunk)
        else:
            for t in T.serial(n_keys - key0):
                for x in T.vectorized(D):
                    acc[x] += scores[t] * T.cast(pages[page, 1, kv_head, key0 + t, x], "float32")

    # fmt: off
    @T.macro
    def fold(pages, page, kv_head, pos0, n_keys, key_pos_offset, query_pos, slope, sweep, q_f32, acc, scores, state, kept):
        for step in T.serial(T.ceildiv(n_keys, _KEYS)):
            key0: T.let[T.int32] = step * _KEYS
            if sweep == 0:
                scores[T.ramp(0, 1, _KEYS)] = _scores_of_16_keys(spec, pages, page, kv_head, key0, n_keys, q_f32) + \
                    alibi_bias(spec, slope, T.Broadcast(key_pos_offset + pos0 + key0, _KEYS) + T.ramp(0, 1, _KEYS), query_pos)
                if rounded:
                    kept[T.ramp(pos0 + key0, 1, _KEYS)] = scores[T.ramp(0, 1, _KEYS)]
                state[_M_NEW] = T.max(state[_M], hmax(scores[T.ramp(0, 1, _KEYS)]))
                state[_RESCALE] = fast_exp2(state[_M] - state[_M_NEW])
                scores[T.ramp(0, 1, _KEYS)] = fast_exp2(scores[T.ramp(0, 1, _KEYS)] - T.Broadcast(state[_M_NEW], _KEYS))
                state[_D] = state[_D] * state[_RESCALE] + hsum(scores[T.ramp(0, 1, _KEYS)])
                if not rounded:
                    for x in T.vectorized(D):
                        acc[x] *= state[_RESCALE]
                    add_values(pages, page, kv_head, key0, n_keys, scores, acc)
                state[_M] = state[_M_NEW]
            else:
                scores[T.ramp(0, 1, _KEYS)] = T.Cast(f"float32x{_KEYS}", T.Cast(f"{dtype}x{_KEYS}", fast_exp2(
                    kept[T.ramp(pos0 + key0, 1, _KEYS)] - T.Broadcast(state[_M], _KEYS)) / T.Broadcast(state[_D], _KEYS)))
                add_values(pages, page, kv_head, key0, n_keys, scores, acc)
    # fmt: on
    return fold


def _fold_one_key_at_a_time(spec: AttentionSpec):
    """:func:`_fold_16_keys` for any head dim: each key's score is one vector dot product."""
    D, dtype = spec.head_dim, spec.dtype
    rounded = _cpu_sweeps(spec) == 2
    fD = f"float32x{D}"

    # fmt: off
    @T.macro
    def fold(pages, page, kv_head, pos0, n_keys, key_pos_offset, query_pos, slope, sweep, q_f32, acc, scores, state, kept):
        if sweep == 0:
            for t in T.serial(n_keys):
                scores[t] = alibi_bias(spec, slope, key_pos_offset + pos0 + t, query_pos) + _row_dot(
                    q_f32[T.ramp(0, 1, D)], T.Cast(fD, pages[page, 0, kv_head, t, T.ramp(0, 1, D)]), D)
                if rounded:
                    kept[pos0 + t] = scores[t]
            state[_M_NEW] = state[_M]
            for t in T.serial(n_keys):
                state[_M_NEW] = T.max(state[_M_NEW], scores[t])
            state[_RESCALE] = fast_exp2(state[_M] - state[_M_NEW])
            state[_D] *= state[_RESCALE]
            for t in T.serial(n_keys):
                scores[t] = fast_exp2(scores[t] - state[_M_NEW])
                state[_D] += scores[t]
            if not rounded:
                for x in T.vectorized(D):
                    acc[x] *= state[_RESCALE]
                for t in T.serial(n_keys):
                    for x in T.vectorized(D):
                        acc[x] += scores[t] * T.cast(pages[page, 1, kv_head, t, x], "float32")
            state[_M] = state[_M_NEW]
        else:
            for t in T.serial(n_keys):
                scores[t] = T.cast(T.cast(fast_exp2(kept[pos0 + t] - state[_M]) / state[_D], dtype), "float32")
                for x in T.vectorized(D):
                    acc[x] += scores[t] * T.cast(pages[page, 1, kv_head, t, x], "float32")
    # fmt: on
    return fold
