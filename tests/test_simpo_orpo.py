"""--objective simpo and orpo: the losses and their gradients through the fused kernel, every layout.

The SimPO and ORPO formulas are written out here in fp64 against `transformers` forwards one sequence at a
time (the papers' definitions, independent of witscale's code); the layouts (tp=2, pp=2, ZeRO-3 dp=2) are
held to one rank with real DeepSpeed engines on real gloo ranks. The preference micro-batches and the HF
model come from tests/test_dpo.py.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from tests.test_dpo import R, EOT, hf_model, make_pairs, micro_batch
from tests.train_helpers import TINY


def _table(prompt_weight, response_weight=1.0):
    from witscale.data.weighting import build_weight_table
    return build_weight_table(prompt_weight, response_weight)


# --- the independent implementation: transformers, one sequence at a time, fp64 --------------------------
def hf_token_logps(model, tokens):
    """log p(token t | tokens < t) for t ≥ 1, fp64, from a full-logits forward."""
    ids = torch.as_tensor(np.asarray(tokens, np.int64))[None]
    logprobs = torch.log_softmax(model(input_ids=ids).logits[0].double(), dim=-1)
    return logprobs[:-1].gather(1, ids[0, 1:, None]).squeeze(1)


def mean_response_logp(logps, classes):
    """(1/|y|)·log π(y|x): the mean log-prob of the completion's tokens (response and its end-of-turn)."""
    response = torch.as_tensor(np.isin(np.asarray(classes[1:]), (R, EOT)))
    return logps[response].mean()


def simpo_formula(mean_c, mean_r, beta, gamma, eps=0.0):
    """SimPO's loss of one pair (Meng et al. 2024, eq. 6; label smoothing as TRL's CPO/SimPO)."""
    z = beta * mean_c - beta * mean_r - gamma
    return -(1 - eps) * F.logsigmoid(z) - eps * F.logsigmoid(-z)


def orpo_formula(logps_c, classes_c, mean_c, mean_r, lam, table, normalization):
    """ORPO's loss of one pair (Hong et al. 2024, eqs. 6-8) with the WIT-weighted SFT term on the chosen
    sequence: Σ w·nll over the predicted tokens, divided by the normalization's count over them."""
    w = torch.as_tensor(np.asarray(table, np.float64)[np.asarray(classes_c[1:], np.int64)])
    n = {"nonzero": (w > 0).sum(), "weight_sum": w.sum(), "tokens": torch.tensor(float(len(w)))}[normalization]
    sft = -(w * logps_c).sum() / n

    def log_odds(mean):
        p = torch.exp(mean)
        return torch.log(p / (1 - p))
    return sft - lam * F.logsigmoid(log_odds(mean_c) - log_odds(mean_r))


def _ours(policy):
    from witscale.model import CausalLM, ModelConfig
    ours = CausalLM(ModelConfig.from_dict(TINY))
    ours.load_state_dict({k: v.float() for k, v in policy.state_dict().items()}, strict=True)
    return ours


def _check_grads(ours, policy):
    want = {n: p.grad.double() for n, p in policy.named_parameters()}
    scale = max(g.abs().max() for g in want.values())
    assert scale > 1e-3, "the gradient must not vanish (else the test proves little)"
    for name, p in ours.named_parameters():
        np.testing.assert_allclose(p.grad.double().numpy(), want[name].numpy(), rtol=0,
                                   atol=2e-5 * float(scale), err_msg=name)


def _ours_sums(policy, mb, objective, pairs):
    """witscale's model with the policy's weights, one forward with ``objective``'s head hook and a backward of
    its loss over ``pairs`` pairs: (the model, its sums by name)."""
    ours = _ours(policy)
    stats = ours(mb.input_ids, mb.position_ids, mb.cu_seqlens, mb.max_seqlen, mb.labels, mb.weights,
                 mb.target_classes, objective=objective.head(*objective.inputs(mb)))
    (stats.weighted_sum / pairs).backward()
    return ours, dict(zip(objective.sums, stats.sums.tolist()))


