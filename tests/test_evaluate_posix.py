"""POSIX: the formula, the prompt prefixes, greedy generation and packed teacher-forced scoring, each against an
independent computation (transformers, one pair at a time, fp64)."""
from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from tests.eval_helpers import make_tiny_hf, reference_logprob
from witscale.evaluation import models, posix
from witscale.evaluation.prompting import PromptFormatter, decode, strip_stop
from witscale.evaluation.scoring import continuation_logprobs, pack_pairs
from witscale.evaluation.variants import PromptSet

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory, sp_model_path):
    return make_tiny_hf(tmp_path_factory.mktemp("tiny_hf"), sp_model_path)


@pytest.fixture(scope="module")
def hf64(tiny_dir):
    return models.load_generator(tiny_dir, CPU, torch.float64)


@pytest.fixture(scope="module")
def scorer(tiny_dir):
    return models.load_scorer(tiny_dir, CPU, torch.float32)


@pytest.fixture(scope="module")
def formatter(sp_tokenizer):
    return PromptFormatter("plain", sp_tokenizer)


# ---------------------------------------------------------------------------------------------- the formula
def psi_by_definition(m, lengths):
    n = len(m)
    total = sum(abs(m[i][j] - m[j][j]) / lengths[j] for i in range(n) for j in range(n) if j != i)
    return total / (n * (n - 1))


def test_psi_is_the_papers_formula_and_the_reference_normalization_divides_by_max_new_tokens():
    rng = np.random.default_rng(0)
    for n in (2, 3, 5):
        m = rng.normal(-20, 5, size=(n, n))
        lengths = rng.integers(1, 9, size=n)
        assert posix.psi(m, lengths) == pytest.approx(psi_by_definition(m, lengths), rel=1e-12)
        # the reference implementation's number: the same terms over max_new_tokens
        assert posix.psi(m, 8) == pytest.approx(psi_by_definition(m, [8] * n), rel=1e-12)
        # responses that all run to max_new_tokens: both normalizations agree
        assert posix.psi(m, [8] * n) == pytest.approx(posix.psi(m, 8))
    # N = 2 by hand: |M[1,0] − M[0,0]| / L0 + |M[0,1] − M[1,1]| / L1, over 2
    m = [[-10.0, -7.0], [-4.0, -5.0]]
    assert posix.psi(m, [3, 2]) == pytest.approx((6 / 3 + 2 / 2) / 2)
    # ψ = 0 when every response is equally likely under every variant
    assert posix.psi([[-3.0, -1.0], [-3.0, -1.0]], [1, 1]) == 0.0
    with pytest.raises(ValueError):
        posix.psi([[-1.0]], [1])


# ---------------------------------------------------------------------------------------------- prompts
def test_plain_prefix_is_bos_and_the_prompt_as_the_packer_tokenizes_it(formatter, sp_tokenizer):
    from witscale.data.readers import Conversation, Message
    from witscale.data.render import Renderer

    renderer = Renderer("plain", sp_tokenizer)
    for prompt, response in (("What is 12 plus 7?", "19"), ("Reverse these words.\n\napple river", "river apple")):
        prefix = formatter.prefix(prompt)
        assert prefix == [sp_tokenizer.bos_id] + sp_tokenizer.encode(prompt)
        # the training document is exactly prefix + response tokens: scoring y after x sees what training saw
        doc = renderer(Conversation([Message("user", prompt), Message("assistant", response)]))
        assert doc.ids[:len(prefix)].tolist() == prefix
        assert doc.ids[-1] == sp_tokenizer.eos_id and formatter.stop_ids == [sp_tokenizer.eos_id]
        assert decode(sp_tokenizer, strip_stop(doc.ids[len(prefix):].tolist(), formatter.stop_ids)) == response


def test_chatml_prefix_ends_with_the_assistant_header_and_stops_at_im_end(sp_tokenizer):
    f = PromptFormatter("chatml", sp_tokenizer)
    prefix = f.prefix([("user", "Hi"), ("assistant", "Hello"), ("user", "Add 2 and 3.")])
    text = sp_tokenizer._sp.decode(prefix)
    assert text == ("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nHello<|im_end|>\n"
                    "<|im_start|>user\nAdd 2 and 3.<|im_end|>\n<|im_start|>assistant\n")
    assert sp_tokenizer.token_id("<|im_end|>") in f.stop_ids


