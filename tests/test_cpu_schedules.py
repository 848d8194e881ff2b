"""The CPU schedules change speed, not results: scheduled builds match unscheduled ones.

Tiny random models only (d_model 64, 2 layers): every entry point of the scheduled build
(``compiler.compile_module``) against ``tvm.compile`` with TVM's default CPU pipeline, which
schedules nothing; and a dequantize + matmul PrimFunc like the quantized Linear layers emit.
"""

from __future__ import annotations

import os

os.environ.setdefault("TVM_NUM_THREADS", "2")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import tvm  # noqa: E402
from tvm import relax, te, tirx  # noqa: E402
from tvm.s_tir import dlight as dl  # noqa: E402
from tvm.target.codegen import target_has_features  # noqa: E402

from mpt_relax import compiler  # noqa: E402
from mpt_relax.config import MPTConfig  # noqa: E402
from mpt_relax.model import MPTForCausalLM  # noqa: E402

TINY = dict(d_model=64, n_heads=4, n_layers=2, vocab_size=320, max_seq_len=64)


def _params(specs, dtype, rng):
    out = []
    for name, p in specs:
        shape = [int(s) for s in p.shape]
        if "norm" in name:
            a = 1.0 + 0.1 * rng.standard_normal(shape)
        else:
            a = rng.standard_normal(shape) * (0.5 / np.sqrt(shape[-1]) if len(shape) > 1 else 0.1)
        out.append(a.astype(dtype))
    return out


def _run_all(ex, params_np, ids, dtype):
    """Logits of every entry point (prefill, decode, extend, prefill_logits) as numpy arrays."""
    dev = tvm.cpu()
    vm = relax.VirtualMachine(ex, dev)
    params = [tvm.runtime.tensor(p, dev) for p in params_np]
    tensor = lambda a: tvm.runtime.tensor(a, dev)  # noqa: E731
    out = {}
    # 20 and 33 rows take Matmul's packed branch, 5 rows its GEMV branch (dynamic n < 16)
    logits, k, v = vm["prefill"](tensor(ids[:20]), params)
    out["prefill"] = logits.numpy()
    logits, k, v = vm["decode"](tensor(ids[20:21]), k, v, params)
    out["decode"] = logits.numpy()
    logits, k, v = vm["extend"](tensor(ids[21:26]), k, v, params)
    out["extend"] = logits.numpy()
    out["k_cache"] = k.numpy().astype("float32")
    out["prefill_logits"] = vm["prefill_logits"](tensor(ids[:33]), params).numpy()
    return out


# ragged sizes (nothing a multiple of the vector width), GQA, biases, clip_qkv, qk LayerNorm,
# learned positions instead of ALiBi: the rules must decline or degrade, never miscompile
ODD = dict(d_model=40, n_heads=4, kv_n_heads=2, n_layers=2, vocab_size=203, max_seq_len=64, no_bias=False,
           clip_qkv=4.0, qk_ln=True, alibi=False, expansion_ratio=3.0)


@pytest.mark.parametrize(
    "dtype,cfg,mcpu",
    [("float32", TINY, None), ("float16", TINY, None), ("float32", ODD, "haswell")],  # haswell: 256-bit AVX2 path
    ids=["f32", "f16", "odd-avx2"],
)
def test_scheduled_model_matches_unscheduled(dtype, cfg, mcpu):
    if mcpu and not target_has_features("avx2", compiler.llvm_target().target):
        pytest.skip("host cannot run AVX2 code")
    cfg = MPTConfig(**cfg)
    model = MPTForCausalLM(cfg, dtype)
    mod, specs = model.export_tvm(spec=model.export_spec())
    spec = compiler.llvm_target(mcpu)
    rng = np.random.default_rng(0)
    params = _params(specs, dtype, rng)
    ids = rng.integers(0, cfg.vocab_size, size=40).astype("int32")

    scheduled = compiler.compile_module(mod, spec)
    reference = tvm.compile(mod, spec.target)
    got = _run_all(scheduled, params, ids, dtype)
    want = _run_all(reference, params, ids, dtype)

    # fp32: only the summation order differs; fp16: rounding of fp16 partial sums differs too
    tol = 2e-5 if dtype == "float32" else 2e-2
    for name in want:
        scale = max(float(np.abs(want[name]).max()), 1.0)
        np.testing.assert_allclose(got[name], want[name], rtol=0, atol=tol * scale, err_msg=name)


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
        heavy = [n for n in unscheduled if any(w in n for w in ("matmul", "scores", "attn_pv", "norm", "softmax"))]
        assert not heavy, f"{dtype}: unscheduled {heavy}"
        # no weight transposes survive FuseTransposeMatmul (the LM head included)
        names = [gv.name_hint for gv, f in out.functions_items() if isinstance(f, tirx.PrimFunc)]
        assert not [n for n in names if "transpose" in n], names
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
