"""Every model family on the parallel layouts: real DeepSpeed engines on real gloo ranks against tp=1, from
checkpoints built by ``transformers``, exported back and read by ``transformers`` again.

Each family is trained 3 steps from its checkpoint on each layout below and compared with tp=1 on the same
checkpoint (losses, and the parameters on every rank); Llama/Qwen2/Mistral are covered by
tests/test_model_tensor_parallel.py and the test_train_* files.

| family  | KV heads / heads         | layouts (tp × pp, ZeRO)                                             |
|---------|--------------------------|---------------------------------------------------------------------|
| Qwen3   | 2 / 8, q/k norms          | tp2 Z0, pp2 Z1, tp4 Z1 (k/v replicated), tp2 × dp2 Z3                |
| Gemma-2 | 2 / 4, soft-caps, window | tp2 Z1, pp2 Z1, tp2 × dp2 Z3 (tied embeddings)                       |
| Gemma-3 | 1 / 4, q/k norms, 2 RoPEs | tp2 Z2, tp2 × pp2 Z1, tp2 × dp2 Z3 (k/v replicated at every tp > 1)  |

Also: the TP gradient rule (parallel/layers.py) — every parameter a TP rank holds whole (norms, per-head q/k
norms, replicated k/v) has tp=1's gradient on every rank; the live export and the offline one
(tools/export_hf.py's path) are identical, hold the trained tensors at the HF shapes, and transformers reads
them with witscale's logits; a tp=4 checkpoint (k/v replicated) resumes at tp=2 (k/v split) through
DeepSpeed's universal checkpoint with the same weights.

The 4-rank layouts recompute each decoder block in backward (activation checkpointing: the TP gradient
rule inside a recomputed block, under ZeRO-3 and the pipeline). One launch per world size runs every
configuration; the module-scoped fixtures share them.
"""
import json
import os

import numpy as np
import pytest
import torch

from tests.distributed import run_distributed
from tests.train_helpers import ds_config, random_packed

pytestmark = pytest.mark.slow  # gloo ranks (tests/distributed.py)

BASE = dict(model_type="llama", vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
            num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=128, rms_norm_eps=1e-6,
            tie_word_embeddings=False, head_dim=8)   # vocab 64: another tp with vocabulary padding is refused
# 8 heads over 2 KV heads: split at tp 2, replicated at tp 4; per-head q/k norms.
QWEN3 = dict(BASE, model_type="qwen3")
# Soft-caps small enough to bite on these weights; a window of 8 on 32-token rows; tied embeddings.
GEMMA2 = dict(BASE, model_type="gemma2", num_attention_heads=4, num_key_value_heads=2,
              hidden_activation="gelu_pytorch_tanh", query_pre_attn_scalar=16, attn_logit_softcapping=2.0,
              final_logit_softcapping=3.0, sliding_window=8, tie_word_embeddings=True)
# One KV head (as Gemma-3-1B): replicated at every tp > 1; q/k norms; local and global RoPE.
GEMMA3 = dict(GEMMA2, model_type="gemma3_text", num_key_value_heads=1, attn_logit_softcapping=None,
              final_logit_softcapping=None, layer_types=["sliding_attention", "full_attention"])

# name → the HF config dict transformers builds the checkpoint from
FAMILIES = {"qwen3": QWEN3, "gemma2": GEMMA2, "gemma3": GEMMA3}
# Each configuration: (family, world, tp, pp, ZeRO stage). Every one is compared with (family, 1, 1, 1, 0).
LAYOUTS = [
    ("qwen3", 2, 2, 1, 0), ("qwen3", 2, 1, 2, 1), ("gemma2", 2, 2, 1, 1), ("gemma2", 2, 1, 2, 1),
    ("gemma3", 2, 2, 1, 2),
    ("qwen3", 4, 4, 1, 1), ("qwen3", 4, 2, 1, 3),
    ("gemma2", 4, 2, 1, 3), ("gemma3", 4, 2, 2, 1), ("gemma3", 4, 2, 1, 3),
]
# A checkpoint of one layout resumed at another tp: (layout that wrote it, world = tp of the resumed run).
# Qwen3 tp 4 → 2: k/v replicated when written, split when read back; q/k norms replicated at both.
RESUMES = [(("qwen3", 4, 4, 1, 1), 2)]
STEPS = 3


