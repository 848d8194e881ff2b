"""Prefill matmul on the AMX tile units: ``y = x @ W^T`` in bfloat16 products with fp32 sums,
W group-quantized (q4f16_1, q8f16_1), float (q0f16, q0f32) or kept in GGUF Q4_K / Q5_K / Q6_K blocks.

``tdpbf16ps`` multiplies a 16 x 32 bf16 tile A by a 32 x 16 bf16 tile B into a 16 x 16 fp32
tile: 8192 multiply-adds per instruction. B must hold pairs of consecutive k per column
(``[K/2, 16, 2]``), A is plain row-major. The kernel computes ``y^T = W @ x^T``, so that the
operand rebuilt for every block of output columns (the weights) is the row-major one:

1. x is converted once per call into B tiles' layout: 16 rows x 32 k at a time, each row
   rounded to 16 bf16 pairs (``vcvtneps2bf16``), the 16 x 16 block of pairs transposed in
   registers (:func:`~mpt_relax.kernels.lanes.transposed_16x16`); rows padded with zeros to a
   multiple of 32;
2. per block of 32 output columns (blocks in parallel) the 32 weight rows are dequantized once
   into bf16 rows (the A tiles), a group of 32 codes at a time: q4 through a 16-entry table of
   the group's 16 possible values (``vpermw``, low and high nibbles interleaved back into k
   order), q8 in 16-lane vector arithmetic, GGUF blocks 16 weights at a time with their
   block's formula (:data:`BLOCK_TYPES`);
3. for each 32 rows of x, 2 x 2 accumulator tiles (weight rows 0-15 / 16-31 x rows of x 0-15 /
   16-31): K / 32 steps of two A and two B tile loads and four ``tdpbf16ps``; each C tile
   (``[n, m]``) is stored, transposed in registers and written into y as 16 rows of 16 (the
   transposes' stages in variables: through a buffer, the four shapes of the 125M model took
   10-15 % longer).

Every A and B tile is stored as 1 KiB in a row (rows of 64 bytes, one after the other): a
row-major [K, 32] weight block or [M, K] x would put a tile's rows a whole row apart, all into
the same few L1 sets (measured: 8 % slower).

Numerics: x and the dequantized weights are rounded to bfloat16 (8 significant bits, round to
nearest even) before the products: about 0.4 % relative per factor, as PyTorch's bf16 path.
A weight is dequantized as the exact path does, ``(code - offset) * scale`` in the scale's
dtype, then rounded to bf16. A process must ask Linux for the tile state before its first AMX
instruction (:func:`mpt_relax.runtime.cpu_features.request_amx`), or it dies of SIGILL.

``exact=True``: for fp16 (or bf16) x and weights, each value ``v`` is split into bf16 parts
``hi = bf16(v)`` and ``lo = v - hi`` (an fp16 value has 11 significant bits, so ``lo`` has at
most 3 and is exact in bf16); x and the weights each fill a hi and a lo tile, and four passes
(hi x hi, hi x lo, lo x lo, lo x hi, each reloading one operand) add the four products, exact
in fp32, into the fp32 accumulators: the exact path's fp32 products and sums in another order.
With fewer than :data:`TILE_ROWS_MIN` rows of x, filling the tiles costs more than it saves:
:data:`FMA_ROWS` weight rows at a time are decoded to the same fp32 values (not split) and
multiplied into each row of x with FMAs, their sums held in registers, the weights prefetched
``PREFETCH_BYTES`` ahead; a single row (a prefill's LM head) takes each weight straight from its
decode into its FMA, float weights one row at a time, each group prefetching its share of a row ahead.

``units="vector"`` (exact only; AVX-512 CPUs without AMX, e.g. AMD Zen 4, and fp32 operands on
any AVX-512 CPU): the same exact math on FMAs. x is packed once per call into panels of
:data:`PANEL_ROWS` rows (``[panel, k, row]`` fp32); per block of 32 output columns the weights are
decoded once to fp32 and transposed in registers into ``wt[k, column]``; each panel keeps 2 x 12
accumulator vectors in registers, per k one broadcast of x per row and two FMAs: fp32 products
summed in k order. (No bf16 variant: TVM's bf16 legalization turns every bfloat16 operand of an
intrinsic call into fp32, so ``vdpbf16ps`` could only take operands fresh from a conversion
instruction, one per vector of x and of weights.)

The Linear layers of ``amx_prefill`` schemes emit :func:`exact_matmul` tagged with
:data:`KERNEL_ATTR`; :mod:`mpt_relax.compile.amx_kernels` swaps in :func:`amx_matmul` where the
target has AMX-BF16 (and the AVX-512 subsets used above, :data:`REQUIRED_FEATURES`) and leaves
the exact kernel (fused and scheduled as usual) elsewhere; it also puts other fp16 models'
exact prefill matmuls on ``amx_matmul(exact=True)``.
"""

