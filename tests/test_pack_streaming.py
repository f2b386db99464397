"""The streaming packer (witscale/data/pack.py, format.PackedWriter): documents go to disk as they are
tokenized, rows are planned by best-fit decreasing over all the lengths and written block by block.
Equivalences: the streamed dataset equals the in-memory placement of the same plan, byte for byte, and any
worker count gives the same bytes; bounds counted, never timed: the records in flight and the documents held."""
import json
import os
import weakref

import numpy as np
import pytest

import witscale.data.format as fmt
import witscale.data.pack as pack
from conftest import write_jsonl
from tests.test_pack_cli import GOOD, run_cli
from witscale.data.bestfit import apply_long_policy, gather_index, layout_rows
from witscale.data.classes import NUM_CLASSES, TokenClass as C
from witscale.data.format import PackedDataset, PackedWriter, TokenizedCorpus, write_packed
from witscale.data.pack import PackOptions, pack_records
from witscale.data.templates import Document


def _docs(n, seed, weighted_from=None, max_len=90):
    """Documents with traceable tokens (doc * 1000 + position); weights on every other document from
    `weighted_from` on (the channel appears mid-stream: the writer back-fills 1.0 before it)."""
    rng = np.random.default_rng(seed)
    docs = []
    for d in range(n):
        k = int(rng.integers(0, max_len))
        ids = (d * 1000 + np.arange(k)).astype(np.int32)
        cls = rng.integers(0, NUM_CLASSES, k).astype(np.uint8)
        w = rng.random(k).astype(np.float32) if weighted_from is not None and d >= weighted_from and d % 2 else None
        docs.append((ids, cls, w))
    return docs


