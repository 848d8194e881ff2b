"""iter_tensors on .safetensors: plain file reads give exactly what safetensors loads; corrupt files fail clearly."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from mpt_relax.io.checkpoint import CheckpointError, _ReadBuffers, iter_tensors


def _tensors() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(3)
    return {"bf16": torch.randn(5, 7, generator=gen).to(torch.bfloat16), "f16": torch.randn(3, generator=gen).half(),
            "f32": torch.randn(2, 2, 2, generator=gen), "i64": torch.arange(4), "u8": torch.arange(9, dtype=torch.uint8),
            "bool": torch.tensor([True, False]), "scalar": torch.tensor(1.5), "empty": torch.zeros(0, 4)}


def test_plain_reads_match_safetensors(tmp_path):
    save_file(_tensors(), str(tmp_path / "model.safetensors"))
    expected = load_file(str(tmp_path / "model.safetensors"))
    got = dict(iter_tensors(tmp_path))
    assert list(got) == sorted(expected)
    for name, tensor in expected.items():
        assert got[name].dtype == tensor.dtype and got[name].shape == tensor.shape and torch.equal(got[name], tensor)


@pytest.mark.parametrize("damage", ["truncate", "garbage header"])
def test_damaged_shard_is_a_checkpoint_error(tmp_path, damage):
    path = tmp_path / "model.safetensors"
    save_file(_tensors(), str(path))
    data = path.read_bytes()
    path.write_bytes(data[:-10] if damage == "truncate" else data[:8] + b"{not json" + data[17:])
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        list(iter_tensors(tmp_path))


def test_read_buffers_are_reused_only_once_no_tensor_views_them():
    buffers = _ReadBuffers()
    first = torch.from_numpy(buffers.take(64)).view(torch.float32)
    kept = first.numpy()[2:]  # a view of a view: still holds the buffer
    del first
    second = buffers.take(64)
    assert not np.shares_memory(second, kept)
    del kept, second
    third = buffers.take(32)  # both buffers idle again: one of them is lent, none allocated
    assert len(buffers._buffers) == 2 and third.nbytes == 32
    assert any(np.shares_memory(third, b) for b, _ in buffers._buffers)


def test_a_stream_that_drops_its_tensors_reuses_buffers(tmp_path):
    tensors = {f"w{i}": torch.randn(64, 32).to(torch.bfloat16) for i in range(12)}
    save_file(tensors, str(tmp_path / "model.safetensors"))
    addresses = set()
    for name, tensor in iter_tensors(tmp_path):
        assert torch.equal(tensor, tensors[name])
        addresses.add(tensor.data_ptr())
        del tensor
    assert len(addresses) < len(tensors)
