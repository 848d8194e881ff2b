"""The ``gguf`` scheme: keep each weight of a GGUF file in the file's own encoding.

Built from a ``.gguf`` model (the default there), the scheme is first bound to the file's
tensor types (:meth:`GGUFQuantization.bind`). Every 2-D weight (the Linear layers, the token
embedding, an untied head, learned positions) becomes a :class:`GGUFLinear` /
:class:`GGUFEmbedding` whose one parameter ``<path>.q_blocks`` holds the file's bytes as they
are (see :mod:`.gguf_blocks` for the layouts and the decoding); its dequantize compute, named
``dequantize_gguf_<type>``, is fused into the matmul like a group-quantized layer's. An F16
weight is the model dtype's own array: its layer stays a plain Linear / Embedding (q0f16's
kernels). Q4_0 and
Q8_0 weights are the exception: their blocks are rewritten without loss as q4f16_1 / q8f16_1
codes and scales (:mod:`.gguf_repack`) and become group-quantized layers, which run on the
group schemes' kernels (the decode GEMVs; ``--int8-activations``, ``--amx-prefill`` and
``--int8-prefill`` where asked for). With ``--int8-activations`` a decode step's Q6_K, Q4_K
and Q5_K weights (llama.cpp's Q4_K_M / Q5_K_M files: Q4_K or Q5_K, some layers and the tied
head in Q6_K) also multiply int8 activations (:data:`INT8_GEMVS`). 1-D tensors (norms, biases) are stored in the model
dtype, float16. Types without a decoder are refused in one line naming the type and the tensor.
"""

from __future__ import annotations

import collections
import dataclasses
from typing import Any, ClassVar

import numpy as np
from tvm import te, tirx
from tvm.relax.frontend import nn

from mpt_relax.kernels.cpu import amx_matmul, exact_matmul, q4k_q5k_gemv, q6k_int8_gemv
from mpt_relax.quantization.base import (DEQUANTIZE_PREFIX, Quantization, QuantizationError, QuantizedNames,
                                         is_decoding, rows_op)
from mpt_relax.quantization.gguf_blocks import BLOCK_TYPES, BlockType
from mpt_relax.quantization.gguf_repack import GROUP_SCHEMES, repack
from mpt_relax.quantization.group import GroupQuantEmbedding, GroupQuantization, GroupQuantLinear, quantized_activation

STORED_SUFFIX = "q_blocks"
# the block types with a decode GEMV on int8 activations: (out, in, out_dtype, isa) -> the kernel
# (the generic one by default; compile.int8_kernels picks the target's)
INT8_GEMVS = {"Q6_K": q6k_int8_gemv.q6k_int8_gemv, "Q4_K": q4k_q5k_gemv.q4k_int8_gemv,
              "Q5_K": q4k_q5k_gemv.q5k_int8_gemv}


