"""Ulysses sequence parallelism (--sp) on real gloo ranks through the Trainer and DeepSpeed's engine: sp=2
against sp=1 on rows whose documents cross the shard cut; the layouts not built yet refused in one line."""
import json
import os

import numpy as np
import pytest

from tests import test_train_cli_operations as operations
from tests.distributed import run_distributed
from tests.train_helpers import TINY, random_packed, train_worker
from witscale.parallel.topology import LayoutError, ParallelDims

# 4 query heads over 2 KV heads (GQA: one KV head per sp rank); 1 KV head: replicated to the 2 sp ranks.
SEQ_LEN, DATA_SEED = 48, 1
run_inputs = operations.run_inputs      # the session fixture: packed data, a tiny Llama config, the tokenizer


def _worker(rank, world, runs):
    return [train_worker(rank, world, **kw) for kw in runs]


def _crossing_documents(rows: int) -> int:
    """Documents that start in a row's first half and end in its second: the cut at sp=2."""
    data = random_packed(rows, SEQ_LEN, TINY["vocab_size"], DATA_SEED)
    n = 0
    for r in range(rows):
        ends = np.cumsum(data.doc_lengths(r))
        n += int(((ends - data.doc_lengths(r) < SEQ_LEN // 2) & (ends > SEQ_LEN // 2)).sum())
    return n


@pytest.mark.slow
def test_sp2_matches_sp1_zero0():
    """Logits, loss and every gradient of one micro-batch, then 3 optimizer steps (losses, gradient norms,
    parameters): sp=2 (2 ranks, dp=1) against sp=1 (1 rank), fp32 ZeRO-0, for GQA (2 KV heads: one per sp rank)
    and for 1 KV head (replicated to both sp ranks)."""
    assert _crossing_documents(8) >= 3
    runs = [dict(model=model, stage=0, micro=2, accum=2, steps=3, lr=1e-3, eps=1e-6, do_probe=True, lp=0.5,
                 seq_len=SEQ_LEN, data_seed=DATA_SEED, with_weights=True)
            for model in ({}, {"num_key_value_heads": 1})]
    # Long rows (issue 24): rows twice as long, the loader reading only each sp rank's part (train.py's), in the
    # same launches (tests/test_long_rows.py: its micro-batches are byte-equal to the whole rows cut).
    runs.append(dict(runs[0], seq_len=2 * SEQ_LEN, do_probe=False, evaluate=True, shard_loader=True))
    ref = run_distributed(_worker, 1, [dict(r, sp=1) for r in runs])[0]
    out = run_distributed(_worker, 2, [dict(r, sp=2) for r in runs])
    _assert_sharded_loader_run(out, ref)
    for i, what in enumerate(("GQA 4/2", "1 KV head")):
        want = ref[i]
        logits = np.concatenate([out[0][i]["probe"]["logits"], out[1][i]["probe"]["logits"]], axis=1)
        np.testing.assert_allclose(logits, want["probe"]["logits"], rtol=1e-6, atol=1e-6, err_msg=what)
        loss_sum = out[0][i]["probe"]["loss_sum"] + out[1][i]["probe"]["loss_sum"]
        assert loss_sum == pytest.approx(want["probe"]["loss_sum"], rel=1e-6), what
        for rank in (0, 1):
            got = out[rank][i]
            # Two shards' partial sums against one sum: fp32 rounding, 1e-6 of each tensor's scale.
            for name, g in want["probe"]["grads"].items():
                np.testing.assert_allclose(got["probe"]["grads"][name], g, rtol=1e-6, atol=1e-6 * np.abs(g).max(),
                                           err_msg=f"{what}: {name}")
            np.testing.assert_allclose(got["losses"], want["losses"], rtol=1e-6, err_msg=what)
            np.testing.assert_allclose([r["grad_norm"] for r in got["results"]],
                                       [r["grad_norm"] for r in want["results"]], rtol=1e-6, err_msg=what)
            # Adam turns fp32 rounding of a ~0 gradient into a step of up to ±lr (see the tp tests): 1e-5 after 3 steps.
            for name, p in want["params"].items():
                np.testing.assert_allclose(got["params"][name], p, rtol=0, atol=1e-5, err_msg=f"{what}: {name}")


def _assert_sharded_loader_run(out: list, ref: list) -> None:
    """Run 2 of test_sp2_matches_sp1_zero0: sp 2 with each rank reading its part of the rows (and of the
    evaluation's) trains and evaluates as one rank: 3 steps' losses, gradient norms, parameters, the evaluation."""
    want = ref[2]
    for rank in (0, 1):
        sharded = out[rank][2]
        for key, value in want["eval"].items():
            assert sharded["eval"][key] == pytest.approx(value, rel=1e-6), f"rank {rank}: {key}"
        np.testing.assert_allclose(sharded["losses"], want["losses"], rtol=1e-6, err_msg=f"rank {rank}")
        np.testing.assert_allclose([r["grad_norm"] for r in sharded["results"]],
                                   [r["grad_norm"] for r in want["results"]], rtol=1e-6, err_msg=f"rank {rank}")
        for name, p in want["params"].items():
            np.testing.assert_allclose(sharded["params"][name], p, rtol=0, atol=1e-5, err_msg=f"rank {rank}: {name}")


# 8 heads / 4 KV heads: at tp=2 × sp=2 each rank attends over 2 query heads and 1 KV head of the whole rows.
TP_MODEL = dict(num_attention_heads=8, num_key_value_heads=4, hidden_size=32, intermediate_size=48)


@pytest.mark.slow
def test_sp2_tp2_matches_sp1_tp1_zero0():
    """sp=2 × tp=2 (4 ranks, dp=1) against one rank: logits, loss and gradients of one micro-batch, then 3
    optimizer steps (losses, gradient norms, parameters); every rank must hold the same dense parameters."""
    run = dict(model=TP_MODEL, stage=0, micro=2, accum=2, steps=3, lr=1e-3, eps=1e-6, do_probe=True, lp=0.5,
               seq_len=SEQ_LEN, data_seed=DATA_SEED, with_weights=True)
    want = run_distributed(_worker, 1, [run])[0][0]
    out = [o[0] for o in run_distributed(_worker, 4, [dict(run, tp=2, sp=2)])]
    # Rank order: tp fastest, then sp — ranks 0 and 2 hold the two halves of the rows.
    logits = np.concatenate([out[0]["probe"]["logits"], out[2]["probe"]["logits"]], axis=1)
    np.testing.assert_allclose(logits, want["probe"]["logits"], rtol=1e-6, atol=1e-6)
    assert out[0]["probe"]["loss_sum"] + out[2]["probe"]["loss_sum"] == pytest.approx(want["probe"]["loss_sum"],
                                                                                     rel=1e-6)
    for rank, got in enumerate(out):
        for name, g in want["probe"]["grads"].items():
            np.testing.assert_allclose(got["probe"]["grads"][name], g, rtol=1e-6, atol=1e-6 * np.abs(g).max(),
                                       err_msg=f"rank {rank}: {name}")
        np.testing.assert_allclose(got["losses"], want["losses"], rtol=1e-6)
        np.testing.assert_allclose([r["grad_norm"] for r in got["results"]],
                                   [r["grad_norm"] for r in want["results"]], rtol=1e-6)
        for name, p in want["params"].items():
            np.testing.assert_allclose(got["params"][name], p, rtol=0, atol=1e-5, err_msg=f"rank {rank}: {name}")



def _assert_same_steps(out: list, want: dict) -> None:
    """Every rank's 3 steps equal the reference run's. The first step is the same sums in another order (the
    gradient norm too: Adam would hide a wrong scale); later steps differ by fp32 summation order through Adam
    (~1e-6), as in the tp × ZeRO-3 test."""
    norms = lambda run: [r["grad_norm"] for r in run["results"]]  # noqa: E731
    for rank, got in enumerate(out):
        assert got["losses"][0] == pytest.approx(want["losses"][0], rel=1e-7)
        assert norms(got)[0] == pytest.approx(norms(want)[0], rel=1e-6), (norms(got), norms(want))
        np.testing.assert_allclose(got["losses"], want["losses"], rtol=1e-5, err_msg=f"rank {rank}")
        np.testing.assert_allclose(norms(got), norms(want), rtol=1e-5, err_msg=f"rank {rank}")
        for name, p in want["params"].items():
            np.testing.assert_allclose(got["params"][name], p, rtol=0, atol=1e-5, err_msg=f"rank {rank}: {name}")

@pytest.mark.slow
def test_zero3_dp2_sp2_matches_zero3_dp2():
    """ZeRO-3 partitioned over dp × sp (4 ranks) against ZeRO-3 over dp=2 alone: 3 steps' losses and the
    dense parameters gathered from the dp × sp partitions (the export's gather)."""
    run = dict(stage=3, micro=1, accum=2, steps=3, lr=1e-3, eps=1e-6, lp=0.5, seq_len=SEQ_LEN,
               data_seed=DATA_SEED, with_weights=True)
    want = run_distributed(_worker, 2, [run])[0][0]
    out = [o[0] for o in run_distributed(_worker, 4, [dict(run, sp=2)])]
    _assert_same_steps(out, want)


@pytest.mark.slow
@pytest.mark.parametrize("stage, world", [(1, 2), (2, 4)])
def test_zero1_zero2_sp2_match_sp1(stage, world):
    """ZeRO-1 sp2 × dp1 (2 ranks) against one rank and ZeRO-2 dp2 × sp2 (4 ranks) against dp2: 3 steps' losses,
    gradient norms and parameters. DeepSpeed's stage 1/2 optimizer partitions and averages over its dp group,
    here dp × sp (the mpu offers no sp size, so it divides by the whole group on every path): the loss scale
    dp × sp / N gives the sp1 gradient."""
    run = dict(stage=stage, micro=2, accum=2, steps=3, lr=1e-3, eps=1e-6, lp=0.5, seq_len=SEQ_LEN,
               data_seed=DATA_SEED, with_weights=True)
    want = run_distributed(_worker, world // 2, [run])[0][0]
    out = [o[0] for o in run_distributed(_worker, world, [dict(run, sp=2)])]
    _assert_same_steps(out, want)


@pytest.mark.parametrize("dims, message", [
    (dict(world_size=4, pp=2, sp=2), r"^--sp 2 is not supported with --pp 2 "),
    (dict(world_size=6, sp=4), r"^world size 6 is not divisible by tp × sp × pp = 1 × 4 × 1 = 4$"),
])
def test_untested_sp_layouts_are_refused_in_one_line(dims, message):
    with pytest.raises(LayoutError, match=message):
        ParallelDims(**dims)


def test_sp_must_divide_the_heads_per_rank():
    from witscale.model import ModelConfig

    cfg = ModelConfig.from_dict(dict(TINY, num_attention_heads=6, num_key_value_heads=2, hidden_size=48))
    ParallelDims(2, sp=2, model=cfg)            # 3 query heads per sp rank, one KV head each
    with pytest.raises(LayoutError, match=r"^--sp 4 does not divide the model's attention heads per TP rank "
                                          r"\(6 / tp 1 = 6\)$"):
        ParallelDims(4, sp=4, model=cfg)
    cfg3 = ModelConfig.from_dict(dict(TINY, num_attention_heads=6, num_key_value_heads=3, hidden_size=48))
    with pytest.raises(LayoutError, match=r"^--sp 2 neither divides the model's key/value heads per TP rank \(3\)"):
        ParallelDims(2, sp=2, model=cfg3)


def _pair_runs():
    """DPO with λp 0.3 (so weighted prompt tokens of a completion lie on both sides of the cut), SimPO (label
    smoothing), ORPO under weight_sum (λp 0.3) and under tokens (its per-completion position count is one more
    sum over the sp ranks)."""
    from tests.test_simpo_orpo import _objectives, _table
    from witscale.training.objectives.orpo import ORPO, ORPOSettings
    runs = _objectives()
    return {"dpo": dict(table=_table(0.3)), "simpo": runs["simpo"], "orpo": runs["orpo"],
            "orpo tokens": dict(objective=ORPO(ORPOSettings(lam=0.5, normalization="tokens")))}


@pytest.mark.slow
def test_pair_objectives_sp2_equal_sp1():
    """DPO, SimPO and ORPO at sp 2 (2 ranks, ZeRO-0: every row cut in two, completions crossing the cut)
    against one rank: 3 steps' losses, rewards, accuracy, gradient norms, parameters and the evaluation. Each
    completion's log-prob, token count and weight sum are added over the sp ranks inside the head's hook; the
    pair terms are counted once (sp rank 0)."""
    from tests.test_dpo import SEQ, _layouts, _same_run, layout_data, micro_batch
    from tests.test_simpo_orpo import _table
    rows, refs = layout_data(3)
    crossing = 0
    for row, ref in zip(rows, refs):
        mb = micro_batch([row], SEQ, _table(0.3), reference=ref)
        weighted = [{int(d) for d, w in zip(mb.doc_index[0, part], mb.weights[0, part]) if d >= 0 and w != 0}
                    for part in (slice(0, SEQ // 2), slice(SEQ // 2, SEQ))]
        crossing += len(weighted[0] & weighted[1])
    assert crossing >= 2, "completions with weighted tokens on both sides of the cut"
    runs = _pair_runs()
    want = run_distributed(_layouts, 1, list(runs.values()))[0]
    out = run_distributed(_layouts, 2, [dict(r, sp=2) for r in runs.values()], timeout=600)
    for rank in (0, 1):
        for i, name in enumerate(runs):
            _same_run(out[rank][i], want[i], f"{name} sp=2 rank {rank}")
            for a, b in zip(out[rank][i]["results"], want[i]["results"]):
                for key in ("sft_loss", "log_odds_ratio") if name.startswith("orpo") else ():
                    assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-6), f"{name}: {key}"


def test_pair_objectives_are_accepted_under_sp():
    from witscale.training.objectives import registered
    from witscale.training.trainer import check_sequence_parallel_objective

    for cls in registered():
        objective = cls()
        group = object()
        check_sequence_parallel_objective(objective, 2, group)
        check_sequence_parallel_objective(objective, 1)
        if objective.sums:                   # the pair objectives: their completions' sums added over the group
            assert objective.sequence_group is group


@pytest.mark.parametrize("change, message", [
    ({"--sp": "2"}, None),                                     # ZeRO-0, 2 ranks: dp 1 × sp 2
    ({"--sp": "2", "--ds_config": "ds_configs/zero1.json"}, None),
    ({"--sp": "3"}, "world size 2 is not divisible by tp × sp × pp = 1 × 3 × 1 = 3"),
    ({"--sp": "0"}, "--sp 0 is out of range"),
])
def test_sp_flag_is_planned_or_refused_in_one_line(run_inputs, tmp_path, change, message):
    from witscale.train import UsageError, build_parser, plan_run
    from witscale.training.config import RunConfig

    args = dict(zip(*[iter(operations._args(run_inputs, tmp_path, 2))] * 2))
    args.update({"--ds_config": "ds_configs/zero0.json", **change})

    def planned():
        return plan_run(RunConfig.from_args(build_parser().parse_args([x for kv in args.items() for x in kv])), 2)

    if message is None:
        plan = planned()
        assert (plan.dims.sp, plan.dims.dp) == (2, 1)
        return
    with pytest.raises((UsageError, ValueError, SystemExit)) as e:
        planned()
    assert message in str(e.value) and "\n" not in str(e.value), e.value


@pytest.mark.parametrize("saved, mine", [({"sp": 2}, {}), ({}, {"sp": 2}), ({"sp": 2}, {"sp": 4}),
                                         ({"dp": 2}, {"sp": 2})])
@pytest.mark.parametrize("stage", [0, 1, 3])
def test_resume_on_another_sp_is_a_layout_change(saved, mine, stage):
    """Another sp is another data-parallel world for ZeRO (dp × sp): a layout change, as another dp is."""
    from witscale.training.checkpoint import layout_change

    base = {"dp": 1, "tp": 1, "pp": 1}
    assert layout_change({"layout": dict(base, **saved)}, dict(base, **mine), where="x", zero_stage=stage) is True
    assert layout_change({"layout": dict(base, **saved)}, dict(base, **saved), where="x", zero_stage=stage) is False


def test_another_sp_with_another_pp_or_tp_at_zero0_is_refused_in_one_line():
    from witscale.training.checkpoint import CheckpointError, layout_change

    saved = {"layout": {"dp": 1, "sp": 2, "tp": 1, "pp": 1}}
    with pytest.raises(CheckpointError, match=r"^c was written at dp=1 sp=2 tp=1 pp=1; this run is dp=1 sp=1 tp=1 "
                                              r"pp=2: resuming on another layout under pipeline parallelism"):
        layout_change(saved, {"dp": 1, "tp": 1, "pp": 2}, where="c", zero_stage=1)
    with pytest.raises(CheckpointError, match=r"^c was written at dp=1 sp=2 tp=1 pp=1; this run is dp=1 sp=1 tp=2 "
                                              r"pp=1: another tp needs DeepSpeed's universal checkpoint"):
        layout_change(saved, {"dp": 1, "tp": 2, "pp": 1}, where="c", zero_stage=0)


def test_the_conversion_step_converts_for_another_sp(tmp_path):
    """witscale.training.layout_conversion (the Slurm job step before training) decides as the trainer does: a
    checkpoint written at sp 2 resumed at sp 1 (or dp 2 at dp 1 × sp 2) needs its universal checkpoint."""
    from witscale.training.layout_conversion import conversion_needed

    tag = tmp_path / "checkpoints" / "step_00000002"
    tag.mkdir(parents=True)
    (tmp_path / "checkpoints" / "latest").write_text("step_00000002")
    for saved, mine in (({"dp": 1, "sp": 2}, {"dp": 1}), ({"dp": 2}, {"dp": 1, "sp": 2})):
        (tag / "witscale_state.json").write_text(json.dumps({"layout": dict(saved, tp=1, pp=1)}))
        assert conversion_needed(str(tmp_path), "auto", dict(mine, tp=1, pp=1), 1) == (str(tag.parent), tag.name)
        assert conversion_needed(str(tmp_path), "auto", dict(saved, tp=1, pp=1), 1) is None


def test_each_step_reads_the_same_rows_whatever_the_split_between_dp_and_sp():
    """The loader is keyed by dp_rank over dp ranks, and the sp peers of a group share their dp_rank: each step's
    rows are the same at dp 2 × sp 1 (grad-accum 2), dp 1 × sp 2 and sp 1 (grad-accum 4) — what a resume across
    sp sizes relies on (the data position is kept in global batches)."""
    from witscale.data.loader import PackedLoader
    from witscale.data.weighting import build_weight_table

    data, table = random_packed(16, SEQ_LEN, TINY["vocab_size"], DATA_SEED), build_weight_table(0.5, 1.0)

    def step_rows(world, sp, accum):
        dims = ParallelDims(world, sp=sp)
        rows = [[] for _ in range(6)]
        for rank in range(world):
            _, dp_rank, _ = dims.coords(rank)
            loader = PackedLoader(data, table, micro_batch_size=1, grad_accum=accum, dp_size=dims.dp,
                                  dp_rank=dp_rank, seed=3)
            for step in range(6):       # 1½ epochs
                mine = sorted(int(r) for mb in loader.next_step().micro_batches for r in mb.rows)
                rows[step].append(mine)
        return rows

    dp2 = step_rows(2, 1, 2)
    sp2, sp1 = step_rows(2, 2, 4), step_rows(1, 1, 4)
    for step in range(6):
        assert sp2[step][0] == sp2[step][1], step                  # the sp peers read the same rows
        assert sorted(dp2[step][0] + dp2[step][1]) == sp2[step][0] == sp1[step][0], step


RESUME_STEPS = 4


def _resume_job(rank, world, *, stage, sp, accum, out, resume=None, save_at=None):
    """Train to step RESUME_STEPS at dp × sp = world (micro-batch 1, grad-accum ``accum``), saving step ``save_at``
    under ``out``; ``resume``: first continue from that checkpoint (Trainer.resume: train.py's path, the
    universal conversion included). Returns each step's loss and gradient norm and the final dense weights."""
    import torch

    from witscale.data.loader import PackedLoader
    from witscale.data.weighting import build_weight_table
    from witscale.model import ModelConfig
    from witscale.parallel.topology import ParallelDims, Topology
    from witscale.training.build import build_module
    from witscale.training.trainer import Trainer
    from tests.train_helpers import ds_config

    cfg = ModelConfig.from_dict(TINY)
    topo = Topology(ParallelDims(world, 1, 1, stage, cfg, sp=sp))
    config = ds_config(stage, 1, accum, topo.dp)
    torch.manual_seed(0)
    module = build_module(cfg, topo, config, model_dir=None, seed=0)
    loader = PackedLoader(random_packed(8, SEQ_LEN, cfg.vocab_size, DATA_SEED, True), build_weight_table(0.5, 1.0),
                          micro_batch_size=1, grad_accum=accum, dp_size=topo.dp, dp_rank=topo.dp_rank, seed=0)
    trainer = Trainer(module=module, ds_config=config, loader=loader, topo=topo, normalization="nonzero", lr=1e-3,
                      weight_decay=0.0, betas=(0.9, 0.999), eps=1e-6, total_steps=RESUME_STEPS, warmup_ratio=0.0)
    root, prints = os.path.join(out, "checkpoints"), dict(data_fingerprint="d", model_fingerprint="m")
    if resume:
        trainer.resume(resume, root, **prints)
    steps = {}
    while trainer.step < RESUME_STEPS:
        result = trainer.train_step(loader.next_step())
        steps[trainer.step] = (result.loss, result.grad_norm)
        if trainer.step == save_at:
            trainer.save_checkpoint(root, keep=0, **prints)
    return {"steps": steps, "params": {k: v.numpy() for k, v in trainer.full_dense_state_dict().items()}}


def _resume_worker(rank, world, jobs):
    from witscale.training.distributed import init_distributed
    init_distributed()
    return [_resume_job(rank, world, **job) for job in jobs]


@pytest.mark.slow
def test_resume_across_sp_sizes_equals_the_uninterrupted_run(tmp_path):
    """ZeRO-0, 1 and 3, 4 steps of a global batch of 4 rows, one chain per stage: the uninterrupted run at
    dp 2 × sp 1; its step 1 resumed at dp 1 × sp 2 (2 ranks, grad-accum doubled); that run's step 2 at sp 1 (one
    rank); that run's step 3 at sp 2 again. Each continues the uninterrupted run's losses and gradient norms
    (rtol 1e-5, as the dp and tp layout changes: tests/test_checkpoint_layout.py) and ends at its weights, so
    the weights, Adam moments and data position went through DeepSpeed's universal checkpoint (ZeRO ≥ 1; ZeRO-0's
    files hold the whole state) of the dp × sp partitions."""
    stages = (0, 1, 3)
    run = lambda name, stage: str(tmp_path / f"{name}{stage}")  # noqa: E731
    tag = lambda name, stage, step: f"{run(name, stage)}/checkpoints/step_{step:08d}"  # noqa: E731
    first = run_distributed(_resume_worker, 2, [j for s in stages for j in (
        dict(stage=s, sp=1, accum=2, out=run("dp2", s), save_at=1),
        dict(stage=s, sp=2, accum=4, out=run("sp2", s), resume=tag("dp2", s, 1), save_at=2))], timeout=600)[0]
    sp1 = run_distributed(_resume_worker, 1, [
        dict(stage=s, sp=1, accum=4, out=run("sp1", s), resume=tag("sp2", s, 2), save_at=3) for s in stages],
        timeout=600)[0]
    back = run_distributed(_resume_worker, 2, [
        dict(stage=s, sp=2, accum=4, out=run("back", s), resume=tag("sp1", s, 3)) for s in stages], timeout=600)[0]
    for i, stage in enumerate(stages):
        want = first[2 * i]
        assert sorted(want["steps"]) == [1, 2, 3, 4]
        for what, got, start in (("dp2 sp1 -> dp1 sp2", first[2 * i + 1], 2), ("sp2 -> sp1", sp1[i], 3),
                                 ("sp1 -> sp2", back[i], 4)):
            what = f"ZeRO-{stage} {what}"
            assert sorted(got["steps"]) == list(range(start, RESUME_STEPS + 1)), what
            for step, (loss, norm) in got["steps"].items():
                assert loss == pytest.approx(want["steps"][step][0], rel=1e-5, abs=0), (what, step)
                assert norm == pytest.approx(want["steps"][step][1], rel=1e-5, abs=0), (what, step)
            for name, p in want["params"].items():
                np.testing.assert_allclose(got["params"][name], p, rtol=0, atol=1e-5, err_msg=f"{what}: {name}")
        for name, step in (("dp2", 1), ("sp2", 2), ("sp1", 3)):
            assert os.path.isdir(f"{tag(name, stage, step)}/universal") == (stage > 0), (stage, name)


@pytest.mark.slow
def test_sp2_cli_run_trains_saves_evaluates_and_exports_as_sp1(run_inputs, tmp_path):
    """witscale/train.py end to end, --sp 2 on 2 ranks (ZeRO-3: partitions over dp × sp) against one process:
    the same losses, eval loss, and HF export; the checkpoint records sp."""
    import subprocess
    import sys

    import torch
    from safetensors.torch import load_file

    common = lambda out: operations._args(  # noqa: E731
        run_inputs, out, 3, "--export-hf", str(out / "hf"), "--export-dtype", "fp32", "--eval-data",
        run_inputs["eval"], "--save-steps", "3")
    single = subprocess.run([sys.executable, "witscale/train.py", *common(tmp_path / "sp1")],
                            cwd=operations.REPO_ROOT, env=operations._env(), capture_output=True, text=True,
                            timeout=300)
    assert single.returncode == 0, single.stdout[-2000:] + single.stderr[-2000:]
    code, log = operations._torchrun([*common(tmp_path / "sp2"), "--sp", "2"])
    assert code == 0, log[-4000:]
    assert "sp 2" in log
    want, got = operations._train_losses(tmp_path / "sp1"), operations._train_losses(tmp_path / "sp2")
    assert got.keys() == want.keys() and len(want) == 3
    for step in want:
        assert got[step] == pytest.approx(want[step], rel=1e-5), step
    evals = [[json.loads(line)["eval_loss"] for line in open(tmp_path / run / "metrics.jsonl")
              if "eval_loss" in line] for run in ("sp1", "sp2")]
    assert evals[0] and evals[1] == pytest.approx(evals[0], rel=1e-5)
    a = load_file(tmp_path / "sp1" / "hf" / "model.safetensors")
    b = load_file(tmp_path / "sp2" / "hf" / "model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=0, atol=2e-5, msg=k)
    state = json.load(open(next((tmp_path / "sp2" / "checkpoints").glob("step_*/witscale_state.json"))))
    assert state["layout"]["sp"] == 2


def test_planner_counts_one_sp_shard_of_the_row():
    """Layout.sp: each rank keeps the activations of seq_len / sp tokens; ZeRO-3 partitions over dp × sp."""
    from witscale import planner

    shape = planner.ModelShape.from_config(dict(TINY, num_hidden_layers=4))
    sharded = planner.estimate(shape, planner.Layout(tp=1, pp=1, dp=2, zero=3, sp=2), seq_len=4096, micro_batch=1)
    half_row = planner.estimate(shape, planner.Layout(tp=1, pp=1, dp=4, zero=3), seq_len=2048, micro_batch=1)
    # The same, but for the one tensor Ulysses adds: attention's output exists twice (the kernel's, over the
    # whole row with heads/sp, and o_proj's input after the all-to-all back), measured by the memory probe
    # (tests/test_planner_activations.py): 2048 tokens × q × 2 bytes more, in the recomputed layer's backward.
    q = shape.num_attention_heads * shape.hd
    assert sharded.activation_gib * planner.GIB == pytest.approx(half_row.activation_gib * planner.GIB + 2048 * q * 2)
    assert (sharded.param_gib, sharded.grad_gib, sharded.optim_gib) == (half_row.param_gib, half_row.grad_gib,
                                                                        half_row.optim_gib)
    assert planner.Layout(dp=2, sp=2).world == 4 and "sp2" in planner.Layout(dp=2, sp=2).name()


def test_sp_tp_group_must_fit_in_a_node(run_inputs, tmp_path, monkeypatch):
    """An sp × tp group larger than a node (its all-to-alls over the network) is refused in one line where the
    node size is known: ParallelDims(gpus_per_node=…), tools/plan.py --gpus-per-node, torchrun's LOCAL_WORLD_SIZE."""
    import subprocess
    import sys

    from tests.conftest import REPO_ROOT
    from witscale.train import UsageError, build_parser, plan_run
    from witscale.training.config import RunConfig

    ParallelDims(16, tp=4, sp=2, gpus_per_node=8)
    ParallelDims(64, tp=8, sp=8)                       # node size not known: not checked
    with pytest.raises(LayoutError, match=r"^--sp 4 × --tp 4 = 16 ranks exceed the 8 GPUs of a node: an sp × tp "
                                          r"group must stay inside one node$"):
        ParallelDims(16, tp=4, sp=4, gpus_per_node=8)
    plan = subprocess.run([sys.executable, "tools/plan.py", "--model", "70B", "--gpus", "64", "--seq-len", "131072",
                           "--tp", "8", "--sp", "8"], cwd=REPO_ROOT, capture_output=True, text=True)
    assert plan.returncode == 2 and plan.stdout == "", plan
    assert plan.stderr == ("tools/plan.py: --sp 8 × --tp 8 = 64 ranks exceed the 8 GPUs of a node: an sp × tp "
                           "group must stay inside one node\n")
    args = dict(zip(*[iter(operations._args(run_inputs, tmp_path, 2))] * 2))
    args.update({"--ds_config": "ds_configs/zero0.json", "--sp": "2"})
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")        # two nodes of one process each
    with pytest.raises(UsageError, match=r"^--sp 2 × --tp 1 = 2 ranks exceed the 1 GPUs of a node"):
        plan_run(RunConfig.from_args(build_parser().parse_args([x for kv in args.items() for x in kv])), 2)
