"""The paged-KV attention test harness shared by tests/kernels/test_attention.py (LLVM) and
tests/vulkan/test_vulkan_kernels.py: tiny attention configs, a Relax module that creates the
ALiBi cache and exposes one attention call per layer, a driver that keeps every sequence's K/V
history, and the dense fp64 reference it checks each output row against:
scores = q.k * scale + slope_h * (j - i), causal, softmax, @ v.
"""

from __future__ import annotations

import functools

import numpy as np
import tvm
from tvm import relax
from tvm.relax.frontend import nn

from mpt_relax.compile.kv_cache import ALiBiPagedKVCache
from mpt_relax.models.mpt.config import MPTConfig
from mpt_relax.runtime.kv_state import PagedKVCacheRuntime

PAGE = 16
TARGET = tvm.target.Target("llvm")
TOL = {"float32": 2e-5, "float16": 4e-3}

MHA = MPTConfig(d_model=64, n_heads=4, n_layers=1)  # hd 16
MQA_6 = MPTConfig(d_model=96, n_heads=6, n_layers=1, kv_n_heads=1)  # non-power-of-two heads
GQA = MPTConfig(d_model=256, n_heads=8, n_layers=1, kv_n_heads=2)  # hd 32
TWO_LAYERS = MPTConfig(d_model=64, n_heads=4, n_layers=2, kv_n_heads=2)
NO_ALIBI = MPTConfig(d_model=64, n_heads=4, n_layers=1, kv_n_heads=2, alibi=False, softmax_scale=0.3)
LONG = MPTConfig(d_model=64, n_heads=4, n_layers=1, kv_n_heads=1)
ODD_HEAD_DIM = MPTConfig(d_model=48, n_heads=2, n_layers=1)  # hd 24: the CPU decode scores one key at a time


class AttentionModule(nn.Module):
    """Creates the cache and exposes one attention call per layer (``attention_<layer>``, L <= 2)."""

    def __init__(self, cfg: MPTConfig, dtype: str, target: tvm.target.Target = TARGET, page: int = PAGE):
        self.cfg, self.dtype, self.target, self.page = cfg, dtype, target, page

    def create_paged_kv_cache(self, max_batch_size, max_total_seq_len, prefill_chunk_size):
        return ALiBiPagedKVCache.create(
            self.cfg, self.dtype, self.target, max_batch_size, max_total_seq_len, prefill_chunk_size, self.page
        )

    def spec(self) -> dict:
        cfg, none = self.cfg, {"param_mode": "none", "effect_mode": "none"}
        spec = {"create_paged_kv_cache": {"max_batch_size": int, "max_total_seq_len": int, "prefill_chunk_size": int, "$": none}}
        for layer in range(cfg.n_layers):
            spec[f"attention_{layer}"] = {
                "q": nn.spec.Tensor(["n", cfg.n_heads, cfg.head_dim], self.dtype),
                "k": nn.spec.Tensor(["n", cfg.kv_n_heads, cfg.head_dim], self.dtype),
                "v": nn.spec.Tensor(["n", cfg.kv_n_heads, cfg.head_dim], self.dtype),
                "cache": nn.spec.Object(object_type=ALiBiPagedKVCache),
                "$": none,
            }
        return spec

    def attention_0(self, q, k, v, cache):
        return cache.attention(0, q, k, v, self.cfg.attn_scale)

    def attention_1(self, q, k, v, cache):
        return cache.attention(1, q, k, v, self.cfg.attn_scale)


@functools.lru_cache(maxsize=None)
def cache_vm(cfg: MPTConfig, dtype: str, page: int = PAGE) -> relax.VirtualMachine:
    module = AttentionModule(cfg, dtype, page=page)
    mod, _ = module.export_tvm(module.spec())
    return relax.VirtualMachine(tvm.compile(mod, TARGET), tvm.cpu())


def shape_tuples(*values: int) -> list[tvm.runtime.ShapeTuple]:
    return [tvm.runtime.ShapeTuple([v]) for v in values]


