"""The planner's parameter and optimizer-state counts against what ZeRO and TP runs really hold here."""
import subprocess
import sys

import pytest
import transformers

from tests.conftest import REPO_ROOT
from tests.distributed import run_distributed
from witscale import planner

CONFIGS = {
    "llama": dict(model_type="llama", vocab_size=61, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2),
    "qwen2-tied": dict(model_type="qwen2", vocab_size=64, hidden_size=32, intermediate_size=40, num_hidden_layers=3,
                       num_attention_heads=4, num_key_value_heads=4, tie_word_embeddings=True),
}


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_total_parameters_match_transformers(name):
    cfg = transformers.AutoConfig.for_model(**CONFIGS[name])
    model = transformers.AutoModelForCausalLM.from_config(cfg)
    assert planner.ModelShape.from_config(CONFIGS[name]).total_params() == model.num_parameters()


def _measure(rank, world, cfg_dict, tp, stage):
    from tests.train_helpers import ds_config, random_packed
    from witscale.data.loader import PackedLoader
    from witscale.data.weighting import build_weight_table
    from witscale.training.distributed import init_distributed
    from witscale.model import ModelConfig
    from witscale.training.build import build_module
    from witscale.parallel.topology import ParallelDims, Topology
    from witscale.training.trainer import Trainer

    init_distributed()
    cfg = ModelConfig.from_dict(dict(cfg_dict, max_position_embeddings=64))
    topo = Topology(ParallelDims(world, tp, 1, stage, cfg))
    config = ds_config(stage, 1, 1, topo.dp)
    module = build_module(cfg, topo, config, model_dir=None, seed=0)
    data = random_packed(4, 32, cfg.vocab_size, 0)
    loader = PackedLoader(data, build_weight_table(0.5, 1.0), micro_batch_size=1, grad_accum=1,
                          dp_size=topo.dp, dp_rank=topo.dp_rank)
    trainer = Trainer(module=module, ds_config=config, loader=loader, topo=topo, normalization="nonzero",
                      lr=1e-3, weight_decay=0.0, betas=(0.9, 0.999), eps=1e-8, total_steps=1, warmup_ratio=0.0)
    trainer.train_step(loader.next_step())
    params = {id(p): p for p in module.parameters()}.values()
    held = sum(p.ds_tensor.numel() if hasattr(p, "ds_tensor") else p.numel() for p in params)
    state = trainer.optimizer.optimizer.state if hasattr(trainer.optimizer, "optimizer") else trainer.optimizer.state
    optim = sum(t.numel() for s in state.values() for k, t in s.items() if k in ("exp_avg", "exp_avg_sq"))
    return held, optim


@pytest.mark.slow
@pytest.mark.parametrize("tp,stage,world", [(1, 3, 2), (2, 0, 2), (2, 1, 4)])
def test_per_gpu_counts_match_measured_runs(tp, stage, world):
    cfg = dict(CONFIGS["llama"], num_attention_heads=4, num_key_value_heads=2)
    shape = planner.ModelShape.from_config(cfg)
    layout = planner.Layout(tp=tp, pp=1, dp=world // tp, zero=stage)
    est = planner.estimate(shape, layout, seq_len=32, micro_batch=1)
    for held, optim in run_distributed(_measure, world, cfg, tp, stage):
        # ZeRO pads each partition to a multiple of dp: allow that much slack
        assert held == pytest.approx(est.params_per_gpu, rel=0.02), (held, est.params_per_gpu)
        # AdamW keeps two fp32 moments per parameter it updates; ZeRO-1/3 partition them over dp
        expected_optim = 2 * planner.model_parallel_params(shape, tp, 1) / (layout.dp if stage >= 1 else 1)
        assert optim == pytest.approx(expected_optim, rel=0.02), (optim, expected_optim)


def test_plan_cli_lists_layouts_and_fits():
    out = subprocess.run([sys.executable, "tools/plan.py", "--model", "70B", "--gpus", "64", "--gpu-mem", "80"],
                         cwd=REPO_ROOT, capture_output=True, text=True, check=True).stdout
    assert "tp8·pp1·dp8 ZeRO-3" in out and "tp1·pp1·dp64 ZeRO-1" in out
    line = next(x for x in out.splitlines() if x.startswith("tp1·pp1·dp64 ZeRO-1"))
    assert line.rstrip().endswith("no"), "70B with replicated parameters cannot fit in 80 GB"


def test_activation_checkpointing_is_needed_where_the_planner_says():
    """The trainer's --activation-checkpointing auto asks this: 70B ZeRO-3 over 64 × 80 GB needs recomputed
    blocks at seq-len 4096 (≈151 GiB per GPU without, ≈34 with); 7B over 8 × 80 GB does not (≈40 GiB)."""
    big = planner.ModelShape.from_config(planner.NAMED_SIZES["70B"])
    small = planner.ModelShape.from_config(planner.NAMED_SIZES["7B"])
    z3 = planner.Layout(tp=1, pp=1, dp=64, zero=3)
    on = planner.estimate(big, z3, seq_len=4096, micro_batch=1)
    off = planner.estimate(big, z3, seq_len=4096, micro_batch=1, activation_checkpointing=False)
    assert off.activation_gib > 5 * on.activation_gib and off.total_gib > 80 > on.total_gib
    assert planner.needs_activation_checkpointing(big, z3, seq_len=4096, micro_batch=1, gpu_gib=80)
    assert not planner.needs_activation_checkpointing(small, planner.Layout(1, 1, 8, 3), seq_len=4096,
                                                      micro_batch=1, gpu_gib=80)
    assert planner.needs_activation_checkpointing(small, planner.Layout(1, 1, 8, 3), seq_len=4096,
                                                  micro_batch=1, gpu_gib=24)


def test_activation_checkpointing_flag_resolves_on_the_cpu():
    """auto is off on the CPU (no GPU memory to plan for); a bare --activation-checkpointing means on."""
    from witscale.train import _activation_checkpointing, build_parser
    from witscale.training.config import RunConfig

    base = ["--data", "d", "--model-config", "c", "--output-dir", "o", "--ds_config", "z"]
    p = build_parser()
    auto = RunConfig.from_args(p.parse_args(base))
    assert auto.activation_checkpointing == "auto"
    assert _activation_checkpointing(auto, None, None, {}, 4096) is False       # no CUDA here
    assert RunConfig.from_args(p.parse_args(base + ["--activation-checkpointing"])).activation_checkpointing == "on"
    assert RunConfig.from_args(p.parse_args(base + ["--activation-checkpointing", "off"])).activation_checkpointing \
        == "off"
