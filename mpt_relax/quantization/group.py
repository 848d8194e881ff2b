"""Weight-only group quantization of the Linear layers: q4f16_1 and q8f16_1 (MLC-LLM's names).

What is stored for a Linear weight [out, in]: ``q_weight`` uint32 [out, in/8] (int4) or
[out, in/4] (int8), and ``q_scale`` float16 [out, in/32].

Group quantization (symmetric, round half to even), with ``max_int = 2**(bits-1) - 1`` (7 for
int4, 127 for int8), ``group_size = 32``, all arithmetic in float32 (the weight widened exactly)::

    scale[o, g]  = float16(max(|w[o, 32g : 32g+32]|) / max_int)      # 0 for an all-zero group
    d[o, g]      = float32(scale[o, g]), or 1.0 where it is 0
    code[o, i]   = clip(rint(w[o, i] / d[o, i // 32]), -max_int, max_int) + max_int   # true division
    w'[o, i]     = (code[o, i] - max_int) * scale[o, i // 32]         # dequantized

:func:`quantize_weight` computes exactly these bytes with a compiled CPU kernel
(:mod:`.group_kernel`), reading float32, float16 or bfloat16 weights as they are stored.

The codes are computed from the float16-rounded scale, so |w - w'| <= scale / 2 except where
rounding the scale down pushed |w / scale| past max_int (then by at most max_int times the
scale's rounding error). This quantizer writes 4-bit codes in [0, 14] and 8-bit codes in
[0, 254]; every kernel takes the whole range (a GGUF Q4_0 / Q8_0 block repacked by
:mod:`.gguf_repack` can hold 15 / 255). Codes are packed along the input dimension into uint32 words, lowest bits first:
with ``pack = 32 // bits`` (8 for int4, 4 for int8)::

    q_weight[o, j] = sum_k code[o, pack*j + k] << (bits * k),   k = 0 .. pack-1

i.e. nibble k (bits 4k .. 4k+3) of word j holds element 8j + k; for int8, byte k (bits
8k .. 8k+7) of word j holds element 4j + k. Read as little-endian bytes, a q8 weight is
exactly the uint8 code matrix [out, in], and byte m of a q4 row holds element 2m in its low
nibble and 2m+1 in its high one. ``in`` must be a multiple of 32 (MPT's dimensions are
multiples of 64); nothing is padded.

int8 codes live in the same uint32 words as int4 (rather than an int8 tensor): one dequantize
compute and one loader path serve both; the CPU GEMV vectorises over whole words (see
``mpt_relax.kernels.cpu.gemv``). On the CPU, decoding with these weights exactly is bound by the
unpacking (about 7-8 G weights/s per core with that schedule; 17-24 with
``mpt_relax.kernels.cpu.group_gemv``, which never converts a code), not by memory bandwidth.

By default only ``nn.Linear`` layers are quantized. The token embedding ``wte`` stays in the
model dtype: MPT ties it to the LM head, and the logits over a 50k vocabulary are the matmul
whose errors reach the sampled token most directly (a per-group int4 error of up to scale/2
per weight shifts every logit), while the embedding is ~3% of MPT-7B's parameters (413 MB in
float16, about a tenth of a q4f16_1 artifact). A separate ``lm_head`` (untied checkpoints) is
an ``nn.Linear`` and is quantized like the other layers. ``get_quantization(name,
embedding=True)`` (``--quantize-embedding``; MLC-LLM's q4f16_1 does the same) quantizes the
embeddings too, with the same layout (``GroupQuantEmbedding``): for a small model, whose
tied head is a large share of the bytes each decoded token reads, that is most of the speed
and memory quantization can give. ``embedding_bits=8`` (``--quantize-embedding 8``) stores them
as q8f16_1 codes under a q4f16_1 model instead: llama.cpp's Q4_0 / Q4_K_M files likewise keep
the tied head in more bits (Q6_K) than the rest.

The loader side streams one tensor at a time: ``q.quantized_names(model)`` names the weights
(e.g. ``blocks.0.attn.Wqkv.weight``), and ``q.quantize_param`` maps one float parameter to the
arrays the quantized module expects (``blocks.0.attn.Wqkv.q_weight`` / ``.q_scale``).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, ClassVar

import numpy as np
from tvm import te, tirx
from tvm.relax.frontend import nn

from mpt_relax.kernels.cpu import amx_matmul, exact_matmul, int8_gemv, int8_matmul
from mpt_relax.quantization import group_kernel
from mpt_relax.quantization.base import (DEQUANTIZE_PREFIX, Quantization, QuantizationError, QuantizedNames, is_decoding,
                                         rows_op)

STORAGE_DTYPE = "uint32"
_STORAGE_BITS = 32
_BLOCK_ELEMENTS = 1 << 18  # elements per numpy dequantize block: ~1 MB of float32


@dataclasses.dataclass(frozen=True)
class GroupQuantization(Quantization):
    """Symmetric ``bits``-bit codes packed in uint32 words, one ``model_dtype`` scale per
    ``group_size`` consecutive input elements of a row."""

    group_size: int = 32
    kind: ClassVar[str] = "group"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.bits not in (4, 8) or self.group_size % self.pack_factor or self.group_size & (self.group_size - 1):
            raise QuantizationError(
                f"{self.name}: need bits 4 or 8 and a power-of-two group size that is a multiple of "
                f"32 // bits, got bits={self.bits}, group_size={self.group_size}"
            )
        if self.embedding_bits not in (0, 4, 8):
            raise QuantizationError(f"{self.name}: the embedding can be quantized in 4 or 8 bits, not {self.embedding_bits}")
        if self.embedding_bits == self.bits:
            object.__setattr__(self, "embedding_bits", 0)  # the default: one spelling per scheme
        if (self.int8_activations or self.int8_prefill) and self.group_size != int8_gemv.GROUP:
            raise QuantizationError(f"{self.name}: int8 activations need groups of {int8_gemv.GROUP}, "
                                    f"not {self.group_size}")

    @property
    def is_quantized(self) -> bool:
        return True

    @property
    def embedding_scheme(self) -> GroupQuantization:
        """The scheme the embeddings are stored in: this one, or its ``embedding_bits`` sibling
        (``q8f16_1`` for a q4f16_1 with 8-bit embeddings), with the same kernel options."""
        if not self.embedding_bits:
            return self
        name = self.name.replace(f"q{self.bits}", f"q{self.embedding_bits}", 1)
        return dataclasses.replace(self, name=name, bits=self.embedding_bits, embedding_bits=0)

    @property
    def pack_factor(self) -> int:
        """Codes per uint32 word (8 for int4, 4 for int8)."""
        return _STORAGE_BITS // self.bits

    @property
    def max_int(self) -> int:
        """Largest code magnitude; also the offset added to store codes unsigned."""
        return 2 ** (self.bits - 1) - 1

    def check_linear_shape(self, out_features: int, in_features: int) -> None:
        """Raise QuantizationError unless a [out_features, in_features] weight can be quantized."""
        if not isinstance(in_features, int) or not isinstance(out_features, int):
            raise QuantizationError(f"{self.name}: Linear shapes must be static ints, got [{out_features}, {in_features}]")
        if in_features % self.group_size:
            raise QuantizationError(
                f"{self.name}: cannot quantize a [{out_features}, {in_features}] weight: in_features "
                f"{in_features} is not a multiple of the group size {self.group_size}"
            )

    def q_weight_shape(self, out_features: int, in_features: int) -> tuple[int, int]:
        """Shape of the packed codes of a [out, in] weight: [out, in / pack_factor]."""
        return (out_features, in_features // self.pack_factor)

    def q_scale_shape(self, out_features: int, in_features: int) -> tuple[int, int]:
        """Shape of the scales of a [out, in] weight: [out, in / group_size]."""
        return (out_features, in_features // self.group_size)

    def quantize_model(self, model: nn.Module) -> nn.Module:
        """Replace, in place, every ``nn.Linear`` of ``model`` (recursively, ModuleLists included)
        with a ``GroupQuantLinear`` under the same attribute name, and with ``embedding`` every
        ``nn.Embedding`` with a ``GroupQuantEmbedding``; returns ``model``.

        Parameter ``<path>.weight`` becomes ``<path>.q_weight`` + ``<path>.q_scale``; biases and
        every other parameter (norms; the embeddings unless ``embedding``) are untouched.
        """

        def replace(path: str, layer: nn.Module) -> nn.Module:
            if isinstance(layer, GroupQuantLinear):
                return layer
            try:
                if isinstance(layer, nn.Embedding):
                    return GroupQuantEmbedding.from_embedding(layer, self.embedding_scheme)
                return GroupQuantLinear.from_linear(layer, self)
            except QuantizationError as err:
                raise QuantizationError(f"{path}: {err}") from None

        return _QuantizableMutator(replace, self.embedding).visit("", model)

    def quantized_names(self, model: nn.Module) -> QuantizedNames:
        """Float names (``<path>.weight``) of the layers :meth:`quantize_model` quantizes: the
        Linear layers, and the embeddings when ``embedding``. Works on the model before or after
        :meth:`quantize_model` (GroupQuantLinear counts too)."""
        names: set[str] = set()
        embeddings: set[str] = set()

        def record(path: str, layer: nn.Module) -> nn.Module:
            names.add(f"{path}.weight")
            if isinstance(layer, (nn.Embedding, GroupQuantEmbedding)):
                embeddings.add(f"{path}.weight")
            return layer

        _QuantizableMutator(record, self.embedding).visit("", model)
        return QuantizedNames(names, embeddings)

    def stored_names(self, name: str) -> tuple[str, ...]:
        prefix = name.removesuffix(".weight")
        return (f"{prefix}.q_weight", f"{prefix}.q_scale")

    def quantize_param(self, name: str, array: np.ndarray, quantized: QuantizedNames) -> dict[str, np.ndarray]:
        """``<path>.weight`` [out, in] in ``quantized`` -> ``{"<path>.q_weight": uint32,
        "<path>.q_scale": model dtype}`` (an embedding's in :attr:`embedding_scheme`); any other
        parameter -> ``{name: array in model dtype}``."""
        if name in quantized:
            packed = quantize_weight(array, self.embedding_scheme if name in quantized.embeddings else self)
            return dict(zip(self.stored_names(name), (packed["q_weight"], packed["q_scale"])))
        return super().quantize_param(name, array, quantized)

    def info(self) -> dict[str, Any]:
        if self.embedding:
            embedding = (f"{self.embedding_scheme.name} group-quantized" + (" like the Linear weights" if not self.embedding_bits
                         else "") + " (it is also the tied LM head)")
        else:
            embedding = (f"{self.model_dtype}, unquantized: it is also the tied LM head, whose errors reach the "
                         "sampled token directly (about 3% of MPT-7B's parameters)")
        return {**super().info(), "group_size": self.group_size, "embedding_quantized": self.embedding,
                "quantized": "Linear weights (Wqkv, out_proj, up_proj, down_proj, untied lm_head)", "embedding": embedding}

    def tensor_record(self, output: str, source: str, source_shape: tuple[int, ...], embedding: bool = False
                      ) -> dict[str, Any] | None:
        return {"scheme": (self.embedding_scheme if embedding else self).name, "source": source, "source_shape": list(source_shape),
                "role": output.rsplit(".", 1)[1]}


def _require_group(q: Quantization) -> None:
    if not isinstance(q, GroupQuantization):
        raise QuantizationError(f"{q.name} does not quantize weights (kind {q.kind!r})")


# ---------------------------------------------------------------------------------- arrays
def quantize_weight(w: np.ndarray, q: GroupQuantization) -> dict[str, np.ndarray]:
    """Quantize one Linear weight with the compiled CPU kernel (:mod:`.group_kernel`).

    w: [out, in] float32, float16 or bfloat16 (``ml_dtypes.bfloat16``), read in its own dtype.
    Returns ``q_weight`` uint32 [out, in / pack_factor] and ``q_scale`` (``q.model_dtype``)
    [out, in / group_size], laid out as in the module docstring. QuantizationError for a
    non-finite weight or a group scale beyond ``q.model_dtype``.
    """
    _require_group(q)
    if w.ndim != 2:
        raise QuantizationError(f"{q.name}: expected a 2-D [out, in] weight, got shape {w.shape}")
    if w.dtype not in group_kernel.SOURCES:
        raise QuantizationError(f"{q.name}: cannot quantize a {w.dtype} weight (float32, float16 or bfloat16)")
    out_features, in_features = w.shape
    q.check_linear_shape(out_features, in_features)
    # C order for the kernel; a read-only array is copied (DLPack cannot hand it over)
    w = np.ascontiguousarray(w) if w.flags.writeable else w.copy()
    q_weight, q_scale = group_kernel.quantize(w, q.bits, q.group_size, q.model_dtype)
    if not np.isfinite(q_scale).all():
        raise QuantizationError(f"{q.name}: weight has non-finite values or a group scale beyond {q.model_dtype}")
    return {"q_weight": q_weight, "q_scale": q_scale}


def dequantize_weight(
    q_weight: np.ndarray, q_scale: np.ndarray, q: GroupQuantization, shape: tuple[int, int]
) -> np.ndarray:
    """Inverse of ``quantize_weight``: codes + scales -> float32 [out, in] (``shape``)."""
    _require_group(q)
    out_features, in_features = shape
    q.check_linear_shape(out_features, in_features)
    if q_weight.shape != q.q_weight_shape(*shape) or q_scale.shape != q.q_scale_shape(*shape):
        raise QuantizationError(
            f"{q.name}: q_weight {q_weight.shape} / q_scale {q_scale.shape} do not describe a {tuple(shape)} weight"
        )
    w = np.empty(shape, np.float32)
    rows = max(1, _BLOCK_ELEMENTS // in_features)
    for start in range(0, out_features, rows):
        block = slice(start, start + rows)
        w[block] = _dequantize_rows(q_weight[block], q_scale[block], q)
    return w


def _dequantize_rows(q_weight: np.ndarray, q_scale: np.ndarray, q: GroupQuantization) -> np.ndarray:
    """uint32 [rows, in / pack_factor], scales [rows, in / group_size] -> float32 [rows, in]."""
    codes = _unpack(q_weight, q.bits).astype(np.int16) - q.max_int  # every byte: a repacked Q8_0 block may hold 255
    groups = codes.reshape(*q_scale.shape, q.group_size) * q_scale.astype(np.float32)[..., None]
    return groups.reshape(codes.shape)


def _unpack(words: np.ndarray, bits: int) -> np.ndarray:
    """uint32 words [out, n] -> uint8 codes [out, n * 32 / bits]."""
    data = np.ascontiguousarray(words, dtype="<u4").view(np.uint8)
    per_byte = 8 // bits
    mask = (1 << bits) - 1
    codes = np.stack([(data >> (bits * k)) & mask for k in range(per_byte)], axis=-1)
    return codes.reshape(words.shape[0], -1)


# ---------------------------------------------------------------------------------- relax
class GroupQuantLinear(nn.Module):
    """``y = x @ W^T + b`` with W stored group-quantized (see the module docstring).

    Parameters: ``q_weight`` uint32 [out, in / pack_factor], ``q_scale`` model dtype
    [out, in / group_size], optional ``bias`` [out]. The forward pass dequantizes W to
    [out, in] in the model dtype with an injective TE compute, then calls ``matmul(x, W^T)``
    like ``nn.Linear``. Compile with ``fuse_dequantize_matmul()`` in the pipeline so that the
    dequantize runs inside the matmul kernel instead of materializing W.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        q: GroupQuantization,
        bias: bool = True,
        out_dtype: str | None = None,
    ):
        super().__init__()
        _require_group(q)
        q.check_linear_shape(out_features, in_features)
        self.in_features = in_features
        self.out_features = out_features
        self.quantization = q
        self.out_dtype = out_dtype
        self.q_weight = nn.Parameter(q.q_weight_shape(out_features, in_features), STORAGE_DTYPE)
        self.q_scale = nn.Parameter(q.q_scale_shape(out_features, in_features), q.model_dtype)
        self.bias = nn.Parameter((out_features,), out_dtype or q.model_dtype) if bias else None

    @classmethod
    def from_linear(cls, linear: nn.Linear, q: GroupQuantization) -> GroupQuantLinear:
        """A quantized layer with the same features, bias presence and out_dtype as ``linear``."""
        return cls(linear.in_features, linear.out_features, q, linear.bias is not None, linear.out_dtype)

    def forward(self, x: nn.Tensor, prefill_kernels: bool = True) -> nn.Tensor:
        """x: [*B, in] model dtype -> [*B, out] (``out_dtype`` if set). ``prefill_kernels``: allow
        the scheme's AMX / int8 prefill kernels (``amx_prefill``, ``int8_prefill``)."""
        if self.quantization.int8_activations and is_decoding():
            return self._int8_forward(x)
        if (prefill_kernels and self.quantization.int8_prefill and not is_decoding()
                and int8_matmul.supported(self.out_features, self.in_features)):
            return self._int8_forward(x, prefill=True)
        if (prefill_kernels and self.quantization.amx_prefill and not is_decoding()
                and amx_matmul.supported(self.out_features, self.in_features)):
            return self._amx_forward(x)
        name = f"{DEQUANTIZE_PREFIX}{self.quantization.name}"
        w = nn.op.tensor_expr_op(self._dequantize, name, [self.q_weight, self.q_scale])
        y = nn.op.matmul(x, nn.op.permute_dims(w), out_dtype=self.out_dtype)
        return y + self.bias if self.bias is not None else y

    def _int8_forward(self, x: nn.Tensor, prefill: bool = False) -> nn.Tensor:
        """x quantized to int8 per group, integer dot products (:mod:`mpt_relax.kernels.cpu.int8_gemv`;
        the target's fastest kernel is chosen when compiling, for a prefill the int8 GEMM)."""
        q, k, n = self.quantization, self.in_features, self.out_features
        rows = nn.op.reshape(x, (-1, k))
        m = rows.shape[0]
        xq, xs, xc = quantized_activation(rows, q.bits)
        out_dtype = self.out_dtype or q.model_dtype
        kernel = int8_gemv.int8_gemv(n, k, q.bits, out_dtype, q.model_dtype, prefill=prefill)
        y = nn.op.tensor_ir_op(kernel, f"int8_{'matmul' if prefill else 'gemv'}_{q.name}",
                               [xq, xs, xc, self.q_weight, self.q_scale], nn.Tensor.placeholder((m, n), out_dtype))
        y = nn.op.reshape(y, (*x.shape[:-1], n))
        return y + self.bias if self.bias is not None else y

    def _amx_forward(self, x: nn.Tensor) -> nn.Tensor:
        """Prefill: the exact dequantize + matmul as one kernel that compiling swaps for the AMX
        bf16 one where the target has AMX-BF16 (:mod:`mpt_relax.kernels.cpu.amx_matmul`)."""
        q, k, n = self.quantization, self.in_features, self.out_features
        out_dtype = self.out_dtype or q.model_dtype
        func = exact_matmul.exact_matmul(q, n, k, x.dtype, out_dtype, _dequantized)
        return rows_op(x, func, f"amx_matmul_{q.name}", [self.q_weight, self.q_scale], n, out_dtype, self.bias)

    def _dequantize(self, q_weight: te.Tensor, q_scale: te.Tensor) -> te.Tensor:
        """TE: q_weight [out, in / pack] uint32, q_scale [out, in / group] -> W [out, in]."""
        return te.compute(
            (self.out_features, self.in_features),
            lambda o, i: _dequantized(self.quantization, q_weight, q_scale, o, i),
            name="dequantize",
        )

    def to(self, dtype: str | None = None) -> None:  # pylint: disable=invalid-name
        """Like ``nn.Linear.to``: only the bias follows ``dtype``; codes and scales are fixed by the scheme."""
        if self.bias is not None and self.out_dtype is None:
            self.bias.to(dtype=dtype)


