"""The decoder of every supported family (Llama, Qwen2, Mistral, Qwen3, Gemma-2, Gemma-3) built from
tensor-parallel layers. What a family changes (norm style and count, q/k norms, GeGLU, embedding scale,
attention scale and soft-capping, per-layer windows and RoPE bases, final soft-capping) comes from
witscale/model/family.py's ``family_spec``, which the pipeline blocks (pipeline.py) read too.

Parameter names equal HF's (``model.layers.0.self_attn.q_proj.weight`` …, ``lm_head.weight``), so a
tp=1 state dict is an HF state dict. At tp > 1 each projection holds its shard: q/k/v and gate/up are
column-parallel, o and down row-parallel, embedding and LM head vocab-parallel; attention heads and
key/value heads are split across ranks — or, with fewer KV heads than ranks (tp a multiple of them), k/v
replicated and each rank using its query heads' KV head (``ReplicatedKVHeadLinear``, parallel/layers.py).

``forward`` takes packed rows: input ids, per-document position ids and ``cu_seqlens`` segment
boundaries over the flattened tokens (see attention.py). With labels it returns the weighted-loss
statistics computed by the fused vocab-parallel head; without, the final hidden states.

``tp_sequence_parallel`` (--tp-sequence-parallel, at tp > 1; Megatron's sequence parallelism): between the
linears — the residual stream, every norm, the checkpointed block input — each TP rank holds a contiguous 1/tp
of the rows' tokens, [B, S/tp, H]. The embedding reduce-scatters its partial sums, each block all-gathers
the sequence before q/k/v and gate/up and reduce-scatters after o and down (instead of copy + all-reduce),
and the final norm's output is all-gathered before the LM head; ``forward``'s inputs and outputs are the
same as without it (docs/parallel-layout.md#tp-sequence-parallelism).
"""
from __future__ import annotations

import contextlib
import functools
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from witscale.model.attention import check_backend_name, packed_attention, select_backend
from witscale.model.config import ModelConfig
from witscale.model.family import FamilySpec, family_spec
from witscale.model.memory import BlockInputOffload, checkpointing_mode, set_tiled_mlp, tiled_mlp
from witscale.model.rope import RotaryEmbedding, apply_rope
from witscale.parallel.comm import copy_to_tp, gather_sequence_from_tp, gather_sequence_replicated_grad
from witscale.parallel.sequence import ulysses_attention
from witscale.parallel.layers import (ColumnParallelLinear, ReplicatedKVHeadLinear, RowParallelLinear,
                                      VocabParallelEmbedding, VocabParallelLMHead, divide, kv_heads_replicated,
                                      sum_grad_over_tp, tp_size_rank)


class RMSNorm(nn.Module):
    """x / rms(x) · w (``offset`` 0: Llama, Qwen) or · (1 + w) in fp32 (``offset`` 1: Gemma, whose weights are
    stored around 0). ``sharded_input_group``: the TP group when the norm runs on this rank's shard of the heads (Qwen3 and
    Gemma-3's per-head q_norm/k_norm) or of the tokens (every norm under --tp-sequence-parallel): its replicated
    weight's gradient is then partial per rank and summed over the group (the TP gradient rule,
    parallel/layers.py ``sum_grad_over_tp``). None (the default) for norms of replicated activations (input,
    post-attention, final without --tp-sequence-parallel), whose gradient is already complete."""

    def __init__(self, dim: int, eps: float, sharded_input_group=None, offset: float = 0.0):
        super().__init__()
        self.weight = nn.Parameter(torch.full((dim,), 1.0 - offset))
        self.eps = eps
        self.sharded_input_group = sharded_input_group
        self.offset = offset

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        normed = x.float()
        normed = normed * torch.rsqrt(normed.pow(2).mean(-1, keepdim=True) + self.eps)
        weight = sum_grad_over_tp(self.weight, self.sharded_input_group)
        if self.offset:
            # Gemma multiplies in fp32 and casts after ((x̂ · (1 + w)).to(dtype)); Llama casts x̂ first.
            return (normed * (self.offset + weight.float())).to(dtype)
        return weight * normed.to(dtype)


