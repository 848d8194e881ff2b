"""Benchmark the paged KV cache on the CPU: batched decode throughput and attention cost by context.

    PYTHONPATH=. python scripts/bench_batching.py [--batches 1,4,16] [--contexts 1024,4096,16384]

1. Decode throughput: a ~125M-parameter MPT (d_model 768, 12 layers, 12 heads, vocab 50432,
   fp32, random weights saved with transformers' ``save_pretrained``) is built for the host CPU;
   for each batch size, that many sequences prefill a short prompt together and then decode in
   lock step. Prints tokens/s summed over the batch.
2. Attention per decode step: the same attention (12 heads x 64, ALiBi) compiled alone over the
   paged cache, one layer; a sequence is filled to each context length, then single-token
   attention calls are timed. Prints ms per layer and for all 12 layers of a decode step.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

os.environ.setdefault("TVM_NUM_THREADS", str(os.cpu_count()))

import tvm  # noqa: E402
from tvm import relax  # noqa: E402
from tvm.relax.frontend import nn  # noqa: E402

import mpt_relax  # noqa: E402
from mpt_relax.compile import pipeline, targets  # noqa: E402
from mpt_relax.compile.kv_cache import ALiBiPagedKVCache  # noqa: E402
from mpt_relax.runtime.kv_state import PagedKVCacheRuntime  # noqa: E402

SHAPE = dict(d_model=768, n_heads=12, n_layers=12, vocab_size=50432)
PAGE_SIZE = 16


def write_checkpoint(path: Path, max_seq_len: int) -> None:
    """A random ~125M MPT checkpoint (HF default init) in ``path``."""
    import torch
    from transformers import MptConfig, MptForCausalLM

    torch.manual_seed(0)
    model = MptForCausalLM(MptConfig(**SHAPE, max_seq_len=max_seq_len, attn_config={"attn_pdrop": 0}))
    model.save_pretrained(path)


def bench_decode(engine: mpt_relax.Engine, batch: int, prompt_len: int, steps: int) -> float:
    """Decode tokens/s summed over ``batch`` sequences (after prefill and one warm-up step)."""
    rng = np.random.default_rng(batch)
    seqs = [engine.add_sequence() for _ in range(batch)]
    logits = engine.forward(seqs, [rng.integers(0, 50000, prompt_len).tolist() for _ in seqs])
    logits = engine.forward(seqs, [[int(t)] for t in logits.argmax(-1)])
    start = time.perf_counter()
    for _ in range(steps):
        logits = engine.forward(seqs, [[int(t)] for t in logits.argmax(-1)])
    elapsed = time.perf_counter() - start
    for s in seqs:
        engine.remove_sequence(s)
    return batch * steps / elapsed


class AttentionLayer(nn.Module):
    """One layer of the model's attention over the paged cache, nothing else."""

    def __init__(self, cfg: mpt_relax.MPTConfig, target: tvm.target.Target):
        self.cfg, self.target = cfg, target

    def create_paged_kv_cache(self, max_batch_size, max_total_seq_len, prefill_chunk_size):
        return ALiBiPagedKVCache.create(
            self.cfg, "float32", self.target, max_batch_size, max_total_seq_len, prefill_chunk_size, PAGE_SIZE
        )

    def attend(self, q, k, v, cache):
        return cache.attention(0, q, k, v, self.cfg.attn_scale)

    def spec(self) -> dict:
        cfg, none = self.cfg, {"param_mode": "none", "effect_mode": "none"}
        heads = lambda h: nn.spec.Tensor(["n", h, cfg.head_dim], "float32")  # noqa: E731
        return {
            "create_paged_kv_cache": {"max_batch_size": int, "max_total_seq_len": int, "prefill_chunk_size": int, "$": none},
            "attend": {"q": heads(cfg.n_heads), "k": heads(cfg.kv_n_heads), "v": heads(cfg.kv_n_heads),
                       "cache": nn.spec.Object(object_type=ALiBiPagedKVCache), "$": none},
        }


def bench_attention(contexts: list[int], steps: int, chunk: int = 4096) -> dict[int, float]:
    """Median seconds of one decode-step attention call (one layer, batch 1) at each context."""
    cfg = mpt_relax.MPTConfig(**{**SHAPE, "n_layers": 1})
    spec = targets.llvm_target()
    layer = AttentionLayer(cfg, spec.target)
    mod, _ = layer.export_tvm(layer.spec())
    vm = relax.VirtualMachine(pipeline.compile_module(mod, spec), tvm.cpu())
    sizes = (1, max(contexts) + steps + 2 * PAGE_SIZE, chunk)
    rt = PagedKVCacheRuntime(vm["create_paged_kv_cache"](*(tvm.runtime.ShapeTuple([s]) for s in sizes)), PAGE_SIZE)
    rng = np.random.default_rng(0)

    def call(n: int) -> None:
        rt.begin_forward([0], [n])
        q, k, v = (tvm.runtime.tensor(rng.standard_normal((n, cfg.n_heads, cfg.head_dim)).astype("float32")) for _ in range(3))
        vm["attend"](q, k, v, rt.cache)
        rt.end_forward()

    results = {}
    for context in sorted(contexts):
        rt.add_sequence(0)
        for start in range(0, context, chunk):
            call(min(chunk, context - start))
        times = []
        for _ in range(steps):
            t0 = time.perf_counter()
            call(1)
            times.append(time.perf_counter() - t0)
        results[context] = statistics.median(times)
        rt.remove_sequence(0)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batches", default="1,4,16")
    parser.add_argument("--contexts", default="1024,4096,16384")
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--steps", type=int, default=8, help="timed decode steps per batch size / context")
    parser.add_argument("--workdir", type=Path, default=None, help="keep the checkpoint and artifact here")
    args = parser.parse_args()
    batches = [int(b) for b in args.batches.split(",")]
    contexts = [int(c) for c in args.contexts.split(",")]
    print(f"TVM_NUM_THREADS={os.environ['TVM_NUM_THREADS']}, cpu {tvm.target.codegen.llvm_get_system_cpu()}", flush=True)

    with tempfile.TemporaryDirectory() as tmp:
        work = args.workdir or Path(tmp)
        t0 = time.perf_counter()
        if not (work / "ckpt" / "config.json").is_file():
            write_checkpoint(work / "ckpt", max_seq_len=2048)
        art = mpt_relax.build(work / "ckpt", target="llvm", output=work / "art", quantization="q0f32", quiet=True)
        print(f"model ready in {time.perf_counter() - t0:.0f}s (checkpoint + build)", flush=True)
        engine = mpt_relax.Engine(art, max_batch_size=max(batches), kv_memory="512MB")
        print(f"decode, ~125M fp32, prompt {args.prompt_len}, {args.steps} steps:")
        for batch in batches:
            print(f"  batch {batch:3d}: {bench_decode(engine, batch, args.prompt_len, args.steps):8.1f} tokens/s", flush=True)

    print(f"attention of one decode step (batch 1, {SHAPE['n_heads']} heads x {SHAPE['d_model'] // SHAPE['n_heads']}, fp32):")
    for context, seconds in bench_attention(contexts, args.steps).items():
        per_step = seconds * SHAPE["n_layers"]
        print(f"  context {context:6d}: {seconds * 1e3:7.2f} ms per layer, {per_step * 1e3:8.2f} ms per {SHAPE['n_layers']}-layer step")


if __name__ == "__main__":
    main()
