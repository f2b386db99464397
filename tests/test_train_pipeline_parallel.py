"""Pipeline parallelism (--pp): the same objective, gradients and weights as without pipelining.

Real PipelineEngines (1F1B, gloo p2p) on real ranks, against the non-pipelined Trainer on one rank.
"""

import numpy as np
import pytest
import torch

from tests.distributed import run_distributed
from tests.test_train_cli_operations import run_inputs  # noqa: F401 - the packed data fixture
from tests.train_helpers import TINY, ds_config, random_packed, train_worker


def pipe_worker(rank, world, *, tp=1, pp=2, stage=0, micro=1, accum=4, steps=2, normalization="nonzero", lp=0.3,
                lr=1e-2, clip=0.0, seed=0, rows=16, seq_len=48, with_weights=True, model=None, data_seed=1,
                activation_checkpointing=False, partition="uniform", resume_dir=None, tp_sequence_parallel=False):
    """Train ``steps`` steps on a tp × pp × dp layout with the Trainer; return losses, dense params.
    With ``resume_dir``: save after ``steps // 2`` steps, finish, then restore into a fresh engine and
    redo the second half (returned as ``resumed``)."""
    from witscale.training import checkpoint
    from witscale.data.loader import PackedLoader
    from witscale.data.weighting import build_weight_table
    from witscale.training.distributed import init_distributed
    from witscale.model import ModelConfig
    from witscale.training.build import build_module
    from witscale.parallel.topology import ParallelDims, Topology
    from witscale.training.trainer import Trainer

    init_distributed()
    cfg = ModelConfig.from_dict(dict(TINY, **(model or {})))
    topo = Topology(ParallelDims(world, tp, pp, stage, cfg))
    data = random_packed(rows, seq_len, cfg.vocab_size, data_seed, with_weights)

    def fresh():
        torch.manual_seed(seed)
        module = build_module(cfg, topo, ds_config(stage, micro, accum, topo.dp, clip), model_dir=None, seed=seed,
                              pp_partition=partition, activation_checkpointing=activation_checkpointing,
                              tp_sequence_parallel=tp_sequence_parallel)
        loader = PackedLoader(data, build_weight_table(lp, 1.0), micro_batch_size=micro, grad_accum=accum,
                              dp_size=topo.dp, dp_rank=topo.dp_rank, seed=seed)
        trainer = Trainer(module=module, ds_config=ds_config(stage, micro, accum, topo.dp, clip),
                          loader=loader, topo=topo, normalization=normalization, lr=lr, weight_decay=0.0,
                          betas=(0.9, 0.999), eps=1e-8, total_steps=steps, warmup_ratio=0.0,
                          activation_checkpointing=activation_checkpointing)
        return trainer, loader

    trainer, loader = fresh()
    results, resumed = [], None
    for i in range(steps):
        results.append(trainer.train_step(loader.next_step()))
        if resume_dir and i + 1 == steps // 2:
            checkpoint.save(trainer.engine, resume_dir, trainer.step, {"step": trainer.step,
                                                                       "loader": loader.state_dict()}, keep=1)
    params = trainer.full_dense_state_dict()
    if resume_dir:
        trainer, loader = fresh()
        state = checkpoint.load(trainer.engine, resume_dir, checkpoint.read_latest(resume_dir))
        trainer.step = state["step"]
        loader.load_state_dict(state["loader"])
        resumed = [trainer.train_step(loader.next_step()).loss for _ in range(steps - trainer.step)]
        resumed_params = trainer.full_dense_state_dict()
        resumed = {"losses": resumed, "params": {k: v.numpy() for k, v in resumed_params.items()}}
    return {"losses": [r.loss for r in results], "results": [r.as_dict() for r in results],
            "agg_loss": float(trainer.engine.agg_train_loss), "stage": topo.pp_rank,
            "params": {k: v.numpy() for k, v in params.items()}, "resumed": resumed}


