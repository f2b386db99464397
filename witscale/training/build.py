"""The module DeepSpeed wraps, built and filled in one place for every layout.

Dense (``CausalLM``, tensor-parallel layers; under ZeRO-3 created partitioned inside ``zero.Init``) or a
pipeline stage (DeepSpeed ``PipelineModule``, --pp > 1); then its weights from HF safetensors or the seeded
init through the one load path (witscale/model/weights.py).
"""
from __future__ import annotations

import contextlib
import logging
from typing import Optional

import torch

from witscale.model import ModelConfig, load_model_weights
from witscale.model.transformer import CausalLM, compile_decoder_blocks
from witscale.parallel.layers import skip_init
from witscale.training.ds_config import zero_stage

log = logging.getLogger("witscale")


def construction_context(ds_config: dict, topo):
    """Where to build the model: under ZeRO-3, ``zero.Init`` partitions every parameter over the
    data-parallel group as soon as its layer exists (no rank ever holds the whole model); otherwise a no-op.
    The group must be passed explicitly: ``zero.Init`` uses ``mpu`` only for the config and would otherwise
    partition over the whole world — mixing different tensor-parallel shards."""
    if zero_stage(ds_config) != 3:
        return contextlib.nullcontext()
    import deepspeed

    class PartitionWithoutBroadcast(deepspeed.zero.Init):
        """``zero.Init`` broadcasts each new parameter from rank 0 before partitioning it, so that random
        inits agree: every other rank then writes the whole parameter (the size of the largest layer, the
        128k-vocabulary embedding at 70B) and the group sends the model once over the network. witscale
        writes every partition right after (weights.py), so the broadcast only costs: skipped."""

        def _zero_init_param(self, param):
            self._convert_to_deepspeed_param(param)
            param.partition()

    init_class = (PartitionWithoutBroadcast if hasattr(deepspeed.zero.Init, "_zero_init_param")
                  and hasattr(deepspeed.zero.Init, "_convert_to_deepspeed_param") else deepspeed.zero.Init)
    # Partitioned over dp × sp (the dp group at sp = 1), as DeepSpeed's engine partitions under --sp.
    return init_class(config_dict_or_path=ds_config, mpu=topo,
                      data_parallel_group=topo.get_sequence_data_parallel_group())


@contextlib.contextmanager
def _materialize_on(device: torch.device, dtype: torch.dtype):
    """Parameters created inside are allocated on ``device`` in ``dtype`` and left uninitialized."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device), skip_init():
            yield
    finally:
        torch.set_default_dtype(previous)


def training_device() -> torch.device:
    """The device DeepSpeed's engine will use for this rank: its local GPU, or the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def build_module(config: ModelConfig, topo, ds_config: dict, *, model_dir: Optional[str], seed: int,
                 pp_partition: str = "uniform", attention: str = "auto", activation_checkpointing: bool = False,
                 grow_vocab_from: Optional[int] = None, compile_blocks: bool = False,
                 tp_sequence_parallel: bool = False, tiled_mlp: int = 1):
    """This rank's module (whole model or pipeline stage), weights loaded.

    Memory: each rank allocates only what it keeps — its tensor-parallel shard, its pipeline stage, under
    ZeRO-3 its partition (``zero.Init``) — directly on its device and in the training dtype (bf16 when the
    config says so), with no random init that the load would overwrite (``skip_init``). The load then
    writes every parameter once (docs/parallel-layout.md). ``grow_vocab_from``: the vocabulary size of
    ``model_dir``, smaller than ``config``'s (data packed with --add-special-tokens): the new rows start
    from the mean of the old ones (witscale/model/grow.py). ``tiled_mlp`` (--tiled-mlp): each block's MLP over
    that many sequence tiles (witscale/model/memory.py). ``compile_blocks`` (--compile): each decoder block
    compiled in place once its weights are in (transformer.py ``compile_decoder_blocks``).
    ``tp_sequence_parallel`` (--tp-sequence-parallel resolved on, tp > 1): the decoder's sequence-sharded TP
    regions (transformer.py, pipeline.py); the same parameters either way."""
    dtype = torch.bfloat16 if (ds_config.get("bf16") or {}).get("enabled") is True else torch.float32
    with _materialize_on(training_device(), dtype):
        if topo.pp > 1:
            from witscale.model.pipeline import build_pipeline_module
            module = build_pipeline_module(config, topo, partition=pp_partition, attention_backend=attention,
                                           activation_checkpointing=activation_checkpointing,
                                           tp_sequence_parallel=tp_sequence_parallel)
        else:
            with construction_context(ds_config, topo):
                module = CausalLM(config, topo.tp_group_or_none(), attention_backend=attention,
                                  activation_checkpointing=activation_checkpointing,
                                  sp_group=getattr(topo, "sp_group", None),
                                  tp_sequence_parallel=tp_sequence_parallel, tiled_mlp=tiled_mlp)
    load_model_weights(module, config, model_dir=model_dir, seed=seed, topo=topo, grow_from=grow_vocab_from)
    if _global_rank() == 0:
        _log_memory_options(module)
    if compile_blocks:
        compiled = compile_decoder_blocks(module)
        if _global_rank() == 0:
            log.info(f"--compile: {compiled} decoder blocks compiled with torch.compile (on their first step)")
    if grow_vocab_from and model_dir and _global_rank() == 0:
        new = config.vocab_size - grow_vocab_from
        log.info(f"grew the vocabulary from {grow_vocab_from} to {config.vocab_size}: {new} new tokens, "
                 f"mean-initialised")
    return module


def _global_rank() -> int:
    import torch.distributed as dist
    return dist.get_rank() if dist.is_initialized() else 0


def _log_memory_options(module) -> None:
    """What the model itself runs of --activation-checkpointing offload and --tiled-mlp (memory.py)."""
    from witscale.model.transformer import DecoderLayer
    decoder = getattr(module, "model", None)
    if getattr(decoder, "activation_checkpointing", None) == "offload":
        log.info("--activation-checkpointing offload: each decoder block's input waits in host memory until backward")
    tiles = [m.mlp_tiles for m in module.modules() if isinstance(m, DecoderLayer) and m.mlp_tiles > 1]
    if tiles:
        log.info(f"--tiled-mlp {max(tiles)}: the MLP of {len(tiles)} decoder blocks runs over sequence tiles")
