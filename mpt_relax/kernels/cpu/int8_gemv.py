"""Decode GEMV on int8 activations: ``y = x @ W^T`` with W group-quantized (q4f16_1, q8f16_1)
and x quantized to int8 per group of 32 once per token, the products summed in integers.

The math (``off`` = the codes' offset: 7 for int4, 127 for int8; ``g`` a group of 32 inputs)::

    xs[m, g]   = max_k |x[m, k]| / 127                    (k in g; 0 for an all-zero group)
    xq[m, k]   = clip(rint(x[m, k] / xs[m, g]), -127, 127)  int8
    xc[m, g]   = xs[m, g] * off * sum_k xq[m, k]           the codes' offset, folded once per token
    y[m, n]    = sum_g ws[n, g] * (xs[m, g] * sum_k code[n, k] * xq[m, k] - xc[m, g])

``code`` is the stored unsigned code (``w / ws + off``), so ``code * xq`` is exactly the
unsigned-by-signed byte product that ``vpdpbusd`` (AVX512-VNNI, AVX-VNNI) sums four at a time
into int32 lanes: one instruction per 64 (or 32) weights, and one fp32 multiply-add per pair of
groups. The only rounding beyond the exact path is x's: at most ``xs / 2`` per input.

Two PrimFuncs per layer shape, both already scheduled (``tirx.is_scheduled``):

- :func:`quantize_activation`: x [M, K] -> xq int8 [M, K], xs, xc float32 [M, K / 32]. For int4
  weights each group's 32 values are stored evens first, then odds: the order in which a
  vector of 16 code bytes yields its low nibbles, then its high ones.
- :func:`int8_gemv`: (xq, xs, xc, q_weight, q_scale) -> y [M, N]. ``isa`` picks the kernel:
  ``avx512vnni`` (512-bit vpdpbusd, two groups per instruction), ``avxvnni`` (256-bit, one
  group) or ``generic`` (plain integer loops: the same numbers on any CPU, slower); int4
  weights with K a multiple of 128 take four groups per pair of vpdpbusd on either width
  (:func:`_vnni_int4`). The model emits ``generic``;
  :func:`mpt_relax.compile.int8_kernels.select_int8_kernels` swaps in the fastest the target has.

Rows of W are processed ``ROWS`` at a time (independent accumulator chains sharing each load
of x), all M rows of x per block of W (so a weight byte is read once per call), blocks in
parallel. One row per block streams W front to back, which beat four interleaved rows on the
125M model's GEMVs read from DRAM (AMD EPYC, q4: 21-24 vs 16.5 GB/s at 2 threads, 15 vs 9.6
at 1; q8: 19.3 vs 16.7), as it did for :mod:`.float_gemv`. The VNNI kernels prefetch the
weights ``PREFETCH_BYTES`` ahead into L2 (the hardware prefetchers alone left a decode step's GEMVs at
half the speed they reach from cache) and sum each row's lanes and offset corrections with a
tree of vector adds.
"""

from __future__ import annotations

from tvm import tirx
from tvm.script import tirx as T

from mpt_relax.kernels.lanes import halving_sum, prefetch_line

GROUP = 32
ROWS = 1
QUAD_GROUPS = 4  # groups per step of the int4 VNNI kernel, 512- or 256-bit (K a multiple of 128)
PREFETCH_BYTES = 16384  # how far ahead the VNNI kernels ask for weights: 2x faster from DRAM
PARALLEL_ROWS = 4  # rows of x from which quantize_activation runs rows in parallel
KERNEL_ATTR = "mpt_relax.int8_gemv"  # func attr: {"bits", "in", "out", "isa"}; see compile.int8_kernels
ISAS = ("avx512vnni", "avxvnni", "generic")
# the GGUF block types' kernels (Q6_K, Q4_K, Q5_K): attr {"block", "in", "out", "out_dtype", "isa"}
BLOCK_KERNEL_ATTR = "mpt_relax.block_int8_gemv"
BLOCK_ISAS = ("avx512vnni", "generic")
# LLVM emits the 256-bit form as AVX-VNNI's VEX encoding where the target has no AVX512-VL
_DOT = {16: "llvm.x86.avx512.vpdpbusd.512", 8: "llvm.x86.avx512.vpdpbusd.256"}
_LANES = {"avx512vnni": 16, "avxvnni": 8}  # int32 lanes of one vpdpbusd


