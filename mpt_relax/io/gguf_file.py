"""Read an MPT stored as one GGUF file (llama.cpp's format): metadata, tokenizer and tensors.

The ``gguf`` package's ``GGUFReader`` parses the file through a read-only memory map; this
module checks what a build relies on and turns every problem into one :class:`GGUFError` line
(a file that is not GGUF, another version, a truncated or inconsistent header, tensor data past
the end or off the alignment, an architecture other than ``mpt``), never a crash or a read past
the end.

Shapes: GGUF lists a tensor's dimensions innermost first (``ne[0]`` is the row length); a
:class:`GGUFTensor` has them in numpy order, so ``blk.0.attn_qkv.weight`` is [3 * d, d] like
HF's ``Wqkv.weight``. Its ``raw`` array is the data as stored: float32 / float16 [shape] for
F32 / F16, and for every block type (BF16 included) uint8 [rows, row bytes] holding the
blocks of each row back to back.

Config (:meth:`GGUFFile.config`) comes from the ``mpt.*`` keys: context_length,
embedding_length, block_count, feed_forward_length, attention.head_count(_kv),
attention.max_alibi_bias, attention.clamp_kqv and attention.layer_norm_epsilon; the vocabulary
size, an untied head (``output.weight``), biases, qk LayerNorm and learned positions are read
off the tensors that are present.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import numpy as np

from mpt_relax.io.checkpoint import CheckpointError
from mpt_relax.models.mpt.config import ConfigError, MPTConfig

MAGIC = b"GGUF"
VERSIONS = (2, 3)
_HEADER_BYTES = 24  # magic, version, tensor count, metadata count
_ARCH = "mpt"
# MPTConfig field <- mpt.* key (and whether it must be an integer)
_CONFIG_KEYS = {
    "max_seq_len": ("context_length", True),
    "d_model": ("embedding_length", True),
    "n_layers": ("block_count", True),
    "ffn_hidden_size": ("feed_forward_length", True),
    "n_heads": ("attention.head_count", True),
    "kv_n_heads": ("attention.head_count_kv", True),
    "alibi_bias_max": ("attention.max_alibi_bias", False),
    "clip_qkv": ("attention.clamp_kqv", False),
    "layer_norm_epsilon": ("attention.layer_norm_epsilon", False),
}
_REQUIRED = ("d_model", "n_layers", "n_heads")


class GGUFError(CheckpointError):
    """A GGUF file that cannot be read or does not hold an MPT; the message says what to do."""


@dataclasses.dataclass(frozen=True)
class GGUFTensor:
    """One tensor of the file: its GGML type name (``Q4_K``, ``F16``, ...), numpy-order shape
    and the stored data (see the module docstring)."""

    name: str
    type_name: str
    shape: tuple[int, ...]
    raw: np.ndarray

    def floats(self) -> np.ndarray:
        """The values as a new, writable float32 array [shape] (``gguf.quants.dequantize``)."""
        from gguf import GGMLQuantizationType
        from gguf.quants import dequantize

        try:
            values = dequantize(self.raw, GGMLQuantizationType[self.type_name])
        except NotImplementedError:
            raise GGUFError(f"tensor {self.name} has GGML type {self.type_name}, which cannot be dequantized; "
                            "re-convert the model with a supported type") from None
        return np.array(values, np.float32).reshape(self.shape)  # a copy: F32 data would be the read-only map itself


class GGUFFile:
    """A checked GGUF file: ``fields`` (metadata key -> value), ``tensors`` (name -> GGUFTensor)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        reader = _open_reader(self.path)
        self.alignment = int(reader.alignment)
        try:
            self.fields = {name: f.contents() for name, f in reader.fields.items() if not name.startswith("GGUF.")}
        except (ValueError, IndexError, UnicodeDecodeError) as err:
            raise self._error(f"has unreadable metadata ({type(err).__name__}: {err})") from None
        self.tensors = {t.name: self._tensor(t, reader) for t in reader.tensors}

    def _error(self, what: str) -> GGUFError:
        return GGUFError(f"GGUF file {self.path} {what}")

    def _tensor(self, t, reader) -> GGUFTensor:
        size = self.path.stat().st_size
        start, nbytes = int(t.data_offset), int(t.n_bytes)
        if (start - reader.data_offset) % self.alignment:
            raise self._error(f"is corrupt: tensor {t.name} starts at byte {start}, off the {self.alignment}-byte "
                             "alignment; re-convert it")
        if start + nbytes > size or t.data.nbytes != nbytes:
            raise self._error(f"is truncated: tensor {t.name} needs bytes {start}..{start + nbytes} of {size}; "
                             "re-download or re-convert it")
        shape = tuple(int(n) for n in reversed(t.shape.tolist()))
        return GGUFTensor(t.name, t.tensor_type.name, shape, t.data)

    # ------------------------------------------------------------------ config
    def config(self) -> MPTConfig:
        """The MPTConfig the metadata and the tensor list describe; GGUFError naming the key otherwise."""
        arch = self.fields.get("general.architecture")
        if arch != _ARCH:
            raise self._error(f"holds architecture {arch!r}, not {_ARCH!r}; only MPT models can be built")
        kwargs: dict[str, Any] = {}
        for field, (key, integer) in _CONFIG_KEYS.items():
            key = f"{_ARCH}.{key}"
            if key not in self.fields:
                if field in _REQUIRED:
                    raise self._error(f"lacks the metadata key {key}; re-convert it with llama.cpp's converter")
                continue
            value = self.fields[key]
            if isinstance(value, bool) or not isinstance(value, int if integer else (int, float)):
                raise self._error(f"has {key} = {value!r}, not {'an integer' if integer else 'a number'}")
            kwargs[field] = value if integer else float(str(np.float32(value)))  # 1e-5, not float32's 9.99999974e-06
        embd = self.tensors.get("token_embd.weight")
        if embd is None or len(embd.shape) != 2:
            raise self._error("has no 2-D token_embd.weight tensor; it is not a complete MPT")
        kwargs["vocab_size"] = embd.shape[0]
        kwargs["tie_word_embeddings"] = "output.weight" not in self.tensors
        kwargs["no_bias"] = "blk.0.attn_qkv.bias" not in self.tensors
        kwargs["qk_ln"] = "blk.0.attn_q_norm.weight" in self.tensors
        kwargs["alibi"] = "position_embd.weight" not in self.tensors
        if kwargs.get("clip_qkv") == 0.0:
            kwargs["clip_qkv"] = None  # llama.cpp writes 0 for "no clamp"
        try:
            return MPTConfig(**kwargs)
        except ConfigError as err:
            raise self._error(f"has metadata that cannot describe an MPT: {err}") from None

    @property
    def name(self) -> str:
        """``general.name`` if the file has one, else the file name without ``.gguf``."""
        name = self.fields.get("general.name")
        return name if isinstance(name, str) and name.strip() else self.path.stem

    # ------------------------------------------------------------------ tokenizer
    def write_tokenizer(self, out_dir: Path) -> list[str]:
        """Write ``tokenizer.json`` (+ ``special_tokens_map.json``) made from the file's
        ``tokenizer.ggml.*`` keys into ``out_dir``; returns the file names ([] without a vocabulary)."""
        from mpt_relax.io.gguf_tokenizer import special_tokens, tokenizer_from_vocab

        tokens = self.fields.get("tokenizer.ggml.tokens")
        if tokens is None:
            return []
        model = self.fields.get("tokenizer.ggml.model")
        if model != "gpt2":
            raise self._error(f"has tokenizer model {model!r}; only byte-level BPE ('gpt2', as MPT uses) is supported")
        merges = self.fields.get("tokenizer.ggml.merges", [])
        types = self.fields.get("tokenizer.ggml.token_type", [])
        if not (_strings(tokens) and _strings(merges) and isinstance(types, list) and len(types) in (0, len(tokens))):
            raise self._error("has malformed tokenizer.ggml.tokens / merges / token_type lists; re-convert it")
        try:
            tokenizer = tokenizer_from_vocab(tokens, merges, types)
        except Exception as err:  # noqa: BLE001 - the tokenizers library raises bare Exceptions
            raise self._error(f"has a vocabulary the tokenizers library refuses ({str(err).splitlines()[0]})") from None
        tokenizer.save(str(out_dir / "tokenizer.json"))
        ids = {role: self.fields.get(f"tokenizer.ggml.{role}_token_id") for role in ("bos", "eos", "unknown", "padding")}
        specials = special_tokens(tokens, ids)
        (out_dir / "special_tokens_map.json").write_text(json.dumps(specials, indent=2))
        return ["tokenizer.json", "special_tokens_map.json"]


