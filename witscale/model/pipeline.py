"""Pipeline parallelism: the decoder as a DeepSpeed ``PipelineModule`` (tp × pp × dp, ZeRO-0/1).

The pipeline is the same blocks as ``CausalLM``, as a flat list DeepSpeed places on the stages:

    0          EmbeddingPipe      (input_ids, position_ids, cu_seqlens) → (hidden, position_ids, cu_seqlens)
    1 … L      DecoderLayerPipe   (hidden, position_ids, cu_seqlens) → the same, transformed
    L+1        FinalNormPipe      → hidden
    L+2        LMHeadPipe         → hidden (the head's matmul runs inside the loss, fused with the CE)

Only tensors travel between stages: attention takes the row length as its ``max_seqlen`` bound, and
RoPE's cos/sin are recomputed in each layer from the position ids (with the layer's own RoPE: Gemma-3's
local and global bases). Every family rule (norms, embedding scale, per-layer windows, soft-capping) comes
from the same ``family_spec`` as the dense ``CausalLM``, through transformer.py's builders. Labels, weights, target classes and the loss scale go
straight from the data iterator to the last stage (DeepSpeed's labels tuple), where ``PipelineLoss`` runs
the fused vocab-parallel weighted cross-entropy. With tied embeddings the embedding is a ``TiedLayerSpec``
at both ends (DeepSpeed all-reduces its gradient between the first and last stage).

``--tp-sequence-parallel`` (transformer.py's module docstring): the stages carry each TP rank's [B, S/tp, H] part
of the hidden state (each rank sends to the same tp rank of the next stage); the embedding reduce-scatters, the
final norm's output is all-gathered before the head. The whole row length comes from ``position_ids``.

Parameter names: witscale/model/hf_names.py maps ``3.self_attn.q_proj.weight`` ↔
``model.layers.2.self_attn.q_proj.weight``; loading, the seeded init and export (witscale/model/weights.py,
witscale/model/state.py) work by HF name for this module and the dense one alike.

Loss scaling. The last stage calls ``DeepSpeedEngine.backward(loss)`` with ``scale_wrt_gas=True``: it divides
by gradient_accumulation_steps, and the gradients are then *averaged* over dp. So each micro-batch's loss is
``weighted_sum × dp × gas / N`` (N the global denominator), which makes the final gradient Σ w·∇nll / N over
the global batch — the same as without pipelining (tests/test_train_pipeline_parallel.py checks it).
"""
from __future__ import annotations

from typing import Optional

from torch import nn

from witscale.model.config import ModelConfig
from witscale.model.family import family_spec
from witscale.model.rope import RotaryEmbedding
from witscale.model.transformer import (DecoderLayer, make_lm_head, make_norm, scale_embeddings,
                                        sequence_parallel_group)
from witscale.parallel.comm import gather_sequence_replicated_grad
from witscale.parallel.layers import VocabParallelEmbedding, VocabParallelLMHead

PARTITION_METHODS = ("uniform", "parameters")


# --- the blocks ---------------------------------------------------------------------------------------
def pipe_inputs(mb) -> tuple:
    """What the first stage takes from a ``MicroBatch``: (input_ids, position_ids, cu_seqlens)."""
    return mb.input_ids, mb.position_ids, mb.cu_seqlens


class EmbeddingPipe(nn.Module):
    def __init__(self, cfg: ModelConfig, tp_group, tp_sequence_parallel: bool = False):
        super().__init__()
        sharded = sequence_parallel_group(tp_group, tp_sequence_parallel) is not None
        self.embed_tokens = VocabParallelEmbedding(cfg.vocab_size, cfg.hidden_size, tp_group, sequence_parallel=sharded)
        self.spec = family_spec(cfg)

    def forward(self, inputs):
        input_ids, position_ids, cu_seqlens = inputs
        return scale_embeddings(self.embed_tokens(input_ids), self.spec), position_ids, cu_seqlens


