"""Stream an MPT's weights out of a GGUF file into the Relax module's parameters.

The rules are the loader's (:func:`~mpt_relax.models.mpt.loader.weight_rules` with
``naming=gguf_name``): keyed by the file's tensor names, derived from the model's parameters.
Under the ``gguf`` scheme each kept 2-D weight goes in as the file's bytes; under any other
scheme (q0f16, q4f16_1, ...) every tensor is dequantized to float32 (``gguf.quants``) first and
then cast or quantized like a tensor of an HF checkpoint.
"""

from __future__ import annotations

from typing import Iterator

import numpy as np
import torch

from mpt_relax.io.gguf_file import GGUFFile
from mpt_relax.models.mpt.loader import WeightRule, check_tensors, gguf_name
from mpt_relax.models.mpt.model import MPTForCausalLM
from mpt_relax.quantization import GGUFQuantization, Quantization, QuantizedNames


def bind(q: Quantization, gguf: GGUFFile) -> Quantization:
    """``q`` for this file: the ``gguf`` scheme bound to the types of the file's 2-D weights
    (:meth:`GGUFQuantization.bind`); any other scheme as it is."""
    if not isinstance(q, GGUFQuantization):
        return q
    model = MPTForCausalLM(gguf.config(), q.model_dtype)
    weights = {name: gguf.tensors[gguf_name(name)] for name, p in model.named_parameters()
               if len(p.shape) == 2 and gguf_name(name) in gguf.tensors}
    return q.bind({n: t.type_name for n, t in weights.items()}, {n: int(np.prod(t.shape)) for n, t in weights.items()},
                  {n: t.name for n, t in weights.items()})


def stream_gguf(gguf: GGUFFile, rules: dict[str, WeightRule], q: Quantization) -> Iterator[tuple[str, np.ndarray]]:
    """Yield ``(param name, array)`` for every parameter, one tensor decoded at a time.

    Missing, unexpected and mis-shaped tensors (metadata that does not describe the tensors)
    are raised first, as one :class:`~mpt_relax.models.mpt.loader.WeightMapError`.
    """
    found = {name: t.shape for name, t in gguf.tensors.items()}
    check_tensors(found, rules, f"GGUF file {gguf.path}", "its metadata")
    kept = {gguf_name(n): n for n, _ in q.types} if isinstance(q, GGUFQuantization) else {}
    for source, rule in rules.items():
        tensor = gguf.tensors[source]
        if source in kept:
            yield from q.quantize_param(kept[source], tensor.raw, QuantizedNames(kept.values())).items()
        else:
            yield from rule.transform(torch.from_numpy(tensor.floats())).items()
