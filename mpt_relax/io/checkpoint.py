"""Read HF-format checkpoints one shard at a time.

Handles sharded or single ``.safetensors`` (``model.safetensors.index.json``) and PyTorch
``.bin`` pickles (``pytorch_model.bin.index.json``), loaded only with
``torch.load(weights_only=True)`` (memory-mapped for zip-format pickles). Tensors come back as
torch tensors in the dtype they were stored in (bf16, fp16, fp32, ...). :func:`iter_tensors`
reads ``.safetensors`` tensors with plain file reads, so that memory holds the tensors in use,
not the pages of a whole mapped shard.
"""

from __future__ import annotations

import json
import weakref
import zipfile
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from mpt_relax.errors import MPTRelaxError

SAFETENSORS_INDEX = "model.safetensors.index.json"
FP16_MAX = 65504.0  # largest finite float16: bf16/fp32 values beyond it are clamped, never made inf
BIN_INDEX = "pytorch_model.bin.index.json"
SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                      "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
                      "U8": torch.uint8, "BOOL": torch.bool}


class CheckpointError(MPTRelaxError):
    """A checkpoint directory that cannot be read; the message says what to fix."""


def weight_files(model_dir: str | Path) -> list[Path]:
    """The weight shards of ``model_dir`` in load order; safetensors preferred over .bin."""
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise CheckpointError(f"checkpoint directory {model_dir} does not exist")
    index = _index_path(model_dir)
    if index is not None:
        return _shards_from_index(index, read_index(model_dir))
    for pattern in ("*.safetensors", "*.bin"):
        files = sorted(p for p in model_dir.glob(pattern) if p.is_file() and not p.name.startswith("training_args"))
        if files:
            return files
    raise CheckpointError(
        f"no weight files in {model_dir}: expected *.safetensors or pytorch_model*.bin (with or without an index)"
    )


def _index_path(model_dir: Path) -> Path | None:
    """The index file in use: the safetensors index wins over the .bin index."""
    for index_name in (SAFETENSORS_INDEX, BIN_INDEX):
        if (model_dir / index_name).is_file():
            return model_dir / index_name
    return None


def read_index(model_dir: str | Path) -> dict[str, str] | None:
    """The ``weight_map`` (tensor name -> shard file name) of the directory's index, or None."""
    index = _index_path(Path(model_dir))
    if index is None:
        return None
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
    except (json.JSONDecodeError, KeyError, TypeError) as err:
        raise CheckpointError(f"{index} is not a valid index file (needs a 'weight_map' object): {err}") from err
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise CheckpointError(f"{index}: 'weight_map' must map tensor names to shard file names")
    return weight_map


def _shards_from_index(index: Path, weight_map: dict[str, str]) -> list[Path]:
    """The distinct shard files the index names, in first-mention order; all must exist."""
    shards = list(dict.fromkeys(weight_map.values()))
    missing = [s for s in shards if not (index.parent / s).is_file()]
    if missing:
        raise CheckpointError(f"{index.name} names missing shard(s): {', '.join(missing)}; re-download them")
    return [index.parent / s for s in shards]


def load_shard(path: Path) -> dict[str, torch.Tensor]:
    """All tensors of one shard, memory-mapped where the format allows.

    ``.safetensors`` and zip-format ``.bin`` pickles are mapped (pages are read on first
    touch); legacy (pre-zip) pickles are read whole. Raises :class:`CheckpointError` for an
    empty, truncated or corrupt file.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"shard {path} does not exist")
    size = path.stat().st_size
    if size == 0:
        raise CheckpointError(f"shard {path} is empty; re-download it")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path))
        state = torch.load(str(path), map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    except Exception as err:  # corrupt, truncated or not a checkpoint at all
        reason = f"{type(err).__name__}: {err}".splitlines()[0]
        raise CheckpointError(
            f"cannot read shard {path} ({size} bytes; corrupt or truncated? re-download it): {reason}"
        ) from err
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"shard {path} is not a flat name -> tensor state dict")
    return state


def iter_tensors(model_dir: str | Path) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield ``(name, tensor)`` for every tensor: ``.safetensors`` one tensor at a time,
    ``.bin`` one (memory-mapped) shard at a time."""
    for shard in weight_files(model_dir):
        if shard.suffix == ".safetensors":
            yield from _iter_safetensors(shard)
        else:
            state = load_shard(shard)
            yield from state.items()
            del state


