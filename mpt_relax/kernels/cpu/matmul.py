"""The Matmul rule: packed, register-blocked prefill GEMMs."""

from __future__ import annotations


from tvm import s_tir, tirx
from tvm.ir import TensorLoad
from .base import attempt, dispatch, index_var, is_const, loop_contains, loop_extent, root_blocks, Rule, vector_lanes
from .einsum import analyze_einsum, find_epilogues, loops_by_var, main_reduction_block, producers_before
from .gemv import GEMV, inline_epilogue_chain
from .injective import Injective



# ----------------------------------------------------------------------------- Matmul
def _widen(sch: s_tir.Schedule, producer, consumer, dtype) -> None:
    """Make ``producer`` store its output cast to ``dtype`` and ``consumer`` load it as is.

    ``unsafe_set_dtype`` has the consumer read ``Cast(old dtype, buf[...])``; where it then
    casts that to ``dtype`` (``Cast("float32", w)`` of an fp16 ``w``), both casts are dropped.
    Exact either way: every stored value is an old-dtype value widened.
    """
    sch.unsafe_set_dtype(producer, 0, dtype)
    buf = sch.get(producer).writes[0].source

    def uncast(expr):
        if isinstance(expr, tirx.Cast):
            inner = expr.value
            if str(expr.ty) == dtype and isinstance(inner, tirx.Cast) and isinstance(inner.value, TensorLoad):
                if inner.value.source.same_as(buf):
                    return inner.value
            return tirx.Cast(str(expr.ty), uncast(inner))
        if isinstance(expr, tirx.expr.BinaryOpExpr):
            return type(expr)(uncast(expr.a), uncast(expr.b))
        return expr

    old = sch.get(consumer)
    body = tirx.BufferStore(old.body.buffer, uncast(old.body.value), old.body.indices)
    new = s_tir.SBlock(old.iter_vars, old.reads, old.writes, old.name_hint, body, old.init,
                       old.alloc_buffers, old.match_buffers, old.annotations)
    sch.state.replace(sch.get_sref(consumer), new, {old: new})


