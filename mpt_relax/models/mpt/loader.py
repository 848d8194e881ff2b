"""The weight map: checkpoint tensors -> the Relax module's parameters, streamed shard by shard.

The map is derived from the module's own parameter list (``named_parameters``), never kept by
hand: the model names its modules like the PyTorch checkpoint, so each parameter's source is the
tensor of the same name, and the transform is a dtype cast (or a quantization, when a
quantization rule replaces a Linear weight by several packed tensors).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch
from tvm.relax.frontend import nn

from mpt_relax.io.checkpoint import FP16_MAX, CheckpointError, iter_tensors, tensor_shapes
from mpt_relax.quantization import Quantization

Transform = Callable[[torch.Tensor], dict[str, np.ndarray]]


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

    Casting to float16 clamps to +-65504 first, so bf16 outliers never become inf.
    """
    if dtype == "float16" and t.dtype != torch.float16:
        t = t.to(torch.float32).clamp_(-FP16_MAX, FP16_MAX)
    return t.to(getattr(torch, dtype)).contiguous().numpy()


def cast_rule(name: str, param: nn.Parameter) -> WeightRule:
    """The identity-name rule: same name, same shape, cast to the parameter's dtype."""
    shape = tuple(int(s) for s in param.shape)
    return WeightRule(name, shape, (name,), lambda t: {name: to_numpy(t, param.dtype)})


def quantize_rule(name: str, param: nn.Parameter, q: Quantization, quantized: frozenset[str]) -> WeightRule:
    """A weight ``q`` replaces -> its stored parameters (``q.quantize_param``), quantized from fp32."""
    shape = tuple(int(s) for s in param.shape)
    return WeightRule(
        name, shape, q.stored_names(name),
        lambda t: q.quantize_param(name, to_numpy(t, "float32"), quantized),
    )


def weight_rules(model: nn.Module, q: Quantization | None = None) -> dict[str, WeightRule]:
    """Checkpoint name -> rule for every parameter of the float ``model`` (before
    ``q.quantize_model``); the weights ``q`` replaces (Linear layers, and embeddings with
    ``q.embedding``) get :func:`quantize_rule`."""
    quantized = q.quantized_names(model) if q is not None else frozenset()
    return {
        name: quantize_rule(name, p, q, quantized) if name in quantized else cast_rule(name, p)
        for name, p in model.named_parameters()
    }


def stream_params(
    model_dir: str | Path, rules: dict[str, WeightRule], *, tied_head: bool = True
) -> Iterator[tuple[str, np.ndarray]]:
    """Yield ``(param name, array)`` for every parameter, one checkpoint shard in memory at a time.

    All name and shape problems are collected first (from the file headers) and raised as one
    :class:`WeightMapError` before anything is converted.
    """
    check_checkpoint(model_dir, rules, tied_head=tied_head)
    for name, tensor in iter_tensors(model_dir):
        rule = rules.get(name)
        if rule is not None:
            yield from rule.transform(tensor).items()


def check_checkpoint(model_dir: str | Path, rules: dict[str, WeightRule], *, tied_head: bool = True) -> None:
    """Raise one :class:`WeightMapError` listing missing, unexpected and mis-shaped tensors."""
    found = tensor_shapes(model_dir)
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
        f"checkpoint {model_dir} does not match the model config ({'; '.join(parts)}); "
        "check that config.json belongs to these weights"
    )