def _many(rank, world, fn, runs):
    # Several configurations per spawn: process start-up dominates these tiny runs.
    return [fn(rank, world, **kw) for kw in runs]


def _close(a, b, atol=2e-5, what=""):
    assert a.keys() == b.keys(), f"{what}: {sorted(set(a) ^ set(b))}"
    for name in a:
        np.testing.assert_allclose(a[name], b[name], rtol=0, atol=atol, err_msg=f"{what}: {name}")


NORMS = ["nonzero", "weight_sum", "tokens"]
REF_RUN = dict(stage=0, micro=1, accum=4, steps=2, normalization="nonzero", lp=0.3, lr=1e-2, rows=16,
               with_weights=True)


@pytest.fixture(scope="module")
def reference():
    """pp=1, one rank, accum 4: the non-pipelined Trainer for each normalization, and tied embeddings."""
    runs = [dict(REF_RUN, normalization=n) for n in NORMS]
    runs.append(dict(runs[0], model={"tie_word_embeddings": True}))
    return run_distributed(_many, 1, train_worker, runs)[0]


@pytest.mark.slow
def test_pp2_equals_pp1_for_every_normalization(reference, tmp_path):
    """Loss, denominator and weights after 2 optimizer steps of grad-accum 4 through the 1F1B schedule.
    Also: activation checkpointing (the 'tokens' run), tied embeddings, and an exact resume."""
    runs = [dict(normalization="nonzero", resume_dir=str(tmp_path / "ckpt"), steps=4),
            dict(normalization="weight_sum"),
            dict(normalization="tokens", activation_checkpointing=True),
            dict(normalization="nonzero", model={"tie_word_embeddings": True})]
    out = run_distributed(_many, 2, pipe_worker, runs, timeout=300)
    first, last = out
    assert [r["stage"] for r in first] == [0] * 4 and [r["stage"] for r in last] == [1] * 4
    for i, ref in enumerate(reference):
        got = last[i]
        n = len(ref["losses"])
        np.testing.assert_allclose(got["losses"][:n], ref["losses"], rtol=1e-6, err_msg=f"run {i}")
        assert got["losses"] == first[i]["losses"], "every stage reports the same loss"
        for a, b in zip(got["results"], ref["results"]):
            assert a["denominator"] == b["denominator"]
            assert a["response_nll"] == pytest.approx(b["response_nll"], rel=1e-6)
            assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-5)
        if i != 0:      # run 0 trained 4 steps (for the resume); its 2-step weights are not returned
            _close(got["params"], ref["params"], what=f"run {i}")
            _close(first[i]["params"], got["params"], atol=0, what="stages disagree on the export")
            # DeepSpeed's own aggregate (after ×gas, ÷gas, dp mean) is the same number.
            assert got["agg_loss"] == pytest.approx(got["losses"][-1], rel=1e-5)
    assert len({round(reference[i]["losses"][0], 6) for i in range(3)}) == 3, "normalizations must differ"
    # Resume: a fresh engine loaded from the step-2 checkpoint redoes steps 3-4 exactly.
    for rank in (first[0], last[0]):
        assert rank["resumed"]["losses"] == rank["losses"][2:]
        _close(rank["resumed"]["params"], rank["params"], atol=0, what="resumed")


def _layouts_worker(rank, world):
    # 4 ranks: tp2 × pp2 (ZeRO-0), then pp2 × dp2 (ZeRO-1, accum 2 so that the global batch is the same); then
    # tp2 × pp2 again with --tp-sequence-parallel and recomputed blocks (the stages carry 1/tp of the rows).
    return [pipe_worker(rank, world, tp=2, pp=2, stage=0, accum=4, normalization="nonzero"),
            pipe_worker(rank, world, tp=1, pp=2, stage=1, accum=2, normalization="nonzero"),
            pipe_worker(rank, world, tp=2, pp=2, stage=0, accum=4, normalization="nonzero",
                        tp_sequence_parallel=True, activation_checkpointing=True)]


