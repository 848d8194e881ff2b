"""Generation speed of a built artifact, optionally against HF ``MptForCausalLM`` on the same weights.

Both sides run greedy decoding of ``gen_len`` tokens after a random ``prompt_len``-token
prompt (the same ids), on the same device, with a warm-up run first; figures are medians
over ``runs``. Each side runs in a fresh (spawned) child process so that its peak RSS
(``VmHWM``) covers that runtime alone: ``ru_maxrss`` would not do, since Linux carries the
parent's high-water mark into a child started with fork/exec.

- prefill tokens/s: prompt tokens / time of the prefill forward pass
- decode tokens/s: (new tokens - 1) / time from the first to the last new token
- time to first token: from the call to the first sampled token (prefill + sampling)
- decode bound: the tokens/s that memory bandwidth allows, bytes read per decode token / the
  bandwidth of a large numpy copy (see :mod:`.bandwidth`), and decode tokens/s as a fraction of it
"""

from __future__ import annotations

import concurrent.futures
import functools
import multiprocessing
import os
import re
import resource
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import tvm

from mpt_relax.tools import bandwidth
from mpt_relax.io.artifact import param_records, read_config
from mpt_relax.models.mpt.config import MPTConfig
from mpt_relax.runtime.engine import Engine, EngineError, auto_device
from mpt_relax.runtime.kv_state import dtype_bytes
from mpt_relax.runtime.threads import physical_cores
from mpt_relax.targets import BY_DEVICE

FIGURES = ("prefill_tokens_per_s", "decode_tokens_per_s", "time_to_first_token_s")
RATIO_KEYS = (*FIGURES, "peak_rss_mb", "bytes_per_token")


def prompt_ids(vocab_size: int, length: int, seed: int = 0) -> list[int]:
    """``length`` random token ids in [1, vocab_size) (0 is eos)."""
    return np.random.default_rng(seed).integers(1, vocab_size, size=length).tolist()


def peak_rss_bytes() -> int:
    """This process's peak resident set size."""
    try:
        with open("/proc/self/status") as f:
            return int(re.search(r"VmHWM:\s+(\d+) kB", f.read()).group(1)) * 1024
    except OSError:
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return rss if sys.platform == "darwin" else rss * 1024


def _median(runs: list[dict[str, float]]) -> dict[str, float]:
    return {k: statistics.median(r[k] for r in runs) for k in FIGURES}


def measure_engine(artifact: str, device: str, ids: list[int], gen_len: int, runs: int) -> dict[str, Any]:
    """Figures of :class:`mpt_relax.Engine` (host-side numpy sampling included)."""
    eng = Engine(artifact, device)
    eng.generate(ids, max_new_tokens=2, ignore_eos=True)  # warm-up: first calls allocate the VM's memory
    results = [eng.generate(ids, max_new_tokens=gen_len, ignore_eos=True) for _ in range(runs)]
    figures = [{k: getattr(r, k) for k in FIGURES} for r in results]
    return {"device": str(eng.device), **_median(figures), "token_ids": results[-1].token_ids}


HF_DTYPES = ("float32", "float16", "bfloat16")


def hf_baseline_dtype(device: str, model_dtype: str, requested: str | None = None) -> str:
    """HF's dtype in --compare-hf: ``requested`` if given (e.g. bfloat16: oneDNN's AMX path on a
    CPU that has it), else fp32 on the CPU (the baseline every artifact is compared with
    there) and the artifact's float dtype elsewhere."""
    if requested is not None:
        if requested not in HF_DTYPES:
            raise EngineError(f"--hf-dtype must be one of {', '.join(HF_DTYPES)}, got {requested!r}")
        return requested
    return "float32" if device == "cpu" else model_dtype


