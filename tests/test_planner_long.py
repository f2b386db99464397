"""The planner at long context (issue 24): Ulysses sp, Megatron SP inside TP, offloaded checkpoints, the tiled
MLP, the layout search over sp, ``auto`` (the cheapest layout that fits) and tools/plan.py's answers.
Arithmetic only; the terms are checked against the memory probe in tests/test_planner_activations.py."""
import importlib.util
import os

import pytest

from tests.conftest import REPO_ROOT
from witscale import planner

SHAPE_8B = planner.ModelShape.from_config(planner.NAMED_SIZES["8B"])
SHAPE_70B = planner.ModelShape.from_config(planner.NAMED_SIZES["70B"])


def _act(shape, tokens, **kw):
    return planner.activation_memory(shape, tokens=tokens, **kw)


def test_attention_and_loss_grow_linearly_with_the_row():
    """Flash/varlen attention keeps O(T) (no T × T scores) and the fused loss one bounded logits block: twice
    the tokens, exactly twice what a layer saves; the loss grows only by its fp32 dL/dh (4·h per token)."""
    for tokens in (1 << 17, 1 << 20):
        one, two = _act(SHAPE_8B, tokens, activation_checkpointing=False), \
            _act(SHAPE_8B, 2 * tokens, activation_checkpointing=False)
        assert two.layer_saved == 2 * one.layer_saved
        assert two.loss - one.loss == tokens * 4 * SHAPE_8B.hidden_size
    # 1M tokens of 8B: one layer saves < 200 GiB (a T² fp32 score matrix alone would be 4 TiB per head)
    assert _act(SHAPE_8B, 1 << 20, activation_checkpointing=False).layer_saved < 200 * planner.GIB


