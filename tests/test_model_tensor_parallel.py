"""Tensor parallelism on real gloo ranks: the whole model at tp=2 and tp=4 against tp=1, and tp × ZeRO-3
against ZeRO-3 alone. (Each layer alone against its dense equivalent: tests/test_parallel_layers.py.)"""
import numpy as np
import pytest

from tests.distributed import run_distributed
from tests.train_helpers import TINY, train_worker
from witscale import planner
from witscale.parallel.topology import LayoutError, ParallelDims

# 8 heads / 4 kv heads (GQA) so that tp=4 divides both; vocab 61 is padded at tp=2 and tp=4.
TP_MODEL = dict(num_attention_heads=8, num_key_value_heads=4, hidden_size=32, intermediate_size=48)


def _model_worker(rank, world, runs):
    return [train_worker(rank, world, **kw) for kw in runs]


def _kv_worker(rank, world, runs):
    """The runs, then the parameter elements this rank's tp=``world`` shard of the model holds."""
    import torch

    from witscale.model import CausalLM, ModelConfig
    from witscale.parallel.topology import ParallelDims, Topology

    out = _model_worker(rank, world, runs)
    cfg = ModelConfig.from_dict(dict(TINY, **runs[0]["model"]))
    topo = Topology(ParallelDims(world, world, 1, 0, cfg))
    with torch.device("meta"):
        model = CausalLM(cfg, topo.tp_group_or_none())
    return out, sum(p.numel() for p in model.parameters())


def _close(a, b, atol, what):
    for name in a:
        np.testing.assert_allclose(a[name], b[name], rtol=0, atol=atol, err_msg=f"{what}: {name}")


@pytest.mark.slow
def test_model_tp2_and_tp4_match_tp1():
    common = dict(model=TP_MODEL, stage=0, micro=2, accum=1, steps=3, lr=1e-2, do_probe=True, lp=0.5)
    ref = run_distributed(_model_worker, 1, [dict(common, tp=1)])[0][0]
    for tp in (2, 4):
        got = run_distributed(_model_worker, tp, [dict(common, tp=tp)])[0][0]
        np.testing.assert_allclose(got["probe"]["logits"], ref["probe"]["logits"], rtol=0, atol=1e-5)
        assert got["probe"]["loss_sum"] == pytest.approx(ref["probe"]["loss_sum"], rel=1e-6)
        _close(got["probe"]["grads"], ref["probe"]["grads"], 1e-5, f"grads tp={tp}")
        np.testing.assert_allclose(got["losses"], ref["losses"], rtol=1e-6)
        _close(got["params"], ref["params"], 2e-5, f"params after 3 steps tp={tp}")


@pytest.mark.slow
def test_tp2_zero3_dp2_matches_tp1_zero3_dp2():
    # Adam turns an element whose gradient is ~0 into a ±lr step whose sign depends on summation order;
    # eps=1e-6 damps those elements so that the comparison measures the parallel layout, not that noise.
    common = dict(model=TP_MODEL, stage=3, micro=1, accum=2, steps=3, lr=1e-3, eps=1e-6)
    ref = run_distributed(_model_worker, 2, [dict(common, tp=1)])[0][0]
    got = run_distributed(_model_worker, 4, [dict(common, tp=2)])
    # The first step is bit-identical in exact terms; later steps differ by fp32 summation order (~1e-6).
    assert got[0][0]["losses"][0] == pytest.approx(ref["losses"][0], rel=1e-7)
    np.testing.assert_allclose(got[0][0]["losses"], ref["losses"], rtol=1e-5)
    _close(got[0][0]["params"], ref["params"], 2e-5, "tp2×dp2 ZeRO-3")
    _close(got[3][0]["params"], got[0][0]["params"], 0, "ranks disagree on the dense parameters")


# 8 query heads over 2 KV heads: at tp=4 each KV head is replicated on 2 ranks (ReplicatedKVHeadLinear).
KV_REPLICATED = dict(num_attention_heads=8, num_key_value_heads=2, hidden_size=32, intermediate_size=48)


@pytest.mark.slow
def test_kv_heads_replicated_at_tp4_match_tp1():
    """Fewer KV heads than TP ranks: logits, loss and every gradient of one micro-batch, and 3 steps of
    training, against tp=1 — for Llama and for Qwen2 (k/v biases); then 3 ZeRO-3 steps. Every TP rank must
    hold the same, full gradient of the replicated k/v weights (the TP gradient rule)."""
    # eps=1e-6: see test_tp2_zero3_dp2_matches_tp1_zero3_dp2 (Adam's sign noise on ~0 gradients).
    runs = [dict(model=dict(KV_REPLICATED, **family), stage=0, micro=2, accum=1, steps=3, lr=1e-2, eps=1e-6,
                 do_probe=True, lp=0.5) for family in ({}, {"model_type": "qwen2"})]
    zero3 = dict(runs[0], stage=3, do_probe=False, micro=1, accum=2, lr=1e-3)
    ref = run_distributed(_model_worker, 1, [dict(r, tp=1) for r in runs + [zero3]])[0]
    out = run_distributed(_kv_worker, 4, [dict(r, tp=4) for r in runs + [zero3]])
    got = [o[0] for o in out]
    # The planner counts the replicated k/v on every rank (what each rank really holds).
    shape = planner.ModelShape.from_config(dict(TINY, **KV_REPLICATED))
    assert out[0][1] == planner.model_parallel_params(shape, 4, 1)
    for i, family in enumerate(("llama", "qwen2")):
        for rank in range(4):
            probe = got[rank][i]["probe"]
            np.testing.assert_allclose(probe["logits"], ref[i]["probe"]["logits"], rtol=0, atol=1e-5)
            assert probe["loss_sum"] == pytest.approx(ref[i]["probe"]["loss_sum"], rel=1e-6)
            _close(probe["grads"], ref[i]["probe"]["grads"], 1e-5, f"{family} grads, tp rank {rank}")
        assert any(np.abs(g).max() > 0 for n, g in ref[i]["probe"]["grads"].items() if "k_proj.bias" in n) \
            == (family == "qwen2")
        np.testing.assert_allclose(got[0][i]["losses"], ref[i]["losses"], rtol=1e-6)
        _close(got[0][i]["params"], ref[i]["params"], 2e-5, f"{family} params after 3 steps")
    np.testing.assert_allclose(got[0][2]["losses"], ref[2]["losses"], rtol=1e-5)
    _close(got[0][2]["params"], ref[2]["params"], 2e-5, "ZeRO-3 tp=4 params after 3 steps")


def test_kv_head_layouts_the_layout_check_accepts():
    """tp divides the KV heads (split) or is a multiple of them (replicated); anything else is one line."""
    from witscale.model import ModelConfig

    cfg = ModelConfig.from_dict(dict(TINY, num_attention_heads=12, num_key_value_heads=4, hidden_size=48))
    for tp in (1, 2, 4):
        ParallelDims(tp, tp, model=cfg)
    cfg8 = ModelConfig.from_dict(dict(TINY, num_attention_heads=8, num_key_value_heads=2))
    ParallelDims(8, 8, model=cfg8)
    with pytest.raises(LayoutError, match=r"^--tp 6 neither divides the model's key/value heads \(4\) nor is a "
                                          r"multiple of them"):
        ParallelDims(6, 6, model=cfg)
