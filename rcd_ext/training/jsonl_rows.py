"""Reading a prompt/response JSONL file, with one-line `file:line: what (fix)` errors.

A row is {"prompt": str, "response": str} or {"messages": [{"role", "content"}, ...]} whose last
message is the assistant's. Every problem of the file (bytes that are not UTF-8, a line that is
not JSON, a missing, empty or non-string field) raises `DataError` naming the file and the line,
so `rcd train` / `rcd demo` print it as one line before any model loads. Token-level checks
(rows longer than the model's context, tokens outside the vocabulary) are in
`rcd_ext.training.data` and `rcd_ext.training.vocabulary_report`.

This module imports only the standard library: the commands call it before torch loads.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["DataError", "TextRow", "read_json_lines", "read_text_rows", "row_fields"]

ROW_FORMAT = "expected keys 'prompt' and 'response' (strings) or 'messages'"


class DataError(ValueError):
    """A data file has a problem; the message is `file:line: what (fix)` on one line."""


@dataclass(frozen=True)
class TextRow:
    """One row: the conversation before the answer, the answer, and where it came from."""

    context: list[dict[str, str]]  # [{"role", "content"}], the prompt is one user message
    response: str
    where: str  # "file:line"

    @property
    def prompt(self) -> str:
        """The context's contents joined by newlines (what a tokenizer without a chat template
        reads)."""
        return "\n".join(message["content"] for message in self.context)


def _decode(raw: bytes, where: str) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as error:
        raise DataError(f"{where}: byte 0x{raw[error.start]:02x} at column {error.start + 1} is "
                        "not UTF-8 (save the file as UTF-8)") from None


def read_json_lines(path: str | Path) -> Iterator[tuple[str, Any]]:
    """(`file:line`, parsed JSON value) for every non-blank line of `path`."""
    with open(path, "rb") as handle:
        for number, raw in enumerate(handle, start=1):
            where = f"{path}:{number}"
            line = _decode(raw, where)
            if not line.strip():
                continue
            try:
                yield where, json.loads(line)
            except json.JSONDecodeError as error:
                raise DataError(f"{where}: not valid JSON ({error.msg} at column {error.colno};"
                                " each line must be one JSON object)") from None


def _kind(value: Any) -> str:
    names = {bool: "a boolean", int: "a number", float: "a number", list: "a list",
             dict: "an object", type(None): "null"}
    return names.get(type(value), type(value).__name__)


def _text_field(row: dict[str, Any], key: str, where: str) -> str:
    if key not in row:
        raise DataError(f"{where}: no {key!r} ({ROW_FORMAT}, got keys {sorted(row)})")
    value = row[key]
    if not isinstance(value, str):
        raise DataError(f"{where}: {key!r} is {_kind(value)}, expected a string (write it in "
                        f"quotes, e.g. \"{key}\": \"{value}\")")
    if not value.strip():
        raise DataError(f"{where}: {key!r} is empty (give its text, or drop the row)")
    return value


def _messages(row: dict[str, Any], where: str) -> tuple[list[dict[str, str]], str]:
    messages = row["messages"]
    ok = (isinstance(messages, list) and len(messages) >= 2
          and all(isinstance(m, dict) and isinstance(m.get("content"), str)
                  and isinstance(m.get("role"), str) for m in messages))
    if not ok:
        raise DataError(f"{where}: 'messages' must be a list of >= 2 "
                        "{'role': str, 'content': str} objects")
    if messages[-1]["role"] != "assistant":
        raise DataError(f"{where}: the last message must be the assistant's (the response),"
                        f" got role {messages[-1]['role']!r}")
    if not messages[-1]["content"].strip():
        raise DataError(f"{where}: the assistant's message is empty (give the answer text, or "
                        "drop the row)")
    return messages[:-1], messages[-1]["content"]


def row_fields(row: Any, where: str) -> TextRow:
    """Check one parsed JSON row and return it as a `TextRow` (DataError naming `where`)."""
    if not isinstance(row, dict):
        raise DataError(f"{where}: expected a JSON object ({ROW_FORMAT}), got {_kind(row)}")
    if "messages" in row:
        context, response = _messages(row, where)
        return TextRow(context=context, response=response, where=where)
    prompt = _text_field(row, "prompt", where)
    response = _text_field(row, "response", where)
    return TextRow(context=[{"role": "user", "content": prompt}], response=response,
                   where=where)


def read_text_rows(path: str | Path) -> list[TextRow]:
    """Every row of a JSONL file, checked; DataError for the first bad line or an empty file."""
    rows = [row_fields(row, where) for where, row in read_json_lines(path)]
    if not rows:
        raise DataError(f"{path}: no rows (expected one JSON object per line)")
    return rows
