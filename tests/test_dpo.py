"""--objective dpo: the loss and its gradient through the fused kernel, every layout, the precomputed reference.

The DPO formula is written out here in fp64 against `transformers` forwards one sequence at a time; the
layouts (tp=2, pp=2, ZeRO-3 dp=2) are held to one rank with real DeepSpeed engines on real gloo ranks.
"""
from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch

from tests.distributed import run_distributed
from tests.train_helpers import TINY, ds_config

P, R = 3, 4   # TokenClass.PROMPT, TokenClass.RESPONSE (the test's documents: prompt…, response…, eot)
EOT = 5


# --- preference micro-batches made by hand (the contract of witscale/data/loader.py) -----------------------
def make_pairs(rng, n_pairs, vocab, prompt_len=(2, 6), completion_len=(2, 7)):
    """Pairs of documents [prompt…, completion…, eot]: the same prompt, two different completions."""
    pairs = []
    for _ in range(n_pairs):
        prompt = rng.integers(3, vocab, size=int(rng.integers(*prompt_len)))
        docs = []
        for _role in (0, 1):
            completion = rng.integers(3, vocab, size=int(rng.integers(*completion_len)))
            tokens = np.concatenate([prompt, completion, rng.integers(3, vocab, size=1)])
            classes = np.array([P] * len(prompt) + [R] * len(completion) + [EOT], dtype=np.uint8)
            docs.append((tokens.astype(np.int32), classes))
        pairs.append(docs)
    return pairs


