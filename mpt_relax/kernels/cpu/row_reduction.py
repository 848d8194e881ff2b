"""The RowReduction rule: layer norm and softmax rows."""

from __future__ import annotations


import tvm_ffi
from tvm import s_tir, sym, tirx
from tvm.s_tir.dlight.analysis import normalize_prim_func
from .base import loop_extent, parallel_when_worth_it, root_blocks, Rule, vector_lanes
from .einsum import lane_and_reduction_loops



# ----------------------------------------------------------------------------- RowReduction
class RowReduction(Rule):
    """Layer norm, softmax: rows shared by all blocks in parallel, blocks computed per row.

    A reduction over a static extent is vectorised through ``rfactor`` (``lanes`` partial sums,
    then one pass over them); a dynamic one (softmax over the sequence) stays serial, unrolled.
    """

    def _apply(self, func, target):
        return parallel_when_worth_it(lambda parallel: self._schedule(func, parallel))

    def _schedule(self, func, parallel: bool):
        """(schedule, elements of work); rows in parallel only if ``parallel``."""
        sch = s_tir.Schedule(func)
        infos = normalize_prim_func(sch)
        if infos is None or len(infos) < 2 or not infos[-1].is_injective():
            return None, 0
        reductions = [b for b in infos if b.is_reduction()]
        if not reductions:
            return None, 0

        def iters(b):  # unit iters carry no loop worth scheduling
            return [it for it in b.iters if not (isinstance(it.dom, int) and it.dom == 1)]

        for b in infos:
            kinds = "".join(it.kind for it in iters(b))
            if "R" in kinds and "S" in kinds[kinds.index("R") :]:
                return None, 0  # spatial after reduction: not a row reduction
        n_rows = min(len(b) - len(b.lstrip("S")) for b in ("".join(it.kind for it in iters(r)) for r in reductions))
        ref = [it.dom for it in iters(reductions[0])[:n_rows]]
        for b in infos:
            doms = [it.dom for it in iters(b)[:n_rows]]
            if len(doms) < n_rows or any(not same_expr(x, y) for x, y in zip(doms, ref)):
                return None, 0
        last = infos[-1].block_rv
        lanes = vector_lanes(sch.get(last).writes[0].source.dtype, self.bits)
        row_loops = [it.loop_rv for it in iters(infos[-1])[:n_rows]]
        inner_ext = 1
        for it in iters(infos[-1])[n_rows:]:
            inner_ext *= it.dom if isinstance(it.dom, int) else 256
        work = inner_ext
        for d in ref:
            work = work * d

        # vectorise static reductions: rfactor the innermost reduction loop by the vector width
        rf_blocks = []
        for b in reductions:
            loops = sch.get_loops(b.block_rv)
            ext = loop_extent(sch, loops[-1])
            r_iters = [it for it in iters(b) if it.kind == "R"]
            if ext is None or ext % lanes or ext <= lanes or len(r_iters) != 1:
                continue
            _, ri = sch.split(loops[-1], [None, lanes])
            rf_blocks.append(sch.rfactor(ri, 0))

        if row_loops:
            row = sch.fuse(*row_loops) if len(row_loops) > 1 else row_loops[0]
            blocks = root_blocks(sch)
            for blk in reversed(blocks[:-1]):
                sch.compute_at(blk, row, preserve_unit_loops=True)
            if parallel:
                sch.parallel(row)
        for rf in rf_blocks:  # after compute_at, which needs whole reduction blocks
            ki, ko = lane_and_reduction_loops(sch, rf)
            sch.reorder(ko, ki)
            sch.vectorize(ki)
            init = sch.decompose_reduction(rf, ko)
            sch.vectorize(sch.get_loops(init)[-1])
        row_depth = 1 if row_loops else 0
        for b in infos:  # (a reduction's block is its final sum after rfactor, already done)
            blk = b.block_rv
            loops = sch.get_loops(blk)
            if len(loops) <= row_depth or any(sch.get(lp).kind == tirx.ForKind.VECTORIZED for lp in loops):
                continue
            inner = loops[-1]
            ext = loop_extent(sch, inner)
            if b.is_injective():
                if ext is not None and ext <= lanes:
                    if ext >= 2:
                        sch.vectorize(inner)
                else:
                    _, vl = sch.split(inner, [None, lanes])
                    sch.vectorize(vl)
            elif ext is None or ext > lanes:
                _, ul = sch.split(inner, [None, lanes])
                sch.annotate(ul, "pragma_auto_unroll_max_step", lanes)
                sch.annotate(ul, "pragma_unroll_explicit", 1)
        return sch, work


def same_expr(a, b) -> bool:
    if isinstance(a, int) or isinstance(b, int):
        return isinstance(a, int) and isinstance(b, int) and a == b
    if tvm_ffi.structural_equal(a, b):
        return True
    try:
        return bool(sym.Analyzer().can_prove_equal(a, b))
    except Exception:  # pylint: disable=broad-except
        return False


