#!/usr/bin/env python3
"""Load benchmark of ``python -m mpt_relax serve``: 1 / 4 / 16 concurrent streaming clients.

Starts the server as a subprocess on a free localhost port, then for each concurrency level runs
that many clients, each sending streaming completions one after another (token-id prompts,
greedy, ``ignore_eos`` so that every reply has exactly ``--gen-len`` tokens). Reports the total
output tokens/s, time to first token and inter-token latency (p50 / p99), and the ratio of the
16-client throughput to the 1-client one: batched decode reads the weights once per step for
all sequences, so throughput should rise with concurrency.

    python scripts/make_random_checkpoint.py --d-model 768 --n-layers 12 --n-heads 12 --vocab 50432 \\
        dist/models/mpt-125m-random
    python scripts/build.py --model dist/models/mpt-125m-random --target llvm --quantization q4f16_1
    python scripts/bench_serve.py --artifact dist/mpt-125m-random-q4f16_1
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(args: argparse.Namespace, port: int) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "mpt_relax", "serve", "--artifact", args.artifact, "--device", args.device,
           "--port", str(port), "--max-batch-size", str(max(args.clients)), "--max-queue", "256",
           "--model-name", "bench", "--log-level", "warning"]
    if args.kv_memory:
        cmd += ["--kv-memory", args.kv_memory]
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    return subprocess.Popen(cmd, env=env, stderr=subprocess.PIPE, text=True)


def wait_healthy(proc: subprocess.Popen, base: str, timeout: float = 600) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"error: the server exited: {proc.stderr.read().strip()}")
        try:
            if httpx.get(base + "/health", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    raise SystemExit("error: the server did not become healthy")


async def one_request(http: httpx.AsyncClient, url: str, prompt: list[int], gen_len: int) -> dict:
    """Send one streamed completion; the arrival time of each token's chunk."""
    body = {"model": "bench", "prompt": prompt, "max_tokens": gen_len, "temperature": 0, "ignore_eos": True,
            "stream": True, "stream_options": {"include_usage": True}}
    t0 = time.perf_counter()
    arrivals, usage = [], None
    async with http.stream("POST", url, json=body) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                usage = chunk["usage"]
            if chunk.get("choices"):
                arrivals.append(time.perf_counter())
    return {"start": t0, "arrivals": arrivals, "tokens": usage["completion_tokens"] if usage else len(arrivals)}


async def run_level(url: str, clients: int, requests: int, prompt_len: int, gen_len: int, seed: int) -> list[dict]:
    rng = np.random.default_rng(seed)
    prompts = [rng.integers(2, 50000, prompt_len).tolist() for _ in range(requests)]
    queue = list(range(requests))
    results: list[dict] = []

    async def client(http: httpx.AsyncClient) -> None:
        while queue:
            i = queue.pop()
            results.append(await one_request(http, url, prompts[i], gen_len))

    limits = httpx.Limits(max_connections=clients + 2)
    async with httpx.AsyncClient(timeout=600, limits=limits) as http:
        await asyncio.gather(*(client(http) for _ in range(clients)))
    return results


def summarize(clients: int, results: list[dict]) -> dict:
    start = min(r["start"] for r in results)
    end = max(r["arrivals"][-1] for r in results)
    tokens = sum(r["tokens"] for r in results)
    ttft = [r["arrivals"][0] - r["start"] for r in results]
    itl = [b - a for r in results for a, b in zip(r["arrivals"], r["arrivals"][1:])]
    pct = lambda xs, q: float(np.percentile(xs, q)) * 1e3  # noqa: E731
    return {"clients": clients, "requests": len(results), "output_tokens": tokens, "seconds": end - start,
            "tokens_per_s": tokens / (end - start), "ttft_p50_ms": pct(ttft, 50), "ttft_p99_ms": pct(ttft, 99),
            "itl_p50_ms": pct(itl, 50), "itl_p99_ms": pct(itl, 99)}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--artifact", default="dist/mpt-125m-random-q4f16_1")
    p.add_argument("--device", default="cpu")
    p.add_argument("--clients", type=int, nargs="+", default=[1, 4, 16])
    p.add_argument("--requests", type=int, help="requests per level (default: max(4, 2 x clients))")
    p.add_argument("--prompt-len", type=int, default=64)
    p.add_argument("--gen-len", type=int, default=64)
    p.add_argument("--kv-memory", default="512MB")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    args = p.parse_args()

    port = free_port()
    base = f"http://127.0.0.1:{port}"
    proc = start_server(args, port)
    try:
        wait_healthy(proc, base)
        url = base + "/v1/completions"
        asyncio.run(run_level(url, 1, 1, args.prompt_len, 8, args.seed + 99))  # warm-up
        rows = []
        for c in args.clients:
            n = args.requests or max(4, 2 * c)
            rows.append(summarize(c, asyncio.run(run_level(url, c, n, args.prompt_len, args.gen_len, args.seed))))
            if not args.json:
                r = rows[-1]
                print(f"{c:>3} clients  {r['requests']:>3} requests  {r['tokens_per_s']:7.1f} tokens/s  TTFT p50 "
                      f"{r['ttft_p50_ms']:7.0f} ms p99 {r['ttft_p99_ms']:7.0f} ms  ITL p50 {r['itl_p50_ms']:6.1f} ms "
                      f"p99 {r['itl_p99_ms']:6.1f} ms", flush=True)
        by = {r["clients"]: r for r in rows}
        ratio = by[max(by)]["tokens_per_s"] / by[min(by)]["tokens_per_s"]
        if args.json:
            print(json.dumps({"artifact": args.artifact, "prompt_len": args.prompt_len, "gen_len": args.gen_len,
                              "levels": rows, "throughput_ratio": ratio}, indent=2))
        else:
            print(f"throughput {max(by)} clients / {min(by)} client: {ratio:.2f}x "
                  f"(prompt {args.prompt_len} tokens, {args.gen_len} new tokens per request)")
    finally:
        proc.terminate()
        proc.wait(60)
    return 0


if __name__ == "__main__":
    sys.exit(main())
