"""A packed dataset is validated when it opens, and its tokenizer is compared with the model's (issue 20).

- every damaged array (a NaN, inf or negative weight; doc_lengths past a row; row_offsets that decrease; a
  token id outside the vocabulary; a class id outside the class table; a truncated file) is one DataError
  line naming the file and the first bad row — before training, not when the row is drawn (or never);
- data packed with tokenizer A and a --model directory holding tokenizer B of the same vocabulary size and
  BOS/EOS are refused in one line by witscale/train.py and tools/precompute_reference.py, before any process
  group; --allow-tokenizer-mismatch proceeds with a warning; a manifest without a digest warns once.
"""
from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest

from tests import test_train_cli_operations as operations
from witscale.data.errors import DataError
from witscale.data.format import PackedDataset

run_inputs = operations.run_inputs      # the session fixture: packed data, a tiny Llama config, the tokenizer
SEQ = 64


@pytest.fixture(scope="module")
def weighted(tmp_path_factory, sp_model_path, synthetic_records):
    """A packed dataset with a weight channel (records carrying 'weight'), several documents per row."""
    from witscale.data.pack import PackOptions, pack_records
    records = [dict(r, weight=0.5 + (i % 3) / 2) for i, r in enumerate(synthetic_records[:60]) if "messages" not in r]
    out = str(tmp_path_factory.mktemp("weighted") / "ds")
    pack_records(records, sp_model_path, out, PackOptions(seq_len=SEQ, template="plain"))
    return out


@pytest.fixture
def copy(weighted, tmp_path):
    out = str(tmp_path / "ds")
    shutil.copytree(weighted, out)
    return out


def _poke(path, name, dtype, index, value):
    """Overwrite element `index` of array file `name` in place."""
    item = np.dtype(dtype).itemsize
    with open(os.path.join(path, name), "r+b") as f:
        f.seek(index * item)
        f.write(np.array([value], dtype=dtype).tobytes())


def _refused(path) -> str:
    with pytest.raises(DataError) as e:
        PackedDataset(path)
    message = str(e.value)
    assert "\n" not in message, message
    return message


def test_the_clean_dataset_opens_and_has_rows_of_several_documents(weighted):
    ds = PackedDataset(weighted)
    assert ds.has_weights and len(ds) >= 4
    assert ds.manifest["tokenizer"]["digest"]
    assert any(len(ds.doc_lengths(r)) >= 2 for r in range(len(ds)))


@pytest.mark.parametrize("value,shown", [(float("nan"), "weight nan"), (float("inf"), "weight inf"),
                                         (-0.5, "weight -0.5")])
def test_a_non_finite_or_negative_weight_is_refused_naming_file_and_row(copy, value, shown):
    _poke(copy, "weights.bin", "<f4", 2 * SEQ + 5, value)
    assert _refused(copy) == (f"{copy}/weights.bin:row 2: {shown} at position 5: weights must be finite and >= 0")


def test_a_negative_zero_weight_is_a_zero(copy):
    _poke(copy, "weights.bin", "<f4", 3 * SEQ + 1, -0.0)
    assert PackedDataset(copy).weights[3, 1] == 0


def test_doc_lengths_summing_past_a_row_are_refused(copy):
    ds = PackedDataset(copy)
    row = next(r for r in range(len(ds)) if len(ds.doc_lengths(r)) >= 2)
    first = ds.doc_range(row)[0]
    del ds
    _poke(copy, "doc_lengths.bin", "<i4", first, SEQ)      # each length within a row, their sum past it
    message = _refused(copy)
    assert message.startswith(f"{copy}/doc_lengths.bin:row {row}: the row's documents sum to "), message
    assert f"more than seq_len {SEQ}" in message, message


@pytest.mark.parametrize("length", [0, SEQ + 1, -3])
def test_a_document_length_outside_a_row_is_refused(copy, length):
    _poke(copy, "doc_lengths.bin", "<i4", 1, length)
    message = _refused(copy)
    assert message.startswith(f"{copy}/doc_lengths.bin:row ") and f"document 1 has length {length}, outside " \
        f"1..{SEQ}" in message, message


def test_row_offsets_that_decrease_are_refused(copy):
    offsets = np.fromfile(os.path.join(copy, "row_offsets.bin"), "<i8")
    _poke(copy, "row_offsets.bin", "<i8", 2, offsets[3] + 1)
    assert _refused(copy) == f"{copy}/row_offsets.bin:row 2: row_offsets decrease ({offsets[3] + 1} then {offsets[3]})"