def _hf_checkpoint(config: dict, out: str) -> None:
    """A tiny random model saved by transformers (safetensors), with weights drawn at std 0.1 so that 3
    steps move the loss measurably."""
    import transformers

    cfg = transformers.AutoConfig.for_model(**config)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2:
                p.normal_(0, 0.1)
            else:       # norms away from their neutral value, so a misplaced norm weight shows
                p.add_(torch.randn_like(p), alpha=0.1)
    model.save_pretrained(out, safe_serialization=True)


def family_worker(rank, world, *, model_dir, tp=1, pp=1, stage=0, steps=STEPS, out=None, probe=False,
                  resume=None, activation_checkpointing=False):
    """Load ``model_dir``, train ``steps`` steps of grad-accum 4 (over dp) at tp × pp; return the losses,
    the dense parameters, with ``probe`` (pp=1, no ZeRO-3) one micro-batch's loss and this rank's own
    gradients, and with ``out`` a checkpoint, the run's model config and a live fp32 export under ``out``.
    ``resume``: instead, load that checkpoints directory (written at another tp) through DeepSpeed's
    universal checkpoint and return its dense parameters."""
    from witscale.data.loader import PackedLoader
    from witscale.data.weighting import build_weight_table
    from witscale.model import ModelConfig
    from witscale.parallel.topology import ParallelDims, Topology
    from witscale.training import checkpoint
    from witscale.training.build import build_module
    from witscale.training.distributed import init_distributed
    from witscale.training.export import export_from_engine
    from witscale.training.trainer import Trainer

    init_distributed()
    cfg = ModelConfig.from_hf_dir(model_dir)
    topo = Topology(ParallelDims(world, tp, pp, stage, cfg))
    accum = 4 // topo.dp
    conf = ds_config(stage, 1, accum, topo.dp)
    torch.manual_seed(0)
    module = build_module(cfg, topo, conf, model_dir=model_dir, seed=0,
                          activation_checkpointing=activation_checkpointing)
    loader = PackedLoader(random_packed(8, 32, cfg.vocab_size, 1), build_weight_table(0.3, 1.0),
                          micro_batch_size=1, grad_accum=accum, dp_size=topo.dp, dp_rank=topo.dp_rank, seed=0)
    probed = _probe(module, loader, tp) if probe else None
    # eps=1e-6: Adam turns a ~0 gradient into a ±lr step whose sign is summation-order noise (see
    # tests/test_model_tensor_parallel.py); a larger eps keeps the comparison about the layout.
    trainer = Trainer(module=module, ds_config=conf, loader=loader, topo=topo, normalization="nonzero", lr=1e-3,
                      weight_decay=0.0, betas=(0.9, 0.999), eps=1e-6, total_steps=steps, warmup_ratio=0.0,
                      activation_checkpointing=activation_checkpointing)
    if resume:
        checkpoint.load(trainer.engine, resume, checkpoint.read_latest(resume), universal=True, topo=topo)
        return {"params": {k: v.numpy() for k, v in trainer.full_dense_state_dict().items()}}
    results = [trainer.train_step(loader.next_step()) for _ in range(steps)]
    losses, grad_norms = [r.loss for r in results], [r.grad_norm for r in results]
    params = {k: v.numpy() for k, v in trainer.full_dense_state_dict().items()}
    if out:
        checkpoint.save(trainer.engine, os.path.join(out, "checkpoints"), steps, {"step": steps}, keep=1)
        if rank == 0:
            with open(os.path.join(out, "model_config.json"), "w") as f:
                json.dump(cfg.to_hf_dict(), f)
        export_from_engine(trainer, cfg, os.path.join(out, "live"), dtype="fp32")
    return {"losses": losses, "grad_norms": grad_norms, "params": params, "probe": probed, "tp_rank": topo.tp_rank,
            "pp_rank": topo.pp_rank}