def sequence_parallel_group(tp_group, tp_sequence_parallel: bool):
    """The TP group when the residual stream is sharded along the sequence over it (--tp-sequence-parallel at
    tp > 1), else None: what the residual stream's norms pass as ``sharded_input_group``."""
    return tp_group if tp_sequence_parallel and tp_size_rank(tp_group)[0] > 1 else None


def make_norm(cfg: ModelConfig, spec: FamilySpec, dim: Optional[int] = None, sharded_input_group=None) -> RMSNorm:
    """The family's RMSNorm over ``dim`` (default hidden_size)."""
    return RMSNorm(dim or cfg.hidden_size, cfg.rms_norm_eps, sharded_input_group, offset=spec.norm_offset)


def scale_embeddings(x: torch.Tensor, spec: FamilySpec) -> torch.Tensor:
    """Gemma multiplies the embeddings by √hidden rounded to the model dtype (55.4256 → 55.5 in bf16 for
    hidden 3072), as transformers does: the checkpoints were trained that way."""
    if spec.embed_scale is None:
        return x
    # A Python number (already rounded), not a device tensor: no host-to-device copy every step.
    return x * _rounded_to(spec.embed_scale, x.dtype)


@functools.lru_cache(maxsize=None)
def _rounded_to(value: float, dtype: torch.dtype) -> float:
    return torch.tensor(value, dtype=dtype).item()


def make_lm_head(cfg: ModelConfig, spec: FamilySpec, tp_group, loss_chunk_size: int) -> VocabParallelLMHead:
    return VocabParallelLMHead(cfg.vocab_size, cfg.hidden_size, tp_group, loss_chunk_size,
                               logit_softcap=spec.final_softcap)