def measure_hf(hf_dir: str, dtype: str, device: str, ids: list[int], gen_len: int, runs: int) -> dict[str, Any]:
    """Figures of transformers' ``MptForCausalLM``: one forward for the prompt, then one per token."""
    from transformers import MptForCausalLM  # imported here: it takes seconds, and only this child needs it

    model = MptForCausalLM.from_pretrained(hf_dir, dtype=getattr(torch, dtype)).to(device).eval()

    def sync() -> None:
        if device == "cuda":
            torch.cuda.synchronize()

    def once(n: int) -> tuple[dict[str, float], list[int]]:
        t0 = time.perf_counter()
        out = model(torch.tensor([ids], device=device), use_cache=True)
        sync()
        t_prefill = time.perf_counter()
        token = out.logits[0, -1].argmax()
        tokens = [int(token)]
        t_first = time.perf_counter()
        for _ in range(n - 1):
            out = model(token.view(1, 1), past_key_values=out.past_key_values, use_cache=True)
            token = out.logits[0, -1].argmax()
            tokens.append(int(token))
        t_end = time.perf_counter()
        return {"prefill_tokens_per_s": len(ids) / (t_prefill - t0),
                "decode_tokens_per_s": (n - 1) / (t_end - t_first),
                "time_to_first_token_s": t_first - t0}, tokens

    with torch.inference_mode():
        once(2)
        results = [once(gen_len) for _ in range(runs)]
    tensors = [(n, tuple(p.shape), p.numel() * p.element_size()) for n, p in model.named_parameters()]
    return {"device": device, **_median([r[0] for r in results]), "token_ids": results[-1][1],
            "threads": torch.get_num_threads(), "tensors": tensors}


def _measured(fn: Callable[..., dict], threads: int | None, *args) -> dict[str, Any]:
    if threads:
        torch.set_num_threads(threads)
    out = fn(*args)
    out["peak_rss_mb"] = peak_rss_bytes() / 2**20
    return out


def in_child(fn: Callable[..., dict], threads: int | None, *args) -> dict[str, Any]:
    """Run ``fn(*args)`` in a fresh spawned process; its result plus the child's peak RSS."""
    ctx = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(1, mp_context=ctx) as pool:
        return pool.submit(_measured, fn, threads, *args).result()


def measure_bandwidth(device: str, threads: int | None) -> float:
    """Copy bandwidth (bytes/s) of the memory the weights live in: host memory with as many
    threads as the run uses, or the GPU's own memory."""
    if device == "cpu":
        return bandwidth.host_copy_bandwidth(threads or os.cpu_count() or 1)
    return bandwidth.device_copy_bandwidth(tvm.runtime.device(device, 0))


def _with_bound(config: MPTConfig, prompt_len: int, gen_len: int, bytes_per_s: float, figures: dict[str, Any],
                tensors, kv_dtype_bytes: int) -> dict[str, Any]:
    """``figures`` plus bytes per decode token, the bandwidth bound and decode's fraction of it."""
    out = {**figures, **bandwidth.decode_bound(config, tensors, kv_dtype_bytes, prompt_len, gen_len, bytes_per_s)}
    out["fraction_of_bound"] = out["decode_tokens_per_s"] / out["bound_tokens_per_s"]
    return out