class TiedEmbeddingPipe(EmbeddingPipe):
    """Embedding and LM head sharing one weight; DeepSpeed keeps one copy on the first and one on the last
    stage and all-reduces their gradients."""

    def __init__(self, cfg: ModelConfig, tp_group, loss_chunk_size: int = 4096, tp_sequence_parallel: bool = False):
        super().__init__(cfg, tp_group, tp_sequence_parallel)
        self.lm_head = make_lm_head(cfg, self.spec, tp_group, loss_chunk_size)
        self.lm_head.weight = self.embed_tokens.weight


def _tied_head_passthrough(module, hidden):
    # The tied module's last appearance: its weight is used by the loss, the activation passes unchanged.
    return hidden


class DecoderLayerPipe(DecoderLayer):
    def __init__(self, cfg: ModelConfig, tp_group, attention_backend: str, layer_index: int,
                 tp_sequence_parallel: bool = False):
        spec = family_spec(cfg)
        super().__init__(cfg, tp_group, attention_backend, layer_index, spec, None, tp_sequence_parallel)
        rope = spec.ropes[spec.layers[layer_index].rope_index]
        self.rotary = RotaryEmbedding(cfg.head_dim, rope.theta, rope.scaling)   # this layer's RoPE

    def forward(self, inputs):
        x, position_ids, cu_seqlens = inputs
        cos, sin = self.rotary.cos_sin(position_ids.to(x.device), x.dtype)
        # The row length bounds the longest segment (segments never cross rows): the attention kernels
        # take it as max_seqlen, where reading the exact maximum off the device would sync every layer.
        # position_ids' length, not x's: under --tp-sequence-parallel x holds 1/tp of the row.
        x = super().forward(x, cos, sin, cu_seqlens, position_ids.shape[1])
        return x, position_ids, cu_seqlens


class FinalNormPipe(nn.Module):
    def __init__(self, cfg: ModelConfig, tp_group=None, tp_sequence_parallel: bool = False):
        super().__init__()
        self.sequence_group = sequence_parallel_group(tp_group, tp_sequence_parallel)
        self.norm = make_norm(cfg, family_spec(cfg), sharded_input_group=self.sequence_group)

    def forward(self, inputs):
        # --tp-sequence-parallel: the whole rows for the head (its loss returns the complete dL/dh on every rank)
        return gather_sequence_replicated_grad(self.norm(inputs[0]), self.sequence_group)


class LMHeadPipe(nn.Module):
    def __init__(self, cfg: ModelConfig, tp_group, loss_chunk_size: int = 4096):
        super().__init__()
        self.lm_head = make_lm_head(cfg, family_spec(cfg), tp_group, loss_chunk_size)

    def forward(self, hidden):
        return hidden


class PipelineLoss:
    """``loss_fn(hidden, (labels, weights, target_classes, scale, *objective_inputs))`` on the last stage.

    Returns ``weighted_sum × scale`` (scale = dp × gas / N, see the module docstring) and records each
    micro-batch's ``LossStats`` for the trainer's logging (``pop_stats``). The labels tuple also carries the
    tensors the run's objective needs (``Objective.inputs``), and ``make_objective(*objective_inputs)`` (set by
    the trainer: ``Objective.head``, witscale/training/objectives) builds the head's hook, or None for the
    plain weighted loss; a hook's ``weighted_sum`` may be a surrogate whose gradient is the objective's, scaled
    by dp × gas / (the step's global denominator)."""

    def __init__(self):
        self.head: Optional[VocabParallelLMHead] = None
        self.records: list = []
        self.make_objective = None

    def __call__(self, hidden, labels_tuple):
        labels, weights, target_classes, scale, *objective_inputs = labels_tuple
        objective = self.make_objective(*objective_inputs) if self.make_objective is not None else None
        stats = self.head(hidden, labels, weights, target_classes, objective=objective)
        self.records.append(stats)
        return stats.weighted_sum * scale.to(stats.weighted_sum.dtype)

    def pop_stats(self) -> list:
        records, self.records = self.records, []
        return records


