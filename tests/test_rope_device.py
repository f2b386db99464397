"""RoPE tables are real CPU tensors even when the model is built under ``torch.device("meta")``, as the offline
export (tools/export_hf.py → training/export.py ``CheckpointReader``) builds it to read the TP split dims: a
YaRN checkpoint (Qwen3 long context) could not be exported offline before (RuntimeError: meta vs cpu)."""
from __future__ import annotations

import pytest
import torch

SCALINGS = {
    "yarn": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64},
    "llama3": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 64},
    "linear": {"rope_type": "linear", "factor": 2.0},
}


@pytest.mark.parametrize("kind", sorted(SCALINGS))
def test_rope_tables_under_the_meta_device_equal_the_cpu_ones(kind):
    from witscale.model.rope import RotaryEmbedding
    cpu = RotaryEmbedding(16, 10000.0, SCALINGS[kind])
    with torch.device("meta"):
        meta = RotaryEmbedding(16, 10000.0, SCALINGS[kind])
    assert meta.inv_freq.device.type == "cpu" and torch.equal(meta.inv_freq, cpu.inv_freq)
    assert meta.attention_factor == cpu.attention_factor


def test_a_yarn_qwen3_builds_on_the_meta_device():
    from witscale.model import ModelConfig
    from witscale.model.transformer import CausalLM
    cfg = ModelConfig.from_dict({"model_type": "qwen3", "vocab_size": 64, "hidden_size": 32, "intermediate_size": 64,
                                 "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
                                 "head_dim": 8, "max_position_embeddings": 256,
                                 "rope_parameters": dict(SCALINGS["yarn"], rope_theta=10000.0)})
    with torch.device("meta"):
        model = CausalLM(cfg)
    assert all(p.device.type == "meta" for p in model.parameters())
