"""The demo models: the bundled trained tiny MPT, and a tiny random one for odd shapes.

``python -m mpt_relax demo`` builds the checkpoint in ``mpt_relax/data/tiny-mpt`` (4.2M
parameters, trained by ``scripts/train_tiny_mpt.py`` on Python standard-library modules and
licence texts) into ``dist/tiny-mpt-q0f32`` once, then generates from a prompt: the output
reads like Python code and licence text, which is all it has seen.

The random model (``write_checkpoint``) is made deterministically in code:
tests use it where they need shapes the trained model lacks. ``train_tokenizer`` /
``write_tokenizer`` also serve the tests.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import numpy as np
from safetensors.numpy import save_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from mpt_relax.compile.builder import build

TRAINED_MODEL = Path(__file__).resolve().parent.parent / "data" / "tiny-mpt"  # package data
TRAINED_DESCRIPTION = "a 4.2M-parameter MPT trained on Python standard-library sources and licence texts"
SPECIAL_TOKENS = ("<|endoftext|>", "<|padding|>")  # ids 0 and 1, as in GPT-NeoX
CHAT_TOKENS = ("<|im_start|>", "<|im_end|>")  # added after training, as the chat fine-tunes do
DEMO_CONFIG = dict(d_model=64, n_heads=4, n_layers=2, vocab_size=384, max_seq_len=256, expansion_ratio=4)
CORPUS = (
    "MPT is a decoder-only transformer with ALiBi attention and no position embeddings. "
    "The compiler lowers the model to TVM Relax, schedules every kernel and exports one library. "
    "Le café crème coûte trois euros à Montréal; l'été dernier, à Genève, il était déjà plus cher. "
    "日本語のテキストも少し含めます。東京と大阪は日本の大都市です。 "
    "Emoji survive byte-level BPE too: 🚀 launches, 🌍 spins, 🍰 tastes sweet, 👍 approves. "
    "Once upon a time a small model learned to count: one, two, three, four, five, six, seven. "
)


def train_tokenizer(corpus: Sequence[str], vocab_size: int) -> Tokenizer:
    """A byte-level BPE tokenizer in the GPT-NeoX layout: ``<|endoftext|>`` = 0, ``<|padding|>``
    = 1, then the 256 byte tokens and merges, then ``<|im_start|>``, ``<|im_end|>`` (special).
    At most ``vocab_size`` ids in all."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size - len(CHAT_TOKENS),
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus, trainer)
    tok.add_special_tokens(list(CHAT_TOKENS))
    return tok


def write_tokenizer(tok: Tokenizer, out_dir: Path, max_length: int) -> None:
    """``tokenizer.json`` + ``tokenizer_config.json`` into a checkpoint directory."""
    tok.save(str(out_dir / "tokenizer.json"))
    (out_dir / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": SPECIAL_TOKENS[0], "eos_token": SPECIAL_TOKENS[0], "unk_token": SPECIAL_TOKENS[0],
        "pad_token": SPECIAL_TOKENS[1], "model_max_length": max_length, "add_prefix_space": False,
    }, indent=2))


def random_weights(cfg: dict, seed: int = 0) -> dict[str, np.ndarray]:
    """float32 MPT weights under the checkpoint names. Norm weights near 1, unit-norm (x2)
    embedding rows and linear weights with std 2.4/sqrt(fan_in), so that greedy output varies."""
    rng = np.random.default_rng(seed)
    d, v = cfg["d_model"], cfg["vocab_size"]
    f = int(d * cfg["expansion_ratio"])
    wte = rng.standard_normal((v, d))
    weights = {"transformer.wte.weight": 2 * wte / np.linalg.norm(wte, axis=1, keepdims=True)}
    for i in range(cfg["n_layers"]):
        p = f"transformer.blocks.{i}."
        for name, shape in (("attn.Wqkv.weight", (3 * d, d)), ("attn.out_proj.weight", (d, d)),
                            ("ffn.up_proj.weight", (f, d)), ("ffn.down_proj.weight", (d, f))):
            weights[p + name] = 2.4 * rng.standard_normal(shape) / np.sqrt(shape[1])
        for name in ("norm_1.weight", "norm_2.weight"):
            weights[p + name] = 1 + 0.1 * rng.standard_normal(d)
    weights["transformer.norm_f.weight"] = 1 + 0.1 * rng.standard_normal(d)
    return {k: w.astype(np.float32) for k, w in weights.items()}


def write_checkpoint(out_dir: str | Path, cfg: dict = DEMO_CONFIG, seed: int = 0) -> Path:
    """An HF-layout checkpoint (config.json, model.safetensors, tokenizer) of random weights."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "config.json").write_text(json.dumps({
        "model_type": "mpt", "architectures": ["MPTForCausalLM"], **cfg, "no_bias": True,
        "attn_config": {"alibi": True, "alibi_bias_max": 8, "attn_type": "multihead_attention"},
    }, indent=2))
    save_file(random_weights(cfg, seed), str(out_dir / "model.safetensors"))
    write_tokenizer(train_tokenizer([CORPUS] * 4, cfg["vocab_size"]), out_dir, cfg["max_seq_len"])
    return out_dir


def ensure_trained(dist_root: str | Path = "dist", quantization: str = "q0f32", quiet: bool = False) -> Path:
    """``<dist_root>/tiny-mpt-<quantization>``: the bundled trained model built for the CPU
    (a no-op when the artifact is up to date)."""
    out = Path(dist_root) / f"{TRAINED_MODEL.name}-{quantization}"
    return build(TRAINED_MODEL, target="llvm", quantization=quantization, output=out, quiet=quiet)
