"""The class table: reasoning / tool_call / tool appended to the original six, their default weights, and
packed data written before them (no class table, or the 6-class one) loading and weighting as before."""
import json
import os

import numpy as np
import pytest

from witscale.data.classes import (CLASS_NAMES, LEGACY_CLASS_NAMES, NUM_CLASSES, PROMPT_SIDE, RESPONSE_SIDE,
                                   TokenClass as C, check_class_table)
from witscale.data.errors import DataError
from witscale.data.format import PackedDataset, TokenizedCorpus, write_packed
from witscale.data.loader import PackedLoader, row_targets
from witscale.data.weighting import build_weight_table, describe_weight_table, parse_class_weights


def test_ids_of_the_original_classes_are_unchanged_and_new_ones_appended():
    assert CLASS_NAMES == ["pad", "template", "system", "prompt", "response", "eot", "reasoning", "tool_call", "tool"]
    assert LEGACY_CLASS_NAMES == CLASS_NAMES[:6] and NUM_CLASSES == 9
    assert set(PROMPT_SIDE) == {C.TEMPLATE, C.SYSTEM, C.PROMPT, C.TOOL}
    assert set(RESPONSE_SIDE) == {C.RESPONSE, C.EOT, C.REASONING, C.TOOL_CALL}


def test_default_weights_and_overrides_of_the_new_classes():
    table = build_weight_table(0.2, 0.9)
    assert table.shape == (NUM_CLASSES,) and table[C.PAD] == 0
    for c in (C.TEMPLATE, C.SYSTEM, C.PROMPT, C.TOOL):
        assert table[c] == np.float32(0.2), c
    for c in (C.RESPONSE, C.EOT, C.REASONING, C.TOOL_CALL):
        assert table[c] == np.float32(0.9), c
    table = build_weight_table(0.2, 1.0, parse_class_weights("reasoning=0.3,tool=0,tool_call=0.5"))
    assert (table[C.REASONING], table[C.TOOL], table[C.TOOL_CALL]) == (np.float32(0.3), 0, 0.5)
    assert table[C.PROMPT] == np.float32(0.2) and table[C.RESPONSE] == 1
    assert "reasoning=0.3" in describe_weight_table(table) and "tool=0" in describe_weight_table(table)


def test_the_weight_of_a_target_is_its_new_class_weight():
    tokens = np.arange(10, 19, dtype=np.int32)
    classes = np.array([C.TEMPLATE, C.PROMPT, C.REASONING, C.TOOL_CALL, C.EOT, C.TOOL, C.RESPONSE, C.EOT, C.PAD],
                       np.uint8)
    table = build_weight_table(0.1, 1.0, parse_class_weights("reasoning=0.3,tool=0"))
    _, w, tc, _, used = row_targets(tokens, classes, None, np.array([8], np.int32), table)
    assert used == 8
    # position t predicts token t+1: prompt, reasoning, tool_call, eot, tool, response, eot, (end of document)
    assert w[:7].tolist() == pytest.approx([0.1, 0.3, 1.0, 1.0, 0.0, 1.0, 1.0])
    assert tc[:7].tolist() == [C.PROMPT, C.REASONING, C.TOOL_CALL, C.EOT, C.TOOL, C.RESPONSE, C.EOT]
    assert w[7] == 0 and tc[7] == C.PAD


def test_check_class_table():
    assert check_class_table(None) == LEGACY_CLASS_NAMES
    assert check_class_table({n: i for i, n in enumerate(LEGACY_CLASS_NAMES)}) == LEGACY_CLASS_NAMES
    assert check_class_table({n: i for i, n in enumerate(CLASS_NAMES)}) == CLASS_NAMES
    with pytest.raises(ValueError, match="'image'.*does not know"):
        check_class_table({**{n: i for i, n in enumerate(CLASS_NAMES)}, "image": 9})
    with pytest.raises(ValueError, match="'tool' id 6"):
        check_class_table({**{n: i for i, n in enumerate(LEGACY_CLASS_NAMES)}, "tool": 6})
    with pytest.raises(ValueError, match="not 0..6"):
        check_class_table({**{n: i for i, n in enumerate(LEGACY_CLASS_NAMES)}, "tool_call": 7})


