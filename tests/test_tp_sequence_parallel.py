"""Sequence-sharded TP regions (--tp-sequence-parallel, Megatron's sequence parallelism inside the TP group) on
real gloo ranks: tp 2 with them against tp 2 without and against one rank (logits, loss, every gradient of a
packed micro-batch, then 3 Trainer/DeepSpeed steps), under ZeRO-0 and ZeRO-3, for Llama with every bias and a
Gemma-3 layout (sandwich norms, q/k norms, one KV head replicated); sp 2 × tp 2 with them against one rank; and
the flag's resolution and refusals in one line. (tp 2 × pp 2 with them: tests/test_train_pipeline_parallel.py,
in the launch of its tp 2 × pp 2 run.)"""
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


def _worker(rank, world, runs, shapes=False):
    out = [train_worker(rank, world, **kw) for kw in runs]
    return out + [_sharded_shapes(world)] if shapes else out


def _sharded_shapes(tp):
    """What a decoder block, the final norm and the head receive at tp = ``tp`` with sequence-sharded regions
    and recomputed blocks: the block input (what the checkpoint keeps) and the final norm's input hold 1/tp of
    the rows' tokens, the head the whole rows."""
    import torch

    from witscale.model import CausalLM, ModelConfig, packed_positions
    from witscale.parallel.topology import ParallelDims, Topology

    cfg = ModelConfig.from_dict(dict(TINY, **LLAMA))
    topo = Topology(ParallelDims(tp, tp, 1, 0, cfg))
    torch.manual_seed(0)
    model = CausalLM(cfg, topo.tp_group_or_none(), activation_checkpointing=True, tp_sequence_parallel=True)
    seen = {}

    def record(name):
        def hook(module, args):
            seen.setdefault(name, tuple(args[0].shape))     # returns None: the arguments are left as they are
        return hook
    for name, module in (("block", model.model.layers[0]), ("norm", model.model.norm), ("head", model.lm_head)):
        module.register_forward_pre_hook(record(name))
    positions, cu, longest = packed_positions([[20, 28], [48]], SEQ_LEN)
    ids = torch.randint(3, cfg.vocab_size, (2, SEQ_LEN))
    stats = model(ids, positions, cu, longest, ids, torch.ones(2, SEQ_LEN), torch.zeros_like(ids))
    stats.weighted_sum.backward()
    return seen


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
    out = run_distributed(_worker, 2, runs, True, timeout=600)
    assert out[0][-1] == {"block": (2, SEQ_LEN // 2, 32), "norm": (2, SEQ_LEN // 2, 32), "head": (2, SEQ_LEN, 32)}
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


def _plan(run_inputs, tmp_path, world, **flags):
    from witscale.train import build_parser, plan_run
    from witscale.training.config import RunConfig

    args = dict(zip(*[iter(operations._args(run_inputs, tmp_path, 2))] * 2))
    args.update({"--ds_config": "ds_configs/zero1.json", **flags})
    argv = []
    for k, v in args.items():
        argv += [k] if v is None else [k, v]
    return plan_run(RunConfig.from_args(build_parser().parse_args(argv)), world)


@pytest.mark.parametrize("world, flags, on", [
    (2, {"--tp": "2"}, False),                                         # auto: no --sp, checkpointing off (CPU)
    (2, {"--tp": "2", "--activation-checkpointing": "on"}, True),      # auto: memory is tight
    (2, {"--tp": "2", "--tp-sequence-parallel": "on"}, True),
    (2, {"--tp": "2", "--activation-checkpointing": "on", "--tp-sequence-parallel": "off"}, False),
    (4, {"--tp": "2", "--sp": "2"}, True),                             # auto: --sp > 1
    (2, {"--tp": "2", "--activation-checkpointing": "on", "--compile": None}, False),   # auto: not with --compile
    (4, {"--tp": "2", "--pp": "2", "--activation-checkpointing": "on"}, True),   # the stages carry 1/tp of a row
    (2, {"--activation-checkpointing": "on"}, False),                   # auto at tp 1
])
def test_tp_sequence_parallel_flag_resolves(run_inputs, tmp_path, world, flags, on):
    plan = _plan(run_inputs, tmp_path, world, **flags)
    assert plan.tp_sequence_parallel is on
    from witscale.train import resolved_config
    assert resolved_config(plan)["layout"]["tp_sequence_parallel"] is on


@pytest.mark.parametrize("world, flags, message", [
    (2, {}, "--tp-sequence-parallel on: it shards over the TP ranks and --tp is 1; or pass "
            "--tp-sequence-parallel off"),
    (2, {"--tp": "2", "--compile": None}, "--tp-sequence-parallel on: not with --compile: "),
    (2, {"--tp": "2", "--tp-sequence-parallel": "sometimes"}, "invalid choice: 'sometimes'"),
])
def test_tp_sequence_parallel_refusals_are_one_line(run_inputs, tmp_path, capsys, world, flags, message):
    from witscale.train import UsageError
    with pytest.raises((UsageError, SystemExit)) as e:
        _plan(run_inputs, tmp_path, world, **{"--tp-sequence-parallel": "on", **flags})
    text = str(e.value) if isinstance(e.value, UsageError) else capsys.readouterr().err.strip().splitlines()[-1]
    assert message in text and "\n" not in text, text


def test_rows_that_do_not_divide_by_tp_are_refused_with_on_and_turn_auto_off():
    """The row rule: each TP rank holds (seq_len / sp) / tp tokens; the data and eval data are named."""
    from types import SimpleNamespace

    from witscale.parallel.topology import ParallelDims
    from witscale.train import UsageError, _tp_sequence_parallel

    dims = ParallelDims(4, tp=2, sp=2)
    data = ("--data", "train", SimpleNamespace(seq_len=96))
    odd = ("--eval-data", "eval", SimpleNamespace(seq_len=50))      # 25 tokens per sp rank
    cfg = lambda mode: SimpleNamespace(tp_sequence_parallel=mode, compile=False)  # noqa: E731
    assert _tp_sequence_parallel(cfg("auto"), dims, False, [data, ("--eval-data", None, None)]) is True
    assert _tp_sequence_parallel(cfg("auto"), dims, False, [data, odd]) is False
    with pytest.raises(UsageError, match=r"^--tp-sequence-parallel on: --eval-data eval: rows of 50 tokens \(25 per "
                                         r"--sp rank\) cannot be cut into --tp 2 equal parts \(repack with a "
                                         r"--seq-len divisible by sp × tp = 4\); or pass --tp-sequence-parallel off$"):
        _tp_sequence_parallel(cfg("on"), dims, False, [data, odd])


def test_the_model_refuses_rows_that_do_not_divide_by_tp():
    """Without the plan's check (a direct user of the model): one line at the first reduce-scatter."""
    import torch

    from witscale.parallel.comm import _check_sequence

    assert _check_sequence(torch.zeros(1, 8, 4), 2) == 4
    with pytest.raises(ValueError, match=r"^--tp-sequence-parallel: 7 tokens per row cannot be cut into --tp 2 "):
        _check_sequence(torch.zeros(1, 7, 4), 2)