def _strings(values: Any) -> bool:
    return isinstance(values, list) and all(isinstance(v, str) for v in values)


def _open_reader(path: Path):
    """GGUFReader over ``path`` after checking size, magic and version; one GGUFError for anything it raises."""
    from gguf import GGUFReader

    if not path.is_file():
        raise GGUFError(f"GGUF file {path} does not exist")
    size = path.stat().st_size
    with open(path, "rb") as handle:
        head = handle.read(_HEADER_BYTES)
    if len(head) < 8 or head[:4] != MAGIC:
        raise GGUFError(f"{path} is not a GGUF file (it starts with {head[:4]!r}, not {MAGIC!r})")
    version = int.from_bytes(head[4:8], "little")
    if version not in VERSIONS:
        raise GGUFError(f"{path} is GGUF version {version}; supported: {', '.join(map(str, VERSIONS))}")
    if size < _HEADER_BYTES:
        raise GGUFError(f"GGUF file {path} is truncated ({size} bytes, shorter than its header); re-download it")
    try:
        return GGUFReader(path, "r")
    except Exception as err:  # noqa: BLE001 - the reader raises ValueError, IndexError, KeyError, ... on bad files
        reason = (str(err).splitlines() or [""])[0]
        raise GGUFError(f"GGUF file {path} ({size} bytes) is truncated or corrupt ({type(err).__name__}: {reason}); "
                        "re-download or re-convert it") from None
