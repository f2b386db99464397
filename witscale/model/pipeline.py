"""Pipeline parallelism: the decoder as a DeepSpeed ``PipelineModule`` (tp × pp × dp, ZeRO-0/1).

The pipeline is the same blocks as ``CausalLM``, as a flat list DeepSpeed places on the stages:

    0          EmbeddingPipe      (input_ids, position_ids, cu_seqlens) → (hidden, position_ids, cu_seqlens)
    1 … L      DecoderLayerPipe   (hidden, position_ids, cu_seqlens) → the same, transformed
    L+1        FinalNormPipe      → hidden
    L+2        LMHeadPipe         → hidden (the head's matmul runs inside the loss, fused with the CE)

Only tensors travel between stages: attention takes the row length as its ``max_seqlen`` bound, and
RoPE's cos/sin are recomputed in each layer from the position ids. Labels, weights, target classes and the loss scale go
straight from the data iterator to the last stage (DeepSpeed's labels tuple), where ``PipelineLoss`` runs
the fused vocab-parallel weighted cross-entropy. With tied embeddings the embedding is a ``TiedLayerSpec``
at both ends (DeepSpeed all-reduces its gradient between the first and last stage).

Parameter names: ``pipe_to_hf_name`` maps ``3.self_attn.q_proj.weight`` → ``model.layers.2.self_attn.q_proj.weight``
(and back with ``hf_to_pipe_name``), so loading, the seeded init and export all work by HF name.

Loss scaling. The last stage calls ``DeepSpeedEngine.backward(loss)`` with ``scale_wrt_gas=True``: it divides
by gradient_accumulation_steps, and the gradients are then *averaged* over dp. So each micro-batch's loss is
``weighted_sum × dp × gas / N`` (N the global denominator), which makes the final gradient Σ w·∇nll / N over
the global batch — the same as without pipelining (tests/test_pipeline.py checks it).
"""
from __future__ import annotations

import re
from typing import Optional

import torch
from torch import nn

from witscale.model.config import ModelConfig
from witscale.model.rope import inverse_frequencies, rope_cos_sin
from witscale.model.transformer import DecoderLayer, RMSNorm
from witscale.parallel.layers import VocabParallelEmbedding, VocabParallelLMHead

PARTITION_METHODS = ("uniform", "parameters")


# --- the blocks ---------------------------------------------------------------------------------------
def pipe_inputs(mb) -> tuple:
    """What the first stage takes from a ``MicroBatch``: (input_ids, position_ids, cu_seqlens)."""
    return mb.input_ids, mb.position_ids, mb.cu_seqlens


class EmbeddingPipe(nn.Module):
    def __init__(self, cfg: ModelConfig, tp_group):
        super().__init__()
        self.embed_tokens = VocabParallelEmbedding(cfg.vocab_size, cfg.hidden_size, tp_group)

    def forward(self, inputs):
        input_ids, position_ids, cu_seqlens = inputs
        return self.embed_tokens(input_ids), position_ids, cu_seqlens


class TiedEmbeddingPipe(EmbeddingPipe):
    """Embedding and LM head sharing one weight; DeepSpeed keeps one copy on the first and one on the last
    stage and all-reduces their gradients."""

    def __init__(self, cfg: ModelConfig, tp_group, loss_chunk_size: int = 4096):
        super().__init__(cfg, tp_group)
        self.lm_head = VocabParallelLMHead(cfg.vocab_size, cfg.hidden_size, tp_group, loss_chunk_size)
        self.lm_head.weight = self.embed_tokens.weight


def _tied_head_passthrough(module, hidden):
    # The tied module's last appearance: its weight is used by the loss, the activation passes unchanged.
    return hidden


class DecoderLayerPipe(DecoderLayer):
    def __init__(self, cfg: ModelConfig, tp_group, attention_backend: str):
        super().__init__(cfg, tp_group, attention_backend)
        # Not a buffer (see Decoder): a bf16 cast would put RoPE phases off at long positions.
        self._inv_freq = inverse_frequencies(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling)

    def forward(self, inputs):
        x, position_ids, cu_seqlens = inputs
        if self._inv_freq.device != x.device:
            self._inv_freq = self._inv_freq.to(x.device)
        cos, sin = rope_cos_sin(position_ids, self._inv_freq, x.dtype)
        # The row length bounds the longest segment (segments never cross rows): the attention kernels
        # take it as max_seqlen, where reading the exact maximum off the device would sync every layer.
        x = super().forward(x, cos, sin, cu_seqlens, x.shape[1])
        return x, position_ids, cu_seqlens


class FinalNormPipe(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, inputs):
        return self.norm(inputs[0])


class LMHeadPipe(nn.Module):
    def __init__(self, cfg: ModelConfig, tp_group, loss_chunk_size: int = 4096):
        super().__init__()
        self.lm_head = VocabParallelLMHead(cfg.vocab_size, cfg.hidden_size, tp_group, loss_chunk_size)

    def forward(self, hidden):
        return hidden