def quantized_activation(rows: nn.Tensor, bits: int) -> tuple[nn.Tensor, nn.Tensor, nn.Tensor]:
    """rows [M, K] -> (xq int8 [M, K], xs, xc float32 [M, K/32]): :func:`~mpt_relax.kernels.cpu.int8_gemv.quantize_activation`
    for ``bits``-bit weights."""
    (m, k), groups = rows.shape, rows.shape[1] // int8_gemv.GROUP
    return nn.op.tensor_ir_op(
        int8_gemv.quantize_activation(k, bits, rows.dtype), "quantize_activation_int8", [rows],
        [nn.Tensor.placeholder((m, k), "int8"), nn.Tensor.placeholder((m, groups), "float32"),
         nn.Tensor.placeholder((m, groups), "float32")])


def _dequantized(q: GroupQuantization, q_weight: te.Tensor, q_scale: te.Tensor, row, col) -> tirx.PrimExpr:
    """Element [row, col] of the dequantized weight, in ``q.model_dtype``."""
    mask = tirx.const((1 << q.bits) - 1, STORAGE_DTYPE)
    shift = (col % q.pack_factor * q.bits).astype(STORAGE_DTYPE)
    code = (q_weight[row, col // q.pack_factor] >> shift) & mask
    return (code.astype(q.model_dtype) - tirx.const(q.max_int, q.model_dtype)) * q_scale[row, col // q.group_size]


class GroupQuantEmbedding(GroupQuantLinear):
    """An embedding table [num, dim] stored group-quantized like a Linear weight [out=num, in=dim].

    ``forward(ids)`` looks rows up (ids clipped to range, dequantizing only those rows);
    :meth:`head` is the tied LM head, ``x @ table^T`` with fp32 logits, fused with its
    dequantize like any GroupQuantLinear.
    """

    def __init__(self, num: int, dim: int, q: GroupQuantization):
        super().__init__(dim, num, q, bias=False, out_dtype="float32")

    @classmethod
    def from_embedding(cls, embedding: nn.Embedding, q: GroupQuantization) -> GroupQuantEmbedding:
        return cls(embedding.num, embedding.dim, q)

    def forward(self, ids: nn.Tensor) -> nn.Tensor:
        """ids [n] int32 -> rows [n, dim] in the model dtype."""
        return nn.op.tensor_expr_op(self._lookup, f"take_{DEQUANTIZE_PREFIX}{self.quantization.name}",
                                    [ids, self.q_weight, self.q_scale])

    def head(self, x: nn.Tensor) -> nn.Tensor:
        """x [*B, dim] -> fp32 logits [*B, num]. Never on AMX: prefill takes the head of a few rows
        only, and the AMX kernel repacks the whole table per call."""
        return super().forward(x, prefill_kernels=False)

    def _lookup(self, ids: te.Tensor, q_weight: te.Tensor, q_scale: te.Tensor) -> te.Tensor:
        return te.compute(
            (ids.shape[0], self.in_features),
            lambda n, i: _dequantized(self.quantization, q_weight, q_scale, _clipped(ids[n], self.out_features), i),
            name="take_dequantize",
        )


def _clipped(index: tirx.PrimExpr, size: int) -> tirx.PrimExpr:
    """``index`` clipped to [0, size), like a take in clip mode."""
    return tirx.max(tirx.min(index, size - 1), 0)


class _QuantizableMutator(nn.Mutator):
    """Replaces every nn.Linear / GroupQuantLinear (and, with ``embeddings``, every
    nn.Embedding) with ``fn(path, layer)``."""

    def __init__(self, fn: Callable[[str, nn.Module], nn.Module], embeddings: bool = False):
        self.fn = fn
        self.kinds = (nn.Linear, GroupQuantLinear, nn.Embedding) if embeddings else (nn.Linear, GroupQuantLinear)

    def visit_module(self, name: str, node: nn.Module) -> nn.Module:
        if isinstance(node, self.kinds):
            return self.fn(name, node)
        return self.visit(name, node)
