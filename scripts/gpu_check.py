#!/usr/bin/env python3
"""Run our CUDA artifacts on a GPU once: parity with Hugging Face, speed, one report.

    python3 check/gpu_check.py --bundle DIR --report REPORT_DIR      # on the GPU machine
    python scripts/gpu_check.py --bundle DIR --report REPORT_DIR     # a bundle made with --device cpu

``DIR`` is made by scripts/gpu_bundle.py. Needs only Python 3.12 with torch (CUDA) and
transformers: the runtime-only TVM wheels of the bundle are unpacked into a temporary site
directory and the bundle's mpt_relax source is put on the path, with ``TVM_USE_RUNTIME_LIB=1``.

Parts, each in its own process with its own time limit (a CUDA fault poisons a process's
context, so one failing part cannot take the others down), within an overall ``--budget``:

- ``env``: versions, the GPU, copy bandwidth (TVM device-to-device copy) and fp16 GEMM rate (torch).
- ``parity:<model>``: random weights made on the device with torch (fixed seed), written with
  ``mpt_relax.io.artifact.write_params``, loaded by ``mpt_relax.Engine``; checked against HF
  ``MptForCausalLM`` on the same device (tests/reference.py for grouped-query attention, which HF
  ignores): logits (fp32 within 1e-4 of the largest |logit|, fp16 within 2e-2), prefill + decode
  == a fresh prefill, 32 greedy tokens, a ragged batch == single runs, a long (4096) context.
- ``speed:<model>``: the 7B shapes with random weights handed to the engine from torch through
  DLPack (writing 4-13 GB to disk and back would eat the time limit): decode tokens/s at each
  batch size and prefill tokens/s at each prompt length, each as a fraction of its bound (decode:
  bytes read per step / the copy bandwidth; prefill: flops / the measured GEMM rate); time to
  first token.
- ``speed:hf``: the same figures for HF ``MptForCausalLM`` in fp16 on the same device.

Writes ``report.json`` and ``report.md`` into REPORT_DIR after every part (a run cut short keeps
what it measured), and ``parts/<part>.json`` with each part's details; prints progress.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import glob
import importlib.util
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
import zipfile
from pathlib import Path

PART_TIMEOUT_S = {"env": 90, "parity": 150, "speed": 180}
MIN_PART_S = 15  # a part with less time left than this is skipped


def say(tag: str, msg: str) -> None:
    print(f"[gpu_check {time.strftime('%H:%M:%S')}] {tag}: {msg}", flush=True)


# ============================================================================ orchestrator


def install_runtime(bundle: Path, manifest: dict, site: Path) -> dict:
    """Unpack the bundle's wheels into ``site`` (ml_dtypes only where the machine lacks it)."""
    installed = []
    for wheel in manifest.get("wheels", []):
        if wheel.get("optional") and importlib.util.find_spec("ml_dtypes") is not None:
            continue
        with zipfile.ZipFile(bundle / wheel["file"]) as zf:
            zf.extractall(site)
        installed.append(Path(wheel["file"]).name)
    for lib in site.rglob("*.so*"):
        lib.chmod(0o755)  # zip entries lose the executable bit
    if (site / "tvm" / "lib" / "libtvm_compiler.so").exists():
        raise RuntimeError("the bundle's TVM wheel still holds libtvm_compiler.so")
    return {"site": str(site), "wheels": installed}


def child_env(bundle: Path, site: Path | None) -> dict:
    env = dict(os.environ)
    paths = ([str(site)] if site else []) + [str(bundle / "src"), str(bundle / "check")]
    env["PYTHONPATH"] = os.pathsep.join(paths + [p for p in [os.environ.get("PYTHONPATH")] if p])
    env["TVM_USE_RUNTIME_LIB"] = "1"  # never the compiler, even where a full TVM is installed
    env["TVM_FFI_DISABLE_TORCH_C_DLPACK"] = "1"  # no JIT build of tvm-ffi's torch addon at import
    if importlib.util.find_spec("cuda") is None and shutil.which("nvcc"):
        env.setdefault("TVM_CUDA_COMPILE_MODE", "nvcc")  # kernels not in the bundle: nvcc, as NVRTC is missing
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


def parity_group(entry: dict, manifest: dict) -> str:
    """Parity models run one process per config (its fp32 and fp16 builds); all in one on a CPU."""
    return "all" if manifest["device"] == "cpu" else entry["name"].rsplit("-", 1)[0]


def plan_parts(manifest: dict) -> list[str]:
    parity = []
    for m in manifest["models"]:
        if m["role"] == "parity" and parity_group(m, manifest) not in parity:
            parity.append(parity_group(m, manifest))
    speed = [m["name"] for m in manifest["models"] if m["role"] == "speed"]
    parts = ["env"] + [f"parity:{p}" for p in parity]
    if speed:
        parts += [f"speed:{speed[0]}", "speed:hf"] + [f"speed:{s}" for s in speed[1:]]
    return parts