class Attention(nn.Module):
    """``sp_group``: the sequence-parallel group (--sp; None: sp = 1): x holds this rank's 1/sp of every row and
    the attention itself runs on the whole rows (witscale/parallel/sequence.py)."""

    def __init__(self, cfg: ModelConfig, tp_group, attention_backend: str, layer_index: int,
                 spec: Optional[FamilySpec] = None, sp_group=None, tp_sequence_parallel: bool = False):
        super().__init__()
        spec = spec or family_spec(cfg)
        tp, _ = tp_size_rank(tp_group)
        self.tp_sequence_parallel = tp_sequence_parallel and tp > 1
        self.head_dim = cfg.head_dim
        self.local_heads = divide(cfg.num_attention_heads, tp, "attention heads")
        q_out, kv_out = cfg.num_attention_heads * cfg.head_dim, cfg.num_key_value_heads * cfg.head_dim
        self.q_proj = ColumnParallelLinear(cfg.hidden_size, q_out, cfg.attention_bias, tp_group)
        if kv_heads_replicated(cfg.num_key_value_heads, tp):
            # Fewer KV heads than TP ranks: k/v replicated, each rank computing the one head its query heads use.
            self.local_kv_heads = 1
            self.k_proj = ReplicatedKVHeadLinear(cfg.hidden_size, cfg.num_key_value_heads, cfg.head_dim,
                                                 cfg.attention_bias, tp_group)
            self.v_proj = ReplicatedKVHeadLinear(cfg.hidden_size, cfg.num_key_value_heads, cfg.head_dim,
                                                 cfg.attention_bias, tp_group)
        else:
            self.local_kv_heads = divide(cfg.num_key_value_heads, tp, "key/value heads")
            self.k_proj = ColumnParallelLinear(cfg.hidden_size, kv_out, cfg.attention_bias, tp_group)
            self.v_proj = ColumnParallelLinear(cfg.hidden_size, kv_out, cfg.attention_bias, tp_group)
        self.o_proj = RowParallelLinear(q_out, cfg.hidden_size, cfg.o_bias, tp_group,
                                        sequence_parallel=self.tp_sequence_parallel)
        if spec.qk_norm:
            # Per head, on this rank's heads only: the weight's gradient is summed over tp (layers.py's rule).
            self.q_norm = make_norm(cfg, spec, cfg.head_dim, sharded_input_group=tp_group)
            self.k_norm = make_norm(cfg, spec, cfg.head_dim, sharded_input_group=tp_group)
        else:
            self.q_norm = self.k_norm = None
        self.sliding_window = spec.layers[layer_index].sliding_window
        self.scale, self.softcap = spec.attn_scale, spec.attn_softcap
        self.backend = attention_backend
        self.tp_group = tp_group
        self.sp_group = sp_group

    def forward(self, x, cos, sin, cu_seqlens, max_seqlen):
        x = tp_block_input(x, self.tp_group, self.tp_sequence_parallel)      # once for q, k and v
        b, s, _ = x.shape
        q = self.q_proj(x, input_copied=True).view(b, s, self.local_heads, self.head_dim)
        k = self.k_proj(x, input_copied=True).view(b, s, self.local_kv_heads, self.head_dim)
        v = self.v_proj(x, input_copied=True).view(b, s, self.local_kv_heads, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        out = _attend(q, k, v, cu_seqlens, max_seqlen, requested=self.backend, sliding_window=self.sliding_window,
                      scale=self.scale, softcap=self.softcap, sp_group=self.sp_group)
        return self.o_proj(out.reshape(b, s, self.local_heads * self.head_dim))


def tp_block_input(x: torch.Tensor, tp_group, tp_sequence_parallel: bool) -> torch.Tensor:
    """The input of a block's column-parallel linears, once for all of them (q/k/v, gate/up): ``copy_to_tp``
    (one all-reduce of dL/dx in backward), or under --tp-sequence-parallel the all-gather of the rank's
    [B, S/tp, H] along the sequence (one reduce-scatter of dL/dx in backward)."""
    if tp_sequence_parallel:
        return gather_sequence_from_tp(x, tp_group)
    return copy_to_tp(x, tp_group)


@torch.compiler.disable
def _attend(q, k, v, cu_seqlens, max_seqlen, *, requested, sliding_window, scale, softcap, sp_group=None):
    """Packed attention, always run eagerly — also inside a block compiled by ``--compile``
    (``compile_decoder_blocks``): the CPU backends group documents by their lengths read from ``cu_seqlens``
    on the host (data-dependent shapes: a graph break, and a recompile per batch), flex compiles itself, and
    the varlen kernels are one opaque call with nothing to fuse. The compiled graphs are then the parts worth
    fusing — norms, projections, RoPE before; output projection, residual, norm and gated MLP after."""
    backend = select_backend(requested, q.device, q.dtype, softcap=softcap)

    def attend(q, k, v):
        return packed_attention(q, k, v, cu_seqlens, max_seqlen, backend=backend, sliding_window=sliding_window,
                                scale=scale, softcap=softcap)
    return ulysses_attention(q, k, v, sp_group, attend)      # under --sp: the all-to-all over heads around it


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig, tp_group, tp_sequence_parallel: bool = False):
        super().__init__()
        self.tp_sequence_parallel = tp_sequence_parallel and tp_size_rank(tp_group)[0] > 1
        self.gate_proj = ColumnParallelLinear(cfg.hidden_size, cfg.intermediate_size, cfg.mlp_bias, tp_group)
        self.up_proj = ColumnParallelLinear(cfg.hidden_size, cfg.intermediate_size, cfg.mlp_bias, tp_group)
        self.down_proj = RowParallelLinear(cfg.intermediate_size, cfg.hidden_size, cfg.mlp_bias, tp_group,
                                           sequence_parallel=self.tp_sequence_parallel)
        self.gelu = cfg.hidden_act == "gelu_pytorch_tanh"       # GeGLU (Gemma) instead of SwiGLU
        self.tp_group = tp_group

    def forward(self, x):
        x = tp_block_input(x, self.tp_group, self.tp_sequence_parallel)      # once for gate and up
        gate = self.gate_proj(x, input_copied=True)
        gate = F.gelu(gate, approximate="tanh") if self.gelu else F.silu(gate)
        return self.down_proj(gate * self.up_proj(x, input_copied=True))


