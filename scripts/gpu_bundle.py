#!/usr/bin/env python3
"""Prepare everything a bare GPU machine needs to check our CUDA artifacts in one run.

    python scripts/gpu_bundle.py --out /tmp/gpu-bundle --cuda-arch sm_90    # here, with nvcc, no GPU
    python3 /tmp/gpu-bundle/check/gpu_check.py --bundle /tmp/gpu-bundle --report /tmp/report   # there

The GPU machine has Python 3.12 with CUDA torch + transformers, no TVM and no package registry,
and takes at most 64 MiB of files; so the bundle holds only what cannot be made there:

```
manifest.json           the models (config, quantization, parameter names/shapes/dtypes), the
                        run plan (prompt lengths, batch sizes) and the wheels
models/<name>/          one artifact per model, the CUDA library + mpt-config.json, NO weights
                        (gpu_check makes random weights on the GPU and writes them with our writer)
wheels/                 apache-tvm for cp312 minus libtvm_compiler.so (the runtime is ~5 MB of
                        the 100 MB wheel), apache-tvm-ffi and ml_dtypes for cp312
src/mpt_relax/          this package's source
check/                  gpu_check.py and reference.py (the float64 oracle for options HF ignores)
lib/                    libcudart.so.13, which the TVM CUDA runtime links, in case the machine lacks it
```

Models: small parity models in fp32, fp16 and int4/int8 (multi-head with clip_qkv and 6 heads, a
head_dim 128 one, grouped-query attention) with a 4096 context, and the real mpt-7b-instruct shapes in
q4f16_1 and q0f16 (``--q8`` adds q8f16_1) for the speed part.

``--device cpu`` makes a bundle of llvm libraries for tiny models (no 7B shapes, no wheels), so the
same check code runs on this machine: the dry run in tests/tools/test_gpu_bundle.py.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
TVM_PIN = "apache-tvm==0.27.0.post1"
FFI_PIN = "apache-tvm-ffi==0.1.15.post2"
ML_DTYPES_PIN = "ml_dtypes==0.7.0"
WHEEL_PLATFORM = "manylinux_2_28_x86_64"
COMPILER_LIB = "tvm/lib/libtvm_compiler.so"
SIZE_LIMIT = 60 * 2**20  # the device tool carries at most 64 MiB
CUDA_HOST_MCPU = "x86-64-v2"  # host code of the CUDA libraries: runs on any x86-64 server CPU

# Small parity models: HF-style config.json fields (both MptConfig and tests/reference.py read them).
# oracle "hf": transformers' MptForCausalLM; "reference": the float64 re-implementation (HF ignores GQA).
# A quantized build is checked against the oracle on its dequantized weights, in fp16.
PARITY = {
    "mha-h6-clip": dict(oracle="hf", quantizations=["q0f32", "q0f16", "q8f16_1"], config=dict(
        d_model=96, n_heads=6, n_layers=2, vocab_size=256, max_seq_len=4096, attn_config={"clip_qkv": 0.5})),
    "mha-hd128": dict(oracle="hf", quantizations=["q0f32", "q0f16", "q4f16_1"], config=dict(
        d_model=256, n_heads=2, n_layers=2, vocab_size=512, max_seq_len=4096, attn_config={"softmax_scale": 0.1})),
    "gqa-h6-kv2": dict(oracle="reference", quantizations=["q0f32", "q0f16", "q4f16_1"], config=dict(
        d_model=192, n_heads=6, n_layers=2, vocab_size=320, max_seq_len=4096,
        attn_config={"attn_type": "grouped_query_attention", "kv_n_heads": 2, "clip_qkv": 4.0})),
}
# The real model for the speed part (HF-style fields; checked against the preset below).
MPT_7B = dict(d_model=4096, n_heads=32, n_layers=32, vocab_size=50432, max_seq_len=2048, expansion_ratio=4,
              no_bias=True, attn_config={"alibi": True, "alibi_bias_max": 8})
# The CPU dry run's stand-in for it: the same code paths, seconds instead of minutes.
TINY_SPEED = dict(d_model=256, n_heads=4, n_layers=2, vocab_size=2048, max_seq_len=1024, expansion_ratio=4,
                  no_bias=True, attn_config={"alibi": True})

GPU_PLAN = {"decode_batches": [1, 4, 16, 64], "decode_context": 128, "decode_steps": 24,
            "prefill_lengths": [512, 2048], "ttft_prompts": [128, 2048], "long_context": 4096,
            "kv_memory": "24GB", "budget_s": 450}
CPU_PLAN = {"decode_batches": [1, 4], "decode_context": 16, "decode_steps": 4,
            "prefill_lengths": [32, 64], "ttft_prompts": [32], "long_context": 512,
            "kv_memory": "256MB", "budget_s": 300}


def log(msg: str) -> None:
    print(f"[gpu_bundle] {msg}", file=sys.stderr, flush=True)


def hf_config_dict(config: dict) -> dict:
    """A complete HF-style config.json for ``config`` (defaults filled like the tests' factory)."""
    attn = {"attn_pdrop": 0, **config.get("attn_config", {})}
    return {"model_type": "mpt", "architectures": ["MPTForCausalLM"], "expansion_ratio": 4, "no_bias": True,
            **config, "attn_config": attn}


def parameter_table(cfg, quantization: str) -> list[list]:
    """[name, shape, dtype] of every parameter of the exported model, in the entry points' order."""
    from mpt_relax.compile.builder import quantized_model
    from mpt_relax.quantization import get_quantization

    net, _ = quantized_model(cfg, get_quantization(quantization))
    return [[name, [int(s) for s in p.shape], str(p.dtype)] for name, p in net.named_parameters()]


def weightless_checkpoint(path: Path, config: dict) -> Path:
    """config.json + zero tensors of the right shapes: what ``mpt_relax.build`` needs for a
    model that has no preset. The weights are dropped from the artifact afterwards."""
    import numpy as np
    from safetensors.numpy import save_file

    from mpt_relax.models.mpt.config import MPTConfig
    from mpt_relax.models.mpt.model import MPTForCausalLM

    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(config))
    float_net = MPTForCausalLM(MPTConfig.from_json(path), "float32")
    save_file({n: np.zeros([int(s) for s in p.shape], "float32") for n, p in float_net.named_parameters()},
              str(path / "model.safetensors"))
    return path