def _legacy_dataset(tmp_path, table: str):
    """A dataset as witscale wrote it before the new classes: classes 0..5, and a manifest with the 6-class
    table ('six') or none at all ('none')."""
    rng = np.random.default_rng(0)
    docs = []
    for n in rng.integers(6, 30, size=40):
        p = int(n) // 2
        cls = np.array([C.TEMPLATE] + [C.SYSTEM] + [C.PROMPT] * (p - 2) + [C.RESPONSE] * (int(n) - p - 1) + [C.EOT],
                       np.uint8)
        docs.append((rng.integers(0, 100, size=int(n)).astype(np.int32), cls, None))
    out = str(tmp_path / f"legacy-{table}")
    write_packed(out, TokenizedCorpus.from_documents(docs), seq_len=64, pad_id=0)
    mpath = os.path.join(out, "manifest.json")
    with open(mpath) as f:
        m = json.load(f)
    if table == "none":
        del m["class_table"]
    else:
        m["class_table"] = {n: i for i, n in enumerate(LEGACY_CLASS_NAMES)}
    m["tokens_per_class"] = {n: m["tokens_per_class"][n] for n in LEGACY_CLASS_NAMES}
    with open(mpath, "w") as f:
        json.dump(m, f)
    return out


@pytest.mark.parametrize("table", ["none", "six"])
def test_data_packed_before_the_new_classes_loads_and_weighs_as_before(tmp_path, table):
    ds = PackedDataset(_legacy_dataset(tmp_path, table))
    assert ds.class_names == LEGACY_CLASS_NAMES and ds.num_classes == 6
    # the weights of the old 6-entry table, computed by the old rule, are today's weights on this data
    lp, lr = 0.2, 1.0
    old_table = np.array([0, lp, lp, lp, lr, lr], np.float32)
    new_table = build_weight_table(lp, lr)
    assert (new_table[:6] == old_table).all()
    loader = PackedLoader(ds, new_table, micro_batch_size=2, grad_accum=1, shuffle=False)
    for r in range(len(ds)):
        row = ds[r]
        expected = row_targets(row.tokens, row.classes, None, row.doc_lengths, old_table)
        got = loader._row(r)[2:]
        for a, b in zip(expected, got):
            assert np.array_equal(a, b)
    # a class byte outside the data's own table is refused, though today's table is larger
    with open(os.path.join(ds.path, "classes.bin"), "r+b") as f:
        f.seek(3)
        f.write(bytes([C.REASONING]))
    # ... when the dataset opens (it used to be when the row was drawn)
    with pytest.raises(DataError, match=r"classes.bin:row 0: class id 6 at position 3 is not in the data's class "
                                        r"table \(0..5: pad, "):
        PackedDataset(ds.path)
    bad = PackedDataset(ds.path, validate=False)        # and still when a row is drawn, for a dataset not validated
    with pytest.raises(ValueError, match="token class 6 is unknown .*0..5"):
        PackedLoader(bad, new_table, micro_batch_size=1, grad_accum=1, shuffle=False).make_micro_batch([0])


def test_new_data_records_the_full_table_and_an_unknown_table_is_refused(tmp_path):
    out = str(tmp_path / "ds")
    docs = [(np.arange(5, dtype=np.int32), np.array([C.TEMPLATE, C.PROMPT, C.REASONING, C.TOOL_CALL, C.EOT], np.uint8),
             None)]
    m = write_packed(out, TokenizedCorpus.from_documents(docs), seq_len=8, pad_id=0)
    assert m["class_table"] == {n: i for i, n in enumerate(CLASS_NAMES)}
    assert m["tokens_per_class"]["reasoning"] == 1 and m["tokens_per_class"]["tool"] == 0
    ds = PackedDataset(out)
    assert ds.num_classes == NUM_CLASSES
    PackedLoader(ds, build_weight_table(0, 1), micro_batch_size=1, grad_accum=1).make_micro_batch([0])
    mpath = os.path.join(out, "manifest.json")
    m = json.load(open(mpath))
    m["class_table"]["image"] = 9
    json.dump(m, open(mpath, "w"))
    with pytest.raises(DataError, match="manifest.json: class_table has class 'image'"):
        PackedDataset(out)