@pytest.mark.parametrize("eps,prompt_weight", [(0.0, 0.0), (0.1, 0.5)])
def test_simpo_loss_and_gradients_equal_transformers_fp64(eps, prompt_weight):
    """SimPO through the fused kernel (one micro-batch, two packed rows, three pairs) against the paper's
    formula on per-sequence transformers forwards in fp64; the class weights do not enter it (λp = 0.5 gives
    the same), the data's reference log-probs (NaN here) are not read."""
    from witscale.training.objectives.simpo import SIMPO_SUMS, SimPO, SimPOSettings

    beta, gamma = 2.0, 0.3
    pairs = make_pairs(np.random.default_rng(3), 3, TINY["vocab_size"])
    policy = hf_model(0)
    means = [mean_response_logp(hf_token_logps(policy, t), c) for pair in pairs for t, c in pair]
    per_pair = [simpo_formula(means[2 * i], means[2 * i + 1], beta, gamma, eps) for i in range(3)]
    want_loss = torch.stack(per_pair).sum() / 3
    want_loss.backward()

    mb = micro_batch([pairs[:2], pairs[2:]], seq_len=40, table=_table(prompt_weight))
    ours, sums = _ours_sums(policy, mb, SimPO(SimPOSettings(beta=beta, gamma=gamma, label_smoothing=eps)), 3)
    assert tuple(sums) == SIMPO_SUMS
    assert sums["pairs"] == 3
    assert sums["loss"] / 3 == pytest.approx(want_loss.item(), rel=2e-5, abs=1e-6)
    m = [x.item() for x in means]
    np.testing.assert_allclose([sums["logps_chosen"], sums["logps_rejected"], sums["rewards_chosen"],
                                sums["rewards_rejected"]],
                               [m[0] + m[2] + m[4], m[1] + m[3] + m[5], beta * (m[0] + m[2] + m[4]),
                                beta * (m[1] + m[3] + m[5])], rtol=2e-5, atol=1e-5)
    assert sums["reward_accuracy"] == sum(m[i] > m[i + 1] for i in (0, 2, 4))
    _check_grads(ours, policy)


@pytest.mark.parametrize("prompt_weight,normalization", [(0.0, "nonzero"), (0.3, "nonzero"), (0.3, "weight_sum"),
                                                         (0.3, "tokens")])
def test_orpo_loss_and_gradients_equal_transformers_fp64(prompt_weight, normalization):
    """ORPO through the fused kernel against the paper's formula on per-sequence transformers forwards in fp64,
    its SFT term weighted by the WIT class weights (λp = 0: the paper's; λp = 0.3 under each normalization)."""
    from witscale.training.objectives.orpo import ORPO, ORPO_SUMS, ORPOSettings

    lam = 0.5
    table = _table(prompt_weight)
    pairs = make_pairs(np.random.default_rng(4), 3, TINY["vocab_size"])
    policy = hf_model(0)
    docs = [(t, c) for pair in pairs for t, c in pair]
    logps = [hf_token_logps(policy, t) for t, _ in docs]
    means = [mean_response_logp(lp, c) for lp, (_, c) in zip(logps, docs)]
    per_pair = [orpo_formula(logps[2 * i], docs[2 * i][1], means[2 * i], means[2 * i + 1], lam, table,
                             normalization) for i in range(3)]
    want_loss = torch.stack(per_pair).sum() / 3
    want_loss.backward()
    with torch.no_grad():
        sft = [orpo_formula(logps[2 * i], docs[2 * i][1], means[2 * i], means[2 * i + 1], 0.0, table,
                            normalization) for i in range(3)]

    mb = micro_batch([pairs[:2], pairs[2:]], seq_len=48, table=table)
    ours, sums = _ours_sums(policy, mb, ORPO(ORPOSettings(lam=lam, normalization=normalization)), 3)
    assert tuple(sums) == ORPO_SUMS
    assert sums["pairs"] == 3
    assert sums["loss"] / 3 == pytest.approx(want_loss.item(), rel=2e-5, abs=1e-6)
    assert sums["sft_loss"] / 3 == pytest.approx(float(sum(sft)) / 3, rel=2e-5, abs=1e-6)
    # the odds-ratio term: loss = sft_loss − λ·log_odds_ratio
    assert sums["loss"] == pytest.approx(sums["sft_loss"] - lam * sums["log_odds_ratio"], rel=1e-9)
    m = [x.item() for x in means]
    np.testing.assert_allclose([sums["logps_chosen"], sums["logps_rejected"], sums["rewards_chosen"]],
                               [m[0] + m[2] + m[4], m[1] + m[3] + m[5], lam * (m[0] + m[2] + m[4])],
                               rtol=2e-5, atol=1e-5)
    _check_grads(ours, policy)


# --- every layout against one rank (tests/test_dpo.py's worker and comparison) ---------------------------
def _objectives():
    """SimPO with label smoothing; ORPO with λp = 0.3 (the WIT-weighted SFT term) under weight_sum."""
    from witscale.training.objectives.orpo import ORPO, ORPOSettings
    from witscale.training.objectives.simpo import SimPO, SimPOSettings
    return {"simpo": dict(objective=SimPO(SimPOSettings(beta=2.0, gamma=0.5, label_smoothing=0.1))),
            "orpo": dict(objective=ORPO(ORPOSettings(lam=0.5, normalization="weight_sum")), table=_table(0.3))}


