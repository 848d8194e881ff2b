"""Shared pieces of the ALiBi attention kernels: the spec they are specialised on, the bias,
the paged-length arithmetic, the runtime's kernel signatures and the fused-qkv split."""

from __future__ import annotations

import dataclasses
import math

import tvm
from tvm import tirx
from tvm.script import tirx as T

from mpt_relax.models.mpt.config import MPTConfig

LOG2E = math.log2(math.e)
NEG = -1.0e30  # running-max seed and empty-row lse: finite, so exp2(NEG - NEG) is defined


@dataclasses.dataclass(frozen=True)
class AttentionSpec:
    """What the attention kernels are specialised on.

    ``slopes`` is None when ALiBi is off (no bias), else one fp32 slope per query head.
    """

    n_heads: int
    kv_heads: int
    head_dim: int
    dtype: str
    page_size: int
    slopes: tuple[float, ...] | None

    @classmethod
    def from_config(cls, cfg: MPTConfig, dtype: str, page_size: int) -> "AttentionSpec":
        slopes = tuple(cfg.alibi_slopes()) if cfg.alibi else None
        return cls(cfg.n_heads, cfg.kv_n_heads, cfg.head_dim, dtype, page_size, slopes)

    @property
    def group(self) -> int:
        """Query heads per kv head: query head h reads kv head h // group."""
        return self.n_heads // self.kv_heads


def slope_log2(spec: AttentionSpec, head):
    """fp32 ``slope[head] * log2(e)``: the baked slopes picked by a balanced select tree."""
    if spec.slopes is None:
        return tirx.const(0.0, "float32")

    def pick(lo: int, hi: int):
        if hi - lo == 1:
            return tirx.const(spec.slopes[lo] * LOG2E, "float32")
        mid = (lo + hi) // 2
        return tirx.Select(head < mid, pick(lo, mid), pick(mid, hi))

    return pick(0, len(spec.slopes))


def _lanes(expr) -> int:
    """Vector lanes of a PrimExpr (1: a scalar)."""
    return tvm.DataType(str(expr.ty.dtype)).lanes


def alibi_bias(spec: AttentionSpec, slope_log2, key_pos, query_pos):
    """fp32 ALiBi term of a base-2 score: ``slope * log2(e) * (key_pos - query_pos)``, or 0.
    Either position may be an int32 vector of L lanes (the slope a scalar): a float32xL term."""
    lanes = max(_lanes(key_pos), _lanes(query_pos))

    def spread(value):
        return value if lanes == 1 or _lanes(value) == lanes else T.Broadcast(value, lanes)

    if spec.slopes is None:
        return spread(T.float32(0))
    return spread(slope_log2) * T.Cast("float32" if lanes == 1 else f"float32x{lanes}", spread(key_pos) - spread(query_pos))


def fast_exp2(x):
    """fp32 2**x for x <= 127 that vectorizes (LLVM calls libm's exp2f once per lane): 2**n from
    the exponent bits, n = round(x), times e**(f ln 2), f = x - n in [-1/2, 1/2], by its degree-7
    Taylor polynomial (truncation < 6e-9 relative); 0 below 2**-126 (the softmax's masked keys).
    ``x``: a float32 scalar or vector expression."""
    lanes = _lanes(x)
    typed = (lambda t: t) if lanes == 1 else (lambda t: f"{t}x{lanes}")
    x = T.max(x, T.float32(-127))
    n = T.nearbyint(x)
    y = (x - n) * T.float32(math.log(2))
    poly = T.float32(1 / 5040)
    for k in range(6, -1, -1):
        poly = poly * y + T.float32(1 / math.factorial(k))
    scale = T.reinterpret(typed("float32"), T.shift_left(T.Cast(typed("int32"), n) + 127, 23))
    if lanes == 1:
        return T.if_then_else(n < T.float32(-126), T.float32(0), poly * scale)
    return T.Select(n < T.float32(-126), T.Broadcast(T.float32(0), lanes), poly * scale)


def paged_kv_len(page_indptr, last_page_len, seq, page_size: int):
    """Tokens a sequence chunk holds in its pages: full pages plus the used part of the last."""
    num_pages = page_indptr[seq + 1] - page_indptr[seq]
    return T.if_then_else(num_pages > 0, (num_pages - 1) * page_size + last_page_len[seq], 0)


def visible_keys(causal, kv_len, key_pos0, query_pos):
    """How many leading keys (positions key_pos0, key_pos0+1, ...) the query at query_pos sees."""
    return T.if_then_else(causal > 0, T.max(T.min(query_pos - key_pos0 + 1, kv_len), 0), kv_len)


