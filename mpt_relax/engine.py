"""Runtime: load a built artifact and run its entry points.

``Engine(artifact_dir, device)`` loads the library compiled for the device, the weights,
``mpt-config.json`` and the tokenizer. This module holds the model-facing calls (prefill /
decode over the KV cache, full-sequence logits); text generation on top of the sequence
calls lives in :mod:`.generation`, and the Engine methods at the end delegate to it.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import tvm
from tvm import relax

from . import artifact, generation
from .config import MPTConfig
from .tokenizer import load_tokenizer

DEVICE_TARGETS = {"cpu": "llvm", "cuda": "cuda", "metal": "metal", "vulkan": "vulkan"}
AUTO_ORDER = ("cuda", "metal")  # device="auto": the first present that the artifact was built for, else cpu


class EngineError(ValueError):
    """Bad input to the engine (token ids, lengths, device); the message says what to do."""


def _tvm_device(device: str) -> tvm.runtime.Device:
    dev = tvm.runtime.device(device, 0)
    if not dev.exist:
        raise EngineError(f"device {device!r} is not available on this machine; use device='cpu'")
    return dev


def auto_device(libraries: dict[str, str]) -> str:
    """The device for ``device="auto"``: cuda, else metal, if present here and built; else cpu."""
    for device in AUTO_ORDER:
        if DEVICE_TARGETS[device] in libraries and tvm.runtime.device(device, 0).exist:
            return device
    return "cpu"


class Engine:
    """A loaded artifact: ``Engine(dist/mpt-7b-instruct-q4f16_1, device="cuda")``."""

    def __init__(self, artifact_dir: str | Path, device: str = "auto"):
        self.path = Path(artifact_dir)
        self.meta = artifact.read_config(self.path)
        self.config = MPTConfig.from_dict(self.meta["model_config"])
        self.tokenizer = load_tokenizer(self.path)  # None: token-id prompts only
        if device == "auto":
            device = auto_device(self.meta["libraries"])
        if device not in DEVICE_TARGETS:
            raise EngineError(f"unknown device {device!r}; choose one of: auto, {', '.join(DEVICE_TARGETS)}")
        target = DEVICE_TARGETS[device]
        lib = self.meta["libraries"].get(target)
        if lib is None:
            raise EngineError(
                f"{self.path} has no library for device {device!r} (built: {', '.join(self.meta['libraries'])}); "
                f"rebuild with --target {target}"
            )
        if not self.meta.get("has_weights"):
            raise EngineError(f"{self.path} was built without weights; rebuild it from a checkpoint directory")
        self.device = _tvm_device(device)
        self.vm = relax.VirtualMachine(tvm.runtime.load_module(str(self.path / lib)), self.device)
        self.params = self._load_params()
        self._caches: dict[int, tuple | None] = {}
        self._next_seq = 0

    def _load_params(self) -> list[tvm.runtime.Tensor]:
        arrays = dict(artifact.read_params(self.path))
        names = self.meta["param_names"]
        missing = [n for n in names if n not in arrays]
        if missing:
            raise artifact.ArtifactError(f"{self.path} lacks weights {missing[:3]}...; rebuild with --force")
        return [tvm.runtime.tensor(np.ascontiguousarray(arrays[n]), self.device) for n in names]

    @property
    def vocab_size(self) -> int:
        return self.config.vocab_size

    @property
    def context_window(self) -> int:
        return int(self.meta["context_window_size"])

    def check_tokens(self, token_ids, extra: int = 0) -> np.ndarray:
        """Token ids as int32 [n]; errors for empty input, ids outside the vocabulary, or a
        sequence (plus ``extra`` tokens to come) longer than the context window."""
        ids = np.asarray(token_ids, dtype=np.int64).reshape(-1)
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

    def _tensor(self, array: np.ndarray) -> tvm.runtime.Tensor:
        return tvm.runtime.tensor(array, self.device)

    def logits(self, token_ids) -> np.ndarray:
        """One fresh prefill: float32 logits [len(token_ids), vocab] for every position."""
        ids = self.check_tokens(token_ids)
        return self.vm["prefill_logits"](self._tensor(ids), self.params).numpy()

    # ------------------------------------------------------------ sequences (the KV-cache contract)
    def add_sequence(self) -> int:
        """Start an empty sequence; returns its id."""
        seq_id = self._next_seq
        self._next_seq += 1
        self._caches[seq_id] = None
        return seq_id

    def remove_sequence(self, seq_id: int) -> None:
        """Drop a sequence and free its cache."""
        self._cache_of(seq_id)
        del self._caches[seq_id]

    def sequence_length(self, seq_id: int) -> int:
        """Tokens cached for ``seq_id``."""
        cache = self._cache_of(seq_id)
        return 0 if cache is None else int(cache[0].shape[1])

    def forward(self, seq_ids: list[int], tokens: list[list[int]]) -> np.ndarray:
        """Append ``tokens[b]`` to sequence ``seq_ids[b]`` for every b; returns the float32 logits
        after each sequence's last new token, [len(seq_ids), vocab]."""
        if len(seq_ids) != len(tokens) or len(set(seq_ids)) != len(seq_ids):
            raise EngineError("forward needs one token list per distinct sequence id")
        rows = []
        for seq_id, toks in zip(seq_ids, tokens):
            cache = self._cache_of(seq_id)
            ids = self._tensor(self.check_tokens(toks, extra=self.sequence_length(seq_id)))
            if cache is None:
                logits, k, v = self.vm["prefill"](ids, self.params)
            else:
                fn = "decode" if len(toks) == 1 else "extend"
                logits, k, v = self.vm[fn](ids, cache[0], cache[1], self.params)
            self._caches[seq_id] = (k, v)
            rows.append(logits.numpy()[0])
        return np.stack(rows)

    def _cache_of(self, seq_id: int):
        if seq_id not in self._caches:
            raise EngineError(f"unknown sequence id {seq_id}; call add_sequence() first")
        return self._caches[seq_id]

    # ------------------------------------------------------------ text generation (generation.py)
    def generate(self, prompt, *, template: str | None = None, **sampling):
        """Reply to a string, token ids, or a list of either (a batch -> list of results).

        ``sampling``: max_new_tokens=128, temperature=0.0, top_k=0, top_p=1.0,
        repetition_penalty=1.0, stop=None, seed=None, ignore_eos=False (see
        :class:`generation.SamplingParams`); ``template``: "dolly" | "chatml" | "none",
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
