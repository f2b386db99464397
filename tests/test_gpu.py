"""GPU tests (``pytest -m gpu``): skipped without CUDA; tools/gpu_check.py runs them on a GPU machine.

- the fused weighted cross-entropy in bf16 on CUDA against an fp64 reference (loss, per-class NLL and
  both gradients), with tolerances derived from bf16's precision;
- a few bf16 training steps of a tiny Llama through the real CLI on CUDA (world size 1, NCCL, ZeRO-3 with
  gradient accumulation): finite losses that fall.
(The attention backends' GPU tests are in tests/test_model_attention.py.)
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
