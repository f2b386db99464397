"""The fused, chunked, vocab-parallel weighted cross-entropy against an independent reference:
``F.cross_entropy(reduction='none')`` on the full float64 logits, times the weights, summed, with autograd
for the gradients. tp=1 in process; tp=2 and tp=4 on real gloo ranks with the vocabulary sharded and padded
(51 real ids → 52 rows) and targets in every shard. Padding rows of the LM weight are filled with large
values in every test: they would dominate the softmax if they were not masked.

Tolerances: fp32 inputs 2e-5 relative (to the largest reference value); bf16 inputs (logits rounded to bf16
by the matmul, softmax in fp32): loss within 1e-4 relative of the same-rounding reference, and within 2e-2
of the exact float64 one; gradients within 2e-2 relative.

Final-logit soft-capping (``logit_softcap=c``) against the same reference on c·tanh(z / c) logits computed
here in float64 (CAP = 2 on logits of std ~2 and beyond: the cap bites, tanh' ranges over (0, 1]); its
per-token NLL is read through one class per token."""
import pytest
import torch
import torch.nn.functional as F

from tests.distributed import run_distributed
from witscale.parallel.cross_entropy import (IGNORE_INDEX, NORMALIZATIONS, LossStats, chunk_rows, fused_weighted_cross_entropy,
                           normalization_counts)
from witscale.parallel.layers import VocabParallelLMHead, pad_vocab_size

VOCAB, HID, TOKENS, NCLS = 51, 16, 37, 6
PAD_VALUE = 50.0


def make_problem(seed=0, tokens=TOKENS, vocab=VOCAB, hid=HID, scale=1.0, shards=4):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(tokens, hid, generator=g, dtype=torch.float64) * scale
    w = torch.randn(vocab, hid, generator=g, dtype=torch.float64) * 0.5
    targets = torch.randint(0, vocab, (tokens,), generator=g)
    per = pad_vocab_size(vocab, shards) // shards
    targets[:shards] = torch.tensor([min(r * per + 1, vocab - 1) for r in range(shards)])  # every shard
    targets[shards] = vocab - 1                                                           # last real id
    targets[[7, 20, 21]] = IGNORE_INDEX
    weights = torch.rand(tokens, generator=g, dtype=torch.float64) * 2
    weights[[3, 9, 10]] = 0.0                      # masked tokens
    weights[7] = 5.0                               # a weight on an ignored target must not count
    classes = torch.randint(0, 4, (tokens,), generator=g)
    return h, w, targets, weights, classes


CAP = 2.0


def reference(h, w, targets, weights, classes, grad_scale=1.0, softcap=None, ncls=NCLS):
    h64, w64 = h.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    logits = h64 @ w64.t()
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    nll = F.cross_entropy(logits, targets, reduction="none", ignore_index=IGNORE_INDEX)
    loss = (nll * weights.double()).sum()
    (loss * grad_scale).backward()
    valid = targets != IGNORE_INDEX
    class_nll = torch.zeros(ncls, dtype=torch.float64).index_add_(0, classes[valid], nll.detach()[valid])
    class_count = torch.bincount(classes[valid], minlength=ncls).double()
    return dict(loss=loss.detach(), dh=h64.grad, dw=w64.grad, class_nll=class_nll, class_count=class_count)


def shard(w, rank, tp, dtype):
    """Rank's rows of the padded vocabulary, padding rows set to PAD_VALUE (must never win the softmax)."""
    padded = pad_vocab_size(w.shape[0], tp)
    full = torch.cat([w, torch.full((padded - w.shape[0], w.shape[1]), PAD_VALUE, dtype=w.dtype)])
    per = padded // tp
    return full[rank * per:(rank + 1) * per].to(dtype).clone(), rank * per


def run_fused(h, w, targets, weights, classes, *, rank=0, tp=1, group=None, dtype=torch.float32, chunk=8,
              grad_scale=1.0, softcap=None, ncls=NCLS):
    local_w, start = shard(w, rank, tp, dtype)
    hh = h.to(dtype).clone().requires_grad_()
    ww = local_w.requires_grad_()
    stats = fused_weighted_cross_entropy(hh, ww, targets, weights.float(), classes, num_classes=ncls,
                                         tp_group=group, vocab_start=start, true_vocab_size=w.shape[0],
                                         chunk_size=chunk, logit_softcap=softcap)
    (stats.weighted_sum * grad_scale).backward()
    return stats, hh.grad, ww.grad, start


def compare(stats, dh, dw, start, ref, vocab=VOCAB):
    """Max relative differences (to the reference's largest magnitude) of everything the loss returns."""
    rel = lambda got, want: float((got.double() - want).abs().max() / want.abs().max().clamp_min(1e-30))  # noqa: E731
    rows = dw.shape[0]
    real = max(0, min(rows, vocab - start))
    out = {"loss": rel(stats.weighted_sum.detach(), ref["loss"]), "dh": rel(dh, ref["dh"]),
           "class_nll": rel(stats.class_nll_sum, ref["class_nll"]),
           "class_count": float((stats.class_count.double() - ref["class_count"]).abs().max())}
    out["dw"] = rel(dw[:real], ref["dw"][start:start + real]) if real else 0.0
    out["dw_pad"] = float(dw[real:].abs().max()) if real < rows else 0.0    # padding rows get no gradient
    return out


