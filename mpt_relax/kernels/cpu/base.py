"""Helpers and the base class shared by the CPU schedule rules."""

from __future__ import annotations

import logging

from tvm import s_tir, tirx
from tvm.s_tir import dlight as dl
from tvm.target import Target
from tvm.target.codegen import target_has_features

logger = logging.getLogger(__name__)

PARALLEL_MIN_WORK = 1 << 15  # elements below which a parallel launch costs more than it saves


# ----------------------------------------------------------------------------- helpers
def loop_extent(sch: s_tir.Schedule, loop) -> int | None:
    ext = sch.get(loop).extent
    return int(ext) if isinstance(ext, tirx.IntImm) else None


def is_unit_dom(dom) -> bool:
    return isinstance(dom, tirx.IntImm) and dom.value == 1


def dtype_bits(dtype) -> int:
    return int("".join(c for c in str(dtype) if c.isdigit()) or 32)


def cpu_has(target: Target, features: list[str]) -> bool:
    """Whether ``target`` is a CPU (llvm) target whose instruction sets include every one of
    ``features`` (LLVM names); False for GPU targets and for triples that do not know the names."""
    try:
        return target.kind.name == "llvm" and bool(target_has_features(features, target))
    except Exception:  # pylint: disable=broad-except  # e.g. x86 names on an Arm triple
        return False


def vector_bits(target: Target) -> int:
    """SIMD register width of an LLVM target: 512 (AVX-512), 256 (AVX/AVX2), else 128."""
    if cpu_has(target, ["avx512f"]):
        return 512
    if cpu_has(target, ["avx"]):
        return 256
    return 128


def vector_lanes(dtype, bits: int) -> int:
    return max(bits // dtype_bits(dtype), 1)


def largest_divisor(extent: int, candidates) -> int:
    for c in candidates:
        if c >= 1 and extent % c == 0:
            return c
    return 1


def vars_in(region) -> set:
    out = set()
    for rng in region:
        for v in tirx.analysis.undefined_vars(rng.min):
            out.add(v)
    return out


def index_var(expr):
    """The block var an index is, or None when it is a constant or a composite expression."""
    return expr if isinstance(expr, tirx.Var) else None


def is_const(expr) -> bool:
    return isinstance(expr, tirx.IntImm)


def attempt(fn, *args, **kwargs) -> bool:
    try:
        fn(*args, **kwargs)
        return True
    except Exception:  # pylint: disable=broad-except
        return False


def loop_contains(sch: s_tir.Schedule, outer, block) -> bool:
    """Whether ``block`` is ``outer`` or nested in the loops under ``outer`` (root-level blocks)."""
    target = sch.get(block)
    loops_of = sch.get_loops(block)
    if sch.get(outer).same_as(target):
        return True
    outer_loops = sch.get_loops(outer)
    return bool(outer_loops) and bool(loops_of) and sch.get(outer_loops[0]).same_as(sch.get(loops_of[0]))


def root_blocks(sch: s_tir.Schedule) -> list:
    return list(sch.get_child_blocks(sch.get_sblock("root")))


class Rule(dl.ScheduleRule if hasattr(dl, "ScheduleRule") else dl.base.ScheduleRule):
    """A CPU rule: applies to LLVM targets only and declines instead of raising."""

    bits = 512  # SIMD width of the target being scheduled, set by apply()

    def apply(self, func, target: Target, tunable: bool):  # noqa: D102
        if not isinstance(func, tirx.PrimFunc) or target.kind.name != "llvm":
            return None
        self.bits = vector_bits(target)
        try:
            return self._apply(func, target)
        except Exception as err:  # pylint: disable=broad-except
            logger.debug("%s declined %s: %s", type(self).__name__, func.attrs.get("global_symbol"), err)
            return None

    def _apply(self, func: tirx.PrimFunc, target: Target):
        raise NotImplementedError


def dispatch(cond, then_sch: s_tir.Schedule, else_sch: s_tir.Schedule) -> s_tir.Schedule:
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


def parallel_when_worth_it(schedule) -> s_tir.Schedule | None:
    """``schedule(parallel)`` -> (schedule, elements of work): the parallel schedule where the
    work is statically large, the serial one where it is small, and for a dynamic amount of
    work (e.g. one row per token) one function choosing at run time. A decode step runs
    dozens of one-row kernels: a parallel launch (waking and joining the worker threads) costs
    more than their work, and far more when another process holds a core."""
    sch, work = schedule(True)
    if sch is None or isinstance(work, int):
        return sch if sch is None or work >= PARALLEL_MIN_WORK else schedule(False)[0]
    return dispatch(work < PARALLEL_MIN_WORK, schedule(False)[0], sch)
