"""Runtime: load a built artifact and run sequences through the paged KV cache.

``Engine(artifact_dir, device)`` loads the library compiled for the device, the weights and
``mpt-config.json``, and creates the KV cache once. Work is expressed per sequence:
``add_sequence`` / ``fork_sequence`` start one, ``forward`` appends tokens to any set of
sequences at once and returns the logits after each one's last new token, ``remove_sequence``
frees its pages. A forward where every sequence gets exactly one token is one ``batch_decode``
call; anything else is one ragged ``prefill`` call per chunk of at most ``prefill_chunk_size``
tokens and ``max_batch_size`` sequences.

KV memory. The cache is a pool of pages of ``page_size`` tokens (K and V of every layer).
``kv_memory`` (bytes, or a string such as ``"2GB"`` / ``"512MiB"``) sets the pool's size; the
default is enough pages for ``max_batch_size`` sequences of the full context window, capped at
half of the device memory the weights leave free. A request that needs more pages than are free
raises :class:`KVCacheCapacityError` before any work is done, and the cache stays usable.

Text generation on top of the sequence calls lives in :mod:`.generation`; the Engine
methods at the end delegate to it. The tokenizer (``tokenizer.json``) is loaded when present.
"""

from __future__ import annotations

import functools
import numbers
import threading
from pathlib import Path

import numpy as np
import tvm
from tvm.runtime.vm import VirtualMachine

from mpt_relax.errors import MPTRelaxError
from mpt_relax.io import artifact
from mpt_relax.models.mpt.config import ConfigError, MPTConfig
from mpt_relax.runtime import cpu_features, generation, threads
from mpt_relax.runtime.kv_state import (
    KVCacheCapacityError,
    PagedKVCacheRuntime,
    bytes_per_page,
    dtype_bytes,
    max_total_seq_len_for_pages,
    pages_for_budget,
    pages_to_append,
)
from mpt_relax.runtime.tokenizer import load_tokenizer
from mpt_relax.runtime.tvm_backends import ensure_device_runtime, use_precompiled_cuda
from mpt_relax.sizes import parse_bytes
from mpt_relax.targets import AUTO_DEVICE_ORDER, BY_DEVICE, DEVICE_NAMES

DEFAULT_MAX_BATCH_SIZE = 8
DEFAULT_PREFILL_CHUNK_SIZE = 2048
KV_SHARE_OF_FREE_MEMORY = 0.5  # default cap: this share of the device memory the weights leave


class EngineError(MPTRelaxError):
    """Bad input to the engine (token ids, lengths, device); the message says what to do."""


def _tvm_device(device: str) -> tvm.runtime.Device:
    problem = ensure_device_runtime(device)
    dev = tvm.runtime.device(device, 0)
    if not dev.exist:
        why = f" (TVM's {device} runtime did not load: {problem})" if problem else ""
        raise EngineError(f"device {device!r} is not available on this machine{why}; use device='cpu'")
    return dev


def _positive(name: str, value) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise EngineError(f"{name} must be a positive integer, got {value!r}")
    return value


def _locked(method):
    """Run ``method`` holding the Engine's lock (see ``Engine.__init__``)."""

    @functools.wraps(method)
    def call(self, *args, **kwargs):
        with self._lock:
            return method(self, *args, **kwargs)

    return call


def _integer_ids(token_ids) -> np.ndarray:
    """``token_ids`` as int64 [n]: a 1-D integer array, or a list/tuple of integers (Python or
    numpy); anything else (floats, bools, strings, nested lists, 2-D arrays) is refused."""
    if isinstance(token_ids, np.ndarray):
        if token_ids.ndim != 1 or token_ids.dtype.kind not in "iu":
            raise EngineError(f"token ids must be a 1-D integer array, got a {token_ids.ndim}-D {token_ids.dtype} array")
        return token_ids.astype(np.int64)
    if not isinstance(token_ids, (list, tuple)):
        raise EngineError(f"token ids must be a list of integers, got {type(token_ids).__name__}")
    bad = [t for t in token_ids if not isinstance(t, numbers.Integral) or isinstance(t, (bool, np.bool_))]
    if bad:
        raise EngineError(f"token ids must be integers, got {bad[0]!r} ({type(bad[0]).__name__})")
    huge = [t for t in token_ids if not -(2**63) <= int(t) < 2**63]
    if huge:
        raise EngineError(f"token id {huge[0]} is not an integer in the vocabulary's range")
    return np.array([int(t) for t in token_ids], dtype=np.int64)