def strip_weights(art: Path) -> None:
    """Leave the library and mpt-config.json only; has_weights False until gpu_check writes them."""
    for f in list(art.glob("params_shard_*.bin")) + [art / "tensor-cache.json"]:
        f.unlink(missing_ok=True)
    meta_path = art / "mpt-config.json"
    meta = json.loads(meta_path.read_text())
    meta["has_weights"] = False
    meta["source"] = None
    meta_path.write_text(json.dumps(meta, indent=2, sort_keys=True))


def build_model(out: Path, name: str, role: str, oracle: str | None, config: dict, quantization: str,
                target: str, cuda_arch: str | None, mcpu: str | None, work: Path, preset_name: str | None = None) -> dict:
    """Compile one weightless artifact into ``out/models/<name>``; returns its manifest entry."""
    import mpt_relax
    from mpt_relax.models.mpt.config import MPTConfig, preset

    hf_config = hf_config_dict(config)
    cfg = MPTConfig.from_dict(hf_config)
    if preset_name is not None:
        expected = preset(preset_name).replace(prompt_template=None).to_dict()
        if cfg.to_dict() != expected:
            raise SystemExit(f"the HF config of {name} drifted from the preset {preset_name}: {cfg} vs {expected}")
        source: str | Path = preset_name
        dist_root = work / "no-checkpoints"  # nothing under it: the preset builds without weights
    else:
        source = weightless_checkpoint(work / name / name.rsplit("-", 1)[0], hf_config)  # names the library
        dist_root = work
    art = out / "models" / name
    t0 = time.perf_counter()
    mpt_relax.build(source, target=target, quantization=quantization, output=art, cuda_arch=cuda_arch, mcpu=mcpu,
                    dist_root=dist_root, force=True, quiet=True)
    strip_weights(art)
    seconds = time.perf_counter() - t0
    size = sum(f.stat().st_size for f in art.rglob("*") if f.is_file())
    log(f"{name}: {target} {quantization} built in {seconds:.1f}s, {size / 2**20:.2f} MiB")
    return {"name": name, "role": role, "oracle": oracle, "quantization": quantization, "hf_config": hf_config,
            "artifact": f"models/{name}", "params": parameter_table(cfg, quantization),
            "seed": int(hashlib.sha256(name.encode()).hexdigest()[:6], 16), "build_s": round(seconds, 1)}