def micro_batch(rows, seq_len, table, reference=None):
    """rows: per row a list of pairs (each [chosen (tokens, classes), rejected (…)]) → a preference MicroBatch
    (doc_index, doc_role, doc_pair, reference_logps as the loader's contract says)."""
    from witscale.data.loader import MicroBatch, row_targets, segment_lengths

    ids, labs, wts, tcs, poss, segs, doc_index = [], [], [], [], [], [], []
    roles, pair_of = [], []
    d = 0
    for r, pairs in enumerate(rows):
        tokens = np.zeros(seq_len, np.int32)
        classes = np.zeros(seq_len, np.uint8)
        lengths, pos = [], 0
        index = np.full(seq_len, -1, np.int64)
        for p_local, pair in enumerate(pairs):
            for role, (t, c) in enumerate(pair):
                tokens[pos:pos + len(t)] = t
                classes[pos:pos + len(t)] = c
                index[pos:pos + len(t) - 1] = d     # targets of this document (its last token predicts nothing)
                lengths.append(len(t))
                roles.append(role)
                pair_of.append(len(pair_of) // 2)
                pos += len(t)
                d += 1
        labels, weights, tclasses, positions, _ = row_targets(tokens, classes, None, np.array(lengths), table)
        index[labels == -100] = -1
        ids.append(tokens.astype(np.int64))
        labs.append(labels)
        wts.append(weights)
        tcs.append(tclasses)
        poss.append(positions)
        segs.extend(segment_lengths(np.array(lengths), seq_len))
        doc_index.append(index)
    cu = np.zeros(len(segs) + 1, np.int32)
    np.cumsum(segs, out=cu[1:])
    mb = MicroBatch(torch.from_numpy(np.stack(ids)), torch.from_numpy(np.stack(labs)),
                    torch.from_numpy(np.stack(wts)), torch.from_numpy(np.stack(tcs)),
                    torch.from_numpy(np.stack(poss)), torch.from_numpy(cu), int(max(segs)))
    ref = (torch.full((d,), float("nan"), dtype=torch.float64) if reference is None
           else torch.as_tensor(reference, dtype=torch.float64))
    extra = dict(doc_index=torch.from_numpy(np.stack(doc_index)), doc_role=torch.tensor(roles, dtype=torch.int64),
                 doc_pair=torch.tensor(pair_of, dtype=torch.int64), reference_logps=ref)
    return _with_preference(mb, extra)


def _with_preference(mb, extra):
    if all(hasattr(mb, k) for k in extra):       # the loader's MicroBatch carries them
        return dataclasses.replace(mb, **extra)
    for k, v in extra.items():                   # before it does: plain attributes
        setattr(mb, k, v)
    return mb


def dpo_table():
    from witscale.data.weighting import build_weight_table
    return build_weight_table(0.0, 1.0)


# --- the independent implementation: transformers, one sequence at a time, fp64 --------------------------
def hf_model(seed, dtype=torch.float64):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(**{k: v for k, v in TINY.items() if k != "model_type"})
    return transformers.LlamaForCausalLM(cfg).to(dtype).eval()


def hf_sequence_logp(model, tokens, classes, table):
    """Σ_t w(class of token t)·log p(token t | tokens < t), t ≥ 1, from a full-logits forward."""
    ids = torch.as_tensor(np.asarray(tokens, np.int64))[None]
    logprobs = torch.log_softmax(model(input_ids=ids).logits[0].double(), dim=-1)
    w = torch.as_tensor(np.asarray(table, np.float64)[np.asarray(classes[1:], np.int64)])
    return (w * logprobs[:-1].gather(1, ids[0, 1:, None]).squeeze(1)).sum()


def dpo_formula(pol_c, pol_r, ref_c, ref_r, beta, loss="sigmoid", eps=0.0):
    """The DPO (or IPO) loss of one pair, as in the papers (Rafailov et al. 2023; Azar et al. 2023)."""
    margin = (pol_c - ref_c) - (pol_r - ref_r)
    if loss == "ipo":
        return (margin - 1 / (2 * beta)) ** 2
    z = beta * margin
    return -(1 - eps) * torch.nn.functional.logsigmoid(z) - eps * torch.nn.functional.logsigmoid(-z)


@pytest.mark.parametrize("loss,eps", [("sigmoid", 0.0), ("sigmoid", 0.1), ("ipo", 0.0)])
def test_loss_and_gradients_equal_transformers_fp64(loss, eps):
    """witscale's DPO through the fused kernel (one micro-batch, two packed rows, three pairs) against the
    formula on per-sequence transformers forwards in fp64, the reference model different from the policy."""
    from witscale.model import CausalLM, ModelConfig
    from witscale.training.objectives.dpo import DPO_SUMS, DPOLoss, DPOSettings

    beta = 0.5 if loss == "sigmoid" else 2.0
    table = dpo_table()
    rng = np.random.default_rng(3)
    pairs = make_pairs(rng, 3, TINY["vocab_size"])
    policy, reference = hf_model(0), hf_model(1)
    with torch.no_grad():
        ref_logps = [float(hf_sequence_logp(reference, t, c, table)) for pair in pairs for t, c in pair]
    # Policy side of the formula, with autograd in fp64.
    logp = [hf_sequence_logp(policy, t, c, table) for pair in pairs for t, c in pair]
    per_pair = [dpo_formula(logp[2 * i], logp[2 * i + 1], ref_logps[2 * i], ref_logps[2 * i + 1], beta, loss, eps)
                for i in range(len(pairs))]
    want_loss = torch.stack(per_pair).sum() / len(pairs)
    want_loss.backward()
    want_grads = {n: p.grad.double() for n, p in policy.named_parameters()}

    ours = CausalLM(ModelConfig.from_dict(TINY))
    ours.load_state_dict({k: v.float() for k, v in policy.state_dict().items()}, strict=True)
    mb = micro_batch([pairs[:2], pairs[2:]], seq_len=40, table=table, reference=ref_logps)
    settings = DPOSettings(beta=beta, loss=loss, label_smoothing=eps)
    stats = ours(mb.input_ids, mb.position_ids, mb.cu_seqlens, mb.max_seqlen, mb.labels, mb.weights,
                 mb.target_classes, objective=DPOLoss(settings, mb.doc_index, mb.doc_role, mb.doc_pair,
                                                      mb.reference_logps))
    (stats.weighted_sum / len(pairs)).backward()
    sums = dict(zip(DPO_SUMS, stats.dpo_sums.tolist()))
    assert sums["pairs"] == 3
    assert sums["loss"] / 3 == pytest.approx(float(want_loss), rel=2e-5, abs=1e-6)
    with torch.no_grad():
        lc = sum(float(logp[i]) for i in (0, 2, 4))
        lr = sum(float(logp[i]) for i in (1, 3, 5))
        rc = sum(beta * (float(logp[i]) - ref_logps[i]) for i in (0, 2, 4))
        rr = sum(beta * (float(logp[i]) - ref_logps[i]) for i in (1, 3, 5))
        acc = sum(float(logp[i]) - ref_logps[i] > float(logp[i + 1]) - ref_logps[i + 1] for i in (0, 2, 4))
    np.testing.assert_allclose([sums["logps_chosen"], sums["logps_rejected"], sums["rewards_chosen"],
                                sums["rewards_rejected"]], [lc, lr, rc, rr], rtol=2e-5, atol=1e-5)
    assert sums["reward_accuracy"] == acc
    scale = max(g.abs().max() for g in want_grads.values())
    assert scale > 1e-3, "the gradient must not vanish (else the test proves little)"
    for name, p in ours.named_parameters():
        np.testing.assert_allclose(p.grad.double().numpy(), want_grads[name].numpy(), rtol=0,
                                   atol=2e-5 * float(scale), err_msg=name)


# --- every layout against one rank ---------------------------------------------------------------------
GLOBAL_ROWS = 4          # rows per optimizer step, whatever the layout (micro 1 × accum × dp)
SEQ = 64


def layout_data(steps, seed=5):
    """Rows of 1-3 whole pairs, GLOBAL_ROWS per step, and reference log-probs near the policy's."""
    rng = np.random.default_rng(seed)
    rows = [make_pairs(rng, int(rng.integers(1, 4)), TINY["vocab_size"], completion_len=(2, 5))
            for _ in range(steps * GLOBAL_ROWS)]
    refs = [[-4.2 * (np.count_nonzero(c == R) + 1) + rng.normal(0, 0.5) for pair in row for t, c in pair]
            for row in rows]
    return rows, refs


def dpo_worker(rank, world, *, tp=1, pp=1, sp=1, stage=0, steps=3, lr=1e-3, beta=0.5, loss="sigmoid", objective=None,
               table=None):
    """``steps`` DPO steps of GLOBAL_ROWS rows on a tp × pp × dp layout (hand-made micro-batches, the real
    Trainer and DeepSpeed engine); returns the step results and the dense parameters. ``objective`` (another
    pair objective, tests/test_simpo_orpo.py) replaces DPO, ``table`` the DPO class weights."""
    from witscale.data.loader import StepBatch
    from witscale.model import ModelConfig
    from witscale.parallel.topology import ParallelDims, Topology
    from witscale.training.build import build_module
    from witscale.training.distributed import init_distributed
    from witscale.training.objectives.dpo import DPO, DPOSettings
    from witscale.training.trainer import Trainer

    init_distributed()
    cfg = ModelConfig.from_dict(TINY)
    topo = Topology(ParallelDims(world, tp, pp, stage, cfg, sp=sp))
    accum = GLOBAL_ROWS // topo.dp
    config = ds_config(stage, 1, accum, topo.dp)
    torch.manual_seed(0)
    module = build_module(cfg, topo, config, model_dir=None, seed=0)
    trainer = Trainer(module=module, ds_config=config, loader=None, topo=topo, normalization="nonzero", lr=lr,
                      weight_decay=0.0, betas=(0.9, 0.999), eps=1e-8, total_steps=steps, warmup_ratio=0.0,
                      objective=objective or DPO(DPOSettings(beta=beta, loss=loss)))
    rows, refs = layout_data(steps)
    table = dpo_table() if table is None else table
    results = []
    for step in range(steps):
        batch = list(range(step * GLOBAL_ROWS, (step + 1) * GLOBAL_ROWS))
        mine = [batch[m * topo.dp + topo.dp_rank] for m in range(accum)]      # the loader's rank_micro_rows
        mbs = [micro_batch([rows[r]], SEQ, table, reference=refs[r]) for r in mine]
        pairs = float(sum(len(rows[r]) for r in batch))
        results.append(trainer.train_step(StepBatch(mbs, {"pairs": pairs}, 1, GLOBAL_ROWS * SEQ, 0, step)).as_dict())
    params = trainer.full_dense_state_dict()
    # Evaluation over 5 rows (dp=2: 3 + 2, the short rank scores a micro-batch without completions).
    evaluated = trainer.evaluate(_EvalRows(rows[:5], refs[:5], table))
    return {"results": results, "params": {k: v.numpy() for k, v in params.items()}, "eval": evaluated}


class _EvalRows:
    """What Trainer.evaluate reads of a loader, over hand-made preference rows."""

    def __init__(self, rows, refs, table):
        self.dataset, self.refs, self.table, self.micro_batch_size = rows, refs, table, 1

    def make_micro_batch(self, chunk):
        return micro_batch([self.dataset[int(r)] for r in chunk], SEQ, self.table,
                           reference=[x for r in chunk for x in self.refs[int(r)]])


def _layouts(rank, world, runs):
    return [dpo_worker(rank, world, **kw) for kw in runs]


@pytest.fixture(scope="module")
def one_rank():
    return run_distributed(_layouts, 1, [dict(), dict(loss="ipo")])[0]


DPO_KEYS = ("loss", "logps_chosen", "logps_rejected", "rewards_chosen", "rewards_rejected", "reward_margin",
            "reward_accuracy", "pairs", "grad_norm")


def _same_run(got, want, what, atol=1e-5):
    for a, b in zip(got["results"], want["results"]):
        for key in DPO_KEYS:
            assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-6), f"{what}: {key}"
    for name in want["params"]:
        np.testing.assert_allclose(got["params"][name], want["params"][name], rtol=0, atol=atol,
                                   err_msg=f"{what}: {name}")
    assert want["eval"]["eval_pairs"] == sum(len(r) for r in layout_data(3)[0][:5])
    for key in ("eval_loss", "eval_reward_margin", "eval_reward_accuracy", "eval_logps_chosen", "eval_pairs"):
        assert got["eval"][key] == pytest.approx(want["eval"][key], rel=1e-5, abs=1e-6), f"{what}: {key}"


