"""GPU tests (``pytest -m gpu``): skipped without CUDA; tools/gpu_check.py runs them on a GPU machine.

- the fused weighted cross-entropy in bf16 on CUDA against an fp64 reference (loss, per-class NLL and
  both gradients), with tolerances derived from bf16's precision;
- a few bf16 training steps of a tiny Llama through the real CLI on CUDA (world size 1, NCCL, ZeRO-3 with
  gradient accumulation): finite losses that fall;
- Gemma-2 soft-capping on CUDA (head_dim 256, query_pre_attn_scalar 256, attention cap 50, window 32,
  final-logit cap 30): packed attention on every CUDA backend that can cap (flex, dense, flash_varlen where
  flash-attn is installed), forward and backward, against the CPU reference (the ``eager`` path in fp64),
  and the soft-capped fused loss in bf16 against fp64. tools/gpu_check.py reports the same figures
  (``softcap_figures``) with timings.
(The attention backends' other GPU tests are in tests/test_model_attention.py.)
"""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def fused_loss_case(seed: int = 0, tokens: int = 1500, hidden: int = 256, vocab: int = 9001):
    """bf16 inputs of a loss call: ~10% ignored targets, weights in {0, 0.2, 1}, logits of std ~1."""
    from witscale.parallel.cross_entropy import IGNORE_INDEX

    g = torch.Generator().manual_seed(seed)
    h = torch.randn(tokens, hidden, generator=g).to(torch.bfloat16)
    w = (torch.randn(vocab, hidden, generator=g) / math.sqrt(hidden)).to(torch.bfloat16)
    targets = torch.randint(0, vocab, (tokens,), generator=g)
    targets[torch.rand(tokens, generator=g) < 0.1] = IGNORE_INDEX
    weights = torch.tensor([0.0, 0.2, 1.0])[torch.randint(0, 3, (tokens,), generator=g)]
    classes = torch.randint(0, 6, (tokens,), generator=g)
    return h, w, targets, weights, classes


def fp64_reference(h, w, targets, weights, classes):
    """Σ w·nll, per-class NLL sums and d/dh, d/dW in fp64 from the same (bf16-valued) inputs."""
    from witscale.parallel.cross_entropy import IGNORE_INDEX

    h64 = h.double().requires_grad_(True)
    w64 = w.double().requires_grad_(True)
    logits = h64 @ w64.t()
    valid = targets != IGNORE_INDEX
    nll = torch.logsumexp(logits, -1) - logits.gather(1, targets.clamp(min=0)[:, None])[:, 0]
    nll = torch.where(valid, nll, torch.zeros((), dtype=torch.float64))
    loss = (nll * weights.double()).sum()
    loss.backward()
    class_nll = torch.zeros(6, dtype=torch.float64).index_add_(0, classes[valid], nll[valid].detach())
    return float(loss.detach()), class_nll, h64.grad, w64.grad


def rel_fro(a: torch.Tensor, ref: torch.Tensor) -> float:
    return float((a.double() - ref).norm() / ref.norm())


def test_fused_weighted_loss_bf16_cuda_matches_fp64():
    from witscale.parallel.cross_entropy import fused_weighted_cross_entropy

    h, w, targets, weights, classes = fused_loss_case()
    hc = h.cuda().requires_grad_(True)
    wc = w.cuda().requires_grad_(True)
    # chunk 512 over 1500 tokens: three chunks, the last one ragged
    stats = fused_weighted_cross_entropy(hc, wc, targets.cuda(), weights.cuda(), classes.cuda(), chunk_size=512)
    stats.weighted_sum.backward()
    ref_loss, ref_class, ref_gh, ref_gw = fp64_reference(h, w, targets, weights, classes)

    assert hc.grad.dtype == torch.bfloat16 and wc.grad.dtype == torch.bfloat16
    # Tolerances. bf16 keeps 8 significant bits: rounding changes a value by at most u = 2^-9 ≈ 2e-3
    # relative. Each logit is rounded once (bf16 matmul output, cast to fp32): with |logit| ≲ 4 that is an
    # absolute error ≲ 8e-3 per logit, unbiased, so the weighted sum over ~1350 tokens (each nll ≈ 9.1)
    # moves by ~1e-4 relative: rtol 5e-3 leaves a wide margin yet catches a lost chunk, a wrong weight or
    # a wrong target (each ≥ 1e-3 of the sum). The gradients carry the relative error of the softmax
    # (≈ |δlogit| ≲ 8e-3), the bf16 rounding of (softmax − onehot)·w before the gradient matmuls and of
    # the gradients themselves (u each): a few 1e-3 in Frobenius norm; rtol 2e-2 (≈ 10u).
    assert math.isfinite(float(stats.weighted_sum))
    assert float(stats.weighted_sum) == pytest.approx(ref_loss, rel=5e-3)
    np.testing.assert_allclose(stats.class_nll_sum.cpu().numpy(), ref_class.numpy(), rtol=5e-3)
    valid = targets != -100
    np.testing.assert_array_equal(stats.class_count.cpu().numpy(),
                                  np.bincount(classes[valid].numpy(), minlength=6).astype(np.float64))
    assert rel_fro(hc.grad.cpu(), ref_gh) < 2e-2
    assert rel_fro(wc.grad.cpu(), ref_gw) < 2e-2
    # rows of weight 0 or an ignored target get exactly zero gradient
    dead = (weights == 0) | ~valid
    assert torch.count_nonzero(hc.grad.cpu()[dead]) == 0


