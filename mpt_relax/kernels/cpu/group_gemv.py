"""Decode GEMV on group-quantized weights: ``y = x @ W^T`` for a few rows of x, W
q4f16_1 / q8f16_1 (:mod:`mpt_relax.quantization.group`), exact (x not quantized): the weights
``(code - offset) * scale`` in fp32, fp32 products and sums.

A code needs no conversion to become a float: shifted to the top of a float's mantissa and
OR-ed into the bits of 1.0 it reads as ``v = 1 + code / 2^bits``, exactly (a shift and one
``vpternlogd`` per 16 codes). With ``c0 = (2^bits + offset) / 2^bits``, ``x * (code - offset)
= 2^bits * (x * v - c0 * x)``, so a row is

    y = 2^bits * sum_groups scale * (sum_k x[k] * v[k] - c0 * sum_k x[k])

- 16 uint32 words of a row (128 q4 / 64 q8 weights, whole groups) are one chunk: lane i holds
  word i, and the j-th code of every word gives one vector of v (16 lanes, one FMA with x,
  whose elements the call lays out once in that order, with ``c0 * sum x`` per word);
- each lane's sum is multiplied by its group's scale (4 or 8 lanes per group, one fp16 load
  and conversion per chunk) into two accumulator vectors, summed by a halving tree at the end;
- one weight row per parallel task, read front to back, each cache line prefetched into L1
  (:func:`prefetch_distance` ahead);
- a single row of x (a decode step) takes its own copy of the loop: with a loop over the rows
  around it, LLVM hoisted a row's v vectors out of it, spilling them all to the stack.

The fused dequantize + ``NT_matmul`` it replaces (and prefill) rounds each weight to the
scale's dtype (fp16) first: a weight moves by at most half an fp16 step (2^-12 of it), and
llama.cpp dequantizes Q4_0 / Q8_0 in fp32 likewise. On one Zen 4 core, 3072 x 768 from DRAM:
q4 12.3 G weights/s rounding each group's table of weights to fp16 (``vpermps`` lookups),
17.5 without the rounding, 21.2 this way; q8 8.8 / 13.8 / 16.7 (17.2 for 768 x 3072, 18.3 for
the 50432 x 768 head).

:mod:`mpt_relax.compile.decode_gemv` puts it in the decode step of x86 llvm targets with AVX2
and FMA: plain 16-lane integer and fp32 vector code, two 256-bit halves each without AVX-512. An
``--mcpu x86-64-v3`` build of the 125M model (on the Zen 4) decoded exact q4f16_1 at 103-111
tokens/s at one thread with it, 29.5 with the scheduled GEMV on the fused dequantize.
"""

from __future__ import annotations

from tvm import tirx
from tvm.script import tirx as T

from mpt_relax.kernels.lanes import bound, halving_sum

from .float_gemv import PREFETCH_BYTES, prefetch_bytes
from .int8_gemv import GROUP, code_offset, prefetch_l1

REQUIRED_FEATURES = ["avx2", "fma"]
WORDS = 16  # uint32 words of codes per chunk: one vector
# how far ahead the codes are asked for on AMD Zen: one Zen 4 core from DRAM, q8 3072 x 768 /
# 50432 x 768: 15.6 / 18.3 G weights/s at 8 KiB, 14.5 / 15.5 at 64 KiB (q4 alike or a little better)
ZEN_PREFETCH_BYTES = 8192
_ONE = 0x3F800000  # the bits of float32 1.0


def codes_per_chunk(bits: int) -> int:
    """Weights per chunk of 16 words: 128 (q4), 64 (q8)."""
    return WORDS * 32 // bits


def supported(out_features: int, in_features: int, bits: int) -> bool:
    """Whether the kernel takes a [out, in] weight of ``bits``-bit codes: in whole chunks."""
    return in_features % codes_per_chunk(bits) == 0 and out_features > 0


def prefetch_distance(target) -> int:
    """Bytes of codes ahead the kernel prefetches on ``target``'s CPU."""
    return prefetch_bytes(target, ZEN_PREFETCH_BYTES, PREFETCH_BYTES)


