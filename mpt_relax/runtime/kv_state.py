"""KV cache capacity arithmetic and the engine's handle on the runtime cache object."""

from __future__ import annotations


import tvm

from mpt_relax.models.mpt.config import MPTConfig
from mpt_relax.errors import MPTRelaxError

# ---------------------------------------------------------------------------- capacity


class KVCacheCapacityError(MPTRelaxError):
    """A KV cache budget or a forward request that does not fit in the cache's pages."""


def dtype_bytes(dtype: str) -> int:
    """Bytes one element of ``dtype`` takes (sub-byte types round up)."""
    return (tvm.runtime.DataType(dtype).bits + 7) // 8


def bytes_per_page(cfg: MPTConfig, dtype: str, page_size: int) -> int:
    """Bytes one page takes across all layers: 2 (K and V) * L * page_size * KV * hd * itemsize."""
    itemsize = dtype_bytes(dtype)
    return 2 * cfg.n_layers * page_size * cfg.kv_n_heads * cfg.head_dim * itemsize


def pages_for_budget(cfg: MPTConfig, dtype: str, page_size: int, budget_bytes: int) -> int:
    """How many pages of ``page_size`` tokens fit in ``budget_bytes`` of KV memory.

    Counts the pages only (the runtime's per-forward scratch, proportional to
    ``prefill_chunk_size``, comes on top). Raises :class:`KVCacheCapacityError` when the budget
    holds fewer than the two pages the runtime needs at minimum.
    """
    per_page = bytes_per_page(cfg, dtype, page_size)
    pages = int(budget_bytes) // per_page
    if pages < 2:
        raise KVCacheCapacityError(
            f"a KV cache budget of {budget_bytes} bytes holds {pages} page(s), but at least 2 are needed: "
            f"one page of {page_size} tokens takes {per_page} bytes ({cfg.n_layers} layers x {cfg.kv_n_heads} kv heads "
            f"x head_dim {cfg.head_dim} x K and V in {dtype}); raise the budget or lower page_size"
        )
    return pages


def max_total_seq_len_for_pages(num_pages: int, page_size: int) -> int:
    """The ``max_total_seq_len`` that makes the runtime allocate exactly ``num_pages`` pages.

    The runtime allocates ``ceil(max_total_seq_len / page_size) + 1`` pages per layer.
    """
    return (num_pages - 1) * page_size


def pages_to_append(current_length: int, append_length: int, page_size: int) -> int:
    """New pages a sequence of ``current_length`` tokens needs to take ``append_length`` more.

    Exact also for forked sequences: their own last block starts on a page boundary.
    """
    return -(-(current_length + append_length) // page_size) - -(-current_length // page_size)


class PagedKVCacheRuntime:
    """Engine-side handle on a cache object returned by the compiled ``create_paged_kv_cache``.

    Wraps the runtime's packed functions; :meth:`begin_forward` checks the page budget first so
    a request that cannot fit fails with :class:`KVCacheCapacityError` before the runtime has
    changed any sequence.
    """

    def __init__(self, cache, page_size: int):
        self.cache = cache
        self.page_size = page_size
        get = tvm.get_global_func
        self._add = get("vm.builtin.kv_state_add_sequence")
        self._remove = get("vm.builtin.kv_state_remove_sequence")
        self._fork = get("vm.builtin.kv_state_fork_sequence")
        self._begin = get("vm.builtin.kv_state_begin_forward")
        self._end = get("vm.builtin.kv_state_end_forward")
        self._available = get("vm.builtin.attention_kv_cache_get_num_available_pages")
        self._length = get("vm.builtin.attention_kv_cache_get_sequence_length")

    def add_sequence(self, seq_id: int) -> None:
        self._add(self.cache, seq_id)

    def remove_sequence(self, seq_id: int) -> None:
        """Drop a sequence and free the pages no other sequence shares."""
        self._remove(self.cache, seq_id)

    def fork_sequence(self, parent_id: int, child_id: int, fork_pos: int = -1) -> None:
        """Start ``child_id`` as a copy of the first ``fork_pos`` tokens of the parent (-1: all)."""
        self._fork(self.cache, parent_id, child_id, fork_pos)

    def available_pages(self) -> int:
        return int(self._available(self.cache))

    def sequence_length(self, seq_id: int) -> int:
        return int(self._length(self.cache, seq_id))

    def begin_forward(self, seq_ids: list[int], append_lengths: list[int], *, check: bool = True) -> None:
        """Declare the next forward: ``append_lengths[i]`` new tokens for ``seq_ids[i]``.

        The entry point that follows takes their tokens concatenated in this order. ``check=False``
        skips the page check, for a caller that has checked a whole multi-forward request already.
        """
        if check:
            self._check_pages(seq_ids, append_lengths)
        self._begin(self.cache, tvm.runtime.ShapeTuple(seq_ids), tvm.runtime.ShapeTuple(append_lengths), None)

    def _check_pages(self, seq_ids: list[int], append_lengths: list[int]) -> None:
        needed = [pages_to_append(self.sequence_length(s), n, self.page_size) for s, n in zip(seq_ids, append_lengths)]
        available = self.available_pages()
        if sum(needed) > available:
            detail = ", ".join(f"sequence {s}: +{p}" for s, p in zip(seq_ids, needed) if p)
            raise KVCacheCapacityError(
                f"this forward needs {sum(needed)} new KV pages ({detail}) but only {available} are free; "
                "finish or remove sequences, shorten the request, or build the cache with a larger "
                "max_total_seq_len (see pages_for_budget)"
            )

    def end_forward(self) -> None:
        self._end(self.cache)
