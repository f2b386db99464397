"""Preference pairs in the packer and the loader (issue 16 item 1; docs/packed-format.md, docs/data-flow.md).

Equivalences: every input layout of the same pair renders the same two documents, and each equals the SFT
rendering of prompt + that completion (the prompt's own assistant turns prompt-side, as --last-turn-only).
Packing: random pair lengths, every row holds whole pairs, chosen first, each pair exactly once, with its
tokens; the loader's micro-batches on both ranks of dp=2 hold whole pairs and the global pair count.
"""
import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st

from conftest import REPO_ROOT, write_jsonl
from witscale.data.classes import RESPONSE_SIDE, TokenClass as C
from witscale.data.errors import DataError
from witscale.data.format import PackedDataset, TokenizedCorpus, write_packed, write_reference_logps
from witscale.data.loader import PackedLoader
from witscale.data.pack import PackOptions, pack_files, pack_records
from witscale.data.preference import normalize_pair, render_pair
from witscale.data.readers import normalize_record
from witscale.data.render import Renderer
from witscale.data.weighting import build_weight_table

PROMPT, GOOD, BAD = "Add 2 and 3.", "The sum is 5.", "The sum is 6."
DPO_TABLE = build_weight_table(0.0, 1.0)


def _user(text, sharegpt=False):
    return {"from": "human", "value": text} if sharegpt else {"role": "user", "content": text}


def _assistant(text, sharegpt=False):
    return {"from": "gpt", "value": text} if sharegpt else {"role": "assistant", "content": text}


# The same pair in every layout the packer reads (fmt, record).
LAYOUTS = {
    "prompt strings": ("preference", {"prompt": PROMPT, "chosen": GOOD, "rejected": BAD}),
    "TRL conversational, completion only": ("preference", {"prompt": [_user(PROMPT)], "chosen": [_assistant(GOOD)],
                                                           "rejected": [_assistant(BAD)]}),
    "TRL conversational, repeated prompt": ("preference", {"prompt": [_user(PROMPT)],
                                                           "chosen": [_user(PROMPT), _assistant(GOOD)],
                                                           "rejected": [_user(PROMPT), _assistant(BAD)]}),
    "UltraFeedback binarized": ("preference", {"prompt": PROMPT, "prompt_id": "x",
                                               "chosen": [_user(PROMPT), _assistant(GOOD)],
                                               "rejected": [_user(PROMPT), _assistant(BAD)],
                                               "messages": [_user(PROMPT), _assistant(GOOD)], "score_chosen": 8.0}),
    "messages + strings": ("preference", {"messages": [_user(PROMPT)], "chosen": GOOD, "rejected": BAD}),
    "messages + message dicts": ("preference", {"messages": [_user(PROMPT)], "chosen": _assistant(GOOD),
                                                "rejected": _assistant(BAD)}),
    "TRL implicit prompt": ("preference", {"chosen": [_user(PROMPT), _assistant(GOOD)],
                                           "rejected": [_user(PROMPT), _assistant(BAD)]}),
    "ShareGPT, dicts": ("sharegpt_preference", {"conversations": [_user(PROMPT, True)],
                                                "chosen": _assistant(GOOD, True), "rejected": _assistant(BAD, True)}),
    "ShareGPT, lists": ("sharegpt_preference", {"conversations": [_user(PROMPT, True)],
                                                "chosen": [_assistant(GOOD, True)],
                                                "rejected": [_assistant(BAD, True)]}),
    "ShareGPT, role/content completions": ("sharegpt_preference", {"conversations": [_user(PROMPT, True)],
                                                                   "chosen": _assistant(GOOD),
                                                                   "rejected": [_assistant(BAD)]}),
}


def _prompt_len(doc):
    return int(np.argmax(np.isin(doc.classes, list(RESPONSE_SIDE))))


