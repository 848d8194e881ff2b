#!/usr/bin/env python3
"""Build-driver benchmark (prints numbers; not a test).

1. Time to build the full mpt-7b-instruct shapes without weights, per target (default cuda
   q4f16_1 and llvm q4f16_1).
2. Peak RSS while quantizing a synthetic bf16 checkpoint of at least 2 GB (MPT-7B widths, a few
   layers, 2 safetensors shards) into a q4f16_1 artifact, measured in a child process
   (VmHWM from /proc/self/status) so that making the checkpoint does not count.

    python scripts/bench_build.py [--layers 5] [--workdir /tmp/mpt_bench_build] [--skip-rss]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import shutil
import time
from pathlib import Path

import torch
from safetensors.torch import save_file


def peak_rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _build_child(queue, kwargs: dict) -> None:
    import mpt_relax

    t0 = time.perf_counter()
    mpt_relax.build(**kwargs)
    queue.put({"seconds": time.perf_counter() - t0, "peak_rss_mb": peak_rss_mb()})


def build_in_child(**kwargs) -> dict:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_build_child, args=(queue, kwargs))
    proc.start()
    result = queue.get()
    proc.join()
    return result


def synthetic_checkpoint(path: Path, layers: int) -> int:
    """MPT-7B-wide bf16 checkpoint with ``layers`` blocks in 2 shards; returns its bytes."""
    d, f, vocab = 4096, 16384, 50432
    config = {"model_type": "mpt", "d_model": d, "n_heads": 32, "n_layers": layers, "vocab_size": vocab,
              "max_seq_len": 2048, "expansion_ratio": 4, "no_bias": True,
              "attn_config": {"alibi": True, "alibi_bias_max": 8, "attn_type": "multihead_attention"}}
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(config))
    gen = torch.Generator().manual_seed(0)

    def rand(*shape):
        return (torch.randn(*shape, generator=gen) * 0.02).to(torch.bfloat16)

    shards: list[dict[str, torch.Tensor]] = [{"transformer.wte.weight": rand(vocab, d),
                                              "transformer.norm_f.weight": torch.ones(d, dtype=torch.bfloat16)}, {}]
    weight_map, total = {}, 0
    for i in range(layers):
        p = f"transformer.blocks.{i}."
        block = {p + "norm_1.weight": torch.ones(d, dtype=torch.bfloat16), p + "attn.Wqkv.weight": rand(3 * d, d),
                 p + "attn.out_proj.weight": rand(d, d), p + "norm_2.weight": torch.ones(d, dtype=torch.bfloat16),
                 p + "ffn.up_proj.weight": rand(f, d), p + "ffn.down_proj.weight": rand(d, f)}
        shards[0 if i < layers // 2 else 1].update(block)
    for k, shard in enumerate(shards):
        name = f"model-0000{k + 1}-of-00002.safetensors"
        save_file(shard, str(path / name))
        weight_map.update({t: name for t in shard})
        total += sum(t.numel() * t.element_size() for t in shard.values())
        shard.clear()
    (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total},
                                                                   "weight_map": weight_map}))
    return total


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=5, help="blocks in the synthetic checkpoint (5 -> 2.4 GB)")
    ap.add_argument("--workdir", default="/tmp/mpt_bench_build")
    ap.add_argument("--targets", nargs="+", default=["cuda", "llvm"])
    ap.add_argument("--skip-rss", action="store_true")
    args = ap.parse_args()
    work = Path(args.workdir)
    shutil.rmtree(work, ignore_errors=True)
    try:
        for target in args.targets:
            r = build_in_child(model="mpt-7b-instruct", target=target, quantization="q4f16_1",
                               output=str(work / f"7b-{target}"), dist_root=str(work / "dist"), quiet=True)
            print(f"mpt-7b-instruct q4f16_1 {target} (no weights): build {r['seconds']:.1f} s, "
                  f"peak RSS {r['peak_rss_mb']:.0f} MB", flush=True)
        if not args.skip_rss:
            nbytes = synthetic_checkpoint(work / "ckpt", args.layers)
            largest = max(p.stat().st_size for p in (work / "ckpt").glob("*.safetensors"))
            r = build_in_child(model=str(work / "ckpt"), target="llvm", quantization="q4f16_1",
                               output=str(work / "synthetic-q4"), quiet=True)
            out = sum(p.stat().st_size for p in (work / "synthetic-q4").glob("params_shard_*"))
            print(f"synthetic checkpoint {nbytes / 1e9:.2f} GB bf16 (largest shard {largest / 1e9:.2f} GB) -> "
                  f"q4f16_1 {out / 1e9:.2f} GB: build {r['seconds']:.1f} s, peak RSS {r['peak_rss_mb']:.0f} MB",
                  flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