def run_part(part: str, args, env: dict, timeout: float) -> dict:
    """Run one part in a child process; its result file, or a failure record."""
    result_path = Path(args.report) / "parts" / f"{part.replace(':', '_')}.json"
    result_path.unlink(missing_ok=True)
    cmd = [sys.executable, str(Path(__file__).resolve()), "--bundle", args.bundle, "--report", args.report,
           "--device", args.device, "--part", part, "--result", str(result_path)]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, start_new_session=True)
    try:
        rc = proc.wait(timeout=timeout)
        status = None if rc == 0 else f"exited with status {rc}"
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        status = f"timed out after {timeout:.0f}s"
    seconds = time.perf_counter() - t0
    try:
        result = json.loads(result_path.read_text())
    except (OSError, json.JSONDecodeError):
        result = {"part": part, "checks": [], "figures": {}, "errors": []}
    result["seconds"] = round(seconds, 1)
    if status is not None:
        result["errors"].append({"where": "process", "error": status})
    failed_checks = [c for c in result.get("checks", []) if not c.get("ok")]
    result["status"] = "error" if result["errors"] else ("mismatch" if failed_checks else "ok")
    return result


def orchestrate(args) -> int:
    bundle = Path(args.bundle).resolve()
    args.bundle = str(bundle)
    report = Path(args.report).resolve()
    args.report = str(report)
    (report / "parts").mkdir(parents=True, exist_ok=True)
    manifest = json.loads((bundle / "manifest.json").read_text())
    args.device = args.device or ("cpu" if manifest["device"] == "cpu" else "cuda")
    budget = args.budget or manifest["plan"]["budget_s"]
    t_start = time.perf_counter()
    summary = {"bundle": str(bundle), "device": args.device, "manifest_created": manifest.get("created"),
               "budget_s": budget, "parts": []}
    site_dir = None
    if manifest.get("wheels"):
        site_dir = Path(tempfile.mkdtemp(prefix="gpu-check-site-"))
        try:
            summary["install"] = install_runtime(bundle, manifest, site_dir)
            say("install", f"runtime-only TVM unpacked into {site_dir}")
        except Exception as err:  # noqa: BLE001 - reported, the parts then fail on import
            summary["install"] = {"error": f"{type(err).__name__}: {err}"}
            say("install", f"FAILED: {err}")
    env = child_env(bundle, site_dir)
    parts = plan_parts(manifest)
    if args.only:
        parts = [p for p in parts if any(p.startswith(o) for o in args.only)]
    say("plan", f"{len(parts)} parts in at most {budget}s: {', '.join(parts)}")
    for part in parts:
        left = budget - (time.perf_counter() - t_start)
        limit = min(PART_TIMEOUT_S[part.split(':')[0]], left)
        if limit < MIN_PART_S:
            summary["parts"].append({"part": part, "status": "skipped", "errors": [
                {"where": "budget", "error": f"only {left:.0f}s of the budget left"}], "checks": [], "figures": {}})
            say(part, "skipped: out of time")
            continue
        say(part, f"start (limit {limit:.0f}s)")
        try:
            result = run_part(part, args, env, limit)
        except Exception as err:  # noqa: BLE001 - the next part still runs
            result = {"part": part, "status": "error", "checks": [], "figures": {},
                      "errors": [{"where": "orchestrator", "error": f"{type(err).__name__}: {err}"}]}
        summary["parts"].append(result)
        say(part, f"{result['status']} in {result.get('seconds')}s")
        summary["total_s"] = round(time.perf_counter() - t_start, 1)
        write_report(report, summary)
    if site_dir is not None:
        shutil.rmtree(site_dir, ignore_errors=True)
    summary["total_s"] = round(time.perf_counter() - t_start, 1)
    write_report(report, summary)
    print((report / "report.md").read_text(), flush=True)  # also in the log, in case the files do not come back
    statuses = [p["status"] for p in summary["parts"]]
    say("done", f"{statuses.count('ok')}/{len(statuses)} parts ok in {summary['total_s']}s; report in {report}")
    return 0 if all(s == "ok" for s in statuses) else 1


# ---------------------------------------------------------------------------- report


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}" if abs(v) < 1e5 else f"{v:.0f}"
    return "" if v is None else str(v)