# ---------------------------------------------------------------------------- wheels


def _record_line(name: str, data: bytes) -> str:
    digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
    return f"{name},sha256={digest},{len(data)}"


def runtime_only_wheel(src: Path, out_dir: Path) -> Path:
    """Copy of the apache-tvm wheel without libtvm_compiler.so (RECORD rewritten to match)."""
    dst = out_dir / src.name
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w", zipfile.ZIP_DEFLATED, compresslevel=9) as zout:
        record_name = next(n for n in zin.namelist() if n.endswith(".dist-info/RECORD"))
        lines = []
        for item in zin.infolist():
            if item.filename == COMPILER_LIB or item.filename == record_name:
                continue
            data = zin.read(item)
            zout.writestr(item, data, compress_type=zipfile.ZIP_DEFLATED, compresslevel=9)
            lines.append(_record_line(item.filename, data))
        lines.append(f"{record_name},,")
        zout.writestr(record_name, "\n".join(lines) + "\n")
    names = zipfile.ZipFile(dst).namelist()
    if COMPILER_LIB in names or "tvm/lib/libtvm_runtime.so" not in names:
        raise SystemExit(f"{dst}: the runtime-only wheel is malformed")
    return dst


def fetch_wheels(out: Path, wheel_cache: Path) -> list[dict]:
    """Download the cp312 wheels (cached in ``wheel_cache``) and put their runtime forms in out/wheels."""
    wheel_cache.mkdir(parents=True, exist_ok=True)
    wheels = out / "wheels"
    wheels.mkdir(parents=True, exist_ok=True)
    entries = []
    for pin in (TVM_PIN, FFI_PIN, ML_DTYPES_PIN):
        dist = pin.split("==")[0].replace("-", "_")
        found = sorted(wheel_cache.glob(f"{dist}-{pin.split('==')[1]}-*.whl"))
        if not found:
            log(f"pip download {pin} (cp312, {WHEEL_PLATFORM})")
            subprocess.run([sys.executable, "-m", "pip", "download", pin, "--python-version", "3.12",
                            "--only-binary=:all:", "--no-deps", "--platform", WHEEL_PLATFORM, "-d", str(wheel_cache),
                            "-q"], check=True)
            found = sorted(wheel_cache.glob(f"{dist}-{pin.split('==')[1]}-*.whl"))
        if not found:
            raise SystemExit(f"pip download {pin} left no wheel in {wheel_cache}")
        if dist == "apache_tvm":
            path = runtime_only_wheel(found[0], wheels)
        else:
            path = wheels / found[0].name
            shutil.copy2(found[0], path)
        entries.append({"pin": pin, "file": f"wheels/{path.name}", "bytes": path.stat().st_size,
                        "optional": dist == "ml_dtypes"})
        log(f"wheel {path.name}: {path.stat().st_size / 2**20:.1f} MiB")
    return entries


def copy_cudart(out: Path) -> str | None:
    """libcudart.so.13 (linked by libtvm_runtime_cuda.so) from this machine's CUDA, if found."""
    for root in (os.environ.get("CUDA_HOME"), "/usr/local/cuda", "/usr/local/cuda-13.0"):
        if root:
            for sub in ("lib64", "lib", "targets/x86_64-linux/lib"):
                lib = Path(root) / sub / "libcudart.so.13"
                if lib.is_file():
                    (out / "lib").mkdir(exist_ok=True)
                    shutil.copy2(lib.resolve(), out / "lib" / "libcudart.so.13")
                    return "lib/libcudart.so.13"
    log("libcudart.so.13 not found here: the bundle relies on the GPU machine's CUDA runtime")
    return None


