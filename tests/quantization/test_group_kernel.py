"""The compiled group quantizer gives exactly the numpy oracle's bytes, for every source dtype."""

import ml_dtypes
import numpy as np
import pytest
from group_oracle import oracle_quantize

from mpt_relax.quantization import QUANTIZATIONS, QuantizationError, quantize_weight
from mpt_relax.quantization import group_kernel

Q4, Q8 = QUANTIZATIONS["q4f16_1"], QUANTIZATIONS["q8f16_1"]
SOURCES = {"float32": np.float32, "float16": np.float16, "bfloat16": ml_dtypes.bfloat16}
ROWS, IN = 37, 256  # an odd row count; 8 groups a row: one kernel per (scheme, dtype) for the module


def hard_weight(dtype) -> np.ndarray:
    """[ROWS, IN] in ``dtype``: random rows plus ties at .5, zero and -0.0 groups, scales that
    underflow float16 or are subnormal, clipped codes and large values."""
    w = np.random.default_rng(0).standard_normal((ROWS, IN)) * 0.02
    w[0, :32] = np.r_[np.arange(-14, 15) * 0.5, 7.0, -7.0, 6.5]  # Q4 scale 1: every odd k a tie
    w[0, 32:64] = np.r_[np.arange(-15, 14) * 0.25, 3.5, -3.5, 0.75]  # Q4 scale 0.5: ties at odd quarters
    w[0, 64:96] = np.r_[127.0, -127.0, np.arange(-29, 31, 2) * 4 + 0.5]  # Q8 scale 1: ties
    w[1, :32], w[1, 32:64] = 0.0, -0.0
    w[2, :32] = 2.0**-24 * np.sign(w[2, :32])  # the smallest float16: its scale underflows to 0
    w[3, :32] *= 2.0**-14  # float16-subnormal scales (coarse: codes clip at max_int)
    w[4, :32] = np.linspace(-60000, 60000, 32)
    w[5] = np.random.default_rng(1).standard_normal(IN) * 3.0
    return w.astype(dtype)


def assert_same_bytes(w: np.ndarray, q) -> None:
    got, want = quantize_weight(w, q), oracle_quantize(w, q)
    assert got["q_weight"].dtype == np.uint32 and got["q_scale"].dtype == np.float16
    np.testing.assert_array_equal(got["q_weight"], want["q_weight"])
    np.testing.assert_array_equal(got["q_scale"].view(np.uint16), want["q_scale"].view(np.uint16))


@pytest.mark.parametrize("q", [Q4, Q8], ids=lambda q: q.name)
@pytest.mark.parametrize("source", SOURCES)
def test_bytes_match_the_numpy_oracle(q, source):
    w = hard_weight(SOURCES[source])
    assert_same_bytes(w, q)
    assert (oracle_quantize(w, q)["q_scale"][2, 0] == 0) and oracle_quantize(w, q)["q_scale"][3, 0] < 2.0**-14


@pytest.mark.parametrize("source", SOURCES)
def test_views_and_read_only_arrays(source):
    w = hard_weight(SOURCES[source])
    assert_same_bytes(w[::2], Q4)  # strided rows: made contiguous
    assert_same_bytes(np.frombuffer(w[:5].tobytes(), w.dtype).reshape(5, IN), Q4)  # read-only: copied
    empty = quantize_weight(w[:0], Q4)
    assert empty["q_weight"].shape == (0, IN // 8) and empty["q_scale"].shape == (0, IN // 32)


@pytest.mark.parametrize("q", [Q4, Q8], ids=lambda q: q.name)
@pytest.mark.parametrize("source", SOURCES)
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf, 1e38])
def test_non_finite_weights_and_scale_overflow_raise(q, source, bad):
    if source == "float16" and bad == 1e38:
        pytest.skip("float16 holds no value whose scale overflows float16")
    w = hard_weight(SOURCES[source])
    w[ROWS - 1, 100] = bad
    with pytest.raises(QuantizationError, match="non-finite"):
        quantize_weight(w, q)


def test_kernels_are_compiled_once_per_shape():
    w = hard_weight(np.float32)
    quantize_weight(w, Q4)
    before = group_kernel._kernel.cache_info()
    quantize_weight(w[:3], Q4)
    after = group_kernel._kernel.cache_info()
    assert after.hits == before.hits + 1 and after.misses == before.misses


def test_unsupported_dtype():
    with pytest.raises(QuantizationError, match="float64"):
        quantize_weight(np.ones((2, 64)), Q4)
