"""The GEMV rule: decode projections, LM head, attention scores/values."""

from __future__ import annotations


from tvm import s_tir
from .base import attempt, largest_divisor, loop_extent, PARALLEL_MIN_WORK, Rule, vector_lanes
from .einsum import (
    analyze_einsum,
    Einsum,
    find_epilogues,
    lane_and_reduction_loops,
    loops_by_var,
    main_reduction_block,
    producers_before,
    word_pack,
)



# ----------------------------------------------------------------------------- GEMV
class GEMV(Rule):
    """Sum-of-products blocks without a usable register-blocked layout: decode GEMV, attention.

    Inner reduction: ``out[row] = sum_k A[row, k] * B[row, k]`` with rows in parallel and k
    vectorised over ``acc`` independent accumulators (rfactor), summed once per row; blocks of
    ``row_block`` weight rows when B is dequantized, int8 words vectorised whole.
    Outer reduction: ``out[row, c] = sum_k A[row, k] * B[k, c]`` with c vectorised.
    """

    def __init__(
        self, accumulators: int = 4, col_tile_vectors: int = 4, weight_rows_outer: bool = False, row_block: int = 2
    ):
        self.accumulators = accumulators
        self.row_block = row_block  # weight rows sharing each load of x (a static J only)
        self.col_tile_vectors = col_tile_vectors
        # loop over the rows of B outside the rows of A, so each row of a weight is read from
        # memory once for all rows of A (the few-row matmuls of Matmul's small-I branch)
        self.weight_rows_outer = weight_rows_outer

    def _apply(self, func, target):
        sch = s_tir.Schedule(func)
        main = main_reduction_block(sch)
        if main is None:
            return None
        ein = analyze_einsum(sch, main)
        if ein is None:
            return None
        # Producers (a dequantize, a cast) go into the loads; consumers stay as per-row epilogues.
        for blk in producers_before(sch, main):
            attempt(sch.compute_inline, blk)
        inline_epilogue_chain(sch, main)
        if producers_before(sch, main):
            return None
        epilogues = find_epilogues(sch, main)
        if epilogues is None:
            return None
        main = sch.get_sblock(sch.get(main).name_hint)
        ein = ein.rebind(sch, main)
        if ein.b_inner == "k":
            return self._inner(sch, main, ein, epilogues)
        if ein.b_inner == "j":
            return self._outer(sch, main, ein, epilogues)
        return None

    def _inner(self, sch, main, ein: Einsum, epilogues):
        stmt = sch.get(main)
        by_var = loops_by_var(sch, main)
        if self.weight_rows_outer:
            rows = [by_var[v] for v in ein.j + ein.s + ein.i]
        else:
            row_vars = ein.s + ein.i + ein.j
            rows = [by_var[iv.var] for iv in stmt.iter_vars if any(iv.var.same_as(v) for v in row_vars)]
        ks = [by_var[v] for v in ein.k]
        acc_dtype = stmt.writes[0].source.dtype
        a_buf = stmt.reads[ein.a].source
        pack = word_pack(stmt, ein.k[0]) if len(ein.k) == 1 else 1
        # x can be permuted to the order of packed codes: its last index is k, its extents of one dtype
        a_k_inner = list(stmt.reads[ein.a].region)[-1].min.same_as(ein.k[0])
        a_k_inner = a_k_inner and len({str(d.ty) for d in a_buf.shape}) == 1
        sch.reorder(*rows, *ks)
        k = sch.fuse(*ks) if len(ks) > 1 else ks[0]
        k_ext = loop_extent(sch, k)
        lanes = vector_lanes(acc_dtype, self.bits)
        # Dequantizing weights is compute bound: a block of weight rows shares each load and
        # conversion of x. (Streaming float weights, two rows at once only slows the prefetch.)
        j_loop = by_var[ein.j[-1]]
        j_ext = loop_extent(sch, j_loop)
        block = largest_divisor(j_ext or 1, [self.row_block, 2, 1]) if k_ext and pack > 1 else 1
        if block > 1:
            jo, ji = sch.split(j_loop, [None, block])
            rows = [jo if lp.same_as(j_loop) else lp for lp in rows]
        # parallel over the outer rows; the innermost row loop stays serial, so a dynamic extent
        # costs one division per task instead of one per dot product
        par = sch.fuse(*rows[:-1]) if len(rows) > 2 else rows[0]
        row = rows[-1]
        par_ext = loop_extent(sch, par)
        inner_rows = 1 if len(rows) < 2 else loop_extent(sch, row)
        work = None if None in (par_ext, k_ext, inner_rows) else par_ext * k_ext * inner_rows * block
        if k_ext is None:
            for epi in epilogues:
                sch.reverse_compute_at(epi, row)
            if work is None or work >= PARALLEL_MIN_WORK:
                sch.parallel(par)
            return sch
        if block > 1:
            sch.reorder(row, ji, k)
        # K is split into ko (serial) and kf = a * vec + v, v vectorised, a unrolled with one
        # accumulator per value. Natural order: k = (ko, a, v); a vector of codes packed `pack`
        # to a word then reads lanes / pack words, which LLVM assembles lane by lane. With few
        # codes per word (int8), vectorise over whole words instead: k = (ko, v, a), v over
        # `vec` consecutive words (one load), a over the codes in a word, x permuted to match.
        packed = 1 < pack < lanes // 2 and k_ext % (pack * lanes) == 0 and a_k_inner
        if packed:
            vec, acc = lanes, pack
            ko, kv, ka = sch.split(k, [None, vec, acc])
            sch.reorder(ka, kv)
            kf = sch.fuse(ka, kv)
        else:
            vec = largest_divisor(k_ext, [lanes, lanes // 2, lanes // 4, 4, 2])
            acc = largest_divisor(k_ext // vec, [self.accumulators, 2, 1])
            ko, kf = sch.split(k, [None, vec * acc])
        rf = sch.rfactor(kf, 0)
        rf2 = None
        if acc > 1:
            # sum the accumulators lane-wise first (acc - 1 vector adds), then the vec lanes
            ra, rv = sch.split(sch.get_loops(main)[-1], [acc, vec])
            rf2 = sch.rfactor(rv, 0)
        for blk in (rf, rf2) if rf2 is not None else (rf,):
            # accumulator lanes innermost, so each row's vector of partial sums is contiguous
            # (a buffer mixing int32 and int64 extents cannot be transformed: strided, but right)
            attempt(sch.transform_layout, blk, ("write", 0), lambda lane, *rest: (*rest, lane))
        rf_loops = sch.get_loops(rf)  # rfactor gives the rf block new loops
        ko, kf = rf_loops[-2:]
        row = rf_loops[-4 if block > 1 else -3]
        par = rf_loops[-5 if block > 1 else -4] if len(rows) > 1 else row
        if rf2 is not None:
            sch.reverse_compute_at(rf2, row)
            rv2, ra2 = lane_and_reduction_loops(sch, rf2)
            inner = [sch.get(lp) for lp in (ra2, rv2)]
            rest = [lp for lp in sch.get_loops(rf2)[-3:] if not any(sch.get(lp).same_as(x) for x in inner)]
            sch.reorder(*(rest if block > 1 else []), ra2, rv2)  # the block's rows outermost
            sch.vectorize(rv2)
        sch.reverse_compute_at(main, row)
        for epi in epilogues:
            sch.reverse_compute_at(epi, row)
        ka, kv = sch.split(kf, [acc, vec])
        if block > 1:
            sch.reorder(ko, ka, rf_loops[-3], kv)
            sch.unroll(rf_loops[-3])
        sch.unroll(ka)
        sch.vectorize(kv)
        if packed:
            # x in the order the codes are consumed: [.., ko, a, v], so its loads are contiguous
            a_idx = [n for n, r in enumerate(sch.get(rf).reads) if r.source.same_as(a_buf)][0]
            xc = sch.cache_read(rf, a_idx, "global")
            sch.transform_layout(
                xc, ("write", 0), lambda *i: (*i[:-1], i[-1] // (vec * acc), i[-1] % acc, i[-1] // acc % vec)
            )
        if work is None or work >= PARALLEL_MIN_WORK:
            sch.parallel(par)  # before decompose_reduction, which parallel() cannot see through
        init = sch.decompose_reduction(rf, ko)
        init_loops = sch.get_loops(init)
        sch.vectorize(init_loops[-1])
        return sch

    def _outer(self, sch, main, ein: Einsum, epilogues):
        by_var = loops_by_var(sch, main)
        inner_j = ein.b_inner_var  # the contiguous output axis of B
        stmt = sch.get(main)
        rows = [by_var[v] for v in ein.s + ein.i + ein.j if not v.same_as(inner_j)]
        col = by_var[inner_j]
        ks = [by_var[v] for v in ein.k]
        col_ext = loop_extent(sch, col)
        if col_ext is None:
            return None
        acc_dtype = stmt.writes[0].source.dtype
        lanes = vector_lanes(acc_dtype, self.bits)
        vec = largest_divisor(col_ext, [lanes, lanes // 2, lanes // 4, 4, 2])
        tile = vec * largest_divisor(col_ext // vec, [self.col_tile_vectors, 2, 1])
        co, ci = sch.split(col, [None, tile])
        sch.reorder(*rows, co, *ks, ci)
        par = sch.fuse(*rows, co)
        cu, cv = sch.split(ci, [None, vec])
        sch.unroll(cu)
        sch.vectorize(cv)
        for epi in epilogues:
            sch.reverse_compute_at(epi, par)
        par_ext = loop_extent(sch, par)
        if par_ext is None or par_ext > 1:
            sch.parallel(par)
        init = sch.decompose_reduction(main, ks[0])
        sch.vectorize(sch.get_loops(init)[-1])
        return sch


def inline_epilogue_chain(sch: s_tir.Schedule, main) -> None:
    """Inline injective blocks after ``main`` into each other so one epilogue remains."""
    changed = True
    while changed:
        changed = False
        epis = find_epilogues(sch, main) or []
        for b in epis[:-1]:
            if attempt(sch.compute_inline, b):
                changed = True
                break
        if not changed:
            for b in epis[1:]:
                if attempt(sch.reverse_compute_inline, b):
                    changed = True
                    break


