"""User data files: the CSV / JSONL schema (the columns say the kind of data), read and checked
row by row; a malformed file raises DataError naming the file and line."""

from __future__ import annotations

import csv
import ctypes
import io
import json
import math
import re
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from ..core.errors import ConfigError, DataError

Row = dict[str, Any]

# Column sets a user file may have, checked in this order; extra columns are ignored. A
# "messages" file (JSONL only) holds chat conversations: its rows are chat data too.
_SCHEMAS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("regression", ("text", "text_pair", "label")),
    ("classification", ("text", "label")),
    ("chat", ("prompt", "response")),
    ("messages", ("messages",)),
    ("lm", ("text",)),
)
_SCHEMA_HELP = "; ".join(f"{','.join(cols)} ({kind})" for kind, cols in _SCHEMAS)
ROLES = ("system", "user", "assistant")     # the turns a messages conversation may hold

# csv refuses a field over 131,072 characters (its guard against a runaway quote), yet a long
# document in one cell is valid data. The limit is one setting of the whole process: it is raised
# only while peftlab reads a CSV file and restored after, so other code keeps its own limit; the
# lock keeps two reading threads from restoring it under each other. csv stores it in a C long
# (32 bits on Windows, where sys.maxsize would overflow it).
_CSV_FIELD_LIMIT = 2 ** (8 * ctypes.sizeof(ctypes.c_long) - 1) - 1
_CSV_LIMIT_LOCK = threading.Lock()


@contextmanager
def long_csv_fields() -> Iterator[None]:
    """Inside the block csv reads fields of any length; its previous limit is restored after."""
    with _CSV_LIMIT_LOCK:
        previous = csv.field_size_limit(_CSV_FIELD_LIMIT)
        try:
            yield
        finally:
            csv.field_size_limit(previous)


def _decode(path: Path) -> str:
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise DataError(f"{path}: cannot read the file ({e.strerror or e})") from e
    if raw.startswith(b"\xef\xbb\xbf"):  # a BOM, as Excel writes
        raw = raw[3:]
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        column = e.start - (raw.rfind(b"\n", 0, e.start) + 1) + 1
        raise DataError(f"{path}:{line}: not UTF-8 text (byte 0x{raw[e.start]:02x} at column "
                        f"{column}); save the file as UTF-8") from e
    if not text.strip():
        raise DataError(f"{path}:1: the file is empty")
    return text


def _schema(path: Path, line: int, columns: Sequence[str]) -> tuple[str, tuple[str, ...]]:
    found = set(columns)
    for kind, needed in _SCHEMAS:
        if found.issuperset(needed):
            return kind, needed
    raise DataError(f"{path}:{line}: missing columns: found {sorted(found) or 'none'}, needs one "
                    f"of: {_SCHEMA_HELP}")


def _read_csv(path: Path, text: str) -> tuple[str, list[tuple[int, dict[str, Any]]]]:
    reader = csv.reader(io.StringIO(text, newline=""))
    records: list[tuple[int, dict[str, Any]]] = []
    header: list[str] | None = None
    kind = ""
    start = 1
    with long_csv_fields():
        try:
            for row in reader:
                line, start = start, reader.line_num + 1  # first physical line of this record
                if not row or not any(cell.strip() for cell in row):
                    continue  # blank lines
                if header is None:
                    header = [c.strip().lower() for c in row]
                    duplicated = sorted({c for c in header if header.count(c) > 1})
                    if duplicated:
                        raise DataError(f"{path}:{line}: duplicated columns {duplicated}")
                    kind, _ = _schema(path, line, header)
                    continue
                if len(row) != len(header):
                    raise DataError(f"{path}:{line}: {len(row)} fields, but the header has "
                                    f"{len(header)} ({','.join(header)})")
                records.append((line, dict(zip(header, row, strict=True))))
        except csv.Error as e:
            raise DataError(f"{path}:{reader.line_num}: not valid CSV ({e})") from e
    return kind, records


def _read_jsonl(path: Path, text: str) -> tuple[str, list[tuple[int, dict[str, Any]]]]:
    records: list[tuple[int, dict[str, Any]]] = []
    kind = ""
    # split("\n"), not splitlines(): JSON strings may hold U+2028 and friends, and line numbers
    # must match what an editor shows.
    for line, raw in enumerate(text.split("\n"), 1):
        if not raw.strip():
            continue
        try:
            obj = json.loads(raw)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{line}: not valid JSON ({e.msg} at column {e.colno})") from e
        if not isinstance(obj, dict):
            raise DataError(f"{path}:{line}: expected a JSON object, got {type(obj).__name__}")
        obj = {str(k).strip().lower(): v for k, v in obj.items()}
        if not records:
            kind, _ = _schema(path, line, list(obj))
        records.append((line, obj))
    return kind, records


def _text(path: Path, line: int, record: dict[str, Any], column: str) -> str:
    if column not in record:
        raise DataError(f"{path}:{line}: no {column!r} (found {sorted(record)})")
    value = record[column]
    if not isinstance(value, str):
        raise DataError(f"{path}:{line}: {column!r} must be a string, got {type(value).__name__}")
    if not value.strip():
        raise DataError(f"{path}:{line}: empty {column!r}")
    return value


