"""Model families: one ``Family`` record per HF ``model_type``, and the rules derived from a ModelConfig.

**The records** (``FAMILIES``, ``register_family``) hold everything witscale knows about a family, in one
place: the defaults transformers assumes for absent config.json keys, which keys the family reads and which it
refuses, the architecture written on export, and the decoder's rules (norm style, extra norms, q/k norms,
embedding scale). Every consumer reads the record and none tests ``model_type`` itself: ``ModelConfig.from_dict``
/ ``to_hf_dict`` (config.py), ``family_spec`` below (→ transformer.py, pipeline.py, weights.py), ``ModelShape``
(shape.py → planner, MFU, tools/plan.py) and hf_names.py (checkpoint layouts). The record's defaults are
Llama's, so a Llama-like family is ``Family(model_type=..., architecture=..., title=...)`` plus what differs;
``model_type_error`` refuses any other in one line naming the supported families. ``WRAPPERS`` holds the
configs that wrap a text model (a multimodal Gemma-3): only the text model is read, trained and exported.

**The derived rules** (``family_spec(cfg)``): what the decoder does per layer, from the record and the config:

| rule                         | llama / mistral / qwen2 | qwen3          | gemma2              | gemma3_text            |
|------------------------------|-------------------------|----------------|---------------------|------------------------|
| RMSNorm                      | x̂·w (w around 1)        | x̂·w            | x̂·(1 + w) in fp32   | x̂·(1 + w) in fp32      |
| norms per layer              | 2                       | 2 + q/k norms  | 4                   | 4 + q/k norms          |
| MLP                          | SwiGLU                  | SwiGLU         | GeGLU (tanh)        | GeGLU (tanh)           |
| embeddings × √hidden         | no                      | no             | yes (model dtype)   | yes (model dtype)      |
| attention scale              | head_dim^-½             | head_dim^-½    | query_pre_attn_scalar^-½ | the same          |
| attention / final soft-cap   | no                      | no             | attn 50, final 30 † | none by default        |
| sliding layers               | Mistral: all            | per layer_types| every 2nd global    | every 6th global       |
| RoPE base per layer          | one                     | one            | one                 | local (sliding) / global |

† transformers' Gemma2Config defaults when the keys are absent; an explicit null means no cap.

x̂ = x / rms(x), computed in fp32. Gemma stores its norm weights around 0 (the neutral value is 0, not 1).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import TYPE_CHECKING, Optional

if TYPE_CHECKING:                    # config.py imports the records from here
    from witscale.model.config import ModelConfig

# Family.windows: how the sliding-window layers are decided.
WINDOW_RULES = ("none",          # no window (Llama)
                "uniform",       # one window (sliding_window) on every layer (Mistral)
                "from_layer",    # with use_sliding_window: layers ≥ max_window_layers, or layer_types (Qwen)
                "interleaved")   # layer_types, else every n-th layer global and the others sliding (Gemma)
# Family.qkv_bias: where the q/k/v biases come from.
QKV_BIAS_RULES = ("attention_bias",   # as the attention_bias key says (off when absent)
                  "always",           # always there; attention_bias=false refused (Qwen2)
                  "refused")          # attention_bias / mlp_bias are not the family's keys: refused (Mistral)


@dataclass(frozen=True)
class Family:
    """Everything witscale knows about one model_type. Defaults are Llama's."""
    model_type: str                  # config.json's model_type
    architecture: str                # config.json's "architectures" on export (the transformers class)
    title: str = ""                  # the name in messages ("Gemma-3"); model_type when empty
    # -- config.json defaults: what transformers assumes when the key is absent
    default_kv_heads: Optional[int] = None       # None: = num_attention_heads
    default_head_dim: Optional[int] = None       # None: hidden_size / num_attention_heads
    default_rope_theta: float = 10000.0
    default_token_ids: tuple = (1, 2, None)      # (bos, eos, pad)
    default_tie_word_embeddings: bool = False
    default_activation: str = "silu"
    activation_key: str = "hidden_act"           # Gemma: hidden_activation (transformers ignores its hidden_act)
    # -- biases
    qkv_bias: str = "attention_bias"             # one of QKV_BIAS_RULES
    o_bias: bool = True                          # attention_bias covers o_proj too
    mlp_bias: bool = True                        # reads mlp_bias (elsewhere mlp_bias=true is refused)
    # -- sliding windows
    windows: str = "none"                        # one of WINDOW_RULES
    default_window: Optional[int] = 4096         # sliding_window when the key is absent
    default_max_window_layers: int = 28          # "from_layer": the first sliding layer when the key is absent
    global_every: int = 6                        # "interleaved": every n-th layer is global ...
    global_every_keys: tuple = ()                # ... unless one of these keys says otherwise
    # -- attention
    default_query_pre_attn_scalar: Optional[float] = None   # reads query_pre_attn_scalar (absent: this); None: not read
    reads_softcaps: bool = False                 # reads attn_logit_softcapping / final_logit_softcapping
    default_softcaps: tuple = (None, None)       # (attention, final) when the keys are absent; null: no cap
    applies_attn_softcap: bool = True            # False: a non-null attention soft-cap is refused (HF ignores it)
    # -- the decoder (family_spec)
    norm_offset: float = 0.0                     # RMSNorm multiplies by (offset + w): Gemma 1.0
    sandwich_norms: bool = False                 # post-attention/pre- and post-feed-forward norms (Gemma)
    qk_norm: bool = False                        # per-head RMSNorm of q and k before RoPE (Qwen3, Gemma-3)
    embed_scale: bool = False                    # embeddings × √hidden in the model dtype (Gemma)
    # -- RoPE
    local_rope_theta: Optional[float] = None     # a second, plain RoPE on the sliding layers (Gemma-3: its default
                                                 # base, rope_local_base_freq); None: one RoPE for all layers

    def __post_init__(self):
        if self.windows not in WINDOW_RULES or self.qkv_bias not in QKV_BIAS_RULES:
            raise ValueError(f"family {self.model_type!r}: windows must be one of {WINDOW_RULES} and qkv_bias one "
                             f"of {QKV_BIAS_RULES}, got {self.windows!r} / {self.qkv_bias!r}")

    @property
    def name(self) -> str:
        return self.title or self.model_type


