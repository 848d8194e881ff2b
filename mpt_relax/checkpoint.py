"""Read HF-format checkpoints one shard at a time.

Handles sharded or single ``.safetensors`` (``model.safetensors.index.json``) and PyTorch
``.bin`` pickles (``pytorch_model.bin.index.json``), loaded only with
``torch.load(weights_only=True, mmap=True)``. Tensors come back as torch tensors in the dtype
they were stored in (bf16, fp16, fp32, ...).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator

import torch

SAFETENSORS_INDEX = "model.safetensors.index.json"
BIN_INDEX = "pytorch_model.bin.index.json"


class CheckpointError(ValueError):
    """A checkpoint directory that cannot be read; the message says what to fix."""


def weight_files(model_dir: str | Path) -> list[Path]:
    """The weight shards of ``model_dir`` in load order; safetensors preferred over .bin."""
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise CheckpointError(f"checkpoint directory {model_dir} does not exist")
    for index_name in (SAFETENSORS_INDEX, BIN_INDEX):
        index = model_dir / index_name
        if index.is_file():
            return _shards_from_index(index)
    for pattern in ("*.safetensors", "*.bin"):
        files = sorted(p for p in model_dir.glob(pattern) if p.is_file() and not p.name.startswith("training_args"))
        if files:
            return files
    raise CheckpointError(
        f"no weight files in {model_dir}: expected *.safetensors or pytorch_model*.bin (with or without an index)"
    )


def _shards_from_index(index: Path) -> list[Path]:
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
    except (json.JSONDecodeError, KeyError, TypeError) as err:
        raise CheckpointError(f"{index} is not a valid index file (needs a 'weight_map' object): {err}") from err
    shards = list(dict.fromkeys(weight_map.values()))
    missing = [s for s in shards if not (index.parent / s).is_file()]
    if missing:
        raise CheckpointError(f"{index.name} names missing shard(s): {', '.join(missing)}; re-download them")
    return [index.parent / s for s in shards]


def load_shard(path: Path) -> dict[str, torch.Tensor]:
    """All tensors of one shard (memory-mapped where the format allows)."""
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path))
        state = torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
    except Exception as err:  # corrupt, truncated or not a checkpoint at all
        raise CheckpointError(f"cannot read shard {path}: {type(err).__name__}: {err}".splitlines()[0]) from err
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"shard {path} is not a flat name -> tensor state dict")
    return state


def iter_tensors(model_dir: str | Path) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield ``(name, tensor)`` for every tensor, holding one shard in memory at a time."""
    for shard in weight_files(model_dir):
        state = load_shard(shard)
        yield from state.items()
        del state


def tensor_shapes(model_dir: str | Path) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """Name -> (shape, dtype) of every tensor, without keeping any data."""
    return {name: (tuple(t.shape), t.dtype) for name, t in iter_tensors(model_dir)}
