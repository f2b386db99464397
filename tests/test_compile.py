"""--compile: each decoder block compiled in place (witscale/model/transformer.py ``compile_decoder_blocks``).

- a compiled model equals the eager one (loss statistics and every gradient, to fp32 tolerance), with and
  without activation checkpointing, over micro-batches of different document layouts (new shapes);
- each block is compiled exactly once, the parameter names (checkpoints, export) are unchanged;
- the layouts it does not support (ZeRO-3, --pp) are refused in one line before anything starts;
- slow (gloo ranks): through the real Trainer and DeepSpeed (ZeRO-0, one rank, with and without activation
  checkpointing; tp=2), with inductor, three steps equal eager, and a resumed run's blocks are compiled once
  and continue as the uninterrupted run; the CLI's --compile compiles every block (its log line).

The in-process tests use the ``aot_eager`` backend (dynamo's tracing, graph breaks and AOTAutograd's
forward/backward split, without inductor's C++ build, which takes minutes on a loaded CPU); the Trainer tests
use inductor, the default, which ``--compile`` runs.
"""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from tests import test_train_cli_operations as operations
from tests.distributed import run_distributed
from tests.train_helpers import TINY, ds_config, random_packed

_args = operations._args
run_inputs = operations.run_inputs      # the session fixture: packed data, a tiny Llama config, the tokenizer

LAYOUTS = ([[10, 20, 18], [30, 18]], [[5, 43], [48]], [[12, 12, 12, 12], [40, 8]])


def _tiny(**overrides):
    from witscale.model import CausalLM, ModelConfig, load_model_weights
    cfg = ModelConfig.from_dict(dict(TINY, **overrides))
    model = CausalLM(cfg)
    load_model_weights(model, cfg, model_dir=None, seed=0)
    return model


def _loss_and_grads(model, docs, seed):
    from witscale.model.transformer import packed_positions
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, model.config.vocab_size, (2, 48), generator=g)
    pos, cu, mx = packed_positions(docs, 48)
    weights = torch.rand(2, 48, generator=g)
    model.zero_grad()
    stats = model(ids, pos, cu, mx, ids, weights)
    stats.weighted_sum.backward()
    return float(stats.weighted_sum.detach()), {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("family", ["llama", "gemma2"])
def test_compiled_blocks_equal_eager_with_and_without_checkpointing(family):
    from witscale.model.transformer import compile_decoder_blocks
    overrides = {} if family == "llama" else dict(
        model_type="gemma2", head_dim=8, query_pre_attn_scalar=8, sliding_window=16,
        hidden_activation="gelu_pytorch_tanh",
        attn_logit_softcapping=50.0, final_logit_softcapping=30.0)
    eager = _tiny(**overrides)
    compiled = copy.deepcopy(eager)
    assert compile_decoder_blocks(compiled, backend="aot_eager") == 2
    for checkpointing in (False, True):
        eager.set_activation_checkpointing(checkpointing)
        compiled.set_activation_checkpointing(checkpointing)
        for i, docs in enumerate(LAYOUTS):
            want_loss, want = _loss_and_grads(eager, docs, i)
            got_loss, got = _loss_and_grads(compiled, docs, i)
            assert got_loss == pytest.approx(want_loss, rel=1e-5), (checkpointing, docs)
            for name in want:
                torch.testing.assert_close(got[name], want[name], rtol=1e-4, atol=1e-5,
                                           msg=lambda m: f"{name} (checkpointing {checkpointing}): {m}")


def test_each_block_is_compiled_once_and_keeps_its_names():
    from witscale.model.transformer import compile_decoder_blocks, compiled_block_count
    model = _tiny()
    names = list(model.state_dict())
    assert compiled_block_count(model) == 0
    assert compile_decoder_blocks(model, backend="aot_eager") == 2
    first = [layer._compiled_call_impl for layer in model.model.layers]
    assert compile_decoder_blocks(model, backend="aot_eager") == 0        # again: nothing wrapped twice
    assert [layer._compiled_call_impl for layer in model.model.layers] == first
    assert compiled_block_count(model) == 2
    assert list(model.state_dict()) == names                               # no _orig_mod. prefix


@pytest.mark.parametrize("ds,extra,world,message", [
    ("ds_configs/zero3.json", [], 1, "not with ZeRO-3: its parameter-gathering hooks"),
    ("ds_configs/pipeline.json", ["--pp", "2"], 2, "not with --pp: DeepSpeed's pipeline engine"),
])
def test_compile_is_refused_in_one_line_with_zero3_and_pp(run_inputs, tmp_path, ds, extra, world, message):
    from witscale.train import UsageError, build_parser, plan_run
    from witscale.training.config import RunConfig
    argv = _args(run_inputs, tmp_path, 2, *extra)
    argv[argv.index("--ds_config") + 1] = ds

    def planned(*more):
        return plan_run(RunConfig.from_args(build_parser().parse_args(argv + list(more))), world)

    with pytest.raises(UsageError) as e:
        planned("--compile")
    assert str(e.value).startswith(f"--compile with {ds}: {message}") and "\n" not in str(e.value), e.value
    assert planned().config.compile is False                   # the same layout without --compile plans
    argv[argv.index("--ds_config") + 1] = "ds_configs/zero2.json"
    if "--pp" in argv:
        argv[argv.index("--pp") + 1] = "1"
    assert planned("--compile").config.compile is True       # ZeRO-0..2 without pp: accepted


def test_compile_is_refused_in_one_line_with_sp(run_inputs, tmp_path):
    from witscale.train import UsageError, build_parser, plan_run
    from witscale.training.config import RunConfig
    argv = _args(run_inputs, tmp_path, 2, "--sp", "2")
    argv[argv.index("--ds_config") + 1] = "ds_configs/zero0.json"

    def planned(*more):
        return plan_run(RunConfig.from_args(build_parser().parse_args(argv + list(more))), 2)

    with pytest.raises(UsageError) as e:
        planned("--compile")
    assert str(e.value).startswith("--compile with ds_configs/zero0.json: not with --sp") and "\n" not in str(e.value)
    assert planned().config.compile is False                   # the same layout without --compile plans


def compile_worker(rank, world, *, compile_blocks, tp=1, stage=0, steps=3, ckpt=None, checkpointing=False):
    """``steps`` Trainer steps (ZeRO ``stage``, tp ``tp``); with ``ckpt``, a checkpoint after them, a resumed
    second trainer, and one more step from each."""
    from witscale.data.loader import PackedLoader
    from witscale.data.weighting import build_weight_table
    from witscale.model import ModelConfig
    from witscale.model.transformer import compile_decoder_blocks, compiled_block_count
    from witscale.parallel.topology import ParallelDims, Topology
    from witscale.training.build import build_module
    from witscale.training.distributed import init_distributed
    from witscale.training.trainer import Trainer

    init_distributed()
    cfg = ModelConfig.from_dict(TINY)
    topo = Topology(ParallelDims(world, tp, 1, stage, cfg))
    config = ds_config(stage, 2, 2, topo.dp)
    data = random_packed(16, 48, cfg.vocab_size, 1, with_weights=True)

    def trainer():
        torch.manual_seed(0)
        module = build_module(cfg, topo, config, model_dir=None, seed=0, compile_blocks=compile_blocks,
                              activation_checkpointing=checkpointing)
        loader = PackedLoader(data, build_weight_table(0.2, 1.0), micro_batch_size=2, grad_accum=2, dp_size=topo.dp,
                              dp_rank=topo.dp_rank, seed=0)
        return Trainer(module=module, ds_config=config, loader=loader, topo=topo, normalization="nonzero", lr=1e-2,
                       weight_decay=0.0, betas=(0.9, 0.999), eps=1e-8, total_steps=steps + 1, warmup_ratio=0.0)

    first = trainer()
    results = [first.train_step(first.loader.next_step()).as_dict() for _ in range(steps)]
    out = {"results": results, "params": {k: v.numpy() for k, v in first.full_dense_state_dict().items()},
           "compiled": compiled_block_count(first.engine.module)}
    if ckpt:
        first.save_checkpoint(ckpt, keep=2, data_fingerprint="d", model_fingerprint="m")
        resumed = trainer()
        resumed.resume("auto", ckpt, data_fingerprint="d", model_fingerprint="m")
        out["compiled_after_resume"] = compiled_block_count(resumed.engine.module)
        out["recompiled_after_resume"] = compile_decoder_blocks(resumed.engine.module)
        out["next"] = [t.train_step(t.loader.next_step()).as_dict()["loss"] for t in (first, resumed)]
    return out


def _same_training(got, want, atol=1e-5):
    for a, b in zip(got["results"], want["results"]):
        for key in ("loss", "grad_norm"):
            assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-6), key
    for name in want["params"]:
        np.testing.assert_allclose(got["params"][name], want["params"][name], rtol=0, atol=atol, err_msg=name)


