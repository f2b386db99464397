"""The model: a LLaMA-family decoder on tensor-parallel layers, its pipeline stages, its config, HF names and
weight I/O (one load path: weights.py; one gather path: state.py)."""
from __future__ import annotations

from witscale.model.config import ModelConfig
from witscale.model.hf_io import CheckpointFormatError, save_hf_checkpoint, tp_slice_fn
from witscale.model.transformer import CausalLM, dense_shapes, packed_positions
from witscale.model.weights import init_weights, load_hf_weights, load_model_weights

__all__ = ["ModelConfig", "CausalLM", "CheckpointFormatError", "dense_shapes", "packed_positions",
           "init_weights", "load_hf_weights", "load_model_weights", "save_hf_checkpoint",
           "tp_slice_fn"]
