"""The MPT decoder as a ``tvm.relax.frontend.nn.Module``.

Module and parameter names follow the PyTorch checkpoint (``transformer.blocks.0.attn.Wqkv.weight``
...), so the weight map is a name-for-name match. There is no batch axis: a forward takes the
new tokens of every sequence in the batch concatenated, token ids ``[n]`` int32, hidden states
``[n, d_model]``.

Attention reads and extends the ALiBi paged KV cache (:mod:`mpt_relax.compile.kv_cache`) on every
target. The engine creates the cache once (``create_paged_kv_cache``), declares before each
call which sequences the ``n`` tokens extend and by how many (``begin_forward``), and the
cache routes each token's attention to its own sequence's keys. Entry points
(:meth:`MPTForCausalLM.export_spec`):

    create_paged_kv_cache(max_batch_size, max_total_seq_len, prefill_chunk_size) -> cache
    prefill(ids [n], logit_positions [b], cache) -> fp32 logits [b, V] at rows logit_positions of the n tokens
    batch_decode(ids [b], cache) -> fp32 logits [b, V], one new token for each of b sequences

The attention kernels differ between the CPU and GPUs and bake in ``page_size``, so the model
is built for one target and one page size.
"""

from __future__ import annotations

import tvm
from tvm import relax, te, tirx
from tvm.relax.frontend import nn
from tvm.relax.frontend.nn import op

from mpt_relax.models.mpt.config import MPTConfig
from mpt_relax.compile.kv_cache import ALiBiPagedKVCache
from mpt_relax.quantization.base import decoding

def _norm(x: nn.Tensor, weight: nn.Parameter, eps: float) -> nn.Tensor:
    """Low-precision LayerNorm of x [n, d] (no bias): statistics in fp32, output rounded to
    x's dtype. One kernel, the fp32 casts of x and the weight included (Relax's layer_norm on
    an fp32 cast of x would cost two extra kernels per norm)."""

    def compute(x: te.Tensor, w: te.Tensor) -> te.Tensor:
        n, d = x.shape
        k1, k2 = te.reduce_axis((0, d), "k1"), te.reduce_axis((0, d), "k2")
        total = te.compute((n,), lambda i: te.sum(x[i, k1].astype("float32"), axis=k1), name="norm_sum")

        def centred(i, j):
            return x[i, j].astype("float32") - total[i] / d

        squares = te.compute((n,), lambda i: te.sum(centred(i, k2) * centred(i, k2), axis=k2), name="norm_sq_sum")
        inv_std = te.compute((n,), lambda i: tirx.rsqrt(squares[i] / d + tirx.const(eps, "float32")), name="norm_inv_std")
        return te.compute(
            (n, d), lambda i, j: (centred(i, j) * inv_std[i] * w[j].astype("float32")).astype(x.dtype), name="lp_layer_norm"
        )

    return op.tensor_expr_op(compute, "lp_layer_norm", [x, weight])


def _linear(in_features: int, out_features: int, bias: bool, dtype: str) -> nn.Linear:
    """A Linear layer that accumulates in fp32 (its output is fp32; callers round it to the
    model dtype). Relax's fp16 matmul would otherwise accumulate in fp16, which loses ~3%
    relative accuracy over a 16384-wide down_proj. A bias, if any, is stored in fp32."""
    return nn.Linear(in_features, out_features, bias=bias, dtype=dtype, out_dtype="float32")


class Embedding(nn.Embedding):
    """A table [num, dim]: ``forward(ids)`` looks rows up (ids clipped to range), :meth:`head` is
    the tied LM head. ``GroupQuantization.quantize_model`` swaps it for a GroupQuantEmbedding, which has the same two."""

    def forward(self, ids: nn.Tensor) -> nn.Tensor:
        """ids [n] -> rows [n, dim]."""
        return _take_rows(self.weight, ids)

    def head(self, x: nn.Tensor) -> nn.Tensor:
        """x [m, dim] -> fp32 logits [m, num]."""
        return op.matmul(x, op.permute_dims(self.weight), out_dtype="float32")


class LPLayerNorm(nn.Module):
    """LayerNorm with weight only (MPT strips norm biases), eps from the config."""

    def __init__(self, dim: int, eps: float, dtype: str):
        self.weight = nn.Parameter((dim,), dtype)
        self.eps = eps

    def forward(self, x: nn.Tensor) -> nn.Tensor:
        return _norm(x, self.weight, self.eps)