# --- building -----------------------------------------------------------------------------------------
def layer_specs(cfg: ModelConfig, tp_group, *, attention_backend: str = "auto", loss_chunk_size: int = 4096,
                tp_sequence_parallel: bool = False):
    from deepspeed.pipe import LayerSpec, TiedLayerSpec

    sp_tp = tp_sequence_parallel
    if cfg.tie_word_embeddings:
        first = TiedLayerSpec("embed", TiedEmbeddingPipe, cfg, tp_group, loss_chunk_size, sp_tp,
                              tied_weight_attr=["embed_tokens.weight"])
        last = TiedLayerSpec("embed", TiedEmbeddingPipe, cfg, tp_group, loss_chunk_size, sp_tp,
                             forward_fn=_tied_head_passthrough, tied_weight_attr=["embed_tokens.weight"])
    else:
        first = LayerSpec(EmbeddingPipe, cfg, tp_group, sp_tp)
        last = LayerSpec(LMHeadPipe, cfg, tp_group, loss_chunk_size)
    return ([first] + [LayerSpec(DecoderLayerPipe, cfg, tp_group, attention_backend, i, sp_tp)
                       for i in range(cfg.num_hidden_layers)]
            + [LayerSpec(FinalNormPipe, cfg, tp_group, sp_tp), last])


def build_pipeline_module(cfg: ModelConfig, topo, *, partition: str = "uniform",
                          activation_checkpointing: bool = False, attention_backend: str = "auto",
                          tp_sequence_parallel: bool = False):
    """The PipelineModule for this rank's stage. ``partition``: 'uniform' (the same number of decoder
    layers per stage; embedding on the first, norm + head on the last) or 'parameters' (balance parameter
    counts, the vocabulary-sized embedding and head included)."""
    from deepspeed.pipe import PipelineModule
    from deepspeed.runtime.pipe.topology import PipeModelDataParallelTopology

    if partition not in PARTITION_METHODS:
        raise ValueError(f"unknown pipeline partition {partition!r} (known: {', '.join(PARTITION_METHODS)})")
    # DeepSpeed's axes are (pipe, data, model) with model fastest: the rank order of ParallelDims.
    ds_topo = PipeModelDataParallelTopology(num_pp=topo.pp, num_mp=topo.tp, num_dp=topo.dp)
    loss = PipelineLoss()
    module = PipelineModule(
        layer_specs(cfg, topo.tp_group_or_none(), attention_backend=attention_backend,
                    tp_sequence_parallel=tp_sequence_parallel),
        topology=ds_topo, loss_fn=loss,
        partition_method="type:DecoderLayerPipe" if partition == "uniform" else "parameters",
        activation_checkpoint_interval=1 if activation_checkpointing else 0,
        checkpointable_layers=["DecoderLayerPipe"],
        # cu_seqlens has one entry per document: its length changes from one micro-batch to the next.
        dynamic_shape=True)
    module.config = cfg
    module.is_witscale_pipeline = True      # parameter names: witscale/model/hf_names.py
    if module.stage_id == topo.pp - 1:
        loss.head = _find_head(module)
    _check_stage(module, topo)
    return module


def _find_head(module) -> VocabParallelLMHead:
    for f in module.forward_funcs:
        target = getattr(f, "args", (f,))[0] if not isinstance(f, nn.Module) else f
        if isinstance(target, (LMHeadPipe, TiedEmbeddingPipe)):
            return target.lm_head
    raise RuntimeError("the last pipeline stage holds no LM head")


def _check_stage(module, topo) -> None:
    if module.stage_id != topo.pp_rank:
        raise RuntimeError(f"DeepSpeed placed rank {topo.rank} on pipeline stage {module.stage_id}, "
                           f"witscale's topology says {topo.pp_rank}: the rank orders disagree")


def pipeline_ds_config(ds_config: dict, activation_checkpointing: bool) -> dict:
    """The DeepSpeed config for the pipeline engine: activation partitioning off (the stage's hidden state is
    sent whole to the peer of the same tp rank; partitioning it over tp is an optimization not needed here)."""
    import copy

    cfg = copy.deepcopy(ds_config)
    pipe = cfg.setdefault("pipeline", {})
    pipe.setdefault("pipe_partitioned", False)
    pipe.setdefault("grad_partitioned", False)
    pipe.setdefault("use_reentrant", False)
    pipe["activation_checkpoint_interval"] = 1 if activation_checkpointing else 0
    return cfg