@T.macro
def prefetch(buf, row, col):
    """Ask for the cache line of ``buf[row, col]`` into L2, for reading: the kernels that stream
    weights faster than a core's L1 misses can be kept in flight. On one AMD Zen 4 core, from
    DRAM, the q4 int8 GEMV went from 15.5-16.8 to 22.5-23.5 GB/s (50432 x 768) against L1
    prefetches, the Q6_K int8 head from 16-19 to 24-25, the fp16 GEMV from 26-29 to 29-31.5; the
    L2 hit that follows costs nothing these kernels notice (same speed from cache)."""
    T.evaluate(prefetch_line(T.address_of(buf[row, col]), 2))


@T.macro
def prefetch_l1(buf, row, col):
    """Ask for the cache line of ``buf[row, col]`` into L1: the compute-bound kernels (the
    exact dequantizing GEMVs, 6-14 G weights/s per core, 2-5 % slower with :func:`prefetch`) and
    the prefill matmuls (no difference)."""
    T.evaluate(prefetch_line(T.address_of(buf[row, col])))


def block_kernel(type_name: str, builders: dict, out_features: int, in_features: int, out_dtype: str,
                 isa: str) -> tirx.PrimFunc:
    """A GGUF block type's int8-activation GEMV: ``builders[isa](N, K, out_dtype)`` (one per
    :data:`BLOCK_ISAS`), tagged with :data:`BLOCK_KERNEL_ATTR` for :mod:`mpt_relax.compile.int8_kernels`."""
    if isa not in builders:
        raise ValueError(f"unknown {type_name} int8 GEMV kernel {isa!r}; one of {tuple(builders)}")
    func = builders[isa](out_features, in_features, out_dtype)
    return func.with_attr(BLOCK_KERNEL_ATTR, {"block": type_name, "in": in_features, "out": out_features,
                                              "out_dtype": out_dtype, "isa": isa})


def code_offset(bits: int) -> int:
    """The offset stored codes carry: 7 (int4), 127 (int8)."""
    return 2 ** (bits - 1) - 1


def group_position(i, bits: int):
    """Where element ``i`` (0..31) of a group is stored in xq (and in the exact q4 GEMV's x):
    int4 puts evens first, then odds."""
    return i if bits == 8 else (i % 2) * 16 + i // 2


def quantize_activation(in_features: int, bits: int, x_dtype: str) -> tirx.PrimFunc:
    """PrimFunc (x [M, K] ``x_dtype``) -> (xq int8 [M, K], xs f32 [M, K/32], xc f32 [M, K/32]).

    One group is one 32-lane vector: its max |x| and code total are halving trees, int4's
    evens-then-odds order one shuffle. Rows run in parallel from ``PARALLEL_ROWS`` rows on (a
    prompt), serially below (a decode step, where waking the thread pool costs more)."""
    K, G, off = in_features, in_features // GROUP, float(code_offset(bits))
    order = [p if bits == 8 else p % 16 * 2 + p // 16 for p in range(GROUP)]  # element stored at position p
    f32 = f"float32x{GROUP}"

    def group(x, m, g):
        return T.Cast(f32, x[m, T.ramp(g * GROUP, 1, GROUP)])

    def fold_max(v):
        width = GROUP
        while width > 1:
            width //= 2
            v = T.max(T.Shuffle([v], list(range(width))), T.Shuffle([v], list(range(width, 2 * width))))
        return v

    @T.macro
    def one_group(x, xq, xs, xc, m, g):
        xs[m, g] = fold_max(T.fabs(group(x, m, g)))  # max |x| for now, the scale below
        xq[m, T.ramp(g * GROUP, 1, GROUP)] = T.Cast(f"int8x{GROUP}", T.Shuffle([T.max(T.min(T.nearbyint(
            group(x, m, g) * T.broadcast(T.if_then_else(xs[m, g] > T.float32(0), T.float32(127) / xs[m, g], T.float32(0)),
                                         GROUP)), T.broadcast(T.float32(127), GROUP)), T.broadcast(T.float32(-127), GROUP))],
            order))
        xs[m, g] = xs[m, g] / T.float32(127)
        xc[m, g] = xs[m, g] * T.float32(off) * T.Cast(
            "float32", halving_sum(T.Cast(f"int32x{GROUP}", xq[m, T.ramp(g * GROUP, 1, GROUP)]), GROUP)[0])

    @T.prim_func(private=True, s_tir=True)
    def func(x_h: T.handle, xq_h: T.handle, xs_h: T.handle, xc_h: T.handle):
        T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True, "op_pattern": 8})  # kOpaque: never fused
        M = T.int64()
        x = T.match_buffer(x_h, (M, K), x_dtype)
        xq = T.match_buffer(xq_h, (M, K), "int8")
        xs = T.match_buffer(xs_h, (M, G), "float32")
        xc = T.match_buffer(xc_h, (M, G), "float32")
        with T.sblock("root"):
            if M >= PARALLEL_ROWS:
                for m in T.parallel(M):
                    for g in range(G):
                        one_group(x, xq, xs, xc, m, g)
            else:
                for m, g in T.grid(M, G):
                    one_group(x, xq, xs, xc, m, g)

    return func