def test_a_row_without_documents_is_refused(copy):
    """An empty row would be a silent zero-loss row (the packer never writes one)."""
    offsets = np.fromfile(os.path.join(copy, "row_offsets.bin"), "<i8")
    _poke(copy, "row_offsets.bin", "<i8", 2, offsets[1])
    assert _refused(copy) == (f"{copy}/row_offsets.bin:row 1: row_offsets leave the row without documents "
                              f"({offsets[1]} then {offsets[1]})")


def test_row_offsets_not_ending_at_the_documents_are_refused(copy):
    n = int(PackedDataset(copy).manifest["num_rows"])
    _poke(copy, "row_offsets.bin", "<i8", n, 1 << 40)
    assert "row_offsets end at 1099511627776 but the manifest has num_documents" in _refused(copy)


def test_a_doc_length_changed_within_its_row_disagrees_with_num_tokens(copy):
    ds = PackedDataset(copy)
    row = next(r for r in range(len(ds)) if ds.doc_lengths(r).sum() < SEQ)
    first, length = ds.doc_range(row)[0], int(ds.doc_lengths(row)[0])
    del ds
    _poke(copy, "doc_lengths.bin", "<i4", first, length + 1)
    assert "doc_lengths sum to " in _refused(copy) and "but the manifest has num_tokens" in _refused(copy)


@pytest.mark.parametrize("value", [600, 1 << 30, -1])
def test_a_token_id_outside_the_vocabulary_is_refused(copy, value):
    vocab = PackedDataset(copy).manifest["tokenizer"]["vocab_size"]
    assert vocab == 600
    _poke(copy, "tokens.bin", "<i4", 3 * SEQ + 4, value)
    assert _refused(copy) == (f"{copy}/tokens.bin:row 3: token id {value} at position 4 is outside the "
                              f"tokenizer's vocabulary [0, 600)")


def test_a_class_id_outside_the_table_is_refused(copy):
    _poke(copy, "classes.bin", "u1", 1 * SEQ + 7, 200)
    message = _refused(copy)
    assert message.startswith(f"{copy}/classes.bin:row 1: class id 200 at position 7 is not in the data's class "
                              f"table (0..8: pad, template"), message


def test_a_truncated_array_is_named_when_the_dataset_opens(copy):
    path = os.path.join(copy, "tokens.bin")
    size = os.path.getsize(path)
    with open(path, "r+b") as f:
        f.truncate(size - 4)
    assert _refused(copy) == (f"{copy}: incomplete packed dataset: tokens.bin has {size - 4} bytes, "
                              f"expected {size}")


def test_manifest_counts_out_of_range_are_refused(copy):
    mpath = os.path.join(copy, "manifest.json")
    m = json.load(open(mpath))
    m["seq_len"] = 0
    json.dump(m, open(mpath, "w"))
    assert "seq_len 0" in _refused(copy) and "out of range" in _refused(copy)


def test_a_non_finite_reference_log_prob_is_refused(run_inputs, tmp_path):
    """reference_logps.bin (preference data) must be finite, even where the manifest records no sha256 of it."""
    from witscale.data.format import write_reference_logps
    from witscale.data.synthetic import make_preference_dataset
    data = str(tmp_path / "pref")
    m = make_preference_dataset(data, run_inputs["tokenizer"], n=6, seq_len=160)
    write_reference_logps(data, -np.arange(1.0, m["num_documents"] + 1), {"model": "ref", "fingerprint": "x"})
    mpath = os.path.join(data, "manifest.json")
    manifest = json.load(open(mpath))
    del manifest["reference"]["sha256"]
    json.dump(manifest, open(mpath, "w"))
    _poke(data, "reference_logps.bin", "<f8", 3, float("-inf"))
    ds = PackedDataset(data, load_reference=False)
    row = next(r for r in range(len(ds)) if ds.doc_range(r)[0] <= 3 < ds.doc_range(r)[1])
    assert _refused(data) == (f"{data}/reference_logps.bin:row {row}: reference log-prob -inf of document 3 is "
                              f"not finite: recompute it")