from __future__ import annotations

from tvm import te, tirx
from tvm.script import tirx as T

from mpt_relax.kernels.lanes import bound, dequantized, emit_rows, halving_sum, transposed_16x16
from mpt_relax.runtime.cpu_features import AMX_EXACT_DTYPES

from .block_chunks import BLOCK_TYPES
from .float_gemv import PREFETCH_BYTES
from .int8_gemv import prefetch

KERNEL_ATTR = "mpt_relax.amx_matmul"  # func attr: {"bits", "in", "out", ...}; see compile.amx_kernels
# LLVM features the kernel's instructions need: tiles, vcvtneps2bf16, vpermw (256-bit), vpermi2ps
REQUIRED_FEATURES = ["amx-tile", "amx-bf16", "avx512bf16", "avx512bw", "avx512vl", "avx512f"]
BLOCK = 32  # output columns per parallel task (two A tiles), and rows of x per step (two B tiles)
_INTERLEAVE = [i // 2 + (i % 2) * 16 for i in range(32)]  # [low0, high0, low1, high1, ...] of two 16-lane vectors
_CONCAT = list(range(32))
FLOAT_BITS = {"float16": 16, "float32": 32}  # float weights: their dtype -> bits in the kernel tag
EXACT_DTYPES = AMX_EXACT_DTYPES  # operands whose bf16 hi + lo parts hold them exactly
TILE_ROWS_MIN = 8  # exact kernels: rows of x from which the tiles pay for filling them (measured crossover)
PANEL_ROWS = 12  # vector units: rows of x per register tile (2 x 12 fp32 accumulators of 16 lanes)
UNITS = ("tiles", "vector")  # AMX tiles; AVX-512 FMAs (exact only)
VECTOR_FEATURES = ["avx512f", "avx512bw", "avx512vl"]  # units="vector": 16-lane fp32 FMAs, 32 registers
FMA_ROWS = 8  # exact kernels under TILE_ROWS_MIN rows: weight rows per sweep over x (8 sums in registers)


def supported(out_features: int, in_features: int) -> bool:
    """Whether the kernel takes a [out, in] weight: out a multiple of 32, in of 32."""
    return out_features % BLOCK == 0 and in_features % 32 == 0


def exact_matmul(q, out_features: int, in_features: int, x_dtype: str, out_dtype: str,
                 dequantized) -> tirx.PrimFunc:
    """The exact path of a group-quantized weight as one TE PrimFunc: x [M, K] x_dtype, q_weight,
    q_scale -> y [M, N] (fp32 products and sums, like the fused dequantize + NT_matmul).
    ``dequantized(q, qw, qs, o, i)`` gives one weight element."""
    qw = te.placeholder(q.q_weight_shape(out_features, in_features), "uint32", name="q_weight")
    qs = te.placeholder(q.q_scale_shape(out_features, in_features), q.model_dtype, name="q_scale")
    return _tagged_matmul(out_features, in_features, x_dtype, out_dtype, [qw, qs],
                          lambda o, i: dequantized(q, qw, qs, o, i), q.bits, q.model_dtype)


def exact_float_matmul(out_features: int, in_features: int, w_dtype: str, x_dtype: str, out_dtype: str) -> tirx.PrimFunc:
    """The exact path of a float weight (q0f16, q0f32) as one TE PrimFunc: x [M, K], W [N, K]
    ``w_dtype`` -> y [M, N] (fp32 products and sums, like NT_matmul)."""
    w = te.placeholder((out_features, in_features), w_dtype, name="weight")
    return _tagged_matmul(out_features, in_features, x_dtype, out_dtype, [w], lambda o, i: w[o, i],
                          FLOAT_BITS[w_dtype], w_dtype)


def exact_block_matmul(block, out_features: int, in_features: int, x_dtype: str, out_dtype: str,
                       w_dtype: str) -> tirx.PrimFunc:
    """The exact path of a weight kept in GGUF blocks (:data:`BLOCK_TYPES`: Q4_K, Q5_K, Q6_K) as one TE
    PrimFunc: x [M, K], blocks uint8 -> y [M, N], each weight decoded and rounded to ``w_dtype``."""
    raw = te.placeholder(block.storage_shape(out_features, in_features), "uint8", name="q_blocks")
    return _tagged_matmul(out_features, in_features, x_dtype, out_dtype, [raw],
                          lambda o, i: block.decode(raw, o, i).astype(w_dtype), 0, w_dtype, block.name)


def _tagged_matmul(out_features, in_features, x_dtype, out_dtype, weights, weight, bits, w_dtype,
                   block: str = "") -> tirx.PrimFunc:
    """``x @ W^T`` (W[o, i] = ``weight(o, i)``, read from the placeholders ``weights``), tagged for
    :mod:`mpt_relax.compile.amx_kernels` (``block``: the GGUF block type, if any)."""
    m = tirx.Var("m", "int64")
    x = te.placeholder((m, in_features), x_dtype, name="x")
    w = te.compute((out_features, in_features), weight, name="dequantize")
    r = te.reduce_axis((0, in_features), name="r")
    y = te.compute((m, out_features), lambda i, j: te.sum(x[i, r].astype("float32") * w[j, r].astype("float32"),
                                                           axis=r), name="NT_matmul")
    if out_dtype != "float32":
        y = te.compute(y.shape, lambda i, j: y[i, j].astype(out_dtype), name="cast")
    func = te.create_prim_func([x, *weights, y]).without_attr("global_symbol")  # a private kernel
    return func.with_attr(KERNEL_ATTR, {"bits": bits, "in": in_features, "out": out_features, "block": block,
                                        "x_dtype": x_dtype, "out_dtype": out_dtype, "w_dtype": w_dtype})


def amx_matmul(out_features: int, in_features: int, bits: int, x_dtype: str, out_dtype: str,
               w_dtype: str = "float16", block: str = "", exact: bool = False, units: str = "tiles") -> tirx.PrimFunc:
    """PrimFunc (x [M, K], q_weight uint32 [N, K*bits/32], q_scale ``w_dtype`` [N, K/32]) -> y [M, N]
    for bits 4 and 8; (x [M, K], W ``w_dtype`` [N, K]) -> y [M, N] for float weights (bits 16 or
    32: ``w_dtype``'s width); (x [M, K], GGUF blocks uint8) -> y [M, N] for ``block`` Q4_K / Q5_K / Q6_K
    (:data:`BLOCK_TYPES`); see the module docstring. ``exact``: the split products of
    :data:`EXACT_DTYPES` operands, and the FMA loop under :data:`TILE_ROWS_MIN` rows. ``units``
    "vector" (``exact`` only, any float operands): AVX-512 FMAs on register tiles instead of AMX
    (:data:`VECTOR_FEATURES`)."""
    if units not in UNITS or (units == "vector" and not exact):
        raise ValueError(f"units {units!r} (exact={exact}): one of {UNITS}, and 'vector' only with exact=True")
    if exact and units == "tiles" and not (x_dtype in EXACT_DTYPES and w_dtype in EXACT_DTYPES):
        raise ValueError(f"exact AMX products need {' / '.join(EXACT_DTYPES)} operands, got x {x_dtype}, weights {w_dtype}")
    N, K = out_features, in_features
    k_steps = K // 32
    stride = T.int64(64)  # bytes per tile row: every tile is stored as 1 KiB in a row

    def tile(op, *args):
        return T.call_llvm_intrin("void", op, *args)

    def bf16x16(value):
        """float32x16 -> its bfloat16 bits (round to nearest even) as int16x16: bf16 buffers
        would be widened to float32 by TVM's bf16 legalization, and the tiles read raw bits."""
        return T.reinterpret(T.call_llvm_pure_intrin("bfloat16x16", "llvm.x86.avx512bf16.cvtneps2bf16.512", value),
                             dtype="int16x16")

    def widened(bits16):
        """int16x16 bf16 bits -> their float32 values (exact)."""
        return T.reinterpret(T.shift_left(T.Cast("int32x16", T.reinterpret(bits16, dtype="uint16x16")),
                                          T.Broadcast(T.int32(16), 16)), dtype="float32x16")

    def part(value, which: int):
        """bf16 bits of ``value``'s high part (0, bf16 rounding) or of the rest (1, exact for fp16 values)."""
        if which == 0:
            return bf16x16(value)
        return bound(value, lambda v: bf16x16(v - widened(bf16x16(v))))

    def scaled(codes, scale):
        """16 codes (a 16-lane integer vector) -> fp32 ``(code - off) * scale``, the arithmetic
        in the scale's dtype as in the exact path."""
        return dequantized(codes, scale, 2 ** (bits - 1) - 1, w_dtype)

    def lookup(table, index):
        return T.call_llvm_pure_intrin("int16x16", "llvm.x86.avx512.permvar.hi.256", table, index)

    def halves(value, which):
        """int16x32: bf16 part ``which`` of 32 weights, from ``value(h)`` (fp32, weights 16h .. 16h + 15)."""
        return T.Shuffle([part(value(0), which), part(value(1), which)], _CONCAT)

    def both(value):
        """float32x32: the 32 weights ``value(0)``, ``value(1)`` (fp32, weights 16h .. 16h + 15)."""
        return T.Shuffle([value(0), value(1)], _CONCAT)

    def y_row(y, M, m, n0, row):
        """y[m, n0 : n0 + 16] = row (float32x16) in ``out_dtype``, if m < M."""
        with T.If(m < M):
            with T.Then():
                T.buffer_store(y, T.Cast(f"{out_dtype}x16", row), [m, T.ramp(n0, 1, 16)])

    @T.macro
    def x_tiles(x, xb, M, which):
        """x -> xb: bf16 part ``which`` (0: hi, 1: lo) of the pair (x[m, k], x[m, k + 1]) as 32
        bits, at row ``(m // 16 * k_steps + k // 32) * 16 + k % 32 // 2``, lane ``m % 16`` (tile
        (m // 16, k // 32) in 1 KiB); rows past M zero."""
        for kc in T.parallel(k_steps):
            tx = T.alloc_buffer((256,), "float32")
            for mt in range((M + 31) // 32 * 2):
                for i in T.unroll(16):
                    tx[T.ramp(i * 16, 1, 16)] = T.if_then_else(
                        mt * 16 + i < M,
                        T.reinterpret(T.Shuffle([part(T.Cast("float32x16", x[T.min(mt * 16 + i, M - 1),
                                                                             T.ramp(kc * 32 + h * 16, 1, 16)]), which)
                                                 for h in (0, 1)], _CONCAT), dtype="float32x16"),
                        T.Broadcast(T.float32(0), 16))
                emit_rows(transposed_16x16([tx[T.ramp(i * 16, 1, 16)] for i in range(16)]),
                           lambda r, row: T.buffer_store(xb, row, [(mt * k_steps + kc) * 16 + r, T.ramp(0, 1, 16)]))

    @T.macro
    def write_tile(y, tb, M, mb, nb, tile_id):
        """C tile ``tile_id`` (weight rows ``tile_id // 2``, x rows ``tile_id % 2``) -> y."""
        tile("llvm.x86.tilestored64", T.int8(tile_id), T.address_of(tb[0]), stride)
        emit_rows(transposed_16x16([tb[T.ramp(r * 16, 1, 16)] for r in range(16)]),
                   lambda i, row: y_row(y, M, mb * 32 + tile_id % 2 * 16 + i, nb * 32 + tile_id // 2 * 16, row))

    @T.macro
    def load_a(w, kc):
        """Tiles 4, 5: weight rows 0-15 and 16-31 of k-step ``kc``."""
        tile("llvm.x86.tileloadd64", T.int8(4), T.address_of(w[kc * 32, 0]), stride)
        tile("llvm.x86.tileloadd64", T.int8(5), T.address_of(w[kc * 32 + 16, 0]), stride)

    @T.macro
    def load_b(xb, kc, mb, M):
        """Tiles 6, 7: rows 0-15 and 16-31 of x block ``mb``, k-step ``kc``."""
        tile("llvm.x86.tileloadd64", T.int8(6), T.address_of(xb[(2 * mb * k_steps + kc) * 16, 0]), stride)
        tile("llvm.x86.tileloadd64", T.int8(7), T.address_of(xb[((2 * mb + 1) * k_steps + kc) * 16, 0]), stride)

    @T.macro
    def dots():
        tile("llvm.x86.tdpbf16ps", T.int8(0), T.int8(4), T.int8(6))
        tile("llvm.x86.tdpbf16ps", T.int8(1), T.int8(4), T.int8(7))
        tile("llvm.x86.tdpbf16ps", T.int8(2), T.int8(5), T.int8(6))
        tile("llvm.x86.tdpbf16ps", T.int8(3), T.int8(5), T.int8(7))

    @T.macro
    def multiply(w, wl, xb, xl, y, M, nb):
        """y[:, nb*32 : nb*32 + 32] from ``xb`` and the block's bf16 weights ``w`` (see ``run``);
        exact: four passes (w x, w xl, wl xl, wl x), each reloading one operand."""
        cfg = T.alloc_buffer((64,), "uint8")
        tb = T.alloc_buffer((256,), "float32")  # a C tile
        for i in range(64):
            cfg[i] = T.uint8(0)
        cfg[0] = T.uint8(1)  # palette 1
        for t in range(8):  # tiles 0-3: C; 4, 5: A (weights); 6, 7: B (x); each 16 rows of 64 bytes
            cfg[16 + 2 * t] = T.uint8(64)
            cfg[48 + t] = T.uint8(16)
        tile("llvm.x86.ldtilecfg", T.address_of(cfg[0]))
        for mb in range((M + 31) // 32):
            tile("llvm.x86.tilezero", T.int8(0))
            tile("llvm.x86.tilezero", T.int8(1))
            tile("llvm.x86.tilezero", T.int8(2))
            tile("llvm.x86.tilezero", T.int8(3))
            for kc in range(k_steps):
                load_a(w, kc)
                load_b(xb, kc, mb, M)
                dots()
                if exact:
                    load_b(xl, kc, mb, M)
                    dots()
                    load_a(wl, kc)
                    dots()
                    load_b(xb, kc, mb, M)
                    dots()
            write_tile(y, tb, M, mb, nb, 0)
            write_tile(y, tb, M, mb, nb, 1)
            write_tile(y, tb, M, mb, nb, 2)
            write_tile(y, tb, M, mb, nb, 3)
        tile("llvm.x86.tilerelease")

    @T.macro
    def prefetch_ahead(a, row0):
        """Ask for the weight rows ``PREFETCH_BYTES`` past rows ``row0 .. row0 + FMA_ROWS`` of ``a``
        (with the hardware prefetchers alone, the 125M model's prefill LM head took 1.3x as long)."""
        for r, c in T.grid(FMA_ROWS, T.ceildiv(a.shape[1] * a.dtype.bits, 512)):
            prefetch(a, T.min(row0 + r + T.max(1, PREFETCH_BYTES * 8 // (a.shape[1] * a.dtype.bits)), N - 1),
                     c * (512 // a.dtype.bits))

    @T.macro
    def fma_rows(x, y, m, row0, weights):
        """y[m, row0 : row0 + FMA_ROWS] from x[m] and the weight rows' fp32 groups ``weights(r, g)``,
        the sums in registers."""
        acc = T.alloc_buffer((FMA_ROWS * 32,), "float32", scope="local")  # registers
        for r in T.unroll(FMA_ROWS):
            acc[T.ramp(r * 32, 1, 32)] = T.Broadcast(T.float32(0), 32)
        for g in range(k_steps):
            for r in T.unroll(FMA_ROWS):
                acc[T.ramp(r * 32, 1, 32)] = acc[T.ramp(r * 32, 1, 32)] + weights(r, g) * T.Cast(
                    "float32x32", x[m, T.ramp(g * 32, 1, 32)])
        for r in range(FMA_ROWS):
            y[m, row0 + r] = T.Cast(out_dtype, halving_sum(acc[T.ramp(r * 32, 1, 32)], 32)[0])

    @T.macro
    def x_panels(x, xp, M):
        """x -> xp[(p * K + k) * PANEL_ROWS + r] = x[p * PANEL_ROWS + r, k] in fp32 (rows past M
        repeat row M - 1; their sums are never stored)."""
        for p in T.parallel((M + PANEL_ROWS - 1) // PANEL_ROWS):
            for r, kc, h in T.grid(PANEL_ROWS, k_steps, 2):
                xp[T.ramp((p * K + kc * 32 + h * 16) * PANEL_ROWS + r, PANEL_ROWS, 16)] = T.Cast(
                    "float32x16", x[T.min(p * PANEL_ROWS + r, M - 1), T.ramp(kc * 32 + h * 16, 1, 16)])

    @T.macro
    def panel_products(wt, xp, y, M, nb):
        """y[:, nb*32 : nb*32 + 32] from the block's fp32 weights ``wt[k, column]`` and the panels
        of x: per panel, 2 x PANEL_ROWS accumulators in registers, each k one FMA per vector."""
        for p in range((M + PANEL_ROWS - 1) // PANEL_ROWS):
            acc = T.alloc_buffer((PANEL_ROWS, 32), "float32", scope="local")  # registers
            for r in T.unroll(PANEL_ROWS):
                acc[r, T.ramp(0, 1, 32)] = T.Broadcast(T.float32(0), 32)
            for k in range(K):
                for r in T.unroll(PANEL_ROWS):
                    acc[r, T.ramp(0, 1, 32)] = acc[r, T.ramp(0, 1, 32)] + wt[k, T.ramp(0, 1, 32)] * T.Broadcast(
                        xp[(p * K + k) * PANEL_ROWS + r], 32)
            for r in T.unroll(PANEL_ROWS):
                if p * PANEL_ROWS + r < M:
                    y[p * PANEL_ROWS + r, T.ramp(nb * 32, 1, 32)] = T.Cast(f"{out_dtype}x32", acc[r, T.ramp(0, 1, 32)])

    @T.macro
    def fma_row(x, y, row, a, weights):
        """y[0, row] from x[0] and weight row ``row``'s fp32 groups ``weights(g)`` (one row's sums in
        registers, as in :func:`fma_rows`), each group's share of the row ``PREFETCH_BYTES`` ahead
        asked for as it goes. For float weights (a stream, bandwidth-bound): 8 rows at a time, with
        their prefetches in one burst, took 2.2x as long on an AMD Zen 4 (the 125M model's fp16 LM
        head, one thread); decoded q4 weights (compute-bound) keep :func:`fma_rows`' 8 chains."""
        acc = T.alloc_buffer((32,), "float32", scope="local")  # registers
        acc[T.ramp(0, 1, 32)] = T.Broadcast(T.float32(0), 32)
        lines = T.ceildiv(a.shape[1] * a.dtype.bits, 512)  # cache lines per weight row
        for g in range(k_steps):
            for c in range(T.ceildiv(lines, k_steps)):  # from line g * lines // k_steps: every line of the row
                prefetch(a, T.min(row + T.max(1, PREFETCH_BYTES * 8 // (a.shape[1] * a.dtype.bits)), N - 1),
                         T.min(g * lines // k_steps + c, lines - 1) * (512 // a.dtype.bits))
            acc[T.ramp(0, 1, 32)] = acc[T.ramp(0, 1, 32)] + weights(g) * T.Cast("float32x32", x[0, T.ramp(g * 32, 1, 32)])
        y[0, row] = T.Cast(out_dtype, halving_sum(acc[T.ramp(0, 1, 32)], 32)[0])

    def body(half, chunk=None):
        """The kernel body around ``half(a, b, row, g, h)`` -> float32x16, weights 16h .. 16h + 15
        of group ``g`` of weight row ``row`` as the exact path dequantizes them (``a``, ``b``: the
        weight buffers), and ``chunk(a, b, row, g, which)`` -> int16x32, bf16 part ``which`` of
        the group's 32 weights (by default from ``half``)."""
        if chunk is None:
            def chunk(a, b, row, g, which):
                return halves(lambda h: half(a, b, row, g, h), which)

        def values(a, b, row, g):
            return both(lambda h: half(a, b, row, g, h))

        @T.macro
        def block_columns(a, b, wt, nb, g, c, h):
            """wt[32 g + 16 h + i, 16 c + j] = weight 16 h + i of group ``g`` of row nb * 32 + 16 c + j
            (fp32, as the exact path decodes it): 16 rows' halves, transposed in registers."""
            emit_rows(transposed_16x16([T.bind(half(a, b, nb * 32 + c * 16 + j, g, h)) for j in range(16)]),
                      lambda i, row: T.buffer_store(wt, row, [g * 32 + h * 16 + i, T.ramp(c * 16, 1, 16)]))

        @T.macro
        def run(x, y, M, a, b):
            if not exact or M >= TILE_ROWS_MIN:
                if units == "vector":  # (a Python condition: the other units' code is never emitted)
                    xp = T.alloc_buffer(((M + PANEL_ROWS - 1) // PANEL_ROWS * K * PANEL_ROWS,), "float32")
                    x_panels(x, xp, M)
                    for nb in T.parallel(N // 32):
                        wt = T.alloc_buffer((K, 32), "float32")  # the block's weights, k-major
                        for g in range(k_steps):
                            block_columns(a, b, wt, nb, g, 0, 0)
                            block_columns(a, b, wt, nb, g, 0, 1)
                            block_columns(a, b, wt, nb, g, 1, 0)
                            block_columns(a, b, wt, nb, g, 1, 1)
                        panel_products(wt, xp, y, M, nb)
                else:
                    xb = T.alloc_buffer(((M + 31) // 32 * 2 * k_steps * 16, 16), "float32")  # x^T as B tiles
                    xl = T.alloc_buffer(((M + 31) // 32 * 2 * k_steps * 16, 16) if exact else (1, 1), "float32")  # exact: lo parts
                    x_tiles(x, xb, M, 0)
                    if exact:
                        x_tiles(x, xl, M, 1)
                    for nb in T.parallel(N // 32):
                        w = T.alloc_buffer((K, 32), "int16")  # the block's 32 rows, bf16 bits: [k // 32, row, k % 32]
                        wl = T.alloc_buffer((K, 32) if exact else (1, 1), "int16")  # exact: their lo parts
                        for j, g in T.grid(32, k_steps):
                            w[g * 32 + j, T.ramp(0, 1, 32)] = chunk(a, b, nb * 32 + j, g, 0)
                            if exact:
                                wl[g * 32 + j, T.ramp(0, 1, 32)] = chunk(a, b, nb * 32 + j, g, 1)
                        multiply(w, wl, xb, xl, y, M, nb)
            elif M == 1:  # one row (a prefill's LM head): each weight decoded straight into its FMA
                for nb in T.parallel(N // 32):
                    if bits in FLOAT_BITS.values():  # streamed float weights: a row at a time
                        for j in range(32):
                            fma_row(x, y, nb * 32 + j, a, lambda g: values(a, b, nb * 32 + j, g))
                    else:  # decoded weights (compute-bound): 8 rows' sums in flight
                        for jo in range(32 // FMA_ROWS):
                            prefetch_ahead(a, nb * 32 + jo * FMA_ROWS)
                            fma_rows(x, y, 0, nb * 32 + jo * FMA_ROWS,
                                     lambda r, g: values(a, b, nb * 32 + jo * FMA_ROWS + r, g))
            else:  # a few rows: each weight decoded once to fp32, then multiplied into every row
                for nb in T.parallel(N // 32):
                    wv = T.alloc_buffer((FMA_ROWS, K), "float32")
                    for jo in range(32 // FMA_ROWS):
                        prefetch_ahead(a, nb * 32 + jo * FMA_ROWS)
                        for r, g in T.grid(FMA_ROWS, k_steps):
                            wv[r, T.ramp(g * 32, 1, 32)] = values(a, b, nb * 32 + jo * FMA_ROWS + r, g)
                        for m in range(M):
                            fma_rows(x, y, m, nb * 32 + jo * FMA_ROWS, lambda r, g: wv[r, T.ramp(g * 32, 1, 32)])

        return run

    if block:
        block_bytes, weights16 = BLOCK_TYPES[block]
        row_bytes = K // 256 * block_bytes
        run = body(lambda raw, d16, row, g, h: weights16(raw, d16, row, g, h, w_dtype))

        @T.prim_func(private=True, s_tir=True)
        def block_func(x_h: T.handle, raw_h: T.handle, y_h: T.handle):
            T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True, "op_pattern": 8})  # kOpaque: never fused
            M = T.int64()
            x = T.match_buffer(x_h, (M, K), x_dtype)
            raw = T.match_buffer(raw_h, (N, row_bytes), "uint8")
            y = T.match_buffer(y_h, (M, N), out_dtype)
            with T.sblock("root"):
                d16 = T.decl_buffer((N, row_bytes // 2), "uint16", data=raw.data)  # the fp16 d / dmin (even offsets)
                run(x, y, M, raw, d16)

        return block_func

    if bits in FLOAT_BITS.values():
        def float_half(wf, row, g, h):
            return T.Cast("float32x16", wf[row, T.ramp(g * 32 + h * 16, 1, 16)])

        run = body(lambda wf, _, row, g, h: float_half(wf, row, g, h))

        @T.prim_func(private=True, s_tir=True)
        def float_func(x_h: T.handle, wf_h: T.handle, y_h: T.handle):
            T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True, "op_pattern": 8})  # kOpaque: never fused
            M = T.int64()
            x = T.match_buffer(x_h, (M, K), x_dtype)
            wf = T.match_buffer(wf_h, (N, K), w_dtype)
            y = T.match_buffer(y_h, (M, N), out_dtype)
            with T.sblock("root"):
                run(x, y, M, wf, wf)

        return float_func

    words, code_bytes = K * bits // 32, K * bits // 8

    def nibbles(qb, row, g):
        """A 4-bit group's low and high nibbles (k = 2b and 2b + 1 for byte b) as int16x16."""
        codes = T.Cast("int16x16", qb[row, T.ramp(g * 16, 1, 16)])
        return codes & T.Broadcast(T.int16(15), 16), codes >> T.Broadcast(T.int16(4), 16)

    def group_half(qb, qs, row, g, h):
        if bits == 4:  # weights 16h .. 16h + 15: the low and high nibbles of bytes 8h .. 8h + 7, interleaved
            return T.Shuffle([scaled(n, qs[row, g]) for n in nibbles(qb, row, g)], _INTERLEAVE[16 * h:16 * h + 16])
        return scaled(qb[row, T.ramp(g * 32 + h * 16, 1, 16)], qs[row, g])

    def table_chunk(qb, qs, row, g, which):
        """4-bit groups: the 32 parts through a table of the group's 16 possible weights."""

        def table():  # a new expression per use (a Let bound once would be defined twice)
            return part(scaled(T.ramp(0, 1, 16), qs[row, g]), which)

        return T.Shuffle([lookup(table(), n) for n in nibbles(qb, row, g)], _INTERLEAVE)

    run = body(group_half, table_chunk if bits == 4 else None)

    @T.prim_func(private=True, s_tir=True)
    def func(x_h: T.handle, qw_h: T.handle, qs_h: T.handle, y_h: T.handle):
        T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True, "op_pattern": 8})  # kOpaque: never fused
        M = T.int64()
        x = T.match_buffer(x_h, (M, K), x_dtype)
        qw = T.match_buffer(qw_h, (N, words), "uint32")
        qs = T.match_buffer(qs_h, (N, K // 32), w_dtype)
        y = T.match_buffer(y_h, (M, N), out_dtype)
        with T.sblock("root"):
            qb = T.decl_buffer((N, code_bytes), "uint8", data=qw.data)  # the codes as bytes, little-endian
            run(x, y, M, qb, qs)

    return func
