"""Per-GPU memory estimates for a model, a sequence length and a parallel layout.

Counts are exact for parameters, gradients and optimizer state (they are checked against partitions
measured in ZeRO runs by tests/test_planner.py); activations are an estimate under stated assumptions.

Assumptions (bf16 training on GPU, the paper's recipe):
- parameters and gradients in bf16 (2 bytes); AdamW state in fp32: master weights + m + v (12 bytes);
- ZeRO-1 partitions optimizer state over dp; ZeRO-2 also gradients; ZeRO-3 also parameters, and keeps
  about ``live_layers`` decoder layers gathered at a time (prefetch) on top of its partition;
- TP shards every matrix and the vocabulary by tp (norms are replicated); PP splits the layers evenly,
  embedding on the first stage and LM head on the last (the larger of the two is counted);
- activations: activation checkpointing on (the block input, 2·h bytes per token per layer, is kept)
  plus one layer's working set recomputed in backward, ~34·h bytes per token / tp (Korthikanti et al.
  2022, without the s² attention term thanks to flash/varlen attention); under 1F1B the first pipeline
  stage holds ``pp`` micro-batches in flight;
- the fused loss keeps one chunk of [chunk × vocab/tp] fp32 logits (and its gradient);
- ``overhead_gib`` covers the CUDA context, NCCL buffers and allocator fragmentation.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from witscale.model.shape import ModelShape
from witscale.parallel.topology import LayoutError, ParallelDims

GIB = 1024 ** 3

# Named sizes (HF config fields) for users without the config at hand.
NAMED_SIZES = {
    "7B": dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
               num_attention_heads=32, num_key_value_heads=32, tie_word_embeddings=False),
    "8B": dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
               num_attention_heads=32, num_key_value_heads=8, tie_word_embeddings=False),
    "13B": dict(vocab_size=32000, hidden_size=5120, intermediate_size=13824, num_hidden_layers=40,
                num_attention_heads=40, num_key_value_heads=40, tie_word_embeddings=False),
    "70B": dict(vocab_size=128256, hidden_size=8192, intermediate_size=28672, num_hidden_layers=80,
                num_attention_heads=64, num_key_value_heads=8, tie_word_embeddings=False),
}


@dataclass(frozen=True)
class Layout:
    tp: int = 1
    pp: int = 1
    dp: int = 1
    zero: int = 3

    @property
    def world(self) -> int:
        return self.tp * self.pp * self.dp

    def name(self) -> str:
        return f"tp{self.tp}·pp{self.pp}·dp{self.dp} ZeRO-{self.zero}"


@dataclass
class Estimate:
    layout: Layout
    params_per_gpu: float      # parameter elements this GPU holds (its shard/partition, before gathers)
    param_gib: float
    grad_gib: float
    optim_gib: float
    activation_gib: float
    overhead_gib: float

    @property
    def total_gib(self) -> float:
        return self.param_gib + self.grad_gib + self.optim_gib + self.activation_gib + self.overhead_gib


def model_parallel_params(shape: ModelShape, tp: int, pp: int) -> float:
    """Parameter elements on the most loaded model-parallel rank (before any ZeRO partitioning)."""
    sharded, replicated = shape.layer_params()
    layers = math.ceil(shape.num_hidden_layers / pp)
    vocab = math.ceil(shape.vocab_size / tp) * shape.hidden_size
    ends = vocab if (pp > 1 or shape.tie_word_embeddings) else 2 * vocab
    return layers * (sharded / tp + replicated) + ends + shape.hidden_size


def estimate(shape: ModelShape, layout: Layout, *, seq_len: int, micro_batch: int, live_layers: int = 2,
             loss_chunk: int = 4096, overhead_gib: float = 3.0, activation_checkpointing: bool = True) -> Estimate:
    tp, pp, dp, zero = layout.tp, layout.pp, layout.dp, layout.zero
    mp = model_parallel_params(shape, tp, pp)
    sharded, replicated = shape.layer_params()
    per_layer = sharded / tp + replicated
    param_elems = mp / dp if zero >= 3 else mp
    live = live_layers * per_layer + math.ceil(shape.vocab_size / tp) * shape.hidden_size if zero >= 3 else 0
    grad_elems = mp / dp if zero >= 2 else mp
    optim_elems = mp / dp if zero >= 1 else mp
    tokens = seq_len * micro_batch
    h = shape.hidden_size
    layers_here = math.ceil(shape.num_hidden_layers / pp)
    in_flight = pp if pp > 1 else 1
    if activation_checkpointing:    # each block's input kept, one block's working set recomputed at a time
        act_bytes = in_flight * tokens * layers_here * 2 * h + tokens * 34 * h / tp
    else:                           # every block's working set kept until its backward
        act_bytes = in_flight * tokens * layers_here * 34 * h / tp
    from witscale.parallel.cross_entropy import chunk_rows      # the fused loss's own chunk choice
    chunk = chunk_rows(tokens, h, math.ceil(shape.vocab_size / tp), loss_chunk)
    loss_bytes = 2 * chunk * math.ceil(shape.vocab_size / tp) * 4
    return Estimate(layout=layout, params_per_gpu=param_elems, param_gib=(param_elems + live) * 2 / GIB,
                    grad_gib=grad_elems * 2 / GIB, optim_gib=optim_elems * 12 / GIB,
                    activation_gib=(act_bytes + loss_bytes) / GIB, overhead_gib=overhead_gib)


def valid_layouts(shape: ModelShape, gpus: int, gpus_per_node: int = 8) -> list[Layout]:
    """ZeRO-3 (tp ≤ node) and 3D ZeRO-1 layouts for ``gpus`` GPUs that ``ParallelDims`` accepts for the model."""
    out = []
    for tp in (t for t in (1, 2, 4, 8) if t <= gpus_per_node):
        for pp in (1, 2, 4, 8, 16):
            for zero in ((3, 1) if pp == 1 else (1,)):
                try:
                    dims = ParallelDims(gpus, tp, pp, zero, shape)
                except LayoutError:
                    continue
                out.append(Layout(tp, pp, dims.dp, zero))
    return out


def needs_activation_checkpointing(shape: ModelShape, layout: Layout, *, seq_len: int, micro_batch: int,
                                   gpu_gib: float, headroom: float = 0.9) -> bool:
    """True when the layout would not fit in ``headroom`` × the GPU's memory without recomputing blocks."""
    off = estimate(shape, layout, seq_len=seq_len, micro_batch=micro_batch, activation_checkpointing=False)
    return off.total_gib > headroom * gpu_gib