class MPTAttention(nn.Module):
    """Fused-QKV attention of layer ``layer_id``: clip_qkv, optional qk LayerNorm, MHA/MQA/GQA,
    ALiBi over the paged KV cache."""

    def __init__(self, cfg: MPTConfig, dtype: str, layer_id: int):
        self.cfg = cfg
        self.layer_id = layer_id
        bias = not cfg.no_bias
        self.Wqkv = _linear(cfg.d_model, cfg.qkv_dim, bias, dtype)
        self.out_proj = _linear(cfg.d_model, cfg.d_model, bias, dtype)
        if cfg.qk_ln:
            self.q_ln = LPLayerNorm(cfg.d_model, cfg.layer_norm_epsilon, dtype)
            self.k_ln = LPLayerNorm(cfg.kv_n_heads * cfg.head_dim, cfg.layer_norm_epsilon, dtype)

    def forward(self, h: nn.Tensor, cache: ALiBiPagedKVCache) -> nn.Tensor:
        """h [n, d] -> [n, d]; appends the n new keys / values to this layer's cache."""
        cfg = self.cfg
        n = h.shape[0]
        qkv = self.Wqkv(h).astype(h.dtype)
        if cfg.clip_qkv is not None:
            qkv = op.minimum(op.maximum(qkv, _scalar(-cfg.clip_qkv, qkv.dtype)), _scalar(cfg.clip_qkv, qkv.dtype))
        if cfg.qk_ln:
            q, k, v = op.split(qkv, [cfg.d_model, cfg.d_model + cfg.kv_n_heads * cfg.head_dim], axis=-1)
            qkv = op.concat([self.q_ln(q), self.k_ln(k), v], dim=-1)
        # Wqkv's rows are q, k, v head after head: the cache takes them as one tensor, no copies
        qkv = op.reshape(qkv, (n, cfg.n_heads + 2 * cfg.kv_n_heads, cfg.head_dim))
        out = cache.attention_qkv(self.layer_id, qkv, cfg.n_heads, cfg.attn_scale)
        return self.out_proj(op.reshape(out, (n, cfg.d_model))).astype(h.dtype)


class MPTMLP(nn.Module):
    """up_proj -> exact-erf GELU -> down_proj."""

    def __init__(self, cfg: MPTConfig, dtype: str):
        bias = not cfg.no_bias
        self.up_proj = _linear(cfg.d_model, cfg.ffn_hidden_size, bias, dtype)
        self.down_proj = _linear(cfg.ffn_hidden_size, cfg.d_model, bias, dtype)

    def forward(self, x: nn.Tensor) -> nn.Tensor:
        up = self.up_proj(x).astype(x.dtype)  # rounded like the reference's half-precision activations
        act = op.gelu(up.astype("float32"), approximate="none").astype(x.dtype)
        return self.down_proj(act).astype(x.dtype)


class MPTBlock(nn.Module):
    """Pre-norm residual block: x + attn(norm_1(x)), then x + ffn(norm_2(x))."""

    def __init__(self, cfg: MPTConfig, dtype: str, layer_id: int):
        self.norm_1 = LPLayerNorm(cfg.d_model, cfg.layer_norm_epsilon, dtype)
        self.attn = MPTAttention(cfg, dtype, layer_id)
        self.norm_2 = LPLayerNorm(cfg.d_model, cfg.layer_norm_epsilon, dtype)
        self.ffn = MPTMLP(cfg, dtype)

    def forward(self, x: nn.Tensor, cache: ALiBiPagedKVCache) -> nn.Tensor:
        x = x + self.attn(self.norm_1(x), cache)
        return x + self.ffn(self.norm_2(x))


class MPTTransformer(nn.Module):
    """Embedding (+ learned positions when ALiBi is off), the blocks and the final norm."""

    def __init__(self, cfg: MPTConfig, dtype: str):
        self.cfg = cfg
        self.wte = Embedding(cfg.vocab_size, cfg.d_model, dtype=dtype)
        if cfg.uses_wpe:
            self.wpe = Embedding(cfg.max_seq_len, cfg.d_model, dtype=dtype)
        self.blocks = nn.ModuleList([MPTBlock(cfg, dtype, i) for i in range(cfg.n_layers)])
        self.norm_f = LPLayerNorm(cfg.d_model, cfg.layer_norm_epsilon, dtype)

    def forward(self, ids: nn.Tensor, cache: ALiBiPagedKVCache) -> nn.Tensor:
        """ids [n] (the batch's new tokens, in ``begin_forward`` order) -> hidden [n, d]."""
        x = self.wte(ids)
        if self.cfg.uses_wpe:
            x = x + self.wpe(cache.get_query_positions(ids.shape[0]))
        for block in self.blocks:
            x = block(x, cache)
        return self.norm_f(x)


