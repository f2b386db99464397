"""Rotary position embeddings (HF's rotate-half convention), with default, linear, Llama-3.1 and YaRN scaling.

``rope_parameters`` gives (inverse frequencies, attention factor); the factor (YaRN's mscale, 1.0 for the
others) multiplies cos and sin — as transformers does — which scales every attention logit by its square.
``RotaryEmbedding`` holds one RoPE's tables for a decoder (Gemma-3 has two: local and global).

Frequencies are computed in fp32 the way transformers (and Meta's reference code) compute them: the
checkpoints were trained with those exact fp32 values, and at positions in the thousands a more precise
(fp64) frequency would already move the phase by ~1e-4.
"""
from __future__ import annotations

import math

import torch


def rope_parameters(head_dim: int, theta: float, scaling: dict | None) -> tuple[torch.Tensor, float]:
    """(inverse frequencies [head_dim/2] fp32, attention factor) for a normalized rope_scaling dict
    (witscale/model/config.py) or None."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64, device="cpu").float() / head_dim))
    kind = (scaling or {}).get("rope_type", (scaling or {}).get("type", "default"))
    if kind == "yarn":
        return _yarn(inv_freq, head_dim, theta, scaling)
    if kind == "linear":
        inv_freq = inv_freq / float(scaling["factor"])
    elif kind == "llama3":
        # Llama 3.1: wavelengths longer than old_ctx/low are slowed by `factor`, shorter than old_ctx/high
        # kept, and the band between blended linearly in old_ctx/wavelength.
        factor = float(scaling["factor"])
        low, high = float(scaling["low_freq_factor"]), float(scaling["high_freq_factor"])
        old_ctx = float(scaling["original_max_position_embeddings"])
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > old_ctx / low, inv_freq / factor, inv_freq)
        smooth = (old_ctx / wavelen - low) / (high - low)
        blended = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= old_ctx / high) & (wavelen <= old_ctx / low)
        inv_freq = torch.where(medium, blended, scaled)
    elif kind != "default":
        raise ValueError(f"rope_type {kind!r} is not supported")
    return inv_freq, 1.0


def _yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def _yarn(inv_freq: torch.Tensor, head_dim: int, theta: float, scaling: dict) -> tuple[torch.Tensor, float]:
    """YaRN (Peng et al. 2023): dimensions rotating more than beta_fast times over the original context keep
    their frequency (extrapolation), those rotating fewer than beta_slow times are divided by ``factor``
    (interpolation), with a linear ramp between; cos/sin are scaled by the attention factor
    0.1·ln(factor)+1 (or the mscale / mscale_all_dim ratio, DeepSeek style; or an explicit attention_factor)."""
    factor = float(scaling["factor"])
    old_ctx = float(scaling["original_max_position_embeddings"])
    attention = scaling.get("attention_factor")
    if attention is None:
        mscale, mscale_all = scaling.get("mscale"), scaling.get("mscale_all_dim")
        attention = (_yarn_mscale(factor, mscale) / _yarn_mscale(factor, mscale_all) if mscale and mscale_all
                     else _yarn_mscale(factor))
    beta_fast, beta_slow = scaling.get("beta_fast") or 32.0, scaling.get("beta_slow") or 1.0

    def correction_dim(rotations: float) -> float:     # the dimension that turns ``rotations`` times over old_ctx
        return head_dim * math.log(old_ctx / (rotations * 2 * math.pi)) / (2 * math.log(theta))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if scaling.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, head_dim - 1)
    if low == high:
        high += 0.001                                   # no zero-width ramp
    # device="cpu" as in rope_parameters: a model built under torch.device("meta") (the offline export)
    # still gets real frequencies
    ramp = ((torch.arange(head_dim // 2, dtype=torch.float32, device="cpu") - low) / (high - low)).clamp(0, 1)
    extrapolate = 1 - ramp
    # Written as transformers does (1 / (factor · θ^(2i/d))), so that the frequencies are bit-identical.
    pos_freqs = theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64, device="cpu").float() / head_dim)
    interpolated = 1.0 / (factor * pos_freqs)
    return interpolated * (1 - extrapolate) + inv_freq * extrapolate, float(attention)


def rope_cos_sin(position_ids: torch.Tensor, inv_freq: torch.Tensor, dtype: torch.dtype,
                 attention_factor: float = 1.0):
    """cos, sin of shape [B, S, head_dim] for integer positions, computed in fp32 (times the attention
    factor, as transformers), returned in ``dtype``."""
    with torch.autocast(device_type=position_ids.device.type, enabled=False):
        freqs = position_ids.float()[..., None] * inv_freq.float().to(position_ids.device)[None, None, :]
        emb = torch.cat([freqs, freqs], dim=-1)
        cos, sin = emb.cos(), emb.sin()
        if attention_factor != 1.0:
            cos, sin = cos * attention_factor, sin * attention_factor
        return cos.to(dtype), sin.to(dtype)


class RotaryEmbedding:
    """One RoPE's frequencies and attention factor. Not a module and not a buffer: ``model.to(bf16)`` (and
    DeepSpeed's bf16 wrapping) would cast a buffer, and bf16 frequencies put RoPE phases off by whole
    radians at long positions. Moved to the activations' device on first use."""

    def __init__(self, head_dim: int, theta: float, scaling: dict | None):
        self.inv_freq, self.attention_factor = rope_parameters(head_dim, theta, scaling)

    def cos_sin(self, position_ids: torch.Tensor, dtype: torch.dtype):
        if self.inv_freq.device != position_ids.device:
            self.inv_freq = self.inv_freq.to(position_ids.device)
        return rope_cos_sin(position_ids, self.inv_freq, dtype, self.attention_factor)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat([-x[..., half:], x[..., :half]], dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [B, S, heads, head_dim]; cos/sin [B, S, head_dim]."""
    return x * cos[:, :, None, :] + _rotate_half(x) * sin[:, :, None, :]
