"""``mpt_relax.build``: checkpoint directory, GGUF file (or preset) -> compiled artifact directory.

Stages: resolve the model, export the Relax IRModule, compile per target, stream the weights
into shards, write ``mpt-config.json`` and the tokenizer; all into a temp directory that
replaces the output only when everything succeeded.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import json
import sys
import time
from pathlib import Path
from typing import Callable, Sequence

import tvm
from tqdm import tqdm

from mpt_relax.io import artifact, staging
from mpt_relax import defaults
from mpt_relax.compile import child, cuda_kernels, int8_kernels, pipeline, targets
from mpt_relax.io.checkpoint import CheckpointError, weight_files
from mpt_relax.io.prefetch import prefetched
from mpt_relax.io.gguf_file import GGUFFile
from mpt_relax.models.mpt.config import MPTConfig, preset, template_for
from mpt_relax.compile.kv_cache import DEFAULT_PAGE_SIZE, dispatch_kv_cache
from mpt_relax.models.mpt.model import MPTForCausalLM
from mpt_relax.quantization import Quantization, get_quantization
from mpt_relax.models.mpt.loader import WeightRule, gguf_name, stream_params, weight_rules
from mpt_relax.models.mpt import gguf_loader

VERSION = "0.1.0"
# Checkpoints from this size on compile their libraries in a child process while the weights stream
# (the child costs a second of start-up; 7B weights take minutes).
OVERLAP_MIN_BYTES = 1 << 30


@dataclasses.dataclass(frozen=True)
class ModelSource:
    """What to build: a name, its config, and where its weights/tokenizer live (if anywhere):
    a checkpoint directory, or one GGUF file."""

    name: str
    config: MPTConfig
    weights_dir: Path | None
    gguf: GGUFFile | None = None

    @property
    def weights_path(self) -> Path | None:
        """The checkpoint directory or the GGUF file; None for a preset without weights."""
        return self.gguf.path if self.gguf is not None else self.weights_dir


def resolve_model(model: str | Path, *, max_seq_len: int | None = None, dist_root: str | Path = "dist") -> ModelSource:
    """A checkpoint directory, a ``.gguf`` file, or a preset name looked up under ``<dist_root>/models/``.

    A preset without a local checkpoint resolves to its config alone (``weights_dir`` None).
    """
    path = Path(model)
    if path.is_dir():
        return _from_dir(path, max_seq_len)
    if path.suffix.lower() == ".gguf":
        return _from_gguf(path, max_seq_len)
    if path.suffix or len(path.parts) > 1:
        raise CheckpointError(f"checkpoint directory {path} does not exist")
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
    if max_seq_len is not None:
        cfg = cfg.replace(max_seq_len=max_seq_len)  # validated: 0 or a negative length is refused
    return ModelSource(name, cfg, path)


def _from_gguf(path: Path, max_seq_len: int | None) -> ModelSource:
    gguf = GGUFFile(path)
    cfg = gguf.config()
    if template_for(gguf.name):
        cfg = cfg.replace(prompt_template=template_for(gguf.name))
    if max_seq_len is not None:
        cfg = cfg.replace(max_seq_len=max_seq_len)
    return ModelSource(_base_name(path.stem), cfg, None, gguf)


def quantized_model(config: MPTConfig, q: Quantization, naming: Callable[[str], str] | None = None
                    ) -> tuple[MPTForCausalLM, dict[str, WeightRule]]:
    """The model to export (built once, its layers quantized by ``q``) and the weight rules of its
    float parameters, named before the quantizer replaces them (by ``naming``, see ``weight_rules``)."""
    model = MPTForCausalLM(config, q.model_dtype)
    rules = weight_rules(model, q, naming)
    return q.quantize_model(model), rules


def export_irmodule(
    config: MPTConfig | str,
    quantization: str | Quantization = "q0f32",
    target: str | tvm.target.Target | None = None,
    page_size: int = DEFAULT_PAGE_SIZE,
) -> tvm.IRModule:
    """The model's IRModule, no weights.

    Entry points: create_paged_kv_cache / prefill / batch_decode (see :mod:`mpt_relax.models.mpt.model`).
    ``config`` is an :class:`MPTConfig` or a preset name. Without ``target`` the module is
    target-free (its KV cache creation is generic); with one (a name as :func:`build` takes, or
    a ``tvm.target.Target``) the cache gets that target's attention kernels for ``page_size``
    tokens per page, as the target's pipeline would give it.
    """
    cfg = preset(config) if isinstance(config, str) else config
    q = get_quantization(quantization) if isinstance(quantization, str) else quantization
    model, _ = quantized_model(cfg, q)
    mod, _ = model.export_tvm(spec=model.export_spec())
    if target is None:
        return mod
    tvm_target = targets.resolve_target(target).target if isinstance(target, str) else target
    return dispatch_kv_cache(tvm_target, page_size)(mod)


def _fingerprint(src: ModelSource, quantization: str, page_size: int) -> str:
    files = []
    if src.weights_path is not None:
        for f in [src.gguf.path] if src.gguf is not None else sorted(p for p in src.weights_dir.iterdir() if p.is_file()):
            st = f.stat()
            files.append([f.name, st.st_size, st.st_mtime_ns])
    blob = json.dumps([VERSION, _source_digest(), src.config.to_dict(), quantization, page_size, files], sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


@functools.lru_cache(maxsize=1)
def _source_digest() -> str:
    """sha256 of this package's Python sources: a changed kernel or pass makes earlier artifacts
    out of date, within a version too (an editable install under development)."""
    root = Path(__file__).resolve().parents[1]
    digest = hashlib.sha256()
    for path in sorted(root.rglob("*.py")):
        digest.update(str(path.relative_to(root)).encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()


def _log(msg: str, quiet: bool) -> None:
    if not quiet:
        # one write, its newline included: a Ctrl-C between print's two writes left the line
        # open, and the interruption's "error: ..." line continued it
        sys.stderr.write(f"[mpt_relax] {msg}\n")
        sys.stderr.flush()


def build(
    model: str | Path,
    target: str | Sequence[str] = defaults.TARGET,
    quantization: str | None = None,
    output: str | Path | None = None,
    *,
    max_seq_len: int | None = None,
    cuda_arch: str | None = None,
    mcpu: str | None = None,
    quantize_embedding: bool | int = False,
    int8_activations: bool = False,
    amx_prefill: bool = False,
    int8_prefill: bool = False,
    page_size: int = DEFAULT_PAGE_SIZE,
    force: bool = False,
    dist_root: str | Path = defaults.DIST,
    quiet: bool = False,
) -> Path:
    """Compile ``model`` for each target and write the artifact; returns its directory.

    ``model``: an HF checkpoint directory, a ``.gguf`` file or a preset name (looked up under dist/models/).
    ``target``: one or more of auto, cuda, metal, vulkan, llvm; one library each (default auto:
    a CUDA GPU if present, else Metal on macOS, else the CPU).
    ``quantization``: q0f32, q0f16, q4f16_1 (default) or q8f16_1 (weights quantized while streaming);
    from a ``.gguf`` file also gguf (its default: every weight kept in the file's own type);
    ``quantize_embedding``: quantize the token embedding (the tied LM head) too, not only the
    Linear layers: True in the scheme's bits, 8 as q8f16_1 under a q4f16_1 model.
    ``int8_activations``: with q4f16_1 / q8f16_1 on the CPU, decode on activations quantized to
    int8 per group of 32 with integer dot products (VNNI; :mod:`mpt_relax.kernels.cpu.int8_gemv`);
    prefill stays exact.
    ``amx_prefill``: prefill projections (float or q4f16_1 / q8f16_1 weights) in bf16 products: on the AMX
    tile units where the llvm target has AMX-BF16, else with ``vdpbf16ps`` where it has AVX512-BF16
    (:mod:`mpt_relax.kernels.cpu.amx_matmul`); exact elsewhere.
    ``int8_prefill``: with q4f16_1 / q8f16_1 on the CPU, prefill projections on x quantized to int8
    per group of 32 (:mod:`mpt_relax.kernels.cpu.int8_matmul` with AVX512-VNNI).
    ``mcpu``: the CPU the llvm library (and cuda host code) is compiled for, e.g. ``x86-64-v3``
    to run on other machines; default ``native``, the build machine's own.
    ``page_size``: tokens per KV-cache page, baked into the attention kernels and recorded in
    ``mpt-config.json``.
    An artifact that is up to date (same config, quantization, checkpoint files and targets,
    the targets' cuda arch and mcpu included, built by the same mpt_relax sources)
    is returned as is unless ``force``.
    """
    target_names = [target] if isinstance(target, str) else list(target)
    specs = [targets.resolve_target(t, cuda_arch=cuda_arch, mcpu=mcpu) for t in target_names]  # fails before any work
    src = resolve_model(model, max_seq_len=max_seq_len, dist_root=dist_root)
    if quantization is None:
        quantization = "gguf" if src.gguf is not None else defaults.QUANTIZATION
    q = get_quantization(quantization, quantize_embedding, int8_activations, amx_prefill, int8_prefill)
    int8_kernels.check_targets(q, specs)
    if src.gguf is not None:
        q = gguf_loader.bind(q, src.gguf)
    out = Path(output) if output is not None else Path(dist_root) / f"{src.name}-{q.dir_tag}"
    # Refused before any work: a file, a link or a foreign directory at the output, or an output
    # overlapping the checkpoint (publish_directory checks again just before its rename).
    staging.check_output(out, artifact.is_artifact, "an mpt_relax artifact (no mpt-config.json)",
                         protect=[src.weights_path])
    staging.clean_stale(out)  # staging directories a killed build left behind
    fingerprint = _fingerprint(src, q.tag, page_size)
    if not force and _up_to_date(out, fingerprint, specs):
        _log(f"{out} is up to date (use force=True / --force to rebuild)", quiet)
        return out
    if src.weights_path is None:
        _log(f"no weights for {src.name}: building the library only; put the checkpoint in "
             f"{Path(dist_root) / 'models' / src.name} (or pass its directory) to include them", quiet)
    weight_bytes = _weight_bytes(src)  # fails early on a checkpoint directory without weights

    net, rules = quantized_model(src.config, q, gguf_name if src.gguf is not None else None)
    param_names = [name for name, _ in net.named_parameters()]  # the entry points' order, on every target
    with artifact.atomic_directory(out, protect=[src.weights_path]) as tmp:
        compile_args = dict(config=src.config, q=q, src_name=src.name, quantization=quantization,
                            page_size=page_size, tmp=tmp, quiet=quiet)
        # Big weights: the libraries compile in a child process meanwhile (they never read a weight).
        overlap = weight_bytes >= OVERLAP_MIN_BYTES
        job = child.compile_in_child({**compile_args, "tmp": str(tmp), "targets": [
            (spec.name, cuda_arch, mcpu) for spec in specs]}) if overlap else None
        with job or contextlib.nullcontext():
            if src.weights_path is not None:
                params = (gguf_loader.stream_gguf(src.gguf, rules, q) if src.gguf is not None else
                          stream_params(src.weights_dir, rules, tied_head=src.config.tie_word_embeddings))
                params = prefetched(params, name="quantize weights")  # a thread: written while the next converts
                with _stage("load + quantize weights" if q.is_quantized else "load weights", quiet):
                    nbytes = artifact.write_params(
                        tmp,
                        _progress(params, len(param_names), quiet),
                        extra=_quantization_records(rules, q, q.quantized_names(net).embeddings),
                    )
                _log(f"  {nbytes / 1e6:.1f} MB of weights", quiet)
            if job is not None:
                with _stage("wait for the library compile", quiet):
                    libraries = job.result()
            else:
                libraries = compile_libraries(specs=specs, net=net, **compile_args)
        artifact.write_config(tmp, {
            "model_type": "mpt",  # the model family: a second family is a new value, not a new format
            "model_name": src.name,
            "source": str(src.weights_path.resolve()) if src.weights_path is not None else None,
            "model_config": src.config.to_dict(),
            "quantization": q.info(),
            "model_dtype": q.model_dtype,
            "context_window_size": src.config.max_seq_len,
            "page_size": page_size,
            "prompt_template": src.config.prompt_template,
            "tokenizer_files": src.gguf.write_tokenizer(tmp) if src.gguf is not None else
            artifact.copy_tokenizer(src.weights_dir, tmp),
            "param_names": param_names,
            "libraries": libraries,
            "library_targets": {spec.name: str(spec.target) for spec in specs},
            "mcpu": targets.host_cpu(mcpu),
            "library_isa_features": {spec.name: spec.isa_features for spec in specs if spec.isa_features},
            "has_weights": src.weights_path is not None,
            "fingerprint": fingerprint,
            "mpt_relax_version": VERSION,
        })
    _log(f"artifact ready: {out}", quiet)
    return out


def compile_libraries(*, config: MPTConfig, q: Quantization, specs: Sequence[targets.TargetSpec], src_name: str,
                      quantization: str, page_size: int, tmp: Path, quiet: bool,
                      net: MPTForCausalLM | None = None) -> dict[str, str]:
    """Export the IRModule of ``net`` (default: ``config`` quantized by ``q``), compile it for each
    target and write the libraries into ``tmp``; returns ``{target name: library file name}``."""
    if net is None:
        net, _ = quantized_model(config, q)
    with _stage("export the IRModule", quiet):  # once: each target's pipeline adds its attention kernels
        mod, _ = net.export_tvm(spec=net.export_spec())
    libraries = {}
    for spec in specs:
        lib_name = artifact.library_name(src_name, quantization, spec.name) + spec.suffix
        with _stage(f"compile {spec.name}", quiet):
            executable = pipeline.compile_module(mod, spec, page_size)
        if spec.name == "cuda":
            with _stage("compile the CUDA kernels with nvcc", quiet):
                if not cuda_kernels.precompile(executable, spec.target, tmp):
                    _log("  nvcc not found: the library's kernels will be compiled when it is loaded", quiet)
        with _stage(f"export {lib_name}", quiet):
            executable.export_library(str(tmp / lib_name))
        libraries[spec.name] = lib_name
    return libraries


def _weight_bytes(src: ModelSource) -> int:
    """Bytes of the checkpoint's weight files (0 without weights); raises on a directory without any."""
    if src.weights_path is None:
        return 0
    files = [src.gguf.path] if src.gguf is not None else weight_files(src.weights_dir)
    return sum(f.stat().st_size for f in files)


def _quantization_records(rules, q: Quantization, embeddings: frozenset[str]) -> dict[str, dict]:
    """tensor-cache.json fields of the stored tensors the scheme made: scheme and source tensor.
    ``embeddings``: the float names of the embedding tables (stored in ``q.embedding_scheme``)."""
    records, tables = {}, {out for name in embeddings for out in q.stored_names(name)}
    for rule in rules.values():
        for out_name in rule.outputs:
            record = (q.tensor_record(out_name, rule.source, rule.shape, embedding=out_name in tables)
                      if out_name != rule.source else None)
            if record is not None:
                records[out_name] = {"quantization": record}
    return records


@contextlib.contextmanager
def _stage(name: str, quiet: bool):
    t0 = time.perf_counter()
    _log(f"{name} ...", quiet)
    yield
    _log(f"{name} done in {time.perf_counter() - t0:.1f}s", quiet)


class _Bar(tqdm):
    """tqdm without its monitor thread: the next build's compile child can then be forked
    (:func:`mpt_relax.compile.child.start_method`)."""

    monitor_interval = 0


def _progress(items, total: int, quiet: bool):
    if quiet:
        return items
    return _Bar(items, total=total, unit="tensor", disable=None, file=sys.stderr, leave=False)


def _up_to_date(out: Path, fingerprint: str, specs: list[targets.TargetSpec]) -> bool:
    try:
        meta = artifact.read_config(out)
    except artifact.ArtifactError:
        return False
    if artifact.missing_files(out):  # a deleted shard, a garbage tensor-cache.json, ...
        return False
    libs, built_for = meta.get("libraries", {}), meta.get("library_targets", {})
    return meta.get("fingerprint") == fingerprint and all(
        s.name in libs and (out / libs[s.name]).is_file() and built_for.get(s.name) == str(s.target) for s in specs
    )