def test_train_reports_damaged_data_in_one_line_before_anything_starts(run_inputs, tmp_path):
    from witscale.train import UsageError, build_parser, plan_run
    from witscale.training.config import RunConfig
    data = str(tmp_path / "train")
    shutil.copytree(run_inputs["train"], data)
    _poke(data, "tokens.bin", "<i4", 5, -7)
    args = operations._args(dict(run_inputs, train=data), tmp_path / "out", 2)
    with pytest.raises(UsageError) as e:
        plan_run(RunConfig.from_args(build_parser().parse_args(args)), 1)
    assert str(e.value) == (f"--data {data}: {data}/tokens.bin:row 0: token id -7 at position 5 is outside the "
                            f"tokenizer's vocabulary [0, 600)")


def test_the_cli_prints_damaged_data_as_one_error_line(run_inputs, tmp_path, capsys):
    """witscale/train.py as a user runs it: exit 2 and one stderr line, for a NaN weight and a bad offset."""
    data = str(tmp_path / "train")
    shutil.copytree(run_inputs["train"], data)
    offsets = np.fromfile(os.path.join(data, "row_offsets.bin"), "<i8")
    _poke(data, "row_offsets.bin", "<i8", 1, offsets[-1] + 5)
    code, err = operations._cli(operations._args(dict(run_inputs, train=data), tmp_path / "out", 2), capsys)
    assert code == 2 and err == [f"error: --data {data}: {data}/row_offsets.bin:row 1: row_offsets decrease "
                                 f"({offsets[-1] + 5} then {offsets[2]})"], err


@pytest.mark.parametrize("shards", [2, 3, 5])
def test_each_rank_validates_its_share_of_the_rows_and_together_all(copy, shards):
    """shard=(i, k): the per-token arrays of the i-th of k row ranges — a bad weight is found by exactly the
    one shard holding its row; a bad offset (per-row arrays) by every shard."""
    rows = len(PackedDataset(copy))
    bad_row = rows - 1
    _poke(copy, "weights.bin", "<f4", bad_row * SEQ + 3, float("nan"))
    refusing = []
    for i in range(shards):
        try:
            PackedDataset(copy, shard=(i, shards))
        except DataError as e:
            assert f"weights.bin:row {bad_row}: weight nan at position 3" in str(e)
            refusing.append(i)
    assert refusing == [shards - 1]
    offsets = np.fromfile(os.path.join(copy, "row_offsets.bin"), "<i8")
    _poke(copy, "row_offsets.bin", "<i8", 1, offsets[-1] + 1)
    for i in range(shards):
        with pytest.raises(DataError, match="row_offsets.bin:row 1: row_offsets decrease"):
            PackedDataset(copy, shard=(i, shards))


def test_the_validation_shard_is_the_launchers_rank(monkeypatch):
    from witscale.training.distributed import validation_shard
    monkeypatch.setenv("RANK", "3")
    assert validation_shard(8) == (3, 8)
    assert validation_shard(2) == (0, 1)        # a rank out of range: everything
    monkeypatch.delenv("RANK")
    assert validation_shard(1) == (0, 1)


def test_chunks_cover_the_file_in_bounded_pieces(tmp_path):
    """format._chunks (the validation's reader): the chunks, in order, are the file; none is longer than asked,
    and they share one buffer (memory stays bounded)."""
    from witscale.data.format import _chunks
    values = np.arange(23, dtype="<i4") * 7 - 40
    path = str(tmp_path / "a.bin")
    values.tofile(path)
    seen, buffers = [], set()
    for first, chunk in _chunks(path, "<i4", 5):
        assert first == sum(len(c) for c in seen) and 0 < len(chunk) <= 5
        seen.append(chunk.copy())
        buffers.add(chunk.__array_interface__["data"][0])
    assert np.array_equal(np.concatenate(seen), values) and len(buffers) == 1
    # a range [start, stop) of the file
    got = [(first, chunk.copy()) for first, chunk in _chunks(path, "<i4", 4, start=3, stop=14)]
    assert [first for first, _ in got] == [3, 7, 11] and np.array_equal(np.concatenate([c for _, c in got]),
                                                                        values[3:14])
    open(path, "wb").close()
    assert list(_chunks(path, "<i4", 5)) == []


def test_validation_reads_in_bounded_chunks(copy, monkeypatch):
    """Chunks smaller than a row (and than the documents) find the same first bad row as one chunk would."""
    import witscale.data.format as fmt
    monkeypatch.setattr(fmt, "VALIDATE_CHUNK", 5)
    PackedDataset(copy)                                     # clean: the chunked running sums agree
    ds = PackedDataset(copy)
    row = next(r for r in range(len(ds)) if len(ds.doc_lengths(r)) >= 2 and r > 1)
    first = ds.doc_range(row)[0]
    del ds
    _poke(copy, "doc_lengths.bin", "<i4", first, SEQ)
    assert f"doc_lengths.bin:row {row}: the row's documents sum to" in _refused(copy)