@dataclasses.dataclass(frozen=True)
class GGUFQuantization(Quantization):
    """Weights kept as a GGUF file stores them; ``types`` pairs each kept float parameter name
    (``transformer.blocks.0.attn.Wqkv.weight``) with its GGML type name. ``bits`` is the mean
    bits per kept weight (0 while unbound)."""

    types: tuple[tuple[str, str], ...] = ()
    kind: ClassVar[str] = "gguf"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.embedding:
            raise QuantizationError(f"{self.name} keeps the embedding in the file's own type; drop --quantize-embedding")

    @property
    def is_quantized(self) -> bool:
        return True

    def bind(self, types: dict[str, str], sizes: dict[str, int], sources: dict[str, str] | None = None
             ) -> GGUFQuantization:
        """The scheme for one file: ``types`` float parameter name -> GGML type of each 2-D
        weight, ``sizes`` name -> element count (for the mean bits per weight), ``sources``
        name -> the file's tensor name (for the error naming an unsupported type)."""
        for name, type_name in types.items():
            if type_name not in BLOCK_TYPES:
                raise QuantizationError(
                    f"tensor {(sources or {}).get(name, name)} has GGML type {type_name}, which the gguf scheme "
                    f"cannot keep (supported: "
                    f"{', '.join(BLOCK_TYPES)}); or build with --quantization q4f16_1 / q0f16 (dequantized on load)")
        total = sum(sizes[n] for n in types) or 1
        bits = sum(BLOCK_TYPES[t].bits_per_weight * sizes[n] for n, t in types.items()) / total
        return dataclasses.replace(self, bits=round(bits), types=tuple(sorted(types.items())))

    def _type_of(self, name: str) -> BlockType:
        return BLOCK_TYPES[dict(self.types)[name]]

    def _group_of(self, name: str) -> GroupQuantization | None:
        """The group scheme a kept Q4_0 / Q8_0 weight is repacked into (this scheme's kernel
        options included), or None for the other types."""
        scheme = GROUP_SCHEMES.get(dict(self.types).get(name, ""))
        if scheme is None:
            return None
        return GroupQuantization(*scheme, self.model_dtype, 32, int8_activations=self.int8_activations,
                                 amx_prefill=self.amx_prefill, int8_prefill=self.int8_prefill)

    def quantize_model(self, model: nn.Module) -> nn.Module:
        """Replace every Linear / Embedding whose weight is in ``types`` with its GGUF layer."""
        if not self.types:
            raise QuantizationError(f"{self.name} keeps a GGUF file's own blocks: build from a .gguf file, or choose "
                                    "another quantization (q4f16_1, q0f16, ...)")
        kept, group_of, plain, int8, amx = dict(self.types), self._group_of, self._plain, self.int8_activations, self.amx_prefill

        class Replace(nn.Mutator):
            def visit_module(self, path: str, node: nn.Module) -> nn.Module:
                block = BLOCK_TYPES.get(kept.get(f"{path}.weight", ""))
                group = group_of(f"{path}.weight")
                if plain(f"{path}.weight") and isinstance(node, (nn.Embedding, nn.Linear)):
                    return node
                if group is not None and isinstance(node, nn.Embedding):
                    return GroupQuantEmbedding.from_embedding(node, group)
                if group is not None and isinstance(node, nn.Linear):
                    return GroupQuantLinear.from_linear(node, group)
                if block is not None and isinstance(node, nn.Embedding):
                    return GGUFEmbedding(node.num, node.dim, block, node.weight.dtype, int8)
                if block is not None and isinstance(node, nn.Linear):
                    return GGUFLinear(node.in_features, node.out_features, block, node.weight.dtype,
                                      node.bias is not None, node.out_dtype, int8, amx)
                return self.visit(path, node)

        return Replace().visit("", model)

    def quantized_names(self, model: nn.Module) -> QuantizedNames:
        return QuantizedNames(dict(self.types))

    def _plain(self, name: str) -> bool:
        """Whether a kept weight is an F16 array in a float16 model: a plain weight, as q0f16's."""
        return dict(self.types).get(name) == "F16" and self.model_dtype == "float16"

    def stored_names(self, name: str) -> tuple[str, ...]:
        path = name.removesuffix(".weight")
        if self._plain(name):
            return (name,)
        return (f"{path}.q_weight", f"{path}.q_scale") if self._group_of(name) else (f"{path}.{STORED_SUFFIX}",)

    def quantize_param(self, name: str, array: np.ndarray, quantized: QuantizedNames) -> dict[str, np.ndarray]:
        """A kept weight -> ``{<path>.q_blocks: array}``, ``array`` being the tensor as the file
        stores it (uint8 blocks, or float32 / float16); anything else -> float16."""
        if name not in quantized:
            return super().quantize_param(name, array, quantized)
        block = self._type_of(name)
        if array.dtype != np.dtype(block.storage_dtype):
            raise QuantizationError(f"{self.name}: {name} must come as the file's {block.name} data "
                                    f"({block.storage_dtype}), got {array.dtype}")
        if self._group_of(name) is not None:
            shape = (array.shape[0], array.shape[1] // block.type_size * block.block)
            return dict(zip(self.stored_names(name), repack(block.name, array, shape).values()))
        return {self.stored_names(name)[0]: array}

    def info(self) -> dict[str, Any]:
        counts = collections.Counter(t for _, t in self.types)
        return {**super().info(), "embedding_quantized": any(n.endswith("wte.weight") for n, _ in self.types),
                "quantized": "every 2-D weight, in the GGUF file's own type (norms and biases in float16)",
                "embedding": "kept in the GGUF file's own type (it is also the tied LM head)",
                "ggml_types": dict(sorted(counts.items())),
                "repacked": {t: GROUP_SCHEMES[t][0] for t in sorted(counts) if t in GROUP_SCHEMES},
                "bits_per_weight": {t: BLOCK_TYPES[t].bits_per_weight for t in sorted(counts)}}

    def tensor_record(self, output: str, source: str, source_shape: tuple[int, ...], embedding: bool = False
                      ) -> dict[str, Any] | None:
        path, role = output.rsplit(".", 1)
        name = f"{path}.weight"
        if name not in dict(self.types) or output not in self.stored_names(name):
            return None  # a norm or a bias, stored as float16
        group = self._group_of(name)
        return {"scheme": self.name, "ggml_type": self._type_of(name).name, "source": source,
                "source_shape": list(source_shape), "role": role, **({"repacked_as": group.name} if group else {})}


class GGUFLinear(nn.Module):
    """``y = x @ W^T + b`` with W [out, in] kept in a GGML encoding: ``q_blocks`` (uint8 blocks,
    or float32 / float16 [out, in]), optional ``bias`` [out]. The forward dequantizes W into
    ``dtype`` with a TE compute (fused into the matmul by ``fuse_dequantize_matmul``), except a
    decode step's Q6_K / Q4_K / Q5_K weight with ``int8_activations``: x quantized to int8 per group
    of 32, :data:`INT8_GEMVS`; and a prefill's with ``amx_prefill``: one kernel that compiling
    puts on the AMX tiles where the target has them (:mod:`mpt_relax.kernels.cpu.amx_matmul`)."""

    def __init__(self, in_features: int, out_features: int, block: BlockType, dtype: str, bias: bool = False,
                 out_dtype: str | None = None, int8_activations: bool = False, amx_prefill: bool = False):
        super().__init__()
        if in_features % block.block:
            raise QuantizationError(f"{block.name}: in_features {in_features} is not a multiple of its "
                                    f"{block.block}-weight blocks")
        self.in_features, self.out_features = in_features, out_features
        self.block, self.dtype, self.out_dtype = block, dtype, out_dtype
        self.int8_activations = int8_activations and block.name in INT8_GEMVS
        self.amx_prefill = (amx_prefill and block.name in amx_matmul.BLOCK_TYPES
                            and amx_matmul.supported(out_features, in_features))
        self.q_blocks = nn.Parameter(block.storage_shape(out_features, in_features), block.storage_dtype)
        self.bias = nn.Parameter((out_features,), out_dtype or dtype) if bias else None

    def forward(self, x: nn.Tensor) -> nn.Tensor:
        """x: [*B, in] -> [*B, out] (``out_dtype`` if set)."""
        if self.int8_activations and is_decoding():
            return self._int8_forward(x)
        if self.amx_prefill and not is_decoding():
            out_dtype = self.out_dtype or self.dtype
            func = exact_matmul.exact_block_matmul(self.block, self.out_features, self.in_features, x.dtype,
                                                   out_dtype, self.dtype)
            return rows_op(x, func, f"amx_matmul_gguf_{self.block.name.lower()}", [self.q_blocks], self.out_features,
                           out_dtype, self.bias)
        w = nn.op.tensor_expr_op(self._dequantize, self._kernel_name(DEQUANTIZE_PREFIX), [self.q_blocks])
        y = nn.op.matmul(x, nn.op.permute_dims(w), out_dtype=self.out_dtype)
        return y + self.bias if self.bias is not None else y

    def _int8_forward(self, x: nn.Tensor) -> nn.Tensor:
        """Q6_K / Q4_K / Q5_K: x quantized to int8 per group, the codes multiplied in integers (the
        target's fastest kernel is chosen when compiling)."""
        k, n = self.in_features, self.out_features
        rows = nn.op.reshape(x, (-1, k))
        m = rows.shape[0]
        xq, xs, _ = quantized_activation(rows, 8)
        out_dtype = self.out_dtype or self.dtype
        make = INT8_GEMVS[self.block.name]
        y = nn.op.tensor_ir_op(make(n, k, out_dtype), make.__name__, [xq, xs, self.q_blocks],
                               nn.Tensor.placeholder((m, n), out_dtype))
        y = nn.op.reshape(y, (*x.shape[:-1], n))
        return y + self.bias if self.bias is not None else y

    def _kernel_name(self, prefix: str) -> str:
        return f"{prefix}gguf_{self.block.name.lower()}"

    def _dequantize(self, raw: te.Tensor) -> te.Tensor:
        """TE: the stored blocks -> W [out, in] in ``dtype``."""
        return te.compute((self.out_features, self.in_features),
                          lambda o, i: self.block.decode(raw, o, i).astype(self.dtype), name="dequantize")

    def to(self, dtype: str | None = None) -> None:  # pylint: disable=invalid-name
        """Only the bias follows ``dtype``; the blocks are fixed by the file."""
        if self.bias is not None and self.out_dtype is None:
            self.bias.to(dtype=dtype)


class GGUFEmbedding(GGUFLinear):
    """A table [num, dim] kept in a GGML encoding: ``forward(ids)`` looks rows up (ids clipped to
    range, decoding only those rows), :meth:`head` is the tied LM head with fp32 logits."""

    def __init__(self, num: int, dim: int, block: BlockType, dtype: str, int8_activations: bool = False):
        super().__init__(dim, num, block, dtype, bias=False, out_dtype="float32", int8_activations=int8_activations)

    def forward(self, ids: nn.Tensor) -> nn.Tensor:
        """ids [n] int32 -> rows [n, dim] in ``dtype``."""
        return nn.op.tensor_expr_op(self._lookup, self._kernel_name(f"take_{DEQUANTIZE_PREFIX}"), [ids, self.q_blocks])

    def head(self, x: nn.Tensor) -> nn.Tensor:
        """x [*B, dim] -> fp32 logits [*B, num]."""
        return super().forward(x)

    def _lookup(self, ids: te.Tensor, raw: te.Tensor) -> te.Tensor:
        def row(n):
            return tirx.max(tirx.min(ids[n], self.out_features - 1), 0)

        return te.compute((ids.shape[0], self.in_features),
                          lambda n, i: self.block.decode(raw, row(n), i).astype(self.dtype), name="take_dequantize")
