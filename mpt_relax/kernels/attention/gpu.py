"""ALiBi attention kernels for GPUs (CUDA, Metal, Vulkan, ...): tiled like TVM's paged kernels."""

from __future__ import annotations


import tvm
from tvm import tirx
from tvm.relax.frontend.nn.llm._kernel_common import (
    _get_prefill_kernel_config,
    _schedule_prefill_kernel,
    check_thread_limits,
    get_max_num_threads_per_block,
)
from tvm.script import tirx as T
from tvm.target import Target
from .common import (
    alibi_bias,
    AttentionSpec,
    decode_kernel,
    LOG2E,
    NEG,
    paged_kv_len,
    paged_prefill_kernel,
    ragged_prefill_kernel,
    slope_log2,
    visible_keys,
)


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
                m_smem[row] = T.float32(NEG)
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
        slope = slope_log2(spec, head_of(by, LH_start, row))
        key_pos = key_pos0 + L_kv_start + j
        return S_smem[row, j] + alibi_bias(spec, slope, key_pos, query_pos_of(q_pos, q_begin, q_len, LH_start, row))

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
                        d_smem[i] > 0, m_smem[i] + T.log2(d_smem[i]), T.float32(NEG)
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
        return T.ceildiv(visible_keys(causal, kv_len, key_pos0, last), tile_z)

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
        return paged_kv_len(kv[2], kv[3], b, spec.page_size) if paged else kv[2][b + 1] - kv[2][b]

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
    kernel = paged_prefill_kernel(spec, "alibi_prefill_paged", body, {})
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
    kernel = ragged_prefill_kernel(spec, "alibi_prefill_ragged", body, {})
    return _scheduled_prefill(kernel, LOAD_VEC, bdx, num_warps, tile_x, spec, tile_z, ragged=True)


def _gpu_decode_config(spec: AttentionSpec, target: Target):
    """Thread shape of the decode kernel.

    bdx threads split head_dim (vec elements each) and reduce the dot product among themselves;
    bdy query heads of one kv group share each loaded key; bdz thread groups take different
    keys and merge their softmax states at the end; gdz blocks cover groups larger than bdy.
    """
    itemsize = tvm.runtime.DataType(spec.dtype).bits // 8
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
                                slope: T.let[T.float32] = slope_log2(spec, head)
                                kv_len[0] = paged_kv_len(page_indptr, last_page_len, bx, page_size)
                                m[0] = T.float32(NEG)
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
                                        S_local[j] = dot[0] + alibi_bias(spec, slope, k_pos_offset[bx] + step * step_keys + tz * slice_keys + j, q_pos[bx])
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
                                    m[0] = T.float32(NEG)
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
                                lse[bx, head] = T.if_then_else(d[0] > 0, m[0] + T.log2(d[0]), T.float32(NEG))
    # fmt: on
    return decode_kernel(spec, "alibi_decode_paged", body, {"tirx.is_scheduled": True})