class DecoderLayer(nn.Module):
    """Decoder layer ``layer_index`` (its window and RoPE come from the family spec). Llama-style: pre-norms
    on each branch; Gemma ("sandwich"): each branch also normed on its output, before the residual add."""

    def __init__(self, cfg: ModelConfig, tp_group, attention_backend: str, layer_index: int,
                 spec: Optional[FamilySpec] = None, sp_group=None, tp_sequence_parallel: bool = False):
        super().__init__()
        spec = spec or family_spec(cfg)
        sharded = sequence_parallel_group(tp_group, tp_sequence_parallel)     # norms on 1/tp of the tokens
        self.input_layernorm = make_norm(cfg, spec, sharded_input_group=sharded)
        self.self_attn = Attention(cfg, tp_group, attention_backend, layer_index, spec, sp_group, tp_sequence_parallel)
        self.post_attention_layernorm = make_norm(cfg, spec, sharded_input_group=sharded)
        self.mlp = MLP(cfg, tp_group, tp_sequence_parallel)
        self.mlp_tiles = 1          # --tiled-mlp: the MLP over this many sequence tiles (memory.py)
        self.sandwich_norms = spec.sandwich_norms
        if spec.sandwich_norms:
            self.pre_feedforward_layernorm = make_norm(cfg, spec, sharded_input_group=sharded)
            self.post_feedforward_layernorm = make_norm(cfg, spec, sharded_input_group=sharded)

    def forward(self, x, cos, sin, cu_seqlens, max_seqlen):
        if self.sandwich_norms:
            x = x + self.post_attention_layernorm(
                self.self_attn(self.input_layernorm(x), cos, sin, cu_seqlens, max_seqlen))
            return x + self.post_feedforward_layernorm(tiled_mlp(self.mlp, self.pre_feedforward_layernorm(x),
                                                                 self.mlp_tiles))
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, cu_seqlens, max_seqlen)
        return x + tiled_mlp(self.mlp, self.post_attention_layernorm(x), self.mlp_tiles)


class Decoder(nn.Module):
    def __init__(self, cfg: ModelConfig, tp_group, attention_backend: str, activation_checkpointing,
                 sp_group=None, tp_sequence_parallel: bool = False):
        super().__init__()
        self.spec = spec = family_spec(cfg)
        self.sequence_group = sequence_parallel_group(tp_group, tp_sequence_parallel)
        self.embed_tokens = VocabParallelEmbedding(cfg.vocab_size, cfg.hidden_size, tp_group,
                                                   sequence_parallel=self.sequence_group is not None)
        self.layers = nn.ModuleList(DecoderLayer(cfg, tp_group, attention_backend, i, spec, sp_group,
                                                 tp_sequence_parallel)
                                    for i in range(cfg.num_hidden_layers))
        self.norm = make_norm(cfg, spec, sharded_input_group=self.sequence_group)
        # One table per distinct RoPE (Gemma-3: local and global), cos/sin computed once per forward for each.
        self.rotary = [RotaryEmbedding(cfg.head_dim, r.theta, r.scaling) for r in spec.ropes]
        self.activation_checkpointing = checkpointing_mode(activation_checkpointing)     # off / on / offload
        self.offloaded_bytes = 0        # host bytes the last offloaded forward held for backward (memory probes)

    def forward(self, input_ids, position_ids, cu_seqlens, max_seqlen):
        x = scale_embeddings(self.embed_tokens(input_ids), self.spec)
        tables = [rope.cos_sin(position_ids.to(x.device), x.dtype) for rope in self.rotary]
        recompute = self.activation_checkpointing != "off" and self.training and torch.is_grad_enabled()
        # offload: the same checkpoint, its saved inputs (each block's hidden state) packed to host memory by
        # saved-tensor hooks around the call (memory.py says why this and not save_on_cpu / DeepSpeed's).
        offload = BlockInputOffload() if recompute and self.activation_checkpointing == "offload" else None
        for layer, layer_spec in zip(self.layers, self.spec.layers):
            cos, sin = tables[layer_spec.rope_index]
            if recompute:
                with offload if offload is not None else contextlib.nullcontext():
                    x = checkpoint(layer, x, cos, sin, cu_seqlens, max_seqlen, use_reentrant=False)
            else:
                x = layer(x, cos, sin, cu_seqlens, max_seqlen)
        if offload is not None:
            self.offloaded_bytes = offload.host_bytes
        # --tp-sequence-parallel: the whole rows again for the head, whose fused loss returns the same, complete
        # dL/dh on every TP rank (backward keeps this rank's part). A no-op otherwise.
        return gather_sequence_replicated_grad(self.norm(x), self.sequence_group)


