"""ALiBi attention over TVM's paged KV cache (mpt_relax.kernels.attention, mpt_relax.compile.kv_cache), on the LLVM target.

Each test compiles a tiny Relax module that creates the cache and runs one attention call per
layer through it, drives the runtime (add / fork / remove sequences, begin / end forward) and
compares every output row against a dense fp64 numpy reference:
scores = q.k * scale + slope_h * (j - i), causal, softmax, @ v.
"""

from __future__ import annotations

import shutil
import subprocess

import numpy as np
import pytest
import tvm
from tvm import relax
from tvm.s_tir import dlight as dl
from tvm.script import tirx as T

from attention_harness import (
    GQA,
    LONG,
    MHA,
    MQA_6,
    NO_ALIBI,
    ODD_HEAD_DIM,
    PAGE,
    TOL,
    TWO_LAYERS,
    AttentionModule,
    Harness,
    cache_vm,
    reference,
    shape_tuples,
)
from mpt_relax.models.mpt.config import MPTConfig
from mpt_relax.compile import targets
from mpt_relax.kernels.attention.common import fast_exp2
from mpt_relax.runtime.kv_state import (
    KVCacheCapacityError,
    PagedKVCacheRuntime,
    bytes_per_page,
    max_total_seq_len_for_pages,
    pages_for_budget,
    pages_to_append,
)

# ---------------------------------------------------------------------------- prefill


@pytest.mark.parametrize(
    "cfg, dtype",
    [(MHA, "float32"), (MQA_6, "float32"), (GQA, "float32"), (MQA_6, "float16"), (GQA, "float16")],
    ids=["mha-fp32", "mqa-6heads-fp32", "gqa-fp32", "mqa-6heads-fp16", "gqa-fp16"],
)
def test_ragged_prefill_and_cached_prefix(cfg, dtype):
    """Fresh sequences across page boundaries, then more tokens on top of cached prefixes."""
    h = Harness(cfg, dtype)
    for seq in range(4):
        h.add(seq)
    h.check([(0, 15), (1, 16), (2, 17), (3, 33)])
    h.check([(2, 16), (0, 1), (3, 31)])  # prefixes 17 / 15 / 33: page-crossing appends
    h.add(4)
    h.check([(1, 5), (4, 20)])  # a prefix-carrying and a fresh sequence in one ragged batch


@pytest.mark.parametrize(
    "cfg, dtype, page",
    [(GQA, "float32", PAGE), (GQA, "float16", PAGE), (MQA_6, "float16", 32), (MHA, "float16", 8), (MHA, "float32", 24),
     (ODD_HEAD_DIM, "float16", PAGE), (ODD_HEAD_DIM, "float32", PAGE)],
    ids=["gqa-fp32", "gqa-fp16", "mqa-fp16-page32", "mha-fp16-page8", "mha-fp32-page24", "hd24-fp16", "hd24-fp32"],
)
def test_decode_batch_of_different_lengths(cfg, dtype, page):
    """The CPU decode kernel scores 16 keys per vector (pages of 8, 24 or 32 keys: partial or
    several steps per page) or, for a head dim that is no multiple of 16, one key at a time."""
    h = Harness(cfg, dtype, page=page)
    for seq, n in enumerate([5, 16, 31, 1, 70]):
        h.add(seq)
    h.check([(0, 5), (1, 16), (2, 31), (3, 1), (4, 70)])
    for _ in range(3):
        h.check([(0, 1), (1, 1), (2, 1), (3, 1), (4, 1)])


def test_remove_and_add_sequences_mid_run():
    h = Harness(MQA_6, "float32", capacity=256)
    free = h.rt.available_pages()
    h.add(0)
    h.add(1)
    h.check([(0, 40), (1, 9)])
    h.check([(0, 1), (1, 1)])
    h.remove(0)
    assert h.rt.available_pages() == free - 1  # only sequence 1's page is still held
    h.add(7)
    h.check([(7, 18), (1, 1)])
    h.check([(1, 1), (7, 1)])


