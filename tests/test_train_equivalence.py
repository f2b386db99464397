"""The objective over the global batch, whatever the layout: real DeepSpeed engines on real gloo ranks."""
import numpy as np
import pytest
import torch

from tests.distributed import run_distributed
from tests.train_helpers import TINY, random_packed, train_worker

pytestmark = pytest.mark.slow  # gloo ranks (tests/distributed.py)


def _worker(rank, world, runs):
    # Several configurations in one spawn: DeepSpeed start-up dominates the cost of these tiny runs.
    return [train_worker(rank, world, **kw) for kw in runs]


def _assert_params_close(a, b, atol=1e-5, what=""):
    assert a.keys() == b.keys()
    for name in a:
        np.testing.assert_allclose(a[name], b[name], rtol=0, atol=atol, err_msg=f"{what}: {name}")


def test_dp2_accum2_equals_dp1_accum4_for_every_normalization():
    """The test that catches per-micro-batch or per-rank normalization (the gradient accumulation bug)."""
    norms = ["nonzero", "weight_sum", "tokens"]
    common = dict(stage=0, micro=1, steps=1, with_weights=True, lp=0.3, lr_w=1.0, lr=1e-2)
    one = run_distributed(_worker, 1, [dict(common, accum=4, normalization=n) for n in norms])[0]
    two = run_distributed(_worker, 2, [dict(common, accum=2, normalization=n) for n in norms])
    for i, norm in enumerate(norms):
        assert one[i]["losses"] == pytest.approx(two[0][i]["losses"], rel=1e-6)
        assert one[i]["results"][0]["denominator"] == two[0][i]["results"][0]["denominator"]
        _assert_params_close(one[i]["params"], two[0][i]["params"], what=norm)
        _assert_params_close(two[0][i]["params"], two[1][i]["params"], atol=0, what="replicas differ")
    # The three normalizations really differ (otherwise the test above proves little).
    assert len({round(r["losses"][0], 6) for r in one}) == 3


def test_zero_stages_agree_for_five_steps():
    runs = [dict(stage=s, micro=1, accum=2, steps=5, lr=1e-2) for s in (0, 1, 2, 3)]
    out = run_distributed(_worker, 2, runs)[0]
    ref = out[0]["losses"]
    assert ref[-1] < ref[0]
    for stage, res in zip((1, 2, 3), out[1:]):
        np.testing.assert_allclose(res["losses"], ref, rtol=1e-6, err_msg=f"ZeRO-{stage} vs ZeRO-0")
        _assert_params_close(res["params"], out[0]["params"], atol=2e-5, what=f"ZeRO-{stage}")


def _scale_worker(rank, world):
    base = dict(stage=0, micro=2, accum=1, steps=3, normalization="nonzero", lr=1e-2, eps=1e-16)
    a = train_worker(rank, world, **base, lp=0.2, lr_w=0.4)
    b = train_worker(rank, world, **base, lp=0.4, lr_w=0.8)
    # A threshold between the two runs' gradient norms clips only the scaled-up run.
    clip = 1.5 * a["results"][0]["grad_norm"]
    ca = train_worker(rank, world, **base, lp=0.2, lr_w=0.4, clip=clip)
    cb = train_worker(rank, world, **base, lp=0.4, lr_w=0.8, clip=clip)
    return a, b, ca, cb


def test_weight_scale_invariance_needs_no_clipping():
    """nonzero normalization, no clipping: (0.2, 0.4) and (0.4, 0.8) give the same AdamW updates.
    Adam is invariant to a constant gradient scale except through eps; a tiny eps removes that term."""
    a, b, ca, cb = run_distributed(_scale_worker, 1)[0]
    assert b["losses"][0] == pytest.approx(2 * a["losses"][0], rel=1e-6)
    assert b["results"][0]["grad_norm"] == pytest.approx(2 * a["results"][0]["grad_norm"], rel=1e-5)
    _assert_params_close(a["params"], b["params"], atol=1e-6, what="scale invariance")
    _assert_params_close(a["params"], ca["params"], atol=0, what="clip above the norm changes nothing")
    diff = max(np.abs(ca["params"][k] - cb["params"][k]).max() for k in ca["params"])
    assert diff > 1e-4, "with clipping, the absolute weight scale should change the updates"


def _independent_loss(model, data, table, rows, normalization):
    """docs/objective.md#formula written out directly: full logits, log-softmax, weights of predicted tokens, N."""
    total, n_nonzero, w_sum, n_tokens = 0.0, 0, 0.0, 0
    for r in rows:
        tokens, classes = data.tokens[r], data.classes[r]
        start = 0
        for length in data.doc_lengths(r):
            doc = torch.tensor(tokens[start:start + length], dtype=torch.long)[None]
            pos = torch.arange(length)[None]
            cu = torch.tensor([0, length], dtype=torch.int32)
            with torch.no_grad():
                logp = torch.log_softmax(model.compute_logits(model(doc, pos, cu, length)).double(), -1)[0]
            for t in range(1, length):                       # token t predicted from the tokens before it
                w = float(table[classes[start + t]])
                n_tokens += 1
                w_sum += w
                n_nonzero += w > 0
                total -= w * float(logp[t - 1, tokens[start + t]])
            start += length
    denominator = {"nonzero": n_nonzero, "weight_sum": w_sum, "tokens": n_tokens}[normalization]
    return total / denominator


def _formula_worker(rank, world, normalization):
    from witscale.data.loader import PackedLoader
    from witscale.data.weighting import build_weight_table
    from witscale.training.distributed import init_distributed
    from witscale.model import ModelConfig
    from witscale.training.build import build_module
    from witscale.parallel.topology import ParallelDims, Topology
    from witscale.training.trainer import Trainer
    from tests.train_helpers import ds_config

    init_distributed()
    cfg = ModelConfig.from_dict(TINY)
    topo = Topology(ParallelDims(1, model=cfg))
    module = build_module(cfg, topo, ds_config(0, 1, 3, 1), model_dir=None, seed=3)
    data = random_packed(6, 40, cfg.vocab_size, seed=5)
    table = build_weight_table(0.25, 1.0)
    loader = PackedLoader(data, table, micro_batch_size=1, grad_accum=3, seed=0)
    rows = loader.global_batch_rows(0, 0)
    expected = _independent_loss(module, data, table, rows, normalization)
    trainer = Trainer(module=module, ds_config=ds_config(0, 1, 3, 1), loader=loader, topo=topo,
                      normalization=normalization, lr=1e-3, weight_decay=0.0, betas=(0.9, 0.999), eps=1e-8,
                      total_steps=1, warmup_ratio=0.0)
    return expected, trainer.train_step(loader.next_step()).loss


@pytest.mark.parametrize("normalization", ["nonzero", "weight_sum", "tokens"])
def test_loss_equals_the_papers_formula(normalization):
    expected, got = run_distributed(_formula_worker, 1, normalization)[0]
    assert got == pytest.approx(expected, rel=1e-5)
