"""The memory-bandwidth bound of decoding (mpt_relax.bandwidth)."""

import numpy as np
import pytest
import tvm

from mpt_relax.tools import bandwidth
from mpt_relax.models.mpt.config import MPTConfig

CFG = MPTConfig(d_model=64, n_heads=4, n_layers=2, vocab_size=100, max_seq_len=32)


def tensors(config: MPTConfig, itemsize: int) -> list[tuple[str, tuple[int, ...], int]]:
    """(name, shape, nbytes) of a checkpoint of ``config`` with only what the bound cares about."""
    d, v = config.d_model, config.vocab_size
    out = [("transformer.wte.weight", (v, d), v * d * itemsize),
           ("transformer.blocks.0.ffn.up_proj.weight", (4 * d, d), 4 * d * d * itemsize)]
    if not config.tie_word_embeddings:
        out.append(("lm_head.weight", (v, d), v * d * itemsize))
    if config.uses_wpe:
        out.append(("transformer.wpe.weight", (config.max_seq_len, d), config.max_seq_len * d * itemsize))
    return out


def test_tied_head_reads_the_whole_embedding():
    assert bandwidth.weight_bytes_per_token(CFG, tensors(CFG, 4)) == (100 * 64 + 4 * 64 * 64) * 4


def test_lookup_tables_cost_one_row():
    cfg = CFG.replace(tie_word_embeddings=False, alibi=False, learned_pos_emb=True)
    assert bandwidth.weight_bytes_per_token(cfg, tensors(cfg, 2)) == (64 + 4 * 64 * 64 + 100 * 64 + 64) * 2


def test_kv_bytes_follow_kv_heads_and_context():
    mqa = CFG.replace(kv_n_heads=1)
    assert bandwidth.kv_bytes_per_token(CFG, 2, 10) == 2 * 2 * 4 * 16 * 2 * 10
    assert bandwidth.kv_bytes_per_token(mqa, 2, 10) == bandwidth.kv_bytes_per_token(CFG, 2, 10) / 4


def test_decode_bound_uses_the_mean_context():
    bound = bandwidth.decode_bound(CFG, tensors(CFG, 4), 4, prompt_len=8, gen_len=4, bandwidth=1e9)
    expected = bandwidth.weight_bytes_per_token(CFG, tensors(CFG, 4)) + bandwidth.kv_bytes_per_token(CFG, 4, 10)
    assert bound["bytes_per_token"] == expected
    assert bound["bound_tokens_per_s"] == pytest.approx(1e9 / expected)


@pytest.mark.parametrize("measure", [lambda: bandwidth.host_copy_bandwidth(2, nbytes=8 << 20),
                                     lambda: bandwidth.device_copy_bandwidth(tvm.cpu(0), nbytes=8 << 20)])
def test_copy_bandwidth_is_bytes_per_second(measure):
    value = measure()
    assert np.isfinite(value) and 1e8 < value < 1e13  # 0.1 GB/s .. 10 TB/s
