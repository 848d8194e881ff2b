"""The bundled trained model (mpt_relax/data/tiny-mpt): what scripts/train_tiny_mpt.py writes, and it loads."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
from safetensors import safe_open

import mpt_relax

TRAINED = Path(mpt_relax.__file__).resolve().parent / "data" / "tiny-mpt"
SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "train_tiny_mpt.py"
FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "training.json",
         "train_log.txt")


@pytest.fixture(scope="module")
def script():
    spec = importlib.util.spec_from_file_location("train_tiny_mpt", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_files_and_size():
    assert sorted(p.name for p in TRAINED.iterdir()) == sorted(FILES)
    assert sum(p.stat().st_size for p in TRAINED.iterdir()) < 16e6


def test_config_is_what_the_script_writes(script, tmp_path):
    defaults = script.parser().parse_args([])
    record = json.loads((TRAINED / "training.json").read_text())
    assert record["settings"] == script.recorded_settings(defaults)
    script.mpt_config(defaults).save_pretrained(tmp_path)
    expected = json.loads((tmp_path / "config.json").read_text())
    committed = json.loads((TRAINED / "config.json").read_text())
    ignore = {"transformers_version", "dtype", "architectures"}
    assert {k: v for k, v in committed.items() if k not in ignore} == {
        k: v for k, v in expected.items() if k not in ignore}
    assert committed["dtype"] == "float16"
    heldout = record["heldout"]
    assert heldout["context"] == committed["max_seq_len"] and 1 < heldout["perplexity_fp16"] < committed["vocab_size"] / 10


def test_hf_and_mpt_relax_load_it():
    from tokenizers import Tokenizer
    from transformers import MptForCausalLM

    with safe_open(str(TRAINED / "model.safetensors"), "np") as f:
        assert {str(f.get_tensor(k).dtype) for k in f.keys()} == {"float16"}
        assert "transformer.wte.weight" in f.keys() and "lm_head.weight" not in f.keys()  # tied
    model, info = MptForCausalLM.from_pretrained(str(TRAINED), output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    cfg = mpt_relax.resolve_model(TRAINED).config
    assert (cfg.alibi, cfg.no_bias, cfg.max_seq_len) == (True, True, 512)
    assert cfg.num_parameters() == sum(p.numel() for p in model.parameters())
    tok = Tokenizer.from_file(str(TRAINED / "tokenizer.json"))
    assert tok.token_to_id("<|endoftext|>") == 0 and tok.token_to_id("<|padding|>") == 1
    assert tok.get_vocab_size() == cfg.vocab_size
    text = 'def f(x):\n    """Return x."""\n    return x  # © 2024\n'
    assert tok.decode(tok.encode(text).ids) == text  # byte-level: lossless


def test_corpus_selection_is_deterministic(script):
    files = script.corpus_files()
    again = script.corpus_files()
    assert files == again and files["heldout"] and not set(files["heldout"]) & set(files["train"])
    names = [p.name for p in files["train"] + files["heldout"]]
    assert "this.py" not in names and not any(n.startswith("_sysconfigdata") for n in names)
