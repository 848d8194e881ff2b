"""A ``tokenizers`` tokenizer rebuilt from a GGUF file's vocabulary (``tokenizer.ggml.*``).

MPT uses GPT-NeoX-20B's byte-level BPE: NFC normalization, the GPT-2 byte-level pre-tokenizer
(no prefix space), BPE over the byte-level token strings with the file's merge list, and the
byte-level decoder. GGUF stores the token strings as BPE sees them (``Ġthe``) and a type per
token (llama.cpp's TokenType): control tokens (``<|endoftext|>``, ``<|im_end|>``) become
special added tokens, user-defined ones plain added tokens; unused (padding) entries stay
ordinary vocabulary that no merge produces.
"""

from __future__ import annotations

from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

_CONTROL, _USER_DEFINED = 3, 4  # llama.cpp TokenType values
_ROLES = {"bos": "bos_token", "eos": "eos_token", "unknown": "unk_token", "padding": "pad_token"}


def tokenizer_from_vocab(tokens: list[str], merges: list[str], types: list[int]) -> Tokenizer:
    """tokens [V] (id order), merges ["a b", ...] (rank order), types [V] or [] -> the tokenizer."""
    vocab = {token: i for i, token in enumerate(tokens)}
    pairs = [tuple(m.split(" ", 1)) for m in merges]
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=pairs, fuse_unk=False))
    tokenizer.normalizer = normalizers.NFC()
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    added = [(tokens[i], kind == _CONTROL) for i, kind in enumerate(types) if kind in (_CONTROL, _USER_DEFINED)]
    tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False) for t, special in added if special])
    tokenizer.add_tokens([AddedToken(t, special=False, normalized=False) for t, special in added if not special])
    return tokenizer


def special_tokens(tokens: list[str], ids: dict[str, int | None]) -> dict[str, str]:
    """HF's ``special_tokens_map.json`` content from the bos / eos / unknown / padding ids in range."""
    return {_ROLES[role]: tokens[i] for role, i in ids.items()
            if isinstance(i, int) and not isinstance(i, bool) and 0 <= i < len(tokens)}
