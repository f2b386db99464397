import os

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from witscale.data.classes import TokenClass as C
from witscale.data.errors import DataError
from witscale.data.format import PackedDataset, TokenizedCorpus, write_packed
from witscale.data.bestfit import apply_long_policy, best_fit_decreasing


def _corpus(lengths, seed=0, weights=False):
    """Documents whose tokens are unique (doc * 10000 + position): every token can be traced back."""
    rng = np.random.default_rng(seed)
    docs = []
    for d, n in enumerate(lengths):
        ids = (d * 10000 + np.arange(n)).astype(np.int32)
        cls = np.where(np.arange(n) < n // 2, C.PROMPT, C.RESPONSE).astype(np.uint8)
        w = rng.random(n).astype(np.float32) if weights and d % 2 == 0 else None
        docs.append((ids, cls, w))
    return TokenizedCorpus.from_documents(docs)


@settings(max_examples=40, deadline=None)
@given(st.lists(st.integers(1, 64), min_size=0, max_size=200), st.integers(64, 100))
def test_best_fit_invariants(lengths, cap):
    row_of, rows = best_fit_decreasing(np.array(lengths, dtype=np.int64), cap)
    assert len(row_of) == len(lengths)
    fill = np.bincount(row_of, weights=lengths, minlength=rows) if lengths else np.zeros(0)
    assert (fill <= cap).all() and (fill > 0).all()
    assert rows >= -(-sum(lengths) // cap)                  # never beats the lower bound
    assert rows <= max(1, 2 * -(-sum(lengths) // cap)) or not lengths   # any-fit is within 2×
    again, _ = best_fit_decreasing(np.array(lengths, dtype=np.int64), cap)
    assert (again == row_of).all()


@settings(max_examples=25, deadline=None)
@given(st.lists(st.integers(1, 90), min_size=1, max_size=60), st.sampled_from(["truncate", "drop", "split"]),
       st.booleans())
def test_write_read_round_trip(tmp_path_factory, lengths, policy, weights):
    seq_len = 32
    out = str(tmp_path_factory.mktemp("p") / "ds")
    corpus = _corpus(lengths, weights=weights)
    if policy == "drop" and all(n > seq_len for n in lengths):
        return
    m = write_packed(out, corpus, seq_len=seq_len, pad_id=7, long_policy=policy)
    ds = PackedDataset(out)
    assert len(ds) == m["num_rows"] and ds.seq_len == seq_len and ds.has_weights == (corpus.weights is not None)
    seen = []
    for i in range(len(ds)):
        row = ds[i]
        dl = row.doc_lengths.astype(int)
        used = int(dl.sum())
        assert 0 < used <= seq_len and (dl > 0).all()
        assert (row.classes[used:] == C.PAD).all() and (row.classes[:used] != C.PAD).all()
        assert (row.tokens[used:] == 7).all()
        if row.weights is not None:
            assert (row.weights[used:] == 0).all()
        start = 0
        for n in dl:
            piece = row.tokens[start:start + n].astype(np.int64)
            # a document piece is one run of consecutive positions of one document
            assert len(set(piece // 10000)) == 1 and (np.diff(piece) == 1).all()
            seen.extend(piece.tolist())
            start += n
    kept = []
    for d, n in enumerate(lengths):
        if n > seq_len and policy == "drop":
            continue
        keep = min(n, seq_len) if policy == "truncate" else n
        kept.extend(d * 10000 + np.arange(keep))
    assert sorted(seen) == sorted(kept)                       # every kept token exactly once
    assert m["num_tokens"] == len(kept) == sum(m["tokens_per_class"][k] for k in m["tokens_per_class"] if k != "pad")
    long = sum(n > seq_len for n in lengths)
    assert m["counts"][{"truncate": "truncated", "drop": "dropped", "split": "split"}[policy]] == long


def test_weights_channel_and_determinism(tmp_path):
    corpus = _corpus([5, 17, 3, 30, 8, 12] * 5, weights=True)
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    write_packed(a, corpus, seq_len=40, pad_id=0)
    write_packed(b, corpus, seq_len=40, pad_id=0)
    for name in sorted(os.listdir(a)):
        with open(os.path.join(a, name), "rb") as fa, open(os.path.join(b, name), "rb") as fb:
            assert fa.read() == fb.read(), name
    ds = PackedDataset(a)
    # weights follow their tokens: unweighted documents (odd) read 1.0
    for i in range(len(ds)):
        row = ds[i]
        used = int(row.doc_lengths.sum())
        odd = (row.tokens[:used] // 10000) % 2 == 1
        assert (row.weights[:used][odd] == 1.0).all()
    src = dict(zip(corpus.tokens.tolist(), corpus.weights.tolist()))
    flat_t, flat_w = ds.tokens.reshape(-1), ds.weights.reshape(-1)
    real = ds.classes.reshape(-1) != C.PAD
    assert all(src[t] == w for t, w in zip(flat_t[real].tolist(), flat_w[real].tolist()))


def test_split_policy_chunks(tmp_path):
    p = apply_long_policy(np.array([70, 10, 32]), 32, "split")
    assert p.doc.tolist() == [0, 0, 0, 1, 2] and p.start.tolist() == [0, 32, 64, 0, 0]
    assert p.length.tolist() == [32, 32, 6, 10, 32] and p.split == 1


def test_output_safety_and_reader_errors(tmp_path):
    corpus = _corpus([4, 5])
    out = str(tmp_path / "ds")
    write_packed(out, corpus, seq_len=16, pad_id=0)
    with pytest.raises(DataError, match="--overwrite"):
        write_packed(out, corpus, seq_len=16, pad_id=0)
    write_packed(out, corpus, seq_len=8, pad_id=0, overwrite=True)
    assert PackedDataset(out).seq_len == 8
    assert [n for n in os.listdir(tmp_path) if n != "ds"] == []          # no temp dirs left
    with pytest.raises(DataError, match="no such directory"):
        PackedDataset(str(tmp_path / "missing"))
    os.remove(os.path.join(out, "classes.bin"))
    with pytest.raises(DataError, match="classes.bin is missing"):
        PackedDataset(out)
    import json
    write_packed(out, corpus, seq_len=8, pad_id=0, overwrite=True)
    mpath = os.path.join(out, "manifest.json")
    m = json.load(open(mpath))
    m["format_version"] = 99
    json.dump(m, open(mpath, "w"))
    with pytest.raises(DataError, match="format_version 99"):
        PackedDataset(out)


def test_packing_scale_is_fast_and_tight():
    import time
    rng = np.random.default_rng(0)
    lengths = rng.integers(20, 900, size=30000)
    t = time.perf_counter()
    row_of, rows = best_fit_decreasing(lengths, 4096)
    elapsed = time.perf_counter() - t
    lower = -(-int(lengths.sum()) // 4096)
    assert rows <= lower * 1.001 + 1
    assert elapsed < 5
