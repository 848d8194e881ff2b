"""dlight-style schedule rules for the CPU (LLVM) target.

:func:`default_rules` is the list :mod:`mpt_relax.compile.pipeline` hands to
``dl.ApplyDefaultSchedule``; each PrimFunc gets the first rule that accepts it.

``Matmul``
    ``C[S, I, J] += A[S, I, K] * B[S, J, K]`` (or ``B[S, K, J]``) with a dynamic or large I
    and a static J, K: the prefill projections and ``prefill_logits``. Each parallel task
    owns one panel of NR columns of B, copies it once into a ``[K, NR]`` tile (this is where a
    dequantize prologue is evaluated, once per element), then runs an MR x NR register-blocked
    microkernel over the rows of A (NR vectorised, MR unrolled, K innermost). Operands that
    the product casts to the accumulator type (fp16 x and W accumulated in fp32) are cast once
    in the copies (the tile, A's padded copy), so the microkernel is the fp32 model's FMA loop.
    A dynamic I is padded to a multiple of MR; an injective epilogue (bias, residual, GELU,
    cast) is applied when the tile is written back. A dynamic I also gets the GEMV schedule,
    taken at run time when I < 16 (one token of ``extend``, a small decode batch): packing
    costs more than it saves for a few rows.
``GEMV``
    every other sum-of-products block (``C[...] += A[...] * B[...]``): the decode
    projections and LM head (``x[1, K] @ W[N, K]^T``) and the attention scores / values.
    Inner reduction (K contiguous in B): rows in parallel, K vectorised with several
    accumulators through ``rfactor``. A dequantized weight (codes packed in uint32 words)
    is compute bound: two weight rows share each load of x, and int8 codes (4 per word) are
    vectorised over whole words, one accumulator per code position, x permuted once per call
    to match (the natural order would assemble each vector from 4 words lane by lane).
    Outer reduction (an output axis contiguous in B, like
    ``probs @ v``): rows in parallel, that axis vectorised, K as the loop around it.
    Producers (a dequantize) are inlined into the weight load; epilogues run per row.
``RowReduction``
    layer norm / softmax: the rows shared by every block in parallel, every block computed
    per row, the element loops vectorised.
``Injective``
    the rest (copies, concatenations, embedding lookup, casts): outer loops in parallel
    when there is enough work, the innermost static loops vectorised.

RowReduction and Injective go parallel only above ``PARALLEL_MIN_WORK`` elements; over a
dynamic number of rows the function holds both versions and picks one per call, so the
one-row kernels of a decode step do not pay for waking and joining the thread pool.

All rules decline (return None) instead of raising, so an unusual PrimFunc stays
unscheduled and correct.

Two kernels are written by hand in TIR instead of scheduled by a rule, and put in place per
target by a pass of the pipeline: :mod:`.int8_gemv` (decode on int8 activations, VNNI
``vpdpbusd``; ``--int8-activations``) and :mod:`.amx_matmul` (prefill in bf16 on the AMX tiles;
``--amx-prefill``).
"""


from .gemv import GEMV
from .injective import Injective
from .matmul import Matmul
from .row_reduction import RowReduction


def default_rules() -> list:
    """The CPU rules in the order they are tried."""
    return [Matmul(), GEMV(), RowReduction(), Injective()]