@pytest.fixture(scope="module")
def one_rank_runs():
    from tests.distributed import run_distributed
    from tests.test_dpo import _layouts
    runs = _objectives()
    return dict(zip(runs, run_distributed(_layouts, 1, list(runs.values()))[0]))


@pytest.mark.slow
@pytest.mark.parametrize("name", ["simpo", "orpo"])
def test_tp2_pp2_and_zero3_dp2_equal_one_rank(one_rank_runs, name):
    """Three steps (loss, rewards, accuracy, ORPO's SFT and odds terms, parameters, and the evaluation) at tp=2,
    pp=2 and ZeRO-3 dp=2 (grad-accum 2: the same global batch) equal one rank."""
    from tests.distributed import run_distributed
    from tests.test_dpo import _layouts, _same_run
    run = _objectives()[name]
    ref = one_rank_runs[name]
    got = run_distributed(_layouts, 2, [dict(run, tp=2), dict(run, pp=2), dict(run, stage=3)], timeout=600)[0]
    for layout, result in zip(("tp=2", "pp=2", "ZeRO-3 dp=2"), got):
        _same_run(result, ref, f"{name} {layout}")
        if name == "orpo":
            for a, b in zip(result["results"], ref["results"]):
                for key in ("sft_loss", "log_odds_ratio", "log_odds_chosen"):
                    assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-6), f"{layout}: {key}"
    # the losses moved the model: three steps whose metrics differ
    assert len({round(r["loss"], 6) for r in ref["results"]}) == 3


# --- the CLI: a run each, metrics.jsonl and TensorBoard; refusals ---------------------------------------
@pytest.fixture(scope="module")
def cli_inputs(tmp_path_factory):
    """A preference dataset without reference log-probs (none is needed), an SFT dataset, a policy config."""
    import json

    from tests.test_dpo import write_preference_data
    from witscale.data.format import TokenizedCorpus, write_packed
    root = tmp_path_factory.mktemp("prefs")
    rng = np.random.default_rng(7)
    data = write_preference_data(root / "train", make_pairs(rng, 24, TINY["vocab_size"], completion_len=(2, 6)))
    sft = str(root / "sft")
    write_packed(sft, TokenizedCorpus.from_documents([(rng.integers(3, 60, 9), np.full(9, R, np.uint8), None)
                                                     for _ in range(8)]), seq_len=64, pad_id=0,
                 tokenizer={"vocab_size": TINY["vocab_size"]})
    with open(root / "policy.json", "w") as f:
        json.dump(TINY, f)
    return {"data": data, "sft": sft, "policy": str(root / "policy.json")}


def _args(inputs, out, objective, *extra):
    return ["--ds_config", "ds_configs/zero0.json", "--data", inputs["data"], "--model-config", inputs["policy"],
            "--output-dir", str(out), "--objective", objective, "--micro-batch-size", "1", "--grad-accum", "2",
            "--lr", "1e-3", "--max-steps", "2", "--seed", "3", "--warmup-ratio", "0", *extra]


@pytest.mark.slow
@pytest.mark.parametrize("objective,extra,line,keys", [
    ("simpo", ["--simpo-gamma", "0.3"], "objective: SimPO (β 2.0, γ 0.3; no reference)", ()),
    ("orpo", ["--orpo-lambda", "0.2", "--prompt-weight", "0.2"], "objective: ORPO (λ 0.2; no reference)",
     ("sft_loss", "log_odds_ratio", "log_odds_chosen")),
])
def test_cli_trains_and_logs_the_objectives_metrics(cli_inputs, tmp_path, objective, extra, line, keys):
    """witscale/train.py --objective simpo|orpo (one process, ZeRO-0) on preference data without reference
    log-probs: rewards, margins, accuracies, log-probs (ORPO: its SFT and log-odds terms too) in metrics.jsonl,
    train and eval, and in TensorBoard under TRL's names."""
    import json
    import subprocess
    import sys

    from tests.conftest import REPO_ROOT
    from tests.test_train_cli_operations import _env
    out = tmp_path / "run"
    res = subprocess.run([sys.executable, "witscale/train.py",
                          *_args(cli_inputs, out, objective, "--eval-data", cli_inputs["data"], "--eval-steps", "2",
                                 *extra)], cwd=REPO_ROOT, env=_env(), capture_output=True, text=True, timeout=300)
    log = res.stdout + res.stderr
    assert res.returncode == 0, log[-3000:]
    assert line in log
    rows = [json.loads(x) for x in open(out / "metrics.jsonl")]
    train = [r for r in rows if "loss" in r]
    assert [r["step"] for r in train] == [1, 2]
    for r in train:
        assert np.isfinite(r["loss"]) and r["pairs"] > 0 and 0 <= r["reward_accuracy"] <= 1
        assert r["reward_margin"] == pytest.approx(r["rewards_chosen"] - r["rewards_rejected"])
        assert r["logps_chosen"] < 0 and all(np.isfinite(r[k]) for k in keys)
    if objective == "orpo":
        assert train[0]["loss"] == pytest.approx(train[0]["sft_loss"] - 0.2 * train[0]["log_odds_ratio"])
    evals = [r for r in rows if "eval_loss" in r]
    assert evals and np.isfinite(evals[-1]["eval_loss"]) and "eval_reward_accuracy" in evals[-1]
    assert all(f"eval_{k}" in evals[-1] for k in keys)
    events = b"".join(p.read_bytes() for p in (out / "tensorboard").glob("events.*"))
    assert b"train_rewards/margins" in events and b"eval_rewards/accuracies" in events
    assert all(b"train_" + k.encode() in events for k in keys)


