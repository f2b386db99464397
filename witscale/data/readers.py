"""Raw records → normalized conversations.

Formats (one per file, given or detected from the first record):
  alpaca           {instruction, input?, output, system?}                 (a null input is an empty one)
  prompt_response  {prompt, response, system?}                            (the paper's format)
  messages         {messages: [{role, content, weight?|loss_weight?}], tools?}          (OpenAI style)
  sharegpt         {conversations: [{from, value, weight?|loss_weight?}], system?, tools?}
Every format accepts an optional per-record multiplier ``weight``. Files: JSON array, JSONL (a UTF-8 BOM,
CRLF line ends and blank lines are fine) or parquet.

Tool-calling and reasoning data:
  * roles ``tool`` / ``function`` / ``observation`` / ``ipython`` are tool results; ShareGPT's
    ``function_call`` turn (a JSON call or a list of calls) is an assistant turn that calls tools;
  * an assistant message's ``tool_calls`` ([{id?, type: function, function: {name, arguments}}], arguments a
    JSON object or a JSON string) or legacy ``function_call`` ({name, arguments});
  * a top-level ``tools`` list (OpenAI ``{type: function, function: {...}}`` or bare ``{name, ...}`` schemas,
    normalized to the former), given as a list or as a JSON string;
  * content-part lists (OpenAI's, Anthropic's, LLaMA-Factory v1's ``{type, value}``): ``text``; ``reasoning`` /
    ``thinking`` parts; ``tool_call`` / ``function_call`` / ``tool_use`` parts (the call on the part, or in its
    ``value`` as an object or a JSON string) — reasoning first, then text and calls in any order (several
    calls, text between them; templates render reasoning, then the text, then the calls);
  * the assistant's reasoning as a ``reasoning_content`` (or ``reasoning`` / ``thinking``) field, or as a
    ``<think>…</think>`` block at the start of its content.
A record becomes a :class:`Conversation`; errors are :class:`RecordError` naming the record.
"""
from __future__ import annotations

import json
import math
import os
import re
from typing import Any, Iterator, NamedTuple

from witscale.data.errors import DataError, RecordError

FORMATS = ("alpaca", "prompt_response", "messages", "sharegpt")
ROLES = ("system", "user", "assistant", "tool")
_ROLE_ALIASES = {"system": "system", "user": "user", "human": "user", "assistant": "assistant", "gpt": "assistant",
                 "model": "assistant", "tool": "tool", "function": "tool", "observation": "tool", "ipython": "tool",
                 "function_call": "assistant"}
_CALL_ROLES = ("function_call",)          # a turn whose text is a JSON tool call (ShareGPT tool data)
_REASONING_FIELDS = ("reasoning_content", "reasoning", "thinking")
_REASONING_PARTS = ("reasoning", "thinking", "reasoning_content")
_CALL_PARTS = ("tool_call", "function_call", "tool_use")
THINK_OPEN, THINK_CLOSE = "<think>", "</think>"


class ToolCall(NamedTuple):
    name: str
    arguments: Any               # the parsed JSON arguments (normally an object)
    id: str | None = None

    def arguments_json(self) -> str:
        """The arguments as JSON, the way chat templates print them (Jinja's tojson: no ASCII escaping)."""
        return json.dumps(self.arguments, ensure_ascii=False)


class Message(NamedTuple):
    role: str                    # 'system' | 'user' | 'assistant' | 'tool'
    text: str
    weight: float | None = None  # per-message weight from the data (None: absent)
    input: str | None = None     # alpaca's separate `input`; templates other than alpaca append it to text
    as_prompt: bool = False      # an assistant turn demoted to prompt-side (--last-turn-only)
    reasoning: str | None = None  # assistant: its reasoning trace (None: none; '' an empty <think> block)
    tool_calls: tuple = ()       # assistant: ToolCall, in order, after its text
    name: str | None = None      # tool: the name of the tool that answered
    tool_call_id: str | None = None  # tool: the call it answers

    def full_text(self) -> str:
        return self.text + "\n\n" + self.input if self.input else self.text