# ------------------------------------------------------------------------ kernel signatures
# The runtime calls each attention role with the same arguments on every target; these wrap a
# body macro (CPU loops or GPU thread blocks) in that role's signature.


def named(func: tirx.PrimFunc, name: str, attrs: dict) -> tirx.PrimFunc:
    for key, value in {"global_symbol": name, **attrs}.items():
        func = func.with_attr(key, value)
    return func


def ragged_prefill_kernel(spec: AttentionSpec, name: str, body, attrs: dict) -> tirx.PrimFunc:
    """q [n, H, hd], q_indptr = kv_indptr [b + 1], k/v [n, KV, hd], q_pos [n], k_pos_offset [b]
    -> output [n, H, hd], lse [n, H]; ``body(q, q_indptr, k, v, kv_indptr, q_pos, k_pos_offset,
    output, lse, causal, sm_scale, batch_size)``."""
    H, KV, D, dtype = spec.n_heads, spec.kv_heads, spec.head_dim, spec.dtype

    # fmt: off
    @T.prim_func(s_tir=True)
    def kernel(
        var_q: T.handle, var_q_indptr: T.handle, var_k: T.handle, var_v: T.handle,
        var_kv_indptr: T.handle, var_q_pos: T.handle, var_k_pos_offset: T.handle,
        var_output: T.handle, var_lse: T.handle,
        causal: T.int32, rotary_mode: T.int32, rope_scale: T.float32, rope_theta: T.float32,
        sm_scale: T.float32,
    ):
        batch_size, qo_len, kv_total = T.int32(), T.int32(), T.int32()
        q = T.match_buffer(var_q, (qo_len, H, D), dtype)
        q_indptr = T.match_buffer(var_q_indptr, (batch_size + 1,), "int32", elem_offset=T.int32())
        k = T.match_buffer(var_k, (kv_total, KV, D), dtype)
        v = T.match_buffer(var_v, (kv_total, KV, D), dtype)
        kv_indptr = T.match_buffer(var_kv_indptr, (batch_size + 1,), "int32", elem_offset=T.int32())
        q_pos = T.match_buffer(var_q_pos, (qo_len,), "int32", elem_offset=T.int32())
        k_pos_offset = T.match_buffer(var_k_pos_offset, (batch_size,), "int32", elem_offset=T.int32())
        output = T.match_buffer(var_output, (qo_len, H, D), dtype)
        lse = T.match_buffer(var_lse, (qo_len, H), "float32")
        body(q, q_indptr, k, v, kv_indptr, q_pos, k_pos_offset, output, lse, causal, sm_scale, batch_size)
    # fmt: on
    return named(kernel, name, attrs)


def paged_prefill_kernel(spec: AttentionSpec, name: str, body, attrs: dict) -> tirx.PrimFunc:
    """q [n, H, hd], q_indptr [b + 1], pages [P, 2, KV, page_size, hd], page_indptr [b + 1],
    page_values [nnz_pages], last_page_len [b], k_pos_offset [b], q_pos [n] -> output [n, H, hd],
    lse [n, H]; ``body(q, q_indptr, pages, page_indptr, page_values, last_page_len,
    k_pos_offset, q_pos, output, lse, causal, sm_scale, batch_size)``."""
    H, KV, D, dtype, page_size = spec.n_heads, spec.kv_heads, spec.head_dim, spec.dtype, spec.page_size

    # fmt: off
    @T.prim_func(s_tir=True)
    def kernel(
        var_q: T.handle, var_q_indptr: T.handle, var_pages: T.handle, var_page_indptr: T.handle,
        var_page_values: T.handle, var_last_page_len: T.handle, var_k_pos_offset: T.handle,
        var_q_pos: T.handle, var_output: T.handle, var_lse: T.handle,
        causal: T.int32, rotary_mode: T.int32, rope_scale: T.float32, rope_theta: T.float32,
        sm_scale: T.float32,
    ):
        batch_size, total_len, nnz_pages, max_num_pages = T.int32(), T.int32(), T.int32(), T.int32()
        q = T.match_buffer(var_q, (total_len, H, D), dtype)
        q_indptr = T.match_buffer(var_q_indptr, (batch_size + 1,), "int32", elem_offset=T.int32())
        pages = T.match_buffer(var_pages, (max_num_pages, 2, KV, page_size, D), dtype, elem_offset=T.int64())
        page_indptr = T.match_buffer(var_page_indptr, (batch_size + 1,), "int32", elem_offset=T.int32())
        page_values = T.match_buffer(var_page_values, (nnz_pages,), "int32", elem_offset=T.int32())
        last_page_len = T.match_buffer(var_last_page_len, (batch_size,), "int32", elem_offset=T.int32())
        k_pos_offset = T.match_buffer(var_k_pos_offset, (batch_size,), "int32", elem_offset=T.int32())
        q_pos = T.match_buffer(var_q_pos, (total_len,), "int32", elem_offset=T.int32())
        output = T.match_buffer(var_output, (total_len, H, D), dtype)
        lse = T.match_buffer(var_lse, (total_len, H), "float32")
        body(q, q_indptr, pages, page_indptr, page_values, last_page_len, k_pos_offset, q_pos, output, lse, causal, sm_scale, batch_size)
    # fmt: on
    return named(kernel, name, attrs)