# --------------------------------------------------------------------------------------------- tp = 1
@pytest.mark.parametrize("chunk", [1, 5, 8, 36, 4096])
def test_tp1_matches_reference(chunk):
    h, w, t, wt, c = make_problem()
    ref = reference(h, w, t, wt, c, grad_scale=2.5)
    stats, dh, dw, start = run_fused(h, w, t, wt, c, chunk=chunk, grad_scale=2.5)
    assert isinstance(stats, LossStats) and stats.weighted_sum.dim() == 0
    diffs = compare(stats, dh, dw, start, {**ref, "loss": ref["loss"]})
    assert all(v < 2e-5 for v in diffs.values()), diffs
    assert stats.class_count.tolist() == ref["class_count"].tolist()


def test_tp1_padding_rows_are_masked():
    # At tp=1 a padded vocabulary too (e.g. padded to a multiple of 64): rows ≥ true_vocab_size are ignored.
    h, w, t, wt, c = make_problem()
    ref = reference(h, w, t, wt, c)
    padded = torch.cat([w, torch.full((13, HID), PAD_VALUE, dtype=w.dtype)]).float().requires_grad_()
    hh = h.float().requires_grad_()
    stats = fused_weighted_cross_entropy(hh, padded, t, wt.float(), c, true_vocab_size=VOCAB, chunk_size=6)
    stats.weighted_sum.backward()
    assert float(stats.weighted_sum.detach()) == pytest.approx(float(ref["loss"]), rel=2e-6)
    assert torch.allclose(padded.grad[:VOCAB].double(), ref["dw"], rtol=0, atol=2e-5 * float(ref["dw"].abs().max()))
    assert float(padded.grad[VOCAB:].abs().max()) == 0.0
    # and without true_vocab_size the same rows are real vocabulary: the loss changes (the test can fail)
    unmasked = fused_weighted_cross_entropy(h.float(), padded.detach(), t, wt.float(), c).weighted_sum
    assert float(unmasked) > float(ref["loss"]) * 2


def test_tp1_large_logits():
    h, w, t, wt, c = make_problem(scale=1500.0)        # logits of order 1e4
    ref = reference(h, w, t, wt, c)
    assert float((h @ w.t()).abs().max()) > 1e4
    stats, dh, dw, start = run_fused(h, w, t, wt, c, chunk=7)
    assert torch.isfinite(stats.weighted_sum) and torch.isfinite(dh).all() and torch.isfinite(dw).all()
    diffs = compare(stats, dh, dw, start, ref)
    assert all(v < 2e-5 for v in diffs.values()), diffs


@pytest.mark.parametrize("grad_w_block", [8192, 7])     # 7: the weight gradient in several ragged blocks
def test_tp1_bf16(monkeypatch, grad_w_block):
    import witscale.parallel.cross_entropy
    monkeypatch.setattr(witscale.parallel.cross_entropy, "_GRAD_W_BLOCK", grad_w_block)
    h, w, t, wt, c = make_problem()
    exact = reference(h, w, t, wt, c)
    # the same rounding as the fused path (bf16 matmul, fp32 softmax), computed by torch
    hb, wb = h.bfloat16(), w.bfloat16()
    same_rounding = (F.cross_entropy((hb @ wb.t()).float(), t, reduction="none") * wt.float()).sum()
    stats, dh, dw, start = run_fused(h, w, t, wt, c, dtype=torch.bfloat16, chunk=5)
    assert dh.dtype == torch.bfloat16 and dw.dtype == torch.bfloat16
    assert float(stats.weighted_sum.detach()) == pytest.approx(float(same_rounding), rel=1e-4)
    diffs = compare(stats, dh, dw, start, exact)
    assert all(v < 2e-2 for v in diffs.values() if v is not None), diffs


def test_zero_weights_contribute_exactly_nothing():
    h, w, t, wt, c = make_problem()
    zero = (wt == 0) | (t == IGNORE_INDEX)
    _, dh, dw, _ = run_fused(h, w, t, wt, c, chunk=4)
    assert dh[zero].abs().max() == 0                          # exactly, not approximately
    # changing what masked tokens look like or predict changes no gradient bit
    h2, t2 = h.clone(), t.clone()
    h2[zero] = torch.randn(int(zero.sum()), HID, dtype=h.dtype) * 100
    t2[(wt == 0) & (t != IGNORE_INDEX)] = 0
    _, dh2, dw2, _ = run_fused(h2, w, t2, wt, c, chunk=4)
    assert torch.equal(dw, dw2) and torch.equal(dh[~zero], dh2[~zero])
    # ... while changing an unmasked one does (the comparison can fail)
    h3 = h.clone()
    h3[~zero.nonzero()[0]] += 1.0
    _, _, dw3, _ = run_fused(h3, w, t, wt, c, chunk=4)
    assert not torch.equal(dw, dw3)


