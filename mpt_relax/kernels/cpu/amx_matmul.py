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

``units="vector"`` (AVX-512 CPUs without AMX, e.g. AMD Zen 4; fp32 operands on any AVX-512 CPU):
per block of output columns the weights are decoded once to fp32 and transposed in registers
into ``wt[k, column]``. Exact: x is packed once per call into panels of :data:`PANEL_ROWS` rows
(``[panel, k, row]`` fp32); each panel keeps 2 x 12 accumulator vectors in registers, per k one
broadcast of x per row and two FMAs: fp32 products summed in k order. Not exact (AVX512-BF16,
:data:`DOT_FEATURES`): blocks of :data:`DOT_BLOCK` columns, their weights re-laid as (k, k + 1)
pairs; per panel of :data:`DOT_ROWS` rows, 4 x 6 accumulators; per 32 k each row of x is rounded
to 16 bf16 pairs, then per pair one broadcast per row and four ``vdpbf16ps`` (the weight operands
rounded as they are loaded): the tiles' numerics. TVM's bf16 legalization would widen every
bfloat16 value back to fp32, so the conversions are typed int16x32 in TIR; in LLVM they keep the
intrinsic's ``<32 x bfloat>`` type, which ``vdpbf16ps`` takes.

The Linear layers of ``amx_prefill`` schemes emit :mod:`.exact_matmul`'s tagged kernels;
:mod:`mpt_relax.compile.amx_kernels` swaps in :func:`amx_matmul` where the target has AMX-BF16
(:data:`REQUIRED_FEATURES`) or AVX-512, and also puts other models' exact prefill matmuls on
``amx_matmul(exact=True)``.
"""

from __future__ import annotations

from tvm import tirx
from tvm.script import tirx as T

from mpt_relax.kernels.lanes import bound, dequantized, emit_rows, halving_sum, transposed_16x16
from mpt_relax.runtime.cpu_features import AMX_EXACT_DTYPES

from .block_chunks import BLOCK_TYPES
from .exact_matmul import FLOAT_BITS
from .float_gemv import PREFETCH_BYTES
from .int8_gemv import prefetch_l1

# LLVM features the kernel's instructions need: tiles, vcvtneps2bf16, vpermw (256-bit), vpermi2ps
REQUIRED_FEATURES = ["amx-tile", "amx-bf16", "avx512bf16", "avx512bw", "avx512vl", "avx512f"]
BLOCK = 32  # output columns per parallel task (two A tiles), and rows of x per step (two B tiles)
_INTERLEAVE = [i // 2 + (i % 2) * 16 for i in range(32)]  # [low0, high0, low1, high1, ...] of two 16-lane vectors
_CONCAT = list(range(32))
EXACT_DTYPES = AMX_EXACT_DTYPES  # operands whose bf16 hi + lo parts hold them exactly
TILE_ROWS_MIN = 8  # exact kernels: rows of x from which the tiles pay for filling them (measured crossover)
PANEL_ROWS = 12  # vector units: rows of x per register tile (2 x 12 fp32 accumulators of 16 lanes)
UNITS = ("tiles", "vector")  # AMX tiles; AVX-512 registers
VECTOR_FEATURES = ["avx512f", "avx512bw", "avx512vl"]  # units="vector": 16-lane fp32 FMAs, 32 registers
DOT_FEATURES = [*VECTOR_FEATURES, "avx512bf16"]  # units="vector", not exact: vcvtne2ps2bf16, vdpbf16ps
DOT_ROWS, DOT_BLOCK = 6, 64  # bf16 vector units: rows of x x columns per register tile (4 x 6 accumulators)
FMA_ROWS = 8  # exact kernels under TILE_ROWS_MIN rows: weight rows per sweep over x (8 sums in registers)


def supported(out_features: int, in_features: int) -> bool:
    """Whether the kernel takes a [out, in] weight: out a multiple of 32, in of 32."""
    return out_features % BLOCK == 0 and in_features % 32 == 0


def amx_matmul(out_features: int, in_features: int, bits: int, x_dtype: str, out_dtype: str,
               w_dtype: str = "float16", block: str = "", exact: bool = False, units: str = "tiles") -> tirx.PrimFunc:
    """PrimFunc (x [M, K], q_weight uint32 [N, K*bits/32], q_scale ``w_dtype`` [N, K/32]) -> y [M, N]
    for bits 4 and 8; (x [M, K], W ``w_dtype`` [N, K]) -> y [M, N] for float weights (bits 16 or
    32: ``w_dtype``'s width); (x [M, K], GGUF blocks uint8) -> y [M, N] for ``block`` Q4_K / Q5_K / Q6_K
    (:data:`BLOCK_TYPES`); see the module docstring. ``exact``: the split products of
    :data:`EXACT_DTYPES` operands, and the FMA loop under :data:`TILE_ROWS_MIN` rows. ``units``
    "vector": AVX-512 register tiles instead of AMX (FMAs; ``vdpbf16ps`` unless ``exact``)."""
    if units not in UNITS or (units == "vector" and not exact and out_features % DOT_BLOCK):
        raise ValueError(f"units {units!r}: one of {UNITS}; bf16 vector products need out_features a multiple "
                         f"of {DOT_BLOCK}, got {out_features}")
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

    def rows_ahead(a):
        """Weight rows of ``a`` in ``PREFETCH_BYTES``: how far ahead of its reads a row is asked for."""
        return T.max(1, PREFETCH_BYTES * 8 // (a.shape[1] * a.dtype.bits))

    @T.macro
    def prefetch_ahead(a, row0):
        """Ask for the weight rows ``PREFETCH_BYTES`` past rows ``row0 .. row0 + FMA_ROWS`` of ``a``
        (with the hardware prefetchers alone, the 125M model's prefill LM head took 1.3x as long)."""
        for r, c in T.grid(FMA_ROWS, T.ceildiv(a.shape[1] * a.dtype.bits, 512)):
            prefetch_l1(a, T.min(row0 + r + rows_ahead(a), N - 1),
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

    def bf16_pairs(hi, lo):
        """32 bf16 from two float32x16 (``lo`` first), typed int16x32 here and ``<32 x bfloat>``
        in LLVM (the intrinsic's own type): TVM's bf16 legalization never sees a bfloat16 value."""
        return T.call_llvm_pure_intrin("int16x32", "llvm.x86.avx512bf16.cvtne2ps2bf16.512", hi, lo)

    @T.macro
    def paired_columns(wt, wp):
        """wp[k // 2, 16 q + 2 j + k % 2] = wt[k, 8 q + j]: the block's weights as (k, k + 1) pairs
        per column, 8 columns per vector (two vectors convert to one ``vdpbf16ps`` operand)."""
        for kp, q in T.grid(K // 2, DOT_BLOCK // 8):
            wp[kp, T.ramp(q * 16, 1, 16)] = T.Shuffle(
                [wt[2 * kp, T.ramp(q * 8, 1, 8)], wt[2 * kp + 1, T.ramp(q * 8, 1, 8)]], [i // 2 + i % 2 * 8 for i in range(16)])

    def pair_dots(acc, wp, kc, xv):
        """acc[r] += the products of 32 k of row r (``xv[r]``: its 16 bf16 pairs) and the block's
        weights: per pair of k, four weight operands (16 columns each) rounded once, then per row
        the pair broadcast and four ``vdpbf16ps``. Statements emitted through the IR builder."""
        for j in range(16):
            wv = [T.bind(bf16_pairs(wp[kc * 16 + j, T.ramp(h * 32 + 16, 1, 16)], wp[kc * 16 + j, T.ramp(h * 32, 1, 16)]))
                  for h in range(DOT_BLOCK // 16)]
            for r in range(DOT_ROWS):
                xj = T.Shuffle([xv[r]], [2 * j + i % 2 for i in range(32)])
                for h in range(DOT_BLOCK // 16):
                    T.buffer_store(acc, T.call_llvm_pure_intrin("float32x16", "llvm.x86.avx512bf16.dpbf16ps.512",
                                                                acc[r, T.ramp(h * 16, 1, 16)], wv[h], xj),
                                   [r, T.ramp(h * 16, 1, 16)])

    @T.macro
    def panel_dots(wp, x, y, M, nb):
        """y[:, nb*DOT_BLOCK : (nb + 1)*DOT_BLOCK] from the block's weight pairs ``wp`` and x, per panel
        of DOT_ROWS rows (4 x 6 accumulators in registers), each row rounded to bf16 per 32 k."""
        for p in range((M + DOT_ROWS - 1) // DOT_ROWS):
            acc = T.alloc_buffer((DOT_ROWS, DOT_BLOCK), "float32", scope="local")  # registers
            for r in T.unroll(DOT_ROWS):
                acc[r, T.ramp(0, 1, DOT_BLOCK)] = T.Broadcast(T.float32(0), DOT_BLOCK)
            for kc in range(k_steps):
                xv = [T.bind(bf16_pairs(*[T.Cast("float32x16", x[T.min(p * DOT_ROWS + r, M - 1), T.ramp(kc * 32 + h, 1, 16)])
                                          for h in (16, 0)])) for r in range(DOT_ROWS)]
                pair_dots(acc, wp, kc, xv)
            for r in T.unroll(DOT_ROWS):
                if p * DOT_ROWS + r < M:
                    y[p * DOT_ROWS + r, T.ramp(nb * DOT_BLOCK, 1, DOT_BLOCK)] = T.Cast(
                        f"{out_dtype}x{DOT_BLOCK}", acc[r, T.ramp(0, 1, DOT_BLOCK)])

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
                prefetch_l1(a, T.min(row + rows_ahead(a), N - 1),
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

        def block_columns(a, b, wt, n0, g, width):
            """wt[32 g + 16 h + i, 16 c + j] = weight 16 h + i of group ``g`` of row n0 + 16 c + j, for
            the block's ``width`` columns (fp32, as the exact path decodes them): 16 rows' halves at a
            time, transposed in registers. Statements emitted through the IR builder."""
            for c in range(width // 16):
                for h in (0, 1):
                    emit_rows(transposed_16x16([T.bind(half(a, b, n0 + c * 16 + j, g, h)) for j in range(16)]),
                              lambda i, row: T.buffer_store(wt, row, [g * 32 + h * 16 + i, T.ramp(c * 16, 1, 16)]))

        @T.macro
        def run(x, y, M, a, b):
            if (not exact and units == "tiles") or M >= TILE_ROWS_MIN:
                if units == "vector" and not exact:
                    for nb in T.parallel(N // DOT_BLOCK):
                        wt = T.alloc_buffer((K, DOT_BLOCK), "float32")  # the block's weights, k-major
                        wp = T.alloc_buffer((K // 2, 2 * DOT_BLOCK), "float32")  # ... as pairs of k
                        for g in range(k_steps):
                            block_columns(a, b, wt, nb * DOT_BLOCK, g, DOT_BLOCK)
                        paired_columns(wt, wp)
                        panel_dots(wp, x, y, M, nb)
                elif units == "vector":  # (a Python condition: the other units' code is never emitted)
                    xp = T.alloc_buffer(((M + PANEL_ROWS - 1) // PANEL_ROWS * K * PANEL_ROWS,), "float32")
                    x_panels(x, xp, M)
                    for nb in T.parallel(N // 32):
                        wt = T.alloc_buffer((K, 32), "float32")  # the block's weights, k-major
                        for g in range(k_steps):
                            block_columns(a, b, wt, nb * 32, g, 32)
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
