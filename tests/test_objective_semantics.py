"""What the weighted objective means token by token: zero weights, document boundaries, packing."""
import numpy as np
import torch

from tests.train_helpers import TINY, random_packed
from witscale.data.classes import TokenClass
from witscale.data.loader import IGNORE_INDEX, PackedLoader, row_targets
from witscale.data.weighting import build_weight_table
from witscale.model import CausalLM, ModelConfig, load_model_weights


def _model(seed=0):
    cfg = ModelConfig.from_dict(TINY)
    model = CausalLM(cfg)
    load_model_weights(model, cfg, model_dir=None, seed=seed)
    return model


def _grads(model, mb):
    model.zero_grad()
    stats = model(mb.input_ids, mb.position_ids, mb.cu_seqlens, mb.max_seqlen, mb.labels, mb.weights,
                  mb.target_classes)
    stats.weighted_sum.backward()
    return float(stats.weighted_sum), {n: p.grad.clone() for n, p in model.named_parameters()}


def test_a_zero_weight_token_contributes_exactly_nothing():
    data = random_packed(2, 40, TINY["vocab_size"], seed=3)
    table = build_weight_table(0.0, 1.0)           # prompt tokens masked, as in conventional SFT
    loader = PackedLoader(data, table, micro_batch_size=2, grad_accum=1, shuffle=False)
    mb = loader.make_micro_batch([0, 1])
    zero = (mb.weights == 0) & (mb.labels != IGNORE_INDEX)
    assert zero.sum() > 5, "the test needs zero-weight targets"
    model = _model()
    loss_a, grads_a = _grads(model, mb)
    # Change the targets of the zero-weight positions: nothing may change, bit for bit.
    mb.labels[zero] = (mb.labels[zero] + 7) % TINY["vocab_size"]
    loss_b, grads_b = _grads(model, mb)
    assert loss_a == loss_b
    for name in grads_a:
        assert torch.equal(grads_a[name], grads_b[name]), name
    # ... while changing a weighted target does change the gradient (the check above can fail).
    weighted = (mb.weights > 0).nonzero()[0]
    mb.labels[tuple(weighted)] = (mb.labels[tuple(weighted)] + 1) % TINY["vocab_size"]
    loss_c, _ = _grads(model, mb)
    assert loss_c != loss_a


def test_labels_never_cross_a_document_boundary():
    tokens = np.arange(10, 22, dtype=np.int32)
    classes = np.array([TokenClass.TEMPLATE, TokenClass.PROMPT, TokenClass.RESPONSE, TokenClass.EOT] * 3, np.uint8)
    doc_lengths = np.array([4, 5], dtype=np.int32)    # two documents, then 3 pad tokens
    classes[9:] = TokenClass.PAD
    labels, weights, tclasses, positions, used = row_targets(tokens, classes, None, doc_lengths,
                                                             build_weight_table(1.0, 1.0))
    assert used == 9
    assert labels[3] == IGNORE_INDEX and weights[3] == 0, "last token of doc 1 must not predict doc 2's BOS"
    assert labels[8] == IGNORE_INDEX and (labels[9:] == IGNORE_INDEX).all()
    assert list(labels[:3]) == [11, 12, 13] and list(labels[4:8]) == [15, 16, 17, 18]
    assert list(positions[:9]) == [0, 1, 2, 3, 0, 1, 2, 3, 4]
    # the weight is the *predicted* token's class weight
    table = build_weight_table(0.25, 1.0)
    _, w, _, _, _ = row_targets(tokens, classes, None, doc_lengths, table)
    assert w[0] == 0.25 and w[1] == 1.0 and w[2] == 1.0   # predicts PROMPT, RESPONSE, EOT


def test_a_packed_row_gives_the_loss_of_its_documents_run_separately():
    data = next(d for d in (random_packed(1, 48, TINY["vocab_size"], seed=s, with_weights=True) for s in range(50))
                if len(d.doc_lengths(0)) >= 3)
    table = build_weight_table(0.3, 1.0)
    model = _model(seed=2)
    docs = data.doc_lengths(0)
    packed = PackedLoader(data, table, micro_batch_size=1, grad_accum=1, shuffle=False).make_micro_batch([0])
    with torch.no_grad():
        whole = model(packed.input_ids, packed.position_ids, packed.cu_seqlens, packed.max_seqlen, packed.labels,
                      packed.weights, packed.target_classes)
    total, start = 0.0, 0
    for length in docs:
        sl = slice(start, start + length)
        ids = torch.tensor(data.tokens[0, sl], dtype=torch.long)[None]
        labels = torch.full((1, length), IGNORE_INDEX)
        labels[0, :-1] = ids[0, 1:]
        w = torch.tensor(table[data.classes[0, sl]] * data.weights[0, sl])
        weights = torch.zeros(1, length)
        weights[0, :-1] = w[1:]
        with torch.no_grad():
            alone = model(ids, torch.arange(length)[None], torch.tensor([0, length], dtype=torch.int32), length,
                          labels, weights)
        total += float(alone.weighted_sum)
        start += length
    assert float(whole.weighted_sum) == __import__("pytest").approx(total, rel=1e-5)