class Matmul(Rule):
    """Packed, register-blocked matmul for a dynamic / large I and static J, K (prefill)."""

    def __init__(self, mr: int | None = None, nr_vectors: int = 2, small_rows: int = 16):
        self.mr = mr  # rows of the register tile; None: 8 with 32 vector registers (AVX-512), else 4
        self.nr_vectors = nr_vectors
        self.small_rows = small_rows  # fewer rows of A than this: GEMV (no packing) instead

    def _apply(self, func, target):
        big, rows = self._schedule(func)
        if big is None or isinstance(rows, tirx.IntImm):
            return big
        # a dynamic I (prefill, batched decode) may be 1 at run time: below small_rows, take a
        # GEMV schedule (no packing, weights streamed once) instead, chosen per call
        small = GEMV(weight_rows_outer=True).apply(func, target, False)
        if small is None:
            return big
        return dispatch(rows < self.small_rows, small, big)

    def _schedule(self, func):
        """(the packed schedule, I's extent), or (None, None) when the rule does not apply."""
        sch = s_tir.Schedule(func)
        main = main_reduction_block(sch)
        if main is None:
            return None, None
        ein = analyze_einsum(sch, main)
        if ein is None or not ein.i or len(ein.j) != 1 or len(ein.k) != 1 or len(ein.i) != 1:
            return None, None
        stmt = sch.get(main)
        by_var = loops_by_var(sch, main)
        i_loop, j_loop, k_loop = by_var[ein.i[0]], by_var[ein.j[0]], by_var[ein.k[0]]
        i_ext, j_ext, k_ext = loop_extent(sch, i_loop), loop_extent(sch, j_loop), loop_extent(sch, k_loop)
        if j_ext is None or k_ext is None or (i_ext is not None and i_ext < self.small_rows):
            return None, None
        rows = sch.get(i_loop).extent
        acc_dtype = str(stmt.writes[0].source.dtype)
        lanes = vector_lanes(acc_dtype, self.bits)
        nr = lanes * self.nr_vectors
        if j_ext % nr:
            return None, None
        b_buf = stmt.reads[ein.b].source
        # B's index -> role (every index must be a var or a constant: einsum pattern)
        b_roles = []
        for idx in stmt.reads[ein.b].region:
            var = index_var(idx.min)
            if var is not None:
                b_roles.append("j" if var.same_as(ein.j[0]) else "k" if var.same_as(ein.k[0]) else "s")
            elif is_const(idx.min):
                b_roles.append("c")
            else:
                return None, None
        # Producers: a block writing B (dequantize) becomes the packing stage; others inline.
        producers = producers_before(sch, main)
        pack = None
        for blk in producers:
            if any(w.source.same_as(b_buf) for w in sch.get(blk).writes):
                pack = blk
        for blk in producers:
            if pack is not None and sch.get(blk).same_as(sch.get(pack)):
                continue
            attempt(sch.compute_inline, blk)
        if pack is not None:
            for blk in producers_before(sch, main):
                if not sch.get(blk).same_as(sch.get(pack)):
                    attempt(sch.compute_inline, blk)  # the dequantize's own producers
        inline_epilogue_chain(sch, main)
        epilogues = find_epilogues(sch, main)
        if epilogues is None or len(epilogues) > 1:
            return None, None
        main = sch.get_sblock(stmt.name_hint)
        if pack is not None and len(producers_before(sch, main)) != 1:
            return None, None

        # A dynamic (or ragged) I is padded to a multiple of MR: the microkernel then has no row
        # predicate. The padded rows of A are zeros; the padded rows of C are never written back.
        mr = self.mr or (8 if self.bits >= 512 else 4)
        padded = i_ext is None or i_ext % mr != 0
        if padded:
            sch.pad_einsum(main, [mr if iv.var.same_as(ein.i[0]) else 1 for iv in sch.get(main).iter_vars])
            main = sch.get_sblock(stmt.name_hint)
            inline_epilogue_chain(sch, main)  # the un-padding copy absorbs the epilogue
        reads = sch.get(main).reads
        b_idx = [k for k, r in enumerate(reads) if r.source.same_as(b_buf)][0]
        if pack is None:
            pack = sch.cache_read(main, b_idx, "global")
        # fp16 operands (x and W, or the dequantized W) go into the microkernel as fp32: the packed
        # tile and A's copy hold the value cast once, so the k-loop is the fp32 model's FMA loop
        a_buf = reads[1 - b_idx].source
        if a_buf.dtype != acc_dtype:  # cast in A's padded copy (or, unpadded, in a copy made here)
            a_pad = [p for p in sch.get_producers(main) if sch.get(p).writes[0].source.same_as(a_buf)]
            _widen(sch, a_pad[0] if a_pad else sch.cache_read(main, 1 - b_idx, "global"), main, acc_dtype)
        if sch.get(pack).writes[0].source.dtype != acc_dtype:
            _widen(sch, pack, main, acc_dtype)

        # loop nest: [s..., jo] parallel, io, k, ii (unrolled), ji (vectorised)
        by_var = loops_by_var(sch, main)
        s_loops = [by_var[v] for v in ein.s]
        i_loop, j_loop, k_loop = by_var[ein.i[0]], by_var[ein.j[0]], by_var[ein.k[0]]
        jo, ji = sch.split(j_loop, [None, nr])
        io, ii = sch.split(i_loop, [None, mr])
        sch.reorder(*s_loops, jo, io, k_loop, ii, ji)
        par = sch.fuse(*s_loops, jo) if s_loops else jo

        # pack B's panel for this task as [K, NR] (panel index first, so the compacted tile is dense)
        def panel(*idx):
            lead = [x for x, r in zip(idx, b_roles) if r in ("s", "c")]
            jv = [x for x, r in zip(idx, b_roles) if r == "j"][0]
            kv = [x for x, r in zip(idx, b_roles) if r == "k"][0]
            return (*lead, jv // nr, kv, jv % nr)

        sch.transform_layout(pack, ("write", 0), panel)
        sch.compute_at(pack, par)

        # the MR x NR accumulator tile lives in registers ("local"); it is written back per row tile
        after = find_epilogues(sch, main) or []  # (before cache_write, whose write-back comes after main)
        wb = sch.cache_write(main, 0, "local")
        sch.reverse_compute_at(wb, io)
        if not padded and after:
            if not attempt(sch.reverse_compute_inline, after[0]):
                sch.reverse_compute_at(after[0], io)
                self._vectorize_inner(sch, after[0], lanes)
        self._vectorize_inner(sch, wb, lanes)
        self._schedule_pack(sch, pack, b_roles, lanes)
        sch.unroll(ii)
        ju, jv = sch.split(ji, [None, lanes])
        sch.unroll(ju)
        sch.vectorize(jv)
        sch.parallel(par)
        init = sch.decompose_reduction(main, k_loop)  # after the loop annotations, which need the whole block
        self._vectorize_inner(sch, init, lanes)
        # the padding copy of A and the un-padding copy of C (with the epilogue) are plain copies
        for blk in root_blocks(sch):
            if not loop_contains(sch, blk, main):
                Injective._schedule_block(sch, blk, self.bits, parallel=True)
        return sch, rows

    @staticmethod
    def _schedule_pack(sch, pack, b_roles, lanes):
        """Copy the panel with contiguous vector loads, filling it a few rows of K at a time.

        For B[J, K] (x @ W^T) the panel [K, NR] is a transpose: reading ``lanes`` values of K
        from each of the NR rows in turn keeps the ``lanes x NR`` piece being written in L1
        (writing whole K columns instead thrashes L1 once the panel outgrows it).
        """
        by_var = loops_by_var(sch, pack)
        ivs = sch.get(pack).iter_vars
        j_loop = by_var.get(ivs[b_roles.index("j")].var)
        k_loop = by_var.get(ivs[b_roles.index("k")].var)
        if j_loop is None or k_loop is None:
            return
        k_ext = loop_extent(sch, k_loop)
        if b_roles.index("k") > b_roles.index("j") and k_ext and k_ext % lanes == 0:
            ko, ki = sch.split(k_loop, [None, lanes])
            sch.reorder(ko, j_loop, ki)
            sch.vectorize(ki)
        elif b_roles.index("j") > b_roles.index("k"):
            _, jv = sch.split(j_loop, [None, lanes])
            sch.vectorize(jv)

    @staticmethod
    def _vectorize_inner(sch, block, lanes):
        loops = sch.get_loops(block)
        inner = loops[-1]
        ext = loop_extent(sch, inner)
        if ext is None or ext < 2:
            return
        if ext > lanes and ext % lanes == 0:
            _, inner = sch.split(inner, [None, lanes])
        elif ext > lanes:
            return
        sch.vectorize(inner)


