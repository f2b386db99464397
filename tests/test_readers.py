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


# ------------------------------------------------------------------------------------ tool calls, reasoning
from witscale.data.readers import ToolCall, describe_format  # noqa: E402

WEATHER_SCHEMA = {"name": "get_weather", "description": "Current weather of a city",
                  "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}
WEATHER_TOOL = {"type": "function", "function": WEATHER_SCHEMA}

# LLaMA-Factory's ShareGPT tool data (as in its glaive_toolcall sets): tools as a JSON string
SHAREGPT_TOOLS = {"conversations": [{"from": "human", "value": "Weather in Paris?"},
                                    {"from": "function_call",
                                     "value": "{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\"}}"},
                                    {"from": "observation", "value": "{\"temp\": 21}"},
                                    {"from": "gpt", "value": "It is 21 degrees in Paris."}],
                  "system": "Be brief.", "tools": json.dumps([WEATHER_SCHEMA])}

# OpenAI-style: tool_calls with string arguments, a tool message, a top-level tools list
OPENAI_TOOLS = {"messages": [{"role": "user", "content": "Weather in Paris and Rome?"},
                             {"role": "assistant", "content": None, "reasoning_content": "Two cities: two calls.",
                              "tool_calls": [
                                  {"id": "c1", "type": "function",
                                   "function": {"name": "get_weather", "arguments": "{\"city\": \"Paris\"}"}},
                                  {"id": "c2", "type": "function",
                                   "function": {"name": "get_weather", "arguments": {"city": "Rome"}}}]},
                             {"role": "tool", "tool_call_id": "c1", "name": "get_weather", "content": "21"},
                             {"role": "tool", "tool_call_id": "c2", "name": "get_weather", "content": {"temp": 25}},
                             {"role": "assistant", "content": "Paris 21, Rome 25."}],
                "tools": [WEATHER_TOOL]}


def test_sharegpt_function_call_and_observation():
    assert detect_format(SHAREGPT_TOOLS) == "sharegpt"
    conv = normalize_record(SHAREGPT_TOOLS, "sharegpt")
    assert [m.role for m in conv.messages] == ["system", "user", "assistant", "tool", "assistant"]
    call = conv.messages[2]
    assert call.text == "" and call.tool_calls == (ToolCall("get_weather", {"city": "Paris"}),)
    assert conv.messages[3].text == '{"temp": 21}'
    assert conv.tools == (WEATHER_TOOL,)                      # bare schema → OpenAI form
    assert conv.features() == ["tool calls", "tool results", "tools"] and conv.uses_tools
    assert describe_format(SHAREGPT_TOOLS, "sharegpt") == "sharegpt (tool calls, tool results, tools)"
    # a list of parallel calls in one function_call turn; tools as a list
    rec = json.loads(json.dumps(SHAREGPT_TOOLS))
    rec["conversations"][1]["value"] = json.dumps([{"name": "get_weather", "arguments": {"city": "Paris"}},
                                                   {"name": "get_weather", "arguments": "{\"city\": \"Rome\"}"}])
    rec["tools"] = [WEATHER_TOOL]
    conv = normalize_record(rec, "sharegpt")
    assert [c.arguments for c in conv.messages[2].tool_calls] == [{"city": "Paris"}, {"city": "Rome"}]
    assert conv.tools == (WEATHER_TOOL,)


def test_openai_tool_calls_tool_messages_and_reasoning_content():
    conv = normalize_record(OPENAI_TOOLS, "messages")
    a = conv.messages[1]
    assert a.text == "" and a.reasoning == "Two cities: two calls."
    assert a.tool_calls == (ToolCall("get_weather", {"city": "Paris"}, "c1"), ToolCall("get_weather", {"city": "Rome"}, "c2"))
    assert a.tool_calls[0].arguments_json() == '{"city": "Paris"}'
    t1, t2 = conv.messages[2:4]
    assert (t1.role, t1.text, t1.name, t1.tool_call_id) == ("tool", "21", "get_weather", "c1")
    assert t2.text == '{"temp": 25}'                           # an object result is kept as its JSON
    assert conv.features() == ["reasoning", "tool calls", "tool results", "tools"]
    # legacy OpenAI function_call / role function
    legacy = {"messages": [{"role": "user", "content": "Weather?"},
                           {"role": "assistant", "content": None,
                            "function_call": {"name": "get_weather", "arguments": "{\"city\": \"Oslo\"}"}},
                           {"role": "function", "name": "get_weather", "content": "3"},
                           {"role": "assistant", "content": "3 degrees."}]}
    conv = normalize_record(legacy, "messages")
    assert conv.messages[1].tool_calls == (ToolCall("get_weather", {"city": "Oslo"}),)
    assert conv.messages[2].role == "tool" and conv.tools is None


def test_content_parts_and_think_blocks():
    parts = {"messages": [{"role": "user", "content": [{"type": "text", "text": "Weather?"}]},
                          {"role": "assistant", "content": [
                              {"type": "thinking", "thinking": "Call the tool."},
                              {"type": "text", "text": "Checking."},
                              {"type": "tool_use", "id": "t1", "name": "get_weather", "input": {"city": "Oslo"}}]},
                          {"role": "tool", "content": [{"type": "text", "text": "3"}]},
                          {"role": "assistant", "content": [{"type": "reasoning", "text": "Done."},
                                                            {"type": "text", "text": "3 degrees."}]}]}
    conv = normalize_record(parts, "messages")
    a = conv.messages[1]
    assert (a.reasoning, a.text, a.tool_calls) == ("Call the tool.", "Checking.", (ToolCall("get_weather", {"city": "Oslo"}, "t1"),))
    assert (conv.messages[3].reasoning, conv.messages[3].text) == ("Done.", "3 degrees.")
    think = {"messages": [{"role": "user", "content": "2+2?"},
                          {"role": "assistant", "content": "<think>\nSimple sum.\n</think>\n\n4"}]}
    m = normalize_record(think, "messages").messages[1]
    assert (m.reasoning, m.text) == ("Simple sum.", "4")
    empty = {"conversations": [{"from": "human", "value": "2+2?"}, {"from": "gpt", "value": "<think>\n\n</think>\n\n4"}]}
    m = normalize_record(empty, "sharegpt").messages[1]
    assert (m.reasoning, m.text) == ("", "4")                 # an empty block stays (reasoning '', not None)
    plain = normalize_record({"prompt": "p", "response": "a <think> in the middle"}, "prompt_response").messages[1]
    assert plain.reasoning is None and plain.text == "a <think> in the middle"


@pytest.mark.parametrize("record,needle", [
    ({"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "<think>never closed"}]},
     "messages[2]: <think> at the start of the message is never closed by </think>"),
    ({"messages": [{"role": "user", "content": "x"},
                   {"role": "assistant", "content": "<think>a</think>b", "reasoning_content": "c"}]},
     "the reasoning is given twice"),
    ({"messages": [{"role": "user", "content": "x"},
                   {"role": "assistant", "content": [{"type": "text", "text": "b"}, {"type": "reasoning", "text": "a"}]}]},
     "a reasoning part after a text or tool_call part"),
    ({"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": [
        {"type": "tool_call", "value": "{\"arguments\": {}}"}]}]},
     "messages[2]: tool call without a 'name'"),
    ({"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": [
        {"type": "tool_call", "value": "{oops"}]}]},
     "messages[2]: the value of a 'tool_call' part is not valid JSON"),

    ({"messages": [{"role": "user", "content": [{"type": "reasoning", "text": "a"}]}, {"role": "assistant", "content": "b"}]},
     "messages[1]: a 'reasoning' part is only allowed in an assistant message"),
    ({"messages": [{"role": "user", "content": [{"type": "image", "url": "x"}]}, {"role": "assistant", "content": "b"}]},
     "unsupported content part 'image'"),
    ({"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "",
                                                       "tool_calls": [{"function": {"name": "f", "arguments": "{oops"}}]}]},
     "messages[2].tool_calls[1]: arguments of tool call 'f' are not valid JSON"),
    ({"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "",
                                                       "tool_calls": [{"function": {"arguments": "{}"}}]}]},
     "tool call without a 'name'"),
    ({"messages": [{"role": "user", "content": "x"}, {"role": "tool", "content": "3"},
                   {"role": "assistant", "content": "b"}]},
     "message 2: a tool result must follow an assistant message with tool calls"),
    ({"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "reasoning_content": "hmm", "content": ""}]},
     "message 2: empty response (reasoning without an answer or a tool call)"),
    ({"conversations": [{"from": "human", "value": "x"}, {"from": "function_call", "value": "not json"}]},
     "conversations[2]: function_call value is not valid JSON"),
    ({"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}], "tools": "[{"},
     "field 'tools' is not valid JSON"),
    ({"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}], "tools": [{"x": 1}]},
     "tools[1]: a tool schema needs a 'name'"),
    ({"instruction": None, "output": "y"}, "field 'instruction' is null"),
])
def test_tool_and_reasoning_record_errors(record, needle):
    with pytest.raises(RecordError) as e:
        normalize_record(record, detect_format(record))
    assert needle in str(e.value)


# ------------------------------------------------------------------------------------ real-world files
def test_bom_crlf_blank_lines_and_null_input(tmp_path):
    lines = [json.dumps(ALPACA[0]), "", "   ", json.dumps({"instruction": "Say hi.", "input": None, "output": "hi"})]
    path = tmp_path / "win.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + "\r\n".join(lines).encode() + b"\r\n\r\n")
    fmt, it = read_records(str(path))
    got = list(it)
    assert fmt == "alpaca" and [s.where for s in got] == ["line 1", "line 4"]
    convs = [normalize_record(s.record, fmt) for s in got]
    assert convs[0].messages == [Message("user", "Add 2 and 3."), Message("assistant", "5")]
    assert convs[1].messages[0] == Message("user", "Say hi.") and convs[1].messages[0].full_text() == "Say hi."
    # a BOM where files were concatenated; a BOM before a JSON array
    cat = tmp_path / "cat.jsonl"
    cat.write_bytes(b"\xef\xbb\xbf" + json.dumps(ALPACA[0]).encode() + b"\n\xef\xbb\xbf" + json.dumps(ALPACA[1]).encode())
    assert len(list(read_records(str(cat))[1])) == 2
    arr = tmp_path / "arr.json"
    arr.write_bytes(b"\xef\xbb\xbf\r\n" + json.dumps(ALPACA).replace(", ", ",\r\n").encode())
    assert read_records(str(arr))[0] == "alpaca" and len(list(read_records(str(arr))[1])) == 2
    # anything else malformed still names its line
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(b"\xef\xbb\xbf" + json.dumps(ALPACA[0]).encode() + b"\r\n\r\n{oops\r\n")
    got = list(read_records(str(bad))[1])
    assert isinstance(got[1].record, RecordError) and str(got[1].record).startswith(f"{bad}:line 3: invalid JSON")


def test_utf16_file_is_named(tmp_path):
    path = tmp_path / "u16.jsonl"
    path.write_bytes(json.dumps(ALPACA[0]).encode("utf-16"))
    with pytest.raises(DataError, match="u16.jsonl: the file is UTF-16"):
        read_records(str(path))


def test_parquet_nulls_at_any_depth_are_absent(tmp_path):
    """Arrow gives every struct the union of the rows' fields: a null field is an absent one."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    recs = [json.loads(json.dumps(OPENAI_TOOLS)), {"messages": [{"role": "user", "content": "hi"},
                                                                {"role": "assistant", "content": "hello"}]}]
    recs[0]["messages"][3]["content"] = '{"temp": 25}'   # one type per column
    recs[0]["messages"][1]["tool_calls"][1]["function"]["arguments"] = '{"city": "Rome"}'
    path = str(tmp_path / "t.parquet")
    pq.write_table(pa.Table.from_pylist(recs), path)
    fmt, it = read_records(path)
    convs = [normalize_record(s.record, fmt) for s in it]
    assert convs[0] == normalize_record(recs[0], "messages")
    assert convs[1].messages == [Message("user", "hi"), Message("assistant", "hello")] and convs[1].tools is None


# ------------------------------------------------------------------------------------ inputs: globs, datasets
from witscale.data.inputs import Source, iter_dataset, load_dataset_source, resolve_inputs  # noqa: E402


def test_resolve_inputs_files_globs_dirs_and_names(tmp_path):
    a = write_jsonl(tmp_path / "a.jsonl", ALPACA)
    (tmp_path / "sub").mkdir()
    b = write_jsonl(tmp_path / "sub" / "b.jsonl", ALPACA)
    c = write_json(tmp_path / "c.json", ALPACA)
    assert resolve_inputs([a]) == [Source("file", a)]
    assert resolve_inputs([str(tmp_path / "*.json*")]) == [Source("file", a), Source("file", c)]
    assert resolve_inputs([str(tmp_path / "**" / "*.jsonl")]) == [Source("file", a), Source("file", b)]
    assert resolve_inputs([str(tmp_path / "sub")], split="test") == [Source("dataset", str(tmp_path / "sub"), "test")]
    assert resolve_inputs(["tatsu-lab/alpaca"], subset="x") == [Source("dataset", "tatsu-lab/alpaca", None, "x")]
    assert Source("dataset", "org/ds", "test", "en").name == "org/ds[en/test]"
    with pytest.raises(DataError, match=r"\*\.parquet: no file matches this pattern"):
        resolve_inputs([str(tmp_path / "*.parquet")])
    with pytest.raises(DataError, match="missing.jsonl: no such file or directory"):
        resolve_inputs([str(tmp_path / "missing.jsonl")])


def test_local_datasets_directories(tmp_path):
    """save_to_disk directories (a Dataset, a DatasetDict) as inputs; --split picks, errors name the dataset."""
    import datasets
    recs = [json.loads(json.dumps(OPENAI_TOOLS)), {"messages": [{"role": "user", "content": "hi"},
                                                                {"role": "assistant", "content": "hello"}]}]
    recs[0]["messages"][3]["content"] = '{"temp": 25}'
    recs[0]["messages"][1]["tool_calls"][1]["function"]["arguments"] = '{"city": "Rome"}'
    recs[0]["tools"] = json.dumps(recs[0]["tools"])         # hub datasets keep varying schemas as JSON strings
    recs[1]["tools"] = "[]"
    one = str(tmp_path / "one")
    datasets.Dataset.from_list(recs).save_to_disk(one)
    ds = load_dataset_source(resolve_inputs([one])[0])
    got = [normalize_record(r, detect_format(r)) for _, r in iter_dataset(ds)]
    assert got[0] == normalize_record(recs[0], "messages") and got[0].tools == (WEATHER_TOOL,)
    assert got[1].tools is None and got[1].messages[1] == Message("assistant", "hello")
    both = str(tmp_path / "both")
    datasets.DatasetDict({"train": datasets.Dataset.from_list(ALPACA),
                          "test": datasets.Dataset.from_list(ALPACA[:1])}).save_to_disk(both)
    assert len(load_dataset_source(Source("dataset", both))) == 2
    assert len(load_dataset_source(Source("dataset", both, "test"))) == 1
    with pytest.raises(DataError, match="both: no split 'dev'; the dataset has test, train"):
        load_dataset_source(Source("dataset", both, "dev"))
    with pytest.raises(DataError, match="--subset does not apply"):
        load_dataset_source(Source("dataset", both, None, "en"))


# ------------------------------------------------------------------------------------ LLaMA-Factory v1 parts
def _v1(role, *parts, **extra):
    return {"role": role, "content": [dict(zip(("type", "value"), p)) for p in parts], **extra}


def test_llama_factory_v1_content_parts():
    """LLaMA-Factory v1's {type, value} parts: value in every part type; a tool call as an object or a JSON
    string (arguments or parameters); several calls in one turn, text between them; reasoning first."""
    rec = {"messages": [
        _v1("system", ("text", "Be brief.")),
        _v1("user", ("text", "Weather in Paris and Rome?"), loss_weight=0.0),
        _v1("assistant", ("reasoning", "Two cities: two calls."),
            ("tool_call", '{"name": "get_weather", "arguments": {"city": "Paris"}}'),
            ("text", "Now Rome."),
            ("tool_call", {"name": "get_weather", "parameters": {"city": "Rome"}}), loss_weight=1.0),
        _v1("tool", ("text", "21")), _v1("tool", ("text", "25")),
        _v1("assistant", ("text", "Paris 21, "), ("text", "Rome 25."))]}
    conv = normalize_record(rec, detect_format(rec))
    a = conv.messages[2]
    assert a.reasoning == "Two cities: two calls." and a.text == "Now Rome."
    assert a.tool_calls == (ToolCall("get_weather", {"city": "Paris"}), ToolCall("get_weather", {"city": "Rome"}))
    assert conv.messages[1].weight == 0.0 and conv.messages[0].text == "Be brief."
    assert [m.text for m in conv.messages[3:]] == ["21", "25", "Paris 21, Rome 25."]
    # text on both sides of a call: the texts joined in order, a blank line where the call stood
    both = {"messages": [_v1("user", ("text", "x")),
                         _v1("assistant", ("text", "First."), ("tool_call", {"name": "f", "arguments": "{}"}),
                             ("text", "Then.")), _v1("tool", ("text", "ok")), _v1("assistant", ("text", "done"))]}
    m = normalize_record(both, "messages").messages[1]
    assert m.text == "First.\n\nThen." and m.tool_calls == (ToolCall("f", {}),)
    assert sorted(conv.content_kinds()) == ["reasoning", "system", "tool calls", "tool results"]


def test_preference_record_under_sft_says_to_add_task_preference():
    pair = {"messages": [{"role": "user", "content": "x"}], "chosen": "a", "rejected": "b"}
    with pytest.raises(DataError, match="preference data; pack it with --task preference"):
        detect_format(pair)                                  # first record: detection says so
    with pytest.raises(RecordError, match="preference data; pack it with --task preference"):
        normalize_record(pair, "messages")                   # any later record (or --format messages) too


def test_lone_surrogate_is_a_record_error(tmp_path):
    """A lone surrogate ("\\ud800" in the JSON) is a record error naming the record and the field, not a crash
    when it reaches the tokenizer; a well-formed pair (an emoji spelled as two escapes) is fine."""
    good = '{"instruction": "smile \\ud83d\\ude00", "output": "ok"}'
    bad = '{"instruction": "x", "output": "broken \\ud800 here"}'
    path = tmp_path / "s.jsonl"
    path.write_text(good + "\n" + bad + "\n", encoding="utf-8")
    recs = list(read_records(str(path))[1])
    assert recs[0].record["instruction"] == "smile \U0001F600"
    assert isinstance(recs[1].record, RecordError)
    assert str(recs[1].record).startswith(f"{path}:line 2: output: a lone surrogate \\ud800 at character 8")
    arr = tmp_path / "s.json"
    arr.write_text("[" + good + ", " + bad.replace('"x"', '["\\udfff"]') + "]", encoding="utf-8")
    recs = list(read_records(str(arr))[1])
    assert not isinstance(recs[0].record, RecordError)
    assert str(recs[1].record).startswith(f"{arr}:record 2: instruction[0]: a lone surrogate \\udfff")
