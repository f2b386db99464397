"""Batched tokenization (issue 22 item 1): a chunk of records is encoded in one fast-tokenizer call
(``Renderer.render_many`` → ``Tokenizer.encode_many``); the documents — ids, classes, weights — and the refusals
must be exactly those of rendering each record alone, one encode call per string."""
import json
import os
import sys

import numpy as np
import pytest

import witscale.data.pack as pack
from tests.test_templates import (OPENAI_TOOLS, SHAREGPT_TOOLS, TOOL_CHAT, _both_content_and_call,  # noqa: F401
                                  hf_tool_tokenizers)
from witscale.data.errors import RecordError
from witscale.data.pack import PackOptions, pack_records
from witscale.data.readers import normalize_record
from witscale.data.render import Renderer
from witscale.data.tokenizer import load_tokenizer

TEXT_TEMPLATES = ["plain", "alpaca", "chatml", "tulu"]
ALL_TEMPLATES = TEXT_TEMPLATES + ["llama3", "hf"]


@pytest.fixture(scope="module")
def llama_like_hf(sp_model_path, tmp_path_factory):
    """The conftest SentencePiece model converted to a fast LLaMA tokenizer (Metaspace: the case where a string
    after a special token is encoded differently) with the ChatML specials — what the benchmark packs with."""
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tools", "bench"))
    from bench_pack import hf_tokenizer_dir
    return load_tokenizer(hf_tokenizer_dir(sp_model_path, str(tmp_path_factory.mktemp("llama-hf"))))


def _records():
    rng = np.random.default_rng(0)
    words = ["Add", "two", "and", "three", "the", "sum", "is", "five", "é", "日本", "  ", "\n", "x.", "Paris?"]

    def text(n):
        return " ".join(rng.choice(words, int(rng.integers(0, n))))
    recs = [TOOL_CHAT, OPENAI_TOOLS, SHAREGPT_TOOLS, _both_content_and_call(),
            {"messages": [{"role": "user", "content": "2+2?"},
                          {"role": "assistant", "content": "<think>\nadd them\n</think>\n\n4"}]},
            {"instruction": "Name a city.", "input": "", "output": "Paris"},
            {"instruction": "Sum", "input": "2 and 3", "output": "5", "system": "Be exact."}]
    for i in range(40):
        turns = [{"role": "system", "content": text(8)}] if i % 4 == 0 else []
        for t in range(1 + i % 3):
            turns += [{"role": "user", "content": text(20) or "hi", "loss_weight": 0.5 if i % 5 == 0 else 1.0},
                      {"role": "assistant", "content": text(30) + " five"}]
        recs.append({"messages": turns, **({"weight": 2} if i % 7 == 0 else {})})
    return recs


def _convs(last_turn_only=False):
    out = []
    for r in _records():
        fmt = "alpaca" if "instruction" in r else ("sharegpt" if "conversations" in r else "messages")
        out.append(normalize_record(r, fmt, last_turn_only=last_turn_only))
    return out


def _one_by_one(renderer, convs):
    out = []
    for c in convs:
        try:
            out.append(renderer(c))
        except RecordError as e:
            out.append(e)
    return out


def _assert_same(batched, reference):
    assert len(batched) == len(reference)
    for k, (b, r) in enumerate(zip(batched, reference)):
        if isinstance(r, RecordError):
            assert isinstance(b, RecordError) and str(b) == str(r), k
            continue
        assert not isinstance(b, RecordError), (k, b)
        assert b.ids.dtype == r.ids.dtype and b.ids.tolist() == r.ids.tolist(), k
        assert b.classes.dtype == r.classes.dtype and b.classes.tolist() == r.classes.tolist(), k
        assert (b.weights is None) == (r.weights is None), k
        if r.weights is not None:
            assert b.weights.dtype == r.weights.dtype and b.weights.tolist() == r.weights.tolist(), k


@pytest.mark.parametrize("last_turn_only", [False, True])
@pytest.mark.parametrize("template", ALL_TEMPLATES)
def test_batched_documents_equal_one_record_at_a_time_bpe(hf_tool_tokenizers, template, last_turn_only):  # noqa: F811
    """Byte-level BPE with every special (and a Qwen-like chat_template for ``hf``): every template, records with
    tools, reasoning, system prompts, weights, several turns — and the refusals (tools under a text template)."""
    renderer = Renderer(template, hf_tool_tokenizers["qwen"])
    convs = _convs(last_turn_only)
    docs = renderer.render_many(convs)
    _assert_same(docs, _one_by_one(renderer, convs))
    assert sum(not isinstance(d, RecordError) for d in docs) >= 40


