"""Memory for long rows (witscale/model/memory.py): ``--activation-checkpointing offload`` and ``--tiled-mlp N``.

- offload and on give off's loss and every gradient (fp32), Llama and Gemma-2 (sandwich norms, GeGLU: the
  other MLP call), packed documents;
- under offload each block's input really leaves the device: the forward's hidden states are freed once the
  block has run (under on they stay alive until backward), the bytes autograd holds for the blocks drop by
  one hidden state per block and that many bytes sit in host copies (memory_probe);
- the tiled MLP (N = 1, 2, 3, 7 over rows of 13 tokens: no N > 1 divides them) equals the untiled one, alone
  and with on/offload; the peak of bytes saved for backward by an MLP falls with N (saved-tensor hooks);
  ZeRO's "gradient ready" flag is set on the last tile torch.chunk really makes (12 tokens in 7 → 6 tiles);
- slow (gloo ranks, one launch): tp=2 (also with --tp-sequence-parallel), sp=2 and ZeRO-3 over dp=2 with tiles and offload equal without; the CLI with
  ``--activation-checkpointing offload --tiled-mlp 4`` trains as the plain reference run (ZeRO-3, 2 ranks).
"""
from __future__ import annotations

import weakref

import numpy as np
import pytest
import torch

from tests.distributed import run_distributed

LLAMA = dict(model_type="llama", vocab_size=97, hidden_size=32, intermediate_size=88, num_hidden_layers=3,
             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, rms_norm_eps=1e-6)
GEMMA2 = dict(LLAMA, model_type="gemma2", head_dim=16, query_pre_attn_scalar=12, sliding_window=4,
              attn_logit_softcapping=3.0, final_logit_softcapping=2.0, hidden_activation="gelu_pytorch_tanh")
FAMILIES = {"llama": LLAMA, "gemma2": GEMMA2}
DOCS, SEQ = [[5, 8], [4, 3, 6]], 13        # packed rows of 13 tokens


def _model(cfg_dict, checkpointing="off", tiles=1):
    from witscale.model import CausalLM, ModelConfig, init_weights
    model = CausalLM(ModelConfig.from_dict(cfg_dict), activation_checkpointing=checkpointing, tiled_mlp=tiles)
    init_weights(model, seed=0)
    return model.train()


def _batch(vocab):
    from witscale.model.transformer import packed_positions
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, vocab, (2, SEQ), generator=g)
    pos, cu, mx = packed_positions(DOCS, SEQ)
    return ids, pos, cu, mx, torch.rand(2, SEQ, generator=g)


def _loss_and_grads(model):
    ids, pos, cu, mx, weights = _batch(model.config.vocab_size)
    stats = model(ids, pos, cu, mx, ids, weights)
    stats.weighted_sum.backward()
    return stats.weighted_sum.detach(), {n: p.grad for n, p in model.named_parameters()}


def _assert_same(got, want):
    """rtol 1e-6 on the loss and each gradient; atol 1e-6 of the gradient's largest entry (tiles sum a weight's
    gradient over the tokens in another order)."""
    torch.testing.assert_close(got[0], want[0], rtol=1e-6, atol=0)
    assert got[1].keys() == want[1].keys()
    for name, ref in want[1].items():
        torch.testing.assert_close(got[1][name], ref, rtol=1e-6, atol=1e-6 * float(ref.abs().max()), msg=name)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_offload_and_on_give_the_gradients_of_off(family):
    off = _loss_and_grads(_model(FAMILIES[family]))
    for mode in ("on", "offload"):
        _assert_same(_loss_and_grads(_model(FAMILIES[family], mode)), off)


def _block_inputs_alive_after_forward(mode):
    """Forward only: whether each block's input hidden state is still allocated when forward returns, and the
    model's own count of bytes it moved to the host."""
    model = _model(LLAMA, mode)
    alive, recording = [], [True]

    def record(_module, args):
        if recording[0]:
            alive.append(weakref.ref(args[0].untyped_storage()))
    for layer in model.model.layers:
        layer.register_forward_pre_hook(record)
    ids, pos, cu, mx, weights = _batch(LLAMA["vocab_size"])
    stats = model(ids, pos, cu, mx, ids, weights)
    recording[0] = False
    held = [ref() is not None for ref in alive]
    stats.weighted_sum.backward()           # and backward still runs from what was kept
    assert all(p.grad is not None for p in model.parameters())
    return held, model.model.offloaded_bytes