def _iter_safetensors(path: Path) -> Iterator[tuple[str, torch.Tensor]]:
    """One tensor at a time, read with plain file reads into reused buffers (not the mmap that
    ``safe_open`` tensors view: its touched pages would stay resident until the shard is closed)."""
    try:
        entries, buffers = _safetensors_entries(path), _ReadBuffers()
        with open(path, "rb", buffering=0) as handle:
            for name, dtype, shape, start, nbytes in entries:
                yield name, _read_tensor(handle, start, nbytes, buffers).view(dtype).reshape(shape)
    except CheckpointError:
        raise
    except Exception as err:  # corrupt header or truncated data
        raise CheckpointError(
            f"cannot read shard {path} ({path.stat().st_size} bytes; corrupt or truncated? re-download it): "
            f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
        ) from err


def _safetensors_entries(path: Path) -> list[tuple[str, torch.dtype, list[int], int, int]]:
    """``(name, dtype, shape, file offset, nbytes)`` per tensor, in ``safe_open``'s key order.

    ``safe_open`` validates the header (offsets in bounds, the file fully covered) first; the
    offsets then come from the same JSON header, which ``safe_open`` does not expose.
    """
    from safetensors import safe_open

    with safe_open(str(path), "pt") as handle:
        names = list(handle.keys())
    with open(path, "rb") as f:
        size = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(size))
    entries = []
    for name in names:
        info = header[name]
        if info["dtype"] not in SAFETENSORS_DTYPES:
            raise CheckpointError(f"shard {path}: tensor {name} has unsupported dtype {info['dtype']}")
        start, end = info["data_offsets"]
        entries.append((name, SAFETENSORS_DTYPES[info["dtype"]], info["shape"], 8 + size + start, end - start))
    return entries


class _ReadBuffers:
    """Buffers for a stream of tensor reads, each handed out again once its last tensor is gone.

    Faulting in fresh pages for every tensor costs the kernel as much time as copying the bytes
    from the page cache (7B: 13 GB); a build holds about three tensors at a time (being read,
    queued, converted), so a few reused buffers serve the whole stream. A buffer is lent as a
    slice, which the tensor made from it keeps alive (``torch.from_numpy``) and so does every
    view of that tensor: the buffer is free again when the slice's weak reference is dead.
    Buffers are numpy allocations, which ask for transparent huge pages.
    """

    KEEP = 4  # buffers kept; a consumer that keeps its tensors only costs fresh ones

    def __init__(self):
        self._buffers: list[tuple[np.ndarray, weakref.ref]] = []  # (buffer, its lent slice)

    def take(self, nbytes: int) -> np.ndarray:
        """A uint8 array of ``nbytes`` that no live tensor views."""
        idle = [i for i, (_, lent) in enumerate(self._buffers) if lent() is None]
        fits = [i for i in idle if self._buffers[i][0].nbytes >= nbytes]
        if fits:
            buf = self._buffers.pop(min(fits, key=lambda i: self._buffers[i][0].nbytes))[0]
        else:
            buf = np.empty(nbytes, dtype=np.uint8)
            if len(self._buffers) >= self.KEEP:  # forget the smallest idle buffer, else the oldest
                self._buffers.pop(min(idle, key=lambda i: self._buffers[i][0].nbytes) if idle else 0)
        part = buf[:nbytes]
        self._buffers.append((buf, weakref.ref(part)))
        return part


def _read_tensor(handle, offset: int, nbytes: int, buffers: _ReadBuffers) -> torch.Tensor:
    """``nbytes`` bytes at ``offset`` of an unbuffered file, as a uint8 tensor in a buffer of ``buffers``."""
    if not nbytes:  # numpy gives an empty array stride 0, which torch cannot view as another dtype
        return torch.empty(0, dtype=torch.uint8)
    buf = buffers.take(nbytes)
    view, done = memoryview(buf), 0
    handle.seek(offset)
    while done < nbytes:
        n = handle.readinto(view[done:])
        if not n:
            raise EOFError(f"the file ends inside a tensor at byte {offset + done}")
        done += n
    return torch.from_numpy(buf)


def tensor_shapes(model_dir: str | Path) -> dict[str, tuple[int, ...]]:
    """Name -> shape of every tensor, from the file headers (no tensor data is read)."""
    from safetensors import safe_open

    shapes: dict[str, tuple[int, ...]] = {}
    for shard in weight_files(model_dir):
        if shard.suffix == ".safetensors":
            try:
                with safe_open(str(shard), "pt") as handle:
                    shapes.update({name: tuple(handle.get_slice(name).get_shape()) for name in handle.keys()})
            except Exception as err:
                raise CheckpointError(f"cannot read the header of shard {shard} (corrupt? re-download it): {err}") from err
        else:
            shapes.update({name: tuple(t.shape) for name, t in load_shard(shard).items()})
    return shapes