@pytest.mark.parametrize("template", TEXT_TEMPLATES)
def test_batched_documents_equal_one_record_at_a_time_llama(llama_like_hf, template):
    renderer = Renderer(template, llama_like_hf)
    convs = _convs()
    _assert_same(renderer.render_many(convs), _one_by_one(renderer, convs))


def test_batched_encoding_equals_one_string_at_a_time(llama_like_hf):
    """encode_many is encode_with_offsets per string — continuation (after a special token) included; for
    lengths_only, the number of tokens."""
    requests = [(t, c) for t in ["", " ", "Hello world", " Hello", "\nSum: 5", "日本 é x."] for c in (False, True)]
    many = llama_like_hf.encode_many(requests)
    lengths = llama_like_hf.encode_many(requests, lengths_only=set(range(0, len(requests), 3)))
    for k, ((t, c), got) in enumerate(zip(requests, many)):
        want = llama_like_hf.encode_with_offsets(t, c)
        assert all(g.dtype == w.dtype and g.tolist() == w.tolist() for g, w in zip(got, want)), (t, c)
        assert lengths[k] == len(want[0]) if k % 3 == 0 else lengths[k][0].tolist() == want[0].tolist()
    assert llama_like_hf.encode_many([]) == []


@pytest.mark.parametrize("template", ["plain", "chatml"])
def test_chunk_size_and_workers_give_the_same_bytes_with_a_fast_tokenizer(tmp_path, monkeypatch, llama_like_hf,
                                                                          template):
    """Chunks of 1 record (each its own batch) and of 64 (one batch), 1 or 2 workers: the same packed bytes."""
    recs = _records() * 3
    outs = []
    for chunk, workers in ((1, 1), (64, 1), (5, 2)):
        monkeypatch.setattr(pack, "CHUNK_RECORDS", chunk)
        out = str(tmp_path / f"c{chunk}w{workers}")
        pack_records(recs, llama_like_hf.path, out, PackOptions(seq_len=256, template=template, workers=workers,
                                                                skip_invalid=True, max_skip_fraction=1.0))
        outs.append({n: open(os.path.join(out, n), "rb").read() for n in sorted(os.listdir(out))})
    assert outs[0] == outs[1] == outs[2]
    m = json.loads(outs[0]["manifest.json"])
    assert m["num_documents"] > 100


def test_forked_workers_leave_the_garbage_collector_as_they_found_it(tmp_path, llama_like_hf):
    """The pool's parent freezes its objects for the forked workers (out of their collections) and unfreezes them
    after; a caller that froze objects of its own keeps them frozen (the packer then does not freeze)."""
    import gc
    recs = _records()
    opts = PackOptions(seq_len=256, template="chatml", workers=2, skip_invalid=True, max_skip_fraction=1.0)
    assert gc.get_freeze_count() == 0
    pack_records(recs, llama_like_hf.path, str(tmp_path / "a"), opts)
    assert gc.get_freeze_count() == 0
    gc.freeze()
    try:
        frozen = gc.get_freeze_count()
        pack_records(recs, llama_like_hf.path, str(tmp_path / "b"), opts)
        assert gc.get_freeze_count() >= frozen
    finally:
        gc.unfreeze()


def _classify_by_class_counts(text, char_cls, char_msg, begin, end, num_classes):
    """classify_tokens as it was (per-class prefix counts of non-whitespace characters): the reference."""
    from witscale.data.classes import TokenClass
    from witscale.data.templates import _IS_SPACE, BoundaryError
    n = len(text)
    code_points = np.frombuffer(text.encode("utf-32-le", "surrogatepass"), dtype="<u4")
    nonws = ~_IS_SPACE[np.minimum(code_points, len(_IS_SPACE) - 1)]
    onehot = np.zeros((num_classes, n + 1), dtype=np.int32)
    onehot[char_cls[nonws], np.nonzero(nonws)[0] + 1] = 1
    cum = np.cumsum(onehot, axis=1)
    present = (cum[:, end] - cum[:, begin]) > 0
    bad = np.nonzero(present.sum(axis=0) > 1)[0]
    if len(bad):
        k = int(bad[0])
        names = [TokenClass(c).name.lower() if c < 9 else "end-of-turn" for c in np.nonzero(present[:, k])[0]]
        raise BoundaryError(f"token {k} covers {text[begin[k]:end[k]]!r}, which spans classes "
                            f"{' and '.join(names)}: the class boundary falls inside a token")
    next_nonws = np.full(n + 1, n, dtype=np.int64)
    idx = np.nonzero(nonws)[0]
    if len(idx):
        pos = np.searchsorted(idx, np.arange(n + 1), side="left")
        ok = pos < len(idx)
        next_nonws[ok] = idx[pos[ok]]
    first = next_nonws[np.minimum(begin, n)]
    at = np.where(first < end, first, np.minimum(begin, max(n - 1, 0)))
    return char_cls[at], char_msg[at]