# ---- Gemma-2 soft-capping -----------------------------------------------------------------------------------

GEMMA2 = dict(heads=8, kv_heads=4, head_dim=256, scale=256 ** -0.5, attn_softcap=50.0, window=32,
              final_softcap=30.0)
SOFTCAP_ROWS, SOFTCAP_SEQ = [[100, 1, 60, 95], [256], [31, 225]], 256   # several documents, a 1-token one
# bf16: q·kᵀ accumulates in fp32 in every kernel; the probabilities and outputs are rounded to 8 bits
# (u = 2⁻⁹), so outputs and gradients carry a few u in Frobenius norm: 2e-2 (~10u). fp32: TF32 may be
# used for the kernels' dots (10 bits), on scores of ~30: 1e-2 still flags a lost cap (≥ 0.1) or mask.
ATTN_TOL = {torch.bfloat16: 2e-2, torch.float32: 1e-2}


def softcap_attention_case(dtype, device="cuda", spread=5.5):
    """q/k scaled so that scores have std ≈ spread²·√256/16 ≈ 30: the cap of 50 bites on most of them."""
    from witscale.model.transformer import packed_positions

    g = torch.Generator().manual_seed(5)
    _, cu, _ = packed_positions(SOFTCAP_ROWS, SOFTCAP_SEQ)
    b, s, d = len(SOFTCAP_ROWS), SOFTCAP_SEQ, GEMMA2["head_dim"]
    q = torch.randn(b, s, GEMMA2["heads"], d, generator=g) * spread
    k = torch.randn(b, s, GEMMA2["kv_heads"], d, generator=g) * spread
    v = torch.randn(b, s, GEMMA2["kv_heads"], d, generator=g)
    weight = torch.randn(b, s, GEMMA2["heads"], d, generator=g)
    return [t.to(device=device, dtype=dtype) for t in (q, k, v, weight)] + [cu.to(device)]


def _attention_fwd_bwd(q, k, v, weight, cu, backend):
    from witscale.model.attention import packed_attention

    leaves = [t.detach().requires_grad_(True) for t in (q, k, v)]
    out = packed_attention(*leaves, cu, SOFTCAP_SEQ, backend=backend, sliding_window=GEMMA2["window"],
                           scale=GEMMA2["scale"], softcap=GEMMA2["attn_softcap"])
    grads = torch.autograd.grad((out * weight).sum(), leaves)
    return [out.detach()] + list(grads)


def softcap_attention_errors(backends=None) -> dict:
    """Relative Frobenius errors (out, dq, dk, dv) of each CUDA backend and dtype against the CPU ``eager``
    path in fp64 on the same (rounded) inputs; and what ``auto`` picks for a capped bf16 layer."""
    from witscale.model import attention

    cuda = torch.device("cuda")
    out = {"auto_bf16": attention.select_backend("auto", cuda, torch.bfloat16, softcap=GEMMA2["attn_softcap"])}
    if backends is None:
        backends = ["flex", "dense"]
        if attention._flash_available() and attention._flash_has_softcap():
            backends.append("flash_varlen")
    for dtype in (torch.bfloat16, torch.float32):
        q, k, v, weight, cu = softcap_attention_case(dtype)
        ref = _attention_fwd_bwd(*(t.cpu().double() for t in (q, k, v, weight)), cu.cpu(), "eager")
        uncapped = attention.packed_attention(q.cpu().double(), k.cpu().double(), v.cpu().double(), cu.cpu(),
                                              SOFTCAP_SEQ, backend="eager", sliding_window=GEMMA2["window"],
                                              scale=GEMMA2["scale"])
        out["cap_effect"] = rel_fro(uncapped, ref[0])          # how far the cap moves the output
        for backend in backends:
            if backend == "flash_varlen" and dtype == torch.float32:
                continue
            got = _attention_fwd_bwd(q, k, v, weight, cu, backend)
            out[f"{backend}/{str(dtype).replace('torch.', '')}"] = {
                name: rel_fro(g.cpu(), r) for name, g, r in zip(("out", "dq", "dk", "dv"), got, ref)}
    return out


