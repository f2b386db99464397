"""--learn-weights (witscale/training/learned_weights.py, docs/objective.md#learned-weights): the first-order
validation hypergradient against finite differences, the λ update, and what the trainer does with it."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from tests.conftest import REPO_ROOT
from tests.distributed import run_distributed
from tests.test_train_cli_operations import _cli, _env, run_inputs  # noqa: F401  (run_inputs: a fixture)
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
    learner.update(np.array([0.0]))                # no information (η = 0): skipped, the RMS not diluted
    assert learner.lam[0] == 2.0 and learner.updates == 51
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
    with pytest.raises(ValueError, match="--sp"):
        check_layout(0, 1, "nonzero", sp=2)
    with pytest.raises(ValueError, match="pad"):
        parse_learn_classes("pad")
    with pytest.raises(ValueError, match="different weights"):
        WeightLearner(parse_learn_classes(""), build_weight_table(0.5, 1.0, {TokenClass.SYSTEM: 0.2}),
                      validation_table(""), None)


# --- through the CLI: logging, checkpoints, resume, export, refusals --------------------------------------


def _learn_args(inputs, out, *extra, ds="zero0"):
    return ["--ds_config", f"ds_configs/{ds}.json", "--data", inputs["train"], "--model-config", inputs["config"],
            "--output-dir", str(out), "--prompt-weight", "0.3", "--micro-batch-size", "2", "--grad-accum", "2",
            "--lr", "3e-3", "--max-steps", "6", "--seed", "7", "--eval-data", inputs["eval"], "--learn-weights",
            "--weights-every", "2", "--weights-lr", "0.3", "--no-tensorboard", *extra]


def _train(args, **env):
    res = subprocess.run([sys.executable, "witscale/train.py", *args], cwd=REPO_ROOT, env=_env(**env),
                         capture_output=True, text=True, timeout=600)
    return res.returncode, res.stdout + res.stderr


def _records(out):
    return [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl")) if '"loss"' in line]


@pytest.mark.slow
def test_learned_weights_are_logged_saved_exported_and_resume_bit_exact(run_inputs, tmp_path):
    ref = tmp_path / "ref"
    code, log = _train(_learn_args(run_inputs, ref, "--save-steps", "3", "--export-hf", str(ref / "hf"),
                                   "--tokenizer", run_inputs["tokenizer"]))
    assert code == 0, log
    records = _records(ref)
    lambdas = [r["lambda_prompt_side"] for r in records]
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5, 6] and len(set(lambdas)) > 1, lambdas
    assert f"λ_prompt_side {lambdas[-1]:.4g}" in log        # the console line
    tag = (ref / "checkpoints" / "latest").read_text().strip()
    state = json.load(open(ref / "checkpoints" / tag / "witscale_state.json"))
    assert state["learned_weights"]["lambda"] == [lambdas[-1]] and state["learned_weights"]["updates"] == 3
    meta = json.load(open(ref / "hf" / "witscale.json"))
    assert meta["learned_weights"]["lambda_prompt_side"] == lambdas[-1]
    assert meta["weights"]["prompt"] == pytest.approx(lambdas[-1], rel=1e-6) and meta["weights"]["response"] == 1.0
    # tools/export_hf.py from the last checkpoint records the same learned weights (not the run's starting ones)
    res = subprocess.run([sys.executable, "tools/export_hf.py", str(ref / "checkpoints"), str(tmp_path / "offline"),
                          "--tokenizer", run_inputs["tokenizer"]], cwd=REPO_ROOT, env=_env(), capture_output=True,
                         text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    offline = json.load(open(tmp_path / "offline" / "witscale.json"))
    assert offline["learned_weights"] == meta["learned_weights"]
    assert offline["weights"] == pytest.approx(meta["weights"], rel=1e-6)
    # A run that dies after the step-3 checkpoint and resumes: the same losses and λ, bit for bit.
    run = tmp_path / "resumed"
    code, _ = _train(_learn_args(run_inputs, run, "--save-steps", "3"), WITSCALE_FAULT="raise_in_step:4")
    assert code != 0
    code, log = _train(_learn_args(run_inputs, run, "--save-steps", "3", "--resume", "auto"))
    assert code == 0, log
    resumed = {r["step"]: r for r in _records(run)}
    for r in records:
        assert resumed[r["step"]]["loss"] == r["loss"], r["step"]
        assert resumed[r["step"]]["lambda_prompt_side"] == r["lambda_prompt_side"], r["step"]
    # Resuming it without --learn-weights would silently train on the flags' weights: refused in one line.
    args = [a for a in _learn_args(run_inputs, run, "--max-steps", "8", "--reschedule", "--resume", "auto")
            if a != "--learn-weights"]
    for flag in ("--weights-every", "--weights-lr"):
        i = args.index(flag)
        del args[i:i + 2]
    code, log = _train(args)
    assert code == 2 and "learned its class weights (--learn-weights); without --learn-weights" in log, log[-2000:]


@pytest.mark.parametrize("change,message", [
    ({"--eval-data": None}, "--learn-weights needs --eval-data"),
    ({"--ds_config": "ds_configs/zero3.json"}, "--learn-weights does not support ZeRO-3"),
    ({"--normalization": "weight_sum"}, "--learn-weights needs --normalization nonzero or tokens"),
    ({"--learn-classes": "answer"}, "--learn-classes: unknown token class 'answer'"),
    ({"--weights-objective": "pad=0"}, "--weights-objective"),
])
def test_learn_weights_refusals_are_one_line(run_inputs, tmp_path, change, message, capsys):
    args = _learn_args(run_inputs, tmp_path)
    for flag, value in change.items():
        if flag not in args:
            args += [flag, value]
            continue
        i = args.index(flag)
        args[i + 1:i + 2] = [] if value is None else [value]
        if value is None:
            del args[i]
    code, err = _cli(args, capsys)
    assert code == 2
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0], err


def test_learned_weight_settings_without_learn_weights_are_refused(run_inputs, tmp_path, capsys):
    args = _learn_args(run_inputs, tmp_path)
    args.remove("--learn-weights")
    code, err = _cli(args, capsys)
    assert code == 2 and err == ["error: --weights-every, --weights-lr apply with --learn-weights only"], err


# --- layouts: dp2 against one rank; the engine's own accumulation undisturbed ------------------------------


class _DataParallel:
    tp = 1

    def __init__(self, world):
        self.dp = world

    def tp_group_or_none(self):
        return None

    def get_data_parallel_group(self):
        return torch.distributed.group.WORLD


def _hyper_setup():
    table = build_weight_table(0.5, 1.0)
    data = random_packed(6, 40, TINY["vocab_size"], seed=3)
    val_data = random_packed(4, 40, TINY["vocab_size"], seed=9)
    loader = PackedLoader(data, table, micro_batch_size=3, grad_accum=1, shuffle=False)
    val_loader = PackedLoader(val_data, table, micro_batch_size=2, grad_accum=1, shuffle=False)
    learner = WeightLearner(parse_learn_classes("prompt,eot"), table, validation_table(""), val_loader)
    denominator = float((loader.make_micro_batch(range(6)).weights > 0).sum())     # `nonzero` over the global batch
    return _model(), learner, loader, denominator


def _hyper_worker(rank, world):
    model, learner, loader, denominator = _hyper_setup()
    mb = loader.make_micro_batch(range(3 * rank, 3 * rank + 3))      # this rank's half of the global batch
    return learner.hypergradient(model, mb, learner.val_micro_batch(), eta=1e-3, denominator=denominator,
                                 per_step=world, topo=_DataParallel(world)).tolist()


@pytest.mark.slow
def test_dp2_hypergradient_equals_one_rank_over_the_same_global_batch():
    model, learner, loader, denominator = _hyper_setup()
    one = learner.hypergradient(model, loader.make_micro_batch(range(6)), learner.val_micro_batch(), eta=1e-3,
                                denominator=denominator, per_step=1, topo=_OneRank())
    ranks = run_distributed(_hyper_worker, 2)
    assert ranks[0] == ranks[1]
    np.testing.assert_allclose(ranks[0], one, rtol=1e-6)
    assert np.abs(one).min() > 0


def _learn_worker(rank, world, stage, learner_lr, steps=3):
    """Train ``steps`` steps (micro-batch 1 × grad-accum 2 per rank) with no learner (learner_lr None) or one that
    measures h every step and moves λ by learner_lr (0: measured but never applied)."""
    from witscale.parallel.topology import ParallelDims, Topology
    from witscale.training.build import build_module
    from witscale.training.distributed import init_distributed
    from witscale.training.trainer import Trainer
    from tests.train_helpers import ds_config

    init_distributed()
    cfg = ModelConfig.from_dict(TINY)
    topo = Topology(ParallelDims(world, 1, 1, stage, cfg))
    config = ds_config(stage, 1, 2, topo.dp)
    torch.manual_seed(0)
    module = build_module(cfg, topo, config, model_dir=None, seed=0)
    table = build_weight_table(0.2, 1.0)
    loader = PackedLoader(random_packed(8, 48, cfg.vocab_size, 1), table, micro_batch_size=1, grad_accum=2,
                          dp_size=topo.dp, dp_rank=topo.dp_rank, seed=0)
    learner = None
    if learner_lr is not None:
        val_loader = PackedLoader(random_packed(3, 48, cfg.vocab_size, 5), table, micro_batch_size=2,
                                  grad_accum=1, shuffle=False)
        learner = WeightLearner(parse_learn_classes(""), table, validation_table(""), val_loader, every=1,
                                lr=learner_lr)
    trainer = Trainer(module=module, ds_config=config, loader=loader, topo=topo, normalization="nonzero", lr=1e-3,
                      weight_decay=0.0, betas=(0.9, 0.999), eps=1e-8, total_steps=steps, warmup_ratio=0.0,
                      weight_learner=learner)
    results = [trainer.train_step(loader.next_step()) for _ in range(steps)]
    return {"losses": [r.loss for r in results], "lambdas": [r.learned_weights for r in results],
            "params": {k: v.numpy() for k, v in trainer.full_dense_state_dict().items()}}


@pytest.mark.slow
@pytest.mark.parametrize("stage,world", [(0, 1), (1, 2), (2, 2)])
def test_measuring_the_hypergradient_does_not_disturb_the_step(stage, world):
    """α = 0: h is measured every step (extra forwards and autograd.grad on the engine's module) but λ never
    moves — the run is bit-identical to one without --learn-weights: DeepSpeed's accumulation is untouched."""
    off = run_distributed(_learn_worker, world, stage, None, timeout=600)
    measured = run_distributed(_learn_worker, world, stage, 0.0, timeout=600)
    learned = run_distributed(_learn_worker, world, stage, 0.5, timeout=600)
    for a, b in zip(off, measured):
        assert a["losses"] == b["losses"]
        for name in a["params"]:
            assert np.array_equal(a["params"][name], b["params"][name]), name
    assert all(r["lambdas"][-1]["lambda_prompt_side"] == float(np.float32(0.2)) for r in measured)
    # ... and with α > 0 λ moves, the same on every rank, and the next steps train on it
    assert learned[0]["lambdas"] == learned[-1]["lambdas"]
    assert learned[0]["lambdas"][0]["lambda_prompt_side"] != float(np.float32(0.2))
    assert learned[0]["losses"][0] == off[0]["losses"][0] and learned[0]["losses"][1:] != off[0]["losses"][1:]


def _tp_worker(rank, world):
    """h on a module built for tp = world (dp 1) from the same seed: the same dense weights, sharded."""
    from witscale.parallel.topology import ParallelDims, Topology
    from witscale.training.build import build_module
    from witscale.training.distributed import init_distributed
    from tests.train_helpers import ds_config

    init_distributed()
    cfg = ModelConfig.from_dict(TINY)
    topo = Topology(ParallelDims(world, world, 1, 0, cfg))
    module = build_module(cfg, topo, ds_config(0, 1, 1, 1), model_dir=None, seed=0)
    _, learner, loader, denominator = _hyper_setup()
    return learner.hypergradient(module, loader.make_micro_batch(range(6)), learner.val_micro_batch(), eta=1e-3,
                                 denominator=denominator, per_step=1, topo=topo).tolist()


@pytest.mark.slow
def test_tp2_hypergradient_equals_one_rank():
    """Dot products over TP shards summed, replicated parameters (norms) counted once."""
    one = run_distributed(_tp_worker, 1)[0]
    tp2 = run_distributed(_tp_worker, 2)
    assert tp2[0] == tp2[1]
    np.testing.assert_allclose(tp2[0], one, rtol=1e-4)
    assert np.abs(one).min() > 0