class Conversation(NamedTuple):
    messages: list[Message]
    weight: float | None = None  # per-record multiplier (None: absent)
    tools: tuple | None = None   # tool schemas offered to the model, OpenAI style ({type: function, function})

    @property
    def has_weights(self) -> bool:
        return self.weight is not None or any(m.weight is not None for m in self.messages)

    def features(self) -> list[str]:
        """What beyond plain text this record carries: 'reasoning', 'tool calls', 'tool results', 'tools'."""
        out = []
        if any(m.reasoning is not None for m in self.messages):
            out.append("reasoning")
        if any(m.tool_calls for m in self.messages):
            out.append("tool calls")
        if any(m.role == "tool" for m in self.messages):
            out.append("tool results")
        if self.tools:
            out.append("tools")
        return out

    def content_kinds(self) -> list[str]:
        """What `--format auto` counts over a whole input: features() plus 'system' and 'multi-turn'."""
        out = self.features()
        if self.messages[0].role == "system":
            out.append("system")
        if sum(m.role == "user" for m in self.messages) > 1:
            out.append("multi-turn")
        return out

    @property
    def uses_tools(self) -> bool:
        return bool(self.tools) or any(m.tool_calls or m.role == "tool" for m in self.messages)


# ---------------------------------------------------------------------------------------------- files
_UTF16_BOMS = (b"\xff\xfe", b"\xfe\xff")


def file_kind(path: str) -> str:
    """'parquet', 'json' (one array) or 'jsonl', from the extension and, for .json, the first character."""
    low = path.lower()
    if low.endswith((".parquet", ".pq")):
        return "parquet"
    if low.endswith((".jsonl", ".ndjson")):
        return "jsonl"
    with open(path, "rb") as f:
        head = f.read(4096).lstrip(b"\xef\xbb\xbf \t\r\n")
    return "json" if head.startswith(b"[") else "jsonl"


def iter_raw_records(path: str) -> Iterator[tuple[str, Any]]:
    """Yield (where, record) for each record of a file; `record` is a RecordError for a bad line.

    File-level problems (missing, empty, not an array, UTF-16, non-UTF-8 JSON array) raise DataError."""
    if not os.path.isfile(path):
        raise DataError("no such file" if not os.path.isdir(path) else "is a directory, not a data file", path)
    if os.path.getsize(path) == 0:
        raise DataError("input file is empty (no records)", path)
    kind = file_kind(path)
    if kind != "parquet":
        with open(path, "rb") as f:
            if f.read(2) in _UTF16_BOMS:
                raise DataError("the file is UTF-16 (it starts with a UTF-16 byte-order mark); witscale reads "
                                "UTF-8: convert it, e.g. iconv -f UTF-16 -t UTF-8", path)
    count = 0
    if kind == "parquet":
        it = _iter_parquet(path)
    elif kind == "json":
        it = _iter_json_array(path)
    else:
        it = _iter_jsonl(path)
    for where, rec in it:
        count += 1
        yield where, rec
    if count == 0:
        raise DataError("input file has no records", path)


_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")     # a \uD800-\uDFFF escape in the raw JSON