@pytest.mark.slow
def test_tp2_pp2_and_zero3_dp2_equal_one_rank(one_rank):
    """Three DPO steps (losses, rewards, accuracy, parameters) at tp=2, pp=2 and ZeRO-3 dp=2 (grad-accum 2:
    the same global batch) equal one rank; the pairs are divided over the GLOBAL batch (a per-rank or
    per-micro-batch pair count would change the dp=2 run)."""
    ref = one_rank[0]
    assert ref["results"][0]["pairs"] == sum(len(r) for r in layout_data(3)[0][:GLOBAL_ROWS])
    tp2, pp2, zero3, pp2_ipo = run_distributed(
        _layouts, 2, [dict(tp=2), dict(pp=2), dict(stage=3), dict(pp=2, loss="ipo")], timeout=400)[0]
    _same_run(tp2, ref, "tp=2")
    _same_run(pp2, ref, "pp=2")
    _same_run(zero3, ref, "ZeRO-3 dp=2")
    _same_run(pp2_ipo, one_rank[1], "pp=2 ipo")


# --- the precomputed reference and the CLI ---------------------------------------------------------------
def _load_tool():
    import importlib.util
    import os

    from tests.conftest import REPO_ROOT
    spec = importlib.util.spec_from_file_location("precompute_reference",
                                                  os.path.join(REPO_ROOT, "tools", "precompute_reference.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _precompute_worker(rank, world, jobs):
    """Several tools/precompute_reference.py runs (each on its own copy of the data) in one spawn."""
    tool = _load_tool()
    for argv in jobs:
        tool.run(tool.build_parser().parse_args(argv))
    return True


def write_preference_data(path, pairs):
    """A packed preference dataset through the packer's writer (pairs as make_pairs gives them)."""
    from witscale.data.format import TokenizedCorpus, write_packed

    docs = [(t, c, None) for pair in pairs for t, c in pair]
    write_packed(str(path), TokenizedCorpus.from_documents(docs), seq_len=SEQ, pad_id=0,
                 tokenizer={"vocab_size": TINY["vocab_size"]}, task="preference")
    return str(path)


@pytest.fixture(scope="module")
def pref(tmp_path_factory):
    """A preference dataset (90 pairs), a reference HF model, its log-probs precomputed at tp=2, and the same
    at ZeRO-3 dp=2, pp=2 and sp=2 into copies; a policy config; and the reference's log-probs by transformers."""
    import json
    import os
    import shutil

    root = tmp_path_factory.mktemp("dpo")
    pairs = make_pairs(np.random.default_rng(11), 90, TINY["vocab_size"], completion_len=(2, 6))
    data = write_preference_data(root / "train", pairs)
    copies = {name: str(root / name) for name in ("zero3", "pp2", "sp2")}
    for c in copies.values():
        shutil.copytree(data, c)
    shutil.copytree(data, root / "no_reference")
    reference = hf_model(1, torch.float32)
    reference.save_pretrained(str(root / "reference"))
    other = hf_model(2, torch.float32)
    other.save_pretrained(str(root / "other"))
    from tests.conftest import REPO_ROOT
    ds = os.path.join(REPO_ROOT, "ds_configs", "zero3.json")
    common = ["--model", str(root / "reference"), "--micro-batch-size", "2"]
    run_distributed(_precompute_worker, 2, [["--data", data, "--tp", "2", *common],
                                            ["--data", copies["zero3"], "--ds_config", ds, *common],
                                            ["--data", copies["pp2"], "--pp", "2", *common],
                                            ["--data", copies["sp2"], "--sp", "2", *common]], timeout=300)
    with open(root / "policy.json", "w") as f:
        json.dump(TINY, f)
    from witscale.data.format import PackedDataset
    ds_train = PackedDataset(data)
    table = dpo_table()
    reference64 = reference.double()
    with torch.no_grad():       # the live reference forward, one sequence at a time, document order
        live = []
        for d, length in enumerate(np.asarray(ds_train._doc_lengths)):
            row = int(np.searchsorted(ds_train._row_offsets, d, side="right") - 1)
            start = int(sum(ds_train.doc_lengths(row)[:d - ds_train.doc_range(row)[0]]))
            tokens = ds_train.tokens[row, start:start + length]
            classes = ds_train.classes[row, start:start + length]
            live.append(float(hf_sequence_logp(reference64, tokens, classes, table)))
    return {"root": root, "data": data, "copies": copies, "no_reference": str(root / "no_reference"),
            "reference": str(root / "reference"), "other": str(root / "other"), "policy": str(root / "policy.json"),
            "live": np.array(live)}


@pytest.mark.slow
def test_precomputed_reference_equals_a_live_forward(pref):
    """reference_logps.bin (tp=2; ZeRO-3 dp=2 and pp=2 identical to it) equals transformers' fp64 per-sequence
    log-probs of each completion's response tokens; the manifest records the model, fingerprint and weights."""
    from witscale.data.format import PackedDataset
    from witscale.training.objectives.dpo import reference_fingerprint

    ds = PackedDataset(pref["data"])
    got = np.asarray(ds.reference_logps)
    assert got.shape == pref["live"].shape and np.all(got < 0)
    np.testing.assert_allclose(got, pref["live"], rtol=1e-5, atol=1e-4)
    for name, path in pref["copies"].items():
        np.testing.assert_allclose(np.asarray(PackedDataset(path).reference_logps), got, rtol=1e-6, atol=1e-5,
                                   err_msg=name)
    meta = ds.manifest["reference"]
    assert meta["fingerprint"] == reference_fingerprint(pref["reference"]) != reference_fingerprint(pref["other"])
    assert meta["weight_table"] == [float(x) for x in dpo_table()] and meta["layout"]["tp"] == 2


@pytest.mark.slow
def test_reference_log_probs_at_sp2_equal_sp1(pref):
    """tools/precompute_reference.py --sp 2 (2 ranks, dp 1, ZeRO-0: each rank holds half of every row, its
    per-completion sums added over the sp group) writes the log-probs the sp-1 passes wrote (ZeRO-3 dp 2 and
    tp 2; fp32), to rtol 1e-6, completions crossing the cut included; the manifest records sp 2."""
    from witscale.data.format import PackedDataset

    ds = PackedDataset(pref["copies"]["sp2"])
    crossing = 0
    for row in range(len(ds)):
        ends = np.cumsum(ds.doc_lengths(row))
        crossing += int(((ends - ds.doc_lengths(row) < SEQ // 2) & (ends > SEQ // 2)).sum())
    assert crossing >= 10, crossing
    got = np.asarray(ds.reference_logps)
    for sp1 in (pref["copies"]["zero3"], pref["data"]):
        np.testing.assert_allclose(got, np.asarray(PackedDataset(sp1).reference_logps), rtol=1e-6, atol=0,
                                   err_msg=sp1)
    assert ds.manifest["reference"]["layout"] == {"dp": 1, "tp": 1, "pp": 1, "sp": 2}


def _forward_only_engine_worker(rank, world, stage):
    from witscale.data.loader import PackedLoader
    from witscale.model import ModelConfig
    from witscale.parallel.topology import ParallelDims, Topology
    from witscale.training.build import build_module
    from witscale.training.distributed import init_distributed
    from witscale.training.trainer import Trainer
    from tests.train_helpers import random_packed

    init_distributed()
    cfg = ModelConfig.from_dict(dict(TINY))
    topo = Topology(ParallelDims(world, 1, 1, stage, cfg))
    config = ds_config(stage, 1, 1, topo.dp)
    module = build_module(cfg, topo, config, model_dir=None, seed=0)
    loader = PackedLoader(random_packed(4, 32, cfg.vocab_size, 1), dpo_table(), micro_batch_size=1, grad_accum=1,
                          dp_size=topo.dp, dp_rank=topo.dp_rank)
    out = {}
    for keep in (True, False):
        trainer = Trainer(module=module if keep else build_module(cfg, topo, config, model_dir=None, seed=0),
                          ds_config=config, loader=loader, topo=topo, normalization="nonzero", lr=1e-3,
                          weight_decay=0.0, betas=(0.9, 0.999), eps=1e-8, total_steps=1, warmup_ratio=0.0,
                          optimizer_state=keep)
        opt = trainer.optimizer
        out[keep] = (type(opt).__name__, any(hasattr(opt, a) for a in (
            "fp32_partitioned_groups_flat", "single_partition_of_fp32_groups", "bit16_groups")))
        if not keep:
            try:
                trainer.train_step(None)
                out["refused"] = False
            except RuntimeError as e:
                out["refused"] = "forward passes only" in str(e)
    return out


@pytest.mark.slow
@pytest.mark.parametrize("stage", [1, 3])
def test_reference_pass_engine_holds_no_optimizer_state(stage):
    """precompute_reference's engine (Trainer(optimizer_state=False)): under ZeRO-1 no optimizer at all, under
    ZeRO-3 only DeepSpeed's parameter coordinator — no fp32 master partitions, gradient partitions or Adam
    moments, which training at the same layout holds (at 70B on 64 GPUs under ZeRO-3: ≈14 GiB per GPU);
    train_step refused. Its log-probs equal training's engine's (test_precomputed_reference_equals_a_live_forward)."""
    got = run_distributed(_forward_only_engine_worker, 2, stage)[0]
    assert got[True][1], got                                       # training's engine: a ZeRO optimizer with masters
    assert got[False] == (("NoneType", False) if stage == 1 else ("DeepSpeedZeRoOffload", False)), got
    assert got["refused"], got


@pytest.mark.slow
def test_precompute_replaces_damaged_reference_logps(pref, tmp_path):
    """A dataset whose reference_logps.bin no longer matches its manifest (a crash between two passes, a copy
    gone wrong) is refused by training with "recompute it" — and precompute_reference.py, the tool that error
    names, opens it and plans the pass (it used to refuse to open it)."""
    import shutil

    from witscale.data.errors import DataError
    from witscale.data.format import PackedDataset
    data = tmp_path / "damaged"
    shutil.copytree(pref["data"], data)
    values = np.fromfile(data / "reference_logps.bin", dtype="<f8")
    (values - 1).astype("<f8").tofile(data / "reference_logps.bin")
    with pytest.raises(DataError, match="recompute it"):
        PackedDataset(str(data))
    tool = _load_tool()
    dataset, *_ = tool.plan(tool.build_parser().parse_args(["--data", str(data), "--model", pref["reference"]]), 1)
    assert dataset.reference_logps is None and dataset.manifest["reference"]["fingerprint"]


def _dpo_args(pref, out, steps, *extra):
    return ["--ds_config", "ds_configs/zero3.json", "--data", pref["data"], "--model-config", pref["policy"],
            "--output-dir", str(out), "--objective", "dpo", "--beta", "0.2", "--micro-batch-size", "1",
            "--grad-accum", "2", "--lr", "3e-3", "--max-steps", str(steps), "--seed", "3", "--warmup-ratio", "0",
            *extra]


@pytest.mark.slow
def test_cli_dpo_trains_evaluates_and_resumes_bit_exactly(pref, tmp_path):
    """witscale/train.py --objective dpo under torchrun (2 ranks, ZeRO-3): metrics (loss, rewards, accuracy)
    in metrics.jsonl and TensorBoard, --eval-data; resumed from the step-2 checkpoint (mid-epoch) in a fresh
    run, steps 3-4 are bit-identical."""
    import json

    from tests.test_train_cli_operations import _torchrun

    ref_out, out = tmp_path / "straight", tmp_path / "killed"
    code, log = _torchrun(_dpo_args(pref, ref_out, 4, "--eval-data", pref["data"], "--save-steps", "2",
                                    "--reference-model", pref["reference"]))
    assert code == 0, log
    assert "objective: DPO (sigmoid, β 0.2)" in log
    rows = [json.loads(line) for line in open(ref_out / "metrics.jsonl")]
    train = [r for r in rows if "loss" in r]
    assert [r["step"] for r in train] == [1, 2, 3, 4]
    for r in train:
        assert 0 <= r["reward_accuracy"] <= 1 and r["pairs"] > 0 and math.isfinite(r["loss"])
        assert r["reward_margin"] == pytest.approx(r["rewards_chosen"] - r["rewards_rejected"])
    evals = [r for r in rows if "eval_loss" in r]
    assert evals and all(math.isfinite(r["eval_loss"]) and "eval_reward_accuracy" in r for r in evals)
    tb = list((ref_out / "tensorboard").glob("events.*"))
    assert tb and b"train_rewards/margins" in tb[0].read_bytes()

    # Resume from the straight run's step-2 checkpoint in a fresh run directory (a kill after a save is
    # test_train_cli_operations' business; the same machinery): steps 3-4 must come out bit-identical.
    step2 = ref_out / "checkpoints" / "step_00000002"
    state = json.loads((step2 / "witscale_state.json").read_text())
    assert state["loader"]["epoch"] == 0 and state["loader"]["step_in_epoch"] == 2, "not mid-epoch"
    code, log = _torchrun(_dpo_args(pref, out, 4, "--resume", str(step2), "--reference-model", pref["reference"]))
    assert code == 0, log
    resumed = [json.loads(line) for line in open(out / "metrics.jsonl")]
    resumed = [r for r in resumed if "loss" in r]
    assert [r["step"] for r in resumed] == [3, 4]
    for r, want in zip(resumed, train[2:]):
        for key in ("loss", "reward_margin", "reward_accuracy", "logps_chosen"):
            assert r[key] == want[key], f"step {r['step']} {key}: {r[key]!r} != {want[key]!r}"


@pytest.mark.slow
def test_refusals_are_one_line(pref, tmp_path, capsys):
    """SFT data with --objective dpo, preference data without reference log-probs, another --reference-model,
    other class weights than the reference's, preference data with --objective sft, bad β, a random-init
    policy without --reference-model: each one line."""
    from witscale.data.format import TokenizedCorpus, write_packed
    from tests.test_train_cli_operations import _cli

    rng = np.random.default_rng(0)
    sft = str(tmp_path / "sft")
    write_packed(sft, TokenizedCorpus.from_documents([(rng.integers(3, 60, 9), np.full(9, R, np.uint8), None)
                                                     for _ in range(8)]), seq_len=SEQ, pad_id=0,
                 tokenizer={"vocab_size": TINY["vocab_size"]})
    base = _dpo_args(pref, tmp_path / "out", 2, "--reference-model", pref["reference"])

    def refused(*changes, drop=()):
        args = list(base)
        for flag, value in zip(changes[::2], changes[1::2]):
            if flag in args:
                args[args.index(flag) + 1] = value
            else:
                args += [flag, value]
        for flag in drop:
            i = args.index(flag)
            del args[i:i + 2]
        code, lines = _cli(args, capsys)
        assert code == 2 and len(lines) == 1 and lines[0].startswith("error: "), lines
        return lines[0]

    assert "is an SFT dataset, but --objective dpo needs a preference dataset" in refused("--data", sft)
    assert "has no reference log-probs: run tools/precompute_reference.py" in refused("--data", pref["no_reference"])
    assert "not --reference-model" in refused("--reference-model", pref["other"])
    assert "recompute them with the same weights" in refused("--prompt-weight", "0.5")
    assert "is a preference dataset: train it with --objective dpo" in refused(drop=["--objective"])
    assert "--beta -1.0 must be a positive number" in refused("--beta", "-1")
    assert "--label-smoothing applies to --dpo-loss sigmoid only" in refused("--dpo-loss", "ipo",
                                                                             "--label-smoothing", "0.1")
    assert "--eval-data" in refused("--eval-data", pref["no_reference"])
    # a random-init policy (--model-config) and no --reference-model: nothing to check the log-probs against
    assert "pass --model SFT_HF_DIR" in refused(drop=["--reference-model"])


@pytest.mark.slow
def test_preset_dpo_paper_takes_32_pairs_per_step(pref):
    """--preset dpo-paper: the paper's hyperparameters, explicit flags win, and --grad-accum from the data's
    mean pairs per row so that a step holds about 32 pairs (no process group: validation only)."""
    from witscale.data.format import PackedDataset
    from witscale.train import build_parser, plan_run
    from witscale.training.config import RunConfig

    def planned(*extra):
        args = build_parser().parse_args(["--ds_config", "ds_configs/zero3.json", "--data", pref["data"],
                                          "--model-config", pref["policy"], "--output-dir", "unused",
                                          "--reference-model", pref["reference"], "--preset", "dpo-paper", *extra])
        return plan_run(RunConfig.from_args(args), world_size=2).config

    per_row = PackedDataset(pref["data"]).manifest["pairs_per_row"]
    cfg = planned("--lr", "1e-6")
    assert (cfg.objective, cfg.lr, cfg.weight_decay, cfg.warmup_ratio, cfg.epochs, cfg.beta) == (
        "dpo", 1e-6, 0.0, 0.1, 2.0, 0.1)
    assert cfg.grad_accum == round(32 / (per_row * 2)) and abs(cfg.grad_accum * 2 * per_row - 32) <= per_row
    assert planned("--grad-accum", "3").grad_accum == 3


@pytest.mark.slow
def test_kill9_of_every_rank_during_the_reference_pass_leaves_the_dataset_as_it_was(pref, tmp_path):
    """SIGKILL to every process of a 2-rank tools/precompute_reference.py while it runs: the dataset is byte for
    byte what it was (the log-probs are written aside and renamed in at the end); a rerun then completes."""
    import os
    import shutil
    import signal
    import subprocess
    import sys
    import time

    from tests.conftest import REPO_ROOT
    from tests.fs_helpers import snapshot
    from witscale.data.format import PackedDataset

    data = str(tmp_path / "data")
    shutil.copytree(pref["no_reference"], data)
    before = snapshot(data)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           os.path.join(REPO_ROOT, "tools", "precompute_reference.py"), "--data", data, "--tp", "2",
           "--model", pref["reference"], "--micro-batch-size", "2"]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore", WITSCALE_SLOW_REFERENCE="60")
    proc = subprocess.Popen(cmd, cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    time.sleep(12)                      # started, computing or holding its values (the pass then sleeps 60 s)
    assert proc.poll() is None, proc.communicate()[0][-3000:]
    import psutil
    every = [proc.pid] + [c.pid for c in psutil.Process(proc.pid).children(recursive=True)]   # the ranks too
    for pid in every:                   # (torchrun starts its workers in sessions of their own)
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.communicate(timeout=60)
    after = snapshot(data)
    after.pop(".reference.lock", None)
    assert after == before and PackedDataset(data).reference_logps is None
    env.pop("WITSCALE_SLOW_REFERENCE")
    res = subprocess.run(cmd, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert np.isfinite(PackedDataset(data).reference_logps).all()