def _probe(module, loader, tp):
    """The weighted loss of one micro-batch and this rank's own gradient of every parameter it holds whole
    (the replicated ones; all of them at tp=1)."""
    mb = loader.make_micro_batch(loader.global_batch_rows(0, 0)[:1])
    stats = module(mb.input_ids, mb.position_ids, mb.cu_seqlens, mb.max_seqlen, mb.labels, mb.weights,
                   mb.target_classes)
    module.zero_grad()
    stats.weighted_sum.backward()
    grads = {n: p.grad.clone().numpy() for n, p in module.named_parameters()
             if tp == 1 or getattr(p, "tp_split_dim", None) is None}
    module.zero_grad()
    return {"loss_sum": float(stats.weighted_sum), "grads": grads}


def _many(rank, world, runs):
    # Several configurations per launch: process and DeepSpeed start-up dominate these tiny runs.
    return [family_worker(rank, world, **kw) for kw in runs]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf")
    for name, config in FAMILIES.items():
        _hf_checkpoint(config, str(root / name))
    return root


@pytest.fixture(scope="module")
def runs(checkpoints, tmp_path_factory):
    """{(family, world, tp, pp, stage): [rank results]} for the tp=1 references and every layout."""
    out_root = tmp_path_factory.mktemp("runs")
    by_world: dict[int, list] = {}
    keys = [(f, 1, 1, 1, 0) for f in FAMILIES] + LAYOUTS
    for key in keys:
        family, world, tp, pp, stage = key
        out = str(out_root / "-".join(map(str, key)))
        by_world.setdefault(world, []).append((key, dict(model_dir=str(checkpoints / family), tp=tp, pp=pp,
                                                         stage=stage, out=out if world > 1 else None,
                                                         probe=pp == 1 and stage < 3,
                                                         activation_checkpointing=world == 4)))
    for written, world in RESUMES:
        by_world.setdefault(world, []).append((("resume", written, world), dict(
            model_dir=str(checkpoints / written[0]), tp=world, stage=written[4],
            resume=str(out_root / "-".join(map(str, written)) / "checkpoints"))))
    writers = {w for (_, w, *_), _ in RESUMES}
    assert not writers & {w for _, w in RESUMES}, "a resume must run in a later launch than its writer"
    results = {}
    # The worlds whose runs write the checkpoints to resume go first; the resumes run in their world's launch.
    for world in sorted(by_world, key=lambda w: (w not in writers, w)):
        entries = by_world[world]
        ranks = run_distributed(_many, world, [kw for _, kw in entries], timeout=600)
        for i, (key, kw) in enumerate(entries):
            results[key] = {"ranks": [r[i] for r in ranks], "out": kw.get("out")}
    return results


def _close(a, b, atol, what):
    assert a.keys() == b.keys(), f"{what}: {sorted(set(a) ^ set(b))}"
    for name in a:
        np.testing.assert_allclose(a[name], b[name], rtol=0, atol=atol, err_msg=f"{what}: {name}")


def _tensors(hf_dir):
    from safetensors.torch import load_file
    files = sorted(f for f in os.listdir(hf_dir) if f.endswith(".safetensors"))
    return {k: v for f in files for k, v in load_file(os.path.join(hf_dir, f)).items()}


@pytest.mark.parametrize("layout", LAYOUTS, ids=lambda k: f"{k[0]}-tp{k[2]}-pp{k[3]}-zero{k[4]}")
def test_layout_trains_like_tp1(runs, checkpoints, layout):
    """Losses and parameters after 3 steps against tp=1 from the same HF checkpoint; every rank agrees."""
    ref = runs[(layout[0], 1, 1, 1, 0)]["ranks"][0]
    got = runs[layout]["ranks"]
    start = _tensors(str(checkpoints / layout[0]))
    moved = min(np.abs(ref["params"][k] - start[k].numpy()).max() for k in start)
    assert moved > 5e-4, "every tensor must have trained (3 Adam steps of lr 1e-3)"
    last = [r for r in got if r["pp_rank"] == layout[3] - 1][0]
    np.testing.assert_allclose(last["losses"], ref["losses"], rtol=1e-5)
    # The gradient norm counts each replicated parameter (norms, q/k norms, replicated k/v) once per replica.
    assert None not in last["grad_norms"] + ref["grad_norms"]
    np.testing.assert_allclose(last["grad_norms"], ref["grad_norms"], rtol=1e-5)
    for r in got:
        _close(r["params"], ref["params"], 2e-5, f"{layout} rank tp {r['tp_rank']} pp {r['pp_rank']}")


