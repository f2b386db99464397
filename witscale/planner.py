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

Long context (issue 24; each term checked against the memory probe where the CPU can run it,
tests/test_planner_activations.py):
- attention is the varlen/flash kernel's: O(T) saved tensors, never a T × T score matrix, and the fused loss keeps
  one bounded [chunk × vocab/tp] logits block (its budget: parallel/cross_entropy.py), never the full logits;
- ``--sp N`` (Ulysses): a rank holds T/sp tokens of every row, so every per-token term divides by sp; the
  kernel sees the whole row with heads/sp (the same bytes per local token), attention's output exists twice
  (the kernel's and o_proj's input after the all-to-all back: e·q/tp more), and KV heads per TP rank fewer
  than sp are replicated to sp (sp heads' worth of k and v). ZeRO partitions over dp × sp;
- ``--tp-sequence-parallel on`` (Megatron SP inside TP): the norms' saved tensors and the checkpointed layer
  inputs are sharded over tp (e·h/tp per token per layer; the projections save their sharded input and
  gather it again in backward); the final norm and the loss's dL/dh are still counted whole;
- ``--activation-checkpointing offload``: every layer's input goes to pinned host memory (``host``:
  layers × T × e·h/(tp if Megatron SP) per rank; tools/plan.py sums it over a node's ranks) and the device
  keeps two layers' worth in flight;
- ``--tiled-mlp N``: the MLP saves nothing between forward and backward and recomputes one tile of T/N rows at
  a time, so its [T × I/tp] tensors (four in forward, two gradients) exist for T/N rows only; two [T × h]
  buffers join the tiles in backward (the output gathered, the input's gradient assembled).

``auto`` (``choose_layout``, tools/plan.py --auto) searches every layout ``valid_layouts`` lists (sp included)
with every setting of these features and picks the cheapest that fits in 90% of the GPU (and the node's host
memory): least recompute first (checkpointing off < on < offload), then no tiling (fewer tiles first), then the
fewest bytes a GPU sends per micro-batch (TP, Ulysses and ZeRO collectives: ``communication_bytes``), then fewer
pipeline stages.
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


CHECKPOINTING = ("off", "on", "offload")     # --activation-checkpointing as the planner counts it


@dataclass(frozen=True)
class Layout:
    """A parallel layout and the long-context memory features it runs with (the trainer's flags):
    ``sp`` --sp (Ulysses; ZeRO partitions over dp × sp), ``tp_sp`` --tp-sequence-parallel on (tp > 1 only),
    ``checkpointing`` --activation-checkpointing off/on/offload (``None``: what ``estimate``'s
    ``activation_checkpointing`` argument says), ``tiled_mlp`` --tiled-mlp N (1: off)."""
    tp: int = 1
    pp: int = 1
    dp: int = 1
    zero: int = 3
    sp: int = 1
    tp_sp: bool = False
    checkpointing: str | None = None
    tiled_mlp: int = 1

    @property
    def world(self) -> int:
        return self.tp * self.pp * self.dp * self.sp

    def name(self) -> str:
        sp = f"·sp{self.sp}" if self.sp > 1 else ""
        features = (["tp-sp"] if self.tp_sp and self.tp > 1 else []) + (
            [f"AC {self.checkpointing}"] if self.checkpointing else []) + (
            [f"tiles {self.tiled_mlp}"] if self.tiled_mlp > 1 else [])
        return f"tp{self.tp}·pp{self.pp}·dp{self.dp}{sp} ZeRO-{self.zero}" + "".join(f", {f}" for f in features)


@dataclass
class Estimate:
    layout: Layout
    params_per_gpu: float      # parameter elements this GPU holds (its shard/partition, before gathers)
    param_gib: float
    grad_gib: float
    optim_gib: float
    activation_gib: float
    overhead_gib: float
    host_gib: float = 0.0      # pinned host memory this rank's offloaded checkpoints take (AC offload)

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
    host: float = 0.0        # checkpointed layer inputs offloaded to pinned host memory (AC offload)

    @property
    def peak(self) -> float:
        return max(self.forward_peak, self.backward_peak)


def activation_memory(shape: ModelShape, *, tokens: int, tp: int = 1, layers: int | None = None,
                      in_flight: int = 1, element_size: int = 2, activation_checkpointing: bool | str = True,
                      loss_chunk: int = 4096, sp: int = 1, tp_sp: bool = False, tiled_mlp: int = 1,
                      offload_in_flight: int = 2) -> ActivationMemory:
    """Peak activation bytes of forward + backward over ``tokens`` tokens (one micro-batch: this rank's
    1/sp of its rows) on one GPU of a tensor-parallel group of ``tp``, holding ``layers`` decoder layers
    (default: all), ``in_flight`` micro-batches kept at once (1F1B: pp on the first stage), in a training
    dtype of ``element_size`` bytes (2: bf16 on the GPU; 4: fp32, the CPU tests). Counted from what
    witscale's CausalLM saves for backward. ``activation_checkpointing``: False/"off", True/"on", or
    "offload" (the checkpointed layer inputs in host memory: ``host``; the device keeps
    ``offload_in_flight`` layers' worth). ``sp`` (Ulysses), ``tp_sp`` (Megatron sequence parallelism inside
    TP) and ``tiled_mlp`` (the MLP over N sequence tiles): the module docstring's long-context terms."""
    from witscale.parallel.cross_entropy import _GRAD_W_BLOCK, chunk_rows    # the fused loss's own sizes

    mode = {False: "off", True: "on"}.get(activation_checkpointing, activation_checkpointing)
    if mode not in CHECKPOINTING:
        raise ValueError(f"activation_checkpointing {activation_checkpointing!r}: use one of {CHECKPOINTING}")
    checkpointed = mode != "off"
    e, h, hd = element_size, shape.hidden_size, shape.hd
    q = shape.num_attention_heads * hd
    # k/v per rank: kv_heads/tp heads, or one whole head when tp > kv_heads (ReplicatedKVHeadLinear: each
    # rank computes the KV head its query heads use). ``kv_local`` is per rank, ``q`` is divided below.
    kv_heads_local = max(shape.num_key_value_heads / tp, 1)
    kv_local = kv_heads_local * hd
    # Under Ulysses the kernel sees the whole row with heads/sp: per local token the same bytes, except KV
    # heads fewer than sp, which are replicated to sp first (parallel/sequence.py): sp heads' worth per token.
    kv_attended = max(kv_heads_local, sp) * hd
    inter = shape.intermediate_size
    layers = shape.num_hidden_layers if layers is None else layers
    # Megatron sequence parallelism shards what TP replicates — norms, residuals, checkpointed layer inputs —
    # over the TP group (the projections save their sharded input and gather it again in backward).
    hidden_shard = tp if tp_sp else 1
    # An RMSNorm saves its input upcast to fp32 and the normalized tensor — in the training dtype, or in fp32
    # where the weight is applied in fp32 (Gemma's x·(1 + w)); a norm before a projection also has its output
    # saved by that projection. Norms of the hidden state are replicated over tp (sharded by tp_sp).
    normed = 4 if shape.sandwich_norms else e
    pre_norm, post_norm = (4 + normed + e) * h, (4 + normed) * h
    norms = (2 * pre_norm + (2 * post_norm if shape.sandwich_norms else 0)) / hidden_shard
    qk_norms = (4 + normed) * (q / tp + kv_local) if shape.qk_norm else 0
    attention = e * (2 * q / tp + 2 * kv_attended) + 4 * shape.num_attention_heads / tp
    if sp > 1:       # the kernel's output (whole row, heads/sp) and o_proj's input (after the all-to-all back)
        attention += e * q / tp
    mlp = 4 * e * inter / tp
    mlp_grads = 2 * e * inter / tp            # dL/d(gate), dL/d(up) in the MLP's backward
    tiled = tiled_mlp > 1
    # A tiled MLP saves nothing of its own (its input is the norm's output, counted above) and recomputes
    # one tile at a time in backward: its [tile × I/tp] tensors exist for ceil(tokens / N) rows only.
    layer = norms + qk_norms + attention + (0 if tiled else mlp)
    layer_input = e * h / hidden_shard        # what a checkpointed layer keeps
    rope = 2 * hd * e                         # cos and sin, shared by every layer
    if mode == "off":
        kept_layers, per_layer = layers, layer
    elif mode == "on":
        kept_layers, per_layer = layers, layer_input
    else:                                     # offload: the device holds the inputs of the layers in flight
        kept_layers, per_layer = min(layers, offload_in_flight), layer_input
    kept = in_flight * tokens * (kept_layers * per_layer + rope)
    host = in_flight * tokens * layers * layer_input if mode == "offload" else 0.0
    v_local = math.ceil(shape.vocab_size / tp)
    chunk = chunk_rows(tokens, v_local, loss_chunk)       # bounded: never the full [tokens × vocab] logits
    logits_chunk = chunk * v_local * (4 + (e if e < 4 else 0))    # fp32 logits, and their copy in the training dtype
    if e < 4:                               # the head's gradient is multiplied in the training dtype by vocabulary block
        logits_chunk += min(v_local, _GRAD_W_BLOCK) * h * e
    loss = tokens * 4 * h + v_local * h * 4 + logits_chunk
    forward_peak = kept + tokens * pre_norm + loss                 # + the final norm's saved tensors and output
    # One layer's backward: its recomputed saved tensors (checkpointing), the gradients alive in it, and the
    # MLP's — all rows at once, or one tile's rows recomputed with their gradients.
    mlp_rows = math.ceil(tokens / tiled_mlp) if tiled else tokens
    # Tiled, two [tokens × h] buffers join the tiles: the output gathered from them and the input's gradient
    # assembled tile by tile (measured with checkpointed tiles: without them the estimate is 13% low).
    mlp_backward = mlp_rows * (mlp + mlp_grads) + 2 * e * h * tokens if tiled else tokens * mlp_grads
    backward_peak = kept + tokens * ((layer if checkpointed else 0) + e * h) + mlp_backward
    return ActivationMemory(layer_saved=tokens * layer, kept=kept, loss=loss, forward_peak=forward_peak,
                            backward_peak=backward_peak, host=host)


def _checkpointing(layout: Layout, activation_checkpointing: bool | str) -> str:
    if layout.checkpointing is not None:
        return layout.checkpointing
    return {False: "off", True: "on"}.get(activation_checkpointing, activation_checkpointing)


def estimate(shape: ModelShape, layout: Layout, *, seq_len: int, micro_batch: int, live_layers: int = 2,
             loss_chunk: int = 4096, overhead_gib: float = 3.0, activation_checkpointing: bool | str = True,
             element_size: int = 2) -> Estimate:
    """Per-GPU memory of ``layout`` (its ``checkpointing``, when set, wins over ``activation_checkpointing``)."""
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
                            element_size=element_size,
                            activation_checkpointing=_checkpointing(layout, activation_checkpointing),
                            loss_chunk=loss_chunk, sp=sp, tp_sp=layout.tp_sp and tp > 1,
                            tiled_mlp=layout.tiled_mlp)
    return Estimate(layout=layout, params_per_gpu=param_elems, param_gib=(param_elems + live) * 2 / GIB,
                    grad_gib=grad_elems * 2 / GIB, optim_gib=optim_elems * 12 / GIB,
                    activation_gib=act.peak / GIB, overhead_gib=overhead_gib, host_gib=act.host / GIB)


def valid_layouts(shape: ModelShape, gpus: int, gpus_per_node: int = 8, *, sequence_parallel: bool = True
                  ) -> list[Layout]:
    """ZeRO-3 (tp ≤ node) and 3D ZeRO-1 layouts for ``gpus`` GPUs that ``ParallelDims`` accepts for the model,
    with every sequence-parallel size it accepts (sp × tp inside a node, heads and KV heads per TP rank split by
    sp or KV heads replicated: its rules, not a copy; sp = 1 only with ``sequence_parallel=False``)."""
    out = []
    for tp in (t for t in (1, 2, 4, 8) if t <= gpus_per_node):
        for sp in ((1, 2, 4, 8) if sequence_parallel else (1,)):
            for pp in (1, 2, 4, 8, 16):
                for zero in ((3, 1) if pp == 1 else (1,)):
                    try:
                        dims = ParallelDims(gpus, tp, pp, zero, shape, sp=sp, gpus_per_node=gpus_per_node)
                    except LayoutError:
                        continue
                    out.append(Layout(tp, pp, dims.dp, zero, sp))
    return out


# ---------------------------------------------------------------------------------------------- auto
# "Cheapest" (what ``choose_layout`` minimizes), in this order — the first key dominates:
# 1. recompute: activation checkpointing off < on (one more forward of every layer, ~1/3 of the step's
#    compute) < offload (on, plus every layer's input over PCIe to host memory and back);
# 2. tiled MLP: off < N tiles (a second forward of the MLP in backward; fewer tiles, bigger GEMMs, first);
# 3. communication: bytes one GPU sends per micro-batch (``communication_bytes``): TP's all-reduces (or
#    Megatron SP's reduce-scatter + all-gather: the same volume), Ulysses' all-to-alls, ZeRO's parameter
#    gathers and gradient reductions;
# 4. fewer pipeline stages (the bubble), then Megatron SP off (the same cost: the simpler path).
def communication_bytes(shape: ModelShape, layout: Layout, *, seq_len: int, micro_batch: int,
                        element_size: int = 2) -> float:
    """Bytes one GPU sends per micro-batch, counted as ring collectives ((n − 1)/n of the buffer per all-gather or
    reduce-scatter, twice that per all-reduce): a first-order cost for ranking layouts, not a time."""
    e, h = element_size, shape.hidden_size
    tp, sp, n = layout.tp, layout.sp, layout.dp * layout.sp
    tokens = math.ceil(seq_len / sp) * micro_batch
    layers = math.ceil(shape.num_hidden_layers / layout.pp)
    forwards = 1 if layout.checkpointing == "off" else 2          # checkpointing recomputes every forward
    # TP: two all-reduces of [tokens × h] per layer in forward, two in backward.
    tp_bytes = layers * (2 * forwards + 2) * 2 * (tp - 1) / tp * tokens * h * e
    # Ulysses: q, k, v and the output through an all-to-all in forward, their gradients in backward.
    q = shape.num_attention_heads * shape.hd / tp
    kv = max(shape.num_key_value_heads / tp, sp) * shape.hd
    sp_bytes = layers * (forwards + 1) * (2 * q + 2 * kv) * tokens * e * (sp - 1) / sp
    # ZeRO over dp × sp: stage 3 gathers the parameters in forward and backward and reduce-scatters gradients
    # every micro-batch; stages 0-2 reduce the gradients once (an all-reduce or reduce-scatter + gather).
    params = model_parallel_params(shape, tp, layout.pp) * 2
    zero_bytes = (3 if layout.zero >= 3 else 2) * params * (n - 1) / n
    return tp_bytes + sp_bytes + zero_bytes


def layout_cost(shape: ModelShape, layout: Layout, *, seq_len: int, micro_batch: int) -> tuple:
    """The sort key ``choose_layout`` minimizes (see the comment above)."""
    return (CHECKPOINTING.index(layout.checkpointing or "on"), layout.tiled_mlp,
            communication_bytes(shape, layout, seq_len=seq_len, micro_batch=micro_batch), layout.pp,
            layout.tp_sp)


def layout_variants(shape: ModelShape, base: Layout, *, seq_len: int, micro_batch: int) -> list[Layout]:
    """``base`` with every setting of the memory features: checkpointing off/on/offload, Megatron SP (tp > 1)
    and the MLP in 1, 2, 4, … tiles (while a tile keeps ≥ 1024 rows)."""
    from dataclasses import replace

    tokens = math.ceil(seq_len / base.sp) * micro_batch
    tiles = [1] + [2 ** k for k in range(1, 16) if tokens // 2 ** k >= 1024]
    return [replace(base, checkpointing=ac, tp_sp=tp_sp, tiled_mlp=n)
            for ac in CHECKPOINTING for tp_sp in ((False, True) if base.tp > 1 else (False,)) for n in tiles]


@dataclass
class Choice:
    estimate: Estimate
    host_gib_per_node: float
    cost: tuple


def fitting_layouts(shape: ModelShape, gpus: int, *, seq_len: int, micro_batch: int = 1,
                    gpus_per_node: int = 8, gpu_gib: float = 80.0, host_gib_per_node: float | None = None,
                    layouts: list[Layout] | None = None, headroom: float = 0.9) -> list[Choice]:
    """Every variant of ``layouts`` (default: ``valid_layouts``) that fits ``headroom`` × ``gpu_gib`` per GPU
    (0.9: the margin the trainer's --activation-checkpointing auto keeps) — and, with offload,
    ``host_gib_per_node`` of pinned host memory per node where given — cheapest first."""
    out = []
    for base in valid_layouts(shape, gpus, gpus_per_node) if layouts is None else layouts:
        for layout in layout_variants(shape, base, seq_len=seq_len, micro_batch=micro_batch):
            est = estimate(shape, layout, seq_len=seq_len, micro_batch=micro_batch)
            host = est.host_gib * min(gpus_per_node, layout.world)
            if est.total_gib > headroom * gpu_gib or (host_gib_per_node is not None and host > host_gib_per_node):
                continue
            out.append(Choice(est, host, layout_cost(shape, layout, seq_len=seq_len, micro_batch=micro_batch)))
    return sorted(out, key=lambda c: c.cost)


def choose_layout(shape: ModelShape, gpus: int, **kwargs) -> Choice | None:
    """``auto``: the cheapest layout that fits (``layout_cost``), or None when none does."""
    fits = fitting_layouts(shape, gpus, **kwargs)
    return fits[0] if fits else None


def longest_row(shape: ModelShape, gpus: int, *, step: int = 8192, limit: int = 1 << 26, **kwargs
                ) -> tuple[int, Choice | None]:
    """The longest row (a multiple of ``step``, at most ``limit``) that some layout fits, and its choice."""
    def fits(rows: int):
        return choose_layout(shape, gpus, seq_len=rows * step, micro_batch=1, **kwargs)

    lo, hi, best = 0, limit // step, None
    while lo < hi:                  # memory grows with the row: bisect on the number of steps
        mid = (lo + hi + 1) // 2
        choice = fits(mid)
        if choice is not None:
            lo, best = mid, choice
        else:
            hi = mid - 1
    return lo * step, best


def needs_tp_sequence_parallel(shape: ModelShape, layout: Layout, *, seq_len: int, micro_batch: int, gpu_gib: float,
                               activation_checkpointing: bool | str = True, headroom: float = 0.9) -> bool:
    """For --tp-sequence-parallel auto: True when tp > 1 and the layout fits ``headroom`` × the GPU's memory with
    Megatron SP but not without it. It moves the same bytes as TP's all-reduces (``layout_cost``), but where it
    is not needed, off keeps the simpler path."""
    if layout.tp == 1:
        return False
    from dataclasses import replace

    def total(tp_sp: bool) -> float:
        return estimate(shape, replace(layout, tp_sp=tp_sp), seq_len=seq_len, micro_batch=micro_batch,
                        activation_checkpointing=activation_checkpointing).total_gib

    return total(False) > headroom * gpu_gib >= total(True)


def needs_activation_checkpointing(shape: ModelShape, layout: Layout, *, seq_len: int, micro_batch: int,
                                   gpu_gib: float, headroom: float = 0.9) -> bool:
    """True when the layout would not fit in ``headroom`` × the GPU's memory without recomputing blocks."""
    off = estimate(shape, layout, seq_len=seq_len, micro_batch=micro_batch, activation_checkpointing=False)
    return off.total_gib > headroom * gpu_gib