def test_all_ignored_and_empty():
    h, w, t, wt, c = make_problem()
    t[:] = IGNORE_INDEX
    stats, dh, dw, _ = run_fused(h, w, t, wt, c)
    assert float(stats.weighted_sum.detach()) == 0 and dh.abs().max() == 0 and dw.abs().max() == 0
    assert stats.class_count.sum() == 0 and stats.class_nll_sum.abs().sum() == 0
    empty = fused_weighted_cross_entropy(torch.zeros(0, HID), torch.randn(VOCAB, HID), torch.zeros(0, dtype=torch.long),
                                         torch.zeros(0), torch.zeros(0, dtype=torch.long))
    assert float(empty.weighted_sum) == 0


def test_grad_output_scales_and_backward_once():
    h, w, t, wt, c = make_problem()
    ref = reference(h, w, t, wt, c, grad_scale=-0.37)
    stats, dh, dw, start = run_fused(h, w, t, wt, c, grad_scale=-0.37)
    diffs = compare(stats, dh, dw, start, ref)
    assert all(v < 2e-5 for v in diffs.values()), diffs
    hh = h.float().requires_grad_()
    s = fused_weighted_cross_entropy(hh, w.float(), t, wt.float(), c).weighted_sum
    s.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="backward can run only once"):
        s.backward()


class _BigAllocations:
    """Records torch.zeros/empty(_like) allocations of at least ``threshold`` elements while active (a
    TorchDispatchMode would see every op, but its first use costs seconds of lazy imports). The positive
    control in the test keeps this honest: it must see the [V, H] buffer when gradients are on."""

    def __init__(self, monkeypatch, threshold):
        self.threshold, self.seen = threshold, []
        for name in ("zeros", "empty", "zeros_like", "empty_like"):
            monkeypatch.setattr(torch, name, self._wrap(getattr(torch, name), name))

    def _wrap(self, fn, name):
        def alloc(*args, **kwargs):
            out = fn(*args, **kwargs)
            if out.numel() >= self.threshold:
                self.seen.append((name, tuple(out.shape)))
            return out
        return alloc


def test_no_grad_path_matches_and_allocates_no_gradient_buffers(monkeypatch):
    h, w, t, wt, c = make_problem(tokens=64)
    w = torch.randn(200, HID, dtype=torch.float64)          # W has more elements than any logits chunk
    t = t.clamp(max=199)
    hh, ww = h.float().requires_grad_(), w.float().requires_grad_()
    with_grad = fused_weighted_cross_entropy(hh, ww, t, wt.float(), c, chunk_size=4)
    probe = _BigAllocations(monkeypatch, h.numel())         # T×H = 1024 elements < W's 3200, > a 4×200 chunk
    with torch.no_grad():
        stats = fused_weighted_cross_entropy(hh, ww, t, wt.float(), c, chunk_size=4)
    assert not stats.weighted_sum.requires_grad
    assert probe.seen == [], probe.seen
    assert torch.equal(stats.weighted_sum, with_grad.weighted_sum.detach())
    assert torch.equal(stats.class_nll_sum, with_grad.class_nll_sum)
    # positive control: with grad enabled the [T, H] and [V, H] gradient buffers are seen
    fused_weighted_cross_entropy(hh, ww, t, wt.float(), c, chunk_size=4)
    assert sorted(shape for _, shape in probe.seen) == [tuple(h.shape), tuple(w.shape)], probe.seen
    # a frozen LM weight: only the hidden-state gradient buffer
    probe.seen.clear()
    fused_weighted_cross_entropy(hh, ww.detach(), t, wt.float(), c, chunk_size=4).weighted_sum.backward()
    assert [shape for _, shape in probe.seen] == [tuple(h.shape)], probe.seen


def test_bad_inputs_are_named():
    h, w, t, wt, c = make_problem()
    t[0] = VOCAB
    with pytest.raises(ValueError, match=rf"target ids must lie in \[0, {VOCAB}\).*max {VOCAB}"):
        fused_weighted_cross_entropy(h.float(), w.float(), t, wt.float(), c)
    t[0] = 1
    c[1] = NCLS
    with pytest.raises(ValueError, match=rf"target classes must lie in \[0, {NCLS}\)"):
        fused_weighted_cross_entropy(h.float(), w.float(), t, wt.float(), c, num_classes=NCLS)
    with pytest.raises(ValueError, match="shape mismatch"):
        fused_weighted_cross_entropy(h.float(), w.float(), t[:-1], wt.float(), c)