# --- tokenizer identity ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def other_tokenizer(tmp_path_factory, synthetic_records, sp_tokenizer):
    """Tokenizer B: trained like the test tokenizer A on another corpus (every text reversed); the same
    vocabulary size and special ids, other pieces."""
    from witscale.data.synthetic import train_sentencepiece
    from witscale.data.tokenizer import load_tokenizer
    texts = []
    for r in synthetic_records:
        texts += [m["content"] for m in r["messages"]] if "messages" in r else [r["instruction"], r["input"], r["output"]]
    path = train_sentencepiece([t[::-1] for t in texts], str(tmp_path_factory.mktemp("sp_b")), vocab_size=600)
    b = load_tokenizer(path)
    a = sp_tokenizer
    assert (b.vocab_size, b.bos_id, b.eos_id, b.pad_id) == (a.vocab_size, a.bos_id, a.eos_id, a.pad_id)
    assert b.fingerprint()["digest"] != a.fingerprint()["digest"]
    return path


def _model_dir(root, run_inputs, tokenizer_files: dict) -> str:
    """A --model directory: the tiny config (validation reads no weights) and the given tokenizer files."""
    os.makedirs(root, exist_ok=True)
    shutil.copyfile(run_inputs["config"], os.path.join(root, "config.json"))
    for name, src in tokenizer_files.items():
        if callable(src):
            src(root)
        else:
            shutil.copyfile(src, os.path.join(root, name))
    return str(root)


def _plan(run_inputs, tmp_path, model, *extra, data=None):
    from witscale.train import build_parser, plan_run
    from witscale.training.config import RunConfig
    args = ["--ds_config", "ds_configs/zero3.json", "--data", data or run_inputs["train"], "--model", model,
            "--output-dir", str(tmp_path / "out"), "--max-steps", "2", *extra]
    return plan_run(RunConfig.from_args(build_parser().parse_args(args)), 1)


def test_train_refuses_data_packed_with_another_tokenizer(run_inputs, other_tokenizer, sp_model_path, tmp_path,
                                                          caplog):
    from witscale.data.tokenizer import load_tokenizer
    from witscale.train import UsageError
    model = _model_dir(tmp_path / "model_b", run_inputs, {"tokenizer.model": other_tokenizer})
    with pytest.raises(UsageError) as e:
        _plan(run_inputs, tmp_path, model)
    ours = load_tokenizer(sp_model_path).fingerprint()["digest"]
    theirs = load_tokenizer(other_tokenizer).fingerprint()["digest"]
    message = str(e.value)
    assert "\n" not in message and message.startswith(
        f"--data {run_inputs['train']} was packed with another tokenizer than --model's: the data's sentencepiece "
        f"tokenizer has digest {ours[:16]}, {model}/tokenizer.model (sentencepiece) has {theirs[:16]}"), message
    assert message.endswith("pass --allow-tokenizer-mismatch to skip the check"), message
    caplog.set_level("WARNING", logger="witscale")
    assert _plan(run_inputs, tmp_path, model, "--allow-tokenizer-mismatch").config.allow_tokenizer_mismatch
    assert any("training anyway (--allow-tokenizer-mismatch)" in r.message for r in caplog.records)
    # the same tokenizer passes; so does a model directory without tokenizer files
    _plan(run_inputs, tmp_path, _model_dir(tmp_path / "model_a", run_inputs, {"tokenizer.model": sp_model_path}))
    _plan(run_inputs, tmp_path, _model_dir(tmp_path / "bare", run_inputs, {}))
    # --tokenizer (what --export-hf copies) is compared too; a lone .json file cannot be read alone: not compared
    with pytest.raises(UsageError, match="was packed with another tokenizer than --tokenizer's"):
        _plan(run_inputs, tmp_path, _model_dir(tmp_path / "bare", run_inputs, {}), "--tokenizer", other_tokenizer)
    (tmp_path / "tokenizer_config.json").write_text("{}")
    _plan(run_inputs, tmp_path, _model_dir(tmp_path / "bare", run_inputs, {}),
          "--tokenizer", str(tmp_path / "tokenizer_config.json"))