class PipelineLoss:
    """``loss_fn(hidden, (labels, weights, target_classes, scale))`` on the last stage.

    Returns ``weighted_sum × scale`` (scale = dp × gas / N, see the module docstring) and records each
    micro-batch's ``LossStats`` for the trainer's logging (``pop_stats``)."""

    def __init__(self):
        self.head: Optional[VocabParallelLMHead] = None
        self.records: list = []

    def __call__(self, hidden, labels_tuple):
        labels, weights, target_classes, scale = labels_tuple
        stats = self.head(hidden, labels, weights, target_classes)
        self.records.append(stats)
        return stats.weighted_sum * scale.to(stats.weighted_sum.dtype)

    def pop_stats(self) -> list:
        records, self.records = self.records, []
        return records


# --- building -----------------------------------------------------------------------------------------
def layer_specs(cfg: ModelConfig, tp_group, *, attention_backend: str = "auto", loss_chunk_size: int = 4096):
    from deepspeed.pipe import LayerSpec, TiedLayerSpec

    if cfg.tie_word_embeddings:
        first = TiedLayerSpec("embed", TiedEmbeddingPipe, cfg, tp_group, loss_chunk_size,
                              tied_weight_attr=["embed_tokens.weight"])
        last = TiedLayerSpec("embed", TiedEmbeddingPipe, cfg, tp_group, loss_chunk_size,
                             forward_fn=_tied_head_passthrough, tied_weight_attr=["embed_tokens.weight"])
    else:
        first = LayerSpec(EmbeddingPipe, cfg, tp_group)
        last = LayerSpec(LMHeadPipe, cfg, tp_group, loss_chunk_size)
    return ([first] + [LayerSpec(DecoderLayerPipe, cfg, tp_group, attention_backend)
                       for _ in range(cfg.num_hidden_layers)]
            + [LayerSpec(FinalNormPipe, cfg), last])


def build_pipeline_module(cfg: ModelConfig, topo, *, partition: str = "uniform",
                          activation_checkpointing: bool = False, attention_backend: str = "auto"):
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
        layer_specs(cfg, topo.tp_group_or_none(), attention_backend=attention_backend),
        topology=ds_topo, loss_fn=loss,
        partition_method="type:DecoderLayerPipe" if partition == "uniform" else "parameters",
        activation_checkpoint_interval=1 if activation_checkpointing else 0,
        checkpointable_layers=["DecoderLayerPipe"],
        # cu_seqlens has one entry per document: its length changes from one micro-batch to the next.
        dynamic_shape=True)
    module.config = cfg
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


# --- names --------------------------------------------------------------------------------------------
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


def _bad(name: str) -> str:
    raise KeyError(f"{name}: not a parameter name of the witscale pipeline / HF model")


# --- weights ------------------------------------------------------------------------------------------
def load_pipeline_weights(module, cfg: ModelConfig, *, model_dir: Optional[str], seed: int, topo) -> None:
    """Fill this stage's parameters by HF name: from safetensors (this rank's TP slice) or the seeded init
    (drawn at the dense shape, then sliced: every layout starts from the same dense weights)."""
    from witscale.model.hf_io import CheckpointFormatError, SafetensorsSource, shard_of_slice
    from witscale.model.materialize import materialize_parameters, seeded_dense
    from witscale.model.transformer import dense_shapes
    from witscale.parallel.layers import shard_dense

    tp, tp_rank = topo.tp, topo.tp_rank
    if model_dir is None:
        shapes = dense_shapes(cfg)

        def value(name, p):
            hf = pipe_to_hf_name(name, cfg)
            return shard_dense(p, seeded_dense(hf, shapes[hf], seed, cfg.initializer_range), tp_rank, tp)
    else:
        source = SafetensorsSource(model_dir)

        def value(name, p):
            hf = pipe_to_hf_name(name, cfg)
            if not source.has(hf):
                raise CheckpointFormatError(f"{model_dir}: tensor {hf} is missing from the checkpoint")
            t = shard_of_slice(source.slice(hf), getattr(p, "tp_split_dim", None), tp_rank, tp,
                               getattr(p, "padded_dense_rows", None))
            if tuple(t.shape) != tuple(p.shape):
                raise CheckpointFormatError(f"{source.file_of(hf)}: tensor {hf} gives shape {tuple(t.shape)}, "
                                            f"the model expects {tuple(p.shape)}")
            return t
    materialize_parameters(module, value)


def dense_state_dict(module, cfg: ModelConfig, topo) -> dict[str, torch.Tensor]:
    """Dense HF-named tensors of the WHOLE model on every rank (collective over all ranks): TP shards
    gathered within each stage, then the stages' dictionaries exchanged over the pipeline group."""
    import torch.distributed as dist

    from witscale.parallel.layers import gather_dense

    group = topo.get_tensor_model_parallel_group() if topo.tp > 1 else None
    mine = {}
    for name, p in module.named_parameters():
        full = gather_dense(p, p.detach().float().clone(), group,
                            cfg.vocab_size if getattr(p, "padded_dense_rows", None) else None)
        mine[pipe_to_hf_name(name, cfg)] = full.cpu()
    if topo.pp == 1:
        return mine
    stages = [None] * topo.pp
    dist.all_gather_object(stages, mine, group=topo.get_pipeline_model_parallel_group())
    out = {}
    for part in stages:
        out.update(part)
    return out
