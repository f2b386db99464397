"""ModelConfig: the fields of an HF ``config.json`` that witscale's decoder needs, for every supported family.

Families (``model_type``): ``llama``, ``qwen2``, ``mistral``, ``qwen3``, ``gemma2``, ``gemma3_text`` — and the
text part of a multimodal ``gemma3`` checkpoint (config.json with a ``text_config``; its language-model
weights are read through witscale/model/hf_names.py's ``checkpoint_to_hf_name``, and an export is a plain
``gemma3_text`` model). What each family changes in the network (norm style, extra norms, q/k norms, GeGLU,
embedding scale, attention scale, soft-capping, per-layer windows and RoPE bases) is derived in ONE place,
witscale/model/family.py, from these fields.

Defaults for absent keys follow what ``transformers`` itself assumes for each model type (e.g. Mistral's
``sliding_window`` is 4096 when the key is missing, but ``null`` means "no window"; Gemma's head_dim is 256
and Qwen3's 128, whatever hidden/heads), so that a config read here builds the same network
``AutoModelForCausalLM`` would. Anything this decoder does not implement is refused with a ValueError that
names the field, rather than silently computed differently.
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, field
from typing import Any, Optional

SUPPORTED = ("llama", "qwen2", "mistral", "qwen3", "gemma2", "gemma3_text")
GEMMA = ("gemma2", "gemma3_text")
_ARCH = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "mistral": "MistralForCausalLM",
         "qwen3": "Qwen3ForCausalLM", "gemma2": "Gemma2ForCausalLM", "gemma3_text": "Gemma3ForCausalLM"}
ROPE_TYPES = ("default", "linear", "llama3", "yarn")
_ROPE_REQUIRED = {"default": (), "linear": ("factor",),
                  "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"),
                  "yarn": ("original_max_position_embeddings", "factor")}
_YARN_OPTIONAL = ("attention_factor", "beta_fast", "beta_slow", "mscale", "mscale_all_dim", "truncate")
LAYER_TYPES = ("full_attention", "sliding_attention")
ACTIVATIONS = {"silu": "silu", "swish": "silu", "gelu_pytorch_tanh": "gelu_pytorch_tanh"}   # HF name → ours
# transformers' per-architecture defaults for keys that change the network when absent.
_HF_DEFAULT_KV_HEADS = {"llama": None, "qwen2": 32, "mistral": 8, "qwen3": 32, "gemma2": 4,
                        "gemma3_text": 4}    # None: = num_attention_heads
HF_DEFAULT_HEAD_DIM = {"qwen3": 128, "gemma2": 256, "gemma3_text": 256}   # others: hidden / heads
_HF_DEFAULT_WINDOW = {"mistral": 4096, "qwen2": 4096, "qwen3": 4096, "gemma2": 4096, "gemma3_text": 4096}
_HF_DEFAULT_THETA = {"gemma3_text": 1_000_000.0}
# (attn_logit_softcapping, final_logit_softcapping) when the key is absent; an explicit null means no cap.
_HF_DEFAULT_SOFTCAPS = {"gemma2": (50.0, 30.0), "gemma3_text": (None, None)}
_GEMMA3_LOCAL_THETA = 10_000.0
# A multimodal gemma3 config.json stores only the text_config fields that differ from Gemma3TextConfig's
# defaults (transformers writes a diff): these are the defaults it fills in.
GEMMA3_TEXT_DEFAULTS = dict(vocab_size=262_208, hidden_size=2304, intermediate_size=9216, num_hidden_layers=26,
                             num_attention_heads=8, num_key_value_heads=4, head_dim=256,
                             max_position_embeddings=131_072, rms_norm_eps=1e-6, query_pre_attn_scalar=256,
                             sliding_window=4096)
_TOKEN_IDS = ("bos_token_id", "eos_token_id", "pad_token_id")
# transformers' (bos, eos, pad) when the keys are absent (a multimodal gemma3's text_config omits them).
_HF_DEFAULT_TOKEN_IDS = {"llama": (1, 2, None), "mistral": (1, 2, None), "qwen2": (None, None, None),
                         "qwen3": (None, None, None), "gemma2": (2, 1, 0), "gemma3_text": (2, 1, 0)}
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
        layout = None
        if d.get("model_type") == "gemma3":
            if not isinstance(d.get("text_config"), dict):
                raise ValueError("model_type 'gemma3' needs a text_config (the language model's config)")
            # Only the language model is trained; its weights sit under a prefix (hf_names.py).
            text, outer = d["text_config"], d
            d = dict(GEMMA3_TEXT_DEFAULTS, **text)
            # The hub's text_configs omit the token ids; the outer config's (e.g. eos [1, 106]) win.
            d.update({k: outer[k] for k in _TOKEN_IDS if outer.get(k) is not None})
            d.update(model_type="gemma3_text",
                     tie_word_embeddings=text.get("tie_word_embeddings", outer.get("tie_word_embeddings", True)))
            layout = "gemma3_multimodal"
        model_type = d.get("model_type")
        if model_type not in SUPPORTED:
            raise ValueError(f"model_type {model_type!r} is not supported "
                             f"(supported: {', '.join(SUPPORTED)}, and gemma3's text part)")
        gemma = model_type in GEMMA
        # Gemma reads hidden_activation (transformers ignores its legacy hidden_act); the rest hidden_act.
        act_key = "hidden_activation" if gemma else "hidden_act"
        act = d.get(act_key) or ("gelu_pytorch_tanh" if gemma else "silu")
        if act not in ACTIVATIONS:
            raise ValueError(f"{act_key} {act!r} is not supported (supported: {', '.join(ACTIVATIONS)})")
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
        head_dim = d.get("head_dim") or HF_DEFAULT_HEAD_DIM.get(model_type)
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
        if model_type == "gemma3_text":
            rope_theta, rope_scaling, rope_local = _gemma3_rope(d, max_pos)
        else:
            rope_theta, rope_scaling = _rope(d, max_pos, _HF_DEFAULT_THETA.get(model_type, 10000.0))
        sliding, layer_types = _windows(model_type, d, layers)

        attn_bias = bool(d.get("attention_bias", False))
        if model_type == "qwen2" and "attention_bias" in d and not attn_bias:
            raise ValueError("attention_bias=false is not supported for qwen2 (its q/k/v always have a bias)")
        if model_type == "mistral" and (attn_bias or d.get("mlp_bias")):
            raise ValueError("attention_bias/mlp_bias are not Mistral fields (transformers ignores them): "
                             "remove them or use model_type llama")
        if d.get("mlp_bias") and model_type != "llama":
            raise ValueError(f"mlp_bias=true is not a {model_type} field (transformers ignores it): remove it")
        attn_default, final_default = _HF_DEFAULT_SOFTCAPS.get(model_type, (None, None))
        attn_softcap = _optional_positive(d, "attn_logit_softcapping", attn_default) if gemma else None
        if model_type == "gemma3_text" and attn_softcap is not None:
            # Gemma-3's attention in transformers never applies it: computing it here would differ from HF.
            raise ValueError("attn_logit_softcapping is not applied by Gemma-3 (transformers ignores it): "
                             "set it to null")
        final_softcap = _optional_positive(d, "final_logit_softcapping", final_default) if gemma else None
        if gemma and "query_pre_attn_scalar" in d and d["query_pre_attn_scalar"] is None:
            raise ValueError("query_pre_attn_scalar null is not supported (transformers refuses it too): give a "
                             "number, or leave the key out for transformers' default 256")
        scalar = _optional_positive(d, "query_pre_attn_scalar", 256) if gemma else None
        ids = {k: d.get(k, default) for k, default in zip(_TOKEN_IDS, _HF_DEFAULT_TOKEN_IDS[model_type])}
        extra = {k: v for k, v in d.items() if k not in set(cls.__dataclass_fields__) | _CONSUMED}
        if model_type in ("qwen2", "qwen3") and sliding is None:
            extra["sliding_window"] = d.get("sliding_window", _HF_DEFAULT_WINDOW[model_type])   # as read
        return cls(
            model_type=model_type, vocab_size=_positive_int(d, "vocab_size"), hidden_size=hidden,
            intermediate_size=_positive_int(d, "intermediate_size"), num_hidden_layers=layers,
            num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=head_dim,
            rms_norm_eps=float(d.get("rms_norm_eps", 1e-6)), rope_theta=rope_theta, rope_scaling=rope_scaling,
            attention_bias=model_type == "qwen2" or attn_bias,
            o_bias=model_type in ("llama", "qwen3") + GEMMA and attn_bias,
            mlp_bias=model_type == "llama" and bool(d.get("mlp_bias", False)),
            tie_word_embeddings=bool(d.get("tie_word_embeddings", gemma)),
            sliding_window=sliding, layer_types=layer_types, hidden_act=ACTIVATIONS[act],
            query_pre_attn_scalar=scalar, attn_logit_softcapping=attn_softcap,
            final_logit_softcapping=final_softcap, rope_local_base_freq=rope_local,
            max_position_embeddings=max_pos,
            initializer_range=float(d.get("initializer_range", 0.02)), **ids,
            torch_dtype=d.get("torch_dtype") or d.get("dtype"), checkpoint_layout=layout,
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
        mt = self.model_type
        d["architectures"] = [_ARCH[mt]]
        d["hidden_activation" if mt in GEMMA else "hidden_act"] = self.hidden_act
        if mt in ("qwen2", "mistral"):
            d.pop("attention_bias")             # implied by the architecture
        if mt != "llama":
            d.pop("mlp_bias")
        if mt in ("qwen2", "qwen3"):
            # transformers nulls sliding_window unless use_sliding_window; layer_types says which layers.
            d["use_sliding_window"] = self.sliding_window is not None
            d["sliding_window"] = (self.sliding_window if self.sliding_window is not None
                                   else self.extra.get("sliding_window", _HF_DEFAULT_WINDOW[mt]))
            if self.sliding_window is None:
                d.pop("layer_types")
        if mt in ("llama", "mistral"):
            d.pop("layer_types")
        if mt == "llama":
            d.pop("sliding_window")
        if mt not in GEMMA:
            for k in ("query_pre_attn_scalar", "attn_logit_softcapping", "final_logit_softcapping"):
                d.pop(k)
        if mt != "gemma3_text":
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


def _windows(model_type: str, d: dict, layers: int) -> tuple[Optional[int], Optional[list]]:
    """(sliding_window, layer_types) as transformers builds them for each family."""
    if model_type == "llama":
        return None, None
    window = d.get("sliding_window", _HF_DEFAULT_WINDOW[model_type])
    if model_type in ("qwen2", "qwen3") and not d.get("use_sliding_window"):
        window = None                      # transformers: no window unless use_sliding_window
    if window is not None:
        window = _positive_int({"sliding_window": window}, "sliding_window")
    if model_type == "mistral":
        return window, None                # one window for every layer (Mistral ignores layer_types)
    types = d.get("layer_types")
    if types is None:
        if model_type in ("qwen2", "qwen3"):
            first = d.get("max_window_layers", 28)
            types = ["sliding_attention" if window is not None and i >= first else "full_attention"
                     for i in range(layers)]
        else:                              # Gemma: every n-th layer global (Gemma-2 every 2nd, Gemma-3 every 6th)
            n = 2 if model_type == "gemma2" else int(d.get("sliding_window_pattern",
                                                           d.get("_sliding_window_pattern", 6)))
            types = ["sliding_attention" if (i + 1) % n else "full_attention" for i in range(layers)]
    if (not isinstance(types, list) or len(types) != layers or any(t not in LAYER_TYPES for t in types)):
        raise ValueError(f"layer_types must list {layers} entries of {' / '.join(LAYER_TYPES)}, got {types!r}")
    if window is None or "sliding_attention" not in types:
        # No layer is windowed: the plain causal model (kept without layer_types).
        return None, (types if model_type in GEMMA else None)
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


def _gemma3_rope(d: dict, max_pos: int) -> tuple[float, Optional[dict], float]:
    """Gemma-3's two RoPEs: (global theta, global scaling, local theta). transformers 5 writes
    ``rope_parameters = {"full_attention": {...}, "sliding_attention": {...}}``; older configs ``rope_theta``,
    ``rope_scaling`` (global layers only) and ``rope_local_base_freq``."""
    params = d.get("rope_parameters") if isinstance(d.get("rope_parameters"), dict) else {}
    full = dict(params.get("full_attention") or {})
    local = dict(params.get("sliding_attention") or {})
    if d.get("rope_scaling"):
        full.update(d["rope_scaling"])              # as transformers: the legacy key updates the global RoPE
    theta = full.get("rope_theta") or d.get("rope_theta") or _HF_DEFAULT_THETA["gemma3_text"]
    local_theta = local.get("rope_theta") or d.get("rope_local_base_freq") or _GEMMA3_LOCAL_THETA
    if _rope_scaling(local, max_pos, where="rope_parameters.sliding_attention") is not None:
        raise ValueError("rope_parameters.sliding_attention: only plain RoPE is supported on Gemma-3's "
                         "sliding layers")
    return float(theta), _rope_scaling(full, max_pos, where="rope_parameters.full_attention"), float(local_theta)
