"""Target -> Relax pass pipeline -> dlight schedules -> compiled executable.

Every target shares one pipeline; a target differs only in its schedule list and its
export step (see :class:`TargetSpec`).
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import tvm
from tvm import relax
from tvm.s_tir import dlight as dl

from . import cpu_schedules


class TargetError(ValueError):
    """A target that this TVM build cannot compile for; the message says what to use instead."""


@dataclasses.dataclass(frozen=True)
class TargetSpec:
    """How one kind of device is compiled for: its TVM target, schedules and library suffix."""

    name: str  # llvm | cuda | metal | vulkan
    target: tvm.target.Target
    schedules: Callable[[], list]  # dlight rules, tried in order on each unscheduled PrimFunc
    suffix: str  # file suffix of the exported library


def _cpu_schedules() -> list:
    return cpu_schedules.default_rules()


def llvm_target(mcpu: str | None = None) -> TargetSpec:
    """The host CPU; ``mcpu`` defaults to the build machine's own CPU."""
    host = {"kind": "llvm", "mcpu": mcpu or tvm.target.codegen.llvm_get_system_cpu()}
    return TargetSpec("llvm", tvm.target.Target(host), _cpu_schedules, ".so")


def resolve_target(name: str) -> TargetSpec:
    """A TargetSpec by name; raises :class:`TargetError` for unknown names."""
    if name == "llvm" or name == "cpu":
        return llvm_target()
    raise TargetError(f"unknown target {name!r}; choose one of: llvm")


def pipeline(spec: TargetSpec) -> tvm.transform.Pass:
    """Legalize, fuse, schedule with dlight, plan memory and lower for the VM."""
    passes = [
        relax.transform.DecomposeOpsForInference(),
        relax.transform.FuseTransposeMatmul(),  # x @ W^T as one NT matmul: no weight transposes at run time
        relax.transform.LegalizeOps(),
        relax.transform.AnnotateTIROpPattern(),
        relax.transform.FoldConstant(),
        relax.transform.FuseOps(),
        relax.transform.FuseTIR(),
        relax.transform.DeadCodeElimination(),
        dl.ApplyDefaultSchedule(*spec.schedules()),
        relax.transform.RewriteDataflowReshape(),
        relax.transform.ToNonDataflow(),
        relax.transform.RemovePurityChecking(),
        relax.transform.CallTIRRewrite(),
        relax.transform.StaticPlanBlockMemory(),
        relax.transform.LowerAllocTensor(),
        relax.transform.KillAfterLastUse(),
        relax.transform.LowerRuntimeBuiltin(),
        relax.transform.ComputePrimValue(),
        relax.transform.VMShapeLower(),
        relax.transform.AttachGlobalSymbol(),
    ]

    @tvm.transform.module_pass(opt_level=0, name="mpt_relax_pipeline")
    def _run(mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        with spec.target:
            return tvm.transform.Sequential(passes)(mod)

    return _run


def compile_module(mod: tvm.IRModule, spec: TargetSpec) -> relax.VMExecutable:
    """Compile an exported model IRModule for one target."""
    return tvm.compile(mod, spec.target, relax_pipeline=pipeline(spec))