def test_refusals_are_one_line(cli_inputs, tmp_path, capsys):
    """No reference: --reference-model (DPO's flag) is refused with simpo and orpo, as are the other
    objectives' flags (and theirs on sft); bad values; SFT data."""
    from tests.test_train_cli_operations import _cli

    def refused(objective, *extra, data=None):
        args = _args(cli_inputs, tmp_path / "out", objective, *extra)
        if data:
            args[args.index("--data") + 1] = data
        code, lines = _cli(args, capsys)
        assert code == 2 and len(lines) == 1 and lines[0].startswith("error: "), lines
        return lines[0]

    for objective in ("simpo", "orpo"):
        assert "--reference-model apply to --objective dpo only" in refused(objective, "--reference-model", "ref")
        assert "--beta apply to --objective dpo only" in refused(objective, "--beta", "0.1")
        assert (f"{cli_inputs['sft']} is an SFT dataset, but --objective {objective} needs a preference dataset"
                in refused(objective, data=cli_inputs["sft"]))
    assert "--simpo-gamma apply to --objective simpo only" in refused("orpo", "--simpo-gamma", "1")
    assert "--orpo-lambda apply to --objective orpo only" in refused("simpo", "--orpo-lambda", "1")
    assert "--simpo-beta apply to --objective simpo only" in refused("sft", "--simpo-beta", "1",
                                                                     data=cli_inputs["sft"])
    assert "--simpo-beta -1.0 must be a positive number" in refused("simpo", "--simpo-beta", "-1")
    assert "--simpo-gamma nan must be a finite number >= 0" in refused("simpo", "--simpo-gamma", "nan")
    assert "--simpo-label-smoothing 0.5 must lie in [0, 0.5)" in refused("simpo", "--simpo-label-smoothing", "0.5")
    assert "--orpo-lambda -1.0 must be a finite number >= 0" in refused("orpo", "--orpo-lambda", "-1")


def test_orpo_stays_finite_when_a_completion_has_probability_one():
    """A chosen (or rejected) completion whose every response token has NLL exactly 0 in fp32 (a confident
    model rounds to it) has mean log-prob 0 and infinite odds: the loss and token gradients stay finite
    (the odds are taken at ā ≤ −1e-7); the rest of the pair's terms are untouched."""
    from witscale.training.objectives.length_normalized import ResponseMeans
    from witscale.training.objectives.orpo import ORPOSettings, orpo_terms
    from witscale.training.objectives.pairs import Completions

    f64 = torch.float64
    doc_index = torch.tensor([0, 0, 0, 1, 1, 1])
    response = torch.tensor([0.0, 1, 1, 0, 1, 1], dtype=f64)
    weights = torch.tensor([0.0, 1, 1, 0, 1, 1], dtype=f64)
    for nll in ([0.5, 0.0, 0.0, 0.5, 1.0, 2.0], [0.5, 1.0, 2.0, 0.5, 0.0, 0.0]):
        token_nll = torch.tensor(nll, dtype=f64)
        logps = torch.zeros(2, dtype=f64).index_add_(0, doc_index, -weights * token_nll)
        c = Completions(logps, torch.tensor([2.0, 2.0], dtype=f64), torch.tensor([2.0, 2.0], dtype=f64),
                        torch.tensor([0, 1]), torch.tensor([0, 0]), 1, torch.full((2,), float("nan"), dtype=f64),
                        token_nll, weights, doc_index)
        terms = orpo_terms(ORPOSettings(lam=0.1), c, ResponseMeans(c, response))
        assert torch.isfinite(terms.sums).all() and torch.isfinite(terms.token_grad).all(), (nll, terms)
        assert terms.sums[1] == pytest.approx(-float(logps[0]) / 2)        # sft_loss: the chosen's mean NLL
