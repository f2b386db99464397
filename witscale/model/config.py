"""ModelConfig: the fields of an HF ``config.json`` that a Llama / Qwen2 / Mistral decoder needs."""
from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from typing import Any, Optional

SUPPORTED = ("llama", "qwen2", "mistral")
_ARCH = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "mistral": "MistralForCausalLM"}


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
    rope_scaling: Optional[dict] = None
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
        if act != "silu":
            raise ValueError(f"hidden_act {act!r} is not supported (only silu)")
        missing = [k for k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                               "num_attention_heads") if k not in d]
        if missing:
            raise ValueError(f"config is missing {', '.join(missing)}")
        heads = int(d["num_attention_heads"])
        head_dim = d.get("head_dim") or d["hidden_size"] // heads
        rope_scaling = d.get("rope_scaling") or None
        rope_theta = d.get("rope_theta")
        params = d.get("rope_parameters")   # transformers 5 may store rope settings here
        if isinstance(params, dict):
            rope_theta = rope_theta or params.get("rope_theta")
            if params.get("rope_type", "default") != "default" and rope_scaling is None:
                rope_scaling = params
        if rope_scaling is not None:
            kind = rope_scaling.get("rope_type", rope_scaling.get("type", "default"))
            if kind not in ("default", "linear", "llama3"):
                raise ValueError(f"rope_scaling type {kind!r} is not supported (default, linear, llama3)")
        sliding = d.get("sliding_window") if (model_type == "mistral" or d.get("use_sliding_window")) else None
        if model_type == "qwen2" and d.get("use_sliding_window"):
            raise ValueError("use_sliding_window=true is not supported for qwen2")
        known = set(cls.__dataclass_fields__) | {"hidden_act", "rope_parameters", "use_sliding_window"}
        return cls(
            model_type=model_type, vocab_size=int(d["vocab_size"]), hidden_size=int(d["hidden_size"]),
            intermediate_size=int(d["intermediate_size"]), num_hidden_layers=int(d["num_hidden_layers"]),
            num_attention_heads=heads, num_key_value_heads=int(d.get("num_key_value_heads") or heads),
            head_dim=int(head_dim), rms_norm_eps=float(d.get("rms_norm_eps", 1e-6)),
            rope_theta=float(rope_theta or 10000.0), rope_scaling=rope_scaling,
            attention_bias=model_type == "qwen2" or bool(d.get("attention_bias", False)),
            o_bias=model_type != "qwen2" and bool(d.get("attention_bias", False)),
            mlp_bias=bool(d.get("mlp_bias", False)), tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
            sliding_window=int(sliding) if sliding else None,
            max_position_embeddings=int(d.get("max_position_embeddings", 4096)),
            initializer_range=float(d.get("initializer_range", 0.02)), bos_token_id=d.get("bos_token_id"),
            eos_token_id=d.get("eos_token_id"), pad_token_id=d.get("pad_token_id"),
            torch_dtype=d.get("torch_dtype") or d.get("dtype"),
            extra={k: v for k, v in d.items() if k not in known})

    @classmethod
    def from_json_file(cls, path: str) -> "ModelConfig":
        with open(path, encoding="utf-8") as f:
            try:
                d = json.load(f)
            except json.JSONDecodeError as e:
                raise ValueError(f"invalid JSON at line {e.lineno}: {e.msg}") from None
        return cls.from_dict(d)

    @classmethod
    def from_hf_dir(cls, path: str) -> "ModelConfig":
        return cls.from_json_file(os.path.join(path, "config.json"))

    def to_hf_dict(self) -> dict:
        d = dict(self.extra)
        d.update({k: v for k, v in asdict(self).items() if k not in ("extra", "o_bias")})
        d["architectures"] = [_ARCH[self.model_type]]
        d["hidden_act"] = "silu"
        if self.model_type == "qwen2":
            d.pop("attention_bias", None)   # implied by the architecture
        if self.model_type != "mistral":
            d.pop("sliding_window", None)
        if d.get("rope_scaling") is None:
            d.pop("rope_scaling")
        d.pop("torch_dtype", None)
        return d