class CausalLM(nn.Module):
    def __init__(self, cfg: ModelConfig, tp_group=None, *, attention_backend: str = "auto",
                 activation_checkpointing=False, loss_chunk_size: int = 4096, sp_group=None,
                 tp_sequence_parallel: bool = False, tiled_mlp: int = 1):
        """``activation_checkpointing``: False/'off', True/'on' or 'offload' (memory.py); ``tiled_mlp``: the
        MLP of each block over that many sequence tiles (1: untiled). ``sp_group`` (--sp > 1): forward then takes
        this rank's 1/sp of every row (``sequence_shard``) with the whole rows' ``cu_seqlens``/``max_seqlen``; the
        loss statistics are this rank's part. ``tp_sequence_parallel`` (at tp > 1): the blocks run on 1/tp of those
        tokens per TP rank (module docstring); the row length each rank gets must then divide by tp."""
        super().__init__()
        self.config = cfg
        self.tp_group = tp_group
        self.sp_group = sp_group
        self.model = Decoder(cfg, tp_group, attention_backend, activation_checkpointing, sp_group,
                             tp_sequence_parallel)
        self.lm_head = make_lm_head(cfg, self.model.spec, tp_group, loss_chunk_size)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        set_tiled_mlp(self, tiled_mlp)

    def forward(self, input_ids, position_ids, cu_seqlens, max_seqlen: int, labels: Optional[torch.Tensor] = None,
                weights: Optional[torch.Tensor] = None, target_classes: Optional[torch.Tensor] = None,
                objective=None):
        """input_ids/position_ids [B, S] int64, cu_seqlens int32 [segments + 1] over the B*S flattened
        tokens → final-norm hidden states [B, S, H]; with ``labels``, the fused head's loss statistics
        (or ``objective``'s, e.g. DPO: see ``VocabParallelLMHead.forward``)."""
        if input_ids.shape != position_ids.shape or input_ids.dim() != 2:
            raise ValueError(f"input_ids {tuple(input_ids.shape)} and position_ids {tuple(position_ids.shape)} "
                             "must both be [batch, seq]")
        hidden = self.model(input_ids, position_ids, cu_seqlens, int(max_seqlen))
        if labels is None:
            return hidden
        return self.lm_head(hidden, labels, weights, target_classes, objective=objective)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Full (gathered, unpadded) logits [..., vocab], soft-capped where the family caps them: for tests and
        evaluation, not for training."""
        return self.lm_head(hidden)

    def set_attention_backend(self, backend: str) -> None:
        """Force one attention backend (attention.BACKENDS) in every layer."""
        check_backend_name(backend)
        for layer in self.model.layers:
            layer.self_attn.backend = backend

    def set_activation_checkpointing(self, enabled) -> None:
        """True/'on', False/'off' or 'offload'."""
        self.model.activation_checkpointing = checkpointing_mode(enabled)


def compile_decoder_blocks(module: nn.Module, backend: str = "inductor") -> int:
    """``--compile``: ``torch.compile`` each decoder block of ``module`` in place (torchtitan's per-block
    pattern: a graph break stays inside one block, and the blocks share one compiled graph — their code and
    shapes are the same, the parameters are graph inputs — so compile time is one block's, not the model's).
    ``nn.Module.compile`` keeps the parameter names (no ``_orig_mod.`` prefix): checkpoints, the export and
    DeepSpeed see the same module. Activation checkpointing wraps the call of the block, so the compiled
    forward runs inside the checkpoint (and again in its recomputation). Idempotent: a block already
    compiled is left as it is. Returns how many blocks it compiled now."""
    compiled = 0
    for block in module.modules():
        if isinstance(block, DecoderLayer) and not is_compiled_block(block):
            block.compile(backend=backend)
            compiled += 1
    return compiled


def compile_refusal(*, zero_stage: int, pp: int, sp: int = 1) -> Optional[str]:
    """Why ``--compile`` cannot run with this layout (one line), or None."""
    if sp > 1:
        return ("not with --sp: compiled blocks around the sequence-parallel all-to-all are not tested yet; train "
                "without --compile or with --sp 1")
    if pp > 1:
        return ("not with --pp: DeepSpeed's pipeline engine runs the stages' blocks (pipeline.py) through its own "
                "schedule and activation checkpointing, which per-block compilation is not tested against; "
                "train without --compile or with --pp 1")
    if zero_stage == 3:
        return ("not with ZeRO-3: its parameter-gathering hooks run on every submodule and are excluded from "
                "compilation (torch.compiler.disable in DeepSpeed's parameter_offload.py): each block's graph is "
                "cut at its submodules and dynamo's recompile limit is reached, so the blocks fall back to eager "
                "(tried on DeepSpeed 0.19.8, torch 2.13); DeepSpeed's own route is its whole-model DeepCompile "
                "(engine.compile); use ZeRO-0..2 or train without --compile")
    return None


def is_compiled_block(block: nn.Module) -> bool:
    return getattr(block, "_compiled_call_impl", None) is not None    # what nn.Module.compile sets


def compiled_block_count(module: nn.Module) -> int:
    return sum(1 for m in module.modules() if isinstance(m, DecoderLayer) and is_compiled_block(m))


def packed_positions(doc_lengths_per_row: Sequence[Sequence[int]], seq_len: int
                     ) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(position_ids [B, S] int64, cu_seqlens int32, max_seqlen) for rows packed with documents of the
    given lengths, in order. Positions restart at 0 for every document; a row's unfilled tail becomes
    one more segment of its own (positions from 0), so every token belongs to exactly one segment."""
    if seq_len <= 0:
        raise ValueError(f"seq_len must be positive, got {seq_len}")
    positions = torch.empty(len(doc_lengths_per_row), seq_len, dtype=torch.long)
    cu, max_len = [0], 0
    for r, lengths in enumerate(doc_lengths_per_row):
        lengths = [int(n) for n in lengths]
        if any(n < 0 for n in lengths) or sum(lengths) > seq_len:
            raise ValueError(f"row {r}: document lengths {lengths} do not fit in seq_len {seq_len}")
        tail = seq_len - sum(lengths)
        segments = [n for n in lengths if n > 0] + ([tail] if tail else [])
        positions[r] = torch.cat([torch.arange(n) for n in segments])
        for n in segments:
            cu.append(cu[-1] + n)
        max_len = max([max_len] + segments)
    return positions, torch.tensor(cu, dtype=torch.int32), max_len