# ---------------------------------------------------------------------------------------------- generation
def test_batched_greedy_generation_equals_one_prompt_at_a_time(tiny_dir, formatter):
    gen = models.load_generator(tiny_dir, CPU, torch.float32)
    prefixes = [formatter.prefix(p) for p in ("Hi", "What is the capital of Zorvia?", "Add 2 and 3.",
                                              "Sort these numbers: 5, 3, 9, 1, 12, 40")]
    batched = models.greedy_generate(gen, prefixes, formatter.stop_ids, 3, max_new_tokens=12, batch_size=4)
    single = [models.greedy_generate(gen, [p], formatter.stop_ids, 3, max_new_tokens=12, batch_size=1)[0]
              for p in prefixes]
    assert batched == single
    for y in batched:      # cut after the first stop token, or at max_new_tokens
        assert 1 <= len(y) <= 12
        assert all(t not in formatter.stop_ids for t in y[:-1])
        assert len(y) == 12 or y[-1] in formatter.stop_ids


# ---------------------------------------------------------------------------------------------- scoring
def test_pack_pairs_first_fit_decreasing():
    rows = pack_pairs([5, 3, 8, 2, 9], max_tokens=10)
    assert sorted(i for r in rows for i in r) == [0, 1, 2, 3, 4]
    assert all(sum([5, 3, 8, 2, 9][i] for i in r) <= 10 for r in rows)
    assert rows[0][0] == 4                                  # longest first
    assert pack_pairs([20], 10) == [[0]]                     # longer than a row: a row of its own


def test_packed_scores_equal_one_pair_at_a_time_in_fp64(scorer, hf64, formatter):
    """Prompts and responses of different lengths (1 to 9 tokens, with and without a final EOS); packing many
    pairs per row, or a few, or one, gives the fp64 transformers value of each pair."""
    prefixes = [formatter.prefix(p) for p in ("Hi", "What is the capital of Tandor?", "Reverse: a b c d e f")]
    rng = np.random.default_rng(1)
    responses = [[2], rng.integers(4, 500, 3).tolist(), rng.integers(4, 500, 9).tolist() + [2],
                 rng.integers(4, 500, 5).tolist()]
    pairs = list(itertools.product(prefixes, responses))
    ref = np.array([reference_logprob(hf64, p, y) for p, y in pairs])
    for max_tokens in (4096, 40, 1):
        got = continuation_logprobs(scorer, pairs, max_tokens=max_tokens, chunk=7)
        np.testing.assert_allclose(got, ref, rtol=2e-5, atol=2e-4)


def test_posix_end_to_end_against_transformers_fp64(tiny_dir, scorer, hf64, formatter):
    """Sets with N = 2 and N = 4, variants of different lengths: ψ from our generation + packed scoring equals
    ψ from transformers scoring each (x_i, y_j) alone in fp64, using the same greedy responses."""
    sets = [PromptSet("a", "given", ["What is the capital of Mirth?", "capital of Mirth, please, what is it?"],
                      [None, None]),
            PromptSet("b", "given", ["Add 2 and 3.", "ADD 2 AND 3", "Please add the numbers 2 and 3 together.",
                                     "2 + 3 = ?"], [None] * 4)]
    gen = models.load_generator(tiny_dir, CPU, torch.float32)
    prefixes = posix.set_prefixes(sets, formatter)
    responses = posix.generate_responses(gen, prefixes, formatter, max_new_tokens=6, batch_size=3)
    lengths = {len(y) for ys in responses for y in ys}
    assert len(lengths) > 1, "the test wants responses of different lengths"
    mats = posix.score_matrices(scorer, prefixes, responses, max_tokens=64)
    results = posix.set_results(sets, prefixes, responses, mats, formatter, max_new_tokens=6)
    for s, ps, ys, r in zip(sets, prefixes, responses, results):
        ref = [[reference_logprob(hf64, p, y) for y in ys] for p in ps]
        np.testing.assert_allclose(r["logprobs"], ref, rtol=2e-5, atol=2e-4)
        ref_psi = psi_by_definition(ref, [len(y) for y in ys])
        assert r["psi"] == pytest.approx(ref_psi, rel=1e-3, abs=1e-6)
        assert r["psi_max_new_tokens"] == pytest.approx(psi_by_definition(ref, [6] * len(ys)), rel=1e-3, abs=1e-6)
        assert r["response_lengths"] == [len(y) for y in ys]
        assert r["stopped"] == [y[-1] in formatter.stop_ids for y in ys]
    summary = posix.summarize(results, template="plain", max_new_tokens=6)
    assert summary["posix"] == pytest.approx(np.mean([r["psi"] for r in results]))
    assert summary["num_sets"] == 2 and summary["posix_by_kind"] == {"given": summary["posix"]}
