"""Sum-of-products analysis shared by the GEMV and Matmul rules."""

from __future__ import annotations

import dataclasses

from tvm import s_tir, tirx
from tvm.s_tir.dlight.analysis import normalize_prim_func
from tvm.s_tir.dlight.analysis.gemv import get_reduction_expr
from .base import index_var, is_const, is_unit_dom, root_blocks, vars_in



# ----------------------------------------------------------------------------- einsum analysis
@dataclasses.dataclass
class Einsum:
    """Roles of a ``C[...] += A[...] * B[...]`` block's iterators (unit iterators left out)."""

    a: int  # read index of the operand without J axes (the vector in a GEMV)
    b: int  # read index of the operand with J axes (the weight)
    s: list  # block iter vars in A, B and C (batch, e.g. heads)
    i: list  # in A and C (rows of A)
    j: list  # in B and C (rows of W / columns of C)
    k: list  # reduction
    b_inner: str  # role of B's innermost non-constant index: "k", "j", "s" or "?"
    b_inner_var: object = None  # that index's block var

    def rebind(self, sch: s_tir.Schedule, block) -> "Einsum":
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


def analyze_einsum(sch: s_tir.Schedule, block) -> Einsum | None:
    stmt = sch.get(block)
    if len(stmt.reads) != 2 or len(stmt.writes) != 1 or get_reduction_expr(stmt) is None:
        return None
    if stmt.init is None or not isinstance(stmt.init, tirx.BufferStore):
        return None
    init = stmt.init.value
    if not (isinstance(init, (tirx.FloatImm, tirx.IntImm)) and float(init.value) == 0.0):
        return None
    r0, r1 = (vars_in(r.region) for r in stmt.reads)
    c = vars_in(stmt.writes[0].region)
    roles: dict = {}
    s, i, j, k = [], [], [], []
    for iv in stmt.iter_vars:
        v = iv.var
        if is_unit_dom(iv.dom.extent):
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
            if is_const(idx.min):
                continue
            var = index_var(idx.min)
            return (roles.get(var, "?"), var) if var is not None else ("?", None)
        return "?", None

    b_role, b_var = inner(stmt.reads[b])
    ein = Einsum(a, b, s, i, j, k, b_role, b_var)
    ein._iter_vars = list(stmt.iter_vars)
    return ein


def word_pack(stmt, k_var) -> int:
    """Codes per word of a packed operand: the smallest c of a read indexed ``[..., k // c]``, else 1."""
    packs = [
        int(idx.min.b.value)
        for r in stmt.reads
        for idx in list(r.region)[-1:]
        if isinstance(idx.min, tirx.FloorDiv) and idx.min.a.same_as(k_var) and isinstance(idx.min.b, tirx.IntImm)
    ]
    return min(packs, default=1)


def loops_by_var(sch: s_tir.Schedule, block) -> dict:
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


def lane_and_reduction_loops(sch: s_tir.Schedule, rf) -> tuple:
    """The loops of an rfactor block's new spatial (lane) iterator and of its reduction."""
    by_var = loops_by_var(sch, rf)
    ivs = sch.get(rf).iter_vars
    lane = by_var[ivs[0].var]  # rfactor puts the new spatial iter first
    red = [by_var[iv.var] for iv in ivs if iv.iter_type == tirx.IterVar.CommReduce][0]
    return lane, red


def main_reduction_block(sch: s_tir.Schedule):
    """The single reduction block of the function after inlining its spatial neighbours, or None."""
    infos = normalize_prim_func(sch)
    if infos is None:
        return None
    reductions = [b for b in infos if b.is_reduction()]
    if len(reductions) != 1:
        return None
    return reductions[0].block_rv


def find_epilogues(sch: s_tir.Schedule, main) -> list | None:
    """Blocks after ``main`` at the root, all injective; None if something else is there."""
    blocks = root_blocks(sch)
    pos = [k for k, b in enumerate(blocks) if sch.get(b).same_as(sch.get(main))][0]
    after = blocks[pos + 1 :]
    for b in after:
        if any(iv.iter_type != tirx.IterVar.DataPar for iv in sch.get(b).iter_vars):
            return None
    return after


def producers_before(sch: s_tir.Schedule, main) -> list:
    blocks = root_blocks(sch)
    pos = [k for k, b in enumerate(blocks) if sch.get(b).same_as(sch.get(main))][0]
    return blocks[:pos]