def _label_key(value: str) -> tuple[int, float, str]:
    # Integer labels sort numerically ('2' before '10'), everything else as text.
    return (0, int(value), "") if re.fullmatch(r"[+-]?\d+", value) else (1, 0.0, value)


def read_user_file(path: Path, labels: Sequence[str] | None = None
                   ) -> tuple[str, list[Row], list[str] | None]:
    """(kind, rows, label names) of a ``.csv`` or ``.jsonl`` file whose columns say the kind:
    ``text,label`` (classification: labels become indices into the label names, the sorted
    unique labels of the file, integers in numeric order, or `labels` if given),
    ``text,text_pair,label`` (regression, numeric labels), ``prompt,response`` (chat),
    ``messages`` (JSONL only: one conversation per line, ``[{"role": "system" | "user" |
    "assistant", "content": str}, ...]`` with at least one assistant turn; chat data, kind
    "chat") or ``text`` (lm). Extra columns are ignored."""
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    text = _decode(path)
    suffix = path.suffix.lower()
    kind, records = (_read_csv if suffix == ".csv" else _read_jsonl)(path, text)
    if not records:
        raise DataError(f"{path}:1: no data rows")
    if kind == "messages":
        if suffix == ".csv":
            raise DataError(f"{path}:1: a 'messages' column holds conversations, which a CSV cell "
                            "cannot; write one JSON object per line to a .jsonl file")
        rows = [{"messages": check_messages(record.get("messages"), f"{path}:{line}")}
                for line, record in records]
        _no_labels(path, "chat", labels)
        return "chat", rows, None
    rows: list[Row] = []
    raw_labels: list[tuple[int, str]] = []
    for line, record in records:
        if kind == "chat":
            rows.append({"prompt": _text(path, line, record, "prompt"),
                         "response": _text(path, line, record, "response")})
            continue
        row: Row = {"text": _text(path, line, record, "text")}
        if kind == "regression":
            row["text_pair"] = _text(path, line, record, "text_pair")
            value = record.get("label")
            try:
                if isinstance(value, bool) or value is None:
                    raise ValueError
                number = float(value)
                if not math.isfinite(number):
                    raise ValueError
            except (TypeError, ValueError):
                raise DataError(f"{path}:{line}: label {value!r} is not a finite number (a file "
                                "with a text_pair column holds regression scores)") from None
            row["label"] = number
        elif kind == "classification":
            value = record.get("label")
            if isinstance(value, bool) or not isinstance(value, (str, int)):
                raise DataError(f"{path}:{line}: label {value!r} must be a string or an integer")
            value = str(value).strip()
            if not value:
                raise DataError(f"{path}:{line}: empty 'label'")
            raw_labels.append((line, value))
        rows.append(row)
    label_names: list[str] | None = None
    if kind == "classification":
        if labels is not None:
            label_names = [str(x) for x in labels]
            allowed = set(label_names)
            for line, value in raw_labels:
                if value not in allowed:
                    raise DataError(f"{path}:{line}: label {value!r} is not one of the labels "
                                    f"{label_names}")
        else:
            label_names = sorted({v for _, v in raw_labels}, key=_label_key)
            if len(label_names) < 2:
                raise DataError(f"{path}:{raw_labels[0][0]}: every row has the label "
                                f"{label_names[0]!r}; classification needs at least two")
        index = {name: i for i, name in enumerate(label_names)}
        for row, (_, value) in zip(rows, raw_labels, strict=True):
            row["label"] = index[value]
    else:
        _no_labels(path, kind, labels)
    return kind, rows, label_names


def _no_labels(path: Path, kind: str, labels: Sequence[str] | None) -> None:
    if labels is not None:
        raise ConfigError(f"labels= applies to classification files; {path} is {kind} data")


def check_messages(value: Any, where: str) -> list[dict[str, str]]:
    """A `messages` field as a list of {"role", "content"} dicts (other keys dropped), or a
    DataError starting with `where` (file:line) naming the problem: not a list, a turn without
    a role or content, an unknown role, empty content, no assistant turn."""
    if not isinstance(value, list) or not value:
        got = "an empty list" if value == [] else type(value).__name__
        raise DataError(f"{where}: 'messages' must be a non-empty list of {{\"role\", \"content\"}} "
                        f"objects, got {got}")
    turns = []
    for i, turn in enumerate(value):
        if not isinstance(turn, dict):
            raise DataError(f"{where}: messages[{i}] must be an object with 'role' and 'content', "
                            f"got {type(turn).__name__}")
        missing = [k for k in ("role", "content") if k not in turn]
        if missing:
            raise DataError(f"{where}: messages[{i}] has no {' or '.join(map(repr, missing))} "
                            f"(found {sorted(turn)})")
        role, content = turn["role"], turn["content"]
        if role not in ROLES:
            raise DataError(f"{where}: messages[{i}] has the role {role!r}; use one of {', '.join(ROLES)}")
        if not isinstance(content, str) or not content.strip():
            raise DataError(f"{where}: messages[{i}] ({role}) needs a non-empty string 'content', "
                            f"got {content!r:.40}")
        turns.append({"role": role, "content": content})
    if not any(t["role"] == "assistant" for t in turns):
        raise DataError(f"{where}: the conversation has no assistant turn, so nothing to learn; "
                        "add the assistant's answer")
    return turns
