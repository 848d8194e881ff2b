"""``mpt_relax.build``: checkpoint (or preset) -> compiled artifact directory.

Stages: resolve the model, export the Relax IRModule, compile per target, stream the weights
into shards, write ``mpt-config.json`` and the tokenizer; all into a temp directory that
replaces the output only when everything succeeded.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import sys
import time
from pathlib import Path
from typing import Sequence


from . import artifact, compiler
from .checkpoint import weight_files
from .config import MPTConfig, preset, template_for
from .model import MPTForCausalLM
from .weights import stream_params, weight_rules

VERSION = "0.1.0"
MODEL_DTYPES = {"q0f32": "float32", "q0f16": "float16"}


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


def model_dtype(quantization: str) -> str:
    if quantization not in MODEL_DTYPES:
        raise ValueError(f"unknown quantization {quantization!r}; choose one of: {', '.join(MODEL_DTYPES)}")
    return MODEL_DTYPES[quantization]


def export_irmodule(config: MPTConfig | str, dtype: str = "float32"):
    """The model's IRModule (entry points prefill / extend / decode / prefill_logits), no weights.

    ``config`` is an :class:`MPTConfig` or a preset name.
    """
    cfg = preset(config) if isinstance(config, str) else config
    model = MPTForCausalLM(cfg, dtype)
    mod, _ = model.export_tvm(spec=model.export_spec())
    return mod


def _fingerprint(src: ModelSource, quantization: str) -> str:
    files = []
    if src.weights_dir is not None:
        for f in sorted(p for p in src.weights_dir.iterdir() if p.is_file()):
            st = f.stat()
            files.append([f.name, st.st_size, st.st_mtime_ns])
    blob = json.dumps([VERSION, src.config.to_dict(), quantization, files], sort_keys=True)
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
    force: bool = False,
    dist_root: str | Path = "dist",
    quiet: bool = False,
) -> Path:
    """Compile ``model`` for each target and write the artifact; returns its directory.

    An artifact that is up to date (same config, quantization, checkpoint files and targets)
    is returned as is unless ``force``.
    """
    targets = [target] if isinstance(target, str) else list(target)
    specs = [compiler.resolve_target(t) for t in targets]
    dtype = model_dtype(quantization)
    src = resolve_model(model, max_seq_len=max_seq_len, dist_root=dist_root)
    out = Path(output) if output is not None else Path(dist_root) / f"{src.name}-{quantization}"
    fingerprint = _fingerprint(src, quantization)
    if not force and _up_to_date(out, fingerprint, specs):
        _log(f"{out} is up to date (use force=True / --force to rebuild)", quiet)
        return out
    if src.weights_dir is None:
        _log(f"no weights for {src.name}: building the library only; put the checkpoint in "
             f"{Path(dist_root) / 'models' / src.name} (or pass its directory) to include them", quiet)
    else:
        weight_files(src.weights_dir)  # fail early on a directory without weights

    net = MPTForCausalLM(src.config, dtype)
    mod, param_specs = net.export_tvm(spec=net.export_spec())
    with artifact.atomic_directory(out) as tmp:
        libraries = {}
        for spec in specs:
            t0 = time.time()
            lib_name = artifact.library_name(src.name, quantization, spec.name) + spec.suffix
            compiler.compile_module(mod, spec).export_library(str(tmp / lib_name))
            libraries[spec.name] = lib_name
            _log(f"compiled {spec.name} -> {lib_name} in {time.time() - t0:.1f}s", quiet)
        if src.weights_dir is not None:
            t0 = time.time()
            nbytes = artifact.write_params(tmp, stream_params(src.weights_dir, weight_rules(net)))
            _log(f"wrote {nbytes / 1e6:.1f} MB of weights in {time.time() - t0:.1f}s", quiet)
        tokenizer_files = artifact.copy_tokenizer(src.weights_dir, tmp)
        artifact.write_config(tmp, {
            "model_name": src.name,
            "source": str(src.weights_dir.resolve()) if src.weights_dir is not None else None,
            "model_config": src.config.to_dict(),
            "quantization": quantization,
            "model_dtype": dtype,
            "context_window_size": src.config.max_seq_len,
            "prompt_template": src.config.prompt_template,
            "tokenizer_files": tokenizer_files,
            "param_names": [name for name, _ in param_specs],
            "libraries": libraries,
            "has_weights": src.weights_dir is not None,
            "fingerprint": fingerprint,
            "mpt_relax_version": VERSION,
        })
    _log(f"artifact ready: {out}", quiet)
    return out


def _up_to_date(out: Path, fingerprint: str, specs: list[compiler.TargetSpec]) -> bool:
    try:
        meta = artifact.read_config(out)
    except (artifact.ArtifactError, json.JSONDecodeError):
        return False
    libs = meta.get("libraries", {})
    return meta.get("fingerprint") == fingerprint and all(
        s.name in libs and (out / libs[s.name]).is_file() for s in specs
    )