def test_sp_divides_the_activations_per_rank():
    """Each sp rank keeps 1/sp of the row: activations per rank fall ~1/sp (the per-rank LM-head gradient and
    one logits block do not shrink; Ulysses' second copy of attention's output adds a little)."""
    act = {sp: planner.estimate(SHAPE_8B, planner.Layout(dp=8 // sp, sp=sp), seq_len=1 << 18,
                                micro_batch=1).activation_gib for sp in (1, 2, 4, 8)}
    for sp in (2, 4, 8):
        assert act[sp] * sp / act[1] == pytest.approx(1, abs=0.2), act
        assert act[sp] < act[sp // 2]


def test_kv_heads_fewer_than_sp_are_counted_replicated():
    """Ulysses replicates KV heads per TP rank fewer than sp (parallel/sequence.py): at sp 8, 8B's 8 KV heads
    split (one each), 2 KV heads become 8 heads' worth per rank — more than at 8 KV heads, never less."""
    two_kv = planner.ModelShape.from_config(dict(planner.NAMED_SIZES["8B"], num_key_value_heads=2))
    assert _act(two_kv, 4096, sp=8, activation_checkpointing=False).layer_saved == \
        _act(SHAPE_8B, 4096, sp=8, activation_checkpointing=False).layer_saved
    assert _act(two_kv, 4096, activation_checkpointing=False).layer_saved < \
        _act(SHAPE_8B, 4096, activation_checkpointing=False).layer_saved


def test_megatron_sp_shards_what_tp_replicates():
    """--tp-sequence-parallel: the checkpointed layer inputs and the norms are sharded over tp."""
    off = _act(SHAPE_70B, 1 << 16, tp=8)
    on = _act(SHAPE_70B, 1 << 16, tp=8, tp_sp=True)
    layer_input = (1 << 16) * 2 * SHAPE_70B.hidden_size
    rope = (1 << 16) * 2 * SHAPE_70B.hd * 2
    assert off.kept == SHAPE_70B.num_hidden_layers * layer_input + rope
    assert on.kept == SHAPE_70B.num_hidden_layers * layer_input / 8 + rope
    assert on.peak < off.peak
    assert _act(SHAPE_70B, 4096, tp=1, tp_sp=True) == _act(SHAPE_70B, 4096, tp=1)     # nothing to shard at tp 1


def test_offload_moves_the_checkpoints_to_host_memory():
    """--activation-checkpointing offload: the device keeps two layers' inputs in flight; the host all of them
    (per rank; tools/plan.py sums it per node)."""
    tokens, e, h, layers = 1 << 17, 2, SHAPE_8B.hidden_size, SHAPE_8B.num_hidden_layers
    on, off = _act(SHAPE_8B, tokens), _act(SHAPE_8B, tokens, activation_checkpointing="offload")
    assert off.host == layers * tokens * e * h and on.host == 0
    assert on.kept - off.kept == (layers - 2) * tokens * e * h
    est = planner.estimate(SHAPE_8B, planner.Layout(dp=1, sp=8, checkpointing="offload"), seq_len=1 << 20,
                           micro_batch=1)
    assert est.host_gib * planner.GIB == layers * (1 << 17) * e * h
    with pytest.raises(ValueError):
        _act(SHAPE_8B, 16, activation_checkpointing="sometimes")


def test_tiled_mlp_keeps_one_tile_of_the_intermediate():
    """--tiled-mlp N: the [T × I] tensors of the MLP's backward exist for T/N rows at a time, and nothing of the
    MLP is saved between forward and backward."""
    tokens, e, inter = 1 << 17, 2, SHAPE_8B.intermediate_size
    plain, tiled = _act(SHAPE_8B, tokens), _act(SHAPE_8B, tokens, tiled_mlp=8)
    # minus 5/6 of the MLP's six [T × I] tensors, plus two [T × h] buffers joining the tiles
    assert plain.backward_peak - tiled.backward_peak == pytest.approx(
        6 * e * inter * tokens * (1 - 1 / 8) - 2 * e * SHAPE_8B.hidden_size * tokens)
    no_ac = _act(SHAPE_8B, tokens, activation_checkpointing=False)
    no_ac_tiled = _act(SHAPE_8B, tokens, activation_checkpointing=False, tiled_mlp=8)
    assert no_ac.layer_saved - no_ac_tiled.layer_saved == 4 * e * inter * tokens


def test_valid_layouts_search_sp_with_the_trainers_rules():
    """sp is searched (sp × tp inside a node, heads per TP rank divisible by sp: ParallelDims' own checks)."""
    layouts = planner.valid_layouts(SHAPE_70B, 64, gpus_per_node=8)
    sps = {(x.tp, x.sp) for x in layouts}
    assert {(1, 8), (2, 4), (4, 2), (8, 1)} <= sps
    assert all(x.tp * x.sp <= 8 and (x.pp == 1 or x.sp == 1) for x in layouts)
    assert all(x.world == 64 for x in layouts)
    six_heads = planner.ModelShape.from_config(dict(planner.NAMED_SIZES["7B"], num_attention_heads=6,
                                                    num_key_value_heads=6, hidden_size=4092))
    assert {x.sp for x in planner.valid_layouts(six_heads, 8)} == {1, 2}
    assert {x.sp for x in planner.valid_layouts(SHAPE_70B, 64, sequence_parallel=False)} == {1}


def test_auto_picks_the_cheapest_layout_that_fits():
    """Short rows: everything fits without recompute on 8 GPUs for 7B, so auto turns nothing on. The choice is
    the minimum of ``layout_cost`` over every fitting variant, and it fits."""
    seven = planner.ModelShape.from_config(planner.NAMED_SIZES["7B"])
    short = planner.choose_layout(seven, 8, seq_len=2048)
    assert short.estimate.layout.checkpointing == "off" and short.estimate.layout.tiled_mlp == 1
    assert short.estimate.total_gib <= 0.9 * 80
    fits = planner.fitting_layouts(SHAPE_8B, 8, seq_len=1 << 20)
    assert fits and all(c.estimate.total_gib <= 0.9 * 80 for c in fits)
    assert [c.cost for c in fits] == sorted(c.cost for c in fits)
    assert planner.choose_layout(SHAPE_8B, 8, seq_len=1 << 20).cost == fits[0].cost
    assert planner.choose_layout(SHAPE_70B, 8, seq_len=4096) is None       # 70B on one node: nothing fits


def test_the_issue_cases_fit_and_the_longest_8b_row():
    """Issue 24: 70B at 256k on 64 × 80 GB and 8B at 1M on 8 × 80 GB both fit; the longest 8B row on
    8 × 80 GB is in the millions (ALST reports 3.7M), and one step longer fits nothing."""
    assert planner.choose_layout(SHAPE_70B, 64, seq_len=1 << 18, host_gib_per_node=1024) is not None
    assert planner.choose_layout(SHAPE_8B, 8, seq_len=1 << 20, host_gib_per_node=1024) is not None
    rows, choice = planner.longest_row(SHAPE_8B, 8, host_gib_per_node=1024)
    assert rows >= 3 * 2 ** 20 and choice.estimate.total_gib <= 0.9 * 80
    assert planner.choose_layout(SHAPE_8B, 8, seq_len=rows + 8192, host_gib_per_node=1024) is None
    # with the host memory bounded, offload stops where the node's pinned memory ends
    assert choice.host_gib_per_node <= 1024


def test_plan_cli_auto_offload_column_and_single_layout(capsys):
    """tools/plan.py's main in this process (a subprocess per call would import torch again: seconds each)."""
    spec = importlib.util.spec_from_file_location("plan_cli", os.path.join(REPO_ROOT, "tools", "plan.py"))
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)

    def _plan(*args):
        assert cli.main(list(args)) == 0
        return capsys.readouterr().out

    out = _plan("--model", "8B", "--gpus", "8", "--seq-len", str(1 << 20), "--auto", "--top", "3")
    assert out.splitlines()[1].startswith("auto: tp") and "fits" in out
    out = _plan("--model", "8B", "--tp", "1", "--sp", "8", "--gpus", "8", "--seq-len", str(1 << 20),
                "--activation-checkpointing", "offload", "--tiled-mlp", "16")
    header, line = out.splitlines()[1:3]
    assert "host/node" in header and line.startswith("tp1·pp1·dp1·sp8 ZeRO-3, tiles 16")
    # 32 layers × 128k tokens × 4096 × 2 bytes = 32 GiB per rank, 8 ranks per node
    assert line.split()[-2] == "256.0" and line.endswith("yes")
    assert "host/node" not in _plan("--model", "8B", "--gpus", "8")


def test_tp_sequence_parallel_auto_turns_it_on_only_where_needed():
    """--tp-sequence-parallel auto: on where the layout fits with Megatron SP and not without it."""
    layout = planner.Layout(tp=2, dp=8, sp=4, tiled_mlp=8)       # slurm/train_long.sh
    assert planner.needs_tp_sequence_parallel(SHAPE_70B, layout, seq_len=1 << 18, micro_batch=1, gpu_gib=80)
    assert not planner.needs_tp_sequence_parallel(SHAPE_70B, layout, seq_len=4096, micro_batch=1, gpu_gib=80)
    assert not planner.needs_tp_sequence_parallel(SHAPE_70B, planner.Layout(tp=1, dp=64), seq_len=1 << 18,
                                                  micro_batch=1, gpu_gib=80)