def test_classify_tokens_equals_the_per_class_count_formulation():
    """classify_tokens (class changes between consecutive non-whitespace characters) gives the classes, message
    indices and BoundaryError messages of the per-class prefix counts it replaced, on random texts, classes and
    token segmentations (zero-width tokens, whitespace-only tokens, Unicode spaces)."""
    from witscale.data.templates import classify_tokens
    rng = np.random.default_rng(0)
    alphabet = list("ab  \n\té日x.") + ["\u3000", "\u00a0"]
    errors = 0
    for _ in range(3000):
        n = int(rng.integers(1, 30))
        text = "".join(rng.choice(alphabet, n))
        cls = np.resize(np.repeat(rng.integers(0, 10, 6).astype(np.uint8), 6), n).astype(np.uint8)
        msg = rng.integers(0, 4, n).astype(np.int64)
        cuts = np.sort(rng.choice(np.arange(1, n), size=int(rng.integers(0, n)), replace=False)) if n > 1 else []
        bounds = np.concatenate([[0], cuts, [n]]).astype(np.int64)
        begin, end = bounds[:-1], bounds[1:]
        if rng.random() < 0.2:
            begin, end = np.append(begin, n), np.append(end, n)
        outs = []
        for f in (_classify_by_class_counts, classify_tokens):
            try:
                outs.append([a.tolist() for a in f(text, cls, msg, begin, end, num_classes=10)])
            except RecordError as e:
                outs.append(str(e))
        assert outs[0] == outs[1], (text, cls, begin)
        errors += isinstance(outs[0], str)
    assert 300 < errors < 2700


def test_a_worker_chunk_packed_for_the_trip_back_unpacks_to_the_same_outcomes(llama_like_hf):
    """_tokenize_chunk_packed → pickle → _unpack_chunk gives what _tokenize_chunk gives: documents (weighted or
    not), preference pairs (truncated or not) and refusals, in order — the documents as views of three arrays."""
    import pickle
    from witscale.data.preference import PairDocuments
    from witscale.data.readers import SourceRecord
    sft = [r for r in _records() if "tools" not in r and "conversations" not in r][:30]
    sft.insert(5, {"messages": [{"role": "robot", "content": "x"}]})                      # refused
    pairs = [{"prompt": "Say " + "yes " * k, "chosen": "yes " * (3 * k), "rejected": "no"} for k in (1, 40)]
    tasks = [pack._Task("messages" if "messages" in r else "alpaca", SourceRecord("in.jsonl", f"line {i}", r))
             for i, r in enumerate(sft, 1)]
    tasks += [pack._Task("preference", SourceRecord("in.jsonl", f"line {i}", r)) for i, r in enumerate(pairs, 99)]
    for template in ("plain", "chatml"):
        pack._init_worker(llama_like_hf.path, PackOptions(seq_len=64, template=template, max_prompt_length=8),
                          llama_like_hf)
        want = pack._tokenize_chunk(tasks)
        got = pack._unpack_chunk(pickle.loads(pickle.dumps(pack._tokenize_chunk_packed(tasks))))
        assert [k for _, k in got] == [k for _, k in want]
        docs = {"want": [], "got": []}
        for side, outs in (("want", want), ("got", got)):
            for out, _ in outs:
                if isinstance(out, PairDocuments):
                    docs[side] += [out.chosen, out.rejected, out.truncated]
                else:
                    docs[side].append(out)
        truncated = [d for d in docs["want"] if isinstance(d, tuple) and not hasattr(d, "ids")]
        assert ("prompt",) in truncated or ("prompt", "completion") in truncated     # a pair was cut
        assert any(getattr(d, "weights", None) is not None for d in docs["want"])
        assert [d for d in docs["got"] if isinstance(d, tuple) and not hasattr(d, "ids")] == truncated
        strip = lambda ds: [d for d in ds if not (isinstance(d, tuple) and not hasattr(d, "ids"))]  # noqa: E731
        _assert_same(strip(docs["got"]), strip(docs["want"]))


