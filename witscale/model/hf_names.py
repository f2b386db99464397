"""HF parameter names, in one place: witscale's module names ↔ the names of an HF checkpoint.

The dense ``CausalLM`` uses HF's names as they are (``model.layers.0.self_attn.q_proj.weight`` …); the
pipeline's ``PipelineModule`` numbers its blocks (0 = embedding, 1…L = decoder layers, L+1 = final norm,
L+2 = LM head; a tied embedding lives in ``tied_modules.embed``). ``hf_name_fn(module)`` gives the
mapping for either, so loading (witscale/model/weights.py) and export (witscale/model/state.py) have one
path for both. Every family's names are HF's own (Qwen3/Gemma-3 ``self_attn.q_norm.weight``, Gemma's
``pre_feedforward_layernorm.weight`` …): the layer mapping is the same for all.

``checkpoint_to_hf_name(cfg)`` maps the names a checkpoint stores to the text model's HF names when they
differ, by the renames of the config's wrapper record (witscale/model/family.py ``WRAPPERS``): a multimodal
Gemma-3 (``Gemma3ForConditionalGeneration``) keeps its language model under ``language_model.model.`` (as
transformers saves it) or ``model.language_model.`` (its module names); the vision tower and projector are not
part of the text model. An export is always the text model (``gemma3_text``, plain names).
"""
from __future__ import annotations

import re
from typing import Callable, Optional

from witscale.model.config import ModelConfig
from witscale.model.family import wrapper_of_layout


def hf_name_fn(module) -> Callable[[str], str]:
    """module parameter name → HF name, for a dense CausalLM or a witscale PipelineModule."""
    if getattr(module, "is_witscale_pipeline", False):
        cfg = module.config
        return lambda name: pipe_to_hf_name(name, cfg)
    return lambda name: name


_LAYER = re.compile(r"^(\d+)\.(.+)$")


def pipe_to_hf_name(name: str, cfg: ModelConfig) -> str:
    """``PipelineModule`` parameter name → HF name."""
    if name.startswith("tied_modules.embed."):
        rest = name[len("tied_modules.embed."):]
        return "model.embed_tokens.weight" if rest in ("embed_tokens.weight", "lm_head.weight") else _bad(name)
    m = _LAYER.match(name)
    if not m:
        return _bad(name)
    idx, rest = int(m.group(1)), m.group(2)
    n = cfg.num_hidden_layers
    if idx == 0 and rest == "embed_tokens.weight":
        return "model.embed_tokens.weight"
    if 1 <= idx <= n:
        return f"model.layers.{idx - 1}.{rest}"
    if idx == n + 1 and rest == "norm.weight":
        return "model.norm.weight"
    if idx == n + 2 and rest == "lm_head.weight":
        return "lm_head.weight"
    return _bad(name)


def hf_to_pipe_name(name: str, cfg: ModelConfig) -> str:
    """HF name → ``PipelineModule`` parameter name (the first stage's copy for a tied embedding)."""
    n = cfg.num_hidden_layers
    if name == "model.embed_tokens.weight":
        return "tied_modules.embed.embed_tokens.weight" if cfg.tie_word_embeddings else "0.embed_tokens.weight"
    if name == "model.norm.weight":
        return f"{n + 1}.norm.weight"
    if name == "lm_head.weight" and not cfg.tie_word_embeddings:
        return f"{n + 2}.lm_head.weight"
    m = re.match(r"^model\.layers\.(\d+)\.(.+)$", name)
    if m and int(m.group(1)) < n:
        return f"{int(m.group(1)) + 1}.{m.group(2)}"
    return _bad(name)


def checkpoint_to_hf_name(cfg: ModelConfig) -> Optional[Callable[[str], Optional[str]]]:
    """For a checkpoint layout whose names are not the text model's: stored name → HF name, or None for a
    tensor of another part (skipped). None when the names are HF's already. An unknown name is returned as it
    is, so that the strict load reports it."""
    if cfg.checkpoint_layout is None:
        return None
    wrapper = wrapper_of_layout(cfg.checkpoint_layout)

    def rename(name: str) -> Optional[str]:
        for stored, hf in wrapper.renames:
            if name.startswith(stored):
                return hf + name[len(stored):]
        return None if name.startswith(wrapper.other_parts) else name
    return rename


def _bad(name: str) -> str:
    raise KeyError(f"{name}: not a parameter name of the witscale pipeline / HF model")
