"""What each model family changes in the decoder, derived from a ModelConfig in one place.

The dense ``CausalLM`` (transformer.py), the pipeline blocks (pipeline.py), the seeded init (weights.py),
the parameter shapes (transformer.py ``dense_shapes``) and the FLOP/parameter counts (shape.py) all read
these rules from ``family_spec(cfg)`` instead of testing ``model_type`` themselves:

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
from typing import Optional

from witscale.model.config import GEMMA, ModelConfig


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


def family_spec(cfg: ModelConfig) -> FamilySpec:
    gemma = cfg.model_type in GEMMA
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
        norm_offset=1.0 if gemma else 0.0,
        sandwich_norms=gemma,
        qk_norm=cfg.model_type in ("qwen3", "gemma3_text"),
        activation=cfg.hidden_act,
        embed_scale=float(cfg.hidden_size) ** 0.5 if gemma else None,
        attn_scale=float(cfg.query_pre_attn_scalar) ** -0.5 if cfg.query_pre_attn_scalar else None,
        attn_softcap=cfg.attn_logit_softcapping,
        final_softcap=cfg.final_logit_softcapping,
        ropes=tuple(ropes), layers=tuple(layers))