# ------------------------------------------------------------------ classes from the tokens near class changes
# The fixed templates class a run's tokens from the spans of the tokens near the characters where the class or
# message changes (templates.classify_segments over tokenizer.Spans) rather than from every token's offsets
# (classify_tokens). The references below are the per-token path as it was.
_ADVERSARIAL = ["a", "b", "é", "e\u0301", "日本", "😀", "👩‍💻", "\U0001f9ec", "ñ", " ", "  ", "\n", "\t", "\u3000",
                "\u00a0", "x.", "Paris", "?", "Add", "###", "\u200b", "ﬁ", "Ⅻ", "0", "12",
                # what the piece-length table must not take at face value: a literal "▁", specials and a
                # byte-fallback piece's spelling in the text, an unknown token's
                "\u2581", "<|im_end|>", "<s>", "<0x41>", "<unk>", "[UNK]"]


@pytest.fixture(scope="module")
def wordpiece_hf(tmp_path_factory):
    """A BERT-like fast tokenizer: lower-casing, accent-stripping normalizer, whitespace dropped (characters in
    no token: Encoding.char_to_token finds nothing there)."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast
    core = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    core.normalizer = normalizers.BertNormalizer(lowercase=True, strip_accents=True)
    core.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    core.train_from_iterator(["Add two and three. Paris is five. naïve café 日本"] * 4,
                             trainers.WordPieceTrainer(vocab_size=200, special_tokens=["[UNK]", "[SEP]"],
                                                       show_progress=False))
    path = str(tmp_path_factory.mktemp("wordpiece"))
    PreTrainedTokenizerFast(tokenizer_object=core, unk_token="[UNK]", eos_token="[SEP]").save_pretrained(path)
    return load_tokenizer(path)


@pytest.fixture(scope="module")
def span_tokenizers(llama_like_hf, hf_tool_tokenizers, wordpiece_hf, sp_tokenizer):  # noqa: F811
    return {"llama-hf": llama_like_hf, "bytelevel-bpe": hf_tool_tokenizers["qwen"], "wordpiece": wordpiece_hf,
            "sentencepiece": sp_tokenizer}


def _adversarial_texts(rng, count, max_parts=12):
    return ["".join(rng.choice(_ADVERSARIAL, int(rng.integers(1, max_parts)))) for _ in range(count)]


@pytest.mark.parametrize("name", ["llama-hf", "bytelevel-bpe", "wordpiece", "sentencepiece"])
def test_spans_equal_the_offset_arrays(span_tokenizers, name):
    """encode_spans gives encode_with_offsets' ids and, token by token, its (begin, end); the begins and ends
    never decrease (what first_from and classify_segments rely on); first_from(p) is the number of tokens that
    begin before p, for every p — on text with emoji, byte fallback, combining marks, ZWJ sequences, Unicode
    spaces, ligatures, and strings after a special token (continuation)."""
    tok = span_tokenizers[name]
    rng = np.random.default_rng(1)
    requests = [(t, bool(rng.random() < 0.4)) for t in _adversarial_texts(rng, 300)]
    counted = set(range(0, len(requests), 7))
    spans = tok.encode_spans(requests, counted)
    for i, ((text, cont), sp) in enumerate(zip(requests, spans)):
        ids, begin, end = tok.encode_with_offsets(text, cont)
        if i in counted:
            assert sp == len(ids)
            continue
        assert sp.ids.dtype == np.int32 and sp.ids.tolist() == ids.tolist(), text
        assert [sp.span(k) for k in range(len(ids))] == list(zip(begin.tolist(), end.tolist())), text
        assert [a.tolist() for a in sp.arrays()] == [begin.tolist(), end.tolist()]
        assert sp.monotone and bool(np.all(np.diff(begin) >= 0) and np.all(np.diff(end) >= 0)), text
        for p in range(len(text) + 2):
            assert sp.first_from(p) == int(np.sum(begin < p)), (text, p)


def _classify_both(text, parts, spans, begin, end):
    """(classify_segments' outcome, classify_tokens' on per-character arrays): classes and messages as lists,
    or the BoundaryError's message."""
    from witscale.data.render import _segments
    from witscale.data.templates import Text, classify_segments, classify_tokens
    run = [Text(t, c, m) for t, c, m in parts]
    lens = [len(t) for t, _, _ in parts]
    char_cls = np.repeat(np.array([c for _, c, _ in parts], dtype=np.uint8), lens)
    char_msg = np.repeat(np.array([m for _, _, m in parts], dtype=np.int64), lens)
    outs = []
    for f in (lambda: classify_segments(text, *_segments(run), spans),
              lambda: classify_tokens(text, char_cls, char_msg, begin, end)):
        try:
            cls, msg = f()
            outs.append((cls.dtype.str, cls.tolist(), msg.dtype.str, msg.tolist()))
        except RecordError as e:
            outs.append(str(e))
    return outs


