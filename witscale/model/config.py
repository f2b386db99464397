"""ModelConfig: the fields of an HF ``config.json`` that a Llama / Qwen2 / Mistral decoder needs.

Defaults for absent keys follow what ``transformers`` itself assumes for each model type (e.g. Mistral's
``sliding_window`` is 4096 when the key is missing, but ``null`` means "no window"), so that a config
read here builds the same network ``AutoModelForCausalLM`` would. Anything this decoder does not
implement is refused with a ValueError that names the field, rather than silently computed differently.
"""
from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from typing import Any, Optional

SUPPORTED = ("llama", "qwen2", "mistral")
_ARCH = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "mistral": "MistralForCausalLM"}
ROPE_TYPES = ("default", "linear", "llama3")
_ROPE_REQUIRED = {"default": (), "linear": ("factor",),
                  "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")}
# transformers' per-architecture defaults for keys that change the network when absent.
_HF_DEFAULT_KV_HEADS = {"llama": None, "qwen2": 32, "mistral": 8}    # None: = num_attention_heads
_HF_DEFAULT_WINDOW = {"mistral": 4096}
# Keys consumed here (not copied into ``extra``), besides the dataclass fields.
_CONSUMED = {"hidden_act", "rope_parameters", "use_sliding_window", "dtype", "architectures", "partial_rotary_factor",
             "attention_dropout", "max_window_layers", "layer_types", "transformers_version"}


@dataclass
class ModelConfig:
    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: Optional[dict] = None  # normalized: {"rope_type": ..., factors}; None = plain RoPE
    attention_bias: bool = False        # bias on q/k/v (Qwen2 always; Llama when attention_bias is set)
    o_bias: bool = False                # bias on o_proj (Llama's attention_bias covers o_proj too)
    mlp_bias: bool = False
    tie_word_embeddings: bool = False
    sliding_window: Optional[int] = None
    max_position_embeddings: int = 4096
    initializer_range: float = 0.02
    bos_token_id: Any = None
    eos_token_id: Any = None
    pad_token_id: Any = None
    torch_dtype: Optional[str] = None
    extra: dict = field(default_factory=dict)   # other HF fields, written back on export

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        model_type = d.get("model_type")
        if model_type not in SUPPORTED:
            raise ValueError(f"model_type {model_type!r} is not supported (supported: {', '.join(SUPPORTED)})")
        act = d.get("hidden_act", "silu")
        if act not in ("silu", "swish"):        # transformers maps both names to SiLU
            raise ValueError(f"hidden_act {act!r} is not supported (only silu)")
        missing = [k for k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                               "num_attention_heads") if d.get(k) is None]
        if missing:
            raise ValueError(f"config is missing {', '.join(missing)}")
        heads = _positive_int(d, "num_attention_heads")
        kv_heads = d.get("num_key_value_heads", _HF_DEFAULT_KV_HEADS[model_type]) or heads
        kv_heads = _positive_int({"num_key_value_heads": kv_heads}, "num_key_value_heads")
        if heads % kv_heads:
            raise ValueError(f"num_attention_heads ({heads}) is not a multiple of num_key_value_heads ({kv_heads})")
        hidden = _positive_int(d, "hidden_size")
        head_dim = d.get("head_dim")
        if head_dim is None:
            if hidden % heads:
                raise ValueError(f"hidden_size ({hidden}) is not divisible by num_attention_heads ({heads}) "
                                 "and head_dim is not given")
            head_dim = hidden // heads
        head_dim = _positive_int({"head_dim": head_dim}, "head_dim")
        if head_dim % 2:
            raise ValueError(f"head_dim ({head_dim}) must be even for rotary embeddings")
        if float(d.get("partial_rotary_factor") or 1.0) != 1.0:
            raise ValueError(f"partial_rotary_factor {d['partial_rotary_factor']} is not supported (only 1.0)")
        if float(d.get("attention_dropout") or 0.0) != 0.0:
            raise ValueError(f"attention_dropout {d['attention_dropout']} is not supported (only 0.0)")
        max_pos = int(d.get("max_position_embeddings") or 4096)
        rope_theta, rope_scaling = _rope(d, max_pos)

        if model_type == "qwen2" and d.get("use_sliding_window"):
            # Qwen2 windows only layers >= max_window_layers: a per-layer scheme this decoder lacks.
            raise ValueError("use_sliding_window=true is not supported for qwen2")
        sliding = d.get("sliding_window", _HF_DEFAULT_WINDOW.get(model_type)) if model_type == "mistral" else None
        if sliding is not None:
            sliding = _positive_int({"sliding_window": sliding}, "sliding_window")

        attn_bias = bool(d.get("attention_bias", False))
        if model_type == "qwen2" and "attention_bias" in d and not attn_bias:
            raise ValueError("attention_bias=false is not supported for qwen2 (its q/k/v always have a bias)")
        if model_type == "mistral" and (attn_bias or d.get("mlp_bias")):
            raise ValueError("attention_bias/mlp_bias are not Mistral fields (transformers ignores them): "
                             "remove them or use model_type llama")
        return cls(
            model_type=model_type, vocab_size=_positive_int(d, "vocab_size"), hidden_size=hidden,
            intermediate_size=_positive_int(d, "intermediate_size"),
            num_hidden_layers=_positive_int(d, "num_hidden_layers"),
            num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=head_dim,
            rms_norm_eps=float(d.get("rms_norm_eps", 1e-6)), rope_theta=rope_theta, rope_scaling=rope_scaling,
            attention_bias=model_type == "qwen2" or attn_bias,
            o_bias=model_type == "llama" and attn_bias,
            mlp_bias=model_type == "llama" and bool(d.get("mlp_bias", False)),
            tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
            sliding_window=sliding, max_position_embeddings=max_pos,
            initializer_range=float(d.get("initializer_range", 0.02)), bos_token_id=d.get("bos_token_id"),
            eos_token_id=d.get("eos_token_id"), pad_token_id=d.get("pad_token_id"),
            torch_dtype=d.get("torch_dtype") or d.get("dtype"),
            extra={k: v for k, v in d.items() if k not in set(cls.__dataclass_fields__) | _CONSUMED})

    @classmethod
    def from_json_file(cls, path: str) -> "ModelConfig":
        with open(path, encoding="utf-8") as f:
            try:
                d = json.load(f)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}: invalid JSON at line {e.lineno}: {e.msg}") from None
        try:
            return cls.from_dict(d)
        except ValueError as e:
            raise ValueError(f"{path}: {e}") from None

    @classmethod
    def from_hf_dir(cls, path: str) -> "ModelConfig":
        return cls.from_json_file(os.path.join(path, "config.json"))

    def to_hf_dict(self) -> dict:
        """A config.json dict that transformers 5 (rope_parameters) and 4.x (rope_theta/rope_scaling) read."""
        d = dict(self.extra)
        d.update({k: v for k, v in asdict(self).items() if k not in ("extra", "o_bias", "torch_dtype")})
        d["architectures"] = [_ARCH[self.model_type]]
        d["hidden_act"] = "silu"
        if self.model_type == "qwen2":
            d.pop("attention_bias")             # implied by the architecture
            d["use_sliding_window"] = False
        if self.model_type == "mistral":
            d.pop("attention_bias")
            d.pop("mlp_bias")
        else:
            d.pop("sliding_window")
        if self.model_type == "qwen2":
            d.pop("mlp_bias")
        d["rope_parameters"] = dict(self.rope_scaling or {"rope_type": "default"}, rope_theta=self.rope_theta)
        if d.get("rope_scaling") is None:
            d.pop("rope_scaling")
        else:
            d["rope_scaling"] = dict(self.rope_scaling, type=self.rope_scaling["rope_type"])
        if self.torch_dtype:
            d["torch_dtype"] = self.torch_dtype
        return d


