"""Dry run of the GPU check on this CPU: scripts/gpu_bundle.py --device cpu (llvm libraries of
tiny models), then scripts/gpu_check.py over that bundle, so that the code the GPU machine runs
(runtime-only import, weights written by our writer, parity checks, speed measurements, HF
comparison, report) has run before it gets there."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def _script(name: str):
    spec = importlib.util.spec_from_file_location(name, REPO / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_runtime_only_wheel_drops_the_compiler(tmp_path):
    bundle = _script("gpu_bundle")
    src = tmp_path / "in" / "apache_tvm-0.0-py3-none-any.whl"
    src.parent.mkdir()
    with zipfile.ZipFile(src, "w") as zf:
        zf.writestr("tvm/__init__.py", "")
        zf.writestr("tvm/lib/libtvm_runtime.so", b"runtime")
        zf.writestr(bundle.COMPILER_LIB, b"compiler" * 100)
        zf.writestr("apache_tvm-0.0.dist-info/RECORD", f"{bundle.COMPILER_LIB},sha256=x,800\n")
    (tmp_path / "out").mkdir()
    out = bundle.runtime_only_wheel(src, tmp_path / "out")
    with zipfile.ZipFile(out) as zf:
        names = zf.namelist()
        record = zf.read("apache_tvm-0.0.dist-info/RECORD").decode()
    assert bundle.COMPILER_LIB not in names and "tvm/lib/libtvm_runtime.so" in names
    assert bundle.COMPILER_LIB not in record
    assert "tvm/lib/libtvm_runtime.so,sha256=" in record


def test_bundle_and_check_dry_run_on_cpu(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO), "TVM_NUM_THREADS": os.environ.get("TVM_NUM_THREADS", "1")}
    bundle, report = tmp_path / "bundle", tmp_path / "report"
    made = subprocess.run([sys.executable, str(REPO / "scripts" / "gpu_bundle.py"), "--out", str(bundle),
                           "--device", "cpu"], env=env, capture_output=True, text=True, timeout=600)
    assert made.returncode == 0, made.stderr[-4000:]
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert {m["role"] for m in manifest["models"]} == {"parity", "speed"}
    assert not list(bundle.rglob("params_shard_*")), "the bundle must not carry weights"
    assert (bundle / "src" / "mpt_relax" / "runtime" / "engine.py").is_file()

    checked = subprocess.run([sys.executable, str(bundle / "check" / "gpu_check.py"), "--bundle", str(bundle),
                              "--report", str(report)], env=env, capture_output=True, text=True, timeout=900)
    summary = json.loads((report / "report.json").read_text())
    print(checked.stdout[-6000:])
    failed = {p["part"]: p.get("errors") or [c for c in p["checks"] if not c["ok"]]
              for p in summary["parts"] if p["status"] != "ok"}
    assert not failed, failed
    assert checked.returncode == 0
    parts = [p["part"] for p in summary["parts"]]
    assert parts == ["env", "parity:all", "speed:tiny-speed-q4f16_1", "speed:hf"]
    checks = {(c["model"], c["check"].split(" (")[0]) for p in summary["parts"] for c in p["checks"]}
    for model in ("mha-h6-clip-q0f32", "gqa-h6-kv2-q4f16_1"):
        assert sum(m == model for m, _ in checks) == 6, checks
    rows = [r for p in summary["parts"] for r in p["figures"].get("speed", [])]
    engines = {r["engine"] for r in rows}
    assert engines == {"ours-q4f16_1", "hf-fp32"}
    plan = manifest["plan"]
    assert len(rows) == 2 * (len(plan["decode_batches"]) + len(plan["prefill_lengths"]))
    assert all(r["tokens_per_s"] > 0 and 0 < r["fraction_of_bound"] for r in rows)
    text = (report / "report.md").read_text()
    assert "## Speed" in text and "## Checks" in text and "**NO**" not in text

    # out of time: the parts that no longer fit are skipped and reported
    short = subprocess.run([sys.executable, str(bundle / "check" / "gpu_check.py"), "--bundle", str(bundle),
                            "--report", str(tmp_path / "short"), "--budget", "10", "--only", "env", "speed"],
                           env=env, capture_output=True, text=True, timeout=300)
    assert short.returncode == 1
    cut = json.loads((tmp_path / "short" / "report.json").read_text())["parts"]
    assert [p["part"] for p in cut] == ["env", "speed:tiny-speed-q4f16_1", "speed:hf"]
    assert {p["status"] for p in cut} == {"skipped"}
    assert "skipped" in (tmp_path / "short" / "report.md").read_text()


def test_gpu_check_quantizer_matches_the_library():
    """gpu_check quantizes in torch (the library's quantizer needs TVM's compiler): same bits."""
    import numpy as np
    import torch

    from mpt_relax.quantization import get_quantization
    from mpt_relax.quantization.group import dequantize_weight, quantize_weight

    check = _script("gpu_check")
    w = torch.randn(48, 256, generator=torch.Generator().manual_seed(0)) * 0.7
    w[3, :32] = 0.0  # an all-zero group
    for name, bits in (("q4f16_1", 4), ("q8f16_1", 8)):
        q = get_quantization(name)
        ref = quantize_weight(w.numpy(), q)
        words, scale, deq = check.group_quantize(w, bits)
        np.testing.assert_array_equal(words.numpy().view(np.uint32), ref["q_weight"])
        np.testing.assert_array_equal(scale.numpy(), ref["q_scale"])
        np.testing.assert_array_equal(deq.numpy(), dequantize_weight(ref["q_weight"], ref["q_scale"], q, w.shape))

