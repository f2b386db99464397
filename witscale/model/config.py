"""ModelConfig: the fields of an HF ``config.json`` that witscale's decoder needs, for every supported family.

Families (``model_type``) are the records of witscale/model/family.py (``FAMILIES``): ``llama``, ``qwen2``,
``mistral``, ``qwen3``, ``gemma2``, ``gemma3_text`` — and the text part of a config that wraps one
(``WRAPPERS``: a multimodal ``gemma3`` with a ``text_config``; its language-model weights are read through
witscale/model/hf_names.py's ``checkpoint_to_hf_name``, and an export is a plain ``gemma3_text`` model). This
module reads a config.json through the family's record and tests no ``model_type`` itself; what each family
changes in the network is derived from these fields and the record by ``family_spec`` (family.py).

Defaults for absent keys follow what ``transformers`` itself assumes for each model type (the record's
``default_*``: e.g. Mistral's ``sliding_window`` is 4096 when the key is missing, but ``null`` means "no
window"; Gemma's head_dim is 256 and Qwen3's 128, whatever hidden/heads), so that a config read here builds
the same network ``AutoModelForCausalLM`` would. Anything this decoder does not implement is refused with a
ValueError that names the field, rather than silently computed differently.
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, field
from typing import Any, Optional

from witscale.model.family import Family, get_family, unwrap

ROPE_TYPES = ("default", "linear", "llama3", "yarn")
_ROPE_REQUIRED = {"default": (), "linear": ("factor",),
                  "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"),
                  "yarn": ("original_max_position_embeddings", "factor")}
_YARN_OPTIONAL = ("attention_factor", "beta_fast", "beta_slow", "mscale", "mscale_all_dim", "truncate")
LAYER_TYPES = ("full_attention", "sliding_attention")
ACTIVATIONS = {"silu": "silu", "swish": "silu", "gelu_pytorch_tanh": "gelu_pytorch_tanh"}   # HF name → ours
_TOKEN_IDS = ("bos_token_id", "eos_token_id", "pad_token_id")
# Keys consumed here (not copied into ``extra``), besides the dataclass fields.
_CONSUMED = {"hidden_act", "hidden_activation", "rope_parameters", "use_sliding_window", "dtype", "architectures",
             "partial_rotary_factor", "attention_dropout", "transformers_version",
             "sliding_window_pattern", "_sliding_window_pattern", "use_bidirectional_attention",
             "rope_local_base_freq"}


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
    attention_bias: bool = False        # bias on q/k/v (Qwen2 always; Llama/Qwen3/Gemma when attention_bias is set)
    o_bias: bool = False                # bias on o_proj (Llama/Qwen3/Gemma's attention_bias covers o_proj too)
    mlp_bias: bool = False
    tie_word_embeddings: bool = False
    sliding_window: Optional[int] = None
    # Per layer "full_attention" / "sliding_attention" (the window applies to the sliding ones); None: every
    # layer alike (Llama, Mistral: the window, if any, applies to all).
    layer_types: Optional[list] = None
    hidden_act: str = "silu"            # silu (SwiGLU) or gelu_pytorch_tanh (Gemma's GeGLU)
    query_pre_attn_scalar: Optional[float] = None   # Gemma: attention scale = this ** -0.5
    attn_logit_softcapping: Optional[float] = None  # Gemma-2: c·tanh(scores / c)
    final_logit_softcapping: Optional[float] = None  # Gemma-2: c·tanh(logits / c)
    rope_local_base_freq: Optional[float] = None    # Gemma-3: RoPE base of the sliding layers (plain RoPE)
    max_position_embeddings: int = 4096
    initializer_range: float = 0.02
    bos_token_id: Any = None
    eos_token_id: Any = None
    pad_token_id: Any = None
    torch_dtype: Optional[str] = None
    # Where the weights live in the checkpoint read: None (HF names as they are) or "gemma3_multimodal" (a
    # Gemma3ForConditionalGeneration's language model; see hf_names.checkpoint_to_hf_name). Never exported.
    checkpoint_layout: Optional[str] = None
    # Other HF fields, written back on export — Qwen's max_window_layers (transformers < 4.53 reads it, not
    # layer_types) and, when its window is off, its sliding_window as read (the field above is then None).
    extra: dict = field(default_factory=dict)

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        if not isinstance(d, dict):
            raise ValueError(f"a config must be a JSON object, got {type(d).__name__}")
        # A wrapped text model (multimodal Gemma-3): only the language model is trained; its weights sit under
        # a prefix (hf_names.py).
        d, wrapper = unwrap(d)
        model_type = d.get("model_type")
        family = get_family(model_type)            # every per-family decision below reads this record
        # Gemma reads hidden_activation (transformers ignores its legacy hidden_act); the rest hidden_act.
        act_key = family.activation_key
        act = d.get(act_key) or family.default_activation
        if act not in ACTIVATIONS:
            raise ValueError(f"{act_key} {act!r} is not supported (supported: {', '.join(ACTIVATIONS)})")
        missing = [k for k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                               "num_attention_heads") if d.get(k) is None]
        if missing:
            raise ValueError(f"config is missing {', '.join(missing)}")
        heads = _positive_int(d, "num_attention_heads")
        kv_heads = d.get("num_key_value_heads", family.default_kv_heads) or heads
        kv_heads = _positive_int({"num_key_value_heads": kv_heads}, "num_key_value_heads")
        if heads % kv_heads:
            raise ValueError(f"num_attention_heads ({heads}) is not a multiple of num_key_value_heads ({kv_heads})")
        hidden = _positive_int(d, "hidden_size")
        head_dim = d.get("head_dim") or family.default_head_dim
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
        if d.get("use_bidirectional_attention"):
            raise ValueError("use_bidirectional_attention=true is not supported (only causal attention)")
        layers = _positive_int(d, "num_hidden_layers")
        max_pos = int(d.get("max_position_embeddings") or 4096)
        rope_local = None
        if family.local_rope_theta is not None:
            rope_theta, rope_scaling, rope_local = _local_global_rope(d, max_pos, family)
        else:
            rope_theta, rope_scaling = _rope(d, max_pos, family.default_rope_theta)
        sliding, layer_types = _windows(family, d, layers)

        attn_bias = bool(d.get("attention_bias", False))
        if family.qkv_bias == "always" and "attention_bias" in d and not attn_bias:
            raise ValueError(f"attention_bias=false is not supported for {model_type} (its q/k/v always have a bias)")
        if family.qkv_bias == "refused" and (attn_bias or d.get("mlp_bias")):
            raise ValueError(f"attention_bias/mlp_bias are not {family.name} fields (transformers ignores them): "
                             "remove them or use model_type llama")
        if d.get("mlp_bias") and not family.mlp_bias:
            raise ValueError(f"mlp_bias=true is not a {model_type} field (transformers ignores it): remove it")
        attn_default, final_default = family.default_softcaps
        softcaps = family.reads_softcaps
        attn_softcap = _optional_positive(d, "attn_logit_softcapping", attn_default) if softcaps else None
        if not family.applies_attn_softcap and attn_softcap is not None:
            # transformers' attention for this family never applies it: computing it here would differ from HF.
            raise ValueError(f"attn_logit_softcapping is not applied by {family.name} (transformers ignores it): "
                             "set it to null")
        final_softcap = _optional_positive(d, "final_logit_softcapping", final_default) if softcaps else None
        scalar_default = family.default_query_pre_attn_scalar
        if scalar_default is not None and "query_pre_attn_scalar" in d and d["query_pre_attn_scalar"] is None:
            raise ValueError("query_pre_attn_scalar null is not supported (transformers refuses it too): give a "
                             f"number, or leave the key out for transformers' default {scalar_default}")
        scalar = (_optional_positive(d, "query_pre_attn_scalar", scalar_default)
                  if scalar_default is not None else None)
        ids = {k: d.get(k, default) for k, default in zip(_TOKEN_IDS, family.default_token_ids)}
        extra = {k: v for k, v in d.items() if k not in set(cls.__dataclass_fields__) | _CONSUMED}
        if family.windows == "from_layer" and sliding is None:
            extra["sliding_window"] = d.get("sliding_window", family.default_window)   # as read
        return cls(
            model_type=model_type, vocab_size=_positive_int(d, "vocab_size"), hidden_size=hidden,
            intermediate_size=_positive_int(d, "intermediate_size"), num_hidden_layers=layers,
            num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=head_dim,
            rms_norm_eps=float(d.get("rms_norm_eps", 1e-6)), rope_theta=rope_theta, rope_scaling=rope_scaling,
            attention_bias=family.qkv_bias == "always" or attn_bias,
            o_bias=family.o_bias and attn_bias,
            mlp_bias=family.mlp_bias and bool(d.get("mlp_bias", False)),
            tie_word_embeddings=bool(d.get("tie_word_embeddings", family.default_tie_word_embeddings)),
            sliding_window=sliding, layer_types=layer_types, hidden_act=ACTIVATIONS[act],
            query_pre_attn_scalar=scalar, attn_logit_softcapping=attn_softcap,
            final_logit_softcapping=final_softcap, rope_local_base_freq=rope_local,
            max_position_embeddings=max_pos,
            initializer_range=float(d.get("initializer_range", 0.02)), **ids,
            torch_dtype=d.get("torch_dtype") or d.get("dtype"),
            checkpoint_layout=wrapper.layout if wrapper else None,
            extra=extra)

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

    def layer_type(self, index: int) -> str:
        """"full_attention" or "sliding_attention" for decoder layer ``index``."""
        if self.layer_types is not None:
            return self.layer_types[index]
        return "sliding_attention" if self.sliding_window else "full_attention"

    def to_hf_dict(self) -> dict:
        """A config.json dict for this family that transformers 5 (rope_parameters) and 4.x (rope_theta /
        rope_scaling) read. A multimodal gemma3 source is written as the text model it trained: gemma3_text."""
        d = dict(self.extra)
        d.update({k: v for k, v in asdict(self).items()
                  if k not in ("extra", "o_bias", "torch_dtype", "checkpoint_layout", "hidden_act")})
        family = get_family(self.model_type)
        d["architectures"] = [family.architecture]
        d[family.activation_key] = self.hidden_act
        if family.qkv_bias != "attention_bias":
            d.pop("attention_bias")             # implied by the architecture
        if not family.mlp_bias:
            d.pop("mlp_bias")
        if family.windows == "from_layer":
            # transformers nulls sliding_window unless use_sliding_window; layer_types says which layers.
            d["use_sliding_window"] = self.sliding_window is not None
            d["sliding_window"] = (self.sliding_window if self.sliding_window is not None
                                   else self.extra.get("sliding_window", family.default_window))
            if self.sliding_window is None:
                d.pop("layer_types")
        if family.windows in ("none", "uniform"):
            d.pop("layer_types")
        if family.windows == "none":
            d.pop("sliding_window")
        if family.default_query_pre_attn_scalar is None:
            d.pop("query_pre_attn_scalar")
        if not family.reads_softcaps:
            for k in ("attn_logit_softcapping", "final_logit_softcapping"):
                d.pop(k)
        if family.local_rope_theta is None:
            d.pop("rope_local_base_freq")
            d["rope_parameters"] = dict(self.rope_scaling or {"rope_type": "default"}, rope_theta=self.rope_theta)
        else:
            d["rope_parameters"] = {
                "full_attention": dict(self.rope_scaling or {"rope_type": "default"}, rope_theta=self.rope_theta),
                "sliding_attention": {"rope_type": "default", "rope_theta": self.rope_local_base_freq}}
            d["rope_theta"] = self.rope_theta            # transformers 4.x reads these two
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


def _optional_positive(d: dict, key: str, default: Optional[float] = None) -> Optional[float]:
    value = d.get(key, default)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0 or math.isinf(value):
        raise ValueError(f"{key} must be a positive number or null, got {value!r}")
    return value        # as written: transformers' strict configs type-check it (query_pre_attn_scalar: int)


def _windows(family: Family, d: dict, layers: int) -> tuple[Optional[int], Optional[list]]:
    """(sliding_window, layer_types) as transformers builds them for the family (its ``windows`` rule)."""
    if family.windows == "none":
        return None, None
    window = d.get("sliding_window", family.default_window)
    if family.windows == "from_layer" and not d.get("use_sliding_window"):
        window = None                      # transformers: no window unless use_sliding_window
    if window is not None:
        window = _positive_int({"sliding_window": window}, "sliding_window")
    if family.windows == "uniform":
        return window, None                # one window for every layer (Mistral ignores layer_types)
    types = d.get("layer_types")
    if types is None:
        if family.windows == "from_layer":
            first = d.get("max_window_layers", family.default_max_window_layers)
            types = ["sliding_attention" if window is not None and i >= first else "full_attention"
                     for i in range(layers)]
        else:                              # interleaved: every n-th layer global (Gemma-2 every 2nd, Gemma-3 6th)
            n = next((int(d[k]) for k in family.global_every_keys if k in d), family.global_every)
            types = ["sliding_attention" if (i + 1) % n else "full_attention" for i in range(layers)]
    if (not isinstance(types, list) or len(types) != layers or any(t not in LAYER_TYPES for t in types)):
        raise ValueError(f"layer_types must list {layers} entries of {' / '.join(LAYER_TYPES)}, got {types!r}")
    if window is None or "sliding_attention" not in types:
        # No layer is windowed: the plain causal model (kept without layer_types).
        return None, (types if family.windows == "interleaved" else None)
    return window, list(types)


def _rope(d: dict, max_pos: int, default_theta: float = 10000.0) -> tuple[float, Optional[dict]]:
    """(rope_theta, normalized scaling dict or None) from legacy ``rope_theta``/``rope_scaling`` or
    transformers 5's ``rope_parameters``."""
    params = d.get("rope_parameters") if isinstance(d.get("rope_parameters"), dict) else {}
    scaling = d.get("rope_scaling") or params     # transformers 5 also lets rope_scaling win
    # As transformers 5: a theta inside the rope dict wins over the legacy top-level key.
    theta = params.get("rope_theta") or scaling.get("rope_theta") or d.get("rope_theta") or default_theta
    return float(theta), _rope_scaling(scaling, max_pos, d.get("original_max_position_embeddings"))


