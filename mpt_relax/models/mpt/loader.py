"""The weight map: checkpoint tensors -> the Relax module's parameters, streamed shard by shard.

The map is derived from the module's own parameter list (``named_parameters``), never kept by
hand: the model names its modules like the PyTorch checkpoint, so each parameter's source is the
tensor of the same name, and the transform is a dtype cast (or a quantization, when a
quantization rule replaces a Linear weight by several packed tensors). A GGUF file names the
same tensors its own way (:func:`gguf_name`: ``transformer.blocks.0.attn.Wqkv.weight`` is
``blk.0.attn_qkv.weight``); ``weight_rules(..., naming=gguf_name)`` keys the rules by those names.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Callable, Iterator

import ml_dtypes
import numpy as np
import torch
from tvm.relax.frontend import nn

from mpt_relax.io.checkpoint import FP16_MAX, CheckpointError, iter_tensors, tensor_shapes
from mpt_relax.io.prefetch import prefetched
from mpt_relax.quantization import Quantization

Transform = Callable[[torch.Tensor], dict[str, np.ndarray]]
_CAST_CHUNK = 1 << 22  # elements per float32 step of a float16 cast: 16 MB


class WeightMapError(CheckpointError):
    """Checkpoint tensors that do not fit the model: missing, unexpected or mis-shaped."""


@dataclasses.dataclass(frozen=True)
class WeightRule:
    """How one checkpoint tensor becomes one or more Relax parameters."""

    source: str  # checkpoint tensor name
    shape: tuple[int, ...]  # the shape the checkpoint must store
    outputs: tuple[str, ...]  # the Relax parameters it produces
    transform: Transform  # source tensor -> {param name: array}, keys == outputs


def to_numpy(t: torch.Tensor, dtype: str) -> np.ndarray:
    """A checkpoint tensor (bf16/fp16/fp32) as a numpy array of ``dtype``.

    Casting to float16 clamps to +-65504 first, so bf16 outliers never become inf; it goes
    through float32 in chunks of ``_CAST_CHUNK`` elements, never a float32 copy of the whole tensor.
    """
    if dtype != "float16" or t.dtype == torch.float16:
        return t.to(getattr(torch, dtype)).contiguous().numpy()
    flat = t.contiguous().reshape(-1)
    out = torch.empty(flat.shape, dtype=torch.float16)
    for start in range(0, flat.numel(), _CAST_CHUNK):
        part = slice(start, start + _CAST_CHUNK)
        out[part] = flat[part].to(torch.float32).clamp_(-FP16_MAX, FP16_MAX)
    return out.reshape(t.shape).numpy()


def cast_rule(name: str, param: nn.Parameter, source: str | None = None) -> WeightRule:
    """Checkpoint tensor ``source`` (default: ``name``) -> parameter ``name``, cast to its dtype."""
    shape = tuple(int(s) for s in param.shape)
    return WeightRule(source or name, shape, (name,), lambda t: {name: to_numpy(t, param.dtype)})


def source_array(t: torch.Tensor) -> np.ndarray:
    """A checkpoint tensor as numpy in its own float dtype, without a copy: bfloat16 as
    ``ml_dtypes.bfloat16`` (the same bits), float16 / float32 as they are; any other dtype as float32."""
    t = t.contiguous()
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return (t if t.dtype in (torch.float16, torch.float32) else t.to(torch.float32)).numpy()


def quantize_rule(name: str, param: nn.Parameter, q: Quantization, quantized: frozenset[str],
                  source: str | None = None) -> WeightRule:
    """A weight ``q`` replaces -> its stored parameters (``q.quantize_param``), quantized from the
    checkpoint's own dtype (no float32 copy)."""
    shape = tuple(int(s) for s in param.shape)
    return WeightRule(
        source or name, shape, q.stored_names(name),
        lambda t: q.quantize_param(name, source_array(t), quantized),
    )