def int8_gemv(out_features: int, in_features: int, bits: int, out_dtype: str, scale_dtype: str = "float16",
              isa: str = "generic", prefill: bool = False, distance: int = PREFETCH_BYTES) -> tirx.PrimFunc:
    """PrimFunc (xq, xs, xc as :func:`quantize_activation` gives them, q_weight uint32 [N, K*bits/32],
    q_scale ``scale_dtype`` [N, K/32]) -> y [M, N] ``out_dtype``; see the module docstring.
    ``prefill``: recorded in the attribute, for a pass to swap in the GEMM of :mod:`.int8_matmul`;
    ``distance``: how many bytes ahead the VNNI kernels prefetch the weights (0: they leave it to
    the hardware prefetchers)."""
    if isa not in ISAS:
        raise ValueError(f"unknown int8 GEMV kernel {isa!r}; one of {ISAS}")
    N, K = out_features, in_features
    G, words = K // GROUP, K * bits // 32
    rows = ROWS if N % ROWS == 0 else 1
    if isa == "generic":
        func = _generic(N, K, G, words, bits, rows, out_dtype, scale_dtype)
    else:
        lanes = _LANES[isa] if G % 2 == 0 else 8  # two groups per 512-bit vector need an even count
        if bits == 4 and G % QUAD_GROUPS == 0:
            func = _vnni_int4(N, K, G, words, out_dtype, scale_dtype, _LANES[isa], distance)
        else:
            func = _vnni(N, K, G, words, bits, rows, out_dtype, scale_dtype, lanes, _DOT[lanes], distance)
    return func.with_attr(KERNEL_ATTR, {"bits": bits, "in": K, "out": N, "out_dtype": out_dtype,
                                        "scale_dtype": scale_dtype, "isa": isa, "prefill": prefill})


