"""The weighted token loss: a fused, chunked, vocab-parallel cross-entropy with real-valued weights.

For every predicted token t (target id y_t, weight w_t ≥ 0)

    nll_t = logsumexp(h_t · Wᵀ) − h_t · W[y_t]          weighted_sum = Σ_t w_t · nll_t

computed on this rank's vocabulary shard W[v0:v0+V_local] with Megatron's algorithm over the
tensor-parallel group: all-reduce(MAX) of the row max, then all-reduce(SUM) of the target logit and of
Σ exp (the two sums travel in one call). Softmax arithmetic is fp32 whatever the input dtype (bf16 inputs:
the logits block comes out of the matmul in fp32 — one GEMM with fp32 output where torch has it, else the
bf16 product cast straight after, as HF and Megatron do; gradients of the LM weight are accumulated over
chunks in one fp32 buffer, one pass per chunk: ``_add_weight_grad``). Work is chunked over tokens: at
most one [chunk × V_local] block of logits is alive at any time, in forward and in backward — the full [T × V]
logits are never materialized.

Final-logit soft-capping (Gemma-2: ``final_logit_softcapping``; ``logit_softcap=c``): the softmax runs on
z' = c·tanh(z / c) instead of z, so nll_t = logsumexp(z'_t) − z'_t[y_t], and the chain rule adds one
factor per logit: dz = dz' · (1 − tanh²(z / c)). Per chunk, ``tanh(z / c)`` is computed in place in the
logits block and kept beside a second block holding z' (then its softmax gradient), so a capped chunk
holds two [chunk × V_local] fp32 blocks while gradients are computed (``chunk_rows`` halves the
chunk for it: the same memory budget); without gradients it stays one block. Padded vocabulary rows are
set to −inf AFTER the cap (tanh would otherwise map them to −c, a real probability).

Why gradients are computed during the forward pass: the output is linear in its (scalar) upstream
gradient g, so dL/dh = g · d(Σ w·nll)/dh and likewise for the weight. Computing d/dh and d/dW while the
logits block is at hand and only scaling them by g in backward costs the same three matmuls per chunk as
the naive path (logits, dh, dW); a recompute-in-backward design needs a fourth (~1.33× time). The stored
dW buffer has the size of the weight's own gradient and is handed over as that gradient (scaled in
place, or scaled and cast in one pass). Under ``torch.no_grad`` (evaluation), or for inputs that do not
require grad, no gradient buffer is created. Backward through one call can run once (the buffers are handed over).

Tensor parallelism: pass the *replicated* hidden states directly — NOT through ``copy_to_tp``. dL/dh is
the sum of the partial gradients of all vocabulary shards; this function all-reduces it itself (one
all-reduce of [T, H] per call), so every TP rank receives the full gradient.

Normalizations. ``weighted_sum`` is divided by a denominator counted over the GLOBAL batch (all
micro-batches of all data-parallel ranks; docs/objective.md#global-denominator), never per micro-batch;
``normalization_counts`` gives this micro-batch's share of each:
- ``nonzero`` (default, the paper: Chatterjee et al. 2025): the number of predicted tokens with w > 0.
  (λp, λr) and (cλp, cλr) then give the same AdamW update without clipping;
- ``weight_sum``: Σ w over predicted tokens (a weighted mean; the absolute scale of λ cancels);
- ``tokens``: the number of predicted tokens whatever their weight (the weights' scale scales the gradient,
  which matters with clipping).
"""
from __future__ import annotations

import math
import os
from typing import NamedTuple, Optional

import torch
import torch.distributed as dist

