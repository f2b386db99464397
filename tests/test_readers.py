import json

import pytest

from conftest import write_json, write_jsonl
from witscale.data.errors import DataError, RecordError
from witscale.data.readers import Message, detect_format, normalize_record, read_records

ALPACA = [{"instruction": "Add 2 and 3.", "input": "", "output": "5"},
          {"instruction": "Reverse.", "input": "a b", "output": "b a", "system": "Be brief.", "weight": 2}]


def _convs(path, fmt="auto", **kw):
    detected, it = read_records(path, fmt)
    return detected, [normalize_record(s.record, detected, **kw) for s in it]


@pytest.mark.parametrize("writer", ["json", "jsonl", "parquet"])
def test_alpaca_in_every_file_kind(tmp_path, writer):
    if writer == "json":
        path = write_json(tmp_path / "a.json", ALPACA)
    elif writer == "jsonl":
        path = write_jsonl(tmp_path / "a.jsonl", ALPACA)
    else:
        import pyarrow as pa
        import pyarrow.parquet as pq
        path = str(tmp_path / "a.parquet")
        keys = sorted({k for r in ALPACA for k in r})   # from_pylist would take the columns of row 0 only
        pq.write_table(pa.table({k: [r.get(k) for r in ALPACA] for k in keys}), path)
    fmt, convs = _convs(path)
    assert fmt == "alpaca"
    assert convs[0].messages == [Message("user", "Add 2 and 3."), Message("assistant", "5")]
    assert convs[0].weight is None and not convs[0].has_weights
    assert convs[1].messages == [Message("system", "Be brief."), Message("user", "Reverse.", None, "a b"),
                                 Message("assistant", "b a")]
    assert convs[1].messages[1].full_text() == "Reverse.\n\na b"
    assert convs[1].weight == 2.0 and convs[1].has_weights


def test_parquet_chat_records(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq
    recs = [{"messages": [{"role": "user", "content": "hi", "loss_weight": 0.0},
                          {"role": "assistant", "content": "hello", "loss_weight": 1.0}]}]
    path = str(tmp_path / "c.parquet")
    pq.write_table(pa.Table.from_pylist(recs), path)
    fmt, convs = _convs(path)
    assert fmt == "messages"
    assert convs[0].messages == [Message("user", "hi", 0.0), Message("assistant", "hello", 1.0)]


def test_prompt_response_and_sharegpt_and_chat_parts(tmp_path):
    assert detect_format({"prompt": "p", "response": "r"}) == "prompt_response"
    conv = normalize_record({"prompt": "p", "response": "r"}, "prompt_response", system="S")
    assert [m.role for m in conv.messages] == ["system", "user", "assistant"]
    share = {"conversations": [{"from": "system", "value": "s"}, {"from": "human", "value": "q1"},
                               {"from": "gpt", "value": "a1", "weight": 0.5}, {"from": "human", "value": "q2"},
                               {"from": "gpt", "value": "a2"}]}
    assert detect_format(share) == "sharegpt"
    conv = normalize_record(share, "sharegpt")
    assert [(m.role, m.text, m.weight) for m in conv.messages] == [
        ("system", "s", None), ("user", "q1", None), ("assistant", "a1", 0.5), ("user", "q2", None),
        ("assistant", "a2", None)]
    assert not any(m.as_prompt for m in conv.messages)
    last = normalize_record(share, "sharegpt", last_turn_only=True)
    assert [m.as_prompt for m in last.messages] == [False, False, True, False, False]
    parts = {"messages": [{"role": "user", "content": [{"type": "text", "value": "a"}, {"type": "text", "text": "b"}]},
                          {"role": "assistant", "content": "c"}]}
    assert normalize_record(parts, "messages").messages[0].text == "ab"


@pytest.mark.parametrize("record,fmt,needle", [
    ({"instruction": "x", "output": ""}, "alpaca", "empty response"),
    ({"instruction": "x"}, "alpaca", "missing field 'output'"),
    ({"instruction": 3, "output": "y"}, "alpaca", "'instruction' must be a string"),
    ({"messages": [{"role": "robot", "content": "x"}, {"role": "assistant", "content": "y"}]}, "messages",
     "unknown role 'robot'"),
    ({"messages": [{"role": "user", "content": "x"}]}, "messages", "last message must be an assistant"),
    ({"conversations": [{"from": "human", "value": "x"}, {"from": "gpt", "value": "y", "loss_weight": "a"}]},
     "sharegpt", "must be a number"),
    ({"prompt": "p", "response": "r", "weight": -1}, "prompt_response", ">= 0"),
    (["not", "a", "dict"], "alpaca", "must be a JSON object"),
])
def test_record_errors(record, fmt, needle):
    with pytest.raises(RecordError, match=needle):
        normalize_record(record, fmt)


def test_bad_lines_are_record_errors_with_line_numbers(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_bytes(json.dumps(ALPACA[0]).encode() + b"\n{not json\n" + b'{"instruction": "\xff"}\n')
    fmt, it = read_records(str(path))
    got = list(it)
    assert fmt == "alpaca" and len(got) == 3
    assert isinstance(got[1].record, RecordError) and "line 2" in str(got[1].record) and "invalid JSON" in str(got[1].record)
    assert isinstance(got[2].record, RecordError) and "line 3" in str(got[2].record) and "UTF-8" in str(got[2].record)


def test_file_level_errors(tmp_path):
    empty = tmp_path / "e.jsonl"
    empty.write_text("")
    with pytest.raises(DataError, match="empty"):
        read_records(str(empty))
    with pytest.raises(DataError, match="known formats"):
        read_records(write_jsonl(tmp_path / "u.jsonl", [{"foo": 1}]))
    with pytest.raises(DataError, match="unknown format"):
        read_records(write_jsonl(tmp_path / "v.jsonl", ALPACA), "csv")
    broken = tmp_path / "b.json"
    broken.write_text('[\n{"instruction": "a",\n')
    with pytest.raises(DataError, match=r"b\.json:line \d+: invalid JSON"):
        read_records(str(broken))
