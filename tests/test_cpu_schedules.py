"""The CPU schedules: every heavy PrimFunc of the model gets one, and a scheduled
dequantize + matmul (the quantized Linear) matches the unscheduled one.

Whole-model numerics of the scheduled build are checked against HF and the independent
reference in test_parity_*.py (including ragged sizes that no vector width divides).
"""

from __future__ import annotations

import os

os.environ.setdefault("TVM_NUM_THREADS", "2")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import tvm  # noqa: E402
from tvm import relax, te, tirx  # noqa: E402
from tvm.s_tir import dlight as dl  # noqa: E402

from mpt_relax import compiler  # noqa: E402
from mpt_relax.config import MPTConfig  # noqa: E402
from mpt_relax.cpu_schedules import Matmul  # noqa: E402
from mpt_relax.model import MPTForCausalLM  # noqa: E402
from mpt_relax.quantization import GroupQuantLinear, get_quantization  # noqa: E402

TINY = dict(d_model=64, n_heads=4, n_layers=2, vocab_size=320, max_seq_len=64)


def _scheduled_module(mod, spec):
    """The IRModule right after the pipeline's ApplyDefaultSchedule pass."""
    seen = {}

    @tvm.instrument.pass_instrument
    class Capture:
        def run_after_pass(self, m, info):
            if info.name == "ApplyDefaultSchedule":
                seen["mod"] = m

    with tvm.transform.PassContext(instruments=[Capture()]):
        compiler.pipeline(spec)(mod)
    return seen["mod"]


def test_every_heavy_primfunc_is_scheduled():
    """The matmuls, attention and norms of both fp32 and fp16 models get a CPU schedule."""
    for dtype in ("float32", "float16"):
        model = MPTForCausalLM(MPTConfig(**TINY), dtype)
        mod, _ = model.export_tvm(spec=model.export_spec())
        out = _scheduled_module(mod, compiler.llvm_target())
        unscheduled = [
            gv.name_hint
            for gv, f in out.functions_items()
            if isinstance(f, tirx.PrimFunc)
            and "tirx.is_scheduled" not in f.attrs
            and not relax.analysis.has_reshape_pattern(f)
        ]
        heavy = [n for n in unscheduled if any(w in n for w in ("matmul", "norm", "softmax", "gelu"))]
        assert not heavy, f"{dtype}: unscheduled {heavy}"
        # no weight transposes survive FuseTransposeMatmul (the LM head included)
        names = [gv.name_hint for gv, f in out.functions_items() if isinstance(f, tirx.PrimFunc)]
        # (the paged cache's own "kv_cache_transpose_append" kernel writes K/V into pages)
        assert not [n for n in names if "transpose" in n and "kv_cache" not in n], names
        assert any(n.startswith("NT_matmul") for n in names)