def test_offload_moves_each_block_input_off_the_device():
    """The observable: the forward's hidden state entering each block. Under on autograd keeps it (the block's
    checkpointed input) until backward; under offload only its host copy is kept, so the tensor itself is freed
    as soon as the next block has consumed it — a fallback that kept the device tensor would leave it alive."""
    layers = LLAMA["num_hidden_layers"]
    hidden_bytes = 2 * SEQ * LLAMA["hidden_size"] * 4
    held_on, host_on = _block_inputs_alive_after_forward("on")
    held_offload, host_offload = _block_inputs_alive_after_forward("offload")
    assert held_on == [True] * layers and host_on == 0
    assert held_offload == [False] * layers
    assert host_offload == layers * hidden_bytes


def test_memory_probe_counts_offloaded_inputs_as_host_bytes():
    """measure_activation_peak: what autograd holds on the device after forward drops by one hidden state per
    block under offload, and exactly those bytes are reported as host copies."""
    from witscale.memory_probe import measure_activation_peak
    cfg = dict(LLAMA, num_hidden_layers=4)
    ids = torch.randint(0, cfg["vocab_size"], (2, 32), generator=torch.Generator().manual_seed(0))
    measured = {mode: measure_activation_peak(_model(cfg, mode), ids, ids, torch.ones(2, 32))
                for mode in ("off", "on", "offload")}
    hidden_bytes = 2 * 32 * cfg["hidden_size"] * 4
    assert measured["on"]["held_after_forward"] < measured["off"]["held_after_forward"]
    assert measured["on"]["held_after_forward"] - measured["offload"]["held_after_forward"] == 4 * hidden_bytes
    assert measured["offload"]["host_bytes"] == 4 * hidden_bytes and measured["on"]["host_bytes"] == 0


@pytest.mark.parametrize("family", sorted(FAMILIES))
@pytest.mark.parametrize("tiles", [1, 2, 3, 7])
def test_tiled_mlp_equals_untiled(family, tiles):
    _assert_same(_loss_and_grads(_model(FAMILIES[family], tiles=tiles)), _loss_and_grads(_model(FAMILIES[family])))


@pytest.mark.parametrize("mode,tiles", [("on", 7), ("offload", 4)])
def test_tiled_mlp_with_checkpointing_equals_plain(mode, tiles):
    _assert_same(_loss_and_grads(_model(LLAMA, mode, tiles)), _loss_and_grads(_model(LLAMA)))


