"""CPU benchmark: compiled MPT (TVM, LLVM target) against HF transformers (torch fp32), one run.

Prints compile time, prefill tokens/s (prompt of --prompt tokens), decode tokens/s (--steps
steps after the prompt), the same two rates for HF torch fp32 in the same process, their
ratio, and the memory-bandwidth bound of decode (bytes of weights read per token divided by
the measured bandwidth). Rounds alternate between torch and TVM so both see about the same
load; the best and median rounds of each are printed, and the ratio is taken per round (TVM
against the faster torch setting of that round) and summarised by its median. Torch runs with
2 threads and with 1 thread: on a busy machine its OpenMP barriers can make 2 threads far
slower than 1. Bandwidth: a numpy copy (single thread, read + write bytes) and torch mat-vec /
sum over 512 MiB (read bytes, best of 1 and 2 threads).

TVM runs with the VM's default pooled allocator, as the engine does; ``--allocator naive
--mallopt`` shows the cost the contiguous KV cache pays for a new, larger buffer every step.

    PYTHONPATH=. TVM_NUM_THREADS=2 python scripts/bench_cpu_kernels.py            # 125M config
    PYTHONPATH=. python scripts/bench_cpu_kernels.py --rules dlight                # dlight's CPU rules only
    PYTHONPATH=. python scripts/bench_cpu_kernels.py --dtype float16 --no-torch    # fp16 weights
    PYTHONPATH=. python scripts/bench_cpu_kernels.py --allocator naive --mallopt   # no page faults per step
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("TVM_NUM_THREADS", "2")

import numpy as np  # noqa: E402
import tvm  # noqa: E402
from tvm import relax  # noqa: E402
from tvm.s_tir import dlight as dl  # noqa: E402

from mpt_relax import compiler  # noqa: E402
from mpt_relax.config import MPTConfig  # noqa: E402
from mpt_relax.model import MPTForCausalLM  # noqa: E402


def _rule_list(name: str):
    if name == "ours":
        return compiler._cpu_schedules
    if name == "dlight":
        return lambda: [dl.cpu.GEMV(), dl.cpu.Reduction()]
    if name == "none":
        return lambda: []
    raise SystemExit(f"unknown --rules {name!r}")


def bandwidth_gbs(threads: int) -> dict[str, float]:
    """Best of a few runs: numpy copy (read + write bytes / s) and torch mat-vec (read bytes / s)."""
    out = {}
    a = np.ones(256 * 2**20 // 4, dtype=np.float32)
    b = np.empty_like(a)
    best = min(_timed(lambda: np.copyto(b, a)) for _ in range(5))
    out["numpy_copy_rw"] = 2 * a.nbytes / best / 1e9
    del a, b
    try:
        import torch

        w = torch.ones(16384, 8192)  # 512 MiB, read once per pass
        x = torch.ones(8192)
        best_mv = best_sum = float("inf")
        for n in sorted({threads, 1}):
            torch.set_num_threads(n)
            best_mv = min([best_mv] + [_timed(lambda: torch.mv(w, x)) for _ in range(5)])
            best_sum = min([best_sum] + [_timed(lambda: w.sum()) for _ in range(5)])
        out["torch_mv_read"] = w.numel() * 4 / best_mv / 1e9
        out["torch_sum_read"] = w.numel() * 4 / best_sum / 1e9
        del w
    except ImportError:
        pass
    return out


def _timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


class TVMRunner:
    def __init__(self, cfg: MPTConfig, dtype: str, rules: str, allocator: str | None):
        model = MPTForCausalLM(cfg, dtype)
        mod, specs = model.export_tvm(spec=model.export_spec())
        spec = compiler.llvm_target()
        spec = compiler.TargetSpec(spec.name, spec.target, _rule_list(rules), spec.suffix)
        t = time.perf_counter()
        ex = compiler.compile_module(mod, spec)
        self.compile_s = time.perf_counter() - t
        self.dev = tvm.cpu()
        self.vm = relax.VirtualMachine(ex, self.dev, memory_cfg=allocator)
        rng = np.random.default_rng(0)
        self.params = [
            tvm.runtime.tensor((rng.standard_normal([int(s) for s in p.shape], np.float32) * 0.02).astype(dtype), self.dev)
            for _, p in specs
        ]
        self.weight_bytes = sum(p.numpy().nbytes for p in self.params)

    def prefill(self, ids: np.ndarray):
        logits, k, v = self.vm["prefill"](tvm.runtime.tensor(ids, self.dev), self.params)
        logits.numpy()
        return k, v

    def decode(self, ids: np.ndarray, k, v, steps: int) -> float:
        t = time.perf_counter()
        tok = ids[-1:]
        for _ in range(steps):
            logits, k, v = self.vm["decode"](tvm.runtime.tensor(tok, self.dev), k, v, self.params)
            tok = np.argmax(logits.numpy(), axis=-1).astype("int32")  # greedy, like generate()
        return steps / (time.perf_counter() - t)


class TorchRunner:
    def __init__(self, cfg: MPTConfig):
        import torch
        from transformers import MptConfig, MptForCausalLM

        torch.manual_seed(0)
        hf = MptConfig(
            d_model=cfg.d_model, n_heads=cfg.n_heads, n_layers=cfg.n_layers, vocab_size=cfg.vocab_size,
            max_seq_len=cfg.max_seq_len, attn_config={"attn_pdrop": 0},
        )
        self.torch = torch
        self.model = MptForCausalLM(hf).eval()

    def threads(self, n: int) -> None:
        self.torch.set_num_threads(n)

    def prefill(self, ids: np.ndarray):
        with self.torch.inference_mode():
            out = self.model(self.torch.from_numpy(ids.astype("int64"))[None], use_cache=True)
        return out.past_key_values, out.logits

    def decode(self, ids: np.ndarray, past, steps: int) -> float:
        torch = self.torch
        tok = torch.from_numpy(ids[-1:].astype("int64"))[None]
        t = time.perf_counter()
        with torch.inference_mode():
            for _ in range(steps):
                out = self.model(tok, past_key_values=past, use_cache=True)
                past = out.past_key_values
                tok = out.logits[:, -1:].argmax(-1)
        return steps / (time.perf_counter() - t)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--d-model", type=int, default=768)
    ap.add_argument("--n-heads", type=int, default=12)
    ap.add_argument("--n-layers", type=int, default=12)
    ap.add_argument("--vocab", type=int, default=50432)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--steps", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=2, help="alternating torch/TVM rounds; best of each is reported")
    ap.add_argument("--rules", default="ours", help="ours | dlight (dlight's CPU rules) | none")
    ap.add_argument("--no-torch", action="store_true")
    ap.add_argument("--allocator", default=None, help="VM memory allocator: pooled (default, as the engine) | naive")
    ap.add_argument("--mallopt", action="store_true",
                    help="keep freed memory in glibc's heap (no mmap per large tensor): the contiguous KV cache "
                         "gets a new, larger buffer every step, and fresh pages fault")
    args = ap.parse_args()
    threads = int(os.environ["TVM_NUM_THREADS"])
    if args.mallopt:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 32 << 20)  # M_MMAP_THRESHOLD: the maximum, 32 MiB
        libc.mallopt(-1, 1 << 30)  # M_TRIM_THRESHOLD: keep up to 1 GiB of free heap

    cfg = MPTConfig(d_model=args.d_model, n_heads=args.n_heads, n_layers=args.n_layers, vocab_size=args.vocab,
                    max_seq_len=2048)
    print(f"config d_model={cfg.d_model} heads={cfg.n_heads} layers={cfg.n_layers} vocab={cfg.vocab_size} "
          f"dtype={args.dtype} rules={args.rules} threads={threads} params={cfg.num_parameters() / 1e6:.1f}M "
          f"allocator={args.allocator or 'pooled'}{' +mallopt' if args.mallopt else ''}")
    bw = bandwidth_gbs(threads)
    print("bandwidth GB/s: " + ", ".join(f"{k} {v:.1f}" for k, v in bw.items()))

    tvm_run = TVMRunner(cfg, args.dtype, args.rules, args.allocator)
    print(f"tvm compile: {tvm_run.compile_s:.1f} s")
    torch_run = None if args.no_torch else TorchRunner(cfg)
    torch_threads = sorted({threads, 1}, reverse=True)

    ids = np.random.default_rng(1).integers(0, cfg.vocab_size, size=args.prompt).astype("int32")
    res: dict[str, list[float]] = {}
    for r in range(args.rounds):
        for n in torch_threads if torch_run is not None else []:
            torch_run.threads(n)
            t = time.perf_counter()
            past, _ = torch_run.prefill(ids)
            res.setdefault(f"torch{n}_prefill", []).append(args.prompt / (time.perf_counter() - t))
            res.setdefault(f"torch{n}_decode", []).append(torch_run.decode(ids, past, args.steps))
            time.sleep(0.5)
        t = time.perf_counter()
        k, v = tvm_run.prefill(ids)
        res.setdefault("tvm_prefill", []).append(args.prompt / (time.perf_counter() - t))
        res.setdefault("tvm_decode", []).append(tvm_run.decode(ids, k, v, args.steps))
        time.sleep(0.5)
        print(f"round {r}: " + ", ".join(f"{k} {v[-1]:.1f}" for k, v in res.items()))

    best = {k: max(v) for k, v in res.items()}
    med = {k: float(np.median(v)) for k, v in res.items()}
    print(f"{'':12s} {'prefill tok/s':>14s} {'decode tok/s':>13s}   (best round; median)")
    for name in ["tvm"] + [f"torch{n}" for n in torch_threads if torch_run is not None]:
        print(f"{name:12s} {best[name + '_prefill']:14.1f} {best[name + '_decode']:13.2f}   "
              f"({med[name + '_prefill']:.1f}; {med[name + '_decode']:.2f})")
    if torch_run is not None:
        # per-round ratios (TVM against the faster torch setting of the same round): rounds are
        # minutes apart and the load on a shared machine changes between them
        ratios = {
            phase: [
                res[f"tvm_{phase}"][r] / max(res[f"torch{n}_{phase}"][r] for n in torch_threads)
                for r in range(args.rounds)
            ]
            for phase in ("prefill", "decode")
        }
        print("ratio tvm / best torch per round: " + "; ".join(
            f"{phase} " + " ".join(f"{x:.2f}" for x in xs) for phase, xs in ratios.items()))
        print("ratio tvm / best torch, median of rounds: "
              f"prefill {np.median(ratios['prefill']):.2f}x, decode {np.median(ratios['decode']):.2f}x")
    mb = tvm_run.weight_bytes / 1e6
    for name, gbs in bw.items():
        print(f"bandwidth bound ({name} {gbs:.1f} GB/s, {mb:.0f} MB weights/token): {gbs * 1e3 / mb:.1f} tok/s")


if __name__ == "__main__":
    main()