def _rope_scaling(scaling: dict, max_pos: int, top_level_original: Any = None,
                  where: str = "rope_scaling") -> Optional[dict]:
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind not in ROPE_TYPES:
        raise ValueError(f"{where} rope_type {kind!r} is not supported (supported: {', '.join(ROPE_TYPES)})")
    if kind == "default":
        return None
    out = {"rope_type": kind}
    for key in _ROPE_REQUIRED[kind]:
        value = scaling.get(key)
        if key == "original_max_position_embeddings":
            # transformers: a top-level original_max_position_embeddings (Phi-3 style) wins, then the
            # dict's, then max_position_embeddings.
            value = top_level_original or value or max_pos
        if value is None and kind == "yarn" and key == "factor":
            value = max_pos / out["original_max_position_embeddings"]        # transformers' fallback
        if value is None:
            raise ValueError(f"{where} of type {kind} needs {key!r}")
        out[key] = float(value) if key != "original_max_position_embeddings" else int(value)
    if kind == "yarn":
        for key in _YARN_OPTIONAL:
            if scaling.get(key) is not None:
                out[key] = bool(scaling[key]) if key == "truncate" else float(scaling[key])
    if kind == "llama3" and out["high_freq_factor"] <= out["low_freq_factor"]:
        raise ValueError(f"{where}: high_freq_factor must be greater than low_freq_factor")
    if out["factor"] <= 0:
        raise ValueError(f"{where} factor must be positive, got {out['factor']}")
    return out


def _local_global_rope(d: dict, max_pos: int, family: Family) -> tuple[float, Optional[dict], float]:
    """Two RoPEs (Gemma-3): (global theta, global scaling, local theta). transformers 5 writes
    ``rope_parameters = {"full_attention": {...}, "sliding_attention": {...}}``; older configs ``rope_theta``,
    ``rope_scaling`` (global layers only) and ``rope_local_base_freq``."""
    params = d.get("rope_parameters") if isinstance(d.get("rope_parameters"), dict) else {}
    full = dict(params.get("full_attention") or {})
    local = dict(params.get("sliding_attention") or {})
    if d.get("rope_scaling"):
        full.update(d["rope_scaling"])              # as transformers: the legacy key updates the global RoPE
    theta = full.get("rope_theta") or d.get("rope_theta") or family.default_rope_theta
    local_theta = local.get("rope_theta") or d.get("rope_local_base_freq") or family.local_rope_theta
    if _rope_scaling(local, max_pos, where="rope_parameters.sliding_attention") is not None:
        raise ValueError(f"rope_parameters.sliding_attention: only plain RoPE is supported on {family.name}'s "
                         "sliding layers")
    return float(theta), _rope_scaling(full, max_pos, where="rope_parameters.full_attention"), float(local_theta)
