"""The MPT decoder as a ``tvm.relax.frontend.nn.Module``.

Module and parameter names follow the PyTorch checkpoint (``transformer.blocks.0.attn.Wqkv.weight``
...), so the weight map is a name-for-name match. One sequence at a time, no batch axis:
token ids are ``[n]`` int32, hidden states ``[n, d_model]``.

The KV cache is two stacked tensors, ``k_cache`` / ``v_cache`` of shape ``[L, T, KV, hd]``;
each entry point returns the grown cache.
"""

from __future__ import annotations

from tvm import te
from tvm.relax.frontend import nn
from tvm.relax.frontend.nn import op

from .attention import causal_attention
from .config import MPTConfig


def _norm(x: nn.Tensor, weight: nn.Parameter, bias: nn.Parameter | None, eps: float) -> nn.Tensor:
    """Low-precision LayerNorm: statistics in fp32, output rounded to the activation dtype."""
    dtype = x.dtype
    y = op.layer_norm(
        x.astype("float32"),
        normalized_shape=x.shape[-1],
        weight=weight.astype("float32"),
        bias=bias.astype("float32") if bias is not None else None,
        eps=eps,
    )
    return y.astype(dtype)


def _linear(in_features: int, out_features: int, bias: bool, dtype: str) -> nn.Linear:
    """A Linear layer that accumulates in fp32 (its output is fp32; callers round it to the
    model dtype). Relax's fp16 matmul would otherwise accumulate in fp16, which loses ~3%
    relative accuracy over a 16384-wide down_proj. A bias, if any, is stored in fp32."""
    return nn.Linear(in_features, out_features, bias=bias, dtype=dtype, out_dtype="float32")


class LPLayerNorm(nn.Module):
    """LayerNorm with weight only (MPT strips norm biases), eps from the config."""

    def __init__(self, dim: int, eps: float, dtype: str):
        self.weight = nn.Parameter((dim,), dtype)
        self.eps = eps

    def forward(self, x: nn.Tensor) -> nn.Tensor:
        return _norm(x, self.weight, None, self.eps)


class MPTAttention(nn.Module):
    """Fused-QKV attention: clip_qkv, optional qk LayerNorm, MHA/MQA/GQA, ALiBi."""

    def __init__(self, cfg: MPTConfig, dtype: str):
        self.cfg = cfg
        bias = not cfg.no_bias
        self.Wqkv = _linear(cfg.d_model, cfg.qkv_dim, bias, dtype)
        self.out_proj = _linear(cfg.d_model, cfg.d_model, bias, dtype)
        if cfg.qk_ln:
            self.q_ln = LPLayerNorm(cfg.d_model, cfg.layer_norm_epsilon, dtype)
            self.k_ln = LPLayerNorm(cfg.kv_n_heads * cfg.head_dim, cfg.layer_norm_epsilon, dtype)

    def forward(self, h: nn.Tensor, k_past: nn.Tensor | None, v_past: nn.Tensor | None):
        """h [n, d], k_past/v_past [t, KV, hd] or None -> (out [n, d], k [t+n, KV, hd], v [t+n, KV, hd])."""
        cfg = self.cfg
        n = h.shape[0]
        qkv = self.Wqkv(h).astype(h.dtype)
        if cfg.clip_qkv is not None:
            qkv = op.minimum(op.maximum(qkv, _scalar(-cfg.clip_qkv, qkv.dtype)), _scalar(cfg.clip_qkv, qkv.dtype))
        kv_dim = cfg.kv_n_heads * cfg.head_dim
        q, k, v = op.split(qkv, [cfg.d_model, cfg.d_model + kv_dim], axis=-1)
        if cfg.qk_ln:
            q, k = self.q_ln(q), self.k_ln(k)
        q = op.reshape(q, (n, cfg.n_heads, cfg.head_dim))
        k = op.reshape(k, (n, cfg.kv_n_heads, cfg.head_dim))
        v = op.reshape(v, (n, cfg.kv_n_heads, cfg.head_dim))
        if k_past is not None:
            k = op.concat([k_past, k], dim=0)
            v = op.concat([v_past, v], dim=0)
        out = causal_attention(cfg, q, k, v)
        return self.out_proj(op.reshape(out, (n, cfg.d_model))).astype(h.dtype), k, v


