"""Packed attention backends: the varlen argument arithmetic (through a CPU emulation of torch's
varlen_attn), the sync-free dense reference, backend selection, and (marked gpu) the real kernels.

The softmax scale and attention soft-capping (Gemma-2) are checked against an independent float64
reference written here (explicit scores per row, document + causal + window mask from the documents'
lengths, not from cu_seqlens): every CPU backend with a non-default scale, and the capping backends
(eager, dense; flex forward-only: torch has no flex backward on the CPU) with a cap that bites."""
from __future__ import annotations

import logging

import pytest
import torch
import torch.nn.functional as F

from witscale.model import attention as attention_mod
from witscale.model.attention import packed_attention, select_backend
from witscale.model.transformer import packed_positions


def gpu(test):
    return pytest.mark.gpu(pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")(test))


# ---- a CPU emulation of torch.nn.attention.varlen.varlen_attn, one signature per torch release ----------

def _emulated_varlen(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, window_size, enable_gqa, scale=None):
    """What FlashAttention-2's varlen kernel computes, per segment with SDPA and an explicit mask.

    It is strict where the kernel would be silently wrong: max_q must bound every segment, cu_seqlens
    must be int32 on the tensors' device, and heads must match unless enable_gqa. (-1, -1) is full,
    non-causal attention, as in the kernel: a backend that forgets causality fails."""
    assert query.dim() == key.dim() == value.dim() == 3
    assert cu_seq_q.dtype == torch.int32 and cu_seq_q.device == query.device
    assert torch.equal(cu_seq_q, cu_seq_k) and max_q == max_k
    bounds = cu_seq_q.tolist()
    assert bounds[0] == 0 and bounds[-1] == query.shape[0]
    assert max(e - s for s, e in zip(bounds[:-1], bounds[1:])) <= max_q, "max_q below the longest segment"
    hq, hkv = query.shape[1], key.shape[1]
    if hq != hkv:
        if not enable_gqa:
            raise ValueError(f"Hq={hq} != Hkv={hkv} without enable_gqa")
        key, value = key.repeat_interleave(hq // hkv, 1), value.repeat_interleave(hq // hkv, 1)
    left, right = window_size
    pieces = []
    for start, end in zip(bounds[:-1], bounds[1:]):
        i = torch.arange(end - start)
        dist = i[:, None] - i[None, :]                     # query − key
        mask = torch.ones_like(dist, dtype=torch.bool)
        if right >= 0:
            mask &= dist >= -right
        if left >= 0:
            mask &= dist <= left
        q, k, v = (t[start:end].transpose(0, 1) for t in (query, key, value))
        pieces.append(F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale).transpose(0, 1))
    return torch.cat(pieces)


CALLS: list[dict] = []


def torch_2_10(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, is_causal=False, return_aux=None):
    CALLS.append(dict(kv_heads=key.shape[1], is_causal=is_causal))
    return _emulated_varlen(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k,
                            (-1, 0) if is_causal else (-1, -1), enable_gqa=False)


def torch_2_11(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, return_aux=None, scale=None,
               window_size=(-1, -1)):
    assert isinstance(window_size, tuple)                  # torch tests window_size == (-1, 0)
    CALLS.append(dict(kv_heads=key.shape[1], window_size=window_size))
    return _emulated_varlen(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, window_size, enable_gqa=False,
                            scale=scale)


def torch_2_13(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, return_aux=None, scale=None,
               window_size=(-1, -1), enable_gqa=False, seqused_k=None, block_table=None, num_splits=None):
    assert isinstance(window_size, tuple)
    CALLS.append(dict(kv_heads=key.shape[1], window_size=window_size, enable_gqa=enable_gqa))
    return _emulated_varlen(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, window_size, enable_gqa, scale)


SIGNATURES = {"2.10": torch_2_10, "2.11": torch_2_11, "2.13": torch_2_13}


@pytest.fixture
def fresh(monkeypatch):
    monkeypatch.setattr(attention_mod, "_announced", set())
    for fn in SIGNATURES.values():      # the once-per-process probe of un-repeated K/V, made before the test
        monkeypatch.setattr(attention_mod, "_varlen_attn", fn)
        attention_mod.varlen_takes_grouped_kv("cpu", torch.float32)
    CALLS.clear()


def _inputs(rows, seq, hq, hkv, d=8, seed=0, dtype=torch.float32, device="cpu"):
    torch.manual_seed(seed)
    _, cu, true_max = packed_positions(rows, seq)
    b = len(rows)
    q, k, v = (torch.randn(b, seq, h, d, dtype=dtype, device=device, requires_grad=True) for h in (hq, hkv, hkv))
    return q, k, v, cu.to(device), true_max


def _run(q, k, v, cu, max_seqlen, backend, window, weight=None, scale=None, softcap=None):
    out = packed_attention(q, k, v, cu, max_seqlen, backend=backend, sliding_window=window, scale=scale,
                           softcap=softcap)
    weight = torch.randn_like(out) if weight is None else weight
    grads = torch.autograd.grad((out * weight).sum(), (q, k, v))
    return out.detach(), grads, weight


def _assert_same(a, b, atol=1e-5, rtol=0.0):
    (out_a, grads_a, _), (out_b, grads_b, _) = a, b
    torch.testing.assert_close(out_a, out_b, atol=atol, rtol=rtol)
    for ga, gb in zip(grads_a, grads_b):
        torch.testing.assert_close(ga, gb, atol=atol, rtol=rtol)


# ---- varlen: argument arithmetic against dense ----------------------------------------------------------

ROWS, SEQ = [[5, 11], [4, 6, 6]], 16            # B=2, several documents per row, longest 11


@pytest.mark.parametrize("version", sorted(SIGNATURES))
@pytest.mark.parametrize("heads", [(4, 4), (4, 2), (4, 1)])
@pytest.mark.parametrize("window", [None, 3, 12, 40])   # shorter than segments; longer than all; than the row
@pytest.mark.parametrize("upper_bound", [False, True])  # max_seqlen: the true maximum, or the row length
def test_varlen_matches_dense(version, heads, window, upper_bound, fresh, monkeypatch):
    monkeypatch.setattr(attention_mod, "_varlen_attn", SIGNATURES[version])
    hq, hkv = heads
    q, k, v, cu, true_max = _inputs(ROWS, SEQ, hq, hkv)
    max_seqlen = SEQ if upper_bound else true_max
    varlen = _run(q, k, v, cu, max_seqlen, "varlen", window)
    dense = _run(q, k, v, cu, max_seqlen, "dense", window, weight=varlen[2])
    _assert_same(varlen, dense)

    bites = window is not None and max_seqlen > window
    if version == "2.10" and bites:              # no window_size: another backend, never a dropped window
        assert CALLS == []
        return
    assert len(CALLS) == 1
    call = CALLS[0]
    assert call["kv_heads"] == (hkv if version == "2.13" else hq)        # repeated only without enable_gqa
    if version == "2.10":
        assert call["is_causal"] is True
    else:
        assert call["window_size"] == ((window - 1, 0) if bites else (-1, 0))
    if version == "2.13":
        assert call["enable_gqa"] == (hq != hkv)


def test_varlen_without_window_size_logs_its_fallback(fresh, monkeypatch, caplog):
    monkeypatch.setattr(attention_mod, "_varlen_attn", torch_2_10)
    q, k, v, cu, _ = _inputs(ROWS, SEQ, 4, 2)
    with caplog.at_level(logging.INFO, logger="witscale"):
        for _ in range(2):
            packed_attention(q, k, v, cu, SEQ, backend="varlen", sliding_window=4)
    assert CALLS == []
    messages = [r.getMessage() for r in caplog.records]
    assert messages == ["packed attention: this torch's varlen_attn has no window_size; "
                        "sliding-window attention uses dense"]


def test_varlen_wrapper_reads_nothing_back(monkeypatch):
    """The varlen path adds no host sync of its own (see test_dense_makes_no_host_sync for why meta)."""
    seen = []

    def fake(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, window_size=(-1, -1), enable_gqa=False):
        seen.append((cu_seq_q.device.type, max_q, window_size, key.shape[1]))
        return query * 1

    monkeypatch.setattr(attention_mod, "_varlen_attn", fake)
    q = torch.empty(2, 16, 4, 8, device="meta")
    k = v = torch.empty(2, 16, 2, 8, device="meta")
    cu = torch.empty(6, dtype=torch.int32, device="meta")
    assert packed_attention(q, k, v, cu, 16, backend="varlen", sliding_window=4).shape == q.shape
    assert seen == [("meta", 16, (3, 0), 2)]


# ---- varlen without enable_gqa: un-repeated K/V only where a probe showed them exact (issue 28 item 7) -------

def torch_2_11_grouped(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, return_aux=None, scale=None,
                       window_size=(-1, -1)):
    """A 2.11 whose kernel takes Hq % Hkv == 0 (FlashAttention's varlen kernel does): query head h reads K/V head
    h // (Hq / Hkv)."""
    CALLS.append(dict(kv_heads=key.shape[1], window_size=window_size))
    return _emulated_varlen(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, window_size,
                            enable_gqa=key.shape[1] != query.shape[1], scale=scale)


def torch_2_11_misgrouped(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, return_aux=None, scale=None,
                          window_size=(-1, -1)):
    """Takes un-repeated K/V without complaint but groups the heads the other way (h % Hkv): wrong."""
    CALLS.append(dict(kv_heads=key.shape[1], window_size=window_size))
    rep = query.shape[1] // key.shape[1]
    key, value = key.repeat(1, rep, 1), value.repeat(1, rep, 1)
    return _emulated_varlen(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, window_size, enable_gqa=False,
                            scale=scale)


@pytest.mark.parametrize("fn, grouped, why", [
    (torch_2_10, False, "un-repeated K/V refused"), (torch_2_11, False, "un-repeated K/V refused"),
    (torch_2_11_grouped, True, "output bitwise equal"), (torch_2_11_misgrouped, False, "output differs"),
    (torch_2_13, False, "this torch has enable_gqa")])
@pytest.mark.parametrize("mode", ["grad", "no_grad", "inference"])
def test_the_grouped_kv_probe_says_yes_only_where_un_repeated_kv_give_the_repeated_result(fn, grouped, why, mode,
                                                                                          monkeypatch):
    monkeypatch.setattr(attention_mod, "_GROUPED_KV_PROBES", {})
    monkeypatch.setattr(attention_mod, "_varlen_attn", fn)
    context = {"grad": torch.enable_grad, "no_grad": torch.no_grad, "inference": torch.inference_mode}[mode]
    with context():           # the first attention call may come from an evaluation
        found = attention_mod.varlen_takes_grouped_kv("cpu", torch.float32)
    assert found["grouped"] is grouped and found["why"].startswith(why), found


@pytest.mark.parametrize("fn, kv_heads_passed", [(torch_2_11_grouped, 2), (torch_2_11_misgrouped, 4), (torch_2_11, 4)])
def test_varlen_passes_un_repeated_kv_only_where_the_probe_said_so_and_equals_dense(fn, kv_heads_passed, fresh,
                                                                                    monkeypatch):
    monkeypatch.setattr(attention_mod, "_varlen_attn", fn)
    attention_mod.varlen_takes_grouped_kv("cpu", torch.float32)
    CALLS.clear()
    q, k, v, cu, true_max = _inputs(ROWS, SEQ, 4, 2)
    varlen = _run(q, k, v, cu, true_max, "varlen", None)
    dense = _run(q, k, v, cu, true_max, "dense", None, weight=varlen[2])
    _assert_same(varlen, dense)
    assert [c["kv_heads"] for c in CALLS] == [kv_heads_passed]


# ---- dense: sync-free, and exact against the per-segment reference --------------------------------------

@pytest.mark.parametrize("sdpa_gqa", [True, False])     # SDPA with enable_gqa, and a torch without it
@pytest.mark.parametrize("heads", [(4, 4), (4, 2), (4, 1)])
@pytest.mark.parametrize("window", [None, 1, 3, 6, 40])
def test_dense_equals_segments_forward_and_backward(sdpa_gqa, heads, window, monkeypatch):
    monkeypatch.setattr(attention_mod, "_sdpa_has_gqa", lambda: sdpa_gqa)
    rows = [[3, 9, 1, 3], [16], [7, 2]]                 # B=3; a 1-token document; a 7-token pad tail
    q, k, v, cu, true_max = _inputs(rows, 16, *heads, seed=1)
    reference = _run(q, k, v, cu, true_max, "sdpa_segments", window)
    for backend in ("dense", "sdpa_grouped"):
        _assert_same(_run(q, k, v, cu, 16, backend, window, weight=reference[2]), reference)


@pytest.mark.parametrize("sdpa_gqa", [True, False])
@pytest.mark.parametrize("window, softcap", [(None, None), (3, None), (3, 2.0)])
def test_dense_makes_no_host_sync(sdpa_gqa, window, softcap, monkeypatch):
    """On the meta device tensors have shapes but no data: .tolist(), .item(), bool(t), int(t),
    .nonzero() and boolean-mask indexing all raise there, as does any copy to the CPU. So forward and
    backward on meta succeed only if nothing on the dense path reads a device tensor back on the host,
    which on a GPU is a synchronisation. (The CPU-only validation is skipped: cu_seqlens is not on the CPU.)"""
    monkeypatch.setattr(attention_mod, "_sdpa_has_gqa", lambda: sdpa_gqa)
    cu = torch.empty(6, dtype=torch.int32, device="meta")
    with pytest.raises((RuntimeError, NotImplementedError)):        # the premise: meta refuses host reads
        cu.tolist()
    with pytest.raises((RuntimeError, NotImplementedError)):
        cu.nonzero()
    q = torch.empty(2, 16, 4, 8, device="meta", requires_grad=True)
    k = torch.empty(2, 16, 2, 8, device="meta", requires_grad=True)
    v = torch.empty(2, 16, 2, 8, device="meta", requires_grad=True)
    out = packed_attention(q, k, v, cu, 16, backend="dense", sliding_window=window, scale=0.3, softcap=softcap)
    assert out.shape == q.shape and out.device.type == "meta"
    dq, dk, dv = torch.autograd.grad(out.sum(), (q, k, v))
    assert dq.shape == q.shape and dk.shape == k.shape and dv.shape == v.shape


def test_dense_checks_cpu_segments_only():
    q = k = v = torch.randn(2, 4, 2, 8)
    with pytest.raises(ValueError, match="row boundary"):
        packed_attention(q, k, v, torch.tensor([0, 2, 6, 8], dtype=torch.int32), 4, backend="dense")
    with pytest.raises(ValueError, match="cu_seqlens must rise from 0 to the 8"):
        packed_attention(q, k, v, torch.tensor([0, 4, 7], dtype=torch.int32), 4, backend="dense")


# ---- select_backend ---------------------------------------------------------------------------------------

@pytest.fixture
def fake_cuda(monkeypatch, fresh):
    """A CUDA machine of a given capability, a torch with or without varlen_attn, flash-attn or not."""
    def setup(capability=(9, 0), varlen=torch_2_13, flash=False, available=True):
        monkeypatch.setattr(torch.cuda, "is_available", lambda: available)
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
        monkeypatch.setattr(attention_mod, "_varlen_attn", varlen)
        monkeypatch.setattr(attention_mod, "_flash_installed", lambda: flash)
    return setup


CUDA, CPU = torch.device("cuda"), torch.device("cpu")


@pytest.mark.parametrize("setup, dtype, expected", [
    (dict(), torch.bfloat16, "varlen"),
    (dict(), torch.float16, "varlen"),
    (dict(varlen=torch_2_10), torch.bfloat16, "varlen"),            # windows then fall back per call
    (dict(flash=True), torch.float32, "dense"),                      # no fp32 FlashAttention kernels
    (dict(capability=(7, 5), flash=True), torch.bfloat16, "dense"),  # FA2 needs Ampere or newer
    (dict(varlen=None, flash=True), torch.bfloat16, "flash_varlen"),
    (dict(varlen=None), torch.bfloat16, "dense"),
])
def test_auto_on_cuda(fake_cuda, setup, dtype, expected):
    fake_cuda(**setup)
    assert select_backend("auto", CUDA, dtype) == expected


def test_auto_on_cpu_is_grouped_even_with_cuda_present(fake_cuda):
    fake_cuda()
    assert select_backend("auto", CPU, torch.bfloat16) == "sdpa_grouped"
    assert select_backend("auto", None) == "sdpa_grouped"


@pytest.mark.parametrize("setup, device, dtype, reason", [
    (dict(), CPU, torch.bfloat16, "runs on CUDA only"),
    (dict(available=False), CUDA, torch.bfloat16, "CUDA is not available"),
    (dict(), CUDA, torch.float32, "fp16/bf16 only, not torch.float32"),
    (dict(capability=(7, 5)), CUDA, torch.bfloat16, "compute capability ≥ 8.0, this GPU has 7.5"),
    (dict(varlen=None), CUDA, torch.bfloat16, r"has no torch.nn.attention.varlen \(it came in torch 2.10\)"),
])
def test_explicit_varlen_says_why_it_cannot_run(fake_cuda, setup, device, dtype, reason):
    fake_cuda(**setup)
    with pytest.raises(ValueError, match="attention backend varlen cannot run here: .*" + reason):
        select_backend("varlen", device, dtype)


def test_explicit_varlen_and_flash_varlen_where_they_can_run(fake_cuda):
    fake_cuda(flash=True)
    assert select_backend("varlen", CUDA, torch.bfloat16) == "varlen"
    assert select_backend("flash_varlen", CUDA, torch.bfloat16) == "flash_varlen"
    fake_cuda(flash=False)
    with pytest.raises(ValueError, match="flash-attn"):
        select_backend("flash_varlen", CUDA, torch.bfloat16)


def test_choice_is_logged_once_with_the_reason(fake_cuda, caplog):
    fake_cuda(capability=(7, 5))
    with caplog.at_level(logging.INFO, logger="witscale"):
        for _ in range(3):
            assert select_backend("auto", CUDA, torch.bfloat16) == "dense"
    assert [r.getMessage() for r in caplog.records] == [
        "packed attention backend: dense (not varlen: its FlashAttention-2 kernels need compute capability "
        "≥ 8.0, this GPU has 7.5)"]


# ---- scale and soft-capping against an independent float64 reference ------------------------------------

CAP_ROWS, CAP_SEQ = [[3, 9, 1, 3], [16], [7, 2]], 16     # B=3; a 1-token document; a 7-token padding tail


def _reference(q, k, v, rows, window, scale, softcap):
    """Float64 attention with explicit scores: segment ids from the documents' lengths (a row's unfilled
    tail is one more segment), key j visible from query i iff same segment, j ≤ i and i − j < window."""
    q, k, v = (t.double() for t in (q, k, v))
    b, s, hq, d = q.shape
    rep = hq // k.shape[2]
    k, v = k.repeat_interleave(rep, dim=2), v.repeat_interleave(rep, dim=2)
    seg = torch.tensor([[i for i, n in enumerate(lengths + [s - sum(lengths)]) for _ in range(n)]
                        for lengths in rows])                                     # [B, S]
    i = torch.arange(s)
    visible = (seg[:, :, None] == seg[:, None, :]) & (i[:, None] >= i[None, :])
    if window:
        visible &= (i[:, None] - i[None, :]) < window
    scores = torch.einsum("bihd,bjhd->bhij", q, k) * (d ** -0.5 if scale is None else scale)
    if softcap:
        scores = softcap * torch.tanh(scores / softcap)
    probs = torch.softmax(scores.masked_fill(~visible[:, None], float("-inf")), dim=-1)
    return torch.einsum("bhij,bjhd->bihd", probs, v)


def _reference_run(q, k, v, rows, window, scale, softcap, weight):
    leaves = [t.detach().double().requires_grad_() for t in (q, k, v)]
    out = _reference(*leaves, rows, window, scale, softcap)
    return out.detach(), torch.autograd.grad((out * weight.double()).sum(), leaves), weight


def _cap_inputs(hq, hkv, dtype=torch.float32, d=8, spread=3.0):
    """Scores of std ~spread²·√d·scale ≈ 6 (scale 0.29): a cap of 2 bites on most of them."""
    q, k, v, cu, true_max = _inputs(CAP_ROWS, CAP_SEQ, hq, hkv, d=d, seed=3, dtype=dtype)
    with torch.no_grad():
        q.mul_(spread)
        k.mul_(spread)
    return q, k, v, cu, true_max


SCALE, CAP = 0.29, 2.0


FLEX_UNCOMPILED = pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")


@FLEX_UNCOMPILED
@pytest.mark.parametrize("heads", [(4, 4), (4, 2), (4, 1)])
@pytest.mark.parametrize("window", [None, 1, 3, 40])
def test_softcap_matches_fp64_reference(heads, window, fresh):
    q, k, v, cu, _ = _cap_inputs(*heads)
    weight = torch.randn(q.shape)
    reference = _reference_run(q, k, v, CAP_ROWS, window, SCALE, CAP, weight)
    uncapped = _reference(q.detach(), k.detach(), v.detach(), CAP_ROWS, window, SCALE, None)
    if window != 1:                                             # (window 1: each token sees itself only)
        assert (uncapped - reference[0]).abs().max() > 0.1      # the cap bites: the comparison can fail
    for backend in ("eager", "dense"):                          # max_seqlen: the row (an upper bound)
        got = _run(q, k, v, cu, CAP_SEQ, backend, window, weight=weight, scale=SCALE, softcap=CAP)
        _assert_same((got[0].double(), [g.double() for g in got[1]], None), reference, atol=1e-5)
    if heads != (4, 2):
        return
    with torch.no_grad():                                       # flex: forward only on the CPU
        flex = packed_attention(q.detach(), k.detach(), v.detach(), cu, CAP_SEQ, backend="flex",
                                sliding_window=window, scale=SCALE, softcap=CAP)
    torch.testing.assert_close(flex.double(), reference[0], atol=1e-5, rtol=0)


@FLEX_UNCOMPILED
def test_softcap_bf16_eager_and_flex_block_mask_reuse(fresh):
    q, k, v, cu, _ = _cap_inputs(8, 2, dtype=torch.bfloat16, d=16, spread=2.0)
    weight = torch.randn(q.shape, dtype=torch.bfloat16)
    reference = _reference_run(q, k, v, CAP_ROWS, 5, SCALE, CAP, weight)
    got = _run(q, k, v, cu, CAP_SEQ, "eager", 5, weight=weight, scale=SCALE, softcap=CAP)
    assert got[0].dtype == torch.bfloat16
    # bf16: q·kᵀ and the probabilities rounded to 8 bits (2⁻⁸ relative) on values of order one
    _assert_same((got[0].double(), [g.double() for g in got[1]], None), reference, atol=3e-2, rtol=3e-2)
    # flex's block mask is built once per cu_seqlens tensor (every layer of a forward passes the same one),
    # and rebuilt for a new tensor or one changed in place
    qf, kf, vf = (t.detach().float() for t in (q, k, v))
    attention_mod._block_mask_cache.clear()
    with torch.no_grad():
        first = packed_attention(qf, kf, vf, cu, CAP_SEQ, backend="flex", scale=SCALE, softcap=CAP)
        mask = attention_mod._block_mask_cache.masks[(3, CAP_SEQ, None, "cpu")]
        packed_attention(qf, kf, vf, cu, CAP_SEQ, backend="flex", scale=SCALE, softcap=CAP)
        assert attention_mod._block_mask_cache.masks[(3, CAP_SEQ, None, "cpu")] is mask
        one_doc = torch.tensor([0, 16, 32, 48], dtype=torch.int32)
        other = packed_attention(qf, kf, vf, one_doc, CAP_SEQ, backend="flex", scale=SCALE, softcap=CAP)
        assert attention_mod._block_mask_cache.masks[(3, CAP_SEQ, None, "cpu")] is not mask
        torch.testing.assert_close(other.double(), _reference(qf, kf, vf, [[16]] * 3, None, SCALE, CAP),
                                   atol=1e-5, rtol=0)
        cu_copy = cu.clone()
        packed_attention(qf, kf, vf, cu_copy, CAP_SEQ, backend="flex", scale=SCALE, softcap=CAP)
        cu_copy.copy_(torch.tensor([0, 2, 16, 20, 32, 33, 34, 35, 48]))   # same tensor, new content
        again = packed_attention(qf, kf, vf, cu_copy, CAP_SEQ, backend="flex", scale=SCALE, softcap=CAP)
    torch.testing.assert_close(again.double(), _reference(qf, kf, vf, [[2, 14], [4, 12], [1, 1, 1, 13]], None,
                                                          SCALE, CAP), atol=1e-5, rtol=0)
    assert not torch.equal(first, other)


def test_block_mask_cache_keeps_one_mask_per_window_for_one_cu_seqlens():
    """Gemma-2's layers alternate sliding and full attention: with one cu_seqlens tensor (every layer of a
    forward, and their checkpointed recomputes) the cache builds one mask per window, not one per layer;
    another cu_seqlens tensor, or the same one changed in place, drops them all."""
    builds = []

    def build(cu, b, s, window, device):
        builds.append((cu, window))
        return object()

    cache = attention_mod.BlockMaskCache(build)
    cu = torch.tensor([0, 3, 8], dtype=torch.int32)
    layers = [4, None] * 4
    first = [cache.get(cu, 1, 8, w, "cpu") for w in layers]
    recompute = [cache.get(cu, 1, 8, w, "cpu") for w in reversed(layers)]     # backward's recompute
    assert [w for _, w in builds] == [4, None]
    assert first[0] is first[2] is recompute[-1] and first[1] is first[3] is recompute[0] and first[0] is not first[1]
    other = torch.tensor([0, 8], dtype=torch.int32)                           # the next micro-batch
    assert cache.get(other, 1, 8, 4, "cpu") is not first[0] and cache.get(other, 1, 8, None, "cpu") is not first[1]
    assert len(builds) == 4 and len(cache.masks) == 2
    other[1] = 7                                                              # changed in place
    cache.get(other, 1, 8, 4, "cpu")
    assert len(builds) == 5 and len(cache.masks) == 1


@FLEX_UNCOMPILED
def test_flex_alternating_windows_and_caps_build_two_masks(fresh, monkeypatch):
    """Through packed_attention: layers alternating window 5 / none and cap / no cap (softcap is flex's
    score_mod, not part of the mask) build two block masks in all, and each layer is still right."""
    q, k, v, cu, _ = _cap_inputs(4, 2)
    qf, kf, vf = (t.detach() for t in (q, k, v))
    built = []

    def build(*args):
        built.append(args[3])
        return attention_mod._build_flex_block_mask(*args)

    monkeypatch.setattr(attention_mod, "_block_mask_cache", attention_mod.BlockMaskCache(build))
    with torch.no_grad():
        for window, softcap in [(5, CAP), (None, CAP), (5, None), (None, None)] * 2:
            got = packed_attention(qf, kf, vf, cu, CAP_SEQ, backend="flex", sliding_window=window, scale=SCALE,
                                   softcap=softcap)
            torch.testing.assert_close(got.double(), _reference(qf, kf, vf, CAP_ROWS, window, SCALE, softcap),
                                       atol=1e-5, rtol=0)
    assert built == [5, None]


@FLEX_UNCOMPILED
@pytest.mark.parametrize("version", sorted(SIGNATURES))
def test_explicit_scale_on_every_cpu_backend(version, fresh, monkeypatch):
    """scale ≠ 1/√D reaches every kernel (the varlen emulation through each torch's signature: 2.10 has
    no scale, so q is pre-scaled), with a window that bites and GQA."""
    monkeypatch.setattr(attention_mod, "_varlen_attn", SIGNATURES[version])
    q, k, v, cu, _ = _cap_inputs(4, 2)
    weight = torch.randn(q.shape)
    reference = _reference_run(q, k, v, CAP_ROWS, 6, SCALE, None, weight)
    default = _reference(q.detach(), k.detach(), v.detach(), CAP_ROWS, 6, None, None)
    assert (default - reference[0]).abs().max() > 0.1
    for backend in ("varlen", "sdpa_grouped", "sdpa_segments", "dense", "eager", "flex"):
        if backend == "flex":
            with torch.no_grad():
                out = packed_attention(q.detach(), k.detach(), v.detach(), cu, CAP_SEQ, backend="flex",
                                       sliding_window=6, scale=SCALE)
            torch.testing.assert_close(out.double(), reference[0], atol=1e-5, rtol=0)
            continue
        got = _run(q, k, v, cu, CAP_SEQ, backend, 6, weight=weight, scale=SCALE)
        _assert_same((got[0].double(), [g.double() for g in got[1]], None), reference, atol=2e-5)
    # sdpa_grouped without a biting window (its grouped path, not the per-segment fallback)
    reference = _reference_run(q, k, v, CAP_ROWS, None, SCALE, None, weight)
    got = _run(q, k, v, cu, CAP_SEQ, "sdpa_grouped", None, weight=weight, scale=SCALE)
    _assert_same((got[0].double(), [g.double() for g in got[1]], None), reference, atol=2e-5)


def test_a_backend_that_cannot_cap_refuses_a_cap(fresh, monkeypatch):
    monkeypatch.setattr(attention_mod, "_varlen_attn", torch_2_13)
    q, k, v, cu, _ = _cap_inputs(4, 2)
    for backend in ("varlen", "sdpa_grouped", "sdpa_segments"):
        with pytest.raises(ValueError, match=f"attention backend {backend} cannot apply attention soft-capping"):
            packed_attention(q, k, v, cu, CAP_SEQ, backend=backend, softcap=CAP)
        with pytest.raises(ValueError, match=f"attention backend {backend} cannot apply attention soft-capping"):
            select_backend(backend, CPU, torch.float32, softcap=CAP)
    with pytest.raises(ValueError, match="softcap must be a positive number"):
        packed_attention(q, k, v, cu, CAP_SEQ, backend="eager", softcap=-1.0)
    # 0 and None mean "no cap" (HF configs write either)
    plain = packed_attention(q, k, v, cu, CAP_SEQ, backend="sdpa_grouped", softcap=0)
    torch.testing.assert_close(plain, packed_attention(q, k, v, cu, CAP_SEQ, backend="eager"), atol=1e-5, rtol=0)


@pytest.mark.parametrize("setup, flash_softcap, flex_ok, dtype, expected", [
    (dict(flash=True), True, True, torch.bfloat16, "flash_varlen"),
    (dict(flash=True), False, True, torch.bfloat16, "flex"),          # flash-attn < 2.6: no softcap
    (dict(flash=True), True, True, torch.float32, "flex"),            # no fp32 FlashAttention kernels
    (dict(flash=False), True, True, torch.bfloat16, "flex"),          # varlen_attn cannot cap
    (dict(flash=False), True, False, torch.bfloat16, "dense"),
])
def test_auto_with_softcap_on_cuda(fake_cuda, monkeypatch, setup, flash_softcap, flex_ok, dtype, expected):
    fake_cuda(**setup)
    monkeypatch.setattr(attention_mod, "_flash_has_softcap", lambda: flash_softcap)
    monkeypatch.setattr(attention_mod, "_flex_unusable", lambda device: None if flex_ok else "no flex here")
    assert select_backend("auto", CUDA, dtype, softcap=50.0) == expected
    assert select_backend("auto", CUDA, dtype, softcap=0) == select_backend("auto", CUDA, dtype)   # 0: no cap
    assert select_backend("auto", CUDA, torch.bfloat16, softcap=0) == "varlen"


def test_softcap_selection_on_cpu_explicit_requests_and_logging(fake_cuda, caplog, monkeypatch):
    fake_cuda(flash=False)
    with caplog.at_level(logging.INFO, logger="witscale"):
        for _ in range(2):
            assert select_backend("auto", CPU, torch.float32, softcap=50.0) == "eager"
            assert select_backend("auto", CPU, torch.float32) == "sdpa_grouped"    # uncapped layers
    assert [r.getMessage() for r in caplog.records] == [
        "packed attention backend for soft-capped layers: eager (SDPA cannot soft-cap)",
        "packed attention backend: sdpa_grouped"]
    assert select_backend("dense", CPU, torch.float32, softcap=50.0) == "dense"
    assert select_backend("eager", CPU, torch.float32, softcap=50.0) == "eager"
    with pytest.raises(ValueError, match="flex cannot run here: flex_attention has no backward on cpu"):
        select_backend("flex", CPU, torch.float32, softcap=50.0)
    with pytest.raises(ValueError, match="flash_varlen with soft-capping needs CUDA and flash-attn ≥ 2.6"):
        select_backend("flash_varlen", CUDA, torch.bfloat16, softcap=50.0)
    monkeypatch.setattr(attention_mod, "_flex_unusable", lambda device: None)
    assert select_backend("flex", CUDA, torch.bfloat16, softcap=50.0) == "flex"
    assert select_backend("flex", CUDA, torch.bfloat16) == "flex"


# ---- GPU: the real kernels ---------------------------------------------------------------------------------

GPU_ROWS, GPU_SEQ = [[100, 1, 60, 95], [256], [31, 225]], 256


def _gpu_case(hq=8, hkv=2, d=64, dtype=torch.bfloat16):
    q, k, v, cu, _ = _inputs(GPU_ROWS, GPU_SEQ, hq, hkv, d=d, seed=2, dtype=dtype, device="cuda")
    return q, k, v, cu


@gpu
@pytest.mark.parametrize("window", [None, 32])
def test_gpu_varlen_matches_dense_bf16(window, fresh):
    """bf16 varlen and bf16 dense each against dense in fp32 on the same (bf16-rounded) inputs, forward
    and backward of (out * random).sum(). Tolerance atol = rtol = 2e-2: a few bf16 ulps (2⁻⁸ ≈ 3.9e-3
    relative) on outputs and gradients of order one; dense in bf16 must meet it too."""
    why = attention_mod._varlen_unusable(torch.device("cuda"), torch.bfloat16)
    if why:
        pytest.skip(why)
    q, k, v, cu = _gpu_case()
    q32, k32, v32 = (t.detach().float().requires_grad_() for t in (q, k, v))
    reference = _run(q32, k32, v32, cu, GPU_SEQ, "dense", window)
    weight = reference[2].bfloat16()
    for backend in ("varlen", "dense"):
        out, grads, _ = _run(q, k, v, cu, GPU_SEQ, backend, window, weight=weight)   # max_seqlen: the row
        _assert_same((out.float(), [g.float() for g in grads], None), reference, atol=2e-2, rtol=2e-2)


@gpu
@pytest.mark.parametrize("window", [None, 32])
def test_gpu_dense_matches_cpu_segments_fp32(window):
    q, k, v, cu = _gpu_case(dtype=torch.float32)
    on_gpu = _run(q, k, v, cu, GPU_SEQ, "dense", window)
    qc, kc, vc = (t.detach().cpu().requires_grad_() for t in (q, k, v))
    on_cpu = _run(qc, kc, vc, cu.cpu(), GPU_SEQ, "sdpa_segments", window, weight=on_gpu[2].cpu())
    _assert_same((on_gpu[0].cpu(), [g.cpu() for g in on_gpu[1]], None), on_cpu, atol=1e-4, rtol=1e-4)


@gpu
@pytest.mark.parametrize("backend", ["dense", "varlen"])
def test_gpu_backend_makes_no_host_sync(backend, fresh):
    """CUDA's sync debug mode raises on any synchronising call (a device-to-host copy, .item(), ...)."""
    if backend == "varlen" and attention_mod._varlen_unusable(torch.device("cuda"), torch.bfloat16):
        pytest.skip("no usable varlen_attn")
    q, k, v, cu = _gpu_case()
    weight = torch.randn(q.shape, dtype=q.dtype, device="cuda")
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        out = packed_attention(q, k, v, cu, GPU_SEQ, backend=backend, sliding_window=32)
        torch.autograd.grad((out * weight).sum(), (q, k, v))
    finally:
        torch.cuda.set_sync_debug_mode("default")


@gpu
def test_gpu_flex_makes_no_host_sync_after_warmup(fresh):
    """flex with a cap and a window: after one warm-up call (compilation may synchronise), neither the
    block mask build (a new cu_seqlens each step) nor forward/backward reads anything back."""
    q, k, v, cu = _gpu_case()
    weight = torch.randn(q.shape, dtype=q.dtype, device="cuda")
    out = packed_attention(q, k, v, cu, GPU_SEQ, backend="flex", sliding_window=32, softcap=50.0)
    torch.autograd.grad((out * weight).sum(), (q, k, v))
    new_cu = cu.clone()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        out = packed_attention(q, k, v, new_cu, GPU_SEQ, backend="flex", sliding_window=32, softcap=50.0)
        torch.autograd.grad((out * weight).sum(), (q, k, v))
    finally:
        torch.cuda.set_sync_debug_mode("default")