def write_report(report: Path, summary: dict) -> None:
    (report / "report.json").write_text(json.dumps(summary, indent=1))
    lines = [f"# GPU check: {summary['device']}", "",
             f"bundle made {summary.get('manifest_created')}, total {summary.get('total_s')}s of {summary['budget_s']}s", ""]
    lines += ["| part | status | seconds |", "|---|---|---|"]
    lines += [f"| {p['part']} | {p['status']} | {_fmt(p.get('seconds'))} |" for p in summary["parts"]]
    for p in summary["parts"]:
        env = p.get("figures", {}).get("env")
        if env:
            lines += ["", "## Environment", ""] + [f"- {k}: {_fmt(v)}" for k, v in env.items()]
    checks = [(p["part"], c) for p in summary["parts"] for c in p.get("checks", [])]
    if checks:
        lines += ["", "## Checks", "", "| model | check | value | limit | ok |", "|---|---|---|---|---|"]
        lines += [f"| {c['model']} | {c['check']} | {_fmt(c['value'])} | {_fmt(c.get('limit'))} | "
                  f"{'yes' if c['ok'] else '**NO**'} |" for _, c in checks]
    rows = [r for p in summary["parts"] for r in p.get("figures", {}).get("speed", [])]
    if rows:
        hf = {(r["metric"], r["size"]): r["tokens_per_s"] for r in rows if r["engine"].startswith("hf-")}
        lines += ["", "## Speed", "", "decode: bound = copy bandwidth / bytes read per step (weights + KV cache); "
                  "prefill: bound = the measured fp16 GEMM rate / matmul flops per token (at that length, "
                  "weights are read once for all tokens, so bandwidth does not bound it)", "",
                  "| engine | metric | batch / tokens | tok/s | bound tok/s | fraction of bound | vs HF |",
                  "|---|---|---|---|---|---|---|"]
        for r in rows:
            base = hf.get((r["metric"], r["size"]))
            ratio = r["tokens_per_s"] / base if base and not r["engine"].startswith("hf-") else None
            lines.append(f"| {r['engine']} | {r['metric']} | {r['size']} | {_fmt(r['tokens_per_s'])} | "
                         f"{_fmt(r.get('bound_tokens_per_s'))} | {_fmt(r.get('fraction_of_bound'))} | {_fmt(ratio)} |")
    ttft = [(p["part"], t) for p in summary["parts"] for t in p.get("figures", {}).get("ttft", [])]
    if ttft:
        lines += ["", "## Time to first token", "", "| engine | prompt tokens | seconds |", "|---|---|---|"]
        lines += [f"| {t['engine']} | {t['prompt_tokens']} | {_fmt(t['seconds'])} |" for _, t in ttft]
    errors = [(p["part"], e) for p in summary["parts"] for e in p.get("errors", [])]
    if errors:
        lines += ["", "## Errors", ""]
        lines += [f"- {part} / {e['where']}: {e['error'].splitlines()[-1] if e['error'] else ''}" for part, e in errors]
    (report / "report.md").write_text("\n".join(lines) + "\n")


# ============================================================================ parts (child processes)


class Recorder:
    """A part's results, saved to its JSON file after every change."""

    def __init__(self, path: Path, part: str):
        self.path = path
        self.data = {"part": part, "checks": [], "figures": {}, "errors": []}
        self.part = part
        self.save()

    def save(self) -> None:
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.data, indent=1, default=float))
        os.replace(tmp, self.path)

    def check(self, model: str, name: str, value, limit=None, ok: bool | None = None, **extra) -> None:
        if ok is None:
            ok = bool(value is not None and math.isfinite(value) and value <= limit)
        self.data["checks"].append({"model": model, "check": name, "value": value, "limit": limit, "ok": ok, **extra})
        self.save()
        say(self.part, f"{model} {name}: {_fmt(value)} (limit {_fmt(limit)}) {'ok' if ok else 'FAILED'}")

    def add(self, key: str, row) -> None:
        self.data["figures"].setdefault(key, []).append(row)
        self.save()

    def set(self, key: str, value) -> None:
        self.data["figures"][key] = value
        self.save()

    @contextlib.contextmanager
    def guard(self, where: str):
        """Record an exception and carry on with the next step."""
        try:
            yield
        except Exception:  # noqa: BLE001 - every failure is reported, none stops the part
            tb = traceback.format_exc()
            self.data["errors"].append({"where": where, "error": tb[-3000:]})
            self.save()
            say(self.part, f"{where} FAILED: {tb.strip().splitlines()[-1]}")


def preload_cudart(bundle: Path) -> str:
    """Make libcudart.so.13 (needed by libtvm_runtime_cuda.so) loadable: the system's, a pip
    nvidia package's, or the bundle's copy."""
    candidates = ["libcudart.so.13"]
    for entry in sys.path:
        candidates += sorted(glob.glob(os.path.join(entry, "nvidia", "*", "lib", "libcudart.so.13")))
    candidates.append(str(bundle / "lib" / "libcudart.so.13"))
    for cand in candidates:
        try:
            ctypes.CDLL(cand, mode=ctypes.RTLD_GLOBAL)
            return cand
        except OSError:
            continue
    return "not found"


def cuda_driver_version() -> str:
    """The driver's CUDA version (TVM's runtime links libcudart.so.13: it needs 13.0 or newer)."""
    try:
        version = ctypes.c_int()
        ctypes.CDLL("libcuda.so.1").cuDriverGetVersion(ctypes.byref(version))
        return f"{version.value // 1000}.{version.value % 1000 // 10}"
    except (OSError, AttributeError) as err:
        return f"unknown ({err})"


def rel_err(a, ref) -> float:
    import numpy as np

    a, ref = np.asarray(a, dtype=np.float64), np.asarray(ref, dtype=np.float64)
    if not np.isfinite(a).all():
        return float("inf")
    return float(np.abs(a - ref).max() / np.abs(ref).max())


def sync(device: str) -> None:
    import torch

    if device == "cuda":
        torch.cuda.synchronize()


def torch_device(device: str):
    import torch

    return torch.device("cuda:0" if device == "cuda" else "cpu")


def gemm_rate(device: str) -> float:
    """Best fp16 (CUDA) / fp32 (CPU) matmul rate in flop/s: the prefill compute bound."""
    import torch

    n, dtype = (8192, torch.float16) if device == "cuda" else (512, torch.float32)
    a = torch.randn(n, n, device=torch_device(device), dtype=dtype)
    best = float("inf")
    for _ in range(6):
        sync(device)
        t0 = time.perf_counter()
        a @ a
        sync(device)
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best


