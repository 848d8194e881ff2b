"""``mpt_relax.build``: checkpoint (or preset) -> compiled artifact directory.

Stages: resolve the model, export the Relax IRModule, compile per target, stream the weights
into shards, write ``mpt-config.json`` and the tokenizer; all into a temp directory that
replaces the output only when everything succeeded.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import sys
import time
from pathlib import Path
from typing import Sequence

import tvm
from tqdm import tqdm

from mpt_relax.io import artifact
from mpt_relax.compile import pipeline as compiler
from mpt_relax.io.checkpoint import weight_files
from mpt_relax.models.mpt.config import MPTConfig, preset, template_for
from mpt_relax.models.mpt.model import DEFAULT_PAGE_SIZE, MPTForCausalLM
from mpt_relax.quantization import Quantization, get_quantization, quantize_module
from mpt_relax.models.mpt.loader import stream_params, weight_rules

VERSION = "0.1.0"


@dataclasses.dataclass(frozen=True)
class ModelSource:
    """What to build: a name, its config, and where its weights/tokenizer live (if anywhere)."""

    name: str
    config: MPTConfig
    weights_dir: Path | None


def resolve_model(model: str | Path, *, max_seq_len: int | None = None, dist_root: str | Path = "dist") -> ModelSource:
    """A checkpoint directory, or a preset name looked up under ``<dist_root>/models/``.

    A preset without a local checkpoint resolves to its config alone (``weights_dir`` None).
    """
    path = Path(model)
    if path.is_dir():
        return _from_dir(path, max_seq_len)
    if path.suffix or len(path.parts) > 1:
        raise FileNotFoundError(f"checkpoint directory {path} does not exist")
    models = Path(dist_root) / "models"
    for candidate in (models / f"{model}-float16", models / str(model)):
        if (candidate / "config.json").is_file():
            return _from_dir(candidate, max_seq_len)
    cfg = preset(str(model), max_seq_len)
    return ModelSource(_base_name(str(model)), cfg, None)


def _base_name(name: str) -> str:
    name = name.rstrip("/").split("/")[-1]
    return name[: -len("-float16")] if name.endswith("-float16") else name


def _from_dir(path: Path, max_seq_len: int | None) -> ModelSource:
    name = _base_name(path.resolve().name)
    cfg = MPTConfig.from_json(path)
    if cfg.prompt_template is None and template_for(name):
        cfg = cfg.replace(prompt_template=template_for(name))
    if max_seq_len:
        cfg = cfg.replace(max_seq_len=max_seq_len)
    return ModelSource(name, cfg, path)


def quantized_model(
    config: MPTConfig,
    q: Quantization,
    target: str | tvm.target.Target = "llvm",
    page_size: int = DEFAULT_PAGE_SIZE,
) -> tuple[MPTForCausalLM, MPTForCausalLM]:
    """(float model, model to export): the second has its Linear layers quantized by ``q`` and
    its paged-attention kernels made for ``target`` with ``page_size`` tokens per page."""
    float_model = MPTForCausalLM(config, q.model_dtype)
    export = quantize_module(MPTForCausalLM(config, q.model_dtype, target=target, page_size=page_size), q)
    return float_model, export


def export_irmodule(
    config: MPTConfig | str,
    quantization: str | Quantization = "q0f32",
    target: str | tvm.target.Target = "llvm",
    page_size: int = DEFAULT_PAGE_SIZE,
):
    """The model's IRModule for one target, no weights.

    Entry points: create_paged_kv_cache / prefill / batch_decode (see :mod:`mpt_relax.models.mpt.model`).
    ``config`` is an :class:`MPTConfig` or a preset name; ``target`` a target name (as
    :func:`build` takes) or a ``tvm.target.Target``: the paged-attention kernels differ
    between the CPU and GPUs. ``page_size``: tokens per KV-cache page, baked into the kernels.
    """
    cfg = preset(config) if isinstance(config, str) else config
    tvm_target = compiler.resolve_target(target).target if isinstance(target, str) else target
    q = get_quantization(quantization) if isinstance(quantization, str) else quantization
    _, model = quantized_model(cfg, q, tvm_target, page_size)
    mod, _ = model.export_tvm(spec=model.export_spec())
    return mod


def _fingerprint(src: ModelSource, quantization: str, page_size: int) -> str:
    files = []
    if src.weights_dir is not None:
        for f in sorted(p for p in src.weights_dir.iterdir() if p.is_file()):
            st = f.stat()
            files.append([f.name, st.st_size, st.st_mtime_ns])
    blob = json.dumps([VERSION, src.config.to_dict(), quantization, page_size, files], sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _log(msg: str, quiet: bool) -> None:
    if not quiet:
        print(f"[mpt_relax] {msg}", file=sys.stderr, flush=True)


def build(
    model: str | Path,
    target: str | Sequence[str] = "llvm",
    quantization: str = "q0f32",
    output: str | Path | None = None,
    *,
    max_seq_len: int | None = None,
    cuda_arch: str | None = None,
    mcpu: str | None = None,
    quantize_embedding: bool = False,
    page_size: int = DEFAULT_PAGE_SIZE,
    force: bool = False,
    dist_root: str | Path = "dist",
    quiet: bool = False,
) -> Path:
    """Compile ``model`` for each target and write the artifact; returns its directory.

    ``model``: an HF checkpoint directory or a preset name (looked up under dist/models/).
    ``target``: one or more of auto, cuda, metal, vulkan, llvm; one library each.
    ``quantization``: q0f32, q0f16, q4f16_1 or q8f16_1 (weights quantized while streaming);
    ``quantize_embedding``: quantize the token embedding (the tied LM head) too, not only the
    Linear layers.
    ``mcpu``: the CPU the llvm library (and cuda host code) is compiled for, e.g. ``x86-64-v3``
    to run on other machines; default ``native``, the build machine's own.
    ``page_size``: tokens per KV-cache page, baked into the attention kernels and recorded in
    ``mpt-config.json``.
    An artifact that is up to date (same config, quantization, checkpoint files and targets,
    the targets' cuda arch and mcpu included)
    is returned as is unless ``force``.
    """
    targets = [target] if isinstance(target, str) else list(target)
    specs = [compiler.resolve_target(t, cuda_arch=cuda_arch, mcpu=mcpu) for t in targets]  # fails before any work
    q = get_quantization(quantization, quantize_embedding)
    src = resolve_model(model, max_seq_len=max_seq_len, dist_root=dist_root)
    out = Path(output) if output is not None else Path(dist_root) / f"{src.name}-{quantization}"
    fingerprint = _fingerprint(src, q.tag, page_size)
    if not force and _up_to_date(out, fingerprint, specs):
        _log(f"{out} is up to date (use force=True / --force to rebuild)", quiet)
        return out
    if src.weights_dir is None:
        _log(f"no weights for {src.name}: building the library only; put the checkpoint in "
             f"{Path(dist_root) / 'models' / src.name} (or pass its directory) to include them", quiet)
    else:
        weight_files(src.weights_dir)  # fail early on a directory without weights

    float_net, net = quantized_model(src.config, q)
    rules = weight_rules(float_net, q)
    param_names = [name for name, _ in net.named_parameters()]  # the entry points' order, on every target
    with artifact.atomic_directory(out) as tmp:
        if src.weights_dir is not None:
            with _stage("load + quantize weights" if q.is_quantized else "load weights", quiet):
                nbytes = artifact.write_params(
                    tmp,
                    _progress(stream_params(src.weights_dir, rules, tied_head=src.config.tie_word_embeddings),
                              len(param_names), quiet),
                    extra=_quantization_records(rules, q),
                )
            _log(f"  {nbytes / 1e6:.1f} MB of weights", quiet)
        libraries = {}
        for spec in specs:
            lib_name = artifact.library_name(src.name, quantization, spec.name) + spec.suffix
            with _stage(f"export the IRModule for {spec.name}", quiet):  # the attention kernels differ per target
                mod = export_irmodule(src.config, q, spec.target, page_size)
            with _stage(f"compile {spec.name}", quiet):
                executable = compiler.compile_module(mod, spec)
            with _stage(f"export {lib_name}", quiet):
                executable.export_library(str(tmp / lib_name))
            libraries[spec.name] = lib_name
        artifact.write_config(tmp, {
            "model_name": src.name,
            "source": str(src.weights_dir.resolve()) if src.weights_dir is not None else None,
            "model_config": src.config.to_dict(),
            "quantization": _quantization_info(q),
            "model_dtype": q.model_dtype,
            "context_window_size": src.config.max_seq_len,
            "page_size": page_size,
            "prompt_template": src.config.prompt_template,
            "tokenizer_files": artifact.copy_tokenizer(src.weights_dir, tmp),
            "param_names": param_names,
            "libraries": libraries,
            "library_targets": {spec.name: str(spec.target) for spec in specs},
            "mcpu": compiler.host_cpu(mcpu),
            "has_weights": src.weights_dir is not None,
            "fingerprint": fingerprint,
            "mpt_relax_version": VERSION,
        })
    _log(f"artifact ready: {out}", quiet)
    return out


def _quantization_info(q: Quantization) -> dict:
    if q.embedding:
        embedding = f"{q.name} group-quantized like the Linear weights (it is also the tied LM head)"
    else:
        embedding = (f"{q.model_dtype}, unquantized: it is also the tied LM head, whose errors reach the sampled "
                     "token directly (about 3% of MPT-7B's parameters)")
    return {
        "name": q.name, "tag": q.tag, "bits": q.bits, "group_size": q.group_size, "model_dtype": q.model_dtype,
        "quantized": "Linear weights (Wqkv, out_proj, up_proj, down_proj, untied lm_head)" if q.is_quantized else None,
        "embedding_quantized": q.embedding,
        "embedding": embedding,
    }


def _quantization_records(rules, q: Quantization) -> dict[str, dict]:
    """tensor-cache.json fields for the packed tensors: scheme and the source tensor."""
    records = {}
    for rule in rules.values():
        if len(rule.outputs) > 1:
            for out_name in rule.outputs:
                records[out_name] = {"quantization": {"scheme": q.name, "source": rule.source,
                                                      "source_shape": list(rule.shape),
                                                      "role": out_name.rsplit(".", 1)[1]}}
    return records


@contextlib.contextmanager
def _stage(name: str, quiet: bool):
    t0 = time.perf_counter()
    _log(f"{name} ...", quiet)
    yield
    _log(f"{name} done in {time.perf_counter() - t0:.1f}s", quiet)


def _progress(items, total: int, quiet: bool):
    if quiet:
        return items
    return tqdm(items, total=total, unit="tensor", disable=None, file=sys.stderr, leave=False)


def _up_to_date(out: Path, fingerprint: str, specs: list[compiler.TargetSpec]) -> bool:
    try:
        meta = artifact.read_config(out)
    except (artifact.ArtifactError, json.JSONDecodeError):
        return False
    libs, built_for = meta.get("libraries", {}), meta.get("library_targets", {})
    return meta.get("fingerprint") == fingerprint and all(
        s.name in libs and (out / libs[s.name]).is_file() and built_for.get(s.name) == str(s.target) for s in specs
    )
