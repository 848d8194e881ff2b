#!/usr/bin/env python3
"""Build-driver benchmark (prints numbers; not a test).

1. Time to build the full mpt-7b-instruct shapes without weights, per target (default cuda
   q4f16_1 and llvm q4f16_1).
2. A synthetic bf16 checkpoint (MPT-7B widths, ``--layers`` blocks, 2 safetensors shards; 32
   layers is the full 7B, 13.3 GB) built into a q4f16_1 artifact, against reading it once
   (every tensor of every shard through ``safe_open``, each byte touched). Both run in spawned
   children, the checkpoint reused from ``<workdir>/ckpt`` when there; peak RSS is the build
   child's VmHWM. Targets: build <= 3x the read, peak RSS <= largest shard + 1536 MiB.
   Both measurements are warm (the checkpoint was just written or read, so it is mostly in the
   page cache) unless ``--cold``, which drops the shards' cached pages before each.

    python scripts/bench_build.py [--layers 5] [--workdir /tmp/mpt_bench_build] [--skip-rss]
                                  [--keep-checkpoint] [--cold]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
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


def _read_child(queue, ckpt: str) -> None:
    """Time reading the checkpoint once: every tensor through ``safe_open`` (copied out of the
    mapping, so each byte is read), and the shard files' bytes with plain reads."""
    from safetensors import safe_open

    shards = sorted(Path(ckpt).glob("*.safetensors"))
    t0 = time.perf_counter()
    for shard in shards:
        with safe_open(str(shard), "pt") as handle:
            for name in handle.keys():
                handle.get_tensor(name).clone()
    t1, buf = time.perf_counter(), bytearray(64 << 20)
    for shard in shards:
        with open(shard, "rb", buffering=0) as f:
            while f.readinto(buf):
                pass
    queue.put({"seconds": t1 - t0, "raw_seconds": time.perf_counter() - t1})


def in_child(target, *args) -> dict:
    """Run ``target(queue, *args)`` in a spawned process; returns what it puts on the queue."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=target, args=(queue, *args))
    proc.start()
    result = queue.get()
    proc.join()
    return result


def build_in_child(**kwargs) -> dict:
    return in_child(_build_child, kwargs)


def drop_page_cache(ckpt: Path) -> None:
    """Evict the shards' pages from the page cache (flushed first), so that the next read is cold."""
    for shard in ckpt.glob("*.safetensors"):
        fd = os.open(shard, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def remove_outputs(work: Path) -> None:
    """The artifacts this script writes into ``work`` (the checkpoint stays)."""
    for entry in [*work.glob("7b-*"), work / "dist", work / "synthetic-q4"]:
        shutil.rmtree(entry, ignore_errors=True)


def checkpoint_ready(path: Path, layers: int) -> bool:
    """Whether ``path`` holds a complete synthetic checkpoint of ``layers`` blocks (its index is written last)."""
    try:
        return (json.loads((path / "config.json").read_text())["n_layers"] == layers
                and (path / "model.safetensors.index.json").is_file())
    except (OSError, ValueError, KeyError):
        return False


def synthetic_checkpoint(path: Path, layers: int) -> None:
    """MPT-7B-wide bf16 checkpoint with ``layers`` blocks in 2 shards, the index written last."""
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


def bench_weights(work: Path, layers: int, cold: bool) -> None:
    """Read the synthetic checkpoint once, then build it to q4f16_1; print both and the targets."""
    ckpt = work / "ckpt"
    if not checkpoint_ready(ckpt, layers):
        shutil.rmtree(ckpt, ignore_errors=True)
        synthetic_checkpoint(ckpt, layers)
    nbytes = sum(p.stat().st_size for p in ckpt.glob("*.safetensors"))
    largest = max(p.stat().st_size for p in ckpt.glob("*.safetensors"))
    if cold:
        drop_page_cache(ckpt)
    read = in_child(_read_child, str(ckpt))
    if cold:
        drop_page_cache(ckpt)
    r = build_in_child(model=str(ckpt), target="llvm", quantization="q4f16_1", output=str(work / "synthetic-q4"),
                       quiet=True)
    out = sum(p.stat().st_size for p in (work / "synthetic-q4").glob("params_shard_*"))
    over = r["peak_rss_mb"] - largest / 2**20
    print(f"synthetic checkpoint {nbytes / 1e9:.2f} GB bf16, {layers} layers (largest shard {largest / 1e9:.2f} GB = "
          f"{largest / 2**20:.0f} MiB) -> q4f16_1 {out / 1e9:.2f} GB, {'cold' if cold else 'warm'} page cache:\n"
          f"  read once {read['seconds']:.1f} s ({nbytes / 1e9 / read['seconds']:.2f} GB/s; plain file reads "
          f"{read['raw_seconds']:.1f} s); build {r['seconds']:.1f} s = {r['seconds'] / read['seconds']:.2f}x the read "
          f"(target <= 3x; {r['seconds'] / read['raw_seconds']:.2f}x the plain reads)\n"
          f"  peak RSS {r['peak_rss_mb']:.0f} MiB = largest shard {over:+.0f} MiB (target <= +1536 MiB)", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=5, help="blocks in the synthetic checkpoint (5 -> 2.4 GB, 32 -> 13.3 GB)")
    ap.add_argument("--workdir", default="/tmp/mpt_bench_build")
    ap.add_argument("--targets", nargs="+", default=["cuda", "llvm"])
    ap.add_argument("--skip-rss", action="store_true", help="skip the build with weights")
    ap.add_argument("--keep-checkpoint", action="store_true", help="keep <workdir>/ckpt for the next run")
    ap.add_argument("--cold", action="store_true", help="drop the checkpoint's page cache before the read and the build")
    args = ap.parse_args()
    work = Path(args.workdir)
    remove_outputs(work)  # earlier runs' artifacts; a checkpoint is reused
    try:
        for target in args.targets:
            r = build_in_child(model="mpt-7b-instruct", target=target, quantization="q4f16_1",
                               output=str(work / f"7b-{target}"), dist_root=str(work / "dist"), quiet=True)
            print(f"mpt-7b-instruct q4f16_1 {target} (no weights): build {r['seconds']:.1f} s, "
                  f"peak RSS {r['peak_rss_mb']:.0f} MiB", flush=True)
        if not args.skip_rss:
            bench_weights(work, args.layers, args.cold)
    finally:
        if args.keep_checkpoint:
            remove_outputs(work)
        else:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