@pytest.mark.parametrize("name", ["llama-hf", "bytelevel-bpe", "wordpiece", "sentencepiece"])
def test_classify_segments_equals_classify_tokens_on_real_tokenizations(span_tokenizers, name):
    """A run of texts with random classes and messages (boundaries inside words, between a character and its
    combining mark, inside whitespace, next to emoji split into byte-fallback tokens, one-character texts),
    tokenized whole: classify_segments on the tokens near the class changes gives classify_tokens' classes,
    message indices and BoundaryError message (the first token that spans two classes) — a token that covers a
    class change, whitespace-only tokens, tokens of no width."""
    from witscale.data.tokenizer import ArraySpans
    tok = span_tokenizers[name]
    rng = np.random.default_rng(2)
    runs = []
    for _ in range(400):
        text = _adversarial_texts(rng, 1, 10)[0]
        cuts = sorted(set(rng.integers(1, len(text), int(rng.integers(0, 4))).tolist())) if len(text) > 1 else []
        seg = [0, *cuts, len(text)]
        parts = [(text[a:b], int(rng.choice([1, 3, 4, 4, 6, 7])), int(rng.integers(-1, 2)))
                 for a, b in zip(seg[:-1], seg[1:])]
        runs.append((text, parts, bool(rng.random() < 0.4)))
    spans = tok.encode_spans([(text, cont) for text, _, cont in runs])
    errors = 0
    for (text, parts, cont), sp in zip(runs, spans):
        ids, begin, end = tok.encode_with_offsets(text, cont)
        for s in (sp, ArraySpans(ids, begin, end)):
            new, old = _classify_both(text, parts, s, begin, end)
            assert new == old, (text, parts)
        errors += isinstance(old, str)
    assert 20 < errors < 380          # both outcomes exercised


def test_classify_segments_equals_classify_tokens_on_random_segmentations():
    """The same on synthetic monotone segmentations (several zero-width tokens at one place, tokens sharing a
    span as byte-fallback bytes do, overlapping spans as a byte-level BPE splitting a character gives, tokens
    covering several class changes, past-the-end empty tokens), and the fallback for spans that are not
    monotone."""
    from witscale.data.tokenizer import ArraySpans
    rng = np.random.default_rng(3)
    alphabet = list("ab  \n\té日x.") + ["\u3000", "\u00a0"]
    errors = 0
    for trial in range(3000):
        n = int(rng.integers(1, 30))
        text = "".join(rng.choice(alphabet, n))
        cuts = np.sort(rng.choice(np.arange(1, n), size=int(rng.integers(0, n)), replace=False)) if n > 1 else []
        seg = np.concatenate([[0], cuts, [n]]).astype(int)
        parts = [(text[a:b], int(rng.integers(1, 9)), int(rng.integers(0, 3))) for a, b in zip(seg[:-1], seg[1:])]
        points = np.sort(rng.integers(0, n + 1, int(rng.integers(1, 2 * n + 2))))
        begin, end = points[:-1].astype(np.int64), points[1:].astype(np.int64)
        if len(begin) and rng.random() < 0.3:        # shared spans and overlaps, still monotone
            k = int(rng.integers(0, len(begin)))
            begin = np.insert(begin, k, begin[k])
            end = np.insert(end, k, end[k])
            if k + 1 < len(begin) and rng.random() < 0.5:
                begin[k + 1] = max(begin[k + 1] - 1, begin[k])
        if rng.random() < 0.1:
            begin, end = np.append(begin, n), np.append(end, n)
        if trial % 10 == 0 and len(begin) > 1:   # not monotone: classify_tokens on the arrays
            begin, end = begin[::-1].copy(), end[::-1].copy()
        ids = np.zeros(len(begin), dtype=np.int32)
        new, old = _classify_both(text, parts, ArraySpans(ids, begin, end), begin, end)
        assert new == old, (text, parts, begin.tolist(), end.tolist())
        errors += isinstance(old, str)
    assert 300 < errors < 2700


