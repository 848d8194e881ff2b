"""The package's architecture rules, checked on the source: the run-time side never imports the
compiler, the kernels or the quantizer (it must run on TVM's runtime-only library)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import mpt_relax
from mpt_relax.compile import targets
from mpt_relax.targets import TARGET_TABLE

PACKAGE = Path(mpt_relax.__file__).parent
RUNTIME_ROOTS = ("mpt_relax.runtime", "mpt_relax.serve", "mpt_relax.io.artifact")
COMPILE_SIDE = ("mpt_relax.compile", "mpt_relax.kernels", "mpt_relax.quantization", "mpt_relax.models.mpt.model",
                "mpt_relax.models.mpt.loader", "tvm.relax.frontend", "tvm.s_tir", "tvm.script")


MPT_COMPILE_SIDE = tuple(m for m in COMPILE_SIDE if m.startswith("mpt_relax"))  # TVM's own: its full build imports them


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(p): p for p in PACKAGE.rglob("*.py")}


def _imports(name: str) -> set[str]:
    """Modules ``name`` imports at its top level or inside functions (all of them: any may run)."""
    path = MODULES[name]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                pkg = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
                pkg = ".".join(pkg.split(".")[: len(pkg.split(".")) - node.level + 1])
                base = f"{pkg}.{base}" if base else pkg
            found.add(base)
            found.update(f"{base}.{a.name}" for a in node.names if f"{base}.{a.name}" in MODULES)
    return found


def _reachable(roots) -> dict[str, str]:
    """Every module reachable from the roots' imports -> the module that first imported it."""
    seen, todo = {}, [m for m in MODULES if m.startswith(roots)]
    for m in todo:
        seen.setdefault(m, "(root)")
    while todo:
        mod = todo.pop()
        for dep in _imports(mod):
            parents = [".".join(dep.split(".")[:i]) for i in range(2, dep.count(".") + 2)]
            for d in [p for p in parents if p in MODULES and p != "mpt_relax"] + [dep]:
                if d not in seen:
                    seen[d] = mod
                    if d in MODULES:
                        todo.append(d)
    return seen


def test_runtime_never_imports_the_compiler_or_the_kernels():
    reached = _reachable(RUNTIME_ROOTS)
    assert "mpt_relax.runtime.engine" in reached and "mpt_relax.runtime.generation" in reached
    bad = {m: via for m, via in reached.items() if m.startswith(COMPILE_SIDE)}
    assert not bad, f"run-time modules import compile-side ones (module <- importer): {bad}"


def test_import_mpt_relax_loads_no_compile_side_module():
    code = ("import sys, mpt_relax; eng = mpt_relax.Engine; "
            "print(sorted(m for m in sys.modules if m.startswith(%r)))" % (MPT_COMPILE_SIDE,))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]", out
    assert callable(mpt_relax.build) and issubclass(mpt_relax.TargetError, mpt_relax.MPTRelaxError)  # lazy names resolve


def test_every_target_row_has_a_build_recipe_and_one_spelling():
    assert [t.name for t in TARGET_TABLE] == list(targets.RECIPES)
    assert targets.resolve_target("cpu").name == "llvm"


def test_every_error_derives_from_the_base_class():
    errors = []
    for name, path in MODULES.items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ClassDef) and node.name.endswith("Error"):
                errors.append((name, node.name))
    import importlib

    classes = [getattr(importlib.import_module(m), c) for m, c in errors]
    assert len(classes) >= 10
    assert all(issubclass(c, mpt_relax.MPTRelaxError) for c in classes), classes


def test_no_module_over_500_lines():
    long = {n: len(p.read_text().splitlines()) for n, p in MODULES.items() if len(p.read_text().splitlines()) > 500}
    assert not long, long
