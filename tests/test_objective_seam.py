"""The objective seam (docs/objective.md#adding-an-objective): an objective is a module plus its registration.

A toy objective defined and registered here — no other file knows it — trains through the real Trainer and
DeepSpeed engine (dense and pipeline), evaluates, and is logged under its own metric names; and trainer.py
names no objective."""
from __future__ import annotations

import math
import os
import re

import numpy as np
import pytest
import torch

from tests.conftest import REPO_ROOT
from tests.distributed import run_distributed
from tests.train_helpers import TINY, ds_config, random_packed
from witscale.training.objectives import HeadStats, Objective, register, unregister

TOY = "toy_squared_nll"


def _squared_nll_hook(fused_loss, h, labels, weights, target_classes):
    """Σ w·nll² through the fused kernel: a no-grad pass for nll, then one whose per-token weights 2·w·nll give
    the gradient (∇Σ w·nll² = Σ 2·w·nll·∇nll)."""
    with torch.no_grad():
        first = fused_loss(h, labels, weights, target_classes)
        nll, w = first.token_nll.reshape(-1).double(), weights.reshape(-1).double()
        sums = torch.stack([(w * nll * nll).sum(), (w != 0).double().sum()])
    if not torch.is_grad_enabled():
        return HeadStats(first.weighted_sum, first.class_nll_sum, first.class_count, sums)
    second = fused_loss(h, labels, (2 * w * nll).to(weights.dtype), target_classes)
    return HeadStats(second.weighted_sum, first.class_nll_sum, first.class_count, sums)


class SquaredNLL(Objective):
    """Σ w·nll² / N: a loss no built-in objective computes, through every part of the interface."""
    name = TOY
    default_lr = 3e-4
    sums = ("loss", "weighted_tokens")
    metric_tags = {"toy_weighted_tokens": "toy/weighted_tokens"}
    sweep_metrics = {"toy_weighted_tokens": False}

    def head(self, *inputs):
        return _squared_nll_hook

    def metrics(self, sums: dict, prefix: str = "") -> dict:
        return {prefix + "toy_weighted_tokens": sums["weighted_tokens"]}

    def console(self, record: dict) -> str:
        return f"toy {record['toy_weighted_tokens']:.0f} "


@pytest.fixture
def toy_registered():
    register(SquaredNLL)
    yield
    unregister(TOY)


def _independent(module, batch, denominator):
    """Σ w·nll² / N and its gradient norm from full logits in fp64 (autograd; no fused kernel, no objective)."""
    module.zero_grad(set_to_none=True)
    total = 0.0
    for mb in batch.micro_batches:
        hidden = module(mb.input_ids, mb.position_ids, mb.cu_seqlens, mb.max_seqlen)
        logits = module.compute_logits(hidden).double()
        nll = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), mb.labels.reshape(-1),
                                                ignore_index=-100, reduction="none")
        loss = (mb.weights.reshape(-1).double() * nll * nll).sum() / denominator
        loss.backward()
        total += float(loss)
    norm = math.sqrt(sum(float((p.grad.double() ** 2).sum()) for p in module.parameters() if p.grad is not None))
    module.zero_grad(set_to_none=True)
    return total, norm


def _toy_worker(rank, world, pp):
    from witscale.data.loader import PackedLoader
    from witscale.data.weighting import build_weight_table
    from witscale.model import ModelConfig
    from witscale.parallel.topology import ParallelDims, Topology
    from witscale.training.build import build_module
    from witscale.training.distributed import init_distributed
    from witscale.training.metrics import tb_tag
    from witscale.training.objectives import get_objective
    from witscale.training.trainer import Trainer

    register(SquaredNLL)        # this process's registry (a spawned rank imports this module afresh)
    init_distributed()
    cfg = ModelConfig.from_dict(TINY)
    topo = Topology(ParallelDims(world, 1, pp, 0, cfg))
    config = ds_config(0, 2, 2, topo.dp)
    table = build_weight_table(0.3, 1.0)
    data = random_packed(8, 32, cfg.vocab_size, 1)
    loader = PackedLoader(data, table, micro_batch_size=2, grad_accum=2, dp_size=topo.dp, dp_rank=topo.dp_rank,
                          shuffle=False, vocab_size=cfg.vocab_size)
    torch.manual_seed(0)
    module = build_module(cfg, topo, config, model_dir=None, seed=0)
    batch = loader.next_step()
    want = _independent(module, batch, batch.denominators["nonzero"]) if pp == 1 else None
    trainer = Trainer(module=module, ds_config=config, loader=loader, topo=topo, normalization="nonzero", lr=1e-3,
                      weight_decay=0.0, betas=(0.9, 0.999), eps=1e-8, total_steps=2, warmup_ratio=0.0,
                      objective=get_objective(TOY)())
    result = trainer.train_step(batch).as_dict()
    eval_loader = PackedLoader(data, table, micro_batch_size=2, grad_accum=1, dp_size=1, dp_rank=0, shuffle=False,
                               vocab_size=cfg.vocab_size)
    evaluated = trainer.evaluate(eval_loader)
    return {"result": result, "want": want, "eval": evaluated, "weighted_tokens": batch.denominators["nonzero"],
            "tag": tb_tag("toy_weighted_tokens"), "eval_tag": tb_tag("eval_toy_weighted_tokens")}


