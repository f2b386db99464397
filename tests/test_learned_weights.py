"""--learn-weights (witscale/training/learned_weights.py, docs/objective.md#learned-weights): the first-order
validation hypergradient against finite differences, the λ update, and what the trainer does with it."""
import numpy as np
import pytest
import torch

from tests.train_helpers import TINY, random_packed
from witscale.data.classes import PROMPT_SIDE, TokenClass
from witscale.data.loader import PackedLoader
from witscale.data.weighting import build_weight_table
from witscale.model import CausalLM, ModelConfig, load_model_weights
from witscale.training.learned_weights import (WeightLearner, check_layout, parse_learn_classes,
                                               validation_table)


class _OneRank:
    dp, tp = 1, 1

    def tp_group_or_none(self):
        return None


def _model(seed=0):
    cfg = ModelConfig.from_dict(TINY)
    model = CausalLM(cfg)
    load_model_weights(model, cfg, model_dir=None, seed=seed)
    return model.double()


def _loss(model, mb, weights, denominator):
    stats = model(mb.input_ids, mb.position_ids, mb.cu_seqlens, mb.max_seqlen, mb.labels, weights,
                  mb.target_classes)
    return stats.weighted_sum / denominator


def _val_loss_after_step(model, train_mb, table, denominator, val_mb, val_w, eta):
    """L_val(θ⁺), θ⁺ = θ − η ∇L_tr(θ; table): one plain SGD step, computed exactly (then θ restored)."""
    params = list(model.parameters())
    weights = torch.as_tensor(table, dtype=torch.float32)[train_mb.target_classes]
    weights = torch.where(train_mb.labels == -100, torch.zeros_like(weights), weights)
    grads = torch.autograd.grad(_loss(model, train_mb, weights, denominator), params)
    saved = [p.detach().clone() for p in params]
    with torch.no_grad():
        for p, g in zip(params, grads):
            p -= eta * g
        out = float(_loss(model, val_mb, val_w, float((val_w > 0).sum())))
        for p, s in zip(params, saved):
            p.copy_(s)
    return out


@pytest.mark.parametrize("learn", ["", "prompt,eot"])
def test_hypergradient_equals_finite_difference_at_one_rank(learn):
    torch.manual_seed(0)
    model = _model()
    groups = parse_learn_classes(learn)
    table = build_weight_table(0.5, 1.0)
    data = random_packed(6, 40, TINY["vocab_size"], seed=3)
    val_data = random_packed(4, 40, TINY["vocab_size"], seed=9)
    loader = PackedLoader(data, table, micro_batch_size=3, grad_accum=1, shuffle=False)
    val_loader = PackedLoader(val_data, table, micro_batch_size=2, grad_accum=1, shuffle=False)
    learner = WeightLearner(groups, table, validation_table(""), val_loader, every=1, lr=0.1)
    train_mb = loader.make_micro_batch([0, 1, 2])
    val_mb = learner.val_micro_batch()
    denominator = float((train_mb.weights > 0).sum())           # `nonzero`: the same for every λ > 0
    eta = 1e-3
    h = learner.hypergradient(model, train_mb, val_mb, eta=eta, denominator=denominator, per_step=1,
                              topo=_OneRank())
    val_w = torch.as_tensor(learner.val_table)[val_mb.target_classes]
    val_w = torch.where(val_mb.labels == -100, torch.zeros_like(val_w), val_w)
    # The model runs in fp64, but the fused loss kernel's softmax is fp32 whatever the dtype: ε = 0.1 keeps the
    # difference far above its rounding (L_val(θ⁺(λ)) is smooth in λ: the central difference's error is O(ε²)).
    eps = 0.1
    for i, g in enumerate(groups):
        cls = list(g.classes)
        plus, minus = table.copy(), table.copy()
        plus[cls] += eps
        minus[cls] -= eps
        fd = (_val_loss_after_step(model, train_mb, plus, denominator, val_mb, val_w, eta)
              - _val_loss_after_step(model, train_mb, minus, denominator, val_mb, val_w, eta)) / (2 * eps)
        print(f"group {g.name}: hypergradient {h[i]:.6e} finite difference {fd:.6e} "
              f"relative error {abs(h[i] - fd) / abs(fd):.2e}")
        assert abs(fd) > 0
        assert h[i] == pytest.approx(fd, rel=0.05), g.name


def test_update_moves_lambda_against_the_hypergradient_within_bounds():
    table = build_weight_table(0.0, 1.0)           # λp = 0 starts at the lower bound (log-space needs > 0)
    learner = WeightLearner(parse_learn_classes(""), table, validation_table(""), None, every=10, lr=0.5,
                            bounds=(0.01, 2.0))
    assert learner.lam.tolist() == [0.01]
    learner.update(np.array([-3e-7]))              # negative h: a larger λ lowers the validation loss
    assert learner.lam[0] == pytest.approx(0.01 * np.exp(0.5))    # ĥ = −1 after the first RMS
    for _ in range(50):
        learner.update(np.array([-3e-7]))
    assert learner.lam[0] == 2.0                   # clamped
    learner.update(np.array([np.nan]))             # skipped
    assert learner.lam[0] == 2.0
    applied = learner.apply(table)
    assert all(applied[int(c)] == 2.0 for c in PROMPT_SIDE) and applied[int(TokenClass.RESPONSE)] == 1.0
    assert [learner.due(s) for s in (1, 2, 10, 11, 21)] == [True, False, False, True, True]


def test_refusals_name_what_is_missing():
    with pytest.raises(ValueError, match="ZeRO-3"):
        check_layout(3, 1, "nonzero")
    with pytest.raises(ValueError, match="--pp"):
        check_layout(0, 2, "nonzero")
    with pytest.raises(ValueError, match="weight_sum"):
        check_layout(0, 1, "weight_sum")
    with pytest.raises(ValueError, match="pad"):
        parse_learn_classes("pad")
    with pytest.raises(ValueError, match="different weights"):
        WeightLearner(parse_learn_classes(""), build_weight_table(0.5, 1.0, {TokenClass.SYSTEM: 0.2}),
                      validation_table(""), None)