def _paper_boundary_per_token(bounds, begin, cls, msg, n_prompts):
    """Renderer._paper_boundary as it was (a mask over every token's begin): the reference."""
    from witscale.data.classes import RESPONSE_SIDE, TokenClass
    is_rs = np.zeros(256, dtype=bool)
    is_rs[[int(c) for c in RESPONSE_SIDE]] = True
    cls, msg = cls.copy(), msg.copy()
    idx = np.arange(len(cls))
    for (turn, first, _, turn_end), n_prompt in zip(bounds, n_prompts):
        in_turn = begin < turn_end
        after = in_turn & (idx >= n_prompt) & ~is_rs[cls]
        cls[after], msg[after] = first, turn
        before = (idx < n_prompt) & (msg == turn) & is_rs[cls]
        cls[before] = TokenClass.PROMPT
    return cls, msg


def test_paper_boundary_from_spans_equals_the_per_token_mask(llama_like_hf):
    """plain's boundary rule on Spans (the turn's tokens: the first first_from(turn_end)) gives what the mask
    over every token's begin gave — several boundaries, prompt lengths before, inside and past the turn."""
    from witscale.data.tokenizer import ArraySpans
    rng = np.random.default_rng(4)
    texts = _adversarial_texts(rng, 300, 20)
    spans = llama_like_hf.encode_spans([(t, False) for t in texts])
    for text, sp in zip(texts, spans):
        ids, begin, end = llama_like_hf.encode_with_offsets(text)
        n = len(ids)
        cls = rng.integers(1, 9, n).astype(np.uint8)
        msg = rng.integers(0, 3, n).astype(np.int64)
        bounds = [(int(rng.integers(0, 3)), int(rng.choice([4, 5, 6, 7])), 0, int(rng.integers(1, len(text) + 1)))
                  for _ in range(int(rng.integers(1, 4)))]
        n_prompts = [int(rng.integers(0, n + 2)) for _ in bounds]
        want = _paper_boundary_per_token(bounds, begin, cls, msg, n_prompts)
        for s in (sp, ArraySpans(ids, begin, end), ArraySpans(ids[::-1], begin[::-1], end[::-1])):
            b = begin if s.monotone else begin[::-1]
            ref = want if s.monotone else _paper_boundary_per_token(bounds, b, cls, msg, n_prompts)
            got = Renderer._paper_boundary(bounds, s, cls, msg, n_prompts)
            assert [a.tolist() for a in got] == [a.tolist() for a in ref], (text, bounds, n_prompts)


class _FakeEncoding:
    """A backend Encoding's offset interface (tokenizers' semantics: char_to_token is the first token whose
    span holds the character) over chosen offsets — zero-width tokens, shared spans, uncovered characters."""

    def __init__(self, offsets):
        self.offsets = offsets

    def token_to_chars(self, i):
        return self.offsets[i]

    def char_to_token(self, pos):
        return next((i for i, (b, e) in enumerate(self.offsets) if b <= pos < e), None)


def test_encoding_spans_first_from_with_zero_width_and_uncovered_positions():
    """EncodingSpans.first_from (char_to_token, then moved back over tokens that begin at or after the position
    and forward over those that begin before it; a binary search where no token covers it) is the number of
    tokens that begin before the position, on random monotone spans with an anchor shift or without."""
    from witscale.data.tokenizer import EncodingSpans
    rng = np.random.default_rng(5)
    for _ in range(2000):
        n = int(rng.integers(1, 15))
        shift = int(rng.choice([0, 0, 3]))
        points = np.sort(rng.integers(0, n + 1, size=(int(rng.integers(1, 12)), 2)), axis=None).reshape(-1, 2)
        begin = np.sort(points[:, 0])
        end = np.maximum(np.sort(points[:, 1]), begin)
        offsets = [(int(b) + shift, int(e) + shift) for b, e in zip(begin, end)]
        if shift:
            offsets.insert(0, (0, shift))                   # the anchor token
        spans = EncodingSpans(_FakeEncoding(offsets), shift, np.zeros(len(begin), np.int32))
        for p in range(n + 2):
            assert spans.first_from(p) == int(np.sum(begin < p)), (offsets, shift, p)