def run(artifact: str | Path, *, device: str = "auto", prompt_len: int = 128, gen_len: int = 128, runs: int = 3,
        compare_hf: bool = False, hf_model: str | Path | None = None, threads: int | None = None,
        seed: int = 0, hf_dtype: str | None = None) -> dict[str, Any]:
    """Measure the artifact (and HF, with ``compare_hf``); returns the report as a dict.

    ``hf_model`` defaults to the checkpoint the artifact was built from (``source`` in
    mpt-config.json). ``threads`` sets ``TVM_NUM_THREADS`` and torch's thread count alike.
    ``hf_dtype``: see :func:`hf_baseline_dtype`.
    """
    for name, value, low in (("runs", runs, 1), ("threads", threads, 1), ("seed", seed, 0)):
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < low):
            raise EngineError(f"{name} must be an integer >= {low}, got {value!r}")  # before any work
    meta = read_config(Path(artifact))
    window = int(meta["context_window_size"])
    if prompt_len < 1 or gen_len < 2 or prompt_len + gen_len > window:
        raise EngineError(f"need prompt-len >= 1 and gen-len >= 2 that fit the context window of {window} together "
                          f"(got {prompt_len} + {gen_len})")
    if device == "auto":
        device = auto_device(meta["libraries"])
    hf_dtype = hf_baseline_dtype(device, meta["model_dtype"], hf_dtype)
    if compare_hf:
        hf_model = hf_model or meta.get("source")
        if not hf_model or not (Path(hf_model) / "config.json").is_file():
            raise EngineError(f"--compare-hf needs the HF checkpoint: {hf_model or 'no source recorded'} is not one; "
                              "pass --hf-model DIR")
        if device not in BY_DEVICE or BY_DEVICE[device].hf_device is None:
            raise EngineError(f"--compare-hf: transformers cannot run on {device!r}")
    if threads:
        os.environ["TVM_NUM_THREADS"] = str(threads)
    ids = prompt_ids(meta["model_config"]["vocab_size"], prompt_len, seed)
    bytes_per_s = measure_bandwidth(device, threads)
    bound = functools.partial(_with_bound, MPTConfig.from_dict(meta["model_config"]), prompt_len, gen_len, bytes_per_s)
    report: dict[str, Any] = {
        "artifact": str(artifact), "model": meta["model_name"],
        "quantization": meta["quantization"].get("tag", meta["quantization"]["name"]),
        "prompt_len": prompt_len, "gen_len": gen_len, "runs": runs, "threads": threads or os.environ.get("TVM_NUM_THREADS") or f"default ({physical_cores()})",
        "copy_bandwidth_gb_s": bytes_per_s / 1e9,
        "mpt_relax": bound(in_child(measure_engine, threads, str(artifact), device, ids, gen_len, runs),
                           [(r["name"], r["shape"], r["nbytes"]) for _, r in param_records(Path(artifact))],
                           dtype_bytes(meta["model_dtype"])),
        "hf": None, "ratios": None, "same_tokens": None,
    }
    if compare_hf:
        report["hf_dtype"] = hf_dtype
        hf = in_child(measure_hf, threads, str(hf_model), hf_dtype, BY_DEVICE[device].hf_device, ids, gen_len, runs)
        ours = report["mpt_relax"]
        report["hf"] = hf = bound(hf, hf.pop("tensors"), dtype_bytes(hf_dtype))
        report["ratios"] = {k: ours[k] / hf[k] for k in RATIO_KEYS}
        report["same_tokens"] = ours["token_ids"] == hf["token_ids"]
    return report


ROWS = (("prefill (tokens/s)", "prefill_tokens_per_s", 1.0, ".1f"), ("decode (tokens/s)", "decode_tokens_per_s", 1.0, ".1f"),
        ("time to first token (ms)", "time_to_first_token_s", 1e3, ".1f"), ("peak RSS (MB)", "peak_rss_mb", 1.0, ".1f"),
        ("read per token (MB)", "bytes_per_token", 1e-6, ".1f"), ("decode bound (tokens/s)", "bound_tokens_per_s", 1.0, ".1f"),
        ("decode / bound", "fraction_of_bound", 1.0, ".2f"))


def format_table(report: dict[str, Any]) -> str:
    """The report as a plain-text table (ratio = mpt_relax / HF)."""
    ours, hf = report["mpt_relax"], report["hf"]
    lines = [f"{report['model']} ({report['quantization']}) on {ours['device']}: prompt {report['prompt_len']} tokens, "
             f"{report['gen_len']} new tokens, median of {report['runs']} runs, threads {report['threads']}"]
    head = f"{'':26}{'mpt_relax':>12}"
    if hf:
        head += f"{'HF ' + report['hf_dtype']:>16}{'ratio':>9}"
    lines.append(head)
    for label, key, scale, fmt in ROWS:
        row = f"{label:26}{ours[key] * scale:12{fmt}}"
        if hf:
            row += f"{hf[key] * scale:16{fmt}}"
            row += f"{report['ratios'][key]:8.2f}x" if key in report["ratios"] else ""
        lines.append(row)
    lines.append(f"decode bound = copy bandwidth {report['copy_bandwidth_gb_s']:.1f} GB/s (read + written) / bytes read "
                 "per decode token (weights + mean KV cache)")
    if hf:
        lines.append("ratio = mpt_relax / HF: higher is better for tokens/s, lower for time and memory; "
                     f"same greedy tokens: {'yes' if report['same_tokens'] else 'no'}")
    return "\n".join(lines)