def _generic(N, K, G, words, bits, rows, out_dtype, scale_dtype):
    per_word, mask = 32 // bits, (1 << bits) - 1

    @T.prim_func(private=True, s_tir=True)
    def func(xq_h: T.handle, xs_h: T.handle, xc_h: T.handle, qw_h: T.handle, qs_h: T.handle, y_h: T.handle):
        T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True, "op_pattern": 8})  # kOpaque: never fused
        M = T.int64()
        xq = T.match_buffer(xq_h, (M, K), "int8")
        xs = T.match_buffer(xs_h, (M, G), "float32")
        xc = T.match_buffer(xc_h, (M, G), "float32")
        qw = T.match_buffer(qw_h, (N, words), "uint32")
        qs = T.match_buffer(qs_h, (N, G), scale_dtype)
        y = T.match_buffer(y_h, (M, N), out_dtype)
        with T.sblock("root"):
            dot = T.alloc_buffer((N,), "int32")
            acc = T.alloc_buffer((N,), "float32")
            for n in T.parallel(N):
                for m in range(M):
                    acc[n] = T.float32(0)
                    for g in range(G):
                        dot[n] = 0
                        for i in range(GROUP):
                            k = g * GROUP + i
                            code = (qw[n, k // per_word] >> T.Cast("uint32", k % per_word * bits)) & T.uint32(mask)
                            dot[n] = dot[n] + T.Cast("int32", code) * T.Cast("int32", xq[m, g * GROUP + group_position(i, bits)])
                        acc[n] = acc[n] + T.Cast("float32", qs[n, g]) * (xs[m, g] * T.Cast("float32", dot[n]) - xc[m, g])
                    y[m, n] = T.Cast(out_dtype, acc[n])

    return func


def _dot(intrinsic, lanes, acc, codes, x):
    """vpdpbusd: ``acc`` int32 [lanes] + the 4-byte products of unsigned ``codes`` and signed ``x``."""
    i8 = f"int8x{4 * lanes}"
    return T.call_llvm_pure_intrin(T.llvm_lookup_intrinsic_id(intrinsic), acc, T.reinterpret(codes, dtype=i8),
                                   T.reinterpret(x, dtype=i8), dtype=f"int32x{lanes}")


def _total(acc, cor, lanes: int, chunk: int):
    """sum(acc) - sum(cor) as a tree of halving vector adds (acc has lanes >= chunk lanes)."""
    acc, width = halving_sum(acc, lanes, chunk)
    return halving_sum(acc - cor, width)[0]


def _vnni(N, K, G, words, bits, rows, out_dtype, scale_dtype, lanes, intrinsic, distance):
    """vpdpbusd over ``lanes`` int32 lanes = ``lanes // 8`` groups per instruction.

    Groups are taken ``chunk`` at a time (8 where G allows): per row, one vector conversion of
    the chunk's weight scales times x's gives every group's combined scale, and one FMA its
    offset correction; each step then only permutes that vector into its lanes.
    """
    gpv = lanes // 8  # groups per vector
    chunk = next(c for c in (8, 4, 2, 1) if G % c == 0)
    steps = chunk // gpv  # vpdpbusd steps per chunk
    wpv = gpv * 32 * bits // 32  # uint32 words of codes per vector
    ahead = max(1, distance // (words * 4))  # rows between a weight load and its prefetch
    i8, f32 = f"int8x{4 * lanes}", f"float32x{lanes}"
    fc = f"float32x{chunk}" if chunk > 1 else "float32"
    nib = T.uint32(0x0F0F0F0F)
    # int4: [lo nibbles of group 0 | hi of group 0 | lo of group 1 | hi of group 1] as words
    half = wpv // gpv  # words per group (4)
    q4_order = [w for grp in range(gpv) for w in
                [*range(grp * half, grp * half + half), *range(wpv + grp * half, wpv + grp * half + half)]]

    def codes(qw, n, c):
        if bits == 8:
            return T.reinterpret(qw[n, T.ramp(c * wpv, 1, wpv)], dtype=i8)
        packed = qw[n, T.ramp(c * wpv, 1, wpv)]
        lo, hi = packed & T.broadcast(nib, wpv), (packed >> T.broadcast(T.uint32(4), wpv)) & T.broadcast(nib, wpv)
        return T.reinterpret(T.Shuffle([lo, hi], q4_order), dtype=i8)

    def dot(qw, xq, n, m, c):
        """int32 [lanes]: vpdpbusd of row n's codes of step c with x row m's int8 values."""
        return _dot(intrinsic, lanes, T.broadcast(T.int32(0), lanes), codes(qw, n, c), xq[m, T.ramp(c * lanes * 4, 1, lanes * 4)])

    def part(buf, row, start):
        """``buf[row, start : start + chunk]``: a vector, or a scalar for chunks of one group."""
        return buf[row, T.ramp(start, 1, chunk)] if chunk > 1 else buf[row, start]

    def w_scale(qs, n, ch):
        """fp32 weight scales of chunk ``ch`` of row ``n``."""
        return T.Cast(fc, part(qs, n, ch * chunk))

    def step_scales(combined, s):
        """[lanes] scales of step ``s`` of a chunk: each group's combined scale on its 8 lanes."""
        if chunk == 1:
            return T.broadcast(combined, lanes)
        copies = -(-lanes // chunk)  # a shuffle yields at most as many lanes as it is given
        return T.Shuffle([combined] * copies, [s * gpv + lane // 8 for lane in range(lanes)])

    @T.prim_func(private=True, s_tir=True)
    def func(xq_h: T.handle, xs_h: T.handle, xc_h: T.handle, qw_h: T.handle, qs_h: T.handle, y_h: T.handle):
        T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True, "op_pattern": 8})  # kOpaque: never fused
        M = T.int64()
        xq = T.match_buffer(xq_h, (M, K), "int8")
        xs = T.match_buffer(xs_h, (M, G), "float32")
        xc = T.match_buffer(xc_h, (M, G), "float32")
        qw = T.match_buffer(qw_h, (N, words), "uint32")
        qs = T.match_buffer(qs_h, (N, G), scale_dtype)
        y = T.match_buffer(y_h, (M, N), out_dtype)
        with T.sblock("root"):
            for nb in T.parallel(N // rows):
                with T.sblock("rows"):
                    acc = T.sblock_alloc_buffer((rows, lanes), "float32")  # small: in registers
                    cor = T.sblock_alloc_buffer((rows, chunk), "float32")
                    combined = T.sblock_alloc_buffer((rows, chunk), "float32")
                    for m in range(M):
                        for r in T.unroll(rows):
                            acc[r, T.ramp(0, 1, lanes)] = T.broadcast(T.float32(0), lanes)
                            for lane in range(chunk):
                                cor[r, lane] = T.float32(0)
                        for ch in range(G // chunk):
                            for r in T.unroll(rows):
                                if chunk > 1:
                                    combined[r, T.ramp(0, 1, chunk)] = w_scale(qs, nb * rows + r, ch) * xs[m, T.ramp(ch * chunk, 1, chunk)]
                                    cor[r, T.ramp(0, 1, chunk)] = (cor[r, T.ramp(0, 1, chunk)]
                                                                   + w_scale(qs, nb * rows + r, ch) * xc[m, T.ramp(ch * chunk, 1, chunk)])
                                else:
                                    combined[r, 0] = w_scale(qs, nb * rows + r, ch) * xs[m, ch]
                                    cor[r, 0] = cor[r, 0] + w_scale(qs, nb * rows + r, ch) * xc[m, ch]
                            for s in T.unroll(steps):
                                if distance > 0:
                                    for r in T.unroll(rows):
                                        prefetch(qw, T.min(nb * rows + r + ahead, N - 1), (ch * steps + s) * wpv)
                                for r in T.unroll(rows):
                                    acc[r, T.ramp(0, 1, lanes)] = (
                                        acc[r, T.ramp(0, 1, lanes)]
                                        + T.Cast(f32, dot(qw, xq, nb * rows + r, m, ch * steps + s))
                                        * step_scales(part(combined, r, 0), s))
                        for r in T.unroll(rows):
                            y[m, nb * rows + r] = T.Cast(out_dtype, _total(acc[r, T.ramp(0, 1, lanes)], part(cor, r, 0), lanes, chunk))

    return func


def _vnni_int4(N, K, G, words, out_dtype, scale_dtype, lanes, distance):
    """int4 weights, ``QUAD_GROUPS`` = 4 groups per step, on vpdpbusd of ``lanes`` int32 lanes
    (16: 512-bit, one vector per step; 8: 256-bit, two).

    64 bytes of a row's codes hold 4 groups: masking gives their low nibbles (the evens of each
    group), a shift their high ones (the odds). Two vpdpbusd with x's evens and odds of the same
    bytes add into one int32 vector whose lanes 4g..4g+3 hold a group's partial sums, so one
    conversion, one permute of the combined scales and one fp32 FMA serve 32 * lanes / 4
    weights (the two-group kernel spends them on half as many, plus an unpack shuffle). For
    that, x is re-laid once per call: per block of 4 groups their evens, then their odds (16
    bytes each; xq already stores each group's evens first). On one AMD Zen 4 core, from cache,
    this doubled the 512-bit int4 GEMV's speed (19.6 -> 37.5 GB/s of codes) and made the 256-bit
    one 1.5-1.9x faster (14.5 -> 22-27); from DRAM the 512-bit one reaches the fp16 GEMV's bandwidth.
    """
    chunk = 8 if G % 8 == 0 else QUAD_GROUPS
    steps, parts = chunk // QUAD_GROUPS, 16 // lanes  # steps per chunk of scales; vectors per step
    ahead = max(1, distance // (words * 4))
    fc, f32 = f"float32x{chunk}", f"float32x{lanes}"
    nib = T.broadcast(T.uint32(0x0F0F0F0F), lanes)
    # word p of a block of the re-laid x <- word of xq: half p // 16 (evens, odds), group (p % 16) // 4
    relaid = [(p % 16) // 4 * 8 + p // 16 * 4 + p % 4 for p in range(32)]

    def quad_dot(qw, xw, n, m, c, h):
        """int32 [lanes]: row n's codes in words 16c + h * lanes.. (of groups 4c..4c+3) times x row
        m's; lane j is group 4c + (h * lanes + j) // 4's."""
        packed, at = qw[n, T.ramp(c * 16 + h * lanes, 1, lanes)], c * 32 + h * lanes
        evens = _dot(_DOT[lanes], lanes, T.broadcast(T.int32(0), lanes), packed & nib, xw[m, T.ramp(at, 1, lanes)])
        return _dot(_DOT[lanes], lanes, evens, (packed >> T.broadcast(T.uint32(4), lanes)) & nib, xw[m, T.ramp(at + 16, 1, lanes)])

    def scales(qs, n, ch):
        return T.Cast(fc, qs[n, T.ramp(ch * chunk, 1, chunk)])

    def lane_scales(combined, s, h):
        """[lanes]: the combined scale of each lane's group, for vector h of step s."""
        return T.Shuffle([combined] * -(-lanes // chunk), [s * QUAD_GROUPS + (h * lanes + j) // 4 for j in range(lanes)])

    @T.prim_func(private=True, s_tir=True)
    def func(xq_h: T.handle, xs_h: T.handle, xc_h: T.handle, qw_h: T.handle, qs_h: T.handle, y_h: T.handle):
        T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True, "op_pattern": 8})  # kOpaque: never fused
        M = T.int64()
        xq = T.match_buffer(xq_h, (M, K), "int8")
        xs = T.match_buffer(xs_h, (M, G), "float32")
        xc = T.match_buffer(xc_h, (M, G), "float32")
        qw = T.match_buffer(qw_h, (N, words), "uint32")
        qs = T.match_buffer(qs_h, (N, G), scale_dtype)
        y = T.match_buffer(y_h, (M, N), out_dtype)
        with T.sblock("root"):
            x4 = T.decl_buffer((M, K // 4), "int32", data=xq.data)  # xq as words
            xw = T.alloc_buffer((M, K // 4), "int32")  # x re-laid per block of 4 groups
            for m, c in T.grid(M, G // QUAD_GROUPS):
                xw[m, T.ramp(c * 32, 1, 32)] = T.Shuffle([x4[m, T.ramp(c * 32, 1, 32)]], relaid)
            for n in T.parallel(N):
                with T.sblock("row"):
                    acc = T.sblock_alloc_buffer((lanes,), "float32")  # small: in registers, as in _vnni
                    cor = T.sblock_alloc_buffer((chunk,), "float32")
                    combined = T.sblock_alloc_buffer((chunk,), "float32")
                    for m in range(M):
                        acc[T.ramp(0, 1, lanes)] = T.broadcast(T.float32(0), lanes)
                        cor[T.ramp(0, 1, chunk)] = T.broadcast(T.float32(0), chunk)
                        for ch in range(G // chunk):
                            combined[T.ramp(0, 1, chunk)] = scales(qs, n, ch) * xs[m, T.ramp(ch * chunk, 1, chunk)]
                            cor[T.ramp(0, 1, chunk)] = cor[T.ramp(0, 1, chunk)] + scales(qs, n, ch) * xc[m, T.ramp(ch * chunk, 1, chunk)]
                            for s in T.unroll(steps):
                                if distance > 0:
                                    prefetch(qw, T.min(n + ahead, N - 1), (ch * steps + s) * 16)
                                for h in T.unroll(parts):
                                    acc[T.ramp(0, 1, lanes)] = acc[T.ramp(0, 1, lanes)] + T.Cast(
                                        f32, quad_dot(qw, xw, n, m, ch * steps + s, h)) * lane_scales(combined[T.ramp(0, 1, chunk)], s, h)
                        y[m, n] = T.Cast(out_dtype, _total(acc[T.ramp(0, 1, lanes)], cor[T.ramp(0, 1, chunk)], lanes, chunk))

    return func
