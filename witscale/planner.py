"""Per-GPU memory estimates for a model, a sequence length and a parallel layout.

Counts are exact for parameters, gradients and optimizer state (they are checked against partitions
measured in ZeRO runs by tests/test_planner.py); activations are counted tensor by tensor from what
witscale's decoder keeps for backward (``activation_memory``; checked against the measured peak of live
tensors of forward + backward on the CPU by tests/test_planner_activations.py, within 15%).

Assumptions (bf16 training on GPU, the paper's recipe):
- parameters and gradients in bf16 (2 bytes); AdamW state in fp32: master weights + m + v (12 bytes);
- ZeRO-1 partitions optimizer state over dp; ZeRO-2 also gradients; ZeRO-3 also parameters, and keeps
  about ``live_layers`` decoder layers gathered at a time (prefetch) on top of its partition;
- TP shards every matrix and the vocabulary by tp (norms are replicated, and k/v when the model has fewer
  key/value heads than tp); PP splits the layers evenly,
  embedding on the first stage and LM head on the last (the larger of the two is counted);
- activations, per token, with e bytes per element of the training dtype (``element_size``: 2 for bf16):
  one decoder layer saves for backward its two RMSNorms' fp32 upcast, normalized and scaled outputs
  (2·(4 + 2e)·h, replicated over tp; Gemma: four norms, normalized in fp32; Qwen3/Gemma-3: per-head q/k
  norms too), attention's rotated q and k, v and the output (e·(2·q + 2·kv)/tp,
  q = heads·head_dim, kv = kv_heads·head_dim: what flash/varlen attention keeps, no s² term; with fewer
  key/value heads than tp each rank holds one whole KV head, so kv/tp is head_dim there) plus its fp32
  logsumexp (4·heads/tp), and SwiGLU's gate, silu(gate), up and their product (4·e·I/tp). That is ≈48·h
  bytes at 70B (Korthikanti et al. 2022's 34·h is for a GPT layer with a 4h GELU MLP and sharded norms).
  With activation checkpointing each layer keeps only its input (e·h) and one layer is recomputed at a
  time, its backward adding ~two [tokens × I/tp] gradients and one [tokens × h] gradient. The peak is the
  larger of the end of forward (what every layer keeps, plus the fused loss) and the backward of one
  layer. Under 1F1B the first pipeline stage holds ``pp`` micro-batches in flight;
- the fused loss (witscale/parallel/cross_entropy.py) computes its gradients in forward and keeps them
  until backward: dL/dh in fp32 (4·h per token) and the LM head's gradient in fp32 (4·h·vocab/tp bytes,
  3.9 GiB at 70B tp1), plus one chunk of [chunk × vocab/tp] fp32 logits (and its bf16 copy) alive at a time
  and, in bf16, one [8192 × h] block of the head's gradient product;
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
    # Other families (their HF configs; keys upper-case as tools/plan.py looks them up). The family's rules
    # (q/k norms, Gemma's extra norms) come from its record through ModelShape.from_config.
    "GEMMA2-2B": dict(model_type="gemma2", vocab_size=256000, hidden_size=2304, intermediate_size=9216,
                      num_hidden_layers=26, num_attention_heads=8, num_key_value_heads=4, head_dim=256,
                      tie_word_embeddings=True),
    "GEMMA2-9B": dict(model_type="gemma2", vocab_size=256000, hidden_size=3584, intermediate_size=14336,
                      num_hidden_layers=42, num_attention_heads=16, num_key_value_heads=8, head_dim=256,
                      tie_word_embeddings=True),
    "GEMMA2-27B": dict(model_type="gemma2", vocab_size=256000, hidden_size=4608, intermediate_size=36864,
                       num_hidden_layers=46, num_attention_heads=32, num_key_value_heads=16, head_dim=128,
                       tie_word_embeddings=True),
    "GEMMA3-4B": dict(model_type="gemma3_text", vocab_size=262208, hidden_size=2560, intermediate_size=10240,
                      num_hidden_layers=34, num_attention_heads=8, num_key_value_heads=4, head_dim=256,
                      tie_word_embeddings=True),
    "GEMMA3-12B": dict(model_type="gemma3_text", vocab_size=262208, hidden_size=3840, intermediate_size=15360,
                       num_hidden_layers=48, num_attention_heads=16, num_key_value_heads=8, head_dim=256,
                       tie_word_embeddings=True),
    "GEMMA3-27B": dict(model_type="gemma3_text", vocab_size=262208, hidden_size=5376, intermediate_size=21504,
                       num_hidden_layers=62, num_attention_heads=32, num_key_value_heads=16, head_dim=128,
                       tie_word_embeddings=True),
    "QWEN3-8B": dict(model_type="qwen3", vocab_size=151936, hidden_size=4096, intermediate_size=12288,
                     num_hidden_layers=36, num_attention_heads=32, num_key_value_heads=8, head_dim=128,
                     tie_word_embeddings=False),
    "QWEN3-32B": dict(model_type="qwen3", vocab_size=151936, hidden_size=5120, intermediate_size=25600,
                      num_hidden_layers=64, num_attention_heads=64, num_key_value_heads=8, head_dim=128,
                      tie_word_embeddings=False),
}


@dataclass(frozen=True)
class Layout:
    tp: int = 1
    pp: int = 1
    dp: int = 1
    zero: int = 3
    sp: int = 1        # --sp (Ulysses): not searched by valid_layouts; estimate divides the row by it

    @property
    def world(self) -> int:
        return self.tp * self.pp * self.dp * self.sp

    def name(self) -> str:
        sp = f"·sp{self.sp}" if self.sp > 1 else ""
        return f"tp{self.tp}·pp{self.pp}·dp{self.dp}{sp} ZeRO-{self.zero}"


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


def layer_params_at(shape: ModelShape, tp: int) -> tuple[int, int]:
    """(parameters sharded by tp, replicated parameters) of one decoder layer at ``tp``: with fewer key/value
    heads than tp, the k/v projections are replicated on every TP rank (parallel/layers.py
    ``ReplicatedKVHeadLinear``), not sharded."""
    sharded, replicated = shape.layer_params()
    if shape.num_key_value_heads < tp:
        kv = 2 * shape.num_key_value_heads * shape.hd * (shape.hidden_size + int(shape.attention_bias))
        sharded, replicated = sharded - kv, replicated + kv
    return sharded, replicated


def model_parallel_params(shape: ModelShape, tp: int, pp: int) -> float:
    """Parameter elements on the most loaded model-parallel rank (before any ZeRO partitioning)."""
    sharded, replicated = layer_params_at(shape, tp)
    layers = math.ceil(shape.num_hidden_layers / pp)
    vocab = math.ceil(shape.vocab_size / tp) * shape.hidden_size
    ends = vocab if (pp > 1 or shape.tie_word_embeddings) else 2 * vocab
    return layers * (sharded / tp + replicated) + ends + shape.hidden_size


@dataclass(frozen=True)
class ActivationMemory:
    """Activation bytes of one micro-batch on one GPU (see the module docstring for what each term counts)."""
    layer_saved: float       # what one decoder layer saves for backward
    kept: float              # what every layer of this GPU keeps between forward and backward (× micro-batches in flight)
    loss: float              # the fused loss: fp32 dL/dh and LM-head gradient kept to backward, one logits chunk
    forward_peak: float      # at the end of forward: kept + final norm + rotary tables + loss
    backward_peak: float     # during the backward of one (recomputed) layer

    @property
    def peak(self) -> float:
        return max(self.forward_peak, self.backward_peak)


def activation_memory(shape: ModelShape, *, tokens: int, tp: int = 1, layers: int | None = None,
                      in_flight: int = 1, element_size: int = 2, activation_checkpointing: bool = True,
                      loss_chunk: int = 4096) -> ActivationMemory:
    """Peak activation bytes of forward + backward over ``tokens`` tokens (one micro-batch) on one GPU of a
    tensor-parallel group of ``tp``, holding ``layers`` decoder layers (default: all), ``in_flight``
    micro-batches kept at once (1F1B: pp on the first stage), in a training dtype of ``element_size`` bytes
    (2: bf16 on the GPU; 4: fp32, the CPU tests). Counted from what witscale's CausalLM saves for backward."""
    from witscale.parallel.cross_entropy import _GRAD_W_BLOCK, chunk_rows    # the fused loss's own sizes

    e, h, hd = element_size, shape.hidden_size, shape.hd
    q = shape.num_attention_heads * hd
    # k/v per rank: kv_heads/tp heads, or one whole head when tp > kv_heads (ReplicatedKVHeadLinear: each
    # rank computes the KV head its query heads use). ``kv_local`` is per rank, ``q`` is divided below.
    kv_local = max(shape.num_key_value_heads / tp, 1) * hd
    inter = shape.intermediate_size
    layers = shape.num_hidden_layers if layers is None else layers
    # An RMSNorm saves its input upcast to fp32 and the normalized tensor — in the training dtype, or in fp32
    # where the weight is applied in fp32 (Gemma's x·(1 + w)); a norm before a projection also has its output
    # saved by that projection. Norms of the hidden state are replicated over tp.
    normed = 4 if shape.sandwich_norms else e
    pre_norm, post_norm = (4 + normed + e) * h, (4 + normed) * h
    norms = 2 * pre_norm + (2 * post_norm if shape.sandwich_norms else 0)
    qk_norms = (4 + normed) * (q / tp + kv_local) if shape.qk_norm else 0
    attention = e * (2 * q / tp + 2 * kv_local) + 4 * shape.num_attention_heads / tp
    mlp = 4 * e * inter / tp
    layer = norms + qk_norms + attention + mlp
    rope = 2 * hd * e                       # cos and sin, shared by every layer
    per_token_kept = layers * (e * h if activation_checkpointing else layer)
    kept = in_flight * tokens * (per_token_kept + rope)
    v_local = math.ceil(shape.vocab_size / tp)
    chunk = chunk_rows(tokens, v_local, loss_chunk)
    logits_chunk = chunk * v_local * (4 + (e if e < 4 else 0))    # fp32 logits, and their copy in the training dtype
    if e < 4:                               # the head's gradient is multiplied in the training dtype by vocabulary block
        logits_chunk += min(v_local, _GRAD_W_BLOCK) * h * e
    loss = tokens * 4 * h + v_local * h * 4 + logits_chunk
    forward_peak = kept + tokens * pre_norm + loss                 # + the final norm's saved tensors and output
    backward_transient = 2 * e * inter / tp + e * h                # the gradients alive in one layer's backward
    backward_peak = kept + tokens * ((layer if activation_checkpointing else 0) + backward_transient)
    return ActivationMemory(layer_saved=tokens * layer, kept=kept, loss=loss, forward_peak=forward_peak,
                            backward_peak=backward_peak)