def _mlp_saved_peak(tiles, tokens=56):
    """Peak bytes autograd holds for one MLP's forward + backward on ``tokens`` tokens (saved-tensor hooks)."""
    from witscale.memory_probe import SavedTensorBytes
    from witscale.model.memory import tiled_mlp
    mlp = _model(LLAMA).model.layers[0].mlp
    x = torch.randn(2, tokens // 2, LLAMA["hidden_size"], requires_grad=True)
    with SavedTensorBytes() as saved:
        tiled_mlp(mlp, x, tiles).square().sum().backward()
    assert saved.now == 0           # everything released after backward
    return saved.peak


def test_tiled_mlp_saved_bytes_fall_with_tiles():
    """Untiled, autograd holds the MLP's [T, I] intermediates of every token (gate, its activation, up, their
    product: 4 per token); tiled, those of one tile at a time (besides the weights, the input and the output,
    held either way): the peak falls by at least 4 · I values for each token not in the largest tile."""
    tokens, inter = 56, LLAMA["intermediate_size"]
    peaks = {n: _mlp_saved_peak(n, tokens) for n in (1, 2, 4, 7)}
    assert peaks[1] > peaks[2] > peaks[4] > peaks[7], peaks
    for n in (2, 4, 7):
        assert peaks[1] - peaks[n] >= 4 * inter * 4 * (tokens - -(-tokens // n)), (n, peaks)


def test_tile_count_is_what_torch_chunk_makes():
    from witscale.model.memory import tile_count
    assert [tile_count(12, n) for n in (1, 2, 3, 5, 7, 12, 20)] == [1, 2, 3, 4, 6, 12, 12]
    for tokens in range(1, 40):
        for n in range(1, 10):
            assert tile_count(tokens, n) == len(torch.chunk(torch.empty(tokens), n))


def test_zero_sees_each_gradient_once_after_the_last_tile():
    """DeepSpeed's ZeRO (stage_1_and_2.py, stage3.py) takes a parameter's gradient when it is accumulated with
    ``ds_grad_is_ready`` unset or True. Emulated here: the gradient taken must be the whole (untiled) one,
    taken once — 2 rows of 6 tokens in 7 tiles, where torch.chunk makes 6."""
    from witscale.model.memory import tiled_mlp
    mlp = _model(LLAMA).model.layers[0].mlp
    x = torch.randn(2, 6, LLAMA["hidden_size"], requires_grad=True)
    mlp(x).square().sum().backward()
    full = {n: p.grad.clone() for n, p in mlp.named_parameters()}
    mlp.zero_grad(set_to_none=True)
    taken = {n: [] for n in full}
    for name, p in mlp.named_parameters():
        p.register_post_accumulate_grad_hook(
            lambda p, name=name: taken[name].append(p.grad.clone()) if getattr(p, "ds_grad_is_ready", True) else None)
    tiled_mlp(mlp, x, 7).square().sum().backward()
    for name, grad in full.items():
        assert len(taken[name]) == 1, (name, len(taken[name]))
        torch.testing.assert_close(taken[name][0], grad, rtol=1e-6, atol=1e-6 * float(grad.abs().max()))


def test_mode_names_and_the_pp_refusal():
    from witscale.model.memory import checkpointing_mode
    assert [checkpointing_mode(v) for v in (False, True, "off", "on", "offload")] == ["off", "on", "off", "on", "offload"]
    with pytest.raises(ValueError):
        checkpointing_mode("sometimes")
    model = _model(LLAMA)
    model.set_activation_checkpointing("offload")
    assert model.model.activation_checkpointing == "offload"
    model.set_activation_checkpointing(False)
    assert model.model.activation_checkpointing == "off"


def test_pp_refuses_both_options_in_one_line(run_inputs, tmp_path):
    from tests import test_train_cli_operations as operations
    from witscale.train import UsageError, build_parser, plan_run
    from witscale.training.config import RunConfig
    argv = operations._args(run_inputs, tmp_path, 2, "--pp", "2")
    argv[argv.index("--ds_config") + 1] = "ds_configs/pipeline.json"

    def planned(*more):
        return plan_run(RunConfig.from_args(build_parser().parse_args(argv + list(more))), 2)

    for extra in (["--activation-checkpointing", "offload"], ["--tiled-mlp", "2"]):
        with pytest.raises(UsageError) as e:
            planned(*extra)
        assert str(e.value).startswith("--pp 2: --activation-checkpointing offload and --tiled-mlp are not supported")
        assert "\n" not in str(e.value)
    assert planned("--activation-checkpointing", "on", "--tiled-mlp", "1").activation_checkpointing is True
    argv[argv.index("--pp") + 1] = "1"
    argv[argv.index("--ds_config") + 1] = "ds_configs/zero2.json"
    plan = planned("--activation-checkpointing", "offload", "--tiled-mlp", "3")
    assert (plan.activation_checkpointing, plan.config.tiled_mlp) == ("offload", 3)
    with pytest.raises(UsageError, match=r"^--tiled-mlp 0 is out of range"):       # N ≥ 1, the flag's check
        planned("--tiled-mlp", "0")


# ---- slow: gloo ranks ----------------------------------------------------------------------------------------

def tiles_worker(rank, world):
    """One launch of 2 ranks: (1) tp=2, then sp=2, dense gradients of one micro-batch with and without tiles +
    offload; (2) ZeRO-3 over dp=2 (parameters partitioned, gathered by DeepSpeed's hooks for every tile, in forward and
    in the recomputation of backward): each rank's full gradients after one backward, with and without."""
    from tests.train_helpers import TINY, ds_config, probe, random_packed
    from witscale.data.loader import PackedLoader
    from witscale.data.weighting import build_weight_table
    from witscale.model import ModelConfig
    from witscale.model.memory import set_tiled_mlp
    from witscale.parallel.topology import ParallelDims, Topology
    from witscale.training.build import build_module
    from witscale.training.distributed import init_distributed
    from witscale.training.trainer import Trainer

    init_distributed()
    cfg = ModelConfig.from_dict(dict(TINY, intermediate_size=88))
    data = random_packed(8, 26, cfg.vocab_size, 1, with_weights=True)      # 26 tokens: 3 tiles of 9, 9, 8
    out = {}

    topo = Topology(ParallelDims(world, 2, 1, 0, cfg))
    module = build_module(cfg, topo, ds_config(0, 2, 1, topo.dp), model_dir=None, seed=0)
    loader = PackedLoader(data, build_weight_table(0.2, 1.0), micro_batch_size=2, grad_accum=1, dp_size=1,
                          dp_rank=0, seed=0)
    out["tp_plain"] = probe(module, loader, topo)
    set_tiled_mlp(module, 3)
    module.set_activation_checkpointing("offload")
    out["tp_tiled"] = probe(module, loader, topo)
    # the same with the TP ranks' sequence sharding (--tp-sequence-parallel): each rank tiles its 13 tokens
    module = build_module(cfg, topo, ds_config(0, 2, 1, topo.dp), model_dir=None, seed=0, tp_sequence_parallel=True)
    set_tiled_mlp(module, 3)
    module.set_activation_checkpointing("offload")
    out["tpsp_tiled"] = probe(module, loader, topo)

    topo = Topology(ParallelDims(world, 1, 1, 0, cfg, sp=2))     # Ulysses: each rank tiles its half of the row
    module = build_module(cfg, topo, ds_config(0, 2, 1, topo.dp), model_dir=None, seed=0)
    out["sp_plain"] = probe(module, loader, topo)
    set_tiled_mlp(module, 3)
    module.set_activation_checkpointing("offload")
    out["sp_tiled"] = probe(module, loader, topo)

    import deepspeed
    topo = Topology(ParallelDims(world, 1, 1, 3, cfg))
    config = ds_config(3, 2, 1, topo.dp)
    torch.manual_seed(0)
    module = build_module(cfg, topo, config, model_dir=None, seed=0)
    loader = PackedLoader(data, build_weight_table(0.2, 1.0), micro_batch_size=2, grad_accum=1, dp_size=topo.dp,
                          dp_rank=topo.dp_rank, seed=0)
    trainer = Trainer(module=module, ds_config=config, loader=loader, topo=topo, normalization="nonzero", lr=1e-3,
                      weight_decay=0.0, betas=(0.9, 0.999), eps=1e-8, total_steps=1, warmup_ratio=0.0)
    mb = loader.make_micro_batch(loader.global_batch_rows(0, 0)[topo.dp_rank * 2:topo.dp_rank * 2 + 2])
    engine = trainer.engine
    for name, tiles, mode in (("zero3_plain", 1, "off"), ("zero3_tiled", 3, "offload")):
        set_tiled_mlp(engine.module, tiles)
        engine.module.set_activation_checkpointing(mode)
        stats = engine(mb.input_ids, mb.position_ids, mb.cu_seqlens, mb.max_seqlen, mb.labels, mb.weights)
        engine.backward(stats.weighted_sum, scale_wrt_gas=False)
        grads = {n: deepspeed.utils.safe_get_full_grad(p).clone().numpy()
                 for n, p in engine.module.named_parameters()}
        engine.optimizer.zero_grad()
        out[name] = {"loss_sum": float(stats.weighted_sum), "grads": grads}
    return out


def _same(got, want):
    assert got["loss_sum"] == pytest.approx(want["loss_sum"], rel=1e-6)
    assert got["grads"].keys() == want["grads"].keys()
    for name, ref in want["grads"].items():
        np.testing.assert_allclose(got["grads"][name], ref, rtol=1e-6, atol=1e-6 * np.abs(ref).max(), err_msg=name)


@pytest.mark.slow
def test_tp2_sp2_and_zero3_with_tiles_and_offload_equal_without():
    for out in run_distributed(tiles_worker, 2, timeout=600):
        _same(out["tp_tiled"], out["tp_plain"])
        _same(out["tpsp_tiled"], out["tp_plain"])
        _same(out["sp_tiled"], out["sp_plain"])
        _same(out["zero3_tiled"], out["zero3_plain"])
        assert any(np.abs(g).max() > 0 for g in out["zero3_plain"]["grads"].values())


@pytest.mark.slow
def test_the_cli_flags_train_as_the_plain_run(reference_run, run_inputs, tmp_path):
    """witscale/train.py on 2 ranks, ZeRO-3: --activation-checkpointing offload --tiled-mlp 4 gives the reference
    run's per-step losses (the reference saves and evaluates on the way, which changes no loss)."""
    from tests import test_train_cli_operations as operations
    code, log = operations._torchrun(operations._args(run_inputs, tmp_path, 8, "--activation-checkpointing",
                                                      "offload", "--tiled-mlp", "4"))
    assert code == 0, log[-3000:]
    assert "--activation-checkpointing offload: each decoder block's input waits in host memory" in log
    assert "--tiled-mlp 4: the MLP of 2 decoder blocks runs over sequence tiles" in log
    got, want = operations._train_losses(str(tmp_path)), operations._train_losses(str(reference_run))
    assert got.keys() == want.keys() and want
    for step, loss in want.items():
        assert got[step] == pytest.approx(loss, rel=1e-5), step


from tests.test_train_cli_operations import reference_run, run_inputs  # noqa: E402,F401  (session fixtures)