def copy_bandwidth(device: str) -> float:
    import tvm

    from mpt_relax.tools import bandwidth

    if device == "cuda":
        from mpt_relax.runtime.tvm_backends import ensure_device_runtime

        ensure_device_runtime("cuda")
        return bandwidth.device_copy_bandwidth(tvm.cuda(0))
    return bandwidth.host_copy_bandwidth(threads=int(os.environ.get("TVM_NUM_THREADS", "1")), nbytes=64 * 2**20)


def part_env(rec: Recorder, manifest: dict, device: str, bundle: Path) -> None:
    info = {"python": sys.version.split()[0], "cudart": rec.data.get("cudart"), "nvcc": shutil.which("nvcc"),
            "cuda_bindings": importlib.util.find_spec("cuda") is not None}
    with rec.guard("torch"):
        import torch
        import transformers

        info.update(torch=torch.__version__, transformers=transformers.__version__)
        if device == "cuda":
            info["cuda_driver"] = cuda_driver_version()
            props = torch.cuda.get_device_properties(0)
            info.update(gpu=props.name, gpu_memory_gib=round(props.total_memory / 2**30, 1),
                        torch_cuda=torch.version.cuda, capability=f"sm_{props.major}{props.minor}")
        rec.set("env", info)
    with rec.guard("tvm"):
        import tvm
        from tvm import base

        info.update(tvm=tvm.__version__, tvm_path=str(Path(tvm.__file__).parent), runtime_only=bool(base._RUNTIME_ONLY))
        if device == "cuda":
            from mpt_relax.runtime.tvm_backends import ensure_device_runtime

            info["tvm_cuda_runtime_error"] = ensure_device_runtime("cuda")  # TVM skips it without the compiler
            dev = tvm.cuda(0)
            info.update(tvm_sees_gpu=bool(dev.exist), tvm_compute_version=dev.compute_version if dev.exist else None)
        rec.set("env", info)
        rec.check("tvm", "runtime only", float(base._RUNTIME_ONLY), 1.0, ok=bool(base._RUNTIME_ONLY))
    with rec.guard("bandwidth"):
        info["copy_bandwidth_GBps"] = copy_bandwidth(device) / 1e9
        rec.set("env", info)
    with rec.guard("gemm"):
        info["gemm_tflops"] = gemm_rate(device) / 1e12
        rec.set("env", info)


# ---------------------------------------------------------------------------- weights


def _random_tensor(name: str, shape, gen):
    """Norm weights near 1, embedding rows of norm 2, other matrices with a std large enough that
    greedy decoding of a random model does not collapse to one repeated token."""
    import torch

    if "norm" in name or "_ln." in name:
        return 1.0 + 0.1 * torch.randn(shape, generator=gen, device=gen.device)
    if name.endswith(("wte.weight", "wpe.weight")) or name == "lm_head.weight":
        t = torch.randn(shape, generator=gen, device=gen.device)
        return t / t.norm(dim=-1, keepdim=True) * 2.0
    if name.endswith(".bias"):
        return 0.1 * torch.randn(shape, generator=gen, device=gen.device)
    return 2.4 * torch.randn(shape, generator=gen, device=gen.device) / shape[-1] ** 0.5


