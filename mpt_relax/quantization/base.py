"""The interface every quantization scheme implements, and the name its dequantize kernels carry."""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
from typing import Any, ClassVar, Iterator

import numpy as np
from tvm.relax.frontend import nn

from mpt_relax.errors import MPTRelaxError

DEQUANTIZE_PREFIX = "dequantize_"  # PrimFuncs named so are fused into their matmul (see .fuse)
_DECODING = contextvars.ContextVar("mpt_relax_decoding", default=False)


@contextlib.contextmanager
def decoding() -> Iterator[None]:
    """While a model traces its decode step (one token per sequence): layers whose scheme has
    ``int8_activations`` emit the int8 GEMV instead of the exact path."""
    token = _DECODING.set(True)
    try:
        yield
    finally:
        _DECODING.reset(token)


def is_decoding() -> bool:
    """Whether the trace is inside :func:`decoding`."""
    return _DECODING.get()


def rows_op(x: nn.Tensor, func, name: str, weights: list[nn.Tensor], out_features: int, out_dtype: str,
            bias: nn.Tensor | None) -> nn.Tensor:
    """``func`` (a PrimFunc (rows [M, in], *weights) -> [M, out_features]) applied to x [*B, in]
    as rows, then ``bias`` added: a Linear layer's forward through one hand-written kernel."""
    rows = nn.op.reshape(x, (-1, x.shape[-1]))
    y = nn.op.tensor_ir_op(func, name, [rows, *weights], nn.Tensor.placeholder((rows.shape[0], out_features), out_dtype))
    y = nn.op.reshape(y, (*x.shape[:-1], out_features))
    return y + bias if bias is not None else y


class QuantizedNames(frozenset):
    """The float parameter names (``<path>.weight``) a scheme replaces; ``embeddings``: those
    of them that are embedding tables (the tied LM head among them)."""

    def __new__(cls, names=(), embeddings=()):
        obj = super().__new__(cls, names)
        obj.embeddings = frozenset(embeddings)
        return obj


class QuantizationError(MPTRelaxError):
    """An unknown scheme, an invalid one, or a weight a scheme cannot store."""


@dataclasses.dataclass(frozen=True)
class Quantization:
    """A weight quantization scheme, registered by ``name`` (see :mod:`mpt_relax.quantization`).

    A scheme rewrites the float model (:meth:`quantize_model`), names the float parameters it
    replaces (:meth:`quantized_names`) and turns each float checkpoint tensor into the stored
    parameters (:meth:`quantize_param`), one tensor at a time. The base class stores everything
    in ``model_dtype`` (the "none" kind: q0f32, q0f16).
    """

    name: str
    bits: int  # bits per stored weight
    model_dtype: str  # activations, norms and unquantized weights
    embedding: bool = dataclasses.field(default=False, kw_only=True)  # also quantize the embeddings (the tied head)
    embedding_bits: int = dataclasses.field(default=0, kw_only=True)  # their bits, if not ``bits`` (group schemes)
    # decode GEMVs quantize x to int8 per group and sum in integers (mpt_relax.kernels.cpu.int8_gemv)
    int8_activations: bool = dataclasses.field(default=False, kw_only=True)
    # prefill matmuls in bf16 on the AMX tiles where the target has them (mpt_relax.kernels.cpu.amx_matmul)
    amx_prefill: bool = dataclasses.field(default=False, kw_only=True)
    # prefill matmuls on x quantized to int8 per group, integer dot products (mpt_relax.kernels.cpu.int8_matmul)
    int8_prefill: bool = dataclasses.field(default=False, kw_only=True)
    kind: ClassVar[str] = "none"

    def __post_init__(self) -> None:
        if self.embedding and not self.is_quantized:
            raise QuantizationError(f"{self.name} does not quantize weights, so it cannot quantize the embedding either")
        if self.embedding_bits and not self.embedding:
            raise QuantizationError(f"{self.name}: embedding bits without quantizing the embedding")
        if self.int8_activations and not self.is_quantized:
            raise QuantizationError(f"{self.name} keeps float weights; int8 activations need q4f16_1 or q8f16_1")
        if self.int8_prefill and not self.is_quantized:
            raise QuantizationError(f"{self.name} keeps float weights; int8 prefill needs q4f16_1 or q8f16_1")
        if self.int8_prefill and self.amx_prefill:
            raise QuantizationError("--amx-prefill (bf16) and --int8-prefill (int8) are two prefill kernels; choose one")

    @property
    def tag(self) -> str:
        """``name``, plus ``+embedding`` (``+embedding8``: in 8 bits) / ``+a8`` / ``+amx`` / ``+p8`` for
        the embeddings quantized too, int8 decode activations, the AMX prefill, int8 prefill activations."""
        embedding = "+embedding" + (str(self.embedding_bits) if self.embedding_bits else "") if self.embedding else ""
        return (self.name + embedding + ("+a8" if self.int8_activations else "")
                + ("+amx" if self.amx_prefill else "") + ("+p8" if self.int8_prefill else ""))

    @property
    def dir_tag(self) -> str:
        """The tag as it appears in a default artifact directory name (``q4f16_1-emb-a8-amx``)."""
        return self.tag.replace("+embedding", "-emb").replace("+", "-")

    @property
    def is_quantized(self) -> bool:
        """Whether weights are stored other than as ``model_dtype`` floats."""
        return False

    def quantize_model(self, model: nn.Module) -> nn.Module:
        """The model to export, built in ``model_dtype`` (returned as is here)."""
        return model

    def quantized_names(self, model: nn.Module) -> QuantizedNames:
        """Float parameter names (``<path>.weight``) that :meth:`quantize_param` replaces."""
        return QuantizedNames()

    def stored_names(self, name: str) -> tuple[str, ...]:
        """The stored parameters a replaced float parameter ``name`` becomes."""
        return (name,)

    def quantize_param(self, name: str, array: np.ndarray, quantized: QuantizedNames) -> dict[str, np.ndarray]:
        """One float parameter -> the stored parameters (here: the same name in ``model_dtype``);
        ``quantized``: what :meth:`quantized_names` gave."""
        return {name: array.astype(self.model_dtype, copy=False)}

    def info(self) -> dict[str, Any]:
        """What ``mpt-config.json`` records about the scheme."""
        return {"name": self.name, "tag": self.tag, "kind": self.kind, "bits": self.bits,
                "model_dtype": self.model_dtype, "quantized": None, "embedding_quantized": False,
                "activations": "int8 per group of 32 in the decode GEMVs" if self.int8_activations else self.model_dtype,
                "prefill": "bf16 products on the AMX tiles (where the target has AMX-BF16)" if self.amx_prefill
                else "int8 per group of 32, integer dot products" if self.int8_prefill
                else "exact (fp16 models: on the AMX tiles where the target has AMX-BF16)",
                "embedding": f"{self.model_dtype}, like every weight"}

    def tensor_record(self, output: str, source: str, source_shape: tuple[int, ...], embedding: bool = False
                      ) -> dict[str, Any] | None:
        """The ``quantization`` field of one stored tensor's ``tensor-cache.json`` record, if any
        (``embedding``: the tensor stores an embedding table)."""
        return None