def softcap_loss_errors() -> dict:
    """The fused loss with the final-logit cap 30 in bf16 on CUDA (logits of std ~15: the cap bites) against
    F.cross_entropy on 30·tanh(z/30) in fp64: loss, per-class NLL, both gradients (relative)."""
    from witscale.parallel.cross_entropy import IGNORE_INDEX, fused_weighted_cross_entropy

    c = GEMMA2["final_softcap"]
    h, w, targets, weights, classes = fused_loss_case()
    h = (h.float() * 15).to(torch.bfloat16)
    hc, wc = h.cuda().requires_grad_(True), w.cuda().requires_grad_(True)
    stats = fused_weighted_cross_entropy(hc, wc, targets.cuda(), weights.cuda(), classes.cuda(), chunk_size=512,
                                         logit_softcap=c)
    stats.weighted_sum.backward()
    h64, w64 = h.double().requires_grad_(True), w.double().requires_grad_(True)
    logits = c * torch.tanh((h64 @ w64.t()) / c)
    nll = torch.nn.functional.cross_entropy(logits, targets, reduction="none", ignore_index=IGNORE_INDEX)
    loss = (nll * weights.double()).sum()
    loss.backward()
    valid = targets != IGNORE_INDEX
    class_nll = torch.zeros(len(stats.class_nll_sum), dtype=torch.float64).index_add_(
        0, classes[valid], nll[valid].detach())
    seen = class_nll > 0
    raw = (h64 @ w64.t()).detach()
    return {"loss": abs(float(stats.weighted_sum.detach()) / float(loss.detach()) - 1),
            "class_nll": float(((stats.class_nll_sum.cpu() - class_nll).abs()[seen] / class_nll[seen]).max()),
            "dh": rel_fro(hc.grad.cpu(), h64.grad), "dw": rel_fro(wc.grad.cpu(), w64.grad),
            "logit_std": float(raw.std()), "capped_fraction": float(((raw.abs() > c / 2).double()).mean())}


def test_gemma2_softcapped_attention_cuda_matches_cpu_reference():
    errors = softcap_attention_errors()
    assert errors["auto_bf16"] in ("flash_varlen", "flex"), errors
    assert errors["cap_effect"] > 0.1, errors                  # the cap matters: the comparison can fail
    for case, errs in errors.items():
        if isinstance(errs, dict):
            tol = ATTN_TOL[torch.bfloat16 if case.endswith("bfloat16") else torch.float32]
            assert all(e < tol for e in errs.values()), (case, errs)


def test_gemma2_softcapped_loss_bf16_cuda_matches_fp64():
    errors = softcap_loss_errors()
    assert errors["capped_fraction"] > 0.05, errors            # the cap bites on many logits
    # the tolerances of test_fused_weighted_loss_bf16_cuda_matches_fp64 (see there)
    assert errors["loss"] < 5e-3 and errors["class_nll"] < 5e-3, errors
    assert errors["dh"] < 2e-2 and errors["dw"] < 2e-2, errors


def _write_learnable_packed(path: str, vocab: int, seq_len: int, rows: int) -> None:
    """Documents whose next token is (token + 1) mod vocab: a pattern a tiny model learns in a few steps."""
    from witscale.data.classes import TokenClass
    from witscale.data.format import TokenizedCorpus, write_packed

    rng = np.random.default_rng(0)
    docs = []
    while sum(len(d[0]) for d in docs) < rows * seq_len * 0.9:
        n = int(rng.integers(16, seq_len // 2))
        ids = ((int(rng.integers(3, vocab)) + np.arange(n)) % (vocab - 3) + 3).astype(np.int32)
        n_prompt = int(rng.integers(2, n - 2))
        classes = np.array([TokenClass.TEMPLATE] + [TokenClass.PROMPT] * n_prompt
                           + [TokenClass.RESPONSE] * (n - 2 - n_prompt) + [TokenClass.EOT], dtype=np.uint8)
        docs.append((ids, classes, None))
    write_packed(path, TokenizedCorpus.from_documents(docs), seq_len=seq_len, pad_id=0,
                 tokenizer={"vocab_size": vocab})


def test_bf16_training_steps_on_cuda_through_the_cli(tmp_path):
    vocab, seq_len, steps = 64, 128, 10
    data = str(tmp_path / "packed")
    _write_learnable_packed(data, vocab, seq_len, rows=48)
    config = tmp_path / "model.json"
    config.write_text(json.dumps({
        "model_type": "llama", "vocab_size": vocab, "hidden_size": 128, "intermediate_size": 256,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
        "max_position_embeddings": seq_len, "rms_norm_eps": 1e-6, "tie_word_embeddings": False,
        "initializer_range": 0.02}))
    out = tmp_path / "run"
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    if env.get("DS_ACCELERATOR") == "cpu":
        del env["DS_ACCELERATOR"]
    cmd = [sys.executable, "witscale/train.py", "--ds_config", "ds_configs/zero3.json", "--data", data,
           "--model-config", str(config), "--output-dir", str(out), "--max-steps", str(steps),
           "--micro-batch-size", "2", "--grad-accum", "2", "--lr", "3e-3", "--warmup-ratio", "0",
           "--weight-decay", "0", "--prompt-weight", "1", "--no-tensorboard"]
    p = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-5000:]
    effective = json.loads((out / "effective_config.json").read_text())
    assert effective["ds_config"]["bf16"]["enabled"] is True, "the run did not see the GPU"
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows if "loss" in r]
    assert len(losses) == steps
    assert all(math.isfinite(x) for x in losses), losses
    # ln 64 ≈ 4.16 at the start; the +1 pattern is learnt within a few steps at lr 3e-3
    assert np.mean(losses[-2:]) < np.mean(losses[:2]) - 0.5, losses