def test_encode_spans_through_transformers_call_when_the_backend_state_differs(llama_like_hf):
    """A tokenizer whose transformers state the backend call would not reproduce (special tokens split) is
    encoded through transformers' own call: encode_spans then gives arrays (ArraySpans) equal to
    encode_with_offsets."""
    from witscale.data.tokenizer import ArraySpans
    tok = llama_like_hf
    tok.hf.split_special_tokens = True
    try:
        requests = [("Hi <|im_start|> 😀 there", False), ("x é", False), ("two", False)]
        spans = tok.encode_spans(requests, {2})
        assert spans[2] == len(tok.encode_with_offsets("two")[0])
        for (text, cont), sp in zip(requests[:2], spans):
            ids, begin, end = tok.encode_with_offsets(text, cont)
            assert isinstance(sp, ArraySpans)
            assert [sp.ids.tolist(), *[a.tolist() for a in sp.arrays()]] == [ids.tolist(), begin.tolist(), end.tolist()]
    finally:
        tok.hf.split_special_tokens = False
        tok.hf.backend_tokenizer.encode_special_tokens = False   # (transformers' call set the backend's too)


# ------------------------------------------------------------------ offsets from the pieces' lengths
# Metaspace and ByteLevel BPE tokenizers encode without offsets (encode_batch_fast) and take each token's span
# from the UTF-8 bytes its piece spells (witscale/data/piece_offsets.py); a string the table cannot vouch for
# takes the library's offsets.
def _legacy_metaspace(llama_like_hf, tmp_path_factory):
    """The same LLaMA BPE with the older tokenizer.json form: Prepend("▁") + Replace(" ", "▁") normalizer, no
    pre-tokenizer (a dummy "▁" in front of every string between added tokens)."""
    from tokenizers import Tokenizer, normalizers
    from transformers import PreTrainedTokenizerFast
    core = Tokenizer.from_str(llama_like_hf.hf.backend_tokenizer.to_str())
    core.normalizer = normalizers.Sequence([normalizers.Prepend("\u2581"), normalizers.Replace(" ", "\u2581")])
    core.pre_tokenizer = None
    path = str(tmp_path_factory.mktemp("legacy-metaspace"))
    PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                            additional_special_tokens=["<|im_start|>", "<|im_end|>"]).save_pretrained(path)
    return load_tokenizer(path)


def _nfc_bytelevel(tmp_path_factory):
    """A byte-level BPE with Qwen2's NFC normalizer and a regex split before the ByteLevel step (Llama 3's)."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast
    core = Tokenizer(models.BPE())
    core.normalizer = normalizers.NFC()
    core.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(r"\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+|\s+"), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    core.decoder = decoders.ByteLevel()
    core.train_from_iterator(["Add two and three. Paris is five. naïve café 日本 😀 e\u0301"] * 8,
                             trainers.BpeTrainer(vocab_size=400, special_tokens=["<|im_start|>", "<|im_end|>"],
                                                 show_progress=False,
                                                 initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    path = str(tmp_path_factory.mktemp("nfc-bytelevel"))
    PreTrainedTokenizerFast(tokenizer_object=core, eos_token="<|im_end|>",
                            additional_special_tokens=["<|im_start|>"]).save_pretrained(path)
    return load_tokenizer(path)


@pytest.fixture(scope="module")
def piece_tokenizers(llama_like_hf, hf_tool_tokenizers, tmp_path_factory):  # noqa: F811
    # (a fresh copy of the module's LLaMA tokenizer: another test changes that one's special-token splitting)
    return {"metaspace": load_tokenizer(llama_like_hf.path),
            "metaspace-legacy": _legacy_metaspace(llama_like_hf, tmp_path_factory),
            "bytelevel": hf_tool_tokenizers["qwen"], "bytelevel-nfc": _nfc_bytelevel(tmp_path_factory)}


@pytest.mark.parametrize("name", ["metaspace", "metaspace-legacy", "bytelevel", "bytelevel-nfc"])
def test_piece_lengths_give_the_library_offsets_or_nothing(piece_tokenizers, name):
    """For every string — adversarial (literal "▁", specials and byte-fallback spellings in the text, emoji,
    combining marks, non-NFC text), fresh and after the anchor — the piece-length table gives exactly the
    library's character offsets, or declines; on ordinary text it does not decline (the fast path is taken)."""
    tok = piece_tokenizers[name]
    table = tok._piece_lengths()
    assert table is not None
    backend = tok.hf.backend_tokenizer
    rng = np.random.default_rng(5)
    ordinary = [" ".join(rng.choice(["Add", "two", "and", "three.", "Paris", "is", "five", "café", "日本", "😀",
                                     "\n", "x"], int(rng.integers(1, 30)))) for _ in range(200)]
    declined = {"adversarial": 0, "ordinary": 0}
    for kind, texts in (("adversarial", _adversarial_texts(rng, 600)), ("ordinary", ordinary)):
        for text in texts:
            for anchored in (text, tok._anchor + text):
                enc = backend.encode(anchored, add_special_tokens=False)
                spans = table.spans(anchored, np.array(enc.ids, dtype=np.int32))
                if spans is None:
                    declined[kind] += 1
                    continue
                assert list(zip(*[a.tolist() for a in spans])) == [tuple(o) for o in enc.offsets], \
                    (anchored, list(zip(enc.tokens, enc.offsets)))
    assert declined["ordinary"] == 0
    assert declined["adversarial"] < 600                  # the table answers most adversarial strings too