class MPTMLP(nn.Module):
    """up_proj -> exact-erf GELU -> down_proj."""

    def __init__(self, cfg: MPTConfig, dtype: str):
        bias = not cfg.no_bias
        self.up_proj = _linear(cfg.d_model, cfg.ffn_hidden_size, bias, dtype)
        self.down_proj = _linear(cfg.ffn_hidden_size, cfg.d_model, bias, dtype)

    def forward(self, x: nn.Tensor) -> nn.Tensor:
        act = op.gelu(self.up_proj(x), approximate="none").astype(x.dtype)  # up_proj is fp32 already
        return self.down_proj(act).astype(x.dtype)


class MPTBlock(nn.Module):
    """Pre-norm residual block: x + attn(norm_1(x)), then x + ffn(norm_2(x))."""

    def __init__(self, cfg: MPTConfig, dtype: str):
        self.norm_1 = LPLayerNorm(cfg.d_model, cfg.layer_norm_epsilon, dtype)
        self.attn = MPTAttention(cfg, dtype)
        self.norm_2 = LPLayerNorm(cfg.d_model, cfg.layer_norm_epsilon, dtype)
        self.ffn = MPTMLP(cfg, dtype)

    def forward(self, x: nn.Tensor, k_past: nn.Tensor | None, v_past: nn.Tensor | None):
        attn_out, k, v = self.attn(self.norm_1(x), k_past, v_past)
        x = x + attn_out
        x = x + self.ffn(self.norm_2(x))
        return x, k, v


class MPTTransformer(nn.Module):
    """Embedding (+ learned positions when ALiBi is off), the blocks and the final norm."""

    def __init__(self, cfg: MPTConfig, dtype: str):
        self.cfg = cfg
        self.wte = nn.Embedding(cfg.vocab_size, cfg.d_model, dtype=dtype)
        if cfg.uses_wpe:
            self.wpe = nn.Embedding(cfg.max_seq_len, cfg.d_model, dtype=dtype)
        self.blocks = nn.ModuleList([MPTBlock(cfg, dtype) for _ in range(cfg.n_layers)])
        self.norm_f = LPLayerNorm(cfg.d_model, cfg.layer_norm_epsilon, dtype)

    def forward(self, ids: nn.Tensor, k_cache: nn.Tensor | None, v_cache: nn.Tensor | None):
        """ids [n] -> (hidden [n, d], k_cache [L, t+n, KV, hd], v_cache [L, t+n, KV, hd])."""
        x = self.wte(ids)
        if self.cfg.uses_wpe:
            x = x + _position_rows(self.wpe.weight, ids, k_cache)
        k_layers = op.split(k_cache, self.cfg.n_layers, axis=0) if k_cache is not None else None
        v_layers = op.split(v_cache, self.cfg.n_layers, axis=0) if v_cache is not None else None
        ks, vs = [], []
        for i, block in enumerate(self.blocks):
            k_past = op.squeeze(k_layers[i], 0) if k_layers is not None else None
            v_past = op.squeeze(v_layers[i], 0) if v_layers is not None else None
            x, k, v = block(x, k_past, v_past)
            ks.append(op.unsqueeze(k, 0))
            vs.append(op.unsqueeze(v, 0))
        return self.norm_f(x), op.concat(ks, dim=0), op.concat(vs, dim=0)


