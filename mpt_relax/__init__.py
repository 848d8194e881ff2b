"""mpt_relax: MPT language models compiled with Apache TVM Relax.

    import mpt_relax
    art = mpt_relax.build("dist/models/mpt-7b-instruct", target="llvm", quantization="q0f16")
    eng = mpt_relax.Engine(art, device="cpu", max_batch_size=8, kv_memory="2GB")
    logits = eng.logits([1, 2, 3])          # float32 [3, vocab]
    a, b = eng.add_sequence(), eng.add_sequence()
    last = eng.forward([a, b], [[1, 2, 3], [4, 5]])   # float32 [2, vocab], one ragged prefill
    print(eng.generate("What is ALiBi?", max_new_tokens=64).text)
    mod = mpt_relax.export_irmodule(mpt_relax.preset("mpt-7b-instruct"))

Names that need TVM or torch (``Engine``, ``build``, ``export_irmodule``, ...) are imported on
first use: ``import mpt_relax`` itself loads neither, so the converter (torch only) starts fast,
and a process that only runs artifacts never loads the compiler-side modules (it works with
TVM's runtime-only library).
"""

from __future__ import annotations

import importlib

from mpt_relax.errors import MPTRelaxError
from mpt_relax.io.artifact import ArtifactError
from mpt_relax.models.mpt.config import ConfigError, MPTConfig, preset
from mpt_relax.models.mpt.templates import TemplateError
from mpt_relax.runtime.generation import ChatSession, GenerationError, GenerationResult, SamplingParams, Stream

_LAZY = {  # name -> its module, imported on first access: these pull in TVM (the compiler, for some) or torch
    "Engine": "mpt_relax.runtime.engine",
    "EngineError": "mpt_relax.runtime.engine",
    "KVCacheCapacityError": "mpt_relax.runtime.kv_state",
    "build": "mpt_relax.compile.builder",
    "export_irmodule": "mpt_relax.compile.builder",
    "resolve_model": "mpt_relax.compile.builder",
    "TargetError": "mpt_relax.compile.targets",
    "WeightMapError": "mpt_relax.models.mpt.loader",
    "CheckpointError": "mpt_relax.io.checkpoint",
    "QuantizationError": "mpt_relax.quantization",
    "convert_checkpoint": "mpt_relax.tools.convert",
    "ConversionError": "mpt_relax.tools.convert",
}


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'mpt_relax' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


__all__ = [
    "ArtifactError",
    "ChatSession",
    "ConfigError",
    "GenerationError",
    "GenerationResult",
    "MPTConfig",
    "MPTRelaxError",
    "SamplingParams",
    "Stream",
    "TemplateError",
    "preset",
    *_LAZY,
]
