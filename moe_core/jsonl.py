"""JSONL text records — one {"text": ..., "id": ...} object per line — read lazily, for every command.

The file is read as bytes and split on b"\\n" only (a JSON string may hold a raw U+2028, which
str.splitlines() would split on), each line decoded on its own, so a bad byte is reported with its line
number and the file never has to fit in memory. Blank lines are skipped; a missing "id" becomes the 1-based
line number.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import MoeError

EXPECTED = 'expected one JSON object per line with a string "text" field (and an optional "id")'
_JSON_TYPES = {dict: "object", list: "array", str: "string", int: "number", float: "number", bool: "boolean"}

@dataclass
class Record:
    lineno: int
    id: Any  # the input's "id", else the line number
    text: str


def json_type(value: object) -> str:
    return "null" if value is None else _JSON_TYPES.get(type(value), type(value).__name__)


def read_records(path: str | os.PathLike) -> Iterator[Record]:
    """Records of a JSONL file, lazily; MoeError naming the file and line for anything malformed."""
    path = Path(path)
    if not path.exists():
        raise MoeError(f"{path}: input file not found")
    if not path.is_file():
        raise MoeError(f"{path}: not a file; {EXPECTED}")
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise MoeError(f"{path}:{lineno}: not valid UTF-8 (byte 0x{raw[e.start]:02x} at column "
                               f"{e.start + 1}); expected UTF-8 text") from None
            if lineno == 1:
                line = line.removeprefix("\ufeff")
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise MoeError(f"{path}:{lineno}: invalid JSON ({e.msg} at column {e.colno}); {EXPECTED}") from None
            if not isinstance(obj, dict):
                raise MoeError(f"{path}:{lineno}: got a JSON {json_type(obj)}; {EXPECTED}")
            if "text" not in obj:
                raise MoeError(f'{path}:{lineno}: missing "text" field; {EXPECTED}')
            if not isinstance(obj["text"], str):
                raise MoeError(f'{path}:{lineno}: "text" is a JSON {json_type(obj["text"])}; {EXPECTED}')
            yield Record(lineno, obj.get("id", lineno), obj["text"])