def group_gemv(out_features: int, in_features: int, bits: int, x_dtype: str, out_dtype: str,
               scale_dtype: str = "float16", distance: int = PREFETCH_BYTES) -> tirx.PrimFunc:
    """PrimFunc (q_weight uint32 [N, K*bits/32], q_scale ``scale_dtype`` [N, K/32], x [M, K]
    ``x_dtype``) -> y [M, N] ``out_dtype`` (the argument order of the fused kernel it replaces);
    the codes prefetched ``distance`` bytes ahead (whole rows, at least one)."""
    N, K = out_features, in_features
    per_word, chunk = 32 // bits, codes_per_chunk(bits)
    C, words, G = K // chunk, K // per_word, K // GROUP
    groups = chunk // GROUP  # per chunk
    c0 = (2**bits + code_offset(bits)) / 2**bits  # exact in fp32
    ahead = max(1, distance // (words * 4))

    def values(word_vec, j):
        """float32x16: ``1 + code / 2^bits`` of code ``j`` of each of the 16 words."""
        shift = 23 - bits * (j + 1)  # left: code j's lowest bit to mantissa bit 23 - bits

        def splat(v):
            return T.Broadcast(T.uint32(v), 16)

        moved = T.shift_left(word_vec, splat(shift)) if shift >= 0 else T.shift_right(word_vec, splat(-shift))
        return T.reinterpret((moved & splat((2**bits - 1) << (23 - bits))) | splat(_ONE), dtype="float32x16")

    def chunk_sums(qw, xv, xc, n, m, c):
        """float32x16: per word of chunk ``c``, sum_j x * v - c0 * sum_j x (two FMA chains)."""
        def use(word_vec):
            even, odd = None, None
            for j in range(per_word):
                term = values(word_vec, j) * xv[m, T.ramp(c * chunk + j * WORDS, 1, WORDS)]
                if j % 2:
                    odd = term if odd is None else odd + term
                else:
                    even = term if even is None else even + term
            return (even - xc[m, T.ramp(c * WORDS, 1, WORDS)]) + odd

        return bound(qw[n, T.ramp(c * WORDS, 1, WORDS)], use)

    def lane_scales(qs, n, c):
        """float32x16: each word's group scale (word i is in group i // (16 / groups) of the chunk)."""
        return bound(T.Cast(f"float32x{groups}", qs[n, T.ramp(c * groups, 1, groups)]),
                     lambda v: T.Shuffle([v] * (WORDS // groups), [i * groups // WORDS for i in range(WORDS)]))

    @T.macro
    def add_chunk(qw, qs, xv, xc, acc, n, m, h, c):
        """Chunk ``c`` of row ``n``, scaled, into accumulator ``h``; its line of the row ``ahead`` prefetched."""
        prefetch_l1(qw, T.min(n + ahead, N - 1), c * WORDS)
        acc[T.ramp(h * WORDS, 1, WORDS)] = acc[T.ramp(h * WORDS, 1, WORDS)] + lane_scales(qs, n, c) * chunk_sums(
            qw, xv, xc, n, m, c)

    @T.macro
    def row(qw, qs, xv, xc, y, acc, n, m):
        acc[T.ramp(0, 1, 2 * WORDS)] = T.Broadcast(T.float32(0), 2 * WORDS)
        for c2 in range(C // 2):
            for h in T.unroll(2):  # two chunks per step: two accumulators
                add_chunk(qw, qs, xv, xc, acc, n, m, h, c2 * 2 + h)
        if C % 2 == 1:
            add_chunk(qw, qs, xv, xc, acc, n, m, 0, C - 1)
        y[m, n] = T.Cast(out_dtype, halving_sum(acc[T.ramp(0, 1, 2 * WORDS)], 2 * WORDS)[0] * T.float32(2**bits))

    @T.prim_func(private=True, s_tir=True)
    def func(qw_h: T.handle, qs_h: T.handle, x_h: T.handle, y_h: T.handle):
        T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True, "op_pattern": 8})  # kOpaque: never fused
        M = T.int64()
        qw = T.match_buffer(qw_h, (N, words), "uint32")
        qs = T.match_buffer(qs_h, (N, G), scale_dtype)
        x = T.match_buffer(x_h, (M, K), x_dtype)
        y = T.match_buffer(y_h, (M, N), out_dtype)
        with T.sblock("root"):
            xv = T.alloc_buffer((M, K), "float32")  # x in the kernel's order: chunk, code j, word
            xc = T.alloc_buffer((M, words), "float32")  # c0 * the sum of each word's x
            for m, c, i in T.grid(M, C, WORDS):
                xc[m, c * WORDS + i] = T.float32(0)
                for j in range(per_word):
                    xv[m, c * chunk + j * WORDS + i] = T.Cast("float32", x[m, c * chunk + i * per_word + j])
                    xc[m, c * WORDS + i] = xc[m, c * WORDS + i] + T.float32(c0) * xv[m, c * chunk + j * WORDS + i]
            for n in T.parallel(N):
                with T.sblock("row"):
                    acc = T.sblock_alloc_buffer((2 * WORDS,), "float32")  # a row's accumulators (in registers)
                    if M == 1:
                        row(qw, qs, xv, xc, y, acc, n, 0)
                    else:
                        for m in range(M):
                            row(qw, qs, xv, xc, y, acc, n, m)

    return func