def auto_device(libraries: dict[str, str]) -> str:
    """The device for ``device="auto"``: cuda, else metal, if present here and built; else cpu."""
    for device in AUTO_DEVICE_ORDER:
        if BY_DEVICE[device].name in libraries and ensure_device_runtime(device) is None \
                and tvm.runtime.device(device, 0).exist:
            return device
    return "cpu"


class Engine:
    """A loaded artifact: ``Engine(dist/mpt-7b-instruct-q4f16_1, device="cuda")``.

    ``max_batch_size``: sequences per compiled forward (a larger ``forward`` is split);
    ``kv_memory``: bytes of KV cache (see the module docstring for the default);
    ``prefill_chunk_size``: most tokens per compiled forward (default: the context window, at
    most 2048); longer prompts are prefilled in chunks.
    """

    def __init__(
        self,
        artifact_dir: str | Path,
        device: str = "auto",
        *,
        max_batch_size: int = DEFAULT_MAX_BATCH_SIZE,
        kv_memory: int | str | None = None,
        prefill_chunk_size: int | None = None,
    ):
        self.path = Path(artifact_dir)
        # One lock around everything that touches the KV cache or the VM: an Engine may be shared
        # by threads (each call is atomic; the calls of one generation interleave with others').
        self._lock = threading.RLock()
        with artifact.pinned(self.path) as root:  # every file from one version of the directory
            self.meta = artifact.read_config(root)
            self.config = self._model_config()
            self.tokenizer = load_tokenizer(root)  # None: token-id prompts only
            if device == "auto":
                device = auto_device(self.meta["libraries"])
            if "page_size" not in self.meta:
                raise artifact.ArtifactError(
                    f"{self.path} was built by an older mpt_relax without the paged KV cache; rebuild it with force=True / --force"
                )
            self.page_size = int(self.meta["page_size"])
            self.max_batch_size = _positive("max_batch_size", max_batch_size)
            self.prefill_chunk_size = _positive(
                "prefill_chunk_size", prefill_chunk_size or min(self.context_window, DEFAULT_PREFILL_CHUNK_SIZE)
            )
            self.device = _tvm_device(self._check_device(device))
            self._check_cpu(device)
            if device == "cpu":
                threads.use_physical_cores()  # before the first kernel runs: TVM's default is half the cores
            kv_budget = self._check_memory(kv_memory, root)  # before anything is allocated
            if device == "cuda":
                use_precompiled_cuda(root)  # kernels built with nvcc: no CUDA compiler needed here
            self.vm = VirtualMachine(tvm.runtime.load_module(str(root / self._library(device))), self.device)
            self.params = self._load_params(root)
        self.kv_pages = self._kv_pages(kv_budget)
        self.kv_memory = self.kv_pages * self._page_bytes
        self._kv = self._create_cache()
        self._prefill = self.vm["prefill"]
        self._decode = self.vm["batch_decode"]
        self._sequences: set[int] = set()
        self._next_seq = 0

    # ------------------------------------------------------------ loading
    def _model_config(self) -> MPTConfig:
        family = self.meta.get("model_type", "mpt")  # artifacts before the field are MPT
        if family != "mpt":
            raise artifact.ArtifactError(f"{self.path} holds a {family!r} model; this mpt_relax runs 'mpt' artifacts")
        try:
            return MPTConfig.from_dict(self.meta["model_config"])
        except ConfigError as err:
            raise artifact.ArtifactError(f"{self.path / artifact.CONFIG_FILE}: {err}; rebuild the artifact") from None

    def _check_memory(self, kv_memory: int | str | None, root: Path) -> int | None:
        """The KV budget in bytes (None: the default); refuses one that, with the weights, exceeds
        the device's memory, before any allocation (which would end in ``std::bad_alloc``)."""
        if kv_memory is None:
            return None
        budget = parse_bytes(kv_memory, "kv_memory")
        weights = self._weight_bytes(root)
        total = self.device.total_global_memory
        if total and budget + weights > total:
            raise KVCacheCapacityError(
                f"kv_memory={kv_memory!r} ({budget / 1e9:.2f} GB) plus the weights ({weights / 1e9:.2f} GB) exceed the "
                f"{total / 1e9:.2f} GB of memory of {self.device}; give a smaller kv_memory"
            )
        return budget

    def _weight_bytes(self, root: Path) -> int:
        """Bytes of the weights :meth:`_load_params` will place on the device (from their records)."""
        wanted = set(self.meta["param_names"])
        return sum(rec["nbytes"] for _, rec in artifact.param_records(root) if rec["name"] in wanted)

    def _check_device(self, device: str) -> str:
        if device not in BY_DEVICE:
            raise EngineError(f"unknown device {device!r}; choose one of: {', '.join(DEVICE_NAMES)}")
        if not self.meta.get("has_weights"):
            raise EngineError(f"{self.path} was built without weights; rebuild it from a checkpoint directory")
        return device

    def _check_cpu(self, device: str) -> None:
        """Refuse a library whose CPU code uses instructions this machine's CPU lacks (it would crash)."""
        required = self.meta.get("library_isa_features", {}).get(BY_DEVICE[device].name, [])
        missing = cpu_features.missing_features(required)
        if missing:
            raise EngineError(
                f"{self.path} was compiled for CPU {self.meta.get('mcpu')!r}, whose instructions {', '.join(missing[:6])} "
                "this CPU lacks; rebuild it here (--mcpu native) or with a portable --mcpu such as x86-64-v3"
            )
        # a library for an AMX CPU prefills on the tiles: in bf16 with --amx-prefill, exactly where the
        # model is fp16 (compile.amx_kernels); fp32 models' exact prefill keeps the FMA units
        quant = self.meta.get("quantization", {})
        on_tiles = "+amx" in quant.get("tag", "") or quant.get("model_dtype") in cpu_features.AMX_EXACT_DTYPES
        if "amx-tile" in required and on_tiles and not cpu_features.request_amx():  # the tile state first
            raise EngineError(f"{self.path} uses AMX kernels but Linux refused this process the AMX tile state; "
                              "rebuild it for a CPU without AMX (e.g. --mcpu x86-64-v4)")

    def _library(self, device: str) -> str:
        target = BY_DEVICE[device].name
        lib = self.meta["libraries"].get(target)
        if lib is None:
            raise EngineError(
                f"{self.path} has no library for device {device!r} (built: {', '.join(self.meta['libraries'])}); "
                f"rebuild with --target {target}"
            )
        return lib

    def _load_params(self, root: Path) -> list[tvm.runtime.Tensor]:
        names = self.meta["param_names"]
        wanted = set(names)
        loaded = {n: tvm.runtime.tensor(a, self.device) for n, a in artifact.read_params(root) if n in wanted}
        missing = [n for n in names if n not in loaded]
        if missing:
            raise artifact.ArtifactError(f"{self.path} lacks weights {missing[:3]}...; rebuild with --force")
        return [loaded[n] for n in names]

    @property
    def _page_bytes(self) -> int:
        return bytes_per_page(self.config, self.meta["model_dtype"], self.page_size)

    def _kv_pages(self, budget: int | None) -> int:
        """Cache pages that fit in ``budget`` bytes (None: :meth:`_default_kv_memory`)."""
        budget = budget if budget is not None else self._default_kv_memory()
        try:
            return pages_for_budget(self.config, self.meta["model_dtype"], self.page_size, budget)
        except KVCacheCapacityError as err:
            raise KVCacheCapacityError(f"Engine(kv_memory={budget}): {err}") from None

    def _default_kv_memory(self) -> int:
        """Pages for max_batch_size full context windows, capped at a share of the free device memory."""
        pages_per_sequence = -(-self.context_window // self.page_size)
        full = self.max_batch_size * pages_per_sequence * self._page_bytes
        weights = sum(_nbytes(p) for p in self.params)
        spare = int((self.device.total_global_memory - weights) * KV_SHARE_OF_FREE_MEMORY)
        return max(min(full, spare), 0)

    def _create_cache(self) -> PagedKVCacheRuntime:
        sizes = (self.max_batch_size, max_total_seq_len_for_pages(self.kv_pages, self.page_size), self.prefill_chunk_size)
        cache = self.vm["create_paged_kv_cache"](*(tvm.runtime.ShapeTuple([s]) for s in sizes))
        return PagedKVCacheRuntime(cache, self.page_size)

    # ------------------------------------------------------------ properties and checks
    @property
    def vocab_size(self) -> int:
        return self.config.vocab_size

    @property
    def context_window(self) -> int:
        return int(self.meta["context_window_size"])

    def free_kv_pages(self) -> int:
        """KV-cache pages no sequence holds (``kv_pages`` when there are none)."""
        with self._lock:
            return self._kv.available_pages()

    def check_tokens(self, token_ids, extra: int = 0) -> np.ndarray:
        """Token ids as int32 [n]; errors for anything but a flat sequence of integers (no floats,
        bools or nested lists), empty input, ids outside the vocabulary, or a sequence (plus
        ``extra`` tokens to come) longer than the context window."""
        ids = _integer_ids(token_ids)
        if ids.size == 0:
            raise EngineError("empty prompt: give at least one token")
        if ids.min() < 0 or ids.max() >= self.vocab_size:
            raise EngineError(f"token ids must be in [0, {self.vocab_size}); got min {ids.min()} max {ids.max()}")
        if ids.size + extra > self.context_window:
            raise EngineError(
                f"{ids.size} prompt tokens + {extra} new tokens exceed the context window of {self.context_window}; "
                "shorten the prompt or rebuild with a larger --max-seq-len"
            )
        return ids.astype(np.int32)

    def pages_needed(self, held: int, new: int) -> int:
        """Pages a sequence holding ``held`` tokens takes to grow by ``new`` tokens."""
        return pages_to_append(held, new, self.page_size)

    def _check_capacity(self, lengths: list[tuple[int, int]]) -> None:
        """Raise KVCacheCapacityError unless ``(tokens held, tokens to add)`` of every sequence fit in the free pages."""
        needed = sum(pages_to_append(held, new, self.page_size) for held, new in lengths)
        free = self._kv.available_pages()
        if needed > free:
            raise KVCacheCapacityError(
                f"{sum(new for _, new in lengths)} new tokens need {needed} KV-cache pages of {self.page_size} tokens "
                f"but only {free} of {self.kv_pages} are free (kv_memory={self.kv_memory} bytes); remove finished "
                "sequences, shorten the request, or create the Engine with a larger kv_memory"
            )

    # ------------------------------------------------------------ sequences (the KV-cache contract)
    @_locked
    def add_sequence(self) -> int:
        """Start an empty sequence; returns its id."""
        seq_id = self._new_id()
        self._kv.add_sequence(seq_id)
        self._sequences.add(seq_id)
        return seq_id

    @_locked
    def fork_sequence(self, parent: int, length: int | None = None) -> int:
        """Start a sequence that shares the first ``length`` tokens (default: all) of ``parent``'s
        cache, e.g. a common prompt prefix; returns its id. Shared pages are not copied."""
        held = self.sequence_length(parent)
        length = held if length is None else length
        if not 0 < length <= held:
            raise EngineError(f"fork length must be in [1, {held}] for sequence {parent}, got {length}")
        self._check_capacity([(0, length % self.page_size)])  # a partly filled last page is copied
        seq_id = self._new_id()
        self._kv.fork_sequence(parent, seq_id, length)
        self._sequences.add(seq_id)
        return seq_id

    @_locked
    def remove_sequence(self, seq_id: int) -> None:
        """Drop a sequence and free the cache pages no other sequence shares."""
        self._require(seq_id)
        self._kv.remove_sequence(seq_id)
        self._sequences.remove(seq_id)

    @_locked
    def sequence_length(self, seq_id: int) -> int:
        """Tokens cached for ``seq_id``."""
        self._require(seq_id)
        return self._kv.sequence_length(seq_id)

    @_locked
    def forward(self, seq_ids: list[int], tokens: list[list[int]]) -> np.ndarray:
        """Append ``tokens[b]`` to sequence ``seq_ids[b]`` for every b; returns the float32 logits
        after each sequence's last new token, [len(seq_ids), vocab]."""
        seq_ids = list(seq_ids)
        if not seq_ids or len(seq_ids) != len(tokens) or len(set(seq_ids)) != len(seq_ids):
            raise EngineError("forward needs one token list per distinct sequence id (at least one)")
        held = [self.sequence_length(s) for s in seq_ids]
        ids = [self.check_tokens(t, extra=h) for t, h in zip(tokens, held)]
        self._check_capacity([(h, len(x)) for h, x in zip(held, ids)])
        if all(len(x) == 1 for x in ids):
            return self._decode_batch(seq_ids, ids)
        return self._prefill_last(seq_ids, ids)

    @_locked
    def logits(self, token_ids) -> np.ndarray:
        """Float32 logits [len(token_ids), vocab] of every position of one fresh sequence."""
        ids = self.check_tokens(token_ids)
        self._check_capacity([(0, len(ids))])
        seq_id = self.add_sequence()
        try:
            step = self.prefill_chunk_size
            chunks = [ids[i : i + step] for i in range(0, len(ids), step)]
            return np.concatenate([self._run([seq_id], [c], np.arange(len(c), dtype=np.int32)) for c in chunks])
        finally:
            self.remove_sequence(seq_id)

    # ------------------------------------------------------------ compiled calls
    def _decode_batch(self, seq_ids: list[int], ids: list[np.ndarray]) -> np.ndarray:
        """One token per sequence: batch_decode in groups of max_batch_size; logits [b, V]."""
        size = self.max_batch_size
        groups = range(0, len(ids), size)
        return np.concatenate([self._run(seq_ids[g : g + size], ids[g : g + size]) for g in groups])

    def _prefill_last(self, seq_ids: list[int], ids: list[np.ndarray]) -> np.ndarray:
        """Ragged prefill in chunks; the logits [b, V] after each sequence's last token."""
        last = [None] * len(ids)
        for chunk in self._chunks([len(x) for x in ids]):
            pieces = [ids[b][start:stop] for b, start, stop in chunk]
            ends = np.cumsum([len(p) for p in pieces]).astype(np.int32)
            logits = self._run([seq_ids[b] for b, _, _ in chunk], pieces, ends - 1)
            for row, (b, _, stop) in zip(logits, chunk):
                if stop == len(ids[b]):
                    last[b] = row
        return np.stack(last)

    def _chunks(self, lengths: list[int]) -> list[list[tuple[int, int, int]]]:
        """Split a ragged batch into forwards of at most prefill_chunk_size tokens and
        max_batch_size sequences, in order: each a list of (sequence index, start, stop)."""
        chunks, current, room = [], [], self.prefill_chunk_size
        for b, length in enumerate(lengths):
            start = 0
            while start < length:
                if room == 0 or len(current) == self.max_batch_size:
                    chunks.append(current)
                    current, room = [], self.prefill_chunk_size
                stop = min(length, start + room)
                current.append((b, start, stop))
                room -= stop - start
                start = stop
        return chunks + [current]

    def _run(self, seq_ids: list[int], pieces: list[np.ndarray], logit_positions: np.ndarray | None = None) -> np.ndarray:
        """One compiled forward appending ``pieces[i]`` to ``seq_ids[i]``: ``prefill`` returning
        the logits at rows ``logit_positions`` of the concatenated pieces, or ``batch_decode``
        (one token each) when ``logit_positions`` is None. Returns float32 [rows, V]."""
        self._kv.begin_forward(seq_ids, [len(p) for p in pieces], check=False)  # forward() checked the request
        try:
            ids = tvm.runtime.tensor(np.concatenate(pieces), self.device)
            if logit_positions is None:
                out = self._decode(ids, self._kv.cache, self.params)
            else:
                positions = tvm.runtime.tensor(logit_positions, self.device)
                out = self._prefill(ids, positions, self._kv.cache, self.params)
            return out.numpy()
        finally:
            self._kv.end_forward()

    def _new_id(self) -> int:
        seq_id = self._next_seq
        self._next_seq += 1
        return seq_id

    def _require(self, seq_id: int) -> None:
        if seq_id not in self._sequences:
            raise EngineError(f"unknown sequence id {seq_id}; call add_sequence() first")

    # ------------------------------------------------------------ text generation (generation.py)
    def generate(self, prompt, *, template: str | None = None, **sampling):
        """Reply to a string, token ids, or a list of either (a batch -> list of results).

        ``sampling``: max_new_tokens=128, temperature=0.0, top_k=0, top_p=1.0,
        repetition_penalty=1.0, stop=None, seed=None, ignore_eos=False (see
        :class:`generation.SamplingParams`), and/or ``sampling=SamplingParams(...)`` whose
        fields the keywords override; ``template``: "dolly" | "chatml" | "none",
        default from the config. Returns :class:`generation.GenerationResult`.
        """
        return generation.generate(self, prompt, template, **sampling)

    def stream(self, prompt, *, template: str | None = None, **sampling) -> generation.Stream:
        """Like :meth:`generate` for one prompt; iterate for text pieces, then ``.result``."""
        return generation.stream(self, prompt, template, **sampling)

    def chat(self, messages, *, template: str | None = None, **sampling) -> generation.GenerationResult:
        """The reply to a conversation ``[{"role": ..., "content": ...}, ...]``."""
        return generation.chat(self, messages, template, **sampling)

    def chat_session(self, system: str | None = None, *, template: str | None = None,
                     **sampling) -> generation.ChatSession:
        """A multi-turn conversation that keeps its KV cache between turns."""
        return generation.ChatSession(self, system, template, **sampling)


def _nbytes(tensor: tvm.runtime.Tensor) -> int:
    """Bytes of a runtime tensor."""
    return int(np.prod(tensor.shape, dtype=np.int64)) * dtype_bytes(str(tensor.dtype))