from witscale.data.classes import NUM_CLASSES
from witscale.data.weighting import IGNORE_INDEX, NORMALIZATIONS  # the objective's names, defined once
_GRAD_W_BLOCK = 8192     # vocabulary rows per bf16 weight-gradient product where no fp32-output GEMM exists
# The fp32 logits block's memory budget, which sets the rows per chunk (``chunk_rows``). Every chunk makes one
# pass over the [V_local × H] fp32 LM-head gradient (``_add_weight_grad``), so fewer, larger chunks cut that
# traffic (512-row chunks of a 4k-token row at V=128k, H=2048 made 8 passes over a 1 GiB buffer); 1 GiB is
# small beside an 80 GB GPU. WITSCALE_LOSS_BLOCK_MIB overrides it (read at each call).
DEFAULT_LOGITS_BLOCK_MIB = 1024
# On the CPU a pass over the gradient is cheap beside a chunk's matmuls: per chunk of c rows the pass (8 bytes
# per element) costs (8 / 6c)·(FLOP/s ÷ bytes/s) of the chunk's 6·c·V·H flops, a few % at 256 rows for one
# core (~50 GFLOP/s over ~10 GB/s), against ~19% at 2048 rows for an H100's 989 TFLOP/s over 3.35 TB/s.
# So the CPU default is 128 MiB (256 rows at V=128k, 1024 at V=32k), and the loss's memory stays far below
# the full logits there too. Measured (tools/bench/bench_loss.py, T 4096, H 1024, V 128k, one core): 256-row
# chunks take 1.06× the CPU time of 512- or 2048-row ones and 0.995× the naive path's; 256 MiB would give
# 512 rows there but 2048 at V=32k, 0.13× the naive path's memory (the target is ≤ 1/8). The override
# applies to every device.
CPU_LOGITS_BLOCK_MIB = 128


class LossStats(NamedTuple):
    """A NamedTuple, not a dataclass: DeepSpeed ZeRO-3 must find these tensors among a module's outputs to
    re-gather the LM head's weight before its backward (a dataclass hides them and backward fails)."""
    weighted_sum: torch.Tensor    # scalar, differentiable: Σ_t w_t · nll_t over this micro-batch
    class_nll_sum: torch.Tensor   # [num_classes] float64, detached: Σ nll of predicted tokens of each class
    class_count: torch.Tensor     # [num_classes] float64, detached: predicted tokens of each class
    # [T] fp32, detached: each position's NLL (0 where nothing is predicted); pair objectives sum it per
    # completion (witscale/training/objectives/pairs.py). Already computed by the kernel: returning it costs nothing.
    token_nll: Optional[torch.Tensor] = None


def normalization_counts(targets: torch.Tensor, weights: torch.Tensor) -> dict[str, torch.Tensor]:
    """This batch's share of each denominator (float64 scalars; the trainer sums them over the global batch)."""
    predicted = targets != IGNORE_INDEX
    w = torch.where(predicted, weights.double(), torch.zeros((), dtype=torch.float64, device=weights.device))
    return {"nonzero": (w > 0).sum().double(), "weight_sum": w.sum(), "tokens": predicted.sum().double()}


def logits_block_bytes(device: Optional[torch.device] = None) -> int:
    """The fp32 logits block's budget in bytes: WITSCALE_LOSS_BLOCK_MIB, else CPU_LOGITS_BLOCK_MIB for a CPU
    ``device`` and DEFAULT_LOGITS_BLOCK_MIB for an accelerator (or no device: the planner's GPU sizes)."""
    raw = os.environ.get("WITSCALE_LOSS_BLOCK_MIB", "").strip()
    default = CPU_LOGITS_BLOCK_MIB if device is not None and torch.device(device).type == "cpu" \
        else DEFAULT_LOGITS_BLOCK_MIB
    try:
        mib = float(raw) if raw else default
    except ValueError:
        raise ValueError(f"WITSCALE_LOSS_BLOCK_MIB={raw!r} is not a number of MiB") from None
    if not (mib > 0 and math.isfinite(mib)):
        raise ValueError(f"WITSCALE_LOSS_BLOCK_MIB={raw!r} must be a positive number of MiB")
    return int(round(mib * 2 ** 20))