def dense_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """HF (unsharded) shape of every parameter, by name."""
    spec = family_spec(cfg)
    h, hd = cfg.hidden_size, cfg.head_dim
    q, kv, inter = cfg.num_attention_heads * hd, cfg.num_key_value_heads * hd, cfg.intermediate_size
    shapes = {"model.embed_tokens.weight": (cfg.vocab_size, h), "model.norm.weight": (h,)}
    if not cfg.tie_word_embeddings:
        shapes["lm_head.weight"] = (cfg.vocab_size, h)
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}."
        shapes.update({
            p + "input_layernorm.weight": (h,), p + "post_attention_layernorm.weight": (h,),
            p + "self_attn.q_proj.weight": (q, h), p + "self_attn.k_proj.weight": (kv, h),
            p + "self_attn.v_proj.weight": (kv, h), p + "self_attn.o_proj.weight": (h, q),
            p + "mlp.gate_proj.weight": (inter, h), p + "mlp.up_proj.weight": (inter, h),
            p + "mlp.down_proj.weight": (h, inter)})
        if spec.qk_norm:
            shapes.update({p + "self_attn.q_norm.weight": (hd,), p + "self_attn.k_norm.weight": (hd,)})
        if spec.sandwich_norms:
            shapes.update({p + "pre_feedforward_layernorm.weight": (h,), p + "post_feedforward_layernorm.weight": (h,)})
        if cfg.attention_bias:
            shapes.update({p + "self_attn.q_proj.bias": (q,), p + "self_attn.k_proj.bias": (kv,),
                           p + "self_attn.v_proj.bias": (kv,)})
        if cfg.o_bias:
            shapes[p + "self_attn.o_proj.bias"] = (h,)
        if cfg.mlp_bias:
            shapes.update({p + "mlp.gate_proj.bias": (inter,), p + "mlp.up_proj.bias": (inter,),
                           p + "mlp.down_proj.bias": (h,)})
    return shapes
