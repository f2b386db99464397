"""Units that need no process group: weight table, DeepSpeed config filling, layout validation, schedule."""
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from witscale.data.classes import TokenClass
from witscale.data.weighting import build_weight_table, parse_class_weights
from witscale.training.ds_config import DSConfigError, fill_ds_config, load_ds_config
from witscale.training.optim import cosine_with_warmup, warmup_steps_for
from witscale.parallel.topology import LayoutError, ParallelDims


def test_weight_table_maps_classes_as_the_paper():
    table = build_weight_table(0.2, 0.7)
    assert table[TokenClass.PAD] == 0
    for cls in (TokenClass.TEMPLATE, TokenClass.SYSTEM, TokenClass.PROMPT):
        assert table[cls] == np.float32(0.2)
    for cls in (TokenClass.RESPONSE, TokenClass.EOT):
        assert table[cls] == np.float32(0.7)


def test_class_weight_overrides_and_errors():
    table = build_weight_table(0.5, 1.0, parse_class_weights("template=0, system=0.1"))
    assert table[TokenClass.TEMPLATE] == 0 and table[TokenClass.SYSTEM] == np.float32(0.1)
    assert table[TokenClass.PROMPT] == np.float32(0.5)
    with pytest.raises(ValueError, match="unknown token class 'answer'"):
        parse_class_weights("answer=1")
    with pytest.raises(ValueError, match="not of the form"):
        parse_class_weights("prompt")
    with pytest.raises(ValueError, match=">= 0"):
        parse_class_weights("prompt=-1")
    with pytest.raises(ValueError, match="not a number"):
        parse_class_weights("prompt=abc")
    for bad in (-0.1, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="--prompt-weight"):
            build_weight_table(bad, 1.0)


def _fill(raw, **kw):
    args = dict(micro_batch_size=2, grad_accum=3, dp_size=4, clip_grad=None, lr=1e-4, weight_decay=0.1,
                betas=(0.9, 0.95), eps=1e-8, hidden_size=64, use_cuda=False)
    args.update(kw)
    return fill_ds_config(raw, **args)


def test_ds_config_auto_fields_filled(tmp_path):
    raw = load_ds_config("ds_configs/zero3.json")
    cfg = _fill(raw)
    assert cfg["train_micro_batch_size_per_gpu"] == 2 and cfg["gradient_accumulation_steps"] == 3
    assert cfg["train_batch_size"] == 24
    assert cfg["gradient_clipping"] == 0.0, "clipping must default to off (DeepSpeed's default is 1.0)"
    assert cfg["bf16"]["enabled"] is False
    assert "optimizer" not in cfg and cfg["zero_allow_untested_optimizer"] is True
    assert cfg["zero_optimization"]["reduce_bucket_size"] == 64 * 64
    gpu = _fill(raw, use_cuda=True, clip_grad=1.0)
    assert gpu["bf16"]["enabled"] is True and gpu["gradient_clipping"] == 1.0
    assert gpu["optimizer"]["params"] == {"lr": 1e-4, "betas": [0.9, 0.95], "eps": 1e-8, "weight_decay": 0.1}


def test_ds_config_conflicts_are_errors(tmp_path):
    raw = load_ds_config("ds_configs/zero1.json")
    raw["train_micro_batch_size_per_gpu"] = 8
    with pytest.raises(DSConfigError, match="disagrees with --micro-batch-size"):
        _fill(raw)
    with pytest.raises(DSConfigError, match="scheduler"):
        _fill({"scheduler": {"type": "WarmupLR"}})
    bad = tmp_path / "bad.json"
    bad.write_text("{\n  \"a\": 1,,\n}")
    with pytest.raises(DSConfigError, match="bad.json: invalid JSON at line 2"):
        load_ds_config(str(bad))


def _cfg(**kw):
    base = dict(num_attention_heads=8, num_key_value_heads=4, intermediate_size=128, num_hidden_layers=4)
    base.update(kw)
    return SimpleNamespace(**base)


@pytest.mark.parametrize("world,tp,pp,stage,cfg,msg", [
    (6, 4, 1, 0, _cfg(), "world size 6 is not divisible by tp × pp = 4 × 1"),
    (8, 1, 2, 3, _cfg(), "ZeRO stage 3 cannot be combined with pipeline"),
    (8, 1, 2, 2, _cfg(), "ZeRO stage 2 cannot be combined with pipeline"),
    (6, 3, 1, 0, _cfg(num_attention_heads=8), "--tp 3 does not divide the model's attention heads"),
    (8, 8, 1, 0, _cfg(num_attention_heads=24, num_key_value_heads=3), "key/value heads"),
    (4, 4, 1, 0, _cfg(num_attention_heads=8, num_key_value_heads=8, intermediate_size=130), "intermediate size"),
    (8, 1, 8, 1, _cfg(num_hidden_layers=4), "--pp 8 exceeds the model's 4 layers"),
])
def test_layout_errors_name_the_numbers(world, tp, pp, stage, cfg, msg):
    with pytest.raises(LayoutError, match=msg.replace("(", r"\(").replace(")", r"\)")):
        ParallelDims(world, tp, pp, stage, cfg)


def test_rank_grid_is_tp_fastest_then_dp_then_pp():
    dims = ParallelDims(16, tp=2, pp=2, zero_stage=1, model=_cfg())
    assert dims.dp == 4
    assert dims.tp_groups()[0] == [0, 1]
    assert dims.dp_groups()[0] == [0, 2, 4, 6]
    assert dims.pp_groups()[0] == [0, 8]
    seen = sorted(r for g in dims.tp_groups() for r in g)
    assert seen == list(range(16))
    for rank in range(16):
        assert dims.rank_of(*dims.coords(rank)) == rank


def test_cosine_schedule_with_warmup():
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    total, ratio = 200, 0.05
    sched = cosine_with_warmup(opt, total, ratio)
    lrs = []
    for _ in range(total):
        lrs.append(sched.get_last_lr()[0])
        opt.step()
        sched.step()
    warm = warmup_steps_for(total, ratio)
    assert warm == 10
    assert lrs[0] == pytest.approx(0.1) and lrs[warm - 1] == pytest.approx(1.0)
    assert lrs[warm] == pytest.approx(1.0)
    mid = warm + (total - warm) // 2
    assert lrs[mid] == pytest.approx(0.5, abs=0.01)
    assert lrs[-1] < 0.001 and all(a >= b for a, b in zip(lrs[warm:], lrs[warm + 1:]))
    assert not any(math.isnan(x) for x in lrs)