def test_piece_lengths_only_for_tokenizers_whose_pieces_spell_the_text(wordpiece_hf, llama_like_hf):
    """WordPiece (lower-casing, accents stripped, whitespace dropped) has no table: its offsets come from the
    library; a Metaspace tokenizer's encode_spans takes the table (encode_batch_fast) and gives the arrays of
    encode_with_offsets, a declined string (literal "▁") among them."""
    from witscale.data.tokenizer import ArraySpans, EncodingSpans
    assert wordpiece_hf._piece_lengths() is None
    tok = load_tokenizer(llama_like_hf.path)      # (another test changes the module's tokenizer's state)
    requests = [("Paris is five", False), ("a \u2581 b", False), ("x 😀 y", True), ("two", False)]
    spans = tok.encode_spans(requests, {3})
    assert [type(s) for s in spans] == [ArraySpans, EncodingSpans, ArraySpans, int]
    for (text, cont), sp in zip(requests[:3], spans):
        ids, begin, end = tok.encode_with_offsets(text, cont)
        assert sp.ids.tolist() == ids.tolist()
        assert [sp.span(k) for k in range(len(ids))] == list(zip(begin.tolist(), end.tolist()))


@pytest.mark.parametrize("name", ["metaspace", "metaspace-legacy"])
def test_prefix_counts_read_off_the_whole_text_equal_the_prefix_tokenized_alone(piece_tokenizers, name):
    """plain's paper boundary needs len(tokenize(text[:c])); a Metaspace BPE gives it as the number of tokens
    before c wherever the whole text's tokens break at c (Tokenizer.prefix_count) — on adversarial text (emoji
    in byte-fallback bytes, literal "▁", special-token spellings, spaces on both sides of c), fresh and after the
    anchor. It answers for most cuts (a joining space starts a token), declines where a token covers c."""
    from witscale.data.tokenizer import ArraySpans
    tok = piece_tokenizers[name]
    assert tok.prefix_stable
    rng = np.random.default_rng(7)
    answered = declined = 0
    for text in _adversarial_texts(rng, 500, 14):
        cont = bool(rng.random() < 0.4)
        ids, begin, end = tok.encode_with_offsets(text, cont)
        for spans in tok.encode_spans([(text, cont)]) + [ArraySpans(ids, begin, end)]:
            for c in range(1, len(text) + 1):
                n = tok.prefix_count(spans, c)
                if n is None:
                    declined += 1
                    continue
                answered += 1
                assert n == len(tok.encode_with_offsets(text[:c], cont)[0]), (text, c, cont)
    assert answered > 2000 and declined > 200


def test_prefix_counts_only_where_the_tokenizer_is_prefix_stable(piece_tokenizers, wordpiece_hf, sp_tokenizer):
    """ByteLevel BPE (its regex splits a prefix's end differently), WordPiece and SentencePiece models are
    encoded for every prefix: no count is read off the whole text."""
    for tok in (piece_tokenizers["bytelevel"], piece_tokenizers["bytelevel-nfc"], wordpiece_hf, sp_tokenizer):
        assert not tok.prefix_stable
        spans = tok.encode_spans([("Paris is five", False)])[0]
        assert tok.prefix_count(spans, 5) is None