def weight_rules(model: nn.Module, q: Quantization | None = None,
                 naming: Callable[[str], str] | None = None) -> dict[str, WeightRule]:
    """Checkpoint name -> rule for every parameter of the float ``model`` (before
    ``q.quantize_model``); the weights ``q`` replaces (Linear layers, and embeddings with
    ``q.embedding``) get :func:`quantize_rule`. ``naming`` maps a parameter name to the
    checkpoint's name for it (default: the same name)."""
    quantized = q.quantized_names(model) if q is not None else frozenset()
    rules = (quantize_rule(name, p, q, quantized, naming and naming(name)) if name in quantized
             else cast_rule(name, p, naming and naming(name)) for name, p in model.named_parameters())
    return {rule.source: rule for rule in rules}


# Module paths of the model -> llama.cpp's GGUF names for an MPT (the parameter suffix is kept).
GGUF_MODULES = {"transformer.wte": "token_embd", "transformer.wpe": "position_embd", "transformer.norm_f": "output_norm",
                "lm_head": "output", "norm_1": "attn_norm", "attn.Wqkv": "attn_qkv", "attn.out_proj": "attn_output",
                "attn.q_ln": "attn_q_norm", "attn.k_ln": "attn_k_norm", "norm_2": "ffn_norm", "ffn.up_proj": "ffn_up",
                "ffn.down_proj": "ffn_down"}


def gguf_name(name: str) -> str:
    """A parameter's name in a GGUF file: ``transformer.blocks.3.ffn.up_proj.weight`` -> ``blk.3.ffn_up.weight``."""
    module, suffix = name.rsplit(".", 1)
    if module.startswith("transformer.blocks."):
        layer, inner = module.removeprefix("transformer.blocks.").split(".", 1)
        return f"blk.{layer}.{GGUF_MODULES[inner]}.{suffix}"
    return f"{GGUF_MODULES[module]}.{suffix}"


def stream_params(
    model_dir: str | Path, rules: dict[str, WeightRule], *, tied_head: bool = True
) -> Iterator[tuple[str, np.ndarray]]:
    """Yield ``(param name, array)`` for every parameter, one checkpoint shard in memory at a time;
    the next tensor is read (in a thread) while this one is converted.

    All name and shape problems are collected first (from the file headers) and raised as one
    :class:`WeightMapError` before anything is converted.
    """
    check_checkpoint(model_dir, rules, tied_head=tied_head)
    for name, tensor in prefetched(iter_tensors(model_dir), name="read weights"):
        rule = rules.get(name)
        arrays = rule.transform(tensor) if rule is not None else {}
        del tensor  # the source is not kept while its arrays are written and the next one is read
        yield from arrays.items()
        del arrays


def check_checkpoint(model_dir: str | Path, rules: dict[str, WeightRule], *, tied_head: bool = True) -> None:
    """Raise one :class:`WeightMapError` listing missing, unexpected and mis-shaped tensors."""
    check_tensors(tensor_shapes(model_dir), rules, f"checkpoint {model_dir}", "config.json", tied_head=tied_head)


def check_tensors(found: dict[str, tuple[int, ...]], rules: dict[str, WeightRule], where: str, config: str, *,
                  tied_head: bool = True) -> None:
    """:func:`check_checkpoint` on the tensor shapes ``found`` in ``where``, whose config is ``config``."""
    ignorable = {"lm_head.weight"} if tied_head else set()  # some saves keep the tied copy
    missing = sorted(set(rules) - set(found))
    unexpected = sorted(set(found) - set(rules) - ignorable)
    misshaped = sorted(n for n in set(found) & set(rules) if found[n] != rules[n].shape)
    if not (missing or unexpected or misshaped):
        return
    parts = []
    if missing:
        parts.append("missing: " + ", ".join(missing))
    if unexpected:
        parts.append("unexpected: " + ", ".join(unexpected))
    if misshaped:
        parts.append(
            "wrong shape: " + ", ".join(f"{n} expected {list(rules[n].shape)} found {list(found[n])}" for n in misshaped)
        )
    raise WeightMapError(
        f"{where} does not match the model config ({'; '.join(parts)}); check that {config} belongs to these weights"
    )
