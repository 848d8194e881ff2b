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
import tempfile
from pathlib import Path
from typing import Any, Iterable, Iterator

import ml_dtypes
import numpy as np
from mpt_relax.errors import MPTRelaxError

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
            handle.write(array.tobytes())
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


def param_records(art_dir: Path) -> Iterator[tuple[Path, dict[str, Any]]]:
    """Yield ``(shard path, record)`` of every stored tensor (name, shape, dtype, nbytes, byteOffset)."""
    cache_path = art_dir / TENSOR_CACHE
    if not cache_path.is_file():
        raise ArtifactError(f"{cache_path} is missing: this artifact has no weights; rebuild it with weights")
    for shard in json.loads(cache_path.read_text())["records"]:
        path = art_dir / shard["dataPath"]
        if not path.is_file() or path.stat().st_size != shard["nbytes"]:
            raise ArtifactError(f"weight shard {path} is missing or truncated; rebuild the artifact with --force")
        for rec in shard["records"]:
            yield path, rec


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
    path = Path(art_dir) / CONFIG_FILE
    if not path.is_file():
        raise ArtifactError(f"{path} not found: {art_dir} is not an mpt_relax artifact (build one with scripts/build.py)")
    return json.loads(path.read_text())


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
def atomic_directory(final: Path) -> Iterator[Path]:
    """A temp directory beside ``final`` that replaces it only if the block succeeds.

    On any error (or Ctrl-C) the temp directory is removed and ``final`` is untouched.
    """
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    try:
        yield tmp
        if final.exists():
            old = final.with_name(f".{final.name}.old-{os.getpid()}")
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