def group_quantize(w, bits: int, group_size: int = 32):
    """float32 [out, in] -> (q_weight as int32 [out, in*bits/32], q_scale fp16 [out, in/group],
    the dequantized float32 weight): the q4f16_1 / q8f16_1 scheme of mpt_relax.quantization.group
    (see its docstring), redone in torch because that module needs TVM's compiler."""
    import torch

    max_int = 2 ** (bits - 1) - 1
    rows, cols = w.shape
    groups = w.reshape(rows, cols // group_size, group_size)
    scale = (groups.abs().amax(-1) / max_int).to(torch.float16)
    s = scale.float().unsqueeze(-1)
    codes = torch.where(s > 0, torch.round(groups / torch.where(s > 0, s, 1.0)), 0.0).clamp(-max_int, max_int)
    pack = 32 // bits
    unsigned = (codes + max_int).to(torch.int64).reshape(rows, cols // pack, pack)
    words = (unsigned << torch.arange(0, 32, bits, device=w.device, dtype=torch.int64)).sum(-1)
    words = torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)  # the uint32 bits, as int32
    return words, scale, (codes * s).reshape(rows, cols)


def make_weights(entry: dict, device: str) -> tuple[dict, dict]:
    """(the artifact's params by name, in their dtypes (uint32 held as int32), the float32
    checkpoint weights the oracle runs), random on the device with the model's fixed seed."""
    import torch

    gen = torch.Generator(device=torch_device(device)).manual_seed(entry["seed"])
    table = {name: (shape, dtype) for name, shape, dtype in entry["params"]}
    bits = {"q4f16_1": 4, "q8f16_1": 8}.get(entry["quantization"])
    params, master = {}, {}
    for name, (shape, dtype) in table.items():
        if name.endswith(".q_scale"):
            continue
        if name.endswith(".q_weight"):
            base = name.removesuffix(".q_weight")
            scale_shape = table[base + ".q_scale"][0]
            w = _random_tensor(base + ".weight", [shape[0], scale_shape[1] * 32], gen)
            params[name], params[base + ".q_scale"], master[base + ".weight"] = group_quantize(w, bits)
        else:
            master[name] = _random_tensor(name, shape, gen)
            params[name] = master[name].to(getattr(torch, dtype))
    return params, master


def write_artifact(bundle: Path, entry: dict, params: dict, work: Path) -> Path:
    """A copy of the weightless artifact with ``params`` written by our own writer."""
    import numpy as np

    from mpt_relax.io import artifact

    art = work / entry["name"]
    shutil.copytree(bundle / entry["artifact"], art)
    dtypes = {name: dtype for name, _, dtype in entry["params"]}
    order = [name for name, _, _ in entry["params"]]

    def arrays():
        for name in order:
            array = params[name].cpu().numpy()
            yield name, array.view(np.uint32) if dtypes[name] == "uint32" else array

    artifact.write_params(art, arrays())
    meta = artifact.read_config(art)
    meta["has_weights"] = True
    artifact.write_config(art, meta)
    return art


class Oracle:
    """HF MptForCausalLM (or tests/reference.py) on the same weights and device."""

    def __init__(self, entry: dict, state: dict, device: str, half: bool):
        import torch

        self.kind, self.device, self.half = entry["oracle"], device, half
        self.config = entry["hf_config"]
        dtype = torch.float16 if half else torch.float32
        weights = {k: v.to(dtype) for k, v in state.items()}
        if self.kind == "hf":
            from transformers import MptConfig, MptForCausalLM

            cfg = {k: v for k, v in self.config.items() if k not in ("model_type", "architectures")}
            model = MptForCausalLM(MptConfig(**cfg)).eval()
            model.load_state_dict(weights, strict=False)
            model.tie_weights()
            self.model = model.to(device=torch_device(device), dtype=dtype)
        else:
            self.state = {k: v.to(torch.float64) for k, v in weights.items()}  # fp16-rounded weights, fp64 math

    def logits(self, ids):
        import reference
        import torch

        with torch.no_grad():
            if self.kind == "hf":
                x = torch.tensor([list(map(int, ids))], device=torch_device(self.device))
                return self.model(x).logits[0].float().cpu().numpy()
            with torch.device(torch_device(self.device)):
                return reference.logits(self.config, self.state, [int(i) for i in ids]).cpu().numpy()

    def greedy(self, ids, steps: int) -> list[int]:
        import numpy as np
        import torch

        if self.kind == "hf":
            x = torch.tensor([list(map(int, ids))], device=torch_device(self.device))
            with torch.no_grad():
                out = self.model.generate(x, max_new_tokens=steps, min_new_tokens=steps, do_sample=False,
                                          pad_token_id=0, eos_token_id=None)
            return out[0, len(ids):].tolist()
        seq = [int(i) for i in ids]
        for _ in range(steps):
            seq.append(int(np.argmax(self.logits(seq)[-1])))
        return seq[len(ids):]


def our_greedy(eng, ids, steps: int) -> list[int]:
    import numpy as np

    seq = eng.add_sequence()
    try:
        logits = eng.forward([seq], [list(map(int, ids))])[0]
        tokens = []
        for _ in range(steps):
            tokens.append(int(np.argmax(logits)))
            if len(tokens) < steps:
                logits = eng.forward([seq], [[tokens[-1]]])[0]
        return tokens
    finally:
        eng.remove_sequence(seq)


def parity_model(rec: Recorder, bundle: Path, entry: dict, plan: dict, device: str, work: Path) -> None:
    import numpy as np

    import mpt_relax

    name, half = entry["name"], entry["quantization"] != "q0f32"
    tol = 2e-2 if half else 1e-4  # the CPU tests' tolerances (tests/models/test_parity_hf.py)
    step_tol = 2e-2 if half else 1e-5
    vocab = entry["hf_config"]["vocab_size"]
    rng = np.random.default_rng(entry["seed"])
    eng, oracle = None, None
    with rec.guard(f"{name} setup"):
        t0 = time.perf_counter()
        params, master = make_weights(entry, device)
        art = write_artifact(bundle, entry, params, work)
        eng = mpt_relax.Engine(art, device=device, max_batch_size=8, kv_memory="512MB")
        oracle = Oracle(entry, master, device, half)  # a quantized model: on its dequantized weights
        say(rec.part, f"{name}: weights written and loaded in {time.perf_counter() - t0:.1f}s")
    if eng is None or oracle is None:
        return
    with rec.guard(f"{name} logits"):
        worst = max(rel_err(eng.logits(ids), oracle.logits(ids))
                    for ids in (rng.integers(0, vocab, n) for n in (1, 2, 7, 33, 100)))
        rec.check(name, f"logits vs {oracle.kind}", worst, tol)
    with rec.guard(f"{name} prefill+decode"):
        ids = rng.integers(0, vocab, 40)
        full = eng.logits(ids)
        seq = eng.add_sequence()
        errs = [rel_err(eng.forward([seq], [ids[:20].tolist()])[0], full[19]),
                rel_err(eng.forward([seq], [ids[20:24].tolist()])[0], full[23])]
        errs += [rel_err(eng.forward([seq], [[int(ids[i])]])[0], full[i]) for i in range(24, 40)]
        eng.remove_sequence(seq)
        rec.check(name, "prefill + decode vs fresh prefill", max(errs), step_tol)
    with rec.guard(f"{name} greedy"):
        prompt, steps = [5, 17, 99, 3], 32 if not half else 16
        ours, theirs = our_greedy(eng, prompt, steps), oracle.greedy(prompt, steps)
        same = next((i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b), len(ours))
        rec.check(name, f"{steps} greedy tokens equal to {oracle.kind} (first difference at; "
                  f"{len(set(ours))} distinct)", float(same), float(steps), ok=same == steps, ours=ours, theirs=theirs)
    with rec.guard(f"{name} ragged batch"):
        prompts = [rng.integers(0, vocab, n).tolist() for n in (3, 17, 40)]
        seqs = [eng.add_sequence() for _ in prompts]
        batch = eng.forward(seqs, prompts)
        nxt = [[int(np.argmax(row))] for row in batch]
        batch_step = eng.forward(seqs, nxt)
        for s in seqs:
            eng.remove_sequence(s)
        errs = []
        for b, p in enumerate(prompts):
            single = eng.logits(p + nxt[b])
            errs += [rel_err(batch[b], single[-2]), rel_err(batch_step[b], single[-1])]
        rec.check(name, "ragged batch (3, 17, 40 tokens) + batched decode vs single runs", max(errs), step_tol)
    with rec.guard(f"{name} long context"):
        n = min(plan["long_context"], eng.context_window)
        ids = rng.integers(0, vocab, n)
        t0 = time.perf_counter()
        ours = eng.logits(ids)
        seconds = time.perf_counter() - t0
        rec.check(name, f"{n}-token context: logits finite", float(np.isfinite(ours).all()), 1.0,
                  ok=bool(np.isfinite(ours).all()), seconds=seconds)
        ref = oracle.logits(ids)
        rec.check(name, f"{n}-token context: last 64 rows vs {oracle.kind}", rel_err(ours[-64:], ref[-64:]), tol)
    del eng, oracle


def part_parity(rec: Recorder, manifest: dict, bundle: Path, device: str, group: str) -> None:
    work = Path(tempfile.mkdtemp(prefix="gpu-check-art-"))
    try:
        for entry in manifest["models"]:
            if entry["role"] == "parity" and parity_group(entry, manifest) == group:
                parity_model(rec, bundle, entry, manifest["plan"], device, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)


# ---------------------------------------------------------------------------- speed


def speed_tensors(entry: dict, device: str) -> dict:
    """Random weights on the device for the speed run (values do not change the speed):
    floats ~N(0, 0.02) (norms 1), packed codes uniform, scales that give the same std."""
    import torch

    dev = torch_device(device)
    gen = torch.Generator(device=dev).manual_seed(entry["seed"])
    bits = {"q4f16_1": 4, "q8f16_1": 8}.get(entry["quantization"])
    tensors = {}
    for name, shape, dtype in entry["params"]:
        if dtype == "uint32":
            t = torch.randint(-2**31, 2**31 - 1, shape, generator=gen, device=dev, dtype=torch.int32).view(torch.uint32)
        elif name.endswith("q_scale"):
            code_std = 2 ** bits / 12**0.5
            t = torch.full(shape, 0.02 / code_std, device=dev, dtype=getattr(torch, dtype))
        elif "norm" in name:
            t = torch.ones(shape, device=dev, dtype=getattr(torch, dtype))
        else:
            t = (0.02 * torch.randn(shape, generator=gen, device=dev)).to(getattr(torch, dtype))
        tensors[name] = t
    return tensors


def dlpack_engine(art: Path, tensors: dict, **kw):
    """An Engine whose weights are the given torch tensors, shared through DLPack (no copies)."""
    import tvm

    import mpt_relax

    class _SharedWeightsEngine(mpt_relax.Engine):
        def _weight_bytes(self, root):
            return sum(tensors[name].numel() * tensors[name].element_size() for name in self.meta["param_names"])

        def _load_params(self, root):
            self._torch_weights = tensors  # keep the memory alive as long as the engine
            return [tvm.runtime.from_dlpack(tensors[name]) for name in self.meta["param_names"]]

    return _SharedWeightsEngine(art, **kw)


def decode_bound(config, weight_tensors, kv_bytes: int, batch: int, context: float, bandwidth: float) -> float:
    from mpt_relax.tools import bandwidth as bw

    per_step = bw.weight_bytes_per_token(config, weight_tensors) + batch * bw.kv_bytes_per_token(config, kv_bytes, context)
    return batch * bandwidth / per_step


def prefill_flops_per_token(config, n_tokens: int) -> float:
    """Matmul flops per prompt token: every Linear weight once (2 flops each; the LM head runs
    for the last token only) plus causal attention (QK^T and PV over n/2 keys on average)."""
    linear = 2 * config.n_layers * (config.d_model * config.qkv_dim + config.d_model**2 + 2 * config.d_model
                                    * config.ffn_hidden_size)
    attention = 2 * 2 * config.n_layers * config.d_model * n_tokens / 2
    return linear + attention


def speed_row(rec: Recorder, engine: str, metric: str, size: int, tokens: int, seconds: float, bound: float) -> None:
    row = {"engine": engine, "metric": metric, "size": size, "tokens_per_s": tokens / seconds, "seconds": seconds,
           "bound": "bandwidth" if metric == "decode" else "gemm", "bound_tokens_per_s": bound,
           "fraction_of_bound": tokens / seconds / bound}
    rec.add("speed", row)
    say(rec.part, f"{engine} {metric} {size}: {row['tokens_per_s']:.1f} tok/s = {row['fraction_of_bound']:.3f} of bound")


def part_speed_ours(rec: Recorder, manifest: dict, bundle: Path, device: str, name: str) -> None:
    import numpy as np

    from mpt_relax.models.mpt.config import MPTConfig

    entry = next(m for m in manifest["models"] if m["name"] == name)
    plan = manifest["plan"]
    config = MPTConfig.from_dict(entry["hf_config"])
    label = f"ours-{entry['quantization']}"
    sizes = {"float32": 4, "float16": 2, "uint32": 4}
    weight_list = [(n, tuple(s), int(np.prod(s)) * sizes[d]) for n, s, d in entry["params"]]
    kv_bytes = 4 if entry["quantization"] == "q0f32" else 2
    rng = np.random.default_rng(0)
    vocab = config.vocab_size
    with rec.guard("setup"):
        t0 = time.perf_counter()
        bandwidth = copy_bandwidth(device)
        rate = gemm_rate(device)
        rec.set("bandwidth_GBps", bandwidth / 1e9)
        rec.set("gemm_tflops", rate / 1e12)
        tensors = speed_tensors(entry, device)
        sync(device)
        work = Path(tempfile.mkdtemp(prefix="gpu-check-speed-"))
        art = work / name
        shutil.copytree(bundle / entry["artifact"], art)
        meta = json.loads((art / "mpt-config.json").read_text())
        meta["has_weights"] = True  # the weights come from torch, not from shards
        (art / "mpt-config.json").write_text(json.dumps(meta))
        eng = dlpack_engine(art, tensors, device=device, max_batch_size=max(plan["decode_batches"]),
                            kv_memory=plan["kv_memory"])
        rec.set("weights_GB", sum(w[2] for w in weight_list) / 1e9)
        say(rec.part, f"{name}: engine ready in {time.perf_counter() - t0:.1f}s")
    if "eng" not in locals():
        return
    context, steps = plan["decode_context"], plan["decode_steps"]
    for batch in plan["decode_batches"]:
        with rec.guard(f"decode batch {batch}"):
            seqs = [eng.add_sequence() for _ in range(batch)]
            try:
                eng.forward(seqs, [rng.integers(0, vocab, context).tolist() for _ in seqs])
                tokens = [[int(t)] for t in rng.integers(0, vocab, batch)]
                for _ in range(2):  # warm up
                    eng.forward(seqs, tokens)
                t0 = time.perf_counter()
                for _ in range(steps):
                    eng.forward(seqs, tokens)
                seconds = time.perf_counter() - t0
            finally:
                for s in seqs:
                    eng.remove_sequence(s)
            bound = decode_bound(config, weight_list, kv_bytes, batch, context + 2 + steps / 2, bandwidth)
            speed_row(rec, label, "decode", batch, batch * steps, seconds, bound)
    for n in plan["prefill_lengths"]:
        with rec.guard(f"prefill {n}"):
            n = min(n, eng.context_window)
            best = float("inf")
            for _ in range(3):  # the first is the warm-up
                seq = eng.add_sequence()
                ids = rng.integers(0, vocab, n).tolist()
                t0 = time.perf_counter()
                eng.forward([seq], [ids])
                best = min(best, time.perf_counter() - t0)
                eng.remove_sequence(seq)
            speed_row(rec, label, "prefill", n, n, best, rate / prefill_flops_per_token(config, n))
    for n in plan["ttft_prompts"]:
        with rec.guard(f"ttft {n}"):
            n = min(n, eng.context_window - 1)
            result = eng.generate(rng.integers(0, vocab, n).tolist(), max_new_tokens=1, ignore_eos=True)
            rec.add("ttft", {"engine": label, "prompt_tokens": n, "seconds": result.time_to_first_token_s})
            say(rec.part, f"{label} time to first token, {n}-token prompt: {result.time_to_first_token_s * 1e3:.1f} ms")
    del eng, tensors


def hf_stepper(model):
    """step(ids, cache) -> (logits of the last position, cache) for this transformers version
    (the cache argument is ``cache`` in transformers 5, ``past_key_values`` before)."""
    import inspect

    params = inspect.signature(model.forward).parameters
    cache_kw = "cache" if "cache" in params else "past_key_values"
    keep = {"logits_to_keep": 1} if "logits_to_keep" in params else {}

    def step(ids, cache):
        extra = {cache_kw: cache} if cache is not None else {}
        out = model(ids, use_cache=True, return_dict=True, **keep, **extra)
        new = out.get("cache")
        return out.logits, new if new is not None else out.get("past_key_values")

    return step


def part_speed_hf(rec: Recorder, manifest: dict, device: str) -> None:
    import torch
    from transformers import MptConfig, MptForCausalLM

    from mpt_relax.models.mpt.config import MPTConfig

    plan = manifest["plan"]
    hf_config = manifest["hf_speed_config"]
    config = MPTConfig.from_dict(hf_config)
    dev = torch_device(device)
    dtype = torch.float16 if device == "cuda" else torch.float32  # fp16 matmuls crawl on a CPU: the dry run uses fp32
    label = f"hf-{str(dtype).removeprefix('torch.').replace('float', 'fp')}"
    with rec.guard("setup"):
        t0 = time.perf_counter()
        bandwidth = copy_bandwidth(device)
        rate = gemm_rate(device)
        rec.set("bandwidth_GBps", bandwidth / 1e9)
        cfg = MptConfig(**{k: v for k, v in hf_config.items() if k not in ("model_type", "architectures")})
        with torch.device("meta"):  # no 7B init on the host: allocate on the device, fill there
            model = MptForCausalLM(cfg).eval()
        model = model.to_empty(device=dev).to(dtype)
        model.tie_weights()
        init = torch.Generator(device=dev).manual_seed(0)
        with torch.no_grad():
            for name, p in model.named_parameters():
                p.fill_(1.0) if "norm" in name else p.normal_(0.0, 0.02, generator=init)
        step = hf_stepper(model)
        weight_list = [(n, tuple(p.shape), p.numel() * p.element_size()) for n, p in model.named_parameters()]
        sync(device)
        say(rec.part, f"{label} model ready in {time.perf_counter() - t0:.1f}s")
    if "weight_list" not in locals():
        return
    gen = torch.Generator(device=dev).manual_seed(0)
    vocab, context, steps = config.vocab_size, plan["decode_context"], plan["decode_steps"]
    for batch in plan["decode_batches"]:
        with rec.guard(f"decode batch {batch}"), torch.no_grad():
            ids = torch.randint(0, vocab, (batch, context), generator=gen, device=dev)
            _, past = step(ids, None)
            tok = torch.randint(0, vocab, (batch, 1), generator=gen, device=dev)
            for _ in range(2):
                _, past = step(tok, past)
            sync(device)
            t0 = time.perf_counter()
            for _ in range(steps):
                logits, past = step(tok, past)
                logits[:, -1].float().cpu()  # the logits reach the host, as in our engine
            sync(device)
            seconds = time.perf_counter() - t0
            del past, logits
            bound = decode_bound(config, weight_list, dtype.itemsize, batch, context + 2 + steps / 2, bandwidth)
            speed_row(rec, label, "decode", batch, batch * steps, seconds, bound)
    for n in plan["prefill_lengths"]:
        with rec.guard(f"prefill {n}"), torch.no_grad():
            n = min(n, config.max_seq_len)
            best = float("inf")
            for _ in range(3):
                ids = torch.randint(0, vocab, (1, n), generator=gen, device=dev)
                sync(device)
                t0 = time.perf_counter()
                step(ids, None)[0][:, -1].float().cpu()
                sync(device)
                best = min(best, time.perf_counter() - t0)
            speed_row(rec, label, "prefill", n, n, best, rate / prefill_flops_per_token(config, n))
    for n in plan["ttft_prompts"]:
        with rec.guard(f"ttft {n}"), torch.no_grad():
            n = min(n, config.max_seq_len - 1)
            ids = torch.randint(0, vocab, (1, n), generator=gen, device=dev)
            sync(device)
            t0 = time.perf_counter()
            model.generate(ids, max_new_tokens=1, do_sample=False, pad_token_id=0)
            sync(device)
            rec.add("ttft", {"engine": label, "prompt_tokens": n, "seconds": time.perf_counter() - t0})


def run_child(args) -> int:
    bundle = Path(args.bundle)
    manifest = json.loads((bundle / "manifest.json").read_text())
    rec = Recorder(Path(args.result), args.part)
    if args.device == "cuda":
        rec.data["cudart"] = preload_cudart(bundle)
    else:
        import torch

        torch.set_num_threads(int(os.environ.get("TVM_NUM_THREADS", "1")))  # share the CPU with TVM, not fight it
    kind, _, name = args.part.partition(":")
    with rec.guard(args.part):
        if kind == "env":
            part_env(rec, manifest, args.device, bundle)
        elif kind == "parity":
            part_parity(rec, manifest, bundle, args.device, name)
        elif name == "hf":
            part_speed_hf(rec, manifest, args.device)
        else:
            part_speed_ours(rec, manifest, bundle, args.device, name)
    return 0


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bundle", required=True, help="directory made by scripts/gpu_bundle.py")
    p.add_argument("--report", required=True, help="directory for report.json, report.md and parts/")
    p.add_argument("--device", choices=("cuda", "cpu"), help="default: cuda, or cpu for a --device cpu bundle")
    p.add_argument("--budget", type=float, help="seconds for all parts (default: the bundle's plan, 450 on a GPU)")
    p.add_argument("--only", nargs="+", help="run only the parts whose names start with these (env, parity, speed:hf ...)")
    p.add_argument("--part", help=argparse.SUPPRESS)  # internal: run one part in this process
    p.add_argument("--result", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.part:
        return run_child(args)
    return orchestrate(args)


if __name__ == "__main__":
    sys.exit(main())
