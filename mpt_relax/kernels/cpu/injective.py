"""The Injective rule: copies, casts, lookups."""

from __future__ import annotations


from tvm import s_tir
from tvm.relax.analysis import has_reshape_pattern
from tvm.s_tir.dlight.analysis import normalize_prim_func
from .base import attempt, loop_extent, PARALLEL_MIN_WORK, parallel_when_worth_it, root_blocks, Rule, vector_lanes



# ----------------------------------------------------------------------------- Injective
class Injective(Rule):
    """Spatial-only functions: copies, concatenation, embedding lookup, elementwise."""

    def _apply(self, func, target):
        if has_reshape_pattern(func):
            return None  # RewriteDataflowReshape turns these into views; keep them recognisable
        return parallel_when_worth_it(lambda parallel: self._schedule(func, parallel))

    def _schedule(self, func, parallel: bool):
        """(schedule, elements of work of its largest block); outer loops in parallel only if ``parallel``."""
        sch = s_tir.Schedule(func)
        infos = normalize_prim_func(sch)
        if infos is None or not all(b.is_injective() for b in infos):
            return None, 0
        # inline chains (expand_dims -> concatenate), keep the blocks that write outputs
        for b in infos:
            attempt(sch.compute_inline, b.block_rv)
        works = [self._schedule_block(sch, blk, self.bits, parallel) for blk in root_blocks(sch)]
        return sch, max(works, key=lambda w: w if isinstance(w, int) else PARALLEL_MIN_WORK)

    @staticmethod
    def _schedule_block(sch, blk, bits: int, parallel: bool, chunk: int = 1024):
        """Trailing static loops: one serial run of vectors per task; the rest in parallel.
        Returns the block's elements of work (an expression for dynamic extents).

        Indices are recomputed (divisions by dynamic extents) once per task, not per vector.
        """
        loops = sch.get_loops(blk)
        if not loops:
            return 1
        lanes = vector_lanes(sch.get(blk).writes[0].source.dtype, bits)
        inner: list = []
        for lp in reversed(loops):
            if loop_extent(sch, lp) is None:
                break
            inner.insert(0, lp)
        outer = loops[: len(loops) - len(inner)]
        inner_ext = 1
        for lp in inner:
            inner_ext *= loop_extent(sch, lp)
        work = inner_ext
        for lp in outer:
            work = work * (loop_extent(sch, lp) or sch.get(lp).extent)  # an expression for a dynamic extent
        if inner:
            fused = sch.fuse(*inner) if len(inner) > 1 else inner[0]
            if inner_ext % lanes == 0 and inner_ext > lanes:
                if not outer and inner_ext > chunk and inner_ext % chunk == 0:
                    outer, fused = sch.split(fused, [None, chunk])
                    outer = [outer]
                _, iv = sch.split(fused, [None, lanes])
                sch.vectorize(iv)
            elif 2 <= inner_ext <= lanes:
                sch.vectorize(fused)
            elif not outer:
                outer = [fused]
        if outer and parallel:
            par = sch.fuse(*outer) if len(outer) > 1 else outer[0]
            sch.parallel(par)
        return work


