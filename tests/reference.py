"""An independent MPT forward pass in torch (float64), written from docs/mpt.md.

It reads the raw remote-code config dict (not ``mpt_relax.MPTConfig``) so that a parsing
mistake in the library cannot hide in the oracle. Used for the options HF ignores.
"""

from __future__ import annotations

import math

import torch


def alibi_slopes(n_heads: int, bias_max: float) -> torch.Tensor:
    n = 2 ** math.ceil(math.log2(n_heads))
    m = torch.arange(1, n + 1, dtype=torch.float64) * bias_max / n
    s = 2.0 ** -m
    if n != n_heads:
        s = torch.cat([s[1::2], s[0::2]])[:n_heads]
    return s


def _ln(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    mu = x.mean(-1, keepdim=True)
    var = ((x - mu) ** 2).mean(-1, keepdim=True)
    return (x - mu) / torch.sqrt(var + eps) * w


def _linear(x, state, name):
    y = x @ state[name + ".weight"].T
    return y + state[name + ".bias"] if name + ".bias" in state else y


def logits(config: dict, state: dict[str, torch.Tensor], ids: list[int]) -> torch.Tensor:
    """float64 logits [len(ids), vocab] of a fresh sequence."""
    st = {k: v.to(torch.float64) for k, v in state.items()}
    attn = config.get("attn_config", {})
    d, h = config["d_model"], config["n_heads"]
    hd = d // h
    kv = {"multiquery_attention": 1, "grouped_query_attention": attn.get("kv_n_heads", h)}.get(
        attn.get("attn_type", "multihead_attention"), h
    )
    eps = config.get("layer_norm_epsilon", 1e-5)
    n = len(ids)
    x = st["transformer.wte.weight"][torch.tensor(ids)]
    alibi = attn.get("alibi", True)
    if not alibi and config.get("learned_pos_emb", True):
        x = x + st["transformer.wpe.weight"][:n]
    pos = torch.arange(n, dtype=torch.float64)
    dist = pos[None, :] - pos[:, None]  # j - i
    bias = alibi_slopes(h, attn.get("alibi_bias_max", 8))[:, None, None] * dist if alibi else torch.zeros(1, n, n)
    mask = torch.triu(torch.ones(n, n, dtype=torch.bool), 1)
    scale = attn.get("softmax_scale") or 1 / math.sqrt(hd)
    for i in range(config["n_layers"]):
        p = f"transformer.blocks.{i}."
        a = _ln(x, st[p + "norm_1.weight"], eps)
        qkv = _linear(a, st, p + "attn.Wqkv")
        if attn.get("clip_qkv"):
            qkv = qkv.clamp(-attn["clip_qkv"], attn["clip_qkv"])
        q, k, v = qkv.split([d, kv * hd, kv * hd], dim=-1)
        if attn.get("qk_ln"):
            q, k = _ln(q, st[p + "attn.q_ln.weight"], eps), _ln(k, st[p + "attn.k_ln.weight"], eps)
        q = q.view(n, h, hd).transpose(0, 1)
        k = k.view(n, kv, hd).transpose(0, 1).repeat_interleave(h // kv, dim=0)
        v = v.view(n, kv, hd).transpose(0, 1).repeat_interleave(h // kv, dim=0)
        s = q @ k.transpose(1, 2) * scale + bias
        s = s.masked_fill(mask, float("-inf"))
        o = (torch.softmax(s, -1) @ v).transpose(0, 1).reshape(n, d)
        x = x + _linear(o, st, p + "attn.out_proj")
        f = _ln(x, st[p + "norm_2.weight"], eps)
        up = _linear(f, st, p + "ffn.up_proj")
        x = x + _linear(torch.nn.functional.gelu(up, approximate="none"), st, p + "ffn.down_proj")
    x = _ln(x, st["transformer.norm_f.weight"], eps)
    head = st["lm_head.weight"] if "lm_head.weight" in st else st["transformer.wte.weight"]
    out = x @ head.T
    ls = config.get("logit_scale")
    if ls is not None:
        out = out * (1 / math.sqrt(d) if ls == "inv_sqrt_d_model" else ls)
    return out
