"""mpt_relax: MPT language models compiled with Apache TVM Relax.

    import mpt_relax
    art = mpt_relax.build("dist/models/mpt-7b-instruct", target="llvm", quantization="q0f16")
    eng = mpt_relax.Engine(art, device="cpu", max_batch_size=8, kv_memory="2GB")
    logits = eng.logits([1, 2, 3])          # float32 [3, vocab]
    a, b = eng.add_sequence(), eng.add_sequence()
    last = eng.forward([a, b], [[1, 2, 3], [4, 5]])   # float32 [2, vocab], one ragged prefill
    print(eng.generate("What is ALiBi?", max_new_tokens=64).text)
    mod = mpt_relax.export_irmodule(mpt_relax.preset("mpt-7b-instruct"))
"""

from mpt_relax.io.artifact import ArtifactError
from mpt_relax.compile.builder import build, export_irmodule, resolve_model
from mpt_relax.io.checkpoint import CheckpointError
from mpt_relax.compile.pipeline import TargetError
from mpt_relax.models.mpt.config import ConfigError, MPTConfig, preset
from mpt_relax.runtime.engine import Engine, EngineError
from mpt_relax.runtime.generation import ChatSession, GenerationError, GenerationResult, SamplingParams, Stream
from mpt_relax.runtime.kv_state import KVCacheCapacityError
from mpt_relax.models.mpt.templates import TemplateError
from mpt_relax.models.mpt.loader import WeightMapError

__all__ = [
    "ArtifactError",
    "ChatSession",
    "CheckpointError",
    "ConfigError",
    "Engine",
    "EngineError",
    "GenerationError",
    "GenerationResult",
    "KVCacheCapacityError",
    "MPTConfig",
    "SamplingParams",
    "Stream",
    "TargetError",
    "TemplateError",
    "WeightMapError",
    "build",
    "export_irmodule",
    "preset",
    "resolve_model",
]