def test_forked_sequence_reads_the_shared_prefix_at_its_positions():
    """A child forked mid-page attends over the parent's blocks (another depth) + its own."""
    h = Harness(MHA, "float32")
    h.add(0)
    h.check([(0, 40)])
    h.fork(0, 1, 21)
    h.check([(1, 6), (0, 2)])
    h.check([(1, 1), (0, 1)])


def test_layers_keep_separate_caches():
    h = Harness(TWO_LAYERS, "float32")
    h.add(0)
    h.add(1)
    h.check([(0, 19), (1, 3)])
    h.check([(0, 1), (1, 1)])


def test_alibi_off_is_plain_causal_attention_with_the_config_scale():
    h = Harness(NO_ALIBI, "float32")
    h.add(0)
    h.add(1)
    h.check([(0, 17), (1, 33)])
    h.check([(0, 1), (1, 1)])


def test_long_context_fp16_at_sampled_rows():
    """8192 tokens prefilled in chunks: sampled rows match the dense reference, no inf/NaN.

    ALiBi reaches -2048 for head 0 here, where fp16 spacing is 2: the bias must stay fp32.
    """
    cfg, dtype, n, chunk = LONG, "float16", 8192, 2048
    vm = cache_vm(cfg, dtype)
    rt = PagedKVCacheRuntime(vm["create_paged_kv_cache"](*shape_tuples(1, n + 16, chunk)), PAGE)
    rng = np.random.default_rng(1)
    q, k, v = (rng.standard_normal((n + 1, heads, cfg.head_dim)).astype(dtype) for heads in (4, 1, 1))
    rt.add_sequence(0)
    outputs = []
    for start in range(0, n + 1, chunk):
        stop = min(start + chunk, n + 1)  # the last "chunk" is a single decode step
        rt.begin_forward([0], [stop - start])
        args = (tvm.runtime.tensor(x[start:stop]) for x in (q, k, v))
        outputs.append(vm["attention_0"](*args, rt.cache).numpy())
        rt.end_forward()
    out = np.concatenate(outputs).astype("float64")
    assert np.isfinite(out).all()
    rows = np.concatenate([rng.choice(n, 48, replace=False), [0, 2047, 2048, 8191, n]])
    expected = reference(cfg, q.astype("float64"), k.astype("float64"), v.astype("float64"), rows)
    np.testing.assert_allclose(out[rows], expected, atol=TOL[dtype], rtol=0)


# ---------------------------------------------------------------------------- capacity


def test_pages_are_taken_per_page_size_tokens_and_given_back():
    h = Harness(MHA, "float32", capacity=10 * PAGE)
    assert h.rt.available_pages() == 11  # ceil(capacity / page_size) + 1
    h.add(0)
    h.add(1)
    h.check([(0, 33), (1, 16)])
    assert h.rt.available_pages() == 11 - 3 - 1
    h.check([(0, 1), (1, 1)])  # 34 still fits in 3 pages; 17 needs a second page
    assert h.rt.available_pages() == 11 - 3 - 2
    h.remove(0)
    assert h.rt.available_pages() == 11 - 2


def test_a_forward_that_cannot_fit_fails_clearly_and_leaves_the_cache_usable():
    h = Harness(MHA, "float32", capacity=4 * PAGE)
    h.add(0)
    h.check([(0, 60)])
    with pytest.raises(KVCacheCapacityError, match=r"needs 2 new KV pages .* only 1 are free"):
        h.rt.begin_forward([0], [PAGE + 5])
    assert h.rt.sequence_length(0) == 60
    h.check([(0, 4)])


def test_pages_to_append():
    assert pages_to_append(0, 16, 16) == 1
    assert pages_to_append(16, 1, 16) == 1
    assert pages_to_append(15, 1, 16) == 0
    assert pages_to_append(17, 32, 16) == 2