def test_chunk_rows_rule():
    gib = 2 ** 30
    assert chunk_rows(37, 51, 8, budget_bytes=gib) == 8                # explicit small chunks are honoured
    assert chunk_rows(37, 51, 4096, budget_bytes=gib) == 37            # never more than T
    # the fp32 logits block fills the budget (rows rounded down to a power of two), not a fixed 512 rows
    assert chunk_rows(8192, 128256, 4096, budget_bytes=gib) == 2048    # 2^30 / (4 · 128256) = 2093
    assert chunk_rows(8192, 128256 // 8, 8192, budget_bytes=gib) == 8192   # tp=8 shard: 16744 → capped
    assert chunk_rows(8192, 128256, 4096, blocks=2, budget_bytes=gib) == 1024   # soft-capped: two blocks
    assert chunk_rows(8192, 32000, 4096, budget_bytes=gib // 4) == 2048
    assert chunk_rows(64, 51, 4096, budget_bytes=32 * 51 * 4) == 32
    assert chunk_rows(64, 51, 4096, budget_bytes=1) == 1                # at least one row


def test_chunk_rows_default_budget_and_override(monkeypatch):
    from witscale.parallel import cross_entropy

    monkeypatch.delenv("WITSCALE_LOSS_BLOCK_MIB", raising=False)
    assert cross_entropy.logits_block_bytes() == cross_entropy.DEFAULT_LOGITS_BLOCK_MIB * 2 ** 20 == 2 ** 30
    monkeypatch.setenv("WITSCALE_LOSS_BLOCK_MIB", "256")
    assert chunk_rows(8192, 32000, 4096) == 2048
    for bad in ("x", "0", "-1", "nan"):
        monkeypatch.setenv("WITSCALE_LOSS_BLOCK_MIB", bad)
        with pytest.raises(ValueError, match="WITSCALE_LOSS_BLOCK_MIB"):
            cross_entropy.logits_block_bytes()


def test_cpu_budget_is_smaller_and_the_override_applies_everywhere(monkeypatch):
    """On the CPU a pass over the LM-head gradient is cheap beside a chunk's matmuls, so its default block is
    128 MiB (the loss's memory stays far below the full logits: tools/bench/bench_loss.py); accelerators and
    the planner (no device) keep 1 GiB; WITSCALE_LOSS_BLOCK_MIB overrides both."""
    from witscale.parallel import cross_entropy

    monkeypatch.delenv("WITSCALE_LOSS_BLOCK_MIB", raising=False)
    assert cross_entropy.logits_block_bytes(torch.device("cpu")) == 128 * 2 ** 20
    assert cross_entropy.logits_block_bytes(torch.device("cuda", 0)) == cross_entropy.logits_block_bytes() == 2 ** 30
    assert chunk_rows(8192, 32000, 4096, device=torch.device("cpu")) == 1024      # 2^27 / (4 · 32000) = 1048
    assert chunk_rows(8192, 128256, 4096, device=torch.device("cpu")) == 256
    assert chunk_rows(8192, 32000, 4096) == 4096                                   # 1 GiB: 8388 → chunk_size
    seen = []
    real_apply = cross_entropy._FusedLinearWeightedCE.apply
    monkeypatch.setattr(cross_entropy._FusedLinearWeightedCE, "apply", lambda *a: seen.append(a[7]) or real_apply(*a))
    h = torch.zeros(2048, 4)
    fused_weighted_cross_entropy(h, torch.zeros(32000, 4), torch.zeros(2048, dtype=torch.long), torch.ones(2048))
    assert seen == [1024]                                                          # the CPU budget, not 1 GiB
    monkeypatch.setenv("WITSCALE_LOSS_BLOCK_MIB", "1024")
    assert cross_entropy.logits_block_bytes(torch.device("cpu")) == 2 ** 30


@pytest.mark.parametrize("softcap", [None, CAP])
def test_chunks_follow_the_budget_and_results_do_not_depend_on_it(monkeypatch, softcap):
    """A budget of 32 fp32 logits rows over 64 tokens runs the loss in 2 chunks (16 rows each with the soft
    cap's second block), 8 rows in 8 chunks; all give the one-chunk result (fp64 to rounding; the LM-head
    gradient, accumulated in fp32, to fp32 rounding)."""
    from witscale.parallel import cross_entropy

    tokens = 64
    h, w, t, wt, c = make_problem(seed=3, tokens=tokens)
    seen = []
    real_apply = cross_entropy._FusedLinearWeightedCE.apply
    monkeypatch.setattr(cross_entropy._FusedLinearWeightedCE, "apply",
                        lambda *a: seen.append(a[7]) or real_apply(*a))
    results = {}
    for rows in (tokens, 32, 8):
        monkeypatch.setenv("WITSCALE_LOSS_BLOCK_MIB", repr(rows * VOCAB * 4 / 2 ** 20))
        stats, dh, dw, _ = run_fused(h, w, t, wt, c, dtype=torch.float64, chunk=4096, softcap=softcap)
        blocks = 2 if softcap else 1
        assert seen[-1] == rows // blocks
        assert -(-tokens // seen[-1]) == tokens * blocks // rows       # the number of chunks
        results[rows] = (stats.weighted_sum.detach(), stats.token_nll, stats.class_nll_sum, dh, dw)
    for rows in (32, 8):
        *exact, dw = results[rows]
        for got, want in zip(exact, results[tokens]):
            torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-14)
        # the LM-head gradient is accumulated in fp32 whatever the inputs (the module docstring): equal to
        # fp32 rounding of its largest entry
        want = results[tokens][-1]
        torch.testing.assert_close(dw, want, rtol=0, atol=1e-6 * float(want.abs().max()))


class _WritesToBigTensors:
    """Counts, per op, the elements written into tensors of at least ``threshold`` elements: an op's out= and
    in-place arguments, else its fresh outputs (not views; allocations, which write nothing, excluded). With shapes
    where only the LM head's [V, H] gradient (its fp32 buffer, bf16 products of its size, the gradient handed
    over) reaches the threshold, ``passes`` is the number of passes written over that gradient. A
    TorchDispatchMode, so it sees what the code does whatever functions it calls. ``paused`` hides the
    internals of the CPU emulation of fp32-output GEMMs below."""

    def __init__(self, threshold):
        from torch.utils._python_dispatch import TorchDispatchMode

        counter = self
        self.threshold, self.elements, self.paused, self.log = threshold, 0, False, []

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                kwargs = kwargs or {}
                out = func(*args, **kwargs)
                if counter.paused or func.overloadpacket.__name__.startswith("empty"):
                    return out
                written = []
                for i, spec in enumerate(func._schema.arguments):
                    val = args[i] if i < len(args) else kwargs.get(spec.name)
                    if isinstance(val, torch.Tensor) and spec.alias_info is not None and spec.alias_info.is_write:
                        written.append(val)
                if not written:                     # fresh outputs; a view (t, slice, detach) writes nothing
                    outs = out if isinstance(out, (tuple, list)) else [out]
                    written = [o for o, spec in zip(outs, func._schema.returns)
                               if isinstance(o, torch.Tensor) and spec.alias_info is None]
                big = [t for t in written if t.numel() >= counter.threshold]
                counter.elements += sum(t.numel() for t in big)
                counter.log += [(str(func), tuple(t.shape)) for t in big]
                return out

        self.mode = Mode()

    def passes(self, size):
        assert self.elements % size == 0, (self.elements, size)
        return self.elements // size


def _emulate_fp32_out_gemms(monkeypatch, counter, addmm_too=True):
    """CUDA's ``mm/addmm(..., out_dtype=torch.float32)`` on the CPU: bf16 products are exact in fp32 and
    summed in fp32, as the CUDA kernels do; the result lands in ``out`` with one (counted) write.
    ``addmm_too=False``: a release whose addmm refuses an fp32 ``input`` with bf16 matrices."""
    from witscale.parallel import cross_entropy

    real_mm, real_addmm = torch.mm, torch.addmm

    def fp32(compute, out):
        counter.paused = True
        try:
            result = compute()
        finally:
            counter.paused = False
        return result if out is None else out.copy_(result)

    def mm(a, b, out_dtype=None, out=None):
        if out_dtype is None:
            return real_mm(a, b) if out is None else real_mm(a, b, out=out)
        return fp32(lambda: real_mm(a.float(), b.float()), out)

    def addmm(c, a, b, out_dtype=None, out=None):
        assert out_dtype is torch.float32 and c.dtype == torch.float32
        return fp32(lambda: real_addmm(c, a.float(), b.float()), out)

    monkeypatch.setattr(cross_entropy, "_fp32_out_gemm", lambda device, dtype: (True, addmm_too))
    monkeypatch.setattr(torch, "mm", mm)
    monkeypatch.setattr(torch, "addmm", addmm)


@pytest.mark.parametrize("chunk", [16, 64])
@pytest.mark.parametrize("path", ["fp32", "bf16_fp32_out_gemm", "bf16_fp32_out_mm_only", "bf16_no_fp32_out_gemm"])
def test_lm_head_gradient_passes(monkeypatch, chunk, path):
    """Passes written over the [V, H] LM-head gradient per call (one micro-batch): one per chunk (the first
    chunk writes the fp32 buffer, each later one adds into it in one GEMM: no zero fill) and one in backward
    (scaled in place, or scaled and cast to the weight's dtype in one pass). Where no fp32-output GEMM
    exists (CPU bf16; addmm's in some releases) a chunk also writes its bf16 product blocks. The old code
    zero-filled the buffer and scaled it in place before casting: two more passes. The results stay exact
    (against fp64)."""
    tokens, vocab, hid = 48, 64, 64                 # a chunk [≤48 × 64] and hidden [48 × 64] stay below V·H
    h, w, t, wt, c = make_problem(seed=5, tokens=tokens, vocab=vocab, hid=hid)
    counter = _WritesToBigTensors(vocab * hid)
    dtype = torch.float32 if path == "fp32" else torch.bfloat16
    if path in ("bf16_fp32_out_gemm", "bf16_fp32_out_mm_only"):
        _emulate_fp32_out_gemms(monkeypatch, counter, addmm_too=path == "bf16_fp32_out_gemm")
    elif path == "bf16_no_fp32_out_gemm":            # the CPU in torch 2.13; torch < 2.11
        from witscale.parallel import cross_entropy
        monkeypatch.setattr(cross_entropy, "_fp32_out_gemm", lambda device, dtype: (False, False))
    hh, ww = h.to(dtype).requires_grad_(), w.to(dtype).requires_grad_()
    weights = wt.float()
    with counter.mode:                              # the loss and its backward only, not the inputs' making
        stats = fused_weighted_cross_entropy(hh, ww, t, weights, c, num_classes=NCLS, chunk_size=chunk)
        stats.weighted_sum.backward()
    dh, dw, start = hh.grad, ww.grad, 0
    chunks = -(-tokens // chunk)
    # fallback chunks also write their bf16 product blocks; with mm only, the first chunk is one GEMM
    expected = {"fp32": chunks, "bf16_fp32_out_gemm": chunks, "bf16_fp32_out_mm_only": 1 + 2 * (chunks - 1),
                "bf16_no_fp32_out_gemm": 2 * chunks}[path] + 1
    assert counter.passes(vocab * hid) == expected, counter.log
    diffs = compare(stats, dh, dw, start, reference(h, w, t, wt, c), vocab=vocab)
    assert all(v < (2e-5 if dtype == torch.float32 else 2e-2) for v in diffs.values()), diffs


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_no_tokens_give_a_zero_lm_head_gradient(dtype):
    """The first chunk writes the head gradient's buffer (no zero fill): with no tokens there is no chunk,
    and the gradient must still be exactly 0, not the uninitialized buffer."""
    for _ in range(3):                              # recycled allocator memory would show as non-zeros
        h = torch.zeros(0, HID, dtype=dtype, requires_grad=True)
        w = torch.randn(VOCAB, HID, dtype=dtype).requires_grad_()
        fused_weighted_cross_entropy(h, w, torch.zeros(0, dtype=torch.long), torch.zeros(0)).weighted_sum.backward()
        assert w.grad.dtype == dtype and torch.equal(w.grad, torch.zeros_like(w))


def test_normalization_counts():
    t = torch.tensor([5, IGNORE_INDEX, 7, 8, 9, IGNORE_INDEX])
    w = torch.tensor([0.5, 3.0, 0.0, 1.0, 0.25, 0.0])
    n = normalization_counts(t, w)
    assert set(n) == set(NORMALIZATIONS) and NORMALIZATIONS[0] == "nonzero"
    assert all(v.dtype == torch.float64 for v in n.values())
    assert float(n["nonzero"]) == 3 and float(n["weight_sum"]) == 1.75 and float(n["tokens"]) == 4


# ------------------------------------------------------------------------------- soft-capped, tp = 1
def capped_problem(seed=2, scale=1.5, extreme=True):
    """make_problem with one class per token (class_nll_sum is then the per-token NLL) and logits up to ~12,
    far beyond CAP (tanh saturates: its derivative → 0); ``extreme``: one token's hidden state 20× larger
    (logits ~200). Not in bf16: there a logit of ~5 is rounded by ~0.03, which moves the cap's derivative
    (1 − tanh²(z/c)) by ~3% and, times that token's large hidden state, dW by as much — bf16's limit, not
    the kernel's; bf16 runs on logits up to ~23 instead."""
    h, w, t, wt, _ = make_problem(seed=seed, scale=scale)
    if extreme:
        h[11] *= 20.0
    return h, w, t, wt, torch.arange(TOKENS)


def check_capped(stats, dh, dw, start, ref, tol):
    diffs = compare(stats, dh, dw, start, ref)
    assert all(v < tol for v in diffs.values()), diffs


@pytest.mark.parametrize("chunk", [1, 5, 36, 4096])
def test_softcap_tp1_matches_fp64_reference(chunk):
    h, w, t, wt, c = capped_problem()
    ref = reference(h, w, t, wt, c, grad_scale=0.7, softcap=CAP, ncls=TOKENS)
    uncapped = reference(h, w, t, wt, c, ncls=TOKENS)
    stats, dh, dw, start = run_fused(h, w, t, wt, c, chunk=chunk, grad_scale=0.7, softcap=CAP, ncls=TOKENS)
    check_capped(stats, dh, dw, start, ref, 2e-5)      # class_nll here: the per-token NLL
    # the cap changes the answer (so the comparison can fail) and bounds every logit: nll ≤ log V + 2c
    assert float((ref["loss"] - uncapped["loss"]).abs()) > 0.1 * float(ref["loss"])
    assert float(stats.class_nll_sum.max()) <= torch.log(torch.tensor(float(VOCAB))) + 2 * CAP


def test_softcap_tp1_bf16_and_no_grad():
    h, w, t, wt, c = capped_problem(scale=3.0, extreme=False)
    exact = reference(h, w, t, wt, c, softcap=CAP, ncls=TOKENS)
    stats, dh, dw, start = run_fused(h, w, t, wt, c, dtype=torch.bfloat16, chunk=5, softcap=CAP, ncls=TOKENS)
    assert dh.dtype == torch.bfloat16 and dw.dtype == torch.bfloat16
    check_capped(stats, dh, dw, start, exact, 2e-2)
    h, w, t, wt, c = capped_problem()
    # without gradients: one block per chunk, the same loss bit for bit as the gradient path
    hh, ww = h.float().requires_grad_(), w.float().requires_grad_()
    with_grad = fused_weighted_cross_entropy(hh, ww, t, wt.float(), c, num_classes=TOKENS, chunk_size=5,
                                             logit_softcap=CAP)
    with torch.no_grad():
        no_grad = fused_weighted_cross_entropy(hh, ww, t, wt.float(), c, num_classes=TOKENS, chunk_size=5,
                                               logit_softcap=CAP)
    assert torch.equal(no_grad.weighted_sum, with_grad.weighted_sum.detach())
    assert torch.equal(no_grad.class_nll_sum, with_grad.class_nll_sum)


def test_softcap_zero_weights_padding_and_arguments():
    h, w, t, wt, c = capped_problem()
    _, dh, dw, start = run_fused(h, w, t, wt, c, chunk=4, softcap=CAP, ncls=TOKENS)
    assert dh[(wt == 0) | (t == IGNORE_INDEX)].abs().max() == 0
    # tp=1 with padding rows (large values, capped to ≈ c if the cap came after the mask): still ignored
    padded = torch.cat([w, torch.full((13, HID), PAD_VALUE, dtype=w.dtype)]).float().requires_grad_()
    stats = fused_weighted_cross_entropy(h.float(), padded, t, wt.float(), c, num_classes=TOKENS,
                                         true_vocab_size=VOCAB, chunk_size=6, logit_softcap=CAP)
    stats.weighted_sum.backward()
    ref = reference(h, w, t, wt, c, softcap=CAP, ncls=TOKENS)
    assert float(stats.weighted_sum.detach()) == pytest.approx(float(ref["loss"]), rel=2e-6)
    assert float(padded.grad[VOCAB:].abs().max()) == 0.0
    # 0 and None mean "no cap" (HF configs write either); a negative cap is an error
    plain = fused_weighted_cross_entropy(h.float(), w.float(), t, wt.float(), c, num_classes=TOKENS)
    zero = fused_weighted_cross_entropy(h.float(), w.float(), t, wt.float(), c, num_classes=TOKENS, logit_softcap=0)
    assert torch.equal(plain.weighted_sum, zero.weighted_sum)
    with pytest.raises(ValueError, match="logit_softcap must be a positive number"):
        fused_weighted_cross_entropy(h.float(), w.float(), t, wt.float(), c, num_classes=TOKENS, logit_softcap=-3.0)


def test_softcap_halves_the_automatic_chunk():
    gib = 2 ** 30
    assert chunk_rows(8192, 32000, 4096, blocks=2, budget_bytes=gib) == 4096      # 8192 uncapped, at the cap
    assert chunk_rows(16384, 16000, 16384, blocks=2, budget_bytes=gib) == 8192   # 16384 uncapped
    assert chunk_rows(37, 51, 8, blocks=2, budget_bytes=gib) == 8


def test_softcap_head_logits_path():
    h, w, t, wt, c = capped_problem()
    head = VocabParallelLMHead(VOCAB, HID, chunk_size=8, logit_softcap=CAP)
    with torch.no_grad():
        head.weight.copy_(w.float())
    logits = head(h.float()[None])[0]
    want = CAP * torch.tanh((h @ w.t()) / CAP)
    torch.testing.assert_close(logits.double(), want, atol=1e-5, rtol=0)
    stats = head(h.float()[None], t[None], wt.float()[None])
    assert float(stats.weighted_sum.detach()) == pytest.approx(float(reference(h, w, t, wt, c, softcap=CAP, ncls=TOKENS)["loss"]),
                                                      rel=2e-6)


# --------------------------------------------------------------------------------------------- tp > 1
def _tp_worker(rank, world):
    import torch.distributed as dist

    group = dist.new_group(list(range(world)))
    out = {}
    h, w, t, wt, c = make_problem(shards=world)
    for chunk in (5, 64):
        ref = reference(h, w, t, wt, c, grad_scale=1.5)
        out[f"fp32/chunk{chunk}"] = compare(*run_fused(h, w, t, wt, c, rank=rank, tp=world, group=group,
                                                       chunk=chunk, grad_scale=1.5), ref)
    hl, wl, tl, wtl, cl = make_problem(seed=1, scale=1500.0, shards=world)
    out["large"] = compare(*run_fused(hl, wl, tl, wtl, cl, rank=rank, tp=world, group=group, chunk=6),
                           reference(hl, wl, tl, wtl, cl))
    out["bf16"] = compare(*run_fused(h, w, t, wt, c, rank=rank, tp=world, group=group, chunk=5,
                                     dtype=torch.bfloat16), reference(h, w, t, wt, c))
    # zero weights: exactly zero hidden gradient on every rank
    _, dh, _, _ = run_fused(h, w, t, wt, c, rank=rank, tp=world, group=group, chunk=3)
    out["zero_w_dh"] = float(dh[(wt == 0) | (t == IGNORE_INDEX)].abs().max())
    # no_grad agrees with the grad path
    local_w, start = shard(w, rank, world, torch.float32)
    with torch.no_grad():
        ng = fused_weighted_cross_entropy(h.float(), local_w, t, wt.float(), c, num_classes=NCLS, tp_group=group,
                                          vocab_start=start, true_vocab_size=VOCAB, chunk_size=5)
    out["no_grad_loss"] = abs(float(ng.weighted_sum) - float(reference(h, w, t, wt, c)["loss"]))
    # the model's LM head module with labels = the fused loss
    head = VocabParallelLMHead(VOCAB, HID, group, chunk_size=8)
    with torch.no_grad():
        head.weight.copy_(local_w)
    stats = head(h.float().view(1, TOKENS, HID), t.view(1, -1), wt.float().view(1, -1), c.view(1, -1))
    out["head_loss"] = abs(float(stats.weighted_sum) - float(reference(h, w, t, wt, c)["loss"]))
    # soft-capped: fp32 over several chunks and in one, bf16, and the capped head (loss and logits)
    hc, wc, tc, wtc, cc = capped_problem()
    tc[:world] = make_problem(shards=world)[2][:world]                      # targets in every shard
    ref_c = reference(hc, wc, tc, wtc, cc, grad_scale=1.5, softcap=CAP, ncls=TOKENS)
    for chunk in (5, 64):
        out[f"capped/chunk{chunk}"] = compare(*run_fused(hc, wc, tc, wtc, cc, rank=rank, tp=world, group=group,
                                                         chunk=chunk, grad_scale=1.5, softcap=CAP, ncls=TOKENS), ref_c)
    hb = capped_problem(scale=3.0, extreme=False)[0]
    out["capped_bf16"] = compare(*run_fused(hb, wc, tc, wtc, cc, rank=rank, tp=world, group=group, chunk=5,
                                            dtype=torch.bfloat16, softcap=CAP, ncls=TOKENS),
                                 reference(hb, wc, tc, wtc, cc, softcap=CAP, ncls=TOKENS))
    capped_head = VocabParallelLMHead(VOCAB, HID, group, chunk_size=8, logit_softcap=CAP)
    with torch.no_grad():
        capped_head.weight.copy_(shard(wc, rank, world, torch.float32)[0])
        logits = capped_head(hc.float()[None])[0]
    out["capped_head_logits"] = float((logits.double() - CAP * torch.tanh((hc @ wc.t()) / CAP)).abs().max())
    out["capped_head_logits_shape"] = list(logits.shape)
    stats = capped_head(hc.float()[None], tc[None], wtc.float()[None])
    out["capped_head_loss"] = abs(float(stats.weighted_sum) / float(ref_c["loss"]) - 1)
    return out


@pytest.mark.slow
@pytest.mark.parametrize("tp", [2, 4])
def test_vocab_parallel_matches_reference(tp):
    results = run_distributed(_tp_worker, tp)
    for rank, out in enumerate(results):
        for case in ("fp32/chunk5", "fp32/chunk64", "large"):
            assert all(v < 2e-5 for v in out[case].values()), (rank, case, out[case])
        assert all(v < 2e-2 for v in out["bf16"].values()), (rank, out["bf16"])
        assert out["zero_w_dh"] == 0.0
        assert out["no_grad_loss"] < 1e-3 and out["head_loss"] < 1e-3, out
        for case in ("capped/chunk5", "capped/chunk64"):
            assert all(v < 2e-5 for v in out[case].values()), (rank, case, out[case])
        assert all(v < 2e-2 for v in out["capped_bf16"].values()), (rank, out["capped_bf16"])
        assert out["capped_head_logits"] < 1e-5 and out["capped_head_logits_shape"] == [TOKENS, VOCAB], out
        assert out["capped_head_loss"] < 2e-6, out
    # every rank reports the same (all-reduced) loss
    assert len({round(o["no_grad_loss"], 9) for o in results}) == 1