class MPTForCausalLM(nn.Module):
    """The whole model with its entry points (exported by :func:`export_module`)."""

    def __init__(self, cfg: MPTConfig, dtype: str = "float32"):
        self.cfg = cfg
        self.dtype = dtype
        self.transformer = MPTTransformer(cfg, dtype)
        if not cfg.tie_word_embeddings:
            self.lm_head = _linear(cfg.d_model, cfg.vocab_size, False, dtype)

    def _logits(self, hidden: nn.Tensor) -> nn.Tensor:
        """hidden [m, d] -> fp32 logits [m, V] through the tied (or separate) head."""
        if self.cfg.tie_word_embeddings:
            logits = op.matmul(hidden, op.permute_dims(self.transformer.wte.weight), out_dtype="float32")
        else:
            logits = self.lm_head(hidden)
        scale = self.cfg.logit_multiplier
        return logits * _scalar(scale, "float32") if scale is not None else logits

    def prefill(self, ids: nn.Tensor):
        """ids [n] -> (last-token logits [1, V], k_cache, v_cache [L, n, KV, hd])."""
        hidden, k, v = self.transformer(ids, None, None)
        return self._logits(_last_row(hidden)), k, v

    def extend(self, ids: nn.Tensor, k_cache: nn.Tensor, v_cache: nn.Tensor):
        """ids [n] after t cached tokens -> (last-token logits [1, V], caches [L, t+n, KV, hd])."""
        hidden, k, v = self.transformer(ids, k_cache, v_cache)
        return self._logits(_last_row(hidden)), k, v

    def prefill_logits(self, ids: nn.Tensor):
        """ids [n] -> logits of every position [n, V] (fresh sequence, cache discarded)."""
        hidden, _, _ = self.transformer(ids, None, None)
        return self._logits(hidden)

    def export_spec(self) -> dict:
        """The ``export_tvm`` spec of the entry points: prefill, extend, decode, prefill_logits."""
        cfg = self.cfg
        cache = lambda t: nn.spec.Tensor([cfg.n_layers, t, cfg.kv_n_heads, cfg.head_dim], self.dtype)  # noqa: E731
        return {
            "prefill": {"ids": nn.spec.Tensor(["n"], "int32"), "$": {"param_mode": "packed", "effect_mode": "none"}},
            "extend": {
                "ids": nn.spec.Tensor(["n"], "int32"),
                "k_cache": cache("t"),
                "v_cache": cache("t"),
                "$": {"param_mode": "packed", "effect_mode": "none"},
            },
            "decode": {
                "ids": nn.spec.Tensor([1], "int32"),
                "k_cache": cache("t"),
                "v_cache": cache("t"),
                "$": {"param_mode": "packed", "effect_mode": "none"},
            },
            "prefill_logits": {
                "ids": nn.spec.Tensor(["n"], "int32"),
                "$": {"param_mode": "packed", "effect_mode": "none"},
            },
        }

    def decode(self, ids: nn.Tensor, k_cache: nn.Tensor, v_cache: nn.Tensor):
        """One token [1] after t cached tokens -> (logits [1, V], caches [L, t+1, KV, hd])."""
        return self.extend(ids, k_cache, v_cache)


def _scalar(value: float, dtype: str) -> nn.Tensor:
    return nn.Tensor.from_scalar(value, dtype)


def _last_row(x: nn.Tensor) -> nn.Tensor:
    """x [n, d] -> [1, d], the last row."""
    return op.tensor_expr_op(
        lambda t: te.compute((1, t.shape[1]), lambda _, j: t[t.shape[0] - 1, j], name="last_row"), "last_row", [x]
    )


def _position_rows(wpe: nn.Parameter, ids: nn.Tensor, k_cache: nn.Tensor | None) -> nn.Tensor:
    """Rows t .. t+n-1 of the learned position table [P, d] -> [n, d] (t = cached tokens)."""

    def compute(table: te.Tensor, tokens: te.Tensor, *cache: te.Tensor):
        offset = cache[0].shape[1] if cache else 0
        return te.compute((tokens.shape[0], table.shape[1]), lambda i, d: table[offset + i, d], name="wpe_rows")

    args = [wpe, ids] + ([k_cache] if k_cache is not None else [])
    return op.tensor_expr_op(compute, "position_rows", args)
