"""The IRModule of the real MPT-7B / MPT-30B shapes, without weights."""

from __future__ import annotations

import time

import pytest

import mpt_relax


@pytest.mark.parametrize("name, d_model, layers", [("mpt-7b-instruct", 4096, 32), ("mpt-30b", 7168, 48)])
def test_export_real_shapes_builds_and_prints(name, d_model, layers):
    t0 = time.perf_counter()
    mod = mpt_relax.export_irmodule(mpt_relax.preset(name))
    text = mod.script()
    elapsed = time.perf_counter() - t0
    print(f"{name}: export + print {elapsed:.1f}s, {len(text) / 1e6:.1f} MB of TVMScript")
    assert {gv.name_hint for gv in mod.get_global_vars()} >= {"prefill", "decode", "extend", "prefill_logits"}
    assert f"transformer_blocks_{layers - 1}_attn_Wqkv_weight" in text
    assert f"R.Tensor((50432, {d_model}), dtype=\"float32\")" in text
    assert elapsed < 120  # "in seconds": generous bound for a loaded 2-core machine