def _lone_surrogate(value: Any, where: str = "") -> str | None:
    """Where (a field path) a string of a parsed record holds a lone UTF-16 surrogate, or None. JSON lets a
    file spell one ("\\ud800"); it is no Unicode character and no tokenizer can encode it."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as e:
            return f"{where or 'the record'}: a lone surrogate \\u{ord(value[e.start]):04x} at character {e.start + 1}"
        return None
    if isinstance(value, dict):
        items = value.items()
    elif isinstance(value, list):
        items = ((f"[{i}]", v) for i, v in enumerate(value))
    else:
        return None
    for k, v in items:
        found = _lone_surrogate(v, f"{where}{k}" if k.startswith("[") else f"{where}.{k}" if where else k)
        if found:
            return found
    return None


def _checked(rec: Any, raw: bytes, path: str, where: str) -> Any:
    """The record, or a RecordError when it holds a lone surrogate (only looked for where the raw text has a
    surrogate escape: the common record costs one regex scan)."""
    if _SURROGATE_ESCAPE.search(raw):
        found = _lone_surrogate(rec, "")
        if found:
            return RecordError(f"{found} (not valid Unicode: a \\uD800-\\uDFFF escape without its pair)", path, where)
    return rec


def _iter_jsonl(path: str):
    """One record per line. A UTF-8 byte-order mark (at the start of the file, or of a line where files were
    concatenated), CRLF/CR line ends and blank lines are accepted; line numbers count every line."""
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            where = f"line {lineno}"
            if raw.startswith(b"\xef\xbb\xbf"):
                raw = raw[3:]
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                yield where, RecordError(f"not valid UTF-8 (byte 0x{raw[e.start]:02x} at column {e.start + 1})",
                                         path, where)
                continue
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                yield where, RecordError(f"invalid JSON: {e.msg} (column {e.colno})", path, where)
                continue
            yield where, _checked(rec, raw, path, where)


# a JSON array is parsed record by record from a window of its text: JSON_WINDOW_CHARS read at a time
JSON_WINDOW_CHARS = 1 << 20


def _iter_json_array(path: str):
    """The records of a JSON array file, parsed one at a time from a sliding window of the text: memory is
    the largest record plus a read block, not the file. A syntax or UTF-8 error is a DataError naming the
    line (records before it have been yielded: the packer's output is untouched); finding it may read the
    rest of the file. A file that is not an array is read whole, for the message."""
    with open(path, "rb") as f:
        window = _JsonWindow(path, f)
        if not window.skip_ws() or window.buf[window.pos] != "[":
            yield from _iter_json_document(path)
            return
        window.pos += 1
        i = 0
        while True:
            if not window.skip_ws():
                window.fail("Expecting value" if i == 0 else "Expecting ',' delimiter")
            ch = window.buf[window.pos]
            if ch == "]":
                window.pos += 1
                if window.skip_ws():
                    window.fail("Extra data")
                return
            if i:
                if ch != ",":
                    window.fail("Expecting ',' delimiter")
                window.pos += 1
                if not window.skip_ws():
                    window.fail("Expecting value")
            start = window.pos
            rec = window.decode()
            i += 1
            raw = window.buf[start:window.pos].encode("utf-8", "surrogatepass")
            yield f"record {i}", _checked(rec, raw, path, f"record {i}")
            window.trim()


class _JsonWindow:
    """The undecoded rest of a JSON text: `buf[pos:]`, refilled JSON_WINDOW_CHARS at a time; tracks the line
    and column of buf[0] so that errors name the file's line."""

    def __init__(self, path: str, f):
        import codecs
        self.path, self.f = path, f
        self.utf8 = codecs.getincrementaldecoder("utf-8-sig")()
        self.buf, self.pos, self.eof = "", 0, False
        self.line0, self.col0 = 1, 0          # buf[0] is at line line0, after col0 characters of that line
        self.raw_newlines = 0                  # newlines in the bytes read so far (for a UTF-8 error's line)
        self.decoder = json.JSONDecoder()

    def read(self) -> bool:
        """Append the next block to buf; False at the end of the file."""
        if self.eof:
            return False
        raw = self.f.read(JSON_WINDOW_CHARS)
        final = not raw
        try:
            text = self.utf8.decode(raw, final=final)
        except UnicodeDecodeError as e:
            line = self.raw_newlines + e.object[:e.start].count(b"\n") + 1
            raise DataError(f"not valid UTF-8 (byte 0x{e.object[e.start]:02x})", self.path, f"line {line}") from None
        self.raw_newlines += raw.count(b"\n")
        self.buf += text
        self.eof = final
        return bool(text) or not final

    def skip_ws(self) -> bool:
        """Move pos past whitespace; False when the text ends there."""
        while True:
            n = len(self.buf)
            while self.pos < n and self.buf[self.pos] in " \t\n\r":
                self.pos += 1
            if self.pos < n:
                return True
            if not self.read():
                return False

    def decode(self):
        """The JSON value at pos (reading more while it is cut by the window's end); pos moves past it."""
        while True:
            try:
                value, self.pos = self.decoder.raw_decode(self.buf, self.pos)
                return value
            except json.JSONDecodeError as e:
                if not self.read():
                    self.fail(e.msg, e.pos)

    def trim(self) -> None:
        """Drop the parsed text before pos, keeping the line/column bookkeeping."""
        if self.pos < JSON_WINDOW_CHARS:
            return
        done = self.buf[:self.pos]
        newlines = done.count("\n")
        if newlines:
            self.line0 += newlines
            self.col0 = len(done) - done.rfind("\n") - 1
        else:
            self.col0 += len(done)
        self.buf, self.pos = self.buf[self.pos:], 0

    def fail(self, msg: str, pos: int | None = None):
        pos = self.pos if pos is None else pos
        before = self.buf[:pos]
        newlines = before.count("\n")
        col = (pos - before.rfind("\n") if newlines else self.col0 + pos + 1)
        raise DataError(f"invalid JSON: {msg} (column {col})", self.path, f"line {self.line0 + newlines}")


def _iter_json_document(path: str):
    """A .json file that is not an array (or is empty): read whole, for json's own message."""
    with open(path, "rb") as f:
        raw = f.read()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = raw[:e.start].count(b"\n") + 1
        raise DataError(f"not valid UTF-8 (byte 0x{raw[e.start]:02x})", path, f"line {line}") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(f"invalid JSON: {e.msg} (column {e.colno})", path, f"line {e.lineno}") from None
    if not isinstance(data, list):
        raise DataError(f"a .json input must hold an array of records, got {type(data).__name__}", path)
    escapes = raw if _SURROGATE_ESCAPE.search(raw) else b""
    for i, rec in enumerate(data, 1):
        yield f"record {i}", _checked(rec, escapes, path, f"record {i}")


def _iter_parquet(path: str):
    import pyarrow.parquet as pq
    try:
        pf = pq.ParquetFile(path)
    except Exception as e:  # pyarrow raises several types for a broken file
        raise DataError(f"cannot read parquet: {e}", path) from None
    i = 0
    for batch in pf.iter_batches(batch_size=4096):
        for rec in batch.to_pylist():
            i += 1
            yield f"record {i}", drop_nulls(rec)


def drop_nulls(value: Any) -> Any:
    """Parquet and Arrow have no "absent": every struct has the union of its rows' fields, a missing one as
    null. Records from them treat a null field as an absent one, at every depth."""
    if isinstance(value, dict):
        return {k: drop_nulls(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [drop_nulls(v) for v in value]
    return value


# ---------------------------------------------------------------------------------------------- records
PREFERENCE_HINT = "'chosen' and 'rejected': preference data; pack it with --task preference"


def detect_format(record: Any) -> str:
    if isinstance(record, dict):
        if "chosen" in record and "rejected" in record:
            raise DataError(f"the first record has {PREFERENCE_HINT}")
        if "messages" in record:
            return "messages"
        if "conversations" in record:
            return "sharegpt"
        if "instruction" in record and "output" in record:
            return "alpaca"
        if "prompt" in record and "response" in record:
            return "prompt_response"
        keys = ", ".join(sorted(record)[:8])
    else:
        keys = type(record).__name__
    raise DataError(f"cannot detect the format from the first record (keys: {keys}); known formats: "
                    f"{', '.join(FORMATS)}")


def describe_format(record: Any, fmt: str) -> str:
    """'sharegpt (tool calls, tool results, tools)': the format and what its first record carries."""
    try:
        features = normalize_record(record, fmt).features()
    except DataError:
        features = []
    return f"{fmt} ({', '.join(features)})" if features else fmt


def _weight(value: Any, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise RecordError(f"{what} must be a number, got {type(value).__name__}")
    value = float(value)
    if not math.isfinite(value) or value < 0:
        raise RecordError(f"{what} must be a finite number >= 0, got {value}")
    return value


def _string(record: dict, key: str, *, required: bool = True, nonempty: bool = False) -> str | None:
    if key not in record or record[key] is None:
        if required:
            raise RecordError(f"missing field '{key}'" if key not in record else f"field '{key}' is null")
        return None
    value = record[key]
    if not isinstance(value, str):
        raise RecordError(f"field '{key}' must be a string, got {type(value).__name__}")
    if nonempty and not value.strip():
        raise RecordError(f"field '{key}' is empty")
    return value


def _json_value(value: Any, what: str, verb: str = "is") -> Any:
    """A JSON value given as itself or as a JSON string (tools, arguments, ShareGPT function calls)."""
    if isinstance(value, str):
        try:
            return json.loads(value)
        except json.JSONDecodeError as e:
            raise RecordError(f"{what} {verb} not valid JSON: {e.msg} (column {e.colno})") from None
    return value


def _tool_call(obj: Any, what: str) -> ToolCall:
    """{name, arguments} / {id?, type: function, function: {name, arguments}} / {type: tool_use, name, input}."""
    if not isinstance(obj, dict):
        raise RecordError(f"{what}: a tool call must be an object, got {type(obj).__name__}")
    fn = obj.get("function") if isinstance(obj.get("function"), dict) else obj
    name = fn.get("name")
    if not isinstance(name, str) or not name.strip():
        raise RecordError(f"{what}: tool call without a 'name'")
    args = None
    for key in ("arguments", "parameters", "input"):
        if fn.get(key) is not None:
            args = fn[key]
            break
    args = {} if args is None else _json_value(args, f"{what}: arguments of tool call '{name}'", "are")
    call_id = obj.get("id")
    return ToolCall(name, args, call_id if isinstance(call_id, str) else None)


def _tools(value: Any) -> tuple | None:
    """Tool schemas → a tuple of OpenAI-style dicts ({type: function, function: {name, ...}}), or None."""
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    value = _json_value(value, "field 'tools'")
    if isinstance(value, dict):
        value = [value]
    if not isinstance(value, list):
        raise RecordError(f"field 'tools' must be a list of tool schemas, got {type(value).__name__}")
    out = []
    for i, tool in enumerate(value, 1):
        if not isinstance(tool, dict):
            raise RecordError(f"tools[{i}] must be an object, got {type(tool).__name__}")
        fn = tool.get("function")
        if isinstance(fn, dict):
            if not isinstance(fn.get("name"), str):
                raise RecordError(f"tools[{i}]: 'function' without a 'name'")
            out.append(tool)
        elif isinstance(tool.get("name"), str):
            out.append({"type": "function", "function": tool})
        else:
            raise RecordError(f"tools[{i}]: a tool schema needs a 'name' (or a 'function' with one)")
    return tuple(out) or None


def _part_value(part: dict, keys: tuple) -> Any:
    """The payload of a content part: the first of `keys` present, else LLaMA-Factory v1's 'value'."""
    for k in keys + ("value",):
        if part.get(k) is not None:
            return part[k]
    return None


def _call_part(part: dict, what: str) -> ToolCall:
    """A tool-call part: the call's fields on the part itself ({type, name, arguments|parameters|input}, OpenAI's
    {type, function: {...}}) or, as LLaMA-Factory v1 writes it, in 'value' (an object or a JSON string)."""
    if "name" not in part and "function" not in part and part.get("value") is not None:
        value = _json_value(part["value"], f"{what}: the value of a {part.get('type')!r} part")
        return _tool_call(value, what)
    return _tool_call(part, what)


def _content(value: Any, what: str, role: str = "user") -> tuple[str, str | None, list]:
    """Message content → (text, reasoning or None, tool calls).

    A string, or a list of parts: text ({type: text, text|value}), reasoning ({type: reasoning|thinking,
    text|thinking|reasoning|value}) and tool calls ({type: tool_call|function_call|tool_use, name + arguments|
    parameters|input, or value: that object or its JSON string}). Reasoning parts come first; text and calls
    may alternate (several calls, text between them): the texts are joined in order — a blank line where a call
    stood between them — and the templates render reasoning, then the text, then the calls (the layout of
    OpenAI-style messages and of Qwen's template). Reasoning and calls only in assistant messages; a tool result
    may also be a JSON object (kept as its JSON text)."""
    if value is None:
        return "", None, []
    if isinstance(value, str):
        return value, None, []
    if isinstance(value, dict) and role == "tool":
        return json.dumps(value, ensure_ascii=False), None, []
    if not isinstance(value, list):
        raise RecordError(f"{what}: content must be a string or a list of parts, got {type(value).__name__}")
    texts, reasoning, calls = [], [], []
    seen_answer = False                         # a text or call part seen: reasoning must come before
    call_since_text = False                     # a call between the previous text part and this one
    for part in value:
        kind = part.get("type", "text") if isinstance(part, dict) else None
        if isinstance(part, str) or kind == "text":
            text = part if isinstance(part, str) else _part_value(part, ("text",))
            if not isinstance(text, str):
                raise RecordError(f"{what}: text part without a string 'text'/'value'")
            if call_since_text and texts:
                texts.append("\n\n")
            texts.append(text)
            seen_answer, call_since_text = True, False
        elif kind in _REASONING_PARTS or kind in _CALL_PARTS:
            if role != "assistant":
                raise RecordError(f"{what}: a {kind!r} part is only allowed in an assistant message")
            if kind in _CALL_PARTS:
                calls.append(_call_part(part, what))
                seen_answer, call_since_text = True, True
                continue
            if seen_answer:
                raise RecordError(f"{what}: a reasoning part after a text or tool_call part; the templates render "
                                  f"the reasoning first")
            text = _part_value(part, ("text", "thinking", "reasoning", "content"))
            if not isinstance(text, str):
                raise RecordError(f"{what}: {kind} part without a string 'text'/'thinking'/'reasoning'/'value'")
            reasoning.append(text)
        else:
            shown = kind if isinstance(part, dict) else type(part).__name__
            raise RecordError(f"{what}: unsupported content part {shown!r} (text, reasoning/thinking and "
                              f"tool_call parts only)")
    return "".join(texts), ("".join(reasoning) if reasoning else None), calls


def _split_think(text: str, what: str) -> tuple[str | None, str]:
    """A leading <think>…</think> block → (reasoning, rest); (None, text) when there is none."""
    stripped = text.lstrip()
    if not stripped.startswith(THINK_OPEN):
        return None, text
    close = stripped.find(THINK_CLOSE)
    if close < 0:
        raise RecordError(f"{what}: {THINK_OPEN} at the start of the message is never closed by {THINK_CLOSE}")
    return stripped[len(THINK_OPEN):close].strip(), stripped[close + len(THINK_CLOSE):].lstrip()


def _assistant_extras(turn: dict, what: str, text: str, reasoning: str | None, calls: list):
    """Reasoning and tool calls given beside the content (fields, a <think> block)."""
    for key in _REASONING_FIELDS:
        value = turn.get(key)
        if value is None:
            continue
        if not isinstance(value, str):
            raise RecordError(f"{what}: '{key}' must be a string, got {type(value).__name__}")
        if reasoning is not None:
            raise RecordError(f"{what}: the reasoning is given twice ('{key}' and another field or part)")
        reasoning = value
    think, rest = _split_think(text, what)
    if think is not None:
        if reasoning is not None:
            raise RecordError(f"{what}: the reasoning is given twice (a <think> block and a field or part)")
        reasoning, text = think, rest
    extra = []
    if turn.get("tool_calls") is not None:
        if not isinstance(turn["tool_calls"], list):
            raise RecordError(f"{what}: 'tool_calls' must be a list, got {type(turn['tool_calls']).__name__}")
        extra = [_tool_call(c, f"{what}.tool_calls[{j}]") for j, c in enumerate(turn["tool_calls"], 1)]
    if turn.get("function_call") is not None:
        extra.append(_tool_call(turn["function_call"], f"{what}.function_call"))
    if extra and calls:
        raise RecordError(f"{what}: tool calls given both as content parts and as 'tool_calls'")
    return text, reasoning, tuple(calls or extra)


def _turns(record: dict, key: str, role_key: str, text_key: str) -> list[Message]:
    turns = record.get(key)
    if not isinstance(turns, list):
        raise RecordError(f"missing field '{key}'" if turns is None else
                          f"field '{key}' must be a list, got {type(turns).__name__}")
    if not turns:
        raise RecordError(f"field '{key}' is empty")
    out = []
    for i, turn in enumerate(turns, 1):
        what = f"{key}[{i}]"
        if not isinstance(turn, dict):
            raise RecordError(f"{what} must be an object, got {type(turn).__name__}")
        raw_role = turn.get(role_key)
        if not isinstance(raw_role, str):
            raise RecordError(f"{what}: missing or non-string '{role_key}'")
        role = _ROLE_ALIASES.get(raw_role.strip().lower())
        if role is None:
            raise RecordError(f"{what}: unknown role {raw_role!r}; known roles: {', '.join(sorted(_ROLE_ALIASES))}")
        if text_key not in turn and not (role == "assistant" and (turn.get("tool_calls") or turn.get("function_call"))):
            raise RecordError(f"{what}: missing field '{text_key}'")
        if raw_role.strip().lower() in _CALL_ROLES:
            # ShareGPT tool data: the turn's text is the call (or a list of calls) as JSON
            value = _json_value(turn.get(text_key), f"{what}: {raw_role} value")
            value = value if isinstance(value, list) else [value]
            if not value:
                raise RecordError(f"{what}: {raw_role} without a call")
            text, reasoning = "", None
            calls = tuple(_tool_call(c, what) for c in value)
        else:
            text, reasoning, calls = _content(turn.get(text_key), what, role)
            if role == "assistant":
                text, reasoning, calls = _assistant_extras(turn, what, text, reasoning, calls)
            else:
                calls = ()
        weight = None
        for wkey in ("weight", "loss_weight"):
            if turn.get(wkey) is not None:
                weight = _weight(turn[wkey], f"{what}.{wkey}")
        name = turn.get("name") if role == "tool" and isinstance(turn.get("name"), str) else None
        call_id = turn.get("tool_call_id") if role == "tool" and isinstance(turn.get("tool_call_id"), str) else None
        out.append(Message(role, text, weight, reasoning=reasoning, tool_calls=tuple(calls), name=name,
                           tool_call_id=call_id))
    return out


def normalize_record(record: Any, fmt: str, *, last_turn_only: bool = False,
                     system: str | None = None) -> Conversation:
    """One raw record → Conversation. Raises RecordError (without file/record: the caller adds them)."""
    if fmt not in FORMATS:
        raise DataError(f"unknown format {fmt!r}; known formats: {', '.join(FORMATS)}")
    if not isinstance(record, dict):
        raise RecordError(f"a record must be a JSON object, got {type(record).__name__}")
    if "chosen" in record and "rejected" in record:
        raise RecordError(f"the record has {PREFERENCE_HINT}")
    tools = None
    if fmt == "alpaca":
        instruction = _string(record, "instruction")
        inp = _string(record, "input", required=False) or None
        output = _string(record, "output")
        msgs = [Message("user", instruction, None, inp), Message("assistant", output)]
        sys_text = _string(record, "system", required=False)
    elif fmt == "prompt_response":
        msgs = [Message("user", _string(record, "prompt")), Message("assistant", _string(record, "response"))]
        sys_text = _string(record, "system", required=False)
    elif fmt == "messages":
        msgs = _turns(record, "messages", "role", "content")
        sys_text = None
        tools = _tools(record.get("tools"))
    else:
        msgs = _turns(record, "conversations", "from", "value")
        sys_text = _string(record, "system", required=False)
        tools = _tools(record.get("tools"))
    if sys_text:
        if msgs[0].role == "system":
            raise RecordError("both a 'system' field and a system message")
        msgs.insert(0, Message("system", sys_text))
    elif system and msgs[0].role != "system":
        msgs.insert(0, Message("system", system))
    _check_turns(msgs)
    if last_turn_only:
        last = max(i for i, m in enumerate(msgs) if m.role == "assistant")
        msgs = [m._replace(as_prompt=True) if m.role == "assistant" and i != last else m for i, m in enumerate(msgs)]
    weight = _weight(record["weight"], "weight") if record.get("weight") is not None else None
    return Conversation(msgs, weight, tools)


def _check_turns(msgs: list[Message]) -> None:
    for i, m in enumerate(msgs):
        if m.role == "system" and i != 0:
            raise RecordError(f"message {i + 1}: a system message is only allowed first")
        if m.role == "assistant" and not m.text.strip() and not m.tool_calls:
            raise RecordError(f"message {i + 1}: empty response" +
                              (" (reasoning without an answer or a tool call)" if m.reasoning else ""))
        if m.role == "user" and not m.full_text().strip():
            raise RecordError(f"message {i + 1}: empty prompt")
        if m.role == "tool":
            prev = next((p for p in reversed(msgs[:i]) if p.role != "tool"), None)
            if prev is None or prev.role != "assistant" or not prev.tool_calls:
                raise RecordError(f"message {i + 1}: a tool result must follow an assistant message with tool calls")
    if msgs[-1].role != "assistant":
        raise RecordError("the last message must be an assistant response")


class SourceRecord(NamedTuple):
    file: str
    where: str
    record: Any          # the raw dict, or a RecordError for an unparseable line


def records_with_format(name: str, raw: Iterator[tuple[str, Any]], fmt: str = "auto", *,
                        formats: tuple = FORMATS, detect=None):
    """(format, iterator of SourceRecord) over (where, record) pairs of one source named `name`.

    Detection (fmt='auto') reads the first record that parses; the iterator still yields every record.
    `formats`/`detect`: another task's formats and detector (preference data: witscale/data/preference.py)."""
    detect = detect or detect_format
    if fmt != "auto" and fmt not in formats:
        raise DataError(f"unknown format {fmt!r}; known formats: auto, {', '.join(formats)}")
    it = iter(raw)
    head: list[tuple[str, Any]] = []
    if fmt == "auto":
        for where, rec in it:
            head.append((where, rec))
            if not isinstance(rec, RecordError):
                try:
                    fmt = detect(rec)
                except DataError as e:
                    raise e.located(name, where) from None
                break
        else:
            raise DataError("no record could be parsed to detect the format", name)

    def gen():
        for where, rec in head:
            yield SourceRecord(name, where, rec)
        for where, rec in it:
            yield SourceRecord(name, where, rec)
    return fmt, gen()


def read_records(path: str, fmt: str = "auto", *, formats: tuple = FORMATS,
                 detect=None) -> tuple[str, Iterator[SourceRecord]]:
    """Detect (fmt='auto') or check the format of a file; return (format, iterator of SourceRecord)."""
    if fmt != "auto" and fmt not in formats:
        raise DataError(f"unknown format {fmt!r}; known formats: auto, {', '.join(formats)}")
    return records_with_format(path, iter_raw_records(path), fmt, formats=formats, detect=detect)