def test_a_toy_objective_registered_in_a_test_module_trains_through_the_trainer(toy_registered):
    """Its loss and gradient norm (one rank, ZeRO-0 fp32) equal Σ w·nll²/N and its gradient written out on full
    logits in fp64; its own sum is logged under its own name, train and eval, with its TensorBoard tag; pp=2
    gives the same step (the hook runs on the last stage). It fails if the trainer branches on objective names
    (an unknown objective would be trained as SFT: the loss would be Σ w·nll/N)."""
    (one,) = run_distributed(_toy_worker, 1, 1)
    loss, norm = one["want"]
    assert one["result"]["loss"] == pytest.approx(loss, rel=1e-5)
    assert one["result"]["grad_norm"] == pytest.approx(norm, rel=1e-4)
    assert one["result"]["toy_weighted_tokens"] == one["weighted_tokens"] > 0
    assert one["result"]["denominator"] == one["weighted_tokens"]
    assert (one["tag"], one["eval_tag"]) == ("train_toy/weighted_tokens", "eval_toy/weighted_tokens")
    assert one["eval"]["eval_toy_weighted_tokens"] > 0 and math.isfinite(one["eval"]["eval_loss"])
    pp2 = run_distributed(_toy_worker, 2, 2, timeout=400)[0]
    for key in ("loss", "grad_norm", "toy_weighted_tokens"):
        assert pp2["result"][key] == pytest.approx(one["result"][key], rel=1e-5), key
    for key in ("eval_loss", "eval_toy_weighted_tokens"):
        assert pp2["eval"][key] == pytest.approx(one["eval"][key], rel=1e-5), key


def test_a_registered_objective_is_a_choice_with_its_own_defaults(toy_registered):
    """--objective's choices, the default lr and the sweep's training metrics come from the registry."""
    from witscale.evaluation.sweep import training_metrics
    from witscale.train import build_parser
    from witscale.training.config import RunConfig

    args = build_parser().parse_args(["--data", "d", "--output-dir", "o", "--ds_config", "c", "--model-config", "m",
                                      "--objective", TOY])
    cfg = RunConfig.from_args(args)
    assert (cfg.objective, cfg.lr) == (TOY, 3e-4)
    assert training_metrics()["toy_weighted_tokens"] is False


OBJECTIVE_WORDS = {"dpo", "sft", "simpo", "orpo", "ipo", "preference", "reward", "rewards", "pair", "pairs"}


def objective_words(path: str) -> list[str]:
    """The identifiers of a Python file with an objective's word among their parts (snake_case, CamelCase)."""
    import io
    import tokenize

    with open(path, encoding="utf-8") as f:
        names = {t.string for t in tokenize.generate_tokens(io.StringIO(f.read()).readline)
                 if t.type == tokenize.NAME}
    return sorted(n for n in names
                  if {w.lower() for w in re.findall(r"[A-Z]+(?![a-z])|[A-Z]?[a-z0-9]+", n)} & OBJECTIVE_WORDS)


def test_trainer_names_no_objective():
    """witscale/training/trainer.py asks the objective (docs/objective.md#adding-an-objective): no identifier of
    it names one (the file named DPO 44 times before the seam)."""
    assert objective_words(os.path.join(REPO_ROOT, "witscale", "training", "trainer.py")) == []