def _hf_chatml_tokenizer(path):
    """A local word-level HF tokenizer with a ChatML chat_template (for --template hf)."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    from witscale.data.tokenizer import load_tokenizer
    words = "Add 2 and 3 The sum is 5 6 . user assistant".split()
    vocab = {w: i for i, w in enumerate(["[UNK]", "<|im_start|>", "<|im_end|>", "\n", " "] + words)}
    core = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    core.pre_tokenizer = pre_tokenizers.Split(Regex(" |\n|\\."), behavior="isolated")
    hf = PreTrainedTokenizerFast(tokenizer_object=core, unk_token="[UNK]", eos_token="<|im_end|>",
                                 additional_special_tokens=["<|im_start|>"])
    hf.chat_template = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>' + "
                        "'\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
    hf.save_pretrained(path)
    return load_tokenizer(path)


@pytest.mark.parametrize("template", ["plain", "alpaca", "chatml", "llama3", "tulu", "hf"])
def test_every_layout_renders_the_sft_documents_after_one_prompt(sp_tokenizer, template, tmp_path):
    renderer = Renderer(template, _hf_chatml_tokenizer(str(tmp_path / "hf")) if template == "hf" else sp_tokenizer)
    sft = {key: renderer(normalize_record({"messages": [_user(PROMPT), _assistant(text)]}, "messages"))
           for key, text in (("chosen", GOOD), ("rejected", BAD))}
    n = _prompt_len(sft["chosen"])
    assert 0 < n == _prompt_len(sft["rejected"])
    for name, (fmt, record) in LAYOUTS.items():
        docs = render_pair(renderer, *normalize_pair(record, fmt), seq_len=1000)
        for key in ("chosen", "rejected"):
            got, want = getattr(docs, key), sft[key]
            assert np.array_equal(got.ids, want.ids) and np.array_equal(got.classes, want.classes), (name, key)
        # the prompt part (generation header included) is token for token and class for class the same
        assert np.array_equal(docs.chosen.ids[:n], docs.rejected.ids[:n]), name
        assert np.array_equal(docs.chosen.classes[:n], docs.rejected.classes[:n]), name
        assert not np.isin(docs.chosen.classes[:n], list(RESPONSE_SIDE)).any()


def test_multi_turn_prompt_and_tool_completion_match_sft(sp_tokenizer):
    """An earlier assistant turn of the prompt is prompt-side (as --last-turn-only makes it in SFT); a chosen
    completion with a tool call, its result and an answer renders as SFT renders that conversation."""
    tool = {"type": "function", "function": {"name": "add", "parameters": {"type": "object"}}}
    prompt = [_user("Hi."), _assistant("Hello."), _user(PROMPT)]
    chosen = [{"role": "assistant", "content": None,
               "tool_calls": [{"type": "function", "function": {"name": "add", "arguments": {"a": 2, "b": 3}}}]},
              {"role": "tool", "content": "5"}, _assistant(GOOD)]
    record = {"messages": prompt, "chosen": chosen, "rejected": BAD, "tools": [tool], "system": "ignored here"}
    renderer = Renderer("chatml", sp_tokenizer)
    docs = render_pair(renderer, *normalize_pair(record, "preference"), seq_len=1000)
    for key, completion in (("chosen", chosen), ("rejected", [_assistant(BAD)])):
        conv = normalize_record({"messages": prompt + completion, "tools": [tool]}, "messages", last_turn_only=True)
        conv = conv._replace(messages=[m._replace(as_prompt=False) if i >= len(prompt) else m
                                       for i, m in enumerate(conv.messages)])
        want = renderer(conv)
        assert np.array_equal(getattr(docs, key).ids, want.ids)
        assert np.array_equal(getattr(docs, key).classes, want.classes)
    hello = sp_tokenizer.encode_with_offsets("Hello.", continuation=True)[0]
    assert not np.isin(docs.chosen.classes[:_prompt_len(docs.chosen)], list(RESPONSE_SIDE)).any()
    assert _prompt_len(docs.chosen) > len(hello) and {int(C.TOOL_CALL), int(C.TOOL)} <= set(docs.chosen.classes.tolist())


# ----------------------------------------------------------------------------------------- packing
@settings(max_examples=30, deadline=None)
@given(st.lists(st.tuples(st.integers(2, 30), st.integers(2, 30)), min_size=1, max_size=60), st.integers(60, 90),
       st.sampled_from([1, 2]))
def test_pairs_are_packed_whole_and_never_split_across_rows_micro_batches_or_ranks(tmp_path_factory, pairs, seq_len,
                                                                                   micro):
    docs = []
    for p, lengths in enumerate(pairs):
        for role, n in enumerate(lengths):
            tag = (2 * p + role) * 1000
            docs.append((tag + np.arange(n, dtype=np.int32), np.full(n, C.RESPONSE, np.uint8), None))
    out = str(tmp_path_factory.mktemp("p") / "ds")
    m = write_packed(out, TokenizedCorpus.from_documents(docs), seq_len=seq_len, pad_id=0, task="preference")
    ds = PackedDataset(out)
    assert m["task"] == "preference" and m["num_pairs"] == ds.num_pairs == len(pairs)
    assert m["pairs_per_row"] == pytest.approx(len(pairs) / len(ds))
    seen = []
    for r in range(len(ds)):
        start, end = ds.doc_range(r)
        roles, pair = ds.doc_role[start:end], ds.doc_pair[start:end]
        assert (roles == np.tile([0, 1], (end - start) // 2)).all() and (pair[0::2] == pair[1::2]).all()
        row, pos = ds[r], 0
        for k, length in enumerate(row.doc_lengths):   # each document is its own tokens, in full
            doc = 2 * int(pair[k]) + int(roles[k])
            assert (row.tokens[pos:pos + length] == doc * 1000 + np.arange(length)).all()
            assert length == pairs[int(pair[k])][int(roles[k])]
            pos += length
        seen += pair[0::2].tolist()
    assert sorted(seen) == list(range(len(pairs)))
    # dp=2: every micro-batch of both ranks holds whole pairs; together they hold the global batch's pairs once
    dp = 2
    if len(ds) < dp * micro:
        return
    loaders = [PackedLoader(ds, DPO_TABLE, micro_batch_size=micro, grad_accum=1, dp_size=dp, dp_rank=k, seed=3)
               for k in range(dp)]
    for step in range(loaders[0].steps_per_epoch):
        batches = [ld.next_step() for ld in loaders]
        assert batches[0].denominators == batches[1].denominators
        global_pairs = []
        for b in batches:
            for mb in b.micro_batches:
                d = mb.doc_role.shape[0]
                assert (mb.doc_role == torch.arange(d) % 2).all() and (mb.doc_pair == torch.arange(d) // 2).all()
                used = mb.doc_index[mb.doc_index >= 0]
                assert set(used.tolist()) == set(range(d))          # every completion has targets
                for r in mb.rows:
                    start, end = ds.doc_range(r)
                    global_pairs += ds.doc_pair[start:end:2].tolist()
        assert len(global_pairs) == len(set(global_pairs)) == batches[0].denominators["pairs"]


def _hand_dataset(path):
    """Three pairs with hand-picked lengths (chosen, rejected): (3, 4), (2, 2), (5, 3); seq_len 12. Best-fit
    decreasing on the pair lengths 7, 4, 8: pair 2 opens row 0 (4 left), pair 0 opens row 1, pair 1 fills row 0."""
    lengths = [(3, 4), (2, 2), (5, 3)]
    docs = []
    for p, pair in enumerate(lengths):
        for role, n in enumerate(pair):
            cls = np.array([C.PROMPT] + [C.RESPONSE] * (n - 1), np.uint8)
            docs.append((10 * (2 * p + role) + np.arange(n, dtype=np.int32), cls, None))
    write_packed(path, TokenizedCorpus.from_documents(docs), seq_len=12, pad_id=0, task="preference")
    return PackedDataset(path)


def test_loader_tensors_on_a_hand_checked_example(tmp_path):
    ds = _hand_dataset(str(tmp_path / "ds"))
    assert len(ds) == 2 and ds.reference_logps is None
    assert ds.doc_lengths(0).tolist() == [2, 2, 5, 3] and ds.doc_lengths(1).tolist() == [3, 4]
    assert ds.doc_pair[:].tolist() == [1, 1, 2, 2, 0, 0] and ds.doc_role[:].tolist() == [0, 1, 0, 1, 0, 1]
    loader = PackedLoader(ds, DPO_TABLE, micro_batch_size=2, grad_accum=1, shuffle=False)
    mb = loader.next_step().micro_batches[0]
    assert mb.rows == [0, 1]
    assert mb.doc_index.tolist() == [[0, -1, 1, -1, 2, 2, 2, 2, -1, 3, 3, -1],
                                     [4, 4, -1, 5, 5, 5, -1, -1, -1, -1, -1, -1]]
    assert mb.doc_role.tolist() == [0, 1, 0, 1, 0, 1] and mb.doc_pair.tolist() == [0, 0, 1, 1, 2, 2]
    assert mb.reference_logps.dtype == torch.float64 and torch.isnan(mb.reference_logps).all()
    # weights: the response tokens each completion predicts (prompt side 0) — the DPO loss tokens
    assert mb.weights[0].tolist() == [1, 0, 1, 0, 1, 1, 1, 1, 0, 1, 1, 0]
    # with reference log-probs, in the dataset's document order; dp=2: one row per rank, the GLOBAL pair count
    write_reference_logps(ds.path, [-10.5, -11, -20, -21, -30, -31.25], {"model": "ref", "fingerprint": "abc"})
    ds = PackedDataset(ds.path)
    ranks = [PackedLoader(ds, DPO_TABLE, micro_batch_size=1, grad_accum=1, dp_size=2, dp_rank=k, shuffle=False)
             for k in (0, 1)]
    b0, b1 = (ld.next_step() for ld in ranks)
    assert b0.denominators["pairs"] == b1.denominators["pairs"] == 3.0
    assert b0.micro_batches[0].reference_logps.tolist() == [-10.5, -11, -20, -21]
    assert b1.micro_batches[0].reference_logps.tolist() == [-30, -31.25]
    assert b1.micro_batches[0].doc_pair.tolist() == [0, 0] and b1.micro_batches[0].doc_index[0, :7].tolist() == [
        0, 0, -1, 1, 1, 1, -1]
    moved = b0.micro_batches[0].to(torch.device("meta"))
    assert all(getattr(moved, k).device.type == "meta" for k in ("doc_index", "doc_role", "doc_pair", "reference_logps"))


def test_sft_data_has_no_preference_fields(tmp_path, sp_model_path, synthetic_records):
    recs = [r for r in synthetic_records if "messages" not in r][:20]
    pack_records(recs, sp_model_path, str(tmp_path / "sft"), PackOptions(seq_len=128))
    ds = PackedDataset(str(tmp_path / "sft"))
    assert "task" not in ds.manifest and not ds.is_preference and ds.doc_pair is None
    b = PackedLoader(ds, DPO_TABLE, micro_batch_size=1, grad_accum=1).next_step()
    assert set(b.denominators) == {"nonzero", "weight_sum", "tokens"}
    mb = b.micro_batches[0]
    assert mb.doc_index is None and mb.doc_role is None and mb.reference_logps is None
    assert mb.to(torch.device("meta")).doc_index is None


@pytest.mark.parametrize("tamper", ["roles", "pairs"])
def test_loader_refuses_a_row_without_whole_pairs(tmp_path, tamper):
    ds = _hand_dataset(str(tmp_path / "ds"))
    if tamper == "roles":
        np.array([0, 1, 1, 0, 0, 1], "u1").tofile(os.path.join(ds.path, "doc_role.bin"))
        what, at_open = "are not (chosen, rejected) pairs", "doc_role.bin:row 0: not whole preference pairs: documents 2, 3 have roles 1, 0"
    else:
        np.array([1, 1, 2, 0, 0, 2], "<i8").tofile(os.path.join(ds.path, "doc_pair.bin"))
        what, at_open = "documents of different pairs", "doc_pair.bin:row 0: not whole preference pairs: documents 2, 3 belong to pairs 2, 0"
    # refused when the dataset opens, naming the file and row ...
    with pytest.raises(DataError, match=re.escape(os.path.join(ds.path, at_open))):
        PackedDataset(ds.path)
    # ... and by the loader when a row is drawn from a dataset opened without validation
    loader = PackedLoader(PackedDataset(ds.path, validate=False), DPO_TABLE, micro_batch_size=1, grad_accum=1,
                          shuffle=False)
    with pytest.raises(ValueError, match=re.escape(f"{ds.path}: row 0: not whole preference pairs: ") + ".*" + re.escape(what)):
        loader.next_step()


# -------------------------------------------------------------------------------------- reference log-probs
def test_write_reference_logps_is_atomic_and_recorded(tmp_path, monkeypatch):
    ds = _hand_dataset(str(tmp_path / "ds"))
    first = np.array([-1.0, -2, -3, -4, -5, -6])
    m = write_reference_logps(ds.path, first, {"model": "ref-a", "fingerprint": "aaa", "weight_table": [0, 1]})
    ref_file = os.path.join(ds.path, "reference_logps.bin")
    assert m["reference"]["model"] == "ref-a" and m["reference"]["fingerprint"] == "aaa"
    assert PackedDataset(ds.path).manifest["reference"] == m["reference"]
    assert PackedDataset(ds.path).reference_logps.tolist() == first.tolist()
    before = open(ref_file, "rb").read()

    # a crash while the new values are being written: the old file is untouched, no temp file is left, and
    # the manifest no longer vouches for values of another run
    real_fsync = os.fsync

    syncs = []

    def crash(fd):                            # 1: the manifest without the old reference, 2: the new values
        syncs.append(fd)
        if len(syncs) == 2:
            raise OSError("disk full")
        real_fsync(fd)
    monkeypatch.setattr(os, "fsync", crash)
    from witscale.data.output_dir import OutputError       # an OSError as one line naming the file
    with pytest.raises(OutputError, match="reference_logps.bin: disk full"):
        write_reference_logps(ds.path, first - 1, {"model": "ref-b"})
    monkeypatch.setattr(os, "fsync", real_fsync)
    assert open(ref_file, "rb").read() == before
    assert sorted(os.listdir(ds.path)) == sorted(["manifest.json", "tokens.bin", "classes.bin", "doc_lengths.bin",
                                                  "row_offsets.bin", "doc_pair.bin", "doc_role.bin",
                                                  "reference_logps.bin", ".reference.lock"])
    assert "reference" not in PackedDataset(ds.path).manifest and PackedDataset(ds.path).reference_logps is None

    # a crash after the values, before the manifest names them: not used either
    real_replace = os.replace

    manifest_writes = []

    def fail_manifest(src, dst):
        if dst.endswith("manifest.json"):
            manifest_writes.append(dst)
            if len(manifest_writes) == 2:     # 1: the old reference dropped, 2: the new one recorded
                raise OSError("killed")
        return real_replace(src, dst)
    write_reference_logps(ds.path, first, {"model": "ref-a"})
    monkeypatch.setattr(os, "replace", fail_manifest)
    with pytest.raises(OutputError, match="manifest.json: killed"):
        write_reference_logps(ds.path, first - 2, {"model": "ref-c"})
    monkeypatch.setattr(os, "replace", real_replace)
    assert np.fromfile(ref_file, "<f8").tolist() == (first - 2).tolist()
    assert PackedDataset(ds.path).reference_logps is None

    # values changed behind the manifest's back are refused; bad values never reach the disk
    write_reference_logps(ds.path, first, {"model": "ref-a"})
    (first - 7).astype("<f8").tofile(ref_file)
    with pytest.raises(DataError, match="reference_logps.bin does not match the sha256"):
        PackedDataset(ds.path)
    write_reference_logps(ds.path, first, {"model": "ref-a"})        # a damaged channel can be rewritten
    assert PackedDataset(ds.path).reference_logps.tolist() == first.tolist()
    with pytest.raises(DataError, match="got shape \\[5\\], the dataset has 6 documents"):
        write_reference_logps(ds.path, first[:5], {})
    with pytest.raises(DataError, match="document 2 has nan"):
        write_reference_logps(ds.path, [0, 0, float("nan"), 0, 0, 0], {})


def test_reference_logps_are_tied_to_the_data_they_were_computed_on(tmp_path):
    """The manifest records the data's content digest with the values: tokens (or document lengths) changed
    under the same path afterwards — a re-pack, a run-private copy whose linked arrays were replaced — make
    the values refused, in one line naming the dataset; rewriting them makes them valid again."""
    from witscale.data.format import content_digest
    ds = _hand_dataset(str(tmp_path / "ds"))
    values = np.array([-1.0, -2, -3, -4, -5, -6])
    m = write_reference_logps(ds.path, values, {"model": "ref-a"})
    assert m["reference"]["data"] == content_digest(ds.path)
    tokens = os.path.join(ds.path, "tokens.bin")
    original = open(tokens, "rb").read()
    changed = bytearray(original)
    changed[4] ^= 1                                              # one token of the first row
    with open(tokens, "wb") as f:
        f.write(bytes(changed))
    assert content_digest(ds.path) != m["reference"]["data"]
    with pytest.raises(DataError, match="was computed on other data") as e:
        PackedDataset(ds.path)
    assert ds.path in str(e.value)
    assert PackedDataset(ds.path, load_reference=False).reference_logps is None     # the packer's view still opens
    write_reference_logps(ds.path, values, {"model": "ref-a"})
    assert PackedDataset(ds.path).reference_logps.tolist() == values.tolist()
    with open(tokens, "wb") as f:                                 # back to the old tokens: stale again
        f.write(original)
    with pytest.raises(DataError, match="was computed on other data"):
        PackedDataset(ds.path)


def test_content_digest_samples_large_arrays(tmp_path, monkeypatch):
    """Above DIGEST_SAMPLES blocks a per-token array is sampled, not read whole; a change inside a sampled
    block still changes the digest (and so does the array's size)."""
    import witscale.data.format as fmt
    monkeypatch.setattr(fmt, "DIGEST_SAMPLES", 4)
    monkeypatch.setattr(fmt, "DIGEST_BLOCK", 8)
    ds = _hand_dataset(str(tmp_path / "ds"))
    tokens = os.path.join(ds.path, "tokens.bin")
    assert os.path.getsize(tokens) > 4 * 8, "the hand dataset is too small to be sampled"
    before = fmt.content_digest(ds.path)
    data = bytearray(open(tokens, "rb").read())
    data[-1] ^= 1                                                # the last block is always sampled
    open(tokens, "wb").write(bytes(data))
    assert fmt.content_digest(ds.path) != before


def test_concurrent_reference_writers_take_turns(tmp_path):
    """write_reference_logps holds the dataset's lock file for its whole three-step write: a second writer
    (another job's reference pass) waits instead of interleaving its values with the first one's manifest."""
    import fcntl
    import threading
    ds = _hand_dataset(str(tmp_path / "ds"))
    values = np.array([-1.0, -2, -3, -4, -5, -6])
    write_reference_logps(ds.path, values, {"model": "ref-a"})
    fd = os.open(os.path.join(ds.path, ".reference.lock"), os.O_RDWR)
    fcntl.flock(fd, fcntl.LOCK_EX)                              # another writer in the middle of its write
    done = threading.Event()
    worker = threading.Thread(target=lambda: (write_reference_logps(ds.path, values - 1, {"model": "ref-b"}),
                                              done.set()))
    worker.start()
    try:
        assert not done.wait(1.0), "the second writer did not wait for the lock"
        assert PackedDataset(ds.path).manifest["reference"]["model"] == "ref-a"
    finally:
        os.close(fd)                                            # released
    worker.join(10)
    assert done.is_set() and PackedDataset(ds.path).reference_logps.tolist() == (values - 1).tolist()


def test_write_reference_logps_refuses_sft_data(tmp_path):
    out = str(tmp_path / "sft")
    write_packed(out, TokenizedCorpus.from_documents([(np.arange(4, dtype=np.int32), np.full(4, 4, np.uint8), None)]),
                 seq_len=8, pad_id=0)
    with pytest.raises(DataError, match="preference dataset"):
        write_reference_logps(out, [0.0], {})


# ------------------------------------------------------------------------------------------ bad pairs
BAD_PAIRS = [
    ({"prompt": PROMPT, "chosen": "", "rejected": BAD}, "field 'chosen' is an empty completion"),
    ({"prompt": PROMPT, "chosen": GOOD, "rejected": [_assistant("  ")]}, "field 'rejected' is an empty completion"),
    ({"prompt": PROMPT, "chosen": [], "rejected": BAD}, "field 'chosen' is empty"),
    ({"prompt": PROMPT, "chosen": GOOD, "rejected": GOOD}, "chosen and rejected are identical"),
    ({"prompt": PROMPT, "chosen": GOOD + " and more" * 100, "rejected": BAD}, "longer than a row (--seq-len "),
    ({"prompt": PROMPT, "rejected": BAD}, "missing field 'chosen'"),
    ({"prompt": PROMPT, "chosen": GOOD}, "missing field 'rejected'"),
    ({"chosen": GOOD, "rejected": BAD}, "missing field 'prompt' (or 'messages')"),
    ({"prompt": PROMPT, "chosen": 5, "rejected": BAD}, "field 'chosen' must be a string, a message or a list of "
                                                       "messages, got int"),
    ({"prompt": 7, "chosen": GOOD, "rejected": BAD}, "field 'prompt' must be a string, a message or a list"),
    ({"prompt": [_user(PROMPT)], "chosen": [_user("Other."), _assistant(GOOD)], "rejected": BAD},
     "field 'chosen' repeats the prompt but differs from it at message 1"),
    ({"prompt": [_user(PROMPT), _assistant(GOOD)], "chosen": GOOD, "rejected": BAD},
     "the prompt ends with an assistant turn"),
    ("[1, 2]", "a record must be a JSON object, got list"),
    ({"prompt": PROMPT, "chosen": GOOD, "rejected": BAD, "weight": 2.0}, "field 'weight': preference pairs take no "
                                                                          "data weights"),
    ({"prompt": PROMPT, "chosen": [_assistant(GOOD) | {"weight": 0.5}], "rejected": BAD},
     "field 'chosen': message 1 has a 'weight'"),
]


def test_each_bad_pair_is_named_by_file_and_record(tmp_path, sp_model_path):
    opts = PackOptions(seq_len=64, template="chatml", task="preference")
    good = {"prompt": PROMPT, "chosen": GOOD, "rejected": BAD}
    for k, (record, problem) in enumerate(BAD_PAIRS):
        path = write_jsonl(tmp_path / f"bad{k}.jsonl", [good, record])
        with pytest.raises(DataError) as e:
            pack_files([path], sp_model_path, str(tmp_path / f"out{k}"), opts)
        assert str(e.value).startswith(f"{path}:line 2: ") and problem in str(e.value), str(e.value)
        assert not os.path.exists(tmp_path / f"out{k}")


def test_cli_preference_end_to_end_skip_invalid_and_refusals(tmp_path, sp_model_path):
    from witscale.data.synthetic import generate_preference_records
    good = generate_preference_records(12, seed=1, layout="prompt")
    records = good[:6] + [r for r, _ in BAD_PAIRS[:5]] + good[6:]    # lines 7-11 bad
    records[12] = {"prompt": PROMPT, "chosen": [_assistant(GOOD)], "rejected": GOOD}   # line 13: identical too
    path = write_jsonl(tmp_path / "pairs.jsonl", records)
    out = tmp_path / "ds"
    base = [sys.executable, os.path.join(REPO_ROOT, "tools", "pack_dataset.py"), "--input", path, "--tokenizer",
            sp_model_path, "--seq-len", "160", "--task", "preference", "--template", "chatml"]
    env = dict(os.environ, PYTHONPATH="")
    r = subprocess.run(base + ["--output", str(out)], capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 2 and r.stderr.strip().endswith("empty completion") and f"{path}:line 7:" in r.stderr
    skip = ["--skip-invalid", "--max-skip-fraction", "0.5"]
    r = subprocess.run(base + ["--output", str(out)] + skip, capture_output=True, text=True, env=env,
                       timeout=120)
    assert r.returncode == 0, r.stderr
    assert "detected format preference" in r.stderr and "pairs packed" in r.stdout
    m = json.load(open(out / "manifest.json"))
    assert m["task"] == "preference" and m["counts"]["records_read"] == 17 and m["counts"]["skipped"] == 6
    assert m["num_pairs"] == 11 and m["num_documents"] == 22 and m["sources"][0]["format"] == "preference"
    assert [s.split(": ", 1)[0] for s in m["skipped"]] == [f"{path}:line {n}" for n in (7, 8, 9, 10, 11, 13)]
    assert [problem in s for (_, problem), s in zip(BAD_PAIRS[:5], m["skipped"])] == [True] * 5
    assert "chosen and rejected are identical" in m["skipped"][5]
    r = subprocess.run(base + ["--output", str(tmp_path / "w2"), "--workers", "2"] + skip,
                       capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 0, r.stderr
    for name in sorted(os.listdir(out)):                       # worker processes change nothing
        assert (out / name).read_bytes() == (tmp_path / "w2" / name).read_bytes(), name
    # options that do not apply to pairs, and pairs given to the SFT packer, are refused in one line
    r = subprocess.run(base + ["--output", str(tmp_path / "x"), "--long", "split"], capture_output=True, text=True,
                       env=env, timeout=120)
    assert r.returncode == 2 and "--long split does not apply to --task preference" in r.stderr
    with pytest.raises(DataError, match="preference data; pack it with --task preference"):
        pack_files([path], sp_model_path, str(tmp_path / "y"), PackOptions(seq_len=160))
    assert len(PackedDataset(str(out))) == m["num_rows"]


@pytest.mark.parametrize("mode", ["keep_end", "keep_start"])
def test_dpo_truncation_trl_way(tmp_path, sp_model_path, sp_tokenizer, mode):
    """--max-prompt-length / --truncation-mode (TRL's): a pair longer than the row is cut — the prompt first, to
    the same tokens in both documents (its last tokens with keep_end, its first with keep_start), then the
    completions from their end — and fits; pairs that fit are untouched; the manifest counts the cuts."""
    long_prompt = " ".join(f"Step {i}: add {i} to the total." for i in range(30)) + " " + PROMPT
    long_answer = GOOD + " Because " + "two and three make five, " * 12
    pairs = [{"prompt": PROMPT, "chosen": GOOD, "rejected": BAD},                          # fits: untouched
             {"prompt": long_prompt, "chosen": GOOD, "rejected": BAD},                     # prompt cut only
             {"prompt": long_prompt, "chosen": long_answer, "rejected": BAD + " No."}]     # both cut
    seq_len, max_prompt = 96, 24
    out = tmp_path / "trunc"
    m = pack_records(pairs, sp_model_path, str(out), PackOptions(seq_len=seq_len, task="preference", template="plain",
                                                                 max_prompt_length=max_prompt, truncation_mode=mode))
    assert m["num_pairs"] == 3
    assert m["counts"]["pairs_prompt_truncated"] == 2 and m["counts"]["pairs_completion_truncated"] == 1
    renderer = Renderer("plain", sp_tokenizer)
    full = [render_pair(renderer, *normalize_pair(p, "preference"), seq_len=10_000) for p in pairs]
    packed_tokens = 0
    for i, (pair, whole) in enumerate(zip(pairs, full)):
        got = render_pair(renderer, *normalize_pair(pair, "preference"), seq_len=seq_len,
                          truncation=_truncation(max_prompt, mode))
        n = int(np.argmax(np.isin(whole.chosen.classes, list(RESPONSE_SIDE))))
        packed_tokens += len(got.chosen.ids) + len(got.rejected.ids)
        if i == 0:
            assert got.truncated == () and all(np.array_equal(getattr(got, k).ids, getattr(whole, k).ids)
                                               for k in ("chosen", "rejected"))
            continue
        assert len(got.chosen.ids) + len(got.rejected.ids) <= seq_len
        p_keep = min(n, max_prompt)
        want_prompt = whole.chosen.ids[n - p_keep:n] if mode == "keep_end" else whole.chosen.ids[:p_keep]
        for key in ("chosen", "rejected"):
            doc, src = getattr(got, key), getattr(whole, key)
            assert np.array_equal(doc.ids[:p_keep], want_prompt), key          # the identical prompt
            assert np.array_equal(doc.ids[p_keep:], src.ids[n:n + len(doc.ids) - p_keep]), key  # a completion prefix
            assert np.isin(doc.classes[p_keep:], list(RESPONSE_SIDE)).all() and len(doc.ids) > p_keep
        assert got.truncated == (("prompt",) if i == 1 else ("prompt", "completion"))
    assert m["num_tokens"] == packed_tokens                  # the packed data holds exactly these documents


def _truncation(n, mode):
    from witscale.data.preference import Truncation
    return Truncation(n, mode)


def test_dpo_over_long_pair_without_flags_names_the_fix(tmp_path, sp_model_path):
    pair = {"prompt": PROMPT + " and more" * 40, "chosen": GOOD, "rejected": BAD}
    with pytest.raises(DataError, match=r"record 1: the pair is .* longer than a row \(--seq-len 64\); pass "
                                        r"--max-prompt-length N"):
        pack_records([pair], sp_model_path, str(tmp_path / "x"), PackOptions(seq_len=64, task="preference"))
    with pytest.raises(DataError, match="--max-prompt-length applies to --task preference only"):
        pack_records([pair], sp_model_path, str(tmp_path / "y"), PackOptions(seq_len=64, max_prompt_length=8))
