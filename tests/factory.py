"""Tiny random MPT checkpoints for the tests.

``hf_checkpoint`` makes an HF ``MptForCausalLM`` (the oracle for the options HF implements);
``raw_checkpoint`` writes a state dict + config.json by hand for options HF ignores.
Weights use a large std and unit-norm embedding rows so greedy decoding does not collapse
to one repeated token.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
import tvm
from safetensors.torch import save_file
from transformers import MptConfig, MptForCausalLM

import mpt_relax


def _randomize(state: dict[str, torch.Tensor], seed: int, std: float) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for name, t in state.items():
        if name.endswith("norm_1.weight") or name.endswith("norm_2.weight") or "norm_f" in name or "_ln." in name:
            out[name] = 1.0 + 0.1 * torch.randn(t.shape, generator=gen)
        elif name.endswith("wte.weight") or name.endswith("wpe.weight") or name == "lm_head.weight":
            rows = torch.randn(t.shape, generator=gen)
            out[name] = rows / rows.norm(dim=-1, keepdim=True) * 2.0
        else:
            out[name] = std * torch.randn(t.shape, generator=gen) / (t.shape[-1] ** 0.5) * 8
    return out


def hf_model(seed: int = 0, std: float = 0.3, **cfg) -> MptForCausalLM:
    """A random HF MPT model; ``cfg`` overrides MptConfig fields (attn_config merged)."""
    attn = {"attn_pdrop": 0, **cfg.pop("attn_config", {})}
    base = dict(d_model=64, n_heads=4, n_layers=2, vocab_size=256, max_seq_len=128)
    model = MptForCausalLM(MptConfig(**{**base, **cfg}, attn_config=attn)).eval()
    state = _randomize({k: v for k, v in model.state_dict().items() if k != "lm_head.weight"}, seed, std)
    model.load_state_dict(state, strict=False)
    model.tie_weights()
    return model


def hf_checkpoint(path: Path, seed: int = 0, dtype: torch.dtype = torch.float32, **cfg) -> MptForCausalLM:
    """Save a random HF MPT model to ``path`` in ``dtype``; returns the fp32 model."""
    model = hf_model(seed, **cfg)
    model.to(dtype).save_pretrained(path)
    return model.float()


def raw_checkpoint(path: Path, config: dict, seed: int = 0) -> dict[str, torch.Tensor]:
    """Write config.json + model.safetensors for the remote-code config ``config``; returns the
    fp32 state dict. Shapes follow docs/mpt.md for every option."""
    d, h, n_layers, vocab = config["d_model"], config["n_heads"], config["n_layers"], config["vocab_size"]
    attn = config.get("attn_config", {})
    hd = d // h
    kv = {"multiquery_attention": 1, "grouped_query_attention": attn.get("kv_n_heads", h)}.get(
        attn.get("attn_type", "multihead_attention"), h
    )
    ffn = (config.get("ffn_config") or {}).get("ffn_hidden_size") or int(d * config.get("expansion_ratio", 4))
    bias = not config.get("no_bias", True)
    shapes = {"transformer.wte.weight": (vocab, d), "transformer.norm_f.weight": (d,)}
    if not attn.get("alibi", True) and config.get("learned_pos_emb", True):
        shapes["transformer.wpe.weight"] = (config["max_seq_len"], d)
    if not config.get("tie_word_embeddings", True):
        shapes["lm_head.weight"] = (vocab, d)
    for i in range(n_layers):
        p = f"transformer.blocks.{i}."
        layer = {
            "norm_1.weight": (d,), "norm_2.weight": (d,),
            "attn.Wqkv.weight": (d + 2 * kv * hd, d), "attn.out_proj.weight": (d, d),
            "ffn.up_proj.weight": (ffn, d), "ffn.down_proj.weight": (d, ffn),
        }
        if bias:
            layer.update({"attn.Wqkv.bias": (d + 2 * kv * hd,), "attn.out_proj.bias": (d,),
                          "ffn.up_proj.bias": (ffn,), "ffn.down_proj.bias": (d,)})
        if attn.get("qk_ln"):
            layer.update({"attn.q_ln.weight": (d,), "attn.k_ln.weight": (kv * hd,)})
        shapes.update({p + k: v for k, v in layer.items()})
    state = _randomize({k: torch.empty(v) for k, v in shapes.items()}, seed, 0.3)
    for name in state:
        if name.endswith(".bias"):
            state[name] = 0.1 * torch.randn(state[name].shape, generator=torch.Generator().manual_seed(seed + 1))
    path.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in state.items()}, str(path / "model.safetensors"))
    (path / "config.json").write_text(json.dumps({"model_type": "mpt", "architectures": ["MPTForCausalLM"], **config}))
    return state


# ------------------------------------------------------------------ comparisons shared by the parity tests
def with_top_codes(packed: dict[str, np.ndarray], bits: int) -> dict[str, np.ndarray]:
    """``quantize_weight``'s output with the first code of every row set to the largest one a
    code can hold (15 / 255): our quantizer never writes it, a repacked GGUF Q4_0 / Q8_0 block does."""
    q_weight = packed["q_weight"].copy()
    q_weight[:, 0] |= np.uint32((1 << bits) - 1)
    return {**packed, "q_weight": q_weight}


def gemv_error(func, target, inputs: tuple, x: np.ndarray, w: np.ndarray, out_dtype: str) -> float:
    """Compile a GEMV PrimFunc for ``target``, run it on ``inputs`` (its arguments before y) and
    return the relative error of y against float64 ``x @ w^T``."""
    lib = tvm.compile(tvm.IRModule({"main": func.with_attr("global_symbol", "main")}), target=target)
    y = tvm.runtime.tensor(np.full((x.shape[0], w.shape[0]), np.nan, out_dtype))
    lib["main"](*(tvm.runtime.tensor(a) for a in inputs), y)
    return rel_err(y.numpy().astype(np.float64), x.astype(np.float64) @ w.astype(np.float64).T)


def callees(func) -> list[str]:
    """The PrimFuncs a Relax function calls through ``call_tir``, in order."""
    return [line.split("R.call_tir(")[1].split(",")[0] for line in func.script().splitlines() if "R.call_tir(" in line]


def prefill_then_decode(art, ids) -> tuple[np.ndarray, np.ndarray]:
    """A CPU Engine's logits on artifact ``art``: the prefill of ``ids[:-1]``, then the decode step of ``ids[-1]``."""
    eng = mpt_relax.Engine(art, device="cpu")
    seq = eng.add_sequence()
    return eng.forward([seq], [ids[:-1]]), eng.forward([seq], [ids[-1:]])


def bf16(a: np.ndarray) -> np.ndarray:
    """``a`` rounded to bfloat16 (nearest even), as float32."""
    return torch.from_numpy(np.ascontiguousarray(a, np.float32)).to(torch.bfloat16).float().numpy()


def rel_err(a: np.ndarray, ref: np.ndarray) -> float:
    return float(np.abs(a - ref).max() / np.abs(ref).max())


def hf_logits(model, ids) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor([list(ids)])).logits[0].float().numpy()


def hf_greedy(model, ids, steps: int) -> list[int]:
    with torch.no_grad():
        out = model.generate(torch.tensor([list(ids)]), max_new_tokens=steps, do_sample=False, min_new_tokens=steps,
                             pad_token_id=0, eos_token_id=None)
    return out[0, len(ids):].tolist()


def our_greedy(eng, ids, steps: int) -> list[int]:
    seq = eng.add_sequence()
    logits = eng.forward([seq], [list(ids)])[0]
    tokens = []
    for _ in range(steps):
        tokens.append(int(np.argmax(logits)))
        if len(tokens) < steps:
            logits = eng.forward([seq], [[tokens[-1]]])[0]
    eng.remove_sequence(seq)
    return tokens
