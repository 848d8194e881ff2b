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

from mpt_relax.compile import pipeline, targets  # noqa: E402
from mpt_relax.models.mpt.config import MPTConfig  # noqa: E402
from mpt_relax.kernels.cpu import Matmul  # noqa: E402
from mpt_relax.kernels.cpu.base import vector_bits as _vector_bits  # noqa: E402
from mpt_relax.models.mpt.model import MPTForCausalLM  # noqa: E402
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
        pipeline.pipeline(spec)(mod)
    return seen["mod"]


def test_every_heavy_primfunc_is_scheduled():
    """The matmuls, attention and norms of both fp32 and fp16 models get a CPU schedule (for an
    AVX2 CPU: with AVX-512 the prefill matmuls are the vector kernel, with AMX the tile kernel)."""
    for dtype in ("float32", "float16"):
        model = MPTForCausalLM(MPTConfig(**TINY), dtype)
        mod, _ = model.export_tvm(spec=model.export_spec())
        out = _scheduled_module(mod, targets.llvm_target("x86-64-v3"))
        unscheduled = [
            gv.name_hint
            for gv, f in out.functions_items()
            if isinstance(f, tirx.PrimFunc)
            and "tirx.is_scheduled" not in f.attrs
            and not relax.analysis.has_reshape_pattern(f)
        ]
        heavy = [n for n in unscheduled if any(w in n for w in ("matmul", "norm", "softmax", "gelu"))]
        assert not heavy, f"{dtype}: unscheduled {heavy}"
        # the projections over a dynamic row count get Matmul's packed microkernel (prefill) and its
        # run-time switch to GEMV (decode); a rule that fails declines silently, so check the result
        matmuls = {gv.name_hint: f.script() for gv, f in out.functions_items() if "NT_matmul" in gv.name_hint}
        assert matmuls and all("NT_matmul_update" in s and "NT_matmul_rf" in s for s in matmuls.values()), dtype
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
    spec = targets.llvm_target()
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


def _row_sum_then_scale(n):
    """A row reduction (layer-norm shape): y[i, j] = x[i, j] * sum_k x[i, k]."""
    x = te.placeholder((n, 768), "float32", name="x")
    k = te.reduce_axis((0, 768), name="k")
    total = te.compute((n,), lambda i: te.sum(x[i, k], axis=k), name="total")
    return te.create_prim_func([x, te.compute((n, 768), lambda i, j: x[i, j] * total[i], name="y")])


def _add_one(n):
    """An injective kernel over a dynamic number of rows."""
    x = te.placeholder((n, 768), "float32", name="x")
    return te.create_prim_func([x, te.compute((n, 768), lambda i, j: x[i, j] + 1.0, name="y")])


@pytest.mark.parametrize("make, reference", [(_row_sum_then_scale, lambda x: x * x.sum(1, keepdims=True)),
                                             (_add_one, lambda x: x + 1)], ids=["row-reduction", "injective"])
def test_small_dynamic_work_runs_serially(make, reference):
    """Over a dynamic row count, one row (decode) takes a serial branch, many rows a parallel one."""
    spec = targets.llvm_target()
    with spec.target:
        scheduled = dl.ApplyDefaultSchedule(*spec.schedules())(tvm.IRModule({"main": make(tirx.Var("n", "int64"))}))
    script = scheduled["main"].script()
    assert "T.parallel" in script and "< T.int64(32768)" in script
    built = tvm.compile(scheduled, spec.target)
    for rows in (1, 100):  # 768 and 76800 elements: below and above the threshold
        x = np.random.default_rng(rows).standard_normal((rows, 768)).astype("float32")
        y = tvm.runtime.tensor(np.zeros_like(x))
        built(tvm.runtime.tensor(x), y)
        np.testing.assert_allclose(y.numpy(), reference(x), rtol=1e-5, atol=1e-4)

def _group_quant_matmul(n, k_dim, n_out, bits):
    """x [n, K] fp16 @ dequantize(q [N, K*bits/32] uint32, scale [N, K/32] fp16)^T, accumulated in
    fp32: the decode GEMV of a q4f16_1 / q8f16_1 Linear (dequantize inlined as in the model)."""
    pack, max_int = 32 // bits, (1 << (bits - 1)) - 1
    i64 = lambda v: tirx.IntImm("int64", v) if isinstance(v, int) else v  # noqa: E731  (as in the model)
    x = te.placeholder((i64(n), i64(k_dim)), "float16", name="x")
    q = te.placeholder((i64(n_out), i64(k_dim // pack)), "uint32", name="q")
    s = te.placeholder((i64(n_out), i64(k_dim // 32)), "float16", name="s")

    def element(o, i):
        code = (q[o, i // pack] >> (i % pack * bits).astype("uint32")) & tirx.const((1 << bits) - 1, "uint32")
        return (code.astype("float16") - tirx.const(max_int, "float16")) * s[o, i // 32]

    w = te.compute((n_out, k_dim), element, name="dequantize")
    r = te.reduce_axis((0, k_dim), name="r")
    y = te.compute(
        (n, n_out), lambda i, j: te.sum(x[i, r].astype("float32") * w[j, r].astype("float32"), axis=r), name="NT_matmul"
    )
    return te.create_prim_func([x, q, s, y])


@pytest.mark.parametrize("bits", [4, 8], ids=["q4", "q8"])
@pytest.mark.parametrize(
    "rows, k_dim, n_out",
    [(1, 256, 64), (-1, 256, 64), (-5, 256, 64), (1, 96, 37), (-1, 96, 37)],
    ids=["static-1", "dynamic-1", "dynamic-5", "ragged-static-1", "ragged-dynamic-1"],
)
def test_group_quant_gemv(bits, rows, k_dim, n_out):
    """Decode GEMVs of the quantized Linears (int8: vectorised over whole words, x permuted; int4:
    over the codes of a word; blocks of weight rows; ragged sizes fall back) stay exact: same
    fp16 dequantized weights, fp32 accumulation, only the order of the sum changes."""
    m = abs(rows)
    n = tirx.Var("n", "int64") if rows < 0 else m
    func = _group_quant_matmul(n, k_dim, n_out, bits)
    spec = targets.llvm_target()
    with spec.target:
        scheduled = dl.ApplyDefaultSchedule(*spec.schedules())(tvm.IRModule({"main": func}))
    assert "tirx.is_scheduled" in scheduled["main"].attrs
    # the int8 GEMV whose K splits into whole 16-word vectors reads x through the permuted copy
    word_vectors = bits == 8 and k_dim % (4 * 16) == 0 and _vector_bits(spec.target) == 512
    assert ("x_global" in scheduled["main"].script()) == word_vectors
    rng = np.random.default_rng(bits)
    x = rng.standard_normal((m, k_dim)).astype("float16")
    q = rng.integers(0, 2**32, size=(n_out, k_dim * bits // 32), dtype=np.uint64).astype("uint32")
    s = (rng.random((n_out, k_dim // 32)) * 0.1).astype("float16")
    outs = []
    for mod in (scheduled, tvm.IRModule({"main": func})):
        y = tvm.runtime.tensor(np.zeros((m, n_out), "float32"))
        tvm.compile(mod, spec.target)(*(tvm.runtime.tensor(a) for a in (x, q, s)), y)
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
    spec = targets.llvm_target()
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
