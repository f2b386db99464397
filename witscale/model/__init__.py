"""The model: a LLaMA-family decoder on tensor-parallel layers, its config, and HF weight I/O."""
from __future__ import annotations

from witscale.model.config import ModelConfig
from witscale.model.transformer import CausalLM, dense_shapes

__all__ = ["ModelConfig", "CausalLM", "dense_shapes", "build_training_model", "load_model_weights"]


def build_training_model(config: ModelConfig, topo=None, *, activation_checkpointing: bool = False,
                         attention_backend: str = "auto") -> CausalLM:
    tp_group = topo.tp_group_or_none() if topo is not None else None
    return CausalLM(config, tp_group, attention_backend=attention_backend,
                    activation_checkpointing=activation_checkpointing)


def load_model_weights(model: CausalLM, config: ModelConfig, *, model_dir: str | None, seed: int,
                       topo=None) -> None:
    """Fill the (possibly TP-sharded, possibly ZeRO-3-partitioned) model from HF safetensors or a seeded init."""
    from witscale.model.hf_io import CheckpointFormatError, SafetensorsSource
    from witscale.model.materialize import materialize_parameters, seeded_dense
    from witscale.parallel.layers import shard_dense

    tp, tp_rank = (topo.tp, topo.tp_rank) if topo is not None else (1, 0)
    if model_dir is None:
        shapes = dense_shapes(config)

        def value(name, p):
            return shard_dense(p, seeded_dense(name, shapes[name], seed, config.initializer_range), tp_rank, tp)
    else:
        source = SafetensorsSource(model_dir)
        wanted = {n for n, _ in model.named_parameters()}
        unexpected = sorted(set(source.names()) - wanted - {"lm_head.weight"})
        if unexpected:
            raise CheckpointFormatError(f"{model_dir}: tensors the model does not have: {', '.join(unexpected[:5])}"
                                        + (" …" if len(unexpected) > 5 else ""))

        def value(name, p):
            return source.read_shard(name, getattr(p, "tp_split_dim", None), tp_rank, tp,
                                     getattr(p, "padded_dense_rows", None))
    materialize_parameters(model, value)