class MPTForCausalLM(nn.Module):
    """The whole model with its entry points (see :meth:`export_spec`).

    Target-free: the KV cache it creates is generic, and each target's pipeline hands it that
    target's attention kernels (:func:`mpt_relax.compile.kv_cache.dispatch_kv_cache`).
    """

    def __init__(self, cfg: MPTConfig, dtype: str = "float32"):
        self.cfg = cfg
        self.dtype = dtype
        self.transformer = MPTTransformer(cfg, dtype)
        if not cfg.tie_word_embeddings:
            self.lm_head = _linear(cfg.d_model, cfg.vocab_size, False, dtype)

    def _logits(self, hidden: nn.Tensor) -> nn.Tensor:
        """hidden [m, d] -> fp32 logits [m, V] through the tied (or separate) head."""
        if self.cfg.tie_word_embeddings:
            logits = self.transformer.wte.head(hidden)
        else:
            logits = self.lm_head(hidden)
        scale = self.cfg.logit_multiplier
        return logits * _scalar(scale, "float32") if scale is not None else logits

    def create_paged_kv_cache(
        self, max_batch_size: tvm.tirx.Var, max_total_seq_len: tvm.tirx.Var, prefill_chunk_size: tvm.tirx.Var
    ) -> ALiBiPagedKVCache:
        """The KV cache of all layers: at most ``max_batch_size`` sequences and
        ``prefill_chunk_size`` tokens per forward, ``max_total_seq_len`` tokens in all."""
        return ALiBiPagedKVCache.create_generic(self.cfg, self.dtype, max_batch_size, max_total_seq_len, prefill_chunk_size)

    def prefill(self, ids: nn.Tensor, logit_positions: nn.Tensor, cache: ALiBiPagedKVCache) -> nn.Tensor:
        """ids [n] (new tokens of a ragged batch), logit_positions [b] (rows of ids) -> fp32 logits [b, V].

        Usually ``logit_positions`` picks each sequence's last new token; all of ``0 .. n-1``
        gives the logits of every position.
        """
        hidden = self.transformer(ids, cache)
        return self._logits(_take_rows(hidden, logit_positions))

    def batch_decode(self, ids: nn.Tensor, cache: ALiBiPagedKVCache) -> nn.Tensor:
        """ids [b], one new token for each of b sequences -> fp32 logits [b, V]."""
        with decoding():  # a scheme with int8 activations uses its decode kernels here
            return self._logits(self.transformer(ids, cache))

    def export_spec(self) -> dict:
        """The ``export_tvm`` spec of the entry points create_paged_kv_cache, prefill, batch_decode."""
        model = {"param_mode": "packed", "effect_mode": "none"}
        cache = nn.spec.Object(object_type=ALiBiPagedKVCache)
        return {
            "create_paged_kv_cache": {
                "max_batch_size": int,
                "max_total_seq_len": int,
                "prefill_chunk_size": int,
                "$": {"param_mode": "none", "effect_mode": "none"},
            },
            "prefill": {
                "ids": nn.spec.Tensor(["n"], "int32"),
                "logit_positions": nn.spec.Tensor(["b"], "int32"),
                "cache": cache,
                "$": model,
            },
            "batch_decode": {"ids": nn.spec.Tensor(["b"], "int32"), "cache": cache, "$": model},
        }


def _take_rows(x: nn.Tensor, indices: nn.Tensor) -> nn.Tensor:
    """x[indices] along axis 0, indices clipped to range (TVM's default "fast" take has no check,
    and prints a warning saying so at every build)."""
    return op.wrap_nested(relax.op.take(x._expr, indices._expr, axis=0, mode="clip"), name="take")


def _scalar(value: float, dtype: str) -> nn.Tensor:
    return nn.Tensor.from_scalar(value, dtype)
