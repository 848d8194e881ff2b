"""The compiled-artifact layout in ``dist/<model>-<quant>/`` (MLC-LLM conventions).

```
<model>-<quant>-<target>.so       compiled library per target (.tar of objects when cross-compiled)
params_shard_<k>.bin              raw little-endian tensor bytes, ~32 MB per shard
tensor-cache.json                 {"metadata": ..., "records": [{"dataPath", "nbytes", "records": [
                                     {"name", "shape", "dtype", "byteOffset", "nbytes", ...}]}]}
mpt-config.json                   model config, quantization, context length, template, tokenizer info,
                                  the parameter order of the entry points, build fingerprint
tokenizer.json (+ tokenizer_config.json, special_tokens_map.json, ...)
```
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from pathlib import Path
from typing import Any, Iterable, Iterator

import ml_dtypes
import numpy as np

from mpt_relax.errors import MPTRelaxError
from mpt_relax.io import staging

CONFIG_FILE = "mpt-config.json"
TENSOR_CACHE = "tensor-cache.json"
SHARD_BYTES = 32 * 1024 * 1024
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.json",
    "merges.txt",
    "generation_config.json",
)


class ArtifactError(MPTRelaxError):
    """A missing or unreadable artifact; the message says how to rebuild it."""


def library_name(model_name: str, quantization: str, target: str) -> str:
    return f"{model_name}-{quantization}-{target}"


def _np_dtype(dtype: str) -> np.dtype:
    return np.dtype(ml_dtypes.bfloat16) if dtype == "bfloat16" else np.dtype(dtype)


def write_params(out_dir: Path, params: Iterable[tuple[str, np.ndarray]], extra: dict[str, dict] | None = None) -> int:
    """Write ``(name, array)`` pairs into shards + tensor-cache.json; returns total bytes.

    ``extra`` adds fields (e.g. quantization records) to a tensor's record, by name.
    """
    extra = extra or {}
    shards: list[dict[str, Any]] = []
    handle, offset, total = None, 0, 0
    try:
        for name, array in params:
            array = np.ascontiguousarray(array)
            if handle is None or (offset and offset + array.nbytes > SHARD_BYTES):
                if handle is not None:
                    handle.close()
                shards.append({"dataPath": f"params_shard_{len(shards)}.bin", "format": "raw-shard", "nbytes": 0,
                               "records": []})
                handle, offset = open(out_dir / shards[-1]["dataPath"], "wb"), 0
            handle.write(array.reshape(-1).view(np.uint8))  # the array's bytes, not a copy of them
            shards[-1]["records"].append({"name": name, "shape": list(array.shape), "dtype": str(array.dtype),
                                          "format": "raw", "nbytes": array.nbytes, "byteOffset": offset,
                                          **extra.get(name, {})})
            offset += array.nbytes
            total += array.nbytes
            shards[-1]["nbytes"] = offset
    finally:
        if handle is not None:
            handle.close()
    cache = {"metadata": {"ParamSize": sum(len(s["records"]) for s in shards), "ParamBytes": total}, "records": shards}
    (out_dir / TENSOR_CACHE).write_text(json.dumps(cache, indent=1))
    return total


def _rebuild(path: Path) -> str:
    return f"rebuild the artifact (scripts/build.py ... --force, or delete {path.parent} and build again)"


def read_tensor_cache(art_dir: Path) -> list[dict[str, Any]]:
    """The shard list of ``tensor-cache.json``, checked for shape: each shard a dict with
    ``dataPath``, ``nbytes`` and a list of ``records`` (dicts with name, shape, dtype,
    byteOffset, nbytes). Raises :class:`ArtifactError` naming the file otherwise."""
    cache_path = Path(art_dir) / TENSOR_CACHE
    if not cache_path.is_file():
        raise ArtifactError(f"{cache_path} is missing: this artifact has no weights; rebuild it with weights")
    try:
        shards = json.loads(cache_path.read_text())["records"]
        for shard in shards:
            if not (isinstance(shard["dataPath"], str) and _is_count(shard["nbytes"])
                    and isinstance(shard["records"], list)):
                raise TypeError(shard)
            for rec in shard["records"]:
                if not (isinstance(rec["name"], str) and isinstance(rec["dtype"], str)
                        and all(_is_count(x) for x in [*rec["shape"], rec["byteOffset"], rec["nbytes"]])
                        and rec["byteOffset"] + rec["nbytes"] <= shard["nbytes"]):
                    raise TypeError(rec)
        return shards
    except (ValueError, KeyError, TypeError, UnicodeDecodeError) as err:
        raise ArtifactError(f"{cache_path} is corrupt ({type(err).__name__}); {_rebuild(cache_path)}") from None


def _is_count(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= 0


def param_records(art_dir: Path) -> Iterator[tuple[Path, dict[str, Any]]]:
    """Yield ``(shard path, record)`` of every stored tensor (name, shape, dtype, nbytes, byteOffset)."""
    for shard in read_tensor_cache(art_dir):
        path = Path(art_dir) / shard["dataPath"]
        if not path.is_file() or path.stat().st_size != shard["nbytes"]:
            raise ArtifactError(f"weight shard {path} is missing or truncated; {_rebuild(path)}")
        for rec in shard["records"]:
            yield path, rec


def missing_files(art_dir: Path) -> list[str]:
    """What makes ``art_dir`` incomplete (empty when complete): every file its records name
    (libraries, tokenizer files, weight shards with their sizes) must be there, and both JSON
    files must parse."""
    art_dir = Path(art_dir)
    try:
        meta = read_config(art_dir)
        files = list(meta.get("libraries", {}).values()) + list(meta.get("tokenizer_files", []))
        problems = [f"{name} is missing" for name in files if not (art_dir / name).is_file()]
        if meta.get("has_weights"):
            for shard in read_tensor_cache(art_dir):
                path = art_dir / shard["dataPath"]
                if not path.is_file():
                    problems.append(f"{shard['dataPath']} is missing")
                elif path.stat().st_size != shard["nbytes"]:
                    problems.append(f"{shard['dataPath']} has {path.stat().st_size} bytes, not {shard['nbytes']}")
        return problems
    except (ArtifactError, AttributeError, TypeError) as err:
        return [str(err)]


def is_artifact(path: Path) -> bool:
    """Whether ``path`` is a directory that an mpt_relax build wrote (its ``mpt-config.json``
    marker is there; a broken one counts, so that a rebuild can replace it)."""
    return (Path(path) / CONFIG_FILE).is_file()


def read_params(art_dir: Path) -> Iterator[tuple[str, np.ndarray]]:
    """Yield ``(name, array)`` from the shards, one tensor read at a time (not memory-mapped:
    a mapping's pages would stay resident next to the runtime's copy of the weights)."""
    for path, rec in param_records(art_dir):
        dtype = _np_dtype(rec["dtype"])
        array = np.fromfile(path, dtype=dtype, count=rec["nbytes"] // dtype.itemsize, offset=rec["byteOffset"])
        yield rec["name"], array.reshape(rec["shape"])


def write_config(out_dir: Path, content: dict[str, Any]) -> None:
    (out_dir / CONFIG_FILE).write_text(json.dumps(content, indent=2, sort_keys=True))


def read_config(art_dir: Path) -> dict[str, Any]:
    """``mpt-config.json`` as a dict; :class:`ArtifactError` naming the file when it is missing or corrupt."""
    path = Path(art_dir) / CONFIG_FILE
    if not path.is_file():
        raise ArtifactError(f"{path} not found: {art_dir} is not an mpt_relax artifact (build one with scripts/build.py)")
    try:
        meta = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as err:
        raise ArtifactError(f"{path} is corrupt ({type(err).__name__}); {_rebuild(path)}") from None
    required = {"model_config": dict, "libraries": dict, "param_names": list, "context_window_size": int}
    if not isinstance(meta, dict) or any(not isinstance(meta.get(k), t) for k, t in required.items()):
        raise ArtifactError(f"{path} is corrupt (not the mpt_relax layout); {_rebuild(path)}")
    return meta


def copy_tokenizer(src_dir: Path | None, out_dir: Path) -> list[str]:
    """Copy the tokenizer files that exist in ``src_dir``; returns their names."""
    if src_dir is None:
        return []
    copied = []
    for name in TOKENIZER_FILES:
        if (src_dir / name).is_file():
            shutil.copy2(src_dir / name, out_dir / name)
            copied.append(name)
    return copied


@contextlib.contextmanager
def atomic_directory(final: Path, protect: Iterable[Path] = ()) -> Iterator[Path]:
    """A staging directory that becomes the artifact ``final`` only if the block succeeds.

    :func:`mpt_relax.io.staging.publish_directory` with the artifact's rule: only an existing
    artifact (``mpt-config.json`` present) or an empty directory is replaced; anything else,
    and an output that overlaps ``protect`` (the checkpoint), is refused before the block runs.
    On any error, Ctrl-C or SIGTERM the staging directory is removed and ``final`` is untouched.
    """
    with staging.publish_directory(final, is_ours=is_artifact, what="an mpt_relax artifact (no mpt-config.json)",
                                   protect=protect) as tmp:
        yield tmp


@contextlib.contextmanager
def pinned(art_dir: str | Path) -> Iterator[Path]:
    """A path through which every file is read from one version of ``art_dir``.

    A rebuild publishes a new artifact by renaming a whole directory over the old one; a
    reader that opened files by name during the rename would mix the two versions (the config
    of one, the library of the next). On Linux the directory is opened once and read through
    ``/proc/self/fd/N``, which keeps pointing at the version that was opened; elsewhere the
    directory's identity is compared before and after. If the version read from was replaced
    and deleted mid-way, one :class:`ArtifactError` says so. Errors of ours raised inside the
    block name ``art_dir``, not the descriptor path.
    """
    path = Path(art_dir)
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except FileNotFoundError:
        raise ArtifactError(f"{path} does not exist: build the artifact first (scripts/build.py)") from None
    except NotADirectoryError:
        raise ArtifactError(f"{path} is not a directory: give the artifact directory (scripts/build.py writes one)") from None
    try:
        before = os.fstat(fd)
        proc = Path(f"/proc/self/fd/{fd}")
        root = proc if proc.is_dir() else Path(os.path.realpath(path))
        try:
            yield root
        except MPTRelaxError as err:
            if root == path:
                raise
            raise type(err)(str(err).replace(str(root), str(path))) from None
        except OSError as err:
            if _same_dir(path, before):
                raise
            raise ArtifactError(f"{path} was replaced while it was being loaded (a rebuild finished); "
                                "load it again") from err
        if root != proc and not _same_dir(path, before):
            raise ArtifactError(f"{path} was replaced while it was being loaded (a rebuild finished); load it again")
    finally:
        os.close(fd)


def _same_dir(path: Path, st: os.stat_result) -> bool:
    try:
        now = os.stat(path)
    except OSError:
        return False
    return (now.st_dev, now.st_ino) == (st.st_dev, st.st_ino)
