"""The exported IRModule: real MPT-7B / MPT-30B shapes without weights, and its cache kernels."""

from __future__ import annotations

import time

import pytest
import tvm
import tvm_ffi
from tvm.s_tir import dlight as dl

import mpt_relax
from mpt_relax.compile import targets
from mpt_relax.compile.kv_cache import dispatch_kv_cache


@pytest.mark.slow
@pytest.mark.parametrize("name, d_model, layers", [("mpt-7b-instruct", 4096, 32), ("mpt-30b", 7168, 48)])
def test_export_real_shapes_builds_and_prints(name, d_model, layers):
    t0 = time.perf_counter()
    mod = mpt_relax.export_irmodule(mpt_relax.preset(name))
    text = mod.script()
    elapsed = time.perf_counter() - t0
    print(f"{name}: export + print {elapsed:.1f}s, {len(text) / 1e6:.1f} MB of TVMScript")
    assert {gv.name_hint for gv in mod.get_global_vars()} >= {"create_paged_kv_cache", "prefill", "batch_decode"}
    assert f"transformer_blocks_{layers - 1}_attn_Wqkv_weight" in text
    assert f"R.Tensor((50432, {d_model}), dtype=\"float32\")" in text
    assert "mpt_relax.create_alibi_paged_kv_cache" in text and "alibi_prefill" not in text  # target-free


@pytest.mark.parametrize("target", ["llvm"])
def test_scheduled_cache_kernels_pass_dlight_unchanged(target):
    """The paged-cache kernels arrive scheduled (marked ``tirx.is_scheduled``): the target's
    dlight rules in the compiler pipeline must leave them exactly as they are."""
    spec = targets.resolve_target(target)
    cfg = mpt_relax.MPTConfig(d_model=64, n_heads=4, n_layers=1, vocab_size=256)
    mod = mpt_relax.export_irmodule(cfg, target=spec.target)
    with spec.target:
        scheduled = dl.ApplyDefaultSchedule(*spec.schedules())(mod)
    marked = [gv.name_hint for gv, f in mod.functions.items()
              if isinstance(f, tvm.tirx.PrimFunc) and f.attrs is not None and f.attrs.get("tirx.is_scheduled")]
    for kernel in ("alibi_prefill_ragged", "alibi_prefill_paged", "alibi_decode_paged"):
        assert any(name.startswith(kernel) for name in marked), kernel
    for name in marked:
        assert tvm_ffi.structural_equal(mod[name], scheduled[name]), name


def test_one_export_serves_every_target(monkeypatch, tmp_path):
    """A build constructs and exports the model once; each target's pipeline adds its own kernels."""
    from factory import hf_checkpoint

    from mpt_relax.compile import builder
    from mpt_relax.models.mpt.model import MPTForCausalLM

    counts = {"init": 0, "export": 0}
    init, export = MPTForCausalLM.__init__, MPTForCausalLM.export_tvm

    def counted_init(self, *args, **kwargs):
        counts["init"] += 1
        init(self, *args, **kwargs)

    def counted_export(self, *args, **kwargs):
        counts["export"] += 1
        return export(self, *args, **kwargs)

    monkeypatch.setattr(MPTForCausalLM, "__init__", counted_init)
    monkeypatch.setattr(MPTForCausalLM, "export_tvm", counted_export)
    path = tmp_path / "ckpt"
    hf_checkpoint(path, d_model=32, n_heads=2, n_layers=1, vocab_size=64)
    builder.build(path, target=["llvm", "cuda", "metal"], quantization="q4f16_1", output=tmp_path / "art", quiet=True)
    assert counts == {"init": 1, "export": 1}

    generic = mpt_relax.export_irmodule(mpt_relax.MPTConfig(d_model=64, n_heads=4, n_layers=1, vocab_size=256))
    names = {gv.name_hint for gv in generic.get_global_vars()}
    assert not any(n.startswith("alibi_") for n in names)
    for target, kernel in (("llvm", "alibi_decode_paged_cpu"), ("cuda", "alibi_decode_paged")):
        spec = targets.resolve_target(target)
        dispatched = dispatch_kv_cache(spec.target)(generic)
        found = {gv.name_hint for gv in dispatched.get_global_vars()}
        assert kernel in {n.rstrip("0123456789_") for n in found} or kernel in found, sorted(found)
