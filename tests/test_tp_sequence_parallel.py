"""Sequence-sharded TP regions (--tp-sequence-parallel, Megatron's sequence parallelism inside the TP group) on
real gloo ranks: tp 2 with them against tp 2 without and against one rank (logits, loss, every gradient of a
packed micro-batch, then 3 Trainer/DeepSpeed steps), under ZeRO-0 and ZeRO-3, for Llama with every bias and a
Gemma-3 layout (sandwich norms, q/k norms, one KV head replicated); sp 2 × tp 2 with them against one rank; and
the flag's resolution and refusals in one line."""
import numpy as np
import pytest

from tests import test_train_cli_operations as operations
from tests.distributed import run_distributed
from tests.train_helpers import TINY, train_worker

SEQ_LEN, DATA_SEED = 48, 1
run_inputs = operations.run_inputs      # the session fixture: packed data, a tiny Llama config, the tokenizer

# Llama with q/k/v/o and MLP biases: the row-parallel biases are added to the rank's tokens only (their
# gradient summed over tp). 8 heads / 4 KV heads: split at tp 2, and at sp 2 × tp 2 one KV head per rank.
LLAMA = dict(num_attention_heads=8, num_key_value_heads=4, hidden_size=32, intermediate_size=48,
             attention_bias=True, mlp_bias=True)
# Gemma-3: sandwich norms (four per block, all on 1/tp of the tokens), per-head q/k norms, one KV head
# (replicated at tp 2), local and global RoPE, tied embeddings, GeGLU.
GEMMA3 = dict(TINY, model_type="gemma3_text", vocab_size=64, num_attention_heads=4, num_key_value_heads=1,
              head_dim=8, hidden_activation="gelu_pytorch_tanh", query_pre_attn_scalar=16, sliding_window=8,
              tie_word_embeddings=True, layer_types=["sliding_attention", "full_attention"])


def _worker(rank, world, runs):
    return [train_worker(rank, world, **kw) for kw in runs]


def _same(got: dict, want: dict, what: str, steps_rtol: float = 1e-6) -> None:
    """One micro-batch's logits, loss and every dense gradient (fp32: 1e-6), then the 3 steps' losses, gradient
    norms and parameters (Adam turns fp32 rounding of a ~0 gradient into a step of up to ±lr: 1e-5)."""
    if want.get("probe") is not None:
        np.testing.assert_allclose(got["probe"]["logits"], want["probe"]["logits"], rtol=1e-6, atol=1e-6,
                                   err_msg=what)
        assert got["probe"]["loss_sum"] == pytest.approx(want["probe"]["loss_sum"], rel=1e-6), what
        for name, g in want["probe"]["grads"].items():
            np.testing.assert_allclose(got["probe"]["grads"][name], g, rtol=1e-6, atol=1e-6 * np.abs(g).max(),
                                       err_msg=f"{what}: {name}")
    np.testing.assert_allclose(got["losses"], want["losses"], rtol=steps_rtol, err_msg=what)
    np.testing.assert_allclose([r["grad_norm"] for r in got["results"]], [r["grad_norm"] for r in want["results"]],
                               rtol=steps_rtol, err_msg=what)
    for name, p in want["params"].items():
        np.testing.assert_allclose(got["params"][name], p, rtol=0, atol=1e-5, err_msg=f"{what}: {name}")


PROBED = dict(stage=0, micro=2, accum=2, steps=3, lr=1e-3, eps=1e-6, do_probe=True, lp=0.5, seq_len=SEQ_LEN,
              data_seed=DATA_SEED, with_weights=True)
RUNS = {   # name → train_worker's keywords (without tp / sp / tp_sequence_parallel)
    "llama biases, recomputed blocks": dict(PROBED, model=LLAMA, activation_checkpointing=True),
    "gemma3": dict(PROBED, model=GEMMA3),
    "llama ZeRO-3": dict(stage=3, micro=2, accum=2, steps=3, lr=1e-3, eps=1e-6, lp=0.5, seq_len=SEQ_LEN,
                         data_seed=DATA_SEED, with_weights=True, model=LLAMA),
}


@pytest.mark.slow
def test_tp_sequence_parallel_equals_tp_without_it_and_one_rank():
    """tp 2 with sequence-sharded regions = tp 2 without = one rank, for each run of RUNS (micro-batches of 2
    packed rows: the gather/scatter's batch > 1 path); sp 2 × tp 2 with them = one rank (4 ranks: each holds 12
    of a row's 48 tokens between the linears)."""
    names = list(RUNS)
    sp_run = dict(PROBED, model=LLAMA, activation_checkpointing=True)
    want = run_distributed(_worker, 1, [RUNS[n] for n in names] + [sp_run])[0]
    runs = [dict(RUNS[n], tp=2, tp_sequence_parallel=on) for n in names for on in (False, True)]
    out = run_distributed(_worker, 2, runs, timeout=600)
    for rank in (0, 1):
        for i, name in enumerate(names):
            without, with_sp = out[rank][2 * i], out[rank][2 * i + 1]
            _same(with_sp, without, f"{name}: tp 2 with against without, rank {rank}")
            if not name.endswith("ZeRO-3"):      # ZeRO-3 against one rank: tests/test_model_tensor_parallel.py
                _same(with_sp, want[i], f"{name}: tp 2 with against one rank, rank {rank}")
    out = [o[0] for o in run_distributed(_worker, 4, [dict(sp_run, tp=2, sp=2, tp_sequence_parallel=True)],
                                         timeout=600)]
    ref = want[len(names)]
    # Rank order: tp fastest, then sp — ranks 0 and 2 hold the two halves of the rows (the logits are whole
    # within an sp rank: the final norm's output is gathered over tp before the head).
    np.testing.assert_allclose(np.concatenate([out[0]["probe"]["logits"], out[2]["probe"]["logits"]], axis=1),
                               ref["probe"]["logits"], rtol=1e-6, atol=1e-6)
    assert out[0]["probe"]["loss_sum"] + out[2]["probe"]["loss_sum"] == pytest.approx(ref["probe"]["loss_sum"],
                                                                                     rel=1e-6)
    for rank, got in enumerate(out):
        _same(dict(got, probe=None), dict(ref, probe=None), f"sp 2 × tp 2 rank {rank}")
        for name, g in ref["probe"]["grads"].items():
            np.testing.assert_allclose(got["probe"]["grads"][name], g, rtol=1e-6, atol=1e-6 * np.abs(g).max(),
                                       err_msg=f"sp 2 × tp 2 rank {rank}: {name}")