_GEMMA = dict(default_kv_heads=4, default_head_dim=256, default_token_ids=(2, 1, 0),
              default_tie_word_embeddings=True, default_activation="gelu_pytorch_tanh",
              activation_key="hidden_activation", windows="interleaved", default_query_pre_attn_scalar=256,
              reads_softcaps=True, norm_offset=1.0, sandwich_norms=True, embed_scale=True)
_QWEN = dict(default_kv_heads=32, default_token_ids=(None, None, None), mlp_bias=False, windows="from_layer")

FAMILIES: dict[str, Family] = {}


def register_family(family: Family) -> Family:
    """Add a family (its tests: docs/model-families.md's checklist). A model_type is registered once."""
    if family.model_type in FAMILIES or family.model_type in WRAPPERS:
        raise ValueError(f"model_type {family.model_type!r} is already registered")
    FAMILIES[family.model_type] = family
    return family


def model_type_error(model_type) -> ValueError:
    wrapped = "".join(f", and {w.model_type}'s text model" for w in WRAPPERS.values())
    return ValueError(f"model_type {model_type!r} is not supported (supported: {', '.join(FAMILIES)}{wrapped})")


def get_family(model_type) -> Family:
    """The record of a text model_type; a ValueError naming the supported ones for any other."""
    family = FAMILIES.get(model_type) if isinstance(model_type, str) else None
    if family is None:
        raise model_type_error(model_type)
    return family


@dataclass(frozen=True)
class Wrapper:
    """A config.json that wraps a text model (``text_config``) with other parts (a vision tower): only the text
    model is read and trained; its tensors are stored under other names (hf_names.checkpoint_to_hf_name)."""
    model_type: str                  # the outer model_type
    text_model_type: str             # the text model's family (what an export is)
    layout: str                      # ModelConfig.checkpoint_layout
    text_defaults: tuple             # (key, value) transformers fills into the text_config (hub configs store a diff)
    renames: tuple                   # (stored prefix, the text model's HF prefix)
    other_parts: tuple               # prefixes of the other parts' tensors (not read)


WRAPPERS: dict[str, Wrapper] = {}
_TOKEN_IDS = ("bos_token_id", "eos_token_id", "pad_token_id")


def unwrap(d: dict) -> tuple[dict, Optional[Wrapper]]:
    """(the text model's config dict, its wrapper or None) of a config.json dict."""
    wrapper = WRAPPERS.get(d.get("model_type"))
    if wrapper is None:
        return d, None
    if not isinstance(d.get("text_config"), dict):
        raise ValueError(f"model_type {wrapper.model_type!r} needs a text_config (the language model's config)")
    text, outer = d["text_config"], d
    d = dict(dict(wrapper.text_defaults), **text)
    # The hub's text_configs omit the token ids; the outer config's (e.g. eos [1, 106]) win.
    d.update({k: outer[k] for k in _TOKEN_IDS if outer.get(k) is not None})
    d["model_type"] = wrapper.text_model_type
    if "tie_word_embeddings" not in text and "tie_word_embeddings" in outer:
        d["tie_word_embeddings"] = outer["tie_word_embeddings"]
    return d, wrapper


def wrapper_of_layout(layout: str) -> Wrapper:
    for wrapper in WRAPPERS.values():
        if wrapper.layout == layout:
            return wrapper
    raise ValueError(f"unknown checkpoint layout {layout!r}")