def copy_sources(out: Path) -> None:
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    shutil.copytree(REPO / "mpt_relax", out / "src" / "mpt_relax", ignore=ignore)
    (out / "check").mkdir()
    shutil.copy2(REPO / "scripts" / "gpu_check.py", out / "check" / "gpu_check.py")
    shutil.copy2(REPO / "tests" / "reference.py", out / "check" / "reference.py")


def bundle_size(out: Path) -> int:
    return sum(f.stat().st_size for f in out.rglob("*") if f.is_file())


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="bundle directory (replaced)")
    p.add_argument("--cuda-arch", default="sm_90", help="GPU architecture of the CUDA libraries (default sm_90)")
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda",
                   help="cpu: llvm libraries of tiny models, no 7B shapes, no wheels (the dry run)")
    p.add_argument("--q8", action="store_true", help="also the 7B shapes in q8f16_1")
    p.add_argument("--no-7b", action="store_true", help="leave out the mpt-7b-instruct shapes")
    p.add_argument("--no-wheels", action="store_true", help="leave out the TVM wheels (implied by --device cpu)")
    p.add_argument("--wheel-cache", default=str(REPO / "build" / "wheels"),
                   help="where downloaded wheels are kept between runs (default build/wheels)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    t_start = time.perf_counter()
    out = Path(args.out).resolve()
    if out.exists():
        shutil.rmtree(out)
    (out / "models").mkdir(parents=True)
    cpu = args.device == "cpu"
    target = "llvm" if cpu else "cuda"
    mcpu = None if cpu else CUDA_HOST_MCPU
    arch = None if cpu else args.cuda_arch
    models = []
    with tempfile.TemporaryDirectory(prefix="gpu-bundle-") as tmp:
        work = Path(tmp)
        parity = {"mha-h6-clip": ["q0f32"], "gqa-h6-kv2": ["q4f16_1"]} if cpu else {
            n: spec["quantizations"] for n, spec in PARITY.items()}
        for name, quants in parity.items():
            spec = PARITY[name]
            config = {**spec["config"], "max_seq_len": CPU_PLAN["long_context"]} if cpu else spec["config"]
            for quant in quants:
                models.append(build_model(out, f"{name}-{quant}", "parity", spec["oracle"], config, quant, target,
                                          arch, mcpu, work))
        if cpu:
            models.append(build_model(out, "tiny-speed-q4f16_1", "speed", None, TINY_SPEED, "q4f16_1", target,
                                      arch, mcpu, work))
        elif not args.no_7b:
            quants = ["q4f16_1", "q0f16"] + (["q8f16_1"] if args.q8 else [])
            for quant in quants:
                models.append(build_model(out, f"mpt-7b-instruct-{quant}", "speed", None, MPT_7B, quant, target,
                                          arch, mcpu, work, preset_name="mpt-7b-instruct"))
    wheels = [] if cpu or args.no_wheels else fetch_wheels(out, Path(args.wheel_cache))
    cudart = None if cpu else copy_cudart(out)
    copy_sources(out)
    import tvm

    manifest = {
        "device": args.device, "target": target, "cuda_arch": arch, "host_mcpu": mcpu,
        "tvm_version": tvm.__version__, "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "plan": CPU_PLAN if cpu else GPU_PLAN, "hf_speed_config": hf_config_dict(TINY_SPEED if cpu else MPT_7B),
        "models": models, "wheels": wheels, "cudart": cudart,
    }
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1))
    size = bundle_size(out)
    seconds = time.perf_counter() - t_start
    print(f"bundle {out}: {len(models)} models, {size / 2**20:.1f} MiB, built in {seconds:.0f}s")
    if size > SIZE_LIMIT:
        print(f"bundle is larger than {SIZE_LIMIT / 2**20:.0f} MiB: the device tool will not carry it", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