def estimate(shape: ModelShape, layout: Layout, *, seq_len: int, micro_batch: int, live_layers: int = 2,
             loss_chunk: int = 4096, overhead_gib: float = 3.0, activation_checkpointing: bool = True,
             element_size: int = 2) -> Estimate:
    tp, pp, zero = layout.tp, layout.pp, layout.zero
    # ZeRO partitions over dp × sp (DeepSpeed's sequence-data-parallel group); each sp rank keeps the
    # activations of its 1/sp of the row (attention's all-to-all buffers are that size too: whole row × heads/sp).
    dp, sp = layout.dp * layout.sp, layout.sp
    mp = model_parallel_params(shape, tp, pp)
    sharded, replicated = layer_params_at(shape, tp)
    per_layer = sharded / tp + replicated
    param_elems = mp / dp if zero >= 3 else mp
    live = live_layers * per_layer + math.ceil(shape.vocab_size / tp) * shape.hidden_size if zero >= 3 else 0
    grad_elems = mp / dp if zero >= 2 else mp
    optim_elems = mp / dp if zero >= 1 else mp
    act = activation_memory(shape, tokens=math.ceil(seq_len / sp) * micro_batch, tp=tp,
                            layers=math.ceil(shape.num_hidden_layers / pp), in_flight=pp if pp > 1 else 1,
                            element_size=element_size, activation_checkpointing=activation_checkpointing,
                            loss_chunk=loss_chunk)
    return Estimate(layout=layout, params_per_gpu=param_elems, param_gib=(param_elems + live) * 2 / GIB,
                    grad_gib=grad_elems * 2 / GIB, optim_gib=optim_elems * 12 / GIB,
                    activation_gib=act.peak / GIB, overhead_gib=overhead_gib)


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