def test_pages_for_budget_and_its_error():
    mpt7b = MPTConfig(d_model=4096, n_heads=32, n_layers=32)
    assert bytes_per_page(mpt7b, "float16", 16) == 2 * 32 * 16 * 32 * 128 * 2  # 8 MiB
    assert pages_for_budget(mpt7b, "float16", 16, 10 * 2**30) == 1280
    assert pages_for_budget(mpt7b, "float32", 16, 10 * 2**30) == 640
    assert max_total_seq_len_for_pages(1280, 16) == 1279 * 16
    with pytest.raises(KVCacheCapacityError, match="holds 1 page"):
        pages_for_budget(mpt7b, "float16", 16, 12 * 2**20)


# ---------------------------------------------------------------------------- GPU builds (no GPU here)


def _gpu_build(cfg: MPTConfig, dtype: str, target: tvm.target.Target) -> tvm.runtime.Module:
    """Compile the cache module for a GPU target; the kernels TVM ships unscheduled get dlight's fallback."""
    module = AttentionModule(cfg, dtype, target)
    mod, _ = module.export_tvm(module.spec())
    with target:
        mod = dl.ApplyDefaultSchedule(dl.gpu.Fallback())(relax.transform.LegalizeOps()(mod))
    return tvm.compile(mod, target)


def _device_modules(module: tvm.runtime.Module, kind: str) -> list:
    found = [module] if module.kind == kind else []
    for imported in module.imports:
        found += _device_modules(imported, kind)
    return found


@pytest.mark.parametrize("kind", ["cuda", "metal"])
def test_gpu_kernels_build(kind, tmp_path):
    """GQA fp16 kernels generate for CUDA (sm_80) and Metal; with nvcc present the CUDA source
    must also compile to a cubin (this wheel keeps CUDA as source until it is loaded on a GPU)."""
    target = tvm.target.Target({"kind": "cuda", "arch": "sm_80"} if kind == "cuda" else {"kind": "metal"})
    (device,) = _device_modules(_gpu_build(GQA, "float16", target).mod, kind)
    source = device.inspect_source()
    for kernel in ("alibi_prefill_ragged", "alibi_prefill_paged", "alibi_decode_paged"):
        assert kernel in source
    if kind != "cuda" or shutil.which("nvcc") is None:
        return
    (tmp_path / "kernels.cu").write_text(source)
    result = subprocess.run(
        ["nvcc", "-arch=sm_80", "-cubin", "-o", str(tmp_path / "kernels.cubin"), str(tmp_path / "kernels.cu")],
        capture_output=True, text=True, check=False,
    )
    assert result.returncode == 0, result.stderr[-4000:]


def test_fast_exp2_is_within_an_ulp_and_flushes_masked_keys():
    """The CPU kernels' polynomial exp2 against float64 numpy, vectorized as the kernels use it."""
    n = 1 << 16

    @T.prim_func
    def func(a: T.Buffer((n,), "float32"), b: T.Buffer((n,), "float32")):
        for i0 in T.serial(n // 16):
            for i1 in T.vectorized(16):
                b[i0 * 16 + i1] = fast_exp2(a[i0 * 16 + i1])

    lib = tvm.compile(tvm.IRModule({"main": func.with_attr("global_symbol", "main")}), target=targets.llvm_target().target)
    x = np.concatenate([np.linspace(-126, 127, n - 4), [-1e30, 0.0, -127.0, -300.0]]).astype(np.float32)
    out = tvm.runtime.tensor(np.zeros(n, np.float32))
    lib["main"](tvm.runtime.tensor(x), out)
    got, ref = out.numpy(), np.exp2(x.astype(np.float64))
    normal = ref >= 2.0 ** -126
    assert np.max(np.abs(got[normal] - ref[normal]) / ref[normal]) < 2.4e-7  # 2 ulp
    np.testing.assert_array_equal(got[-4:], [0.0, 1.0, 0.0, 0.0])  # exp2(NEG - max) of a masked key is 0
