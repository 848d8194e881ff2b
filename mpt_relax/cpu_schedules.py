"""dlight-style schedule rules for the CPU (LLVM) target.

:func:`default_rules` is the list :mod:`mpt_relax.compiler` hands to
``dl.ApplyDefaultSchedule``; each PrimFunc gets the first rule that accepts it.

``Matmul``
    ``C[S, I, J] += A[S, I, K] * B[S, J, K]`` (or ``B[S, K, J]``) with a dynamic or large I
    and a static J, K: the prefill projections and ``prefill_logits``. Each parallel task
    owns one panel of NR columns of B, copies it once into a ``[K, NR]`` tile (this is where a
    dequantize prologue is evaluated, once per element), then runs an MR x NR register-blocked
    microkernel over the rows of A (NR vectorised, MR unrolled, K innermost). Operands that
    the product casts to the accumulator type (fp16 x and W accumulated in fp32) are cast once
    in the copies (the tile, A's padded copy), so the microkernel is the fp32 model's FMA loop.
    A dynamic I is padded to a multiple of MR; an injective epilogue (bias, residual, GELU,
    cast) is applied when the tile is written back. A dynamic I also gets the GEMV schedule,
    taken at run time when I < 16 (one token of ``extend``, a small decode batch): packing
    costs more than it saves for a few rows.
``GEMV``
    every other sum-of-products block (``C[...] += A[...] * B[...]``): the decode
    projections and LM head (``x[1, K] @ W[N, K]^T``) and the attention scores / values.
    Inner reduction (K contiguous in B): rows in parallel, K vectorised with several
    accumulators through ``rfactor``. A dequantized weight (codes packed in uint32 words)
    is compute bound: two weight rows share each load of x, and int8 codes (4 per word) are
    vectorised over whole words, one accumulator per code position, x permuted once per call
    to match (the natural order would assemble each vector from 4 words lane by lane).
    Outer reduction (an output axis contiguous in B, like
    ``probs @ v``): rows in parallel, that axis vectorised, K as the loop around it.
    Producers (a dequantize) are inlined into the weight load; epilogues run per row.
``RowReduction``
    layer norm / softmax: the rows shared by every block in parallel, every block computed
    per row, the element loops vectorised.
``Injective``
    the rest (copies, concatenations, embedding lookup, casts): outer loops in parallel
    when there is enough work, the innermost static loops vectorised.

RowReduction and Injective go parallel only above ``PARALLEL_MIN_WORK`` elements; over a
dynamic number of rows the function holds both versions and picks one per call, so the
one-row kernels of a decode step do not pay for waking and joining the thread pool.

All rules decline (return None) instead of raising, so an unusual PrimFunc stays
unscheduled and correct.
"""

from __future__ import annotations

import dataclasses
import logging

import tvm_ffi
from tvm import s_tir, sym, tirx
from tvm.ir import TensorLoad
from tvm.relax.analysis import has_reshape_pattern
from tvm.s_tir import dlight as dl
from tvm.s_tir.dlight.analysis import normalize_prim_func
from tvm.s_tir.dlight.analysis.gemv import get_reduction_expr
from tvm.target import Target
from tvm.target.codegen import target_has_features

logger = logging.getLogger(__name__)

PARALLEL_MIN_WORK = 1 << 15  # elements below which a parallel launch costs more than it saves


# ----------------------------------------------------------------------------- helpers
def _extent(sch: s_tir.Schedule, loop) -> int | None:
    ext = sch.get(loop).extent
    return int(ext) if isinstance(ext, tirx.IntImm) else None


def _is_unit(dom) -> bool:
    return isinstance(dom, tirx.IntImm) and dom.value == 1


def _dtype_bits(dtype) -> int:
    return int("".join(c for c in str(dtype) if c.isdigit()) or 32)


def _vector_bits(target: Target) -> int:
    """SIMD register width of an LLVM target: 512 (AVX-512), 256 (AVX/AVX2), else 128."""
    try:
        if target_has_features("avx512f", target):
            return 512
        if target_has_features("avx", target):
            return 256
    except Exception:  # pylint: disable=broad-except  # non-x86 triples
        pass
    return 128