def chunk_rows(tokens: int, v_local: int, chunk_size: int, blocks: int = 1,
               budget_bytes: Optional[int] = None, device: Optional[torch.device] = None) -> int:
    """Tokens per chunk: as many as the ``blocks`` [chunk × V_local] fp32 blocks alive per chunk (2 for a
    soft-capped loss with gradients, else 1) fit in ``budget_bytes`` (default ``logits_block_bytes(device)``),
    rounded down to a power of two (steady matmul shapes), at most ``chunk_size`` and ``tokens``."""
    budget = logits_block_bytes(device) if budget_bytes is None else int(budget_bytes)
    rows = max(1, budget // (4 * max(1, v_local) * blocks))
    rows = 1 << (rows.bit_length() - 1)
    return max(1, min(int(chunk_size), rows, tokens))


def _all_reduce(t: torch.Tensor, op, group) -> torch.Tensor:
    if group is not None:
        dist.all_reduce(t, op=op, group=group)
    return t


_FP32_OUT_GEMM: dict = {}   # (device type, dtype) → (mm, addmm) support of out_dtype=torch.float32


def _fp32_out_gemm(device: torch.device, dtype: torch.dtype) -> tuple[bool, bool]:
    """Whether ``torch.mm(a, b, out_dtype=torch.float32, out=c)`` and ``torch.addmm(c, a, b, out_dtype=
    torch.float32, out=c)`` run for ``dtype`` (bf16/fp16) inputs on ``device``: torch ≥ 2.11, CUDA only in
    2.13 ("Supported only on CUDA and for torch.float32 given torch.float16/torch.bfloat16 input dtypes"),
    and some releases require addmm's ``input`` to have the inputs' dtype. Probed once per device type and
    dtype on 1×1 tensors (no host sync: a refusal raises at dispatch)."""
    key = (device.type, dtype)
    if key not in _FP32_OUT_GEMM:
        a = torch.ones(1, 1, dtype=dtype, device=device)
        c = torch.zeros(1, 1, dtype=torch.float32, device=device)
        support = []
        for call in (lambda: torch.mm(a, a, out_dtype=torch.float32, out=c),
                     lambda: torch.addmm(c, a, a, out_dtype=torch.float32, out=c)):
            try:
                call()
                support.append(True)
            except (TypeError, NotImplementedError, RuntimeError):
                support.append(False)
        _FP32_OUT_GEMM[key] = (support[0], support[0] and support[1])
    return _FP32_OUT_GEMM[key]


def _mm_fp32(a: torch.Tensor, b: torch.Tensor, fp32_mm: bool, out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """a @ b in fp32 (into ``out`` when given). fp32 inputs: a plain mm. bf16/fp16 inputs: one GEMM that
    accumulates and writes fp32 where ``fp32_mm`` (no product in the input dtype, then a cast: that was a
    second copy of every logits block, rounded to bf16); else the product and its cast."""
    if a.dtype == torch.float32:
        return torch.mm(a, b) if out is None else torch.mm(a, b, out=out)
    if fp32_mm:
        return torch.mm(a, b, out_dtype=torch.float32) if out is None \
            else torch.mm(a, b, out_dtype=torch.float32, out=out)
    return (a @ b).float() if out is None else out.copy_(a @ b)


def _add_weight_grad(grad_w: torch.Tensor, g: torch.Tensor, h: torch.Tensor, first: bool,
                     fp32_gemm: tuple[bool, bool]) -> None:
    """grad_w (+)= gᵀ·h, the LM-head gradient of one chunk, in ONE pass over the [V_local × H] fp32 buffer:
    the first chunk writes it (no zero fill), each later one reads and writes it once (a GEMM with beta=1).

    Why token chunks outermost, and one pass per chunk rather than one per micro-batch: the softmax gradient
    of a row needs its logsumexp over the whole vocabulary, so writing the gradient once per micro-batch
    means looping over vocabulary blocks outermost with every row's logsumexp known, i.e. recomputing the
    logits (2·T·V·H more flops). Each extra chunk costs one pass, 8·V·H bytes. The recompute is cheaper
    only when (chunks − 1)·8·V·H / bandwidth > 2·T·V·H / FLOP/s; with chunks ≈ 4·T·V / budget that is
    V_local > budget · bandwidth / (16 · FLOP/s), ~227k on an H100 SXM (3.35 TB/s, 989 TFLOP/s) and ~325k
    on an H200 for the 1 GiB budget, whatever T: above every vocabulary shard witscale trains (Gemma's 256k
    at tp ≥ 2). So the logits are computed once and a larger budget (fewer chunks) buys fewer passes; a
    micro-batch that fits one block writes the gradient exactly once. Counted by
    tests/test_parallel_cross_entropy.py::test_lm_head_gradient_passes."""
    fp32_mm, fp32_addmm = fp32_gemm
    gt = g.t()
    if g.dtype == torch.float32:
        if first:
            torch.mm(gt, h, out=grad_w)
        else:
            grad_w.addmm_(gt, h)                                       # no [V_local × H] temporary
    elif fp32_addmm or (first and fp32_mm):                           # bf16 GEMM, fp32 accumulation and output
        if first:
            torch.mm(gt, h, out_dtype=torch.float32, out=grad_w)
        else:
            torch.addmm(grad_w, gt, h, out_dtype=torch.float32, out=grad_w)
    else:
        # No fp32-output GEMM (the CPU; torch < 2.11): bf16 products in vocabulary blocks, so that the bf16
        # temporary is [block × H], not a second copy of the weight's size; fp32 accumulation.
        for v in range(0, grad_w.shape[0], _GRAD_W_BLOCK):
            part = gt[v:v + _GRAD_W_BLOCK] @ h
            if first:
                grad_w[v:v + _GRAD_W_BLOCK].copy_(part)
            else:
                grad_w[v:v + _GRAD_W_BLOCK].add_(part)    # not ``+=`` on a slice: its __setitem__ copies again


class _FusedLinearWeightedCE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, weights, group, vocab_start, true_vocab_size, rows, need_h, need_w,
                softcap):
        tokens = hidden.shape[0]
        v_local = weight.shape[0]
        dev = hidden.device
        fp32 = torch.float32
        nll = torch.zeros(tokens, dtype=fp32, device=dev)
        grad_h = torch.empty(hidden.shape, dtype=fp32, device=dev) if need_h else None
        # The first chunk writes grad_w (no zero fill); with no tokens there is no chunk, and it stays 0.
        alloc = torch.empty if tokens else torch.zeros
        grad_w = alloc(weight.shape, dtype=fp32, device=dev) if need_w else None
        same_dtype = hidden.dtype == fp32 and weight.dtype == fp32
        fp32_gemm = (True, True) if same_dtype else _fp32_out_gemm(dev, hidden.dtype)
        # Padded vocabulary rows (global ids ≥ true_vocab_size, when vocab % tp != 0) never win the softmax.
        first_pad = min(v_local, max(0, true_vocab_size - vocab_start))
        valid = targets != IGNORE_INDEX
        local_t = targets - vocab_start
        in_shard = valid & (local_t >= 0) & (local_t < v_local)
        local_t = torch.where(in_shard, local_t, torch.zeros_like(local_t))
        w_all = torch.where(valid, weights.to(fp32), torch.zeros((), dtype=fp32, device=dev))
        zero = torch.zeros((), dtype=fp32, device=dev)

        for s in range(0, tokens, rows):
            e = min(s + rows, tokens)
            h = hidden[s:e]
            logits = _mm_fp32(h, weight.t(), fp32_gemm[0])                  # [c, V_local] fp32: the only big block
            tanh_z = None
            if softcap is not None:
                logits.div_(softcap).tanh_()                                 # tanh(z / c), in place
                if need_h or need_w:
                    tanh_z, logits = logits, logits * softcap                # keep tanh for the chain rule
                else:
                    logits.mul_(softcap)
            if first_pad < v_local:
                logits[:, first_pad:] = float("-inf")
            row_max = _all_reduce(logits.amax(dim=1), dist.ReduceOp.MAX, group)
            logits -= row_max[:, None]
            shard_mask, lt = in_shard[s:e], local_t[s:e]
            target_logit = torch.where(shard_mask, logits.gather(1, lt[:, None]).squeeze(1), zero)
            logits.exp_()                                                    # in place: now exp(logit − max)
            sums = torch.stack([target_logit, logits.sum(dim=1)])
            target_logit, sum_exp = _all_reduce(sums, dist.ReduceOp.SUM, group)
            nll[s:e] = torch.where(valid[s:e], sum_exp.log() - target_logit, zero)
            if need_h or need_w:
                # d(Σ w·nll)/dlogits = w · (softmax − onehot(target)); w = 0 rows give exact zeros.
                w = w_all[s:e]
                logits *= (w / sum_exp)[:, None]
                # − w at the target column of rows whose target lies in this shard; a scatter, not a
                # nonzero() gather, so that no chunk waits for the host (rows elsewhere add 0 at column 0).
                logits.scatter_add_(1, lt[:, None], torch.where(shard_mask, -w, zero)[:, None])
                if tanh_z is not None:
                    logits.mul_(tanh_z.square_().neg_().add_(1.0))           # dz = dz' · (1 − tanh²(z/c))
                    del tanh_z
                g = logits if same_dtype else logits.to(weight.dtype)
                if need_h:
                    _mm_fp32(g, weight, fp32_gemm[0], out=grad_h[s:e])
                if need_w:
                    _add_weight_grad(grad_w, g, h, s == 0, fp32_gemm)
                del g
            del logits
        if need_h:
            _all_reduce(grad_h, dist.ReduceOp.SUM, group)   # dL/dh is a sum over the vocabulary shards
        # Plain attributes, not save_for_backward: these are neither inputs nor outputs, and backward hands
        # them over (scaled in place) rather than copying them.
        ctx.grads = (grad_h, grad_w)
        ctx.dtypes = (hidden.dtype, weight.dtype)
        ctx.mark_non_differentiable(nll)
        return (nll * w_all).sum(), nll

    @staticmethod
    def backward(ctx, grad_sum, _grad_nll):
        if ctx.grads is None:
            raise RuntimeError("fused_weighted_cross_entropy: backward can run only once per call "
                               "(its gradients are computed in forward and handed over)")
        grad_h, grad_w = ctx.grads
        ctx.grads = None
        h_dtype, w_dtype = ctx.dtypes
        # Scaled and cast in one pass (an fp32 buffer → the input dtype, or in place for fp32 inputs).
        if grad_h is not None:
            grad_h = _scaled(grad_h, grad_sum, h_dtype)
        if grad_w is not None:
            grad_w = _scaled(grad_w, grad_sum, w_dtype)
        return grad_h, grad_w, None, None, None, None, None, None, None, None, None


def _scaled(buf: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """buf · scale in ``dtype``, one read and one write of ``buf``'s size (was a multiply in place, then a cast)."""
    if buf.dtype == dtype:
        return buf.mul_(scale)
    return torch.mul(buf, scale, out=torch.empty(buf.shape, dtype=dtype, device=buf.device))


def fused_weighted_cross_entropy(hidden: torch.Tensor, lm_weight: torch.Tensor, targets: torch.Tensor,
                                 weights: torch.Tensor, target_classes: Optional[torch.Tensor] = None, *,
                                 num_classes: int = NUM_CLASSES, tp_group=None, vocab_start: int = 0,
                                 true_vocab_size: Optional[int] = None, chunk_size: int = 4096,
                                 logit_softcap: Optional[float] = None) -> LossStats:
    """Weighted NLL of ``targets`` under logits ``hidden @ lm_weightᵀ`` without materializing the logits.

    hidden [T, H] (or [..., H]), replicated over the TP group and NOT passed through ``copy_to_tp`` (the
    gradient all-reduce happens here); lm_weight [V_local, H], this rank's vocabulary shard starting at
    global id ``vocab_start``; targets [T] global ids, -100 where nothing is predicted; weights [T] ≥ 0,
    the weight of each predicted token (0 masks it); target_classes [T] the class of each predicted token
    (per-class NLL for logging; None = all class 0). ``true_vocab_size``: rows of global id ≥ it are
    padding and get probability 0 (default: no padding, V_local × tp). ``chunk_size``: the most tokens per
    chunk (see ``chunk_rows``: fewer when the fp32 logits block would outgrow its memory budget).
    ``logit_softcap``: c > 0 to take the softmax of c·tanh(logits / c) (Gemma-2's final-logit soft-capping);
    None (or 0, as HF configs write "off") for plain logits.
    """
    h_dim = hidden.shape[-1]
    hidden = hidden.reshape(-1, h_dim)
    targets, weights = targets.reshape(-1), weights.reshape(-1)
    if targets.shape[0] != hidden.shape[0] or weights.shape != targets.shape or lm_weight.shape[-1] != h_dim:
        raise ValueError(f"shape mismatch: hidden {tuple(hidden.shape)}, lm_weight {tuple(lm_weight.shape)}, "
                         f"targets {tuple(targets.shape)}, weights {tuple(weights.shape)}")
    if hidden.dtype != lm_weight.dtype:
        raise ValueError(f"hidden ({hidden.dtype}) and lm_weight ({lm_weight.dtype}) must have the same dtype")
    group = tp_group if tp_group is not None and dist.get_world_size(tp_group) > 1 else None
    tp = 1 if group is None else dist.get_world_size(group)
    if true_vocab_size is None:
        true_vocab_size = lm_weight.shape[0] * tp
    predicted = targets != IGNORE_INDEX
    classes = (target_classes.reshape(-1) if target_classes is not None else torch.zeros_like(targets)).long()
    if hidden.device.type == "cpu":
        # Checking ids costs a device→host sync on a GPU, so there the loader checks them (numpy, per row,
        # witscale/data/loader.py); on the CPU there is nothing to wait for and direct callers get the error.
        check_targets(targets, classes, true_vocab_size, num_classes)
    softcap = _checked_softcap(logit_softcap)
    grad_on = torch.is_grad_enabled()
    need_h, need_w = grad_on and hidden.requires_grad, grad_on and lm_weight.requires_grad
    blocks = 2 if softcap is not None and (need_h or need_w) else 1
    rows = chunk_rows(hidden.shape[0], lm_weight.shape[0], chunk_size, blocks, device=hidden.device)
    weighted_sum, nll = _FusedLinearWeightedCE.apply(hidden, lm_weight, targets, weights, group, vocab_start,
                                                     true_vocab_size, rows, need_h, need_w, softcap)
    # Per-class sums without boolean indexing (its output size is data-dependent: a host sync on a GPU):
    # tokens that predict nothing go to class 0 with nll 0 and count 0.
    cls = torch.where(predicted, classes, torch.zeros_like(classes))
    class_nll = torch.zeros(num_classes, dtype=torch.float64, device=hidden.device)
    class_nll.index_add_(0, cls, nll.double())
    class_count = torch.zeros(num_classes, dtype=torch.float64, device=hidden.device)
    class_count.index_add_(0, cls, predicted.double())
    return LossStats(weighted_sum, class_nll, class_count, nll)


def _checked_softcap(logit_softcap: Optional[float]) -> Optional[float]:
    """A positive float, or None for no cap (HF configs write None or 0 for "off")."""
    if logit_softcap is None or logit_softcap == 0:
        return None
    if not logit_softcap > 0:       # also rejects NaN
        raise ValueError(f"logit_softcap must be a positive number (or None/0 for no cap), got {logit_softcap!r}")
    return float(logit_softcap)


def soft_cap(logits: torch.Tensor, logit_softcap: Optional[float]) -> torch.Tensor:
    """c·tanh(logits / c), or the logits unchanged without a cap: the logits-returning paths' version of
    what the fused loss computes per chunk."""
    softcap = _checked_softcap(logit_softcap)
    return logits if softcap is None else torch.tanh(logits / softcap) * softcap


def check_targets(targets: torch.Tensor, classes: torch.Tensor, vocab_size: int, num_classes: int) -> None:
    """Raise if a predicted target id lies outside [0, vocab_size) or its class outside [0, num_classes):
    such a target would silently give an inf/garbage loss. Host-side (synchronizing) check."""
    predicted = targets != IGNORE_INDEX
    if not bool(predicted.any()):
        return
    lo, hi = int(targets[predicted].min()), int(targets[predicted].max())
    if lo < 0 or hi >= vocab_size:
        raise ValueError(f"target ids must lie in [0, {vocab_size}) or be {IGNORE_INDEX}; got min {lo}, max {hi}")
    cls = classes[predicted]
    if int(cls.min()) < 0 or int(cls.max()) >= num_classes:
        raise ValueError(f"target classes must lie in [0, {num_classes}); got {int(cls.min())}..{int(cls.max())}")


__all__ = ["IGNORE_INDEX", "NORMALIZATIONS", "LossStats", "fused_weighted_cross_entropy",
           "normalization_counts", "chunk_rows", "check_targets", "soft_cap"]
