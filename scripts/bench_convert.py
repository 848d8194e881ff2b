#!/usr/bin/env python3
"""Benchmark the bf16 -> fp16 converter on a synthetic checkpoint.

Builds a bf16 checkpoint of ``--size-gib`` GiB (default 2) in two ``.safetensors`` (or
``.bin``) shards of 128 MiB tensors under a fresh temporary directory, then measures:

- a plain copy of the same shard files (``shutil.copyfile`` + fsync, the durability the
  converter also gives) as the baseline;
- ``convert_checkpoint`` without and with verification, each in a child process so that the
  peak RSS covers the conversion only, not the generation of the data. The child reads its
  peak from ``VmHWM`` in /proc/self/status: ``ru_maxrss`` would not do, since Linux carries
  the parent's high-water mark into a child started with vfork/exec, as subprocess does.

Prints throughput in GB/s of input, the ratio to the copy and the peak RSS, then deletes
everything it wrote.

    python scripts/bench_convert.py [--size-gib 2] [--dir /tmp] [--format safetensors|bin] [--threads N]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

REPO = Path(__file__).resolve().parents[1]
TENSOR_ELEMENTS = 64 * 1024**2  # 128 MiB in bf16, about one MPT-7B up_proj
CHILD = """
import json, re, sys, torch
sys.path.insert(0, sys.argv[1])
from mpt_relax.tools.convert import convert_checkpoint

def peak_rss():
    with open("/proc/self/status") as f:
        return int(re.search(r"VmHWM:\\s+(\\d+) kB", f.read()).group(1)) * 1024

if int(sys.argv[5]) > 0:
    torch.set_num_threads(int(sys.argv[5]))
base = peak_rss()
report = convert_checkpoint(sys.argv[2], sys.argv[3], verify=sys.argv[4] == "1", progress=False)
print(json.dumps({"seconds": report.seconds, "input_bytes": report.input_bytes, "base_rss": base,
                  "peak_rss": peak_rss(), "clamped": report.clamped, "flushed": report.flushed,
                  "nonfinite": report.nonfinite, "threads": torch.get_num_threads()}))
"""


def make_checkpoint(path: Path, total_bytes: int, fmt: str) -> list[Path]:
    """Write a bf16 "MPT" checkpoint of about ``total_bytes`` in two shards plus an index.

    Values are N(0, 0.02) with a few planted out-of-range, tiny and NaN values in the first
    tensor. Returns the shard paths.
    """
    path.mkdir()
    (path / "config.json").write_text(json.dumps({"model_type": "mpt", "torch_dtype": "bfloat16"}))
    per_shard = max(1, round(total_bytes / 2 / (TENSOR_ELEMENTS * 2)))
    generator = torch.Generator().manual_seed(0)
    ext, stem = ("safetensors", "model") if fmt == "safetensors" else ("bin", "pytorch_model")
    shards, weight_map = [], {}
    for k in (1, 2):
        tensors = {}
        for i in range(per_shard):
            x = torch.randn(4096, TENSOR_ELEMENTS // 4096, generator=generator).mul_(0.02).to(torch.bfloat16)
            tensors[f"transformer.blocks.{(k - 1) * per_shard + i}.ffn.up_proj.weight"] = x
        first = next(iter(tensors.values()))
        first[0, :4] = torch.tensor([1e5, -7e4, 1e-9, float("nan")])
        shard = path / f"{stem}-{k:05d}-of-00002.{ext}"
        if ext == "safetensors":
            save_file(tensors, str(shard))
        else:
            torch.save(tensors, shard)
        weight_map.update(dict.fromkeys(tensors, shard.name))
        shards.append(shard)
        del tensors, first
    (path / f"{stem}.{ext}.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return shards


def time_copy(shards: list[Path], dst: Path) -> float:
    """Seconds to ``shutil.copyfile`` and fsync every shard into ``dst``."""
    dst.mkdir()
    start = time.perf_counter()
    for shard in shards:
        shutil.copyfile(shard, dst / shard.name)
        with open(dst / shard.name, "rb") as f:
            os.fsync(f.fileno())
    return time.perf_counter() - start


def run_conversion(src: Path, dst: Path, verify: bool, threads: int) -> dict:
    """Convert in a child process (``threads`` torch threads, 0: torch's default); its JSON
    result (seconds, bytes, RSS, counts)."""
    out = subprocess.run(
        [sys.executable, "-c", CHILD, str(REPO), str(src), str(dst), "1" if verify else "0", str(threads)],
        check=True,
        capture_output=True,
        text=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    """Build the data, run the copy and both conversions, print the numbers, clean up."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size-gib", type=float, default=2.0, help="checkpoint size in GiB (default 2)")
    parser.add_argument("--dir", type=Path, default=Path(tempfile.gettempdir()), help="where to put the data")
    parser.add_argument("--format", choices=["safetensors", "bin"], default="safetensors")
    parser.add_argument("--threads", type=int, default=0, help="torch threads for the conversion (0: default)")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="bench_convert-", dir=args.dir))
    try:
        start = time.perf_counter()
        shards = make_checkpoint(work / "src", int(args.size_gib * 1024**3), args.format)
        os.sync()  # so that write-back of the fresh data does not overlap the timed runs
        size, largest = sum(s.stat().st_size for s in shards), max(s.stat().st_size for s in shards)
        made_s = time.perf_counter() - start
        print(f"synthetic checkpoint: {size / 1e9:.3f} GB in {len(shards)} {args.format} shards "
              f"(largest {largest / 1e9:.3f} GB), made in {made_s:.1f} s")
        copy_s = time_copy(shards, work / "copy")
        shutil.rmtree(work / "copy")
        print(f"copyfile + fsync: {copy_s:.2f} s, {size / 1e9 / copy_s:.2f} GB/s")
        for verify in (False, True):
            r = run_conversion(work / "src", work / "out", verify, args.threads)
            shutil.rmtree(work / "out")
            gbps = r["input_bytes"] / 1e9 / r["seconds"]
            print(
                f"convert ({'verify' if verify else 'no verify'}, {r['threads']} threads): {r['seconds']:.2f} s, "
                f"{gbps:.2f} GB/s of input, {r['seconds'] / copy_s:.2f}x the copy time; "
                f"peak RSS {r['peak_rss'] / 1e9:.3f} GB (+{(r['peak_rss'] - r['base_rss']) / 1e9:.3f} GB over "
                f"{r['base_rss'] / 1e9:.3f} GB after imports); "
                f"clamped {r['clamped']}, flushed {r['flushed']}, nonfinite {r['nonfinite']}"
            )
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