def _vector_lanes(dtype, bits: int) -> int:
    return max(bits // _dtype_bits(dtype), 1)


def _largest_divisor(extent: int, candidates) -> int:
    for c in candidates:
        if c >= 1 and extent % c == 0:
            return c
    return 1


def _vars_in(region) -> set:
    out = set()
    for rng in region:
        for v in tirx.analysis.undefined_vars(rng.min):
            out.add(v)
    return out


def _index_var(expr):
    """The block var an index is, or None when it is a constant or a composite expression."""
    return expr if isinstance(expr, tirx.Var) else None


def _is_const(expr) -> bool:
    return isinstance(expr, tirx.IntImm)


def _try(fn, *args, **kwargs) -> bool:
    try:
        fn(*args, **kwargs)
        return True
    except Exception:  # pylint: disable=broad-except
        return False


def _contains(sch: s_tir.Schedule, outer, block) -> bool:
    """Whether ``block`` is ``outer`` or nested in the loops under ``outer`` (root-level blocks)."""
    target = sch.get(block)
    loops_of = sch.get_loops(block)
    if sch.get(outer).same_as(target):
        return True
    outer_loops = sch.get_loops(outer)
    return bool(outer_loops) and bool(loops_of) and sch.get(outer_loops[0]).same_as(sch.get(loops_of[0]))


def _root_blocks(sch: s_tir.Schedule) -> list:
    return list(sch.get_child_blocks(sch.get_sblock("root")))


class _Rule(dl.ScheduleRule if hasattr(dl, "ScheduleRule") else dl.base.ScheduleRule):
    """A CPU rule: applies to LLVM targets only and declines instead of raising."""

    bits = 512  # SIMD width of the target being scheduled, set by apply()

    def apply(self, func, target: Target, tunable: bool):  # noqa: D102
        if not isinstance(func, tirx.PrimFunc) or target.kind.name != "llvm":
            return None
        self.bits = _vector_bits(target)
        try:
            return self._apply(func, target)
        except Exception as err:  # pylint: disable=broad-except
            logger.debug("%s declined %s: %s", type(self).__name__, func.attrs.get("global_symbol"), err)
            return None

    def _apply(self, func: tirx.PrimFunc, target: Target):
        raise NotImplementedError


# ----------------------------------------------------------------------------- einsum analysis
@dataclasses.dataclass
class _Einsum:
    """Roles of a ``C[...] += A[...] * B[...]`` block's iterators (unit iterators left out)."""

    a: int  # read index of the operand without J axes (the vector in a GEMV)
    b: int  # read index of the operand with J axes (the weight)
    s: list  # block iter vars in A, B and C (batch, e.g. heads)
    i: list  # in A and C (rows of A)
    j: list  # in B and C (rows of W / columns of C)
    k: list  # reduction
    b_inner: str  # role of B's innermost non-constant index: "k", "j", "s" or "?"
    b_inner_var: object = None  # that index's block var

    def rebind(self, sch: s_tir.Schedule, block) -> "_Einsum":
        """The same roles for ``block`` after inlining changed it (block vars matched by position)."""
        old = [iv.var for iv in self._iter_vars]
        new = [iv.var for iv in sch.get(block).iter_vars]
        if len(old) != len(new):
            raise ValueError("block iterators changed")
        pos = lambda v: [k for k, o in enumerate(old) if o.same_as(v)][0]  # noqa: E731
        remap = lambda vs: [new[pos(v)] for v in vs]  # noqa: E731
        out = dataclasses.replace(self, s=remap(self.s), i=remap(self.i), j=remap(self.j), k=remap(self.k))
        out.b_inner_var = None if self.b_inner_var is None else new[pos(self.b_inner_var)]
        out._iter_vars = list(sch.get(block).iter_vars)
        return out


def _analyze_einsum(sch: s_tir.Schedule, block) -> _Einsum | None:
    stmt = sch.get(block)
    if len(stmt.reads) != 2 or len(stmt.writes) != 1 or get_reduction_expr(stmt) is None:
        return None
    if stmt.init is None or not isinstance(stmt.init, tirx.BufferStore):
        return None
    init = stmt.init.value
    if not (isinstance(init, (tirx.FloatImm, tirx.IntImm)) and float(init.value) == 0.0):
        return None
    r0, r1 = (_vars_in(r.region) for r in stmt.reads)
    c = _vars_in(stmt.writes[0].region)
    roles: dict = {}
    s, i, j, k = [], [], [], []
    for iv in stmt.iter_vars:
        v = iv.var
        if _is_unit(iv.dom.extent):
            continue
        if iv.iter_type == tirx.IterVar.CommReduce:
            if v in r0 and v in r1 and v not in c:
                k.append(v)
                roles[v] = "k"
            else:
                return None
        elif iv.iter_type == tirx.IterVar.DataPar:
            if v not in c:
                return None
            if v in r0 and v in r1:
                s.append(v)
                roles[v] = "s"
            elif v in r0:
                i.append(v)
                roles[v] = "i"
            elif v in r1:
                j.append(v)
                roles[v] = "j"
            else:
                return None
        else:
            return None
    if not k:
        return None
    a, b = 0, 1
    if not j and i:  # the matrix is read 0: call it B
        a, b, i, j = 1, 0, j, i
        roles = {v: ("j" if r == "i" else r) for v, r in roles.items()}
    elif j and i:
        pass
    elif not j:
        return None

    def inner(read):
        for idx in reversed(list(read.region)):
            if _is_const(idx.min):
                continue
            var = _index_var(idx.min)
            return (roles.get(var, "?"), var) if var is not None else ("?", None)
        return "?", None

    b_role, b_var = inner(stmt.reads[b])
    ein = _Einsum(a, b, s, i, j, k, b_role, b_var)
    ein._iter_vars = list(stmt.iter_vars)
    return ein


def _word_pack(stmt, k_var) -> int:
    """Codes per word of a packed operand: the smallest c of a read indexed ``[..., k // c]``, else 1."""
    packs = [
        int(idx.min.b.value)
        for r in stmt.reads
        for idx in list(r.region)[-1:]
        if isinstance(idx.min, tirx.FloorDiv) and idx.min.a.same_as(k_var) and isinstance(idx.min.b, tirx.IntImm)
    ]
    return min(packs, default=1)


def _loops_by_var(sch: s_tir.Schedule, block) -> dict:
    """Map each block iter var to the innermost loop its binding uses (``o * c + i`` -> ``i``)."""
    realize = s_tir.dlight.analysis.common_analysis.get_sblockrealize(sch, block)
    out = {}
    loops = sch.get_loops(block)
    loop_vars = [sch.get(lp).loop_var for lp in loops]
    for iv, val in zip(sch.get(block).iter_vars, realize.iter_values):
        used = tirx.analysis.undefined_vars(val)
        inner = [k for k, lv in enumerate(loop_vars) if any(lv.same_as(u) for u in used)]
        if inner:
            out[iv.var] = loops[max(inner)]
    return out


def _lane_and_reduction_loops(sch: s_tir.Schedule, rf) -> tuple:
    """The loops of an rfactor block's new spatial (lane) iterator and of its reduction."""
    by_var = _loops_by_var(sch, rf)
    ivs = sch.get(rf).iter_vars
    lane = by_var[ivs[0].var]  # rfactor puts the new spatial iter first
    red = [by_var[iv.var] for iv in ivs if iv.iter_type == tirx.IterVar.CommReduce][0]
    return lane, red


def _main_reduction_block(sch: s_tir.Schedule):
    """The single reduction block of the function after inlining its spatial neighbours, or None."""
    infos = normalize_prim_func(sch)
    if infos is None:
        return None
    reductions = [b for b in infos if b.is_reduction()]
    if len(reductions) != 1:
        return None
    return reductions[0].block_rv


def _epilogues(sch: s_tir.Schedule, main) -> list | None:
    """Blocks after ``main`` at the root, all injective; None if something else is there."""
    blocks = _root_blocks(sch)
    pos = [k for k, b in enumerate(blocks) if sch.get(b).same_as(sch.get(main))][0]
    after = blocks[pos + 1 :]
    for b in after:
        if any(iv.iter_type != tirx.IterVar.DataPar for iv in sch.get(b).iter_vars):
            return None
    return after


def _producers_before(sch: s_tir.Schedule, main) -> list:
    blocks = _root_blocks(sch)
    pos = [k for k, b in enumerate(blocks) if sch.get(b).same_as(sch.get(main))][0]
    return blocks[:pos]


# ----------------------------------------------------------------------------- GEMV
class GEMV(_Rule):
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
        main = _main_reduction_block(sch)
        if main is None:
            return None
        ein = _analyze_einsum(sch, main)
        if ein is None:
            return None
        # Producers (a dequantize, a cast) go into the loads; consumers stay as per-row epilogues.
        for blk in _producers_before(sch, main):
            _try(sch.compute_inline, blk)
        _inline_epilogue_chain(sch, main)
        if _producers_before(sch, main):
            return None
        epilogues = _epilogues(sch, main)
        if epilogues is None:
            return None
        main = sch.get_sblock(sch.get(main).name_hint)
        ein = ein.rebind(sch, main)
        if ein.b_inner == "k":
            return self._inner(sch, main, ein, epilogues)
        if ein.b_inner == "j":
            return self._outer(sch, main, ein, epilogues)
        return None

    def _inner(self, sch, main, ein: _Einsum, epilogues):
        stmt = sch.get(main)
        by_var = _loops_by_var(sch, main)
        if self.weight_rows_outer:
            rows = [by_var[v] for v in ein.j + ein.s + ein.i]
        else:
            row_vars = ein.s + ein.i + ein.j
            rows = [by_var[iv.var] for iv in stmt.iter_vars if any(iv.var.same_as(v) for v in row_vars)]
        ks = [by_var[v] for v in ein.k]
        acc_dtype = stmt.writes[0].source.dtype
        a_buf = stmt.reads[ein.a].source
        pack = _word_pack(stmt, ein.k[0]) if len(ein.k) == 1 else 1
        # x can be permuted to the order of packed codes: its last index is k, its extents of one dtype
        a_k_inner = list(stmt.reads[ein.a].region)[-1].min.same_as(ein.k[0])
        a_k_inner = a_k_inner and len({str(d.ty) for d in a_buf.shape}) == 1
        sch.reorder(*rows, *ks)
        k = sch.fuse(*ks) if len(ks) > 1 else ks[0]
        k_ext = _extent(sch, k)
        lanes = _vector_lanes(acc_dtype, self.bits)
        # Dequantizing weights is compute bound: a block of weight rows shares each load and
        # conversion of x. (Streaming float weights, two rows at once only slows the prefetch.)
        j_loop = by_var[ein.j[-1]]
        j_ext = _extent(sch, j_loop)
        block = _largest_divisor(j_ext or 1, [self.row_block, 2, 1]) if k_ext and pack > 1 else 1
        if block > 1:
            jo, ji = sch.split(j_loop, [None, block])
            rows = [jo if lp.same_as(j_loop) else lp for lp in rows]
        # parallel over the outer rows; the innermost row loop stays serial, so a dynamic extent
        # costs one division per task instead of one per dot product
        par = sch.fuse(*rows[:-1]) if len(rows) > 2 else rows[0]
        row = rows[-1]
        par_ext = _extent(sch, par)
        inner_rows = 1 if len(rows) < 2 else _extent(sch, row)
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
            vec = _largest_divisor(k_ext, [lanes, lanes // 2, lanes // 4, 4, 2])
            acc = _largest_divisor(k_ext // vec, [self.accumulators, 2, 1])
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
            _try(sch.transform_layout, blk, ("write", 0), lambda lane, *rest: (*rest, lane))
        rf_loops = sch.get_loops(rf)  # rfactor gives the rf block new loops
        ko, kf = rf_loops[-2:]
        row = rf_loops[-4 if block > 1 else -3]
        par = rf_loops[-5 if block > 1 else -4] if len(rows) > 1 else row
        if rf2 is not None:
            sch.reverse_compute_at(rf2, row)
            rv2, ra2 = _lane_and_reduction_loops(sch, rf2)
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

    def _outer(self, sch, main, ein: _Einsum, epilogues):
        by_var = _loops_by_var(sch, main)
        inner_j = ein.b_inner_var  # the contiguous output axis of B
        stmt = sch.get(main)
        rows = [by_var[v] for v in ein.s + ein.i + ein.j if not v.same_as(inner_j)]
        col = by_var[inner_j]
        ks = [by_var[v] for v in ein.k]
        col_ext = _extent(sch, col)
        if col_ext is None:
            return None
        acc_dtype = stmt.writes[0].source.dtype
        lanes = _vector_lanes(acc_dtype, self.bits)
        vec = _largest_divisor(col_ext, [lanes, lanes // 2, lanes // 4, 4, 2])
        tile = vec * _largest_divisor(col_ext // vec, [self.col_tile_vectors, 2, 1])
        co, ci = sch.split(col, [None, tile])
        sch.reorder(*rows, co, *ks, ci)
        par = sch.fuse(*rows, co)
        cu, cv = sch.split(ci, [None, vec])
        sch.unroll(cu)
        sch.vectorize(cv)
        for epi in epilogues:
            sch.reverse_compute_at(epi, par)
        par_ext = _extent(sch, par)
        if par_ext is None or par_ext > 1:
            sch.parallel(par)
        init = sch.decompose_reduction(main, ks[0])
        sch.vectorize(sch.get_loops(init)[-1])
        return sch


def _inline_epilogue_chain(sch: s_tir.Schedule, main) -> None:
    """Inline injective blocks after ``main`` into each other so one epilogue remains."""
    changed = True
    while changed:
        changed = False
        epis = _epilogues(sch, main) or []
        for b in epis[:-1]:
            if _try(sch.compute_inline, b):
                changed = True
                break
        if not changed:
            for b in epis[1:]:
                if _try(sch.reverse_compute_inline, b):
                    changed = True
                    break


# ----------------------------------------------------------------------------- Matmul
def _dispatch(cond, then_sch: s_tir.Schedule, else_sch: s_tir.Schedule) -> s_tir.Schedule:
    """One PrimFunc running ``then_sch``'s loops if ``cond`` holds at run time, else ``else_sch``'s.

    Both schedules come from the same PrimFunc, so they share its parameters and buffers.
    """
    f_then, f_else = then_sch.mod["main"], else_sch.mod["main"]
    r_then, r_else = f_then.body.block, f_else.body.block
    allocs = list(r_then.alloc_buffers)
    for buf in r_else.alloc_buffers:
        if not any(buf.same_as(a) for a in allocs):
            allocs.append(buf)
    body = tirx.IfThenElse(cond, r_then.body, r_else.body)
    root = s_tir.SBlock([], [], [], "root", body, alloc_buffers=allocs)
    return s_tir.Schedule(f_else.with_body(s_tir.SBlockRealize([], True, root)))


def _parallel_when_worth_it(schedule) -> s_tir.Schedule | None:
    """``schedule(parallel)`` -> (schedule, elements of work): the parallel schedule where the
    work is statically large, the serial one where it is small, and for a dynamic amount of
    work (e.g. one row per token) one function choosing at run time. A decode step runs
    dozens of one-row kernels: a parallel launch (waking and joining the worker threads) costs
    more than their work, and far more when another process holds a core."""
    sch, work = schedule(True)
    if sch is None or isinstance(work, int):
        return sch if sch is None or work >= PARALLEL_MIN_WORK else schedule(False)[0]
    return _dispatch(work < PARALLEL_MIN_WORK, schedule(False)[0], sch)


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


class Matmul(_Rule):
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
        return _dispatch(rows < self.small_rows, small, big)

    def _schedule(self, func):
        """(the packed schedule, I's extent), or (None, None) when the rule does not apply."""
        sch = s_tir.Schedule(func)
        main = _main_reduction_block(sch)
        if main is None:
            return None, None
        ein = _analyze_einsum(sch, main)
        if ein is None or not ein.i or len(ein.j) != 1 or len(ein.k) != 1 or len(ein.i) != 1:
            return None, None
        stmt = sch.get(main)
        by_var = _loops_by_var(sch, main)
        i_loop, j_loop, k_loop = by_var[ein.i[0]], by_var[ein.j[0]], by_var[ein.k[0]]
        i_ext, j_ext, k_ext = _extent(sch, i_loop), _extent(sch, j_loop), _extent(sch, k_loop)
        if j_ext is None or k_ext is None or (i_ext is not None and i_ext < self.small_rows):
            return None, None
        rows = sch.get(i_loop).extent
        acc_dtype = str(stmt.writes[0].source.dtype)
        lanes = _vector_lanes(acc_dtype, self.bits)
        nr = lanes * self.nr_vectors
        if j_ext % nr:
            return None, None
        b_buf = stmt.reads[ein.b].source
        # B's index -> role (every index must be a var or a constant: einsum pattern)
        b_roles = []
        for idx in stmt.reads[ein.b].region:
            var = _index_var(idx.min)
            if var is not None:
                b_roles.append("j" if var.same_as(ein.j[0]) else "k" if var.same_as(ein.k[0]) else "s")
            elif _is_const(idx.min):
                b_roles.append("c")
            else:
                return None, None
        # Producers: a block writing B (dequantize) becomes the packing stage; others inline.
        producers = _producers_before(sch, main)
        pack = None
        for blk in producers:
            if any(w.source.same_as(b_buf) for w in sch.get(blk).writes):
                pack = blk
        for blk in producers:
            if pack is not None and sch.get(blk).same_as(sch.get(pack)):
                continue
            _try(sch.compute_inline, blk)
        if pack is not None:
            for blk in _producers_before(sch, main):
                if not sch.get(blk).same_as(sch.get(pack)):
                    _try(sch.compute_inline, blk)  # the dequantize's own producers
        _inline_epilogue_chain(sch, main)
        epilogues = _epilogues(sch, main)
        if epilogues is None or len(epilogues) > 1:
            return None, None
        main = sch.get_sblock(stmt.name_hint)
        if pack is not None and len(_producers_before(sch, main)) != 1:
            return None, None

        # A dynamic (or ragged) I is padded to a multiple of MR: the microkernel then has no row
        # predicate. The padded rows of A are zeros; the padded rows of C are never written back.
        mr = self.mr or (8 if self.bits >= 512 else 4)
        padded = i_ext is None or i_ext % mr != 0
        if padded:
            sch.pad_einsum(main, [mr if iv.var.same_as(ein.i[0]) else 1 for iv in sch.get(main).iter_vars])
            main = sch.get_sblock(stmt.name_hint)
            _inline_epilogue_chain(sch, main)  # the un-padding copy absorbs the epilogue
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
        by_var = _loops_by_var(sch, main)
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
        after = _epilogues(sch, main) or []  # (before cache_write, whose write-back comes after main)
        wb = sch.cache_write(main, 0, "local")
        sch.reverse_compute_at(wb, io)
        if not padded and after:
            if not _try(sch.reverse_compute_inline, after[0]):
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
        for blk in _root_blocks(sch):
            if not _contains(sch, blk, main):
                Injective._schedule_block(sch, blk, self.bits, parallel=True)
        return sch, rows

    @staticmethod
    def _schedule_pack(sch, pack, b_roles, lanes):
        """Copy the panel with contiguous vector loads, filling it a few rows of K at a time.

        For B[J, K] (x @ W^T) the panel [K, NR] is a transpose: reading ``lanes`` values of K
        from each of the NR rows in turn keeps the ``lanes x NR`` piece being written in L1
        (writing whole K columns instead thrashes L1 once the panel outgrows it).
        """
        by_var = _loops_by_var(sch, pack)
        ivs = sch.get(pack).iter_vars
        j_loop = by_var.get(ivs[b_roles.index("j")].var)
        k_loop = by_var.get(ivs[b_roles.index("k")].var)
        if j_loop is None or k_loop is None:
            return
        k_ext = _extent(sch, k_loop)
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
        ext = _extent(sch, inner)
        if ext is None or ext < 2:
            return
        if ext > lanes and ext % lanes == 0:
            _, inner = sch.split(inner, [None, lanes])
        elif ext > lanes:
            return
        sch.vectorize(inner)


# ----------------------------------------------------------------------------- RowReduction
class RowReduction(_Rule):
    """Layer norm, softmax: rows shared by all blocks in parallel, blocks computed per row.

    A reduction over a static extent is vectorised through ``rfactor`` (``lanes`` partial sums,
    then one pass over them); a dynamic one (softmax over the sequence) stays serial, unrolled.
    """

    def _apply(self, func, target):
        return _parallel_when_worth_it(lambda parallel: self._schedule(func, parallel))

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
            if len(doms) < n_rows or any(not _same_expr(x, y) for x, y in zip(doms, ref)):
                return None, 0
        last = infos[-1].block_rv
        lanes = _vector_lanes(sch.get(last).writes[0].source.dtype, self.bits)
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
            ext = _extent(sch, loops[-1])
            r_iters = [it for it in iters(b) if it.kind == "R"]
            if ext is None or ext % lanes or ext <= lanes or len(r_iters) != 1:
                continue
            _, ri = sch.split(loops[-1], [None, lanes])
            rf_blocks.append(sch.rfactor(ri, 0))

        if row_loops:
            row = sch.fuse(*row_loops) if len(row_loops) > 1 else row_loops[0]
            blocks = _root_blocks(sch)
            for blk in reversed(blocks[:-1]):
                sch.compute_at(blk, row, preserve_unit_loops=True)
            if parallel:
                sch.parallel(row)
        for rf in rf_blocks:  # after compute_at, which needs whole reduction blocks
            ki, ko = _lane_and_reduction_loops(sch, rf)
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
            ext = _extent(sch, inner)
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


def _same_expr(a, b) -> bool:
    if isinstance(a, int) or isinstance(b, int):
        return isinstance(a, int) and isinstance(b, int) and a == b
    if tvm_ffi.structural_equal(a, b):
        return True
    try:
        return bool(sym.Analyzer().can_prove_equal(a, b))
    except Exception:  # pylint: disable=broad-except
        return False


# ----------------------------------------------------------------------------- Injective
class Injective(_Rule):
    """Spatial-only functions: copies, concatenation, embedding lookup, elementwise."""

    def _apply(self, func, target):
        if has_reshape_pattern(func):
            return None  # RewriteDataflowReshape turns these into views; keep them recognisable
        return _parallel_when_worth_it(lambda parallel: self._schedule(func, parallel))

    def _schedule(self, func, parallel: bool):
        """(schedule, elements of work of its largest block); outer loops in parallel only if ``parallel``."""
        sch = s_tir.Schedule(func)
        infos = normalize_prim_func(sch)
        if infos is None or not all(b.is_injective() for b in infos):
            return None, 0
        # inline chains (expand_dims -> concatenate), keep the blocks that write outputs
        for b in infos:
            _try(sch.compute_inline, b.block_rv)
        works = [self._schedule_block(sch, blk, self.bits, parallel) for blk in _root_blocks(sch)]
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
        lanes = _vector_lanes(sch.get(blk).writes[0].source.dtype, bits)
        inner: list = []
        for lp in reversed(loops):
            if _extent(sch, lp) is None:
                break
            inner.insert(0, lp)
        outer = loops[: len(loops) - len(inner)]
        inner_ext = 1
        for lp in inner:
            inner_ext *= _extent(sch, lp)
        work = inner_ext
        for lp in outer:
            work = work * (_extent(sch, lp) or sch.get(lp).extent)  # an expression for a dynamic extent
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


def default_rules() -> list:
    """The CPU rules in the order they are tried."""
    return [Matmul(), GEMV(), RowReduction(), Injective()]
