"""The model: a LLaMA-family decoder on tensor-parallel layers, its config, and HF weight I/O."""
from __future__ import annotations

from witscale.model.config import ModelConfig
from witscale.model.hf_io import CheckpointFormatError, load_hf_weights, save_hf_checkpoint, tp_slice_fn
from witscale.model.transformer import CausalLM, dense_shapes, packed_positions

__all__ = ["ModelConfig", "CausalLM", "CheckpointFormatError", "dense_shapes", "packed_positions",
           "build_training_model", "init_weights", "load_hf_weights", "load_model_weights", "save_hf_checkpoint",
           "tp_slice_fn"]


def construction_context(ds_config: dict, topo):
    """Where to build the model: under ZeRO-3, ``zero.Init`` partitions every parameter over the
    data-parallel group as soon as its layer exists (no rank ever holds the whole model); otherwise a no-op.
    The group must be passed explicitly: ``zero.Init`` uses ``mpu`` only for the config and would otherwise
    partition over the whole world — mixing different tensor-parallel shards."""
    import contextlib

    from witscale.training.ds_config import zero_stage
    if zero_stage(ds_config) != 3:
        return contextlib.nullcontext()
    import deepspeed
    return deepspeed.zero.Init(config_dict_or_path=ds_config, mpu=topo,
                               data_parallel_group=topo.get_data_parallel_group())


def build_training_model(config: ModelConfig, topo=None, *, activation_checkpointing: bool = False,
                         attention_backend: str = "auto") -> CausalLM:
    tp_group = topo.tp_group_or_none() if topo is not None else None
    return CausalLM(config, tp_group, attention_backend=attention_backend,
                    activation_checkpointing=activation_checkpointing)


def init_weights(model: CausalLM, seed: int, tp_rank: int = 0, tp: int = 1) -> None:
    """Seeded random init from the config: N(0, initializer_range) matrices, unit norms, zero biases.
    Drawn per parameter name at the dense shape, then sliced: every layout gets the same dense weights."""
    from witscale.model.materialize import materialize_parameters, seeded_dense
    from witscale.parallel.layers import shard_dense

    shapes = dense_shapes(model.config)
    std = model.config.initializer_range
    materialize_parameters(model, lambda name, p: shard_dense(p, seeded_dense(name, shapes[name], seed, std),
                                                               tp_rank, tp))


def load_model_weights(model: CausalLM, config: ModelConfig, *, model_dir: str | None, seed: int,
                       topo=None) -> None:
    """Fill the (possibly TP-sharded, possibly ZeRO-3-partitioned) model from HF safetensors or a seeded init."""
    tp, tp_rank = (topo.tp, topo.tp_rank) if topo is not None else (1, 0)
    if model_dir is None:
        init_weights(model, seed, tp_rank, tp)
    else:
        load_hf_weights(model, model_dir, tp_slice_fn(model, tp_rank, tp))