def _dense_reference(docs, seq_len, pad_id, policy, pairs=False):
    """The whole-dataset placement the packer used before it streamed: one gather of every token (the
    arrays of tokens.bin, classes.bin, weights.bin)."""
    corpus = TokenizedCorpus.from_documents(docs)
    lengths = np.diff(corpus.offsets)
    if pairs:
        doc, start, length = np.arange(0, len(docs), 2), np.zeros(len(docs) // 2, np.int64), lengths[0::2] + lengths[1::2]
    else:
        p = apply_long_policy(lengths, seq_len, policy)
        doc, start, length = p.doc, p.start, p.length
    keep = length > 0
    doc, start, length = doc[keep], start[keep], length[keep]
    layout = layout_rows(length, seq_len)
    total = (len(layout.row_offsets) - 1) * seq_len
    src = gather_index(corpus.offsets[doc[layout.order]] + start[layout.order], length[layout.order])
    dst = gather_index(layout.dest, length[layout.order])
    out = {}
    for name, arr, pad, dtype in (("tokens", corpus.tokens, pad_id, "<i4"), ("classes", corpus.classes, C.PAD, "u1"),
                                  ("weights", corpus.weights, 0.0, "<f4")):
        if arr is not None:
            full = np.full(total, pad, dtype=dtype)
            full[dst] = arr[src]
            out[f"{name}.bin"] = full.tobytes()
    return out


def _files(path):
    return {name: open(os.path.join(path, name), "rb").read() for name in sorted(os.listdir(path))}


@pytest.mark.parametrize("policy", ["truncate", "drop", "split", "pairs"])
@pytest.mark.parametrize("block_tokens", [1, 100, 1 << 22])
def test_streamed_rows_equal_the_in_memory_placement(tmp_path, monkeypatch, policy, block_tokens):
    monkeypatch.setattr(fmt, "PLACE_BLOCK_TOKENS", block_tokens)     # 1: one row per block
    seq_len = 64
    if policy == "pairs":
        docs = [d for d in _docs(240, seed=1, weighted_from=37, max_len=30) if len(d[0]) >= 2][:200]
        task, long_policy = "preference", "truncate"
    else:
        docs, task, long_policy = _docs(300, seed=2, weighted_from=37), "sft", policy
    with PackedWriter(str(tmp_path / "streamed"), seq_len=seq_len, pad_id=5, long_policy=long_policy,
                      task=task) as w:
        for d in docs:
            w.add(*d)
        m = w.finish(template="plain")
    streamed = _files(tmp_path / "streamed")
    assert not [n for n in streamed if n.startswith(".")]                  # the spill files are gone
    for name, data in _dense_reference(docs, seq_len, 5, policy, pairs=policy == "pairs").items():
        assert streamed[name] == data, name
    # write_packed (documents in memory) writes the same dataset, manifest included
    write_packed(str(tmp_path / "memory"), TokenizedCorpus.from_documents(docs), seq_len=seq_len, pad_id=5,
                 long_policy=long_policy, task=task, template="plain")
    assert _files(tmp_path / "memory") == streamed
    ds = PackedDataset(str(tmp_path / "streamed"))
    assert ds.has_weights and m["num_rows"] == len(ds)


def _records(n, seed=0):
    rng = np.random.default_rng(seed)
    recs = []
    for i in range(n):
        if i % 5 == 0:
            recs.append({"messages": [{"role": "user", "content": f"add {i} and {i + 1}", "loss_weight": 0.5},
                                      {"role": "assistant", "content": str(2 * i + 1)}], "weight": 2})
        else:
            words = " ".join(rng.choice(["Add", "two", "and", "three", "the", "sum", "is", "five"], rng.integers(1, 40)))
            recs.append({"messages": [{"role": "user", "content": words},
                                      {"role": "assistant", "content": words[::-1] or "x"}]})
    recs[7] = {"messages": [{"role": "wizard", "content": "x"}]}          # skipped
    return recs


def test_any_worker_count_gives_the_same_bytes(tmp_path, monkeypatch, sp_model_path):
    monkeypatch.setattr(pack, "CHUNK_RECORDS", 7)          # many chunks, several in flight per worker
    recs = _records(300)
    outs = []
    for workers in (1, 2, 4):
        out = str(tmp_path / f"w{workers}")
        pack_records(recs, sp_model_path, out, PackOptions(seq_len=128, template="chatml", workers=workers,
                                                           skip_invalid=True))
        outs.append(_files(out))
    assert outs[0] == outs[1] == outs[2]
    m = json.loads(outs[0]["manifest.json"])
    assert m["counts"]["skipped"] == 1 and m["has_weights"] and m["num_documents"] == 299


def test_the_packer_holds_a_window_of_records_not_the_dataset(tmp_path, monkeypatch, sp_model_path):
    """Counted, not timed: records read ahead of the writer stay within the pipeline's window, and the
    documents handed to the writer and still alive within two chunks (the one being written and the one
    before it, until replaced) — 1492 records, a window of 2 workers × 4 chunks × 4 records + 4."""
    chunk, workers = 4, 2
    monkeypatch.setattr(pack, "CHUNK_RECORDS", chunk, raising=False)
    path = write_jsonl(tmp_path / "in.jsonl", _records(1500, seed=3)[8:])
    count = {"read": 0, "yielded": 0, "ahead": 0, "live": 0, "max_live": 0}
    read_records = pack.read_records

    def counting_reader(*args, **kwargs):
        detected, records = read_records(*args, **kwargs)

        def gen():
            for rec in records:
                count["read"] += 1
                yield rec
        return detected, gen()

    tokenize_tasks = pack.tokenize_tasks

    def gone():
        count["live"] -= 1

    def counting_tokenize(*args, **kwargs):
        for out, kinds in tokenize_tasks(*args, **kwargs):
            count["yielded"] += 1
            count["ahead"] = max(count["ahead"], count["read"] - count["yielded"])
            if isinstance(out, Document):
                count["live"] += 1
                count["max_live"] = max(count["max_live"], count["live"])
                weakref.finalize(out.ids, gone)
            yield out, kinds
            out = None
    monkeypatch.setattr(pack, "read_records", counting_reader)
    monkeypatch.setattr(pack, "tokenize_tasks", counting_tokenize)
    m = pack.pack_files([path], sp_model_path, str(tmp_path / "out"),
                        PackOptions(seq_len=128, template="chatml", workers=workers))
    assert m["num_documents"] == count["read"] == count["yielded"] == 1492
    window = workers * pack.IN_FLIGHT_PER_WORKER * chunk + chunk
    assert count["ahead"] <= window, count
    assert count["max_live"] <= 2 * chunk, count


def test_a_damaged_record_mid_stream_is_named_and_the_output_is_untouched(tmp_path, sp_model_path):
    """Line 400 of 600 is broken after hundreds of documents were spilled: one line naming file and line,
    and the earlier dataset at --output (with --overwrite) byte for byte as it was, no leftovers."""
    records = [json.dumps(dict(GOOD, output=str(i))) for i in range(600)]
    records[399] = '{"instruction": "x", "output": '
    data = write_jsonl(tmp_path / "big.jsonl", records)
    out = tmp_path / "out"
    r = run_cli("--input", write_jsonl(tmp_path / "small.jsonl", [GOOD]), "--tokenizer", sp_model_path,
                "--seq-len", 64, "--output", out)
    assert r.returncode == 0, r.stderr
    before = _files(out)
    for workers in (1, 2):
        r = run_cli("--input", data, "--tokenizer", sp_model_path, "--seq-len", 64, "--output", out,
                    "--overwrite", "--workers", workers)
        assert r.returncode == 2
        errors = [line for line in r.stderr.splitlines() if line.startswith("error")]
        assert errors == [r.stderr.strip().splitlines()[-1]] and "Traceback" not in r.stderr
        assert errors[0].startswith(f"error: {data}:line 400: invalid JSON"), errors
        assert _files(out) == before
        assert sorted(os.listdir(tmp_path)) == ["big.jsonl", "out", "small.jsonl"]


def test_workers_default_to_every_core_the_process_may_use(tmp_path, monkeypatch):
    from witscale.data import pack_cli
    seen = {}

    def fake_pack_files(inputs, tokenizer, output, opts, **kwargs):
        seen["workers"] = opts.workers
        raise pack_cli.DataError("stop here")
    monkeypatch.setattr(pack_cli.os, "sched_getaffinity", lambda pid: {0, 1, 2}, raising=False)
    monkeypatch.setattr(pack_cli, "pack_files", fake_pack_files)
    assert pack_cli.main(["--input", "x.jsonl", "--tokenizer", "t", "--seq-len", "8", "--output", "o"]) == 2
    assert seen["workers"] == 3


# ------------------------------------------------------------------------------- JSON arrays, record by record
import witscale.data.readers as readers  # noqa: E402
from witscale.data.errors import DataError, RecordError  # noqa: E402


def _array_text(n=120):
    recs = [{"instruction": f"Say {'é€😀' * (i % 7)} {i}", "input": "", "output": "x" * (i % 50)} for i in range(n)]
    recs[17]["output"] = ["\udfff"]                              # a lone surrogate: a record error
    parts = [json.dumps(r, indent=1 if i % 3 else None, ensure_ascii=i % 2 == 0 or i == 17)
             for i, r in enumerate(recs)]
    return "\ufeff[\r\n" + ",\r\n  ".join(parts) + "\n]\n"


@pytest.mark.parametrize("window", [1, 5, 64, 1 << 20])
def test_a_json_array_is_read_record_by_record_with_a_bounded_window(tmp_path, monkeypatch, window):
    monkeypatch.setattr(readers, "JSON_WINDOW_CHARS", window)
    path = tmp_path / "a.json"
    path.write_text(_array_text(), encoding="utf-8")
    whole = list(readers._iter_json_document(str(path)))
    longest = {"buf": 0}
    read = readers._JsonWindow.read

    def counting_read(self):
        more = read(self)
        longest["buf"] = max(longest["buf"], len(self.buf) - self.pos)
        return more
    monkeypatch.setattr(readers._JsonWindow, "read", counting_read)
    streamed = list(readers._iter_json_array(str(path)))
    assert [w for w, _ in streamed] == [w for w, _ in whole]
    for (_, a), (_, b) in zip(streamed, whole):
        assert (str(a) == str(b)) if isinstance(b, RecordError) else a == b
    assert isinstance(streamed[17][1], RecordError)
    largest = max(len(json.dumps(r, indent=1, ensure_ascii=True)) for _, r in whole if isinstance(r, dict))
    assert longest["buf"] <= largest + 2 * window + 8          # the unparsed rest: one record and a block


@pytest.mark.parametrize("text", ['[{"a": 1},\n {"b": 2}\n {"c": 3}]', '[\n{"instruction": "a",\n',
                                  '[{"a": 1}, {"b": 2}] x', '[{"a": 1},\r\n\r\n  {"b": tru}]', '[1, 2,]',
                                  '[{"a": "' + "y" * 300 + '"}, {"a" 2}]', '[\n\n   '])
@pytest.mark.parametrize("window", [3, 1 << 20])
def test_a_broken_json_array_names_the_line_and_column_json_would(tmp_path, monkeypatch, text, window):
    monkeypatch.setattr(readers, "JSON_WINDOW_CHARS", window)
    path = tmp_path / "b.json"
    path.write_text(text)
    with pytest.raises(json.JSONDecodeError) as expected:
        json.loads(text)
    with pytest.raises(DataError) as got:
        list(readers._iter_json_array(str(path)))
    e = expected.value
    assert str(got.value).startswith(f"{path}:line {e.lineno}: invalid JSON: "), (str(got.value), e)
    assert str(got.value).endswith(f"(column {e.colno})"), (str(got.value), e)