def _positive_int(d: dict, key: str) -> int:
    value = d.get(key)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or int(value) != value or value <= 0:
        raise ValueError(f"{key} must be a positive integer, got {value!r}")
    return int(value)


def _rope(d: dict, max_pos: int) -> tuple[float, Optional[dict]]:
    """(rope_theta, normalized scaling dict or None) from legacy ``rope_theta``/``rope_scaling`` or
    transformers 5's ``rope_parameters``."""
    params = d.get("rope_parameters") if isinstance(d.get("rope_parameters"), dict) else {}
    scaling = d.get("rope_scaling") or params     # transformers 5 also lets rope_scaling win
    # As transformers 5: a theta inside the rope dict wins over the legacy top-level key.
    theta = params.get("rope_theta") or scaling.get("rope_theta") or d.get("rope_theta") or 10000.0
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind not in ROPE_TYPES:
        raise ValueError(f"rope_scaling rope_type {kind!r} is not supported (supported: {', '.join(ROPE_TYPES)})")
    if kind == "default":
        return float(theta), None
    out = {"rope_type": kind}
    for key in _ROPE_REQUIRED[kind]:
        value = scaling.get(key)
        if value is None and key == "original_max_position_embeddings":
            value = max_pos                     # transformers' fallback
        if value is None:
            raise ValueError(f"rope_scaling of type {kind} needs {key!r}")
        out[key] = float(value) if key != "original_max_position_embeddings" else int(value)
    if kind == "llama3" and out["high_freq_factor"] <= out["low_freq_factor"]:
        raise ValueError("rope_scaling: high_freq_factor must be greater than low_freq_factor")
    if out["factor"] <= 0:
        raise ValueError(f"rope_scaling factor must be positive, got {out['factor']}")
    return float(theta), out