class Harness:
    """A cache plus the full K/V history of every sequence, for the dense reference."""

    def __init__(self, cfg: MPTConfig, dtype: str, capacity: int = 4096, chunk: int = 512, seed: int = 0,
                 vm: relax.VirtualMachine | None = None, device: tvm.runtime.Device | None = None, page: int = PAGE):
        """``vm`` / ``device``: the compiled cache module and its device (default: LLVM, the CPU);
        ``page``: tokens per page of the LLVM module."""
        self.cfg, self.dtype = cfg, dtype
        self.vm = vm or cache_vm(cfg, dtype, page)
        self.device = device or tvm.cpu()
        self.rt = PagedKVCacheRuntime(self.vm["create_paged_kv_cache"](*shape_tuples(8, capacity, chunk)), page)
        self.rng = np.random.default_rng(seed)
        self.k: dict[tuple[int, int], np.ndarray] = {}  # (seq, layer) -> [T, KV, hd]
        self.v: dict[tuple[int, int], np.ndarray] = {}

    def add(self, seq: int) -> None:
        self.rt.add_sequence(seq)
        for layer in range(self.cfg.n_layers):
            self.k[seq, layer] = self.v[seq, layer] = np.zeros((0, self.cfg.kv_n_heads, self.cfg.head_dim))

    def fork(self, parent: int, child: int, pos: int) -> None:
        self.rt.fork_sequence(parent, child, pos)
        for layer in range(self.cfg.n_layers):
            self.k[child, layer] = self.k[parent, layer][:pos]
            self.v[child, layer] = self.v[parent, layer][:pos]

    def remove(self, seq: int) -> None:
        self.rt.remove_sequence(seq)
        for layer in range(self.cfg.n_layers):
            del self.k[seq, layer], self.v[seq, layer]

    def _random(self, n: int, heads: int) -> np.ndarray:
        """Values rounded to the cache dtype (the reference then sees what the kernel sees)."""
        return self.rng.standard_normal((n, heads, self.cfg.head_dim)).astype(self.dtype).astype("float64")

    def forward(self, batch: list[tuple[int, int]]) -> float:
        """Run one forward of ``(seq, new tokens)`` pairs on every layer; return the max error."""
        cfg = self.cfg
        self.rt.begin_forward([s for s, _ in batch], [n for _, n in batch])
        worst = 0.0
        for layer in range(cfg.n_layers):
            new = [(self._random(n, cfg.n_heads), self._random(n, cfg.kv_n_heads), self._random(n, cfg.kv_n_heads)) for _, n in batch]
            q, k, v = (tvm.runtime.tensor(np.concatenate(x).astype(self.dtype), self.device) for x in zip(*new))
            out = self.vm[f"attention_{layer}"](q, k, v, self.rt.cache).numpy().astype("float64")
            assert np.isfinite(out).all()
            start = 0
            for (seq, n), (q_new, k_new, v_new) in zip(batch, new):
                self.k[seq, layer] = np.concatenate([self.k[seq, layer], k_new])
                self.v[seq, layer] = np.concatenate([self.v[seq, layer], v_new])
                expected = reference(cfg, q_new, self.k[seq, layer], self.v[seq, layer])
                worst = max(worst, float(np.abs(out[start : start + n] - expected).max()))
                start += n
        self.rt.end_forward()
        return worst

    def check(self, batch: list[tuple[int, int]]) -> None:
        assert self.forward(batch) < TOL[self.dtype]


def reference(cfg: MPTConfig, q: np.ndarray, k: np.ndarray, v: np.ndarray, rows: np.ndarray | None = None) -> np.ndarray:
    """Dense attention of the last n queries q [n, H, hd] over k/v [T, KV, hd] -> [n, H, hd].

    Query r sits at position T - n + r; ``rows`` restricts the computation to those query rows.
    """
    n, total = q.shape[0], k.shape[0]
    rows = np.arange(n) if rows is None else rows
    group = cfg.n_heads // cfg.kv_n_heads
    slopes = np.asarray(cfg.alibi_slopes()) if cfg.alibi else np.zeros(cfg.n_heads)
    i = (total - n + rows)[:, None]
    j = np.arange(total)[None, :]
    out = np.empty((len(rows), cfg.n_heads, cfg.head_dim))
    for h in range(cfg.n_heads):
        scores = q[rows, h] @ k[:, h // group].T * cfg.attn_scale + slopes[h] * (j - i)
        scores = np.where(j <= i, scores, -np.inf)
        p = np.exp(scores - scores.max(axis=1, keepdims=True))
        out[:, h] = (p / p.sum(axis=1, keepdims=True)) @ v[:, h // group]
    return out