def decode_kernel(spec: AttentionSpec, name: str, body, attrs: dict) -> tirx.PrimFunc:
    """q [b, H, hd], pages [P, 2, KV, page_size, hd], page_indptr [b + 1], page_values
    [nnz_pages], last_page_len [b], k_pos_offset [b], q_pos [b] -> output [b, H, hd], lse [b, H];
    ``body(q, pages, page_indptr, page_values, last_page_len, k_pos_offset, q_pos, output, lse,
    sm_scale, batch_size)``."""
    H, KV, D, dtype, page_size = spec.n_heads, spec.kv_heads, spec.head_dim, spec.dtype, spec.page_size

    # fmt: off
    @T.prim_func(s_tir=True)
    def kernel(
        var_q: T.handle, var_pages: T.handle, var_page_indptr: T.handle, var_page_values: T.handle,
        var_last_page_len: T.handle, var_k_pos_offset: T.handle, var_q_pos: T.handle,
        var_output: T.handle, var_lse: T.handle,
        rotary_mode: T.int32, rope_scale: T.float32, rope_theta: T.float32, sm_scale: T.float32,
    ):
        B, nnz_pages, max_num_pages = T.int32(), T.int32(), T.int32()
        q = T.match_buffer(var_q, (B, H, D), dtype)
        pages = T.match_buffer(var_pages, (max_num_pages, 2, KV, page_size, D), dtype, elem_offset=T.int64())
        page_indptr = T.match_buffer(var_page_indptr, (B + 1,), "int32", elem_offset=T.int32())
        page_values = T.match_buffer(var_page_values, (nnz_pages,), "int32", elem_offset=T.int32())
        last_page_len = T.match_buffer(var_last_page_len, (B,), "int32", elem_offset=T.int32())
        k_pos_offset = T.match_buffer(var_k_pos_offset, (B,), "int32", elem_offset=T.int32())
        q_pos = T.match_buffer(var_q_pos, (B,), "int32", elem_offset=T.int32())
        output = T.match_buffer(var_output, (B, H, D), dtype)
        lse = T.match_buffer(var_lse, (B, H), "float32")
        body(q, pages, page_indptr, page_values, last_page_len, k_pos_offset, q_pos, output, lse, sm_scale, B)
    # fmt: on
    return named(kernel, name, attrs)



# ---------------------------------------------------------------------------- shared helpers


def split_fused_qkv(spec: AttentionSpec):
    """Split fused qkv [n, H + 2*KV, hd] into q [n, H, hd], k, v [n, KV, hd] (no rotary).

    Keeps the runtime's ``f_split_rotary`` signature; the position map and the rotary flag
    are ignored because ALiBi rotates nothing.
    """
    H, KV, D, dtype = spec.n_heads, spec.kv_heads, spec.head_dim, spec.dtype

    @T.prim_func(s_tir=True)
    def alibi_split_qkv(
        var_qkv: T.handle, var_position_map: T.handle, var_q: T.handle, var_k: T.handle, var_v: T.handle,
        apply_rope: T.int64,
    ):
        T.func_attr({"op_pattern": 8, "tirx.noalias": True})
        seq_len = T.int32()
        qkv = T.match_buffer(var_qkv, (seq_len, H + 2 * KV, D), dtype)
        q = T.match_buffer(var_q, (seq_len, H, D), dtype)
        k = T.match_buffer(var_k, (seq_len, KV, D), dtype)
        v = T.match_buffer(var_v, (seq_len, KV, D), dtype)
        for i, h, x in T.grid(seq_len, H + 2 * KV, D):
            with T.sblock("split_qkv"):
                vi, vh, vx = T.axis.remap("SSS", [i, h, x])
                if vh < H:
                    q[vi, vh, vx] = qkv[vi, vh, vx]
                elif vh < H + KV:
                    k[vi, vh - H, vx] = qkv[vi, vh, vx]
                else:
                    v[vi, vh - H - KV, vx] = qkv[vi, vh, vx]

    return alibi_split_qkv