def _dequant_matmul(n, k_dim, n_out, group=32):
    """x [n, K] fp32 @ dequantize(q [N, K/8] uint32 of int4, scale [N, K/group] fp32)^T."""
    x = te.placeholder((n, k_dim), "float32", name="x")
    q = te.placeholder((n_out, k_dim // 8), "uint32", name="q")
    s = te.placeholder((n_out, k_dim // group), "float32", name="s")
    w = te.compute(
        (n_out, k_dim),
        lambda j, k: ((q[j, k // 8] >> ((k % 8) * 4).astype("uint32")) & tirx.const(15, "uint32")).astype("float32")
        * s[j, k // group]
        - tirx.const(7.0, "float32") * s[j, k // group],
        name="dequantize",
    )
    r = te.reduce_axis((0, k_dim), name="r")
    y = te.compute((n, n_out), lambda i, j: te.sum(x[i, r] * w[j, r], axis=r), name="NT_matmul")
    return te.create_prim_func([x, q, s, y])


@pytest.mark.parametrize("rows", [1, 11, 37], ids=["static-1", "dynamic-11", "dynamic-37"])
def test_dequantize_matmul_primfunc(rows):
    """A fused dequantize + NT matmul (the quantized Linear) is scheduled and stays exact."""
    n = tirx.Var("n", "int64") if rows > 1 else 1
    func = _dequant_matmul(n, 128, 96)
    spec = compiler.llvm_target()
    mod = tvm.IRModule({"main": func})
    with spec.target:
        scheduled = dl.ApplyDefaultSchedule(*spec.schedules())(tvm.IRModule({"main": func}))
    assert "tirx.is_scheduled" in scheduled["main"].attrs
    rng = np.random.default_rng(0)
    m = rows
    x = rng.standard_normal((m, 128)).astype("float32")
    q = rng.integers(0, 2**32, size=(96, 16), dtype=np.uint64).astype("uint32")
    s = rng.random((96, 4)).astype("float32")
    outs = []
    for built in (tvm.compile(scheduled, spec.target), tvm.compile(mod, spec.target)):
        y = tvm.runtime.tensor(np.zeros((m, 96), "float32"))
        built(tvm.runtime.tensor(x), tvm.runtime.tensor(q), tvm.runtime.tensor(s), y)
        outs.append(y.numpy())
    np.testing.assert_allclose(outs[0], outs[1], rtol=1e-5, atol=1e-4)


def _fp16_matmul(n, k_dim, n_out, weight):
    """The fp16 model's Linear: x [n, K] fp16 @ W^T, products and sums in fp32 (output fp32).

    W is an fp16 parameter (``q0f16``) or the real dequantize of a quantized one (``q4f16_1``...).
    """
    x = te.placeholder((n, k_dim), "float16", name="x")
    if weight == "q0f16":
        w = te.placeholder((n_out, k_dim), "float16", name="w")
        params = [w]
    else:
        q = get_quantization(weight)
        q_weight = te.placeholder(q.q_weight_shape(n_out, k_dim), "uint32", name="q_weight")
        q_scale = te.placeholder(q.q_scale_shape(n_out, k_dim), "float16", name="q_scale")
        w = GroupQuantLinear(k_dim, n_out, q, bias=False)._dequantize(q_weight, q_scale)
        params = [q_weight, q_scale]
    r = te.reduce_axis((0, k_dim), name="r")
    y = te.compute(
        (n, n_out), lambda i, j: te.sum(x[i, r].astype("float32") * w[j, r].astype("float32"), axis=r), name="NT_matmul"
    )
    return te.create_prim_func([x, *params, y])


@pytest.mark.parametrize("weight", ["q0f16", "q8f16_1", "q4f16_1"])
@pytest.mark.parametrize("rows", [16, 37, 48], ids=["dynamic-16", "dynamic-37", "static-48"])
def test_matmul_fp16_operands(weight, rows):
    """Matmul packs fp16 / dequantized weights (and x) as fp32 for an fp32-only microkernel.

    Each element is cast once, so the result matches the unscheduled function's.
    """
    k_dim, n_out = 128, 96
    n = rows if rows == 48 else tirx.Var("n", "int64")
    func = _fp16_matmul(n, k_dim, n_out, weight)
    spec = compiler.llvm_target()
    with spec.target:
        sch = Matmul().apply(func, spec.target, False)
    assert sch is not None
    update = sch.get(sch.get_sblock("NT_matmul_update"))  # the microkernel's block
    assert [str(r.source.dtype) for r in update.reads] == ["float32"] * 3
    rng = np.random.default_rng(1)
    args = [(rng.standard_normal((rows, k_dim))).astype("float16")]
    for p in func.params[1:-1]:
        shape = [int(d) for d in p.shape]
        if p.dtype == "uint32":
            args.append(rng.integers(0, 2**32, size=shape, dtype=np.uint64).astype("uint32"))
        else:
            args.append((rng.random(shape) * 0.1).astype("float16"))
    outs = []
    for built in (tvm.compile(sch.mod, spec.target), tvm.compile(tvm.IRModule({"main": func}), spec.target)):
        y = tvm.runtime.tensor(np.zeros((rows, n_out), "float32"))
        built(*[tvm.runtime.tensor(a) for a in args], y)
        outs.append(y.numpy())
    np.testing.assert_allclose(outs[0], outs[1], rtol=1e-6, atol=1e-6)