@pytest.mark.slow
def test_tp2_pp2_and_pp2_dp2_zero1_equal_one_rank(reference):
    out = run_distributed(_layouts_worker, 4, timeout=400)
    # At lr 1e-2 the TP split itself (float32 sums in another order, then Adam) moves a few weights by up
    # to 5e-4 against tp=1; so tp2×pp2's weights are held to the non-pipelined tp=2 run, its loss to tp=1.
    tp2 = run_distributed(_many, 2, train_worker, [dict(REF_RUN, tp=2)])[0][0]
    ref = reference[0]
    for layout, res, want in zip(("tp2×pp2", "pp2×dp2 ZeRO-1"), zip(*out), (tp2, ref)):
        for r in res:
            np.testing.assert_allclose(r["losses"], ref["losses"], rtol=1e-5, err_msg=layout)
            _close(r["params"], want["params"], what=layout)
            for a, b in zip(r["results"], want["results"]):
                assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-5), layout
    # tp2 × pp2 with --tp-sequence-parallel equals it without (same sums in another order: fp32 rounding).
    for rank, res in enumerate(out):
        without, with_sp = res[0], res[2]
        np.testing.assert_allclose(with_sp["losses"], without["losses"], rtol=1e-6, err_msg=f"rank {rank}")
        np.testing.assert_allclose([r["grad_norm"] for r in with_sp["results"]],
                                   [r["grad_norm"] for r in without["results"]], rtol=1e-6, err_msg=f"rank {rank}")
        _close(with_sp["params"], without["params"], atol=1e-5, what=f"tp2×pp2 --tp-sequence-parallel rank {rank}")


@pytest.mark.slow
def test_pp2_clips_by_the_true_global_norm(reference):
    """Clipping under pp=2 uses the norm of the WHOLE model (replicated norm weights on the last stage
    included): a threshold below the one-rank norm changes the update exactly as on one rank, and the
    logged norm is the one-rank norm. ZeRO-0 (witscale's GlobalNormClipping: DeepSpeed's own ZeRO-0
    clipping would count the last stage's replicated weights nowhere) and ZeRO-1 (DeepSpeed's)."""
    clip = 0.5 * reference[0]["results"][0]["grad_norm"]
    runs = [dict(REF_RUN, stage=stage, clip=clip) for stage in (0, 1)]
    one_rank = run_distributed(_many, 1, train_worker, runs)[0]
    piped = run_distributed(_many, 2, pipe_worker, runs, timeout=300)[1]
    unclipped = reference[0]
    for stage, want, got in zip((0, 1), one_rank, piped):
        assert max(abs(a - b).max() for a, b in zip(want["params"].values(), unclipped["params"].values())) > 1e-4, \
            "the threshold must actually clip"
        for a, b in zip(got["results"], want["results"]):
            assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-5), f"ZeRO-{stage}"
        assert got["results"][0]["grad_norm"] == pytest.approx(unclipped["results"][0]["grad_norm"], rel=1e-6)
        np.testing.assert_allclose(got["losses"], want["losses"], rtol=1e-6, err_msg=f"ZeRO-{stage}")
        _close(got["params"], want["params"], what=f"pp2 clipped, ZeRO-{stage}")


def _export_worker(rank, world, out_dir):
    res = pipe_worker(rank, world, tp=1, pp=2, steps=1, accum=2)
    if rank == 0:
        from witscale.training.export import write_hf_dir
        from witscale.model import ModelConfig
        write_hf_dir({k: torch.from_numpy(v) for k, v in res["params"].items()},
                     ModelConfig.from_dict(TINY), out_dir, None)
    return res["params"]


