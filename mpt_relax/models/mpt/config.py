"""MPTConfig: the MPT hyper-parameters, read from an HF ``config.json`` or a preset.

Both spellings of the config are accepted: the remote-code ``MPTConfig`` of the mosaicml
uploads and transformers' native ``MptConfig`` (which also uses the aliases ``hidden_size``,
``num_attention_heads``, ``num_hidden_layers``). Nested ``attn_config`` / ``ffn_config``
dicts are flattened into one dataclass.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any, Union
from mpt_relax.errors import MPTRelaxError


class ConfigError(MPTRelaxError):
    """An MPT config that cannot describe a model we can compile."""


_ALIASES = {"hidden_size": "d_model", "num_attention_heads": "n_heads", "num_hidden_layers": "n_layers"}
_SUPPORTED_NORMS = ("low_precision_layernorm", "layernorm")
_SUPPORTED_FFN = ("mptmlp",)


@dataclasses.dataclass(frozen=True)
class MPTConfig:
    """Every hyper-parameter the compiled MPT decoder depends on (see docs/mpt.md)."""

    d_model: int
    n_heads: int
    n_layers: int
    vocab_size: int = 50432
    max_seq_len: int = 2048
    expansion_ratio: float = 4.0
    ffn_hidden_size: int = 0  # 0 -> int(d_model * expansion_ratio)
    kv_n_heads: int = 0  # 0 -> n_heads (multi-head attention)
    alibi: bool = True
    alibi_bias_max: float = 8.0
    learned_pos_emb: bool = True  # only used when alibi is off
    clip_qkv: float | None = None
    qk_ln: bool = False
    softmax_scale: float | None = None
    no_bias: bool = True
    logit_scale: Union[float, str, None] = None
    tie_word_embeddings: bool = True
    layer_norm_epsilon: float = 1e-5
    prompt_template: str | None = None  # "dolly" | "chatml" | None; used by the engine

    def __post_init__(self) -> None:
        if self.ffn_hidden_size == 0:
            object.__setattr__(self, "ffn_hidden_size", int(self.d_model * self.expansion_ratio))
        if self.kv_n_heads == 0:
            object.__setattr__(self, "kv_n_heads", self.n_heads)
        self.validate()

    # ------------------------------------------------------------------ derived shapes
    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def qkv_dim(self) -> int:
        """Rows of the fused Wqkv weight: d_model + 2 * kv_n_heads * head_dim."""
        return self.d_model + 2 * self.kv_n_heads * self.head_dim

    @property
    def attn_scale(self) -> float:
        return self.softmax_scale if self.softmax_scale is not None else 1.0 / math.sqrt(self.head_dim)

    @property
    def logit_multiplier(self) -> float | None:
        """The factor applied to the logits, or None for no scaling."""
        if self.logit_scale is None:
            return None
        if self.logit_scale == "inv_sqrt_d_model":
            return 1.0 / math.sqrt(self.d_model)
        return float(self.logit_scale)

    @property
    def uses_wpe(self) -> bool:
        """True when the model adds learned position embeddings (``transformer.wpe``)."""
        return (not self.alibi) and self.learned_pos_emb

    def alibi_slopes(self) -> list[float]:
        """Per-head ALiBi slopes; head h adds ``slope[h] * (j - i)`` to its scores."""
        n = 2 ** math.ceil(math.log2(self.n_heads))
        slopes = [2.0 ** -((i + 1) * self.alibi_bias_max / n) for i in range(n)]
        if n != self.n_heads:
            slopes = (slopes[1::2] + slopes[0::2])[: self.n_heads]
        return slopes

    def num_parameters(self) -> int:
        d, f, v = self.d_model, self.ffn_hidden_size, self.vocab_size
        bias = not self.no_bias
        per_block = (
            2 * d  # norm_1, norm_2
            + self.qkv_dim * d + (self.qkv_dim if bias else 0)
            + d * d + (d if bias else 0)
            + 2 * d * f + (f + d if bias else 0)
            + ((d + self.kv_n_heads * self.head_dim) if self.qk_ln else 0)
        )
        total = v * d + self.n_layers * per_block + d
        if self.uses_wpe:
            total += self.max_seq_len * d
        if not self.tie_word_embeddings:
            total += v * d
        return total

    # ------------------------------------------------------------------ validation
    def validate(self) -> None:
        for name in ("d_model", "n_heads", "n_layers", "vocab_size", "max_seq_len", "ffn_hidden_size", "kv_n_heads"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ConfigError(f"config field '{name}' must be a positive integer, got {value!r}")
        if self.d_model % self.n_heads:
            raise ConfigError(
                f"config field 'd_model' ({self.d_model}) must be divisible by 'n_heads' ({self.n_heads})"
            )
        if self.n_heads % self.kv_n_heads:
            raise ConfigError(
                f"config field 'kv_n_heads' ({self.kv_n_heads}) must divide 'n_heads' ({self.n_heads})"
            )
        if self.alibi and self.alibi_bias_max <= 0:
            raise ConfigError(f"config field 'alibi_bias_max' must be positive, got {self.alibi_bias_max}")
        if self.clip_qkv is not None and self.clip_qkv <= 0:
            raise ConfigError(f"config field 'clip_qkv' must be positive or null, got {self.clip_qkv}")
        if self.softmax_scale is not None and self.softmax_scale <= 0:
            raise ConfigError(f"config field 'softmax_scale' must be positive or null, got {self.softmax_scale}")
        if isinstance(self.logit_scale, str) and self.logit_scale != "inv_sqrt_d_model":
            raise ConfigError(
                f"config field 'logit_scale' must be a number, null or 'inv_sqrt_d_model', got {self.logit_scale!r}"
            )
        if self.layer_norm_epsilon <= 0:
            raise ConfigError(f"config field 'layer_norm_epsilon' must be positive, got {self.layer_norm_epsilon}")
        if self.prompt_template not in (None, "dolly", "chatml"):
            raise ConfigError(
                f"config field 'prompt_template' must be 'dolly', 'chatml' or null, got {self.prompt_template!r}"
            )

    # ------------------------------------------------------------------ constructors
    def replace(self, **changes: Any) -> "MPTConfig":
        """A copy with some fields changed, e.g. ``cfg.replace(max_seq_len=65536)``."""
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> "MPTConfig":
        """Parse an HF config dict (remote-code or native spelling) or our own ``to_dict``."""
        raw = {_ALIASES.get(k, k): v for k, v in raw.items()}
        if "model_type" in raw and raw["model_type"] != "mpt":
            raise ConfigError(f"config 'model_type' is {raw['model_type']!r}, not 'mpt'")
        attn = dict(raw.get("attn_config") or {})
        ffn = dict(raw.get("ffn_config") or {})
        _reject_unsupported(raw, attn, ffn)

        for name in ("d_model", "n_heads", "n_layers"):
            if name not in raw:
                raise ConfigError(f"config is missing the field '{name}'")
        fields = {f.name for f in dataclasses.fields(cls)}
        kwargs = {k: v for k, v in raw.items() if k in fields}
        attn_type = attn.get("attn_type", "multihead_attention")
        if "kv_n_heads" in raw:  # our own to_dict() spelling
            kv_n_heads = raw["kv_n_heads"]
        elif attn_type == "multiquery_attention":
            kv_n_heads = 1
        elif attn_type == "grouped_query_attention":
            if "kv_n_heads" not in attn:
                raise ConfigError("config field 'attn_config.kv_n_heads' is required for grouped_query_attention")
            kv_n_heads = attn["kv_n_heads"]
        else:
            kv_n_heads = 0
        for key in ("alibi", "alibi_bias_max", "clip_qkv", "qk_ln", "softmax_scale"):
            if key in attn:
                kwargs[key] = attn[key]
        kwargs["kv_n_heads"] = kv_n_heads or 0
        if "ffn_hidden_size" in ffn and ffn["ffn_hidden_size"] is not None:
            kwargs["ffn_hidden_size"] = ffn["ffn_hidden_size"]
        if kwargs.get("clip_qkv") in (0, 0.0):
            kwargs["clip_qkv"] = None  # llm-foundry treats a falsy clip as "off"
        if "alibi_bias_max" in kwargs:
            kwargs["alibi_bias_max"] = float(kwargs["alibi_bias_max"])
        return cls(**kwargs)

    @classmethod
    def from_json(cls, path: str | Path) -> "MPTConfig":
        path = Path(path)
        if path.is_dir():
            path = path / "config.json"
        if not path.is_file():
            raise ConfigError(f"no config.json at {path}: point at an HF checkpoint directory")
        try:
            raw = json.loads(path.read_text())
        except json.JSONDecodeError as err:
            raise ConfigError(f"{path} is not valid JSON ({err}); re-download the checkpoint's config.json") from err
        return cls.from_dict(raw)


def _reject_unsupported(raw: dict, attn: dict, ffn: dict) -> None:
    norm = raw.get("norm_type", "low_precision_layernorm")
    if norm not in _SUPPORTED_NORMS:
        raise ConfigError(f"config field 'norm_type' = {norm!r} is not supported (expected one of {_SUPPORTED_NORMS})")
    ffn_type = ffn.get("ffn_type", "mptmlp")
    if ffn_type not in _SUPPORTED_FFN:
        raise ConfigError(f"config field 'ffn_config.ffn_type' = {ffn_type!r} is not supported (expected 'mptmlp')")
    act = (ffn.get("ffn_act_fn") or {}).get("name", "gelu")
    if act != "gelu":
        raise ConfigError(f"config field 'ffn_config.ffn_act_fn' = {act!r} is not supported (expected gelu)")
    attn_type = attn.get("attn_type", "multihead_attention")
    if attn_type not in ("multihead_attention", "multiquery_attention", "grouped_query_attention"):
        raise ConfigError(f"config field 'attn_config.attn_type' = {attn_type!r} is not supported")
    if attn.get("prefix_lm"):
        raise ConfigError("config field 'attn_config.prefix_lm' = true is not supported (causal decoding only)")
    if attn.get("rope"):
        raise ConfigError("config field 'attn_config.rope' = true is not supported (MPT uses ALiBi)")
    if attn.get("sliding_window_size", -1) not in (-1, None):
        raise ConfigError("config field 'attn_config.sliding_window_size' is not supported")


# ---------------------------------------------------------------------- presets
_MPT_7B = dict(d_model=4096, n_heads=32, n_layers=32, max_seq_len=2048)
_MPT_30B = dict(d_model=7168, n_heads=64, n_layers=48, max_seq_len=8192)

PRESETS: dict[str, dict[str, Any]] = {
    "mpt-7b": _MPT_7B,
    "mpt-7b-instruct": {**_MPT_7B, "prompt_template": "dolly"},
    "mpt-7b-chat": {**_MPT_7B, "prompt_template": "chatml"},
    "mpt-7b-storywriter": {**_MPT_7B, "max_seq_len": 65536},
    "mpt-7b-8k": {**_MPT_7B, "max_seq_len": 8192},
    "mpt-7b-8k-instruct": {**_MPT_7B, "max_seq_len": 8192, "prompt_template": "dolly"},
    "mpt-7b-8k-chat": {**_MPT_7B, "max_seq_len": 8192, "prompt_template": "chatml"},
    "mpt-30b": _MPT_30B,
    "mpt-30b-instruct": {**_MPT_30B, "prompt_template": "dolly"},
    "mpt-30b-chat": {**_MPT_30B, "prompt_template": "chatml"},
}


def preset(name: str, max_seq_len: int | None = None) -> MPTConfig:
    """The config of a published model by name (``mosaicml/`` prefix optional)."""
    key = name.split("/")[-1].lower()
    if key.endswith("-float16"):
        key = key[: -len("-float16")]
    if key not in PRESETS:
        raise ConfigError(f"unknown model {name!r}; presets are: {', '.join(PRESETS)} (or pass a checkpoint directory)")
    cfg = MPTConfig(**PRESETS[key])
    return cfg.replace(max_seq_len=max_seq_len) if max_seq_len else cfg


def template_for(name: str) -> str | None:
    """Guess the prompt template from a model name (instruct -> dolly, chat -> chatml)."""
    low = name.lower()
    if "chat" in low:
        return "chatml"
    if "instruct" in low:
        return "dolly"
    return None