@pytest.mark.parametrize("layout", LAYOUTS, ids=lambda k: f"{k[0]}-tp{k[2]}-pp{k[3]}-zero{k[4]}")
def test_export_live_and_offline_give_the_hf_layout(runs, layout, tmp_path):
    """The live export and the offline one (tools/export_hf.py's path, from the checkpoint) hold the HF
    tensors of the trained model — replicated k/v once, at the HF shape — and transformers reads them with
    the logits of witscale's tp=1 model on the same files."""
    import transformers

    from witscale.model import CausalLM, ModelConfig, load_hf_weights
    from witscale.training.export import export_checkpoint

    ref = runs[(layout[0], 1, 1, 1, 0)]["ranks"][0]["params"]
    out = runs[layout]["out"]
    live = _tensors(os.path.join(out, "live"))
    cfg = ModelConfig.from_json_file(os.path.join(out, "model_config.json"))
    expected = {k: v for k, v in ref.items() if not (cfg.tie_word_embeddings and k == "lm_head.weight")}
    _close({k: v.numpy() for k, v in live.items()}, expected, 2e-5, f"{layout} live export")
    export_checkpoint(os.path.join(out, "checkpoints"), str(tmp_path / "offline"), dtype="fp32")
    offline = _tensors(str(tmp_path / "offline"))
    _close({k: v.numpy() for k, v in offline.items()}, {k: v.numpy() for k, v in live.items()}, 0,
           f"{layout} offline vs live export")

    hf = transformers.AutoModelForCausalLM.from_pretrained(os.path.join(out, "live"), dtype=torch.float32,
                                                           attn_implementation="eager").eval()
    ours = CausalLM(cfg).eval()
    load_hf_weights(ours, os.path.join(out, "live"))
    ids = torch.randint(3, cfg.vocab_size, (1, 20))
    with torch.no_grad():
        want = hf(ids).logits
        pos, cu = torch.arange(20)[None], torch.tensor([0, 20], dtype=torch.int32)
        got = ours.compute_logits(ours(ids, pos, cu, 20))
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)


@pytest.mark.parametrize("layout", [k for k in LAYOUTS if k[3] == 1 and k[4] < 3],
                         ids=lambda k: f"{k[0]}-tp{k[2]}-zero{k[4]}")
def test_replicated_parameters_get_the_full_gradient_on_every_tp_rank(runs, layout):
    """The TP gradient rule (parallel/layers.py): every parameter a TP rank holds whole — norms, per-head
    q/k norms, replicated k/v — has, on every rank, the gradient tp=1 computes for the dense model. The ones
    that see sharded activations would otherwise hold a partial gradient differing from rank to rank."""
    ref = runs[(layout[0], 1, 1, 1, 0)]["ranks"][0]["probe"]
    for r in runs[layout]["ranks"]:
        got = r["probe"]
        assert got["loss_sum"] == pytest.approx(ref["loss_sum"], rel=1e-6)
        assert got["grads"], "no replicated parameter probed"
        for name, g in got["grads"].items():      # sums in another order: fp32 rounding, relative to the tensor
            want = ref["grads"][name]
            np.testing.assert_allclose(g, want, rtol=0, atol=1e-5 * max(1.0, float(np.abs(want).max())),
                                       err_msg=f"{layout} tp rank {r['tp_rank']}: {name}")


@pytest.mark.parametrize("resume", RESUMES, ids=lambda r: f"{r[0][0]}-tp{r[0][2]}-to-tp{r[1]}")
def test_checkpoint_resumes_at_another_tp(runs, resume):
    """A checkpoint written with replicated k/v resumes, through DeepSpeed's universal checkpoint, at a tp
    where k/v are split (or the other way): the dense weights are the ones written."""
    written, world = resume
    saved = runs[written]["ranks"][0]["params"]
    for r in runs[("resume", written, world)]["ranks"]:
        _close(r["params"], saved, 0, f"{written} resumed at tp={world}")