for _family in (
        Family("llama", "LlamaForCausalLM", "Llama", default_window=None),
        Family("qwen2", "Qwen2ForCausalLM", "Qwen2", qkv_bias="always", o_bias=False, **_QWEN),
        Family("mistral", "MistralForCausalLM", "Mistral", default_kv_heads=8, qkv_bias="refused", o_bias=False,
               mlp_bias=False, windows="uniform"),
        Family("qwen3", "Qwen3ForCausalLM", "Qwen3", default_head_dim=128, qk_norm=True, **_QWEN),
        Family("gemma2", "Gemma2ForCausalLM", "Gemma-2", mlp_bias=False, global_every=2,
               default_softcaps=(50.0, 30.0), **_GEMMA),
        Family("gemma3_text", "Gemma3ForCausalLM", "Gemma-3", mlp_bias=False,
               global_every_keys=("sliding_window_pattern", "_sliding_window_pattern"), applies_attn_softcap=False,
               qk_norm=True, default_rope_theta=1_000_000.0, local_rope_theta=10_000.0, **_GEMMA)):
    register_family(_family)

# A multimodal Gemma-3 (Gemma3ForConditionalGeneration): transformers saves its language model as
# language_model.model.* (its module names: model.language_model.*).
WRAPPERS["gemma3"] = Wrapper(
    "gemma3", "gemma3_text", "gemma3_multimodal",
    text_defaults=(("vocab_size", 262_208), ("hidden_size", 2304), ("intermediate_size", 9216),
                   ("num_hidden_layers", 26), ("num_attention_heads", 8), ("num_key_value_heads", 4),
                   ("head_dim", 256), ("max_position_embeddings", 131_072), ("rms_norm_eps", 1e-6),
                   ("query_pre_attn_scalar", 256), ("sliding_window", 4096)),
    renames=(("language_model.model.", "model."), ("model.language_model.", "model."),
             ("language_model.lm_head.", "lm_head.")),
    other_parts=("vision_tower.", "multi_modal_projector.", "model.vision_tower.", "model.multi_modal_projector."))


# ---- the rules derived from a config ----------------------------------------------------------------------

@dataclass(frozen=True)
class RopeSpec:
    theta: float
    scaling_json: Optional[str]      # the normalized rope_scaling dict as JSON (hashable), None = plain RoPE

    @property
    def scaling(self) -> Optional[dict]:
        return None if self.scaling_json is None else json.loads(self.scaling_json)


@dataclass(frozen=True)
class LayerSpec:
    sliding_window: Optional[int]    # None: full causal attention
    rope_index: int                  # index into FamilySpec.ropes


@dataclass(frozen=True)
class FamilySpec:
    norm_offset: float               # RMSNorm multiplies by (offset + w): 1.0 for Gemma, 0.0 otherwise
    sandwich_norms: bool             # Gemma: pre/post feed-forward norms and a post-attention norm on the branch
    qk_norm: bool                    # Qwen3 / Gemma-3: per-head RMSNorm of q and k before RoPE
    activation: str                  # "silu" or "gelu_pytorch_tanh"
    embed_scale: Optional[float]     # Gemma: √hidden, applied in the model dtype
    attn_scale: Optional[float]      # None: head_dim ** -0.5 (the kernels' default)
    attn_softcap: Optional[float]
    final_softcap: Optional[float]
    ropes: tuple[RopeSpec, ...]      # the distinct RoPEs (Gemma-3: global and local); cos/sin computed once each
    layers: tuple[LayerSpec, ...]

    @property
    def norm_init(self) -> float:
        """The neutral (initial) value of a norm weight: 1 for x·w, 0 for Gemma's x·(1 + w)."""
        return 1.0 - self.norm_offset


def family_spec(cfg: "ModelConfig") -> FamilySpec:
    family = get_family(cfg.model_type)
    global_rope = RopeSpec(float(cfg.rope_theta),
                           None if cfg.rope_scaling is None else json.dumps(cfg.rope_scaling, sort_keys=True))
    ropes = [global_rope]
    if cfg.rope_local_base_freq is not None:
        ropes.append(RopeSpec(float(cfg.rope_local_base_freq), None))
    layers = []
    for i in range(cfg.num_hidden_layers):
        sliding = cfg.layer_type(i) == "sliding_attention"
        # Gemma-3: sliding layers use the local RoPE base, global layers the global one (with its scaling).
        rope = 1 if (sliding and len(ropes) > 1) else 0
        layers.append(LayerSpec(cfg.sliding_window if sliding else None, rope))
    return FamilySpec(
        norm_offset=family.norm_offset,
        sandwich_norms=family.sandwich_norms,
        qk_norm=family.qk_norm,
        activation=cfg.hidden_act,
        embed_scale=float(cfg.hidden_size) ** 0.5 if family.embed_scale else None,
        attn_scale=float(cfg.query_pre_attn_scalar) ** -0.5 if cfg.query_pre_attn_scalar else None,
        attn_softcap=cfg.attn_logit_softcapping,
        final_softcap=cfg.final_logit_softcapping,
        ropes=tuple(ropes), layers=tuple(layers))