def _hf_tokenizer_of(sp_path):
    """Writes an HF fast tokenizer (tokenizer.json) holding sp_path's pieces at the same ids into a directory."""
    def write(root):
        from tokenizers import Tokenizer, models
        from transformers import PreTrainedTokenizerFast

        from witscale.data.tokenizer import load_tokenizer
        pieces = load_tokenizer(sp_path).vocabulary()
        core = Tokenizer(models.WordLevel({p: i for i, p in enumerate(pieces)}, unk_token=pieces[0]))
        PreTrainedTokenizerFast(tokenizer_object=core, unk_token=pieces[0], bos_token=pieces[1],
                                eos_token=pieces[2], pad_token=pieces[3]).save_pretrained(str(root))
    return write


def test_the_digest_is_of_the_vocabulary_whatever_the_files(run_inputs, other_tokenizer, sp_model_path, tmp_path):
    """A model directory with an HF tokenizer.json, a SentencePiece tokenizer.model, or both: the one of the data's
    kind is compared when both are there, and an HF file with the same pieces has the same digest."""
    from witscale.train import UsageError
    same_hf = _model_dir(tmp_path / "hf_a", run_inputs, {"tokenizer.json": _hf_tokenizer_of(sp_model_path)})
    _plan(run_inputs, tmp_path, same_hf)
    other_hf = _model_dir(tmp_path / "hf_b", run_inputs, {"tokenizer.json": _hf_tokenizer_of(other_tokenizer)})
    with pytest.raises(UsageError, match=r"hf_b \(hf\) has "):
        _plan(run_inputs, tmp_path, other_hf)
    # both kinds: the data is SentencePiece, so tokenizer.model is the one compared
    both = _model_dir(tmp_path / "both", run_inputs, {"tokenizer.json": _hf_tokenizer_of(other_tokenizer),
                                                      "tokenizer.model": sp_model_path})
    _plan(run_inputs, tmp_path, both)
    both_b = _model_dir(tmp_path / "both_b", run_inputs, {"tokenizer.json": _hf_tokenizer_of(sp_model_path),
                                                          "tokenizer.model": other_tokenizer})
    with pytest.raises(UsageError, match=r"both_b/tokenizer.model \(sentencepiece\) has "):
        _plan(run_inputs, tmp_path, both_b)


def test_a_manifest_without_a_digest_warns_once_and_trains(run_inputs, other_tokenizer, tmp_path, caplog):
    data = str(tmp_path / "old")
    shutil.copytree(run_inputs["train"], data)
    mpath = os.path.join(data, "manifest.json")
    m = json.load(open(mpath))
    del m["tokenizer"]["digest"]
    json.dump(m, open(mpath, "w"))
    model = _model_dir(tmp_path / "model_b", run_inputs, {"tokenizer.model": other_tokenizer})
    caplog.set_level("WARNING", logger="witscale")
    _plan(run_inputs, tmp_path, model, "--tokenizer", other_tokenizer, data=data)
    notes = [r.message for r in caplog.records if "records no tokenizer digest" in r.message]
    assert len(notes) == 1, notes


def test_an_unreadable_model_tokenizer_is_refused_unless_allowed(run_inputs, tmp_path):
    from witscale.train import UsageError
    model = _model_dir(tmp_path / "broken", run_inputs, {})
    open(os.path.join(model, "tokenizer.model"), "wb").write(b"not a sentencepiece model")
    with pytest.raises(UsageError, match="cannot read its tokenizer to compare it with"):
        _plan(run_inputs, tmp_path, model)
    _plan(run_inputs, tmp_path, model, "--allow-tokenizer-mismatch")


def test_precompute_reference_refuses_data_packed_with_another_tokenizer(run_inputs, other_tokenizer, tmp_path):
    from tools.precompute_reference import UsageError, build_parser, plan
    from witscale.data.synthetic import make_preference_dataset
    data = str(tmp_path / "pref")
    make_preference_dataset(data, run_inputs["tokenizer"], n=6, seq_len=160)
    model = _model_dir(tmp_path / "model_b", run_inputs, {"tokenizer.model": other_tokenizer})
    args = build_parser().parse_args(["--data", data, "--model", model])
    with pytest.raises(UsageError) as e:
        plan(args, world_size=1)
    assert "\n" not in str(e.value) and str(e.value).startswith(
        f"--data {data} was packed with another tokenizer than --model's: "), e.value
    args.allow_tokenizer_mismatch = True
    assert plan(args, world_size=1)[0].path == data