def _runs(rank, world, runs):
    return [compile_worker(rank, world, **kw) for kw in runs]


@pytest.mark.slow
def test_trainer_with_compiled_blocks_equals_eager_and_resumes_compiled_once(tmp_path):
    eager, compiled, checkpointed = run_distributed(
        _runs, 1, [dict(compile_blocks=False), dict(compile_blocks=True, ckpt=str(tmp_path / "ckpt")),
                   dict(compile_blocks=True, checkpointing=True)], timeout=900)[0]
    assert eager["compiled"] == 0 and compiled["compiled"] == TINY["num_hidden_layers"]
    _same_training(compiled, eager)
    _same_training(checkpointed, eager)         # the compiled block recomputed in backward
    assert compiled["compiled_after_resume"] == TINY["num_hidden_layers"]
    assert compiled["recompiled_after_resume"] == 0
    continued, resumed = compiled["next"]
    assert resumed == pytest.approx(continued, rel=1e-6)


@pytest.mark.slow
def test_tp2_with_compiled_blocks_equals_eager():
    ranks = run_distributed(_runs, 2, [dict(compile_blocks=False, tp=2), dict(compile_blocks=True, tp=2)],
                            timeout=900)
    eager, compiled = ranks[0]
    assert compiled["compiled"] == TINY["num_hidden_layers"]
    _same_training(compiled, eager)


@pytest.mark.slow
def test_the_cli_flag_compiles_every_block_and_trains_as_eager(run_inputs, tmp_path):
    """One process through witscale/train.py, ZeRO-1: --compile logs its compiled blocks and gives eager's
    per-step losses."""
    import subprocess
    import sys

    from tests.conftest import REPO_ROOT
    losses, logs = {}, {}
    for name, extra in (("eager", []), ("compiled", ["--compile"])):
        out = tmp_path / name
        res = subprocess.run([sys.executable, "witscale/train.py",
                              *_args(run_inputs, out, 2, "--ds_config", "ds_configs/zero1.json", *extra)],
                             cwd=REPO_ROOT, env=operations._env(), capture_output=True, text=True, timeout=600)
        assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
        losses[name], logs[name] = operations._train_losses(str(out)), res.stdout + res.stderr
    assert "--compile: 2 decoder blocks compiled" in logs["compiled"]
    assert "decoder blocks compiled" not in logs["eager"]
    assert losses["compiled"].keys() == losses["eager"].keys() and losses["eager"]
    for step, loss in losses["eager"].items():
        assert losses["compiled"][step] == pytest.approx(loss, rel=1e-5), step
