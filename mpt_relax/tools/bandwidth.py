"""Memory-bandwidth bound of decoding: bytes read per token / measured copy bandwidth.

Decoding one token reads every weight once (a matrix-vector product per layer and the LM
head) plus the KV cache of the context, and does ~2 flops per weight: on a CPU (and on a GPU
at batch 1) its speed is set by memory bandwidth. ``bound = bandwidth / bytes per token`` is
the most tokens/s any engine can decode on this machine, and ``decode / bound`` says how close
an engine gets.

Bandwidth is measured as a large copy, counted the STREAM way: bytes read + bytes written per
second; on the CPU a numpy copy (:func:`host_copy_bandwidth`), on a GPU a device-to-device
copy of TVM tensors (:func:`device_copy_bandwidth`). A read-only stream (a GEMV) can run
faster than a copy, whose writes cost extra bus traffic, so a fraction slightly above 1 is
possible.
"""

from __future__ import annotations

import concurrent.futures
import time
from collections.abc import Iterable

import numpy as np
import tvm

from mpt_relax.models.mpt.config import MPTConfig

COPY_BYTES = 512 * 2**20  # large enough to defeat every cache level
COPY_REPEATS = 5
LOOKUP_TABLES = ("transformer.wpe.",)  # read one row per token (wte too when the head is untied)


def host_copy_bandwidth(threads: int = 1, nbytes: int = COPY_BYTES, repeats: int = COPY_REPEATS) -> float:
    """Best copy bandwidth in bytes/s (read + written) of ``threads`` threads copying ``nbytes``."""
    src = np.ones(nbytes // 4, dtype=np.float32)
    dst = np.empty_like(src)
    dst.fill(0)  # fault the pages in before timing
    parts = [(p[0], p[-1] + 1) for p in np.array_split(np.arange(src.size), threads)]

    def copy(part: tuple[int, int]) -> None:
        np.copyto(dst[part[0] : part[1]], src[part[0] : part[1]])

    best = float("inf")
    with concurrent.futures.ThreadPoolExecutor(threads) as pool:  # numpy releases the GIL while copying
        for _ in range(repeats):
            start = time.perf_counter()
            list(pool.map(copy, parts))
            best = min(best, time.perf_counter() - start)
    return 2 * src.nbytes / best


def device_copy_bandwidth(device: tvm.runtime.Device, nbytes: int = COPY_BYTES, repeats: int = COPY_REPEATS) -> float:
    """Best bandwidth in bytes/s (read + written) of a device-to-device copy of ``nbytes``."""
    src = tvm.runtime.tensor(np.ones(nbytes // 4, dtype=np.float32), device)
    dst = tvm.runtime.empty(src.shape, "float32", device)
    src.copyto(dst)
    device.sync()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        src.copyto(dst)
        device.sync()
        best = min(best, time.perf_counter() - start)
    return 2 * nbytes / best


def weight_bytes_per_token(config: MPTConfig, tensors: Iterable[tuple[str, tuple[int, ...], int]]) -> int:
    """Bytes of weights one decode step reads, from ``(name, shape, nbytes)`` of every tensor.

    Lookup tables (learned positions; the token embedding when the LM head is a separate
    matrix) cost one row; everything else, the tied embedding/head included, is read whole.
    """
    tables = LOOKUP_TABLES if config.tie_word_embeddings else (*LOOKUP_TABLES, "transformer.wte.")
    total = 0
    for name, shape, nbytes in tensors:
        total += nbytes // shape[0] if name.startswith(tables) else nbytes
    return total


def kv_bytes_per_token(config: MPTConfig, dtype_bytes: int, context: float) -> float:
    """Bytes of K and V one decode step reads with ``context`` tokens cached, all layers."""
    return 2 * config.n_layers * config.kv_n_heads * config.head_dim * dtype_bytes * context


def decode_bound(config: MPTConfig, tensors, kv_dtype_bytes: int, prompt_len: int, gen_len: int,
                 bandwidth: float) -> dict[str, float]:
    """Bytes per decode token (mean over the decode steps of a bench run) and the tokens/s
    bound they give at ``bandwidth`` bytes/s."""
    mean_context = prompt_len + gen_len / 2  # decode steps see prompt_len + 1 .. prompt_len + gen_len - 1 tokens
    per_token = weight_bytes_per_token(config, tensors) + kv_bytes_per_token(config, kv_dtype_bytes, mean_context)
    return {"bytes_per_token": per_token, "bound_tokens_per_s": bandwidth / per_token}
