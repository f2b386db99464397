"""Raw records → normalized conversations.

Formats (one per file, given or detected from the first record):
  alpaca           {instruction, input?, output, system?}
  prompt_response  {prompt, response, system?}                          (the paper's format)
  messages         {messages: [{role, content, weight?|loss_weight?}]}  (content: str or [{type: text, text|value}])
  sharegpt         {conversations: [{from, value, weight?|loss_weight?}]}
Every format accepts an optional per-record multiplier ``weight``. Files: JSON array, JSONL, parquet.
A record becomes a :class:`Conversation`; errors are :class:`RecordError` naming the record.
"""
from __future__ import annotations

import json
import math
import os
from typing import Any, Iterator, NamedTuple

from witscale.data.errors import DataError, RecordError

FORMATS = ("alpaca", "prompt_response", "messages", "sharegpt")
ROLES = ("system", "user", "assistant")
_ROLE_ALIASES = {"system": "system", "user": "user", "human": "user", "assistant": "assistant", "gpt": "assistant",
                 "model": "assistant"}


class Message(NamedTuple):
    role: str                    # 'system' | 'user' | 'assistant'
    text: str
    weight: float | None = None  # per-message weight from the data (None: absent)
    input: str | None = None     # alpaca's separate `input`; templates other than alpaca append it to text
    as_prompt: bool = False      # an assistant turn demoted to prompt-side (--last-turn-only)

    def full_text(self) -> str:
        return self.text + "\n\n" + self.input if self.input else self.text


class Conversation(NamedTuple):
    messages: list[Message]
    weight: float | None = None  # per-record multiplier (None: absent)

    @property
    def has_weights(self) -> bool:
        return self.weight is not None or any(m.weight is not None for m in self.messages)


# ---------------------------------------------------------------------------------------------- files
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

    File-level problems (missing, empty, not an array, non-UTF-8 JSON array) raise DataError."""
    if not os.path.isfile(path):
        raise DataError("no such file", path)
    if os.path.getsize(path) == 0:
        raise DataError("input file is empty (no records)", path)
    kind = file_kind(path)
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


def _iter_jsonl(path: str):
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            where = f"line {lineno}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                yield where, RecordError(f"not valid UTF-8 (byte 0x{raw[e.start]:02x} at column {e.start + 1})",
                                         path, where)
                continue
            if not line.strip():
                continue
            try:
                yield where, json.loads(line)
            except json.JSONDecodeError as e:
                yield where, RecordError(f"invalid JSON: {e.msg} (column {e.colno})", path, where)


def _iter_json_array(path: str):
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
    for i, rec in enumerate(data, 1):
        yield f"record {i}", rec


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
            # parquet has no "absent": a null optional column means the field is not there
            yield f"record {i}", {k: v for k, v in rec.items() if v is not None}


# ---------------------------------------------------------------------------------------------- records
def detect_format(record: Any) -> str:
    if isinstance(record, dict):
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
            raise RecordError(f"missing field '{key}'")
        return None
    value = record[key]
    if not isinstance(value, str):
        raise RecordError(f"field '{key}' must be a string, got {type(value).__name__}")
    if nonempty and not value.strip():
        raise RecordError(f"field '{key}' is empty")
    return value


def _content(value: Any, what: str) -> str:
    """Message content: a string, or a list of text parts ({type: text, text|value})."""
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        parts = []
        for part in value:
            if isinstance(part, str):
                parts.append(part)
            elif isinstance(part, dict) and part.get("type", "text") == "text":
                text = part.get("text", part.get("value"))
                if not isinstance(text, str):
                    raise RecordError(f"{what}: text part without a string 'text'/'value'")
                parts.append(text)
            else:
                kind = part.get("type") if isinstance(part, dict) else type(part).__name__
                raise RecordError(f"{what}: unsupported content part {kind!r} (text only)")
        return "".join(parts)
    raise RecordError(f"{what}: content must be a string or a list of text parts, got {type(value).__name__}")


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
        if text_key not in turn:
            raise RecordError(f"{what}: missing field '{text_key}'")
        text = _content(turn[text_key], what)
        weight = None
        for wkey in ("weight", "loss_weight"):
            if turn.get(wkey) is not None:
                weight = _weight(turn[wkey], f"{what}.{wkey}")
        out.append(Message(role, text, weight))
    return out


def normalize_record(record: Any, fmt: str, *, last_turn_only: bool = False,
                     system: str | None = None) -> Conversation:
    """One raw record → Conversation. Raises RecordError (without file/record: the caller adds them)."""
    if fmt not in FORMATS:
        raise DataError(f"unknown format {fmt!r}; known formats: {', '.join(FORMATS)}")
    if not isinstance(record, dict):
        raise RecordError(f"a record must be a JSON object, got {type(record).__name__}")
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
    else:
        msgs = _turns(record, "conversations", "from", "value")
        sys_text = _string(record, "system", required=False)
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
    return Conversation(msgs, weight)


def _check_turns(msgs: list[Message]) -> None:
    for i, m in enumerate(msgs):
        if m.role == "system" and i != 0:
            raise RecordError(f"message {i + 1}: a system message is only allowed first")
        if m.role == "assistant" and not m.text.strip():
            raise RecordError(f"message {i + 1}: empty response")
        if m.role == "user" and not m.full_text().strip():
            raise RecordError(f"message {i + 1}: empty prompt")
    if msgs[-1].role != "assistant":
        raise RecordError("the last message must be an assistant response")


class SourceRecord(NamedTuple):
    file: str
    where: str
    record: Any          # the raw dict, or a RecordError for an unparseable line


def read_records(path: str, fmt: str = "auto") -> tuple[str, Iterator[SourceRecord]]:
    """Detect (fmt='auto') or check the format of a file; return (format, iterator of SourceRecord).

    Detection reads the first record that parses; the iterator still yields every record in order."""
    if fmt != "auto" and fmt not in FORMATS:
        raise DataError(f"unknown format {fmt!r}; known formats: auto, {', '.join(FORMATS)}")
    it = iter_raw_records(path)
    head: list[tuple[str, Any]] = []
    if fmt == "auto":
        for where, rec in it:
            head.append((where, rec))
            if not isinstance(rec, RecordError):
                try:
                    fmt = detect_format(rec)
                except DataError as e:
                    raise e.located(path, where) from None
                break
        else:
            raise DataError("no record could be parsed to detect the format", path)

    def gen():
        for where, rec in head:
            yield SourceRecord(path, where, rec)
        for where, rec in it:
            yield SourceRecord(path, where, rec)
    return fmt, gen()