@pytest.mark.slow
def test_export_after_pp2_loads_in_transformers(tmp_path):
    transformers = pytest.importorskip("transformers")
    from witscale.model import CausalLM, ModelConfig

    params = run_distributed(_export_worker, 2, str(tmp_path / "hf"))[0]
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf"), torch_dtype=torch.float32).eval()
    ours = CausalLM(ModelConfig.from_dict(TINY))
    ours.load_state_dict({k: torch.from_numpy(v) for k, v in params.items()})
    ids = torch.randint(3, TINY["vocab_size"], (2, 20))
    pos = torch.arange(20).repeat(2, 1)
    cu = torch.tensor([0, 20, 40], dtype=torch.int32)
    with torch.no_grad():
        want = ours.compute_logits(ours(ids, pos, cu, 20))
        got = hf(input_ids=ids).logits
    torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-4)
    # The trained weights moved away from the init (the export is not just the seeded start).
    assert not np.allclose(params["lm_head.weight"], 0)


def test_pipeline_names_round_trip():
    from witscale.model import ModelConfig, dense_shapes
    from witscale.model.hf_names import hf_to_pipe_name, pipe_to_hf_name

    for tied in (False, True):
        cfg = ModelConfig.from_dict(dict(TINY, tie_word_embeddings=tied))
        for name in dense_shapes(cfg):
            assert pipe_to_hf_name(hf_to_pipe_name(name, cfg), cfg) == name
    cfg = ModelConfig.from_dict(TINY)
    assert hf_to_pipe_name("model.layers.1.mlp.up_proj.weight", cfg) == "2.mlp.up_proj.weight"
    assert pipe_to_hf_name("4.lm_head.weight", cfg) == "lm_head.weight"
    with pytest.raises(KeyError):
        pipe_to_hf_name("4.norm.weight", cfg)


@pytest.mark.parametrize("stage,layers,pp,message", [
    (2, 2, 2, "ZeRO stage 2 cannot be combined with pipeline parallelism (pp=2)"),
    (3, 2, 2, "ZeRO stage 3 cannot be combined with pipeline parallelism (pp=2)"),
    (1, 2, 4, "--pp 4 exceeds the model's 2 layers"),
])
def test_layout_errors_are_one_clear_line(stage, layers, pp, message):
    from witscale.model import ModelConfig
    from witscale.parallel.topology import LayoutError, ParallelDims

    with pytest.raises(LayoutError) as e:
        ParallelDims(4, 1, pp, stage, ModelConfig.from_dict(dict(TINY, num_hidden_layers=layers)))
    assert message in str(e.value) and "\n" not in str(e.value)


@pytest.mark.slow
def test_cli_pp2_trains_evaluates_exports_and_resumes(run_inputs, tmp_path):
    """witscale/train.py --pp 2 under torchrun: ZeRO-1, eval, checkpoint, --export-hf, then --resume auto."""
    import json

    from tests.test_train_cli_operations import _args, _torchrun

    out = tmp_path / "run"

    def pp_args(steps, *extra):
        args = _args(run_inputs, out, steps, "--pp", "2", "--clip-grad", "0.5", *extra)
        args[args.index("ds_configs/zero3.json")] = "ds_configs/zero1.json"
        return args

    code, log = _torchrun(pp_args(2, "--eval-data", run_inputs["eval"], "--export-hf", str(out / "hf")))
    assert code == 0, log
    rows = [json.loads(line) for line in open(out / "metrics.jsonl")]
    assert [r["step"] for r in rows if "loss" in r] == [1, 2]
    assert all(np.isfinite(r["eval_loss"]) for r in rows if "eval_loss" in r) and any("eval_loss" in r for r in rows)
    assert (out / "checkpoints" / "latest").read_text().strip() == "step_00000002"
    transformers = pytest.importorskip("transformers")
    transformers.AutoModelForCausalLM.from_pretrained(str(out / "hf"))
    code, log = _torchrun(pp_args(3, "--resume", "auto", "--reschedule"))   # a longer run: a new schedule
    assert code == 0, log
    assert "resumed from" in log and "at step 2" in log
    assert (out / "checkpoints" / "latest").read_text().strip() == "step_00000003"
