"""Reading the user's text: whole UTF-8 text files, and JSONL text records — one {"text": ..., "id": ...} object
per line — read lazily, for every command.

A JSONL file is read as bytes and split on b"\\n" only (a JSON string may hold a raw U+2028, which
str.splitlines() would split on), one line of at most MAX_LINE_BYTES at a time, each line decoded on its own, so
a bad byte or an over-long line is reported with its line number and neither the file nor a huge line ever has
to fit in memory. Blank lines are skipped; a missing "id" becomes the 1-based line number. JSON is parsed
strictly: NaN / Infinity, numbers that overflow a float and unpaired UTF-16 surrogates (which could not be
tokenized or written back as UTF-8) are errors, not values.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import MoeError, os_reason

EXPECTED = 'expected one JSON object per line with a string "text" field (and an optional "id")'
MAX_LINE_BYTES = 16 * 2**20  # one JSONL record; a whole book is a few MB
_JSON_TYPES = {dict: "object", list: "array", str: "string", int: "number", float: "number", bool: "boolean"}


@dataclass
class Record:
    lineno: int
    id: Any  # the input's "id", else the line number
    text: str


def json_type(value: object) -> str:
    return "null" if value is None else _JSON_TYPES.get(type(value), type(value).__name__)


# -----------------------------------------------------------------------------
# text files


def decode_text(raw: bytes, where: str | os.PathLike, unit: str = "offset") -> str:
    """UTF-8 text of `raw` without a BOM; MoeError naming `where` for binary data or a byte that is not UTF-8."""
    # NUL never occurs in text but is valid UTF-8, so binary files must be caught before decoding.
    nul = raw.find(b"\0")
    if nul >= 0:
        raise MoeError(f"{where}: binary data (NUL byte at {unit} {nul + (unit == 'column')}); expected UTF-8 text")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise MoeError(f"{where}: not valid UTF-8 (byte 0x{raw[e.start]:02x} at {unit} "
                       f"{e.start + (unit == 'column')}); expected UTF-8 text") from None
    return text.removeprefix("\ufeff")  # a BOM left in would become a token at the start of the text


def read_text_file(path: str | os.PathLike, what: str = "text file", error: type[MoeError] = MoeError) -> str:
    """The whole UTF-8 text of a file; `error` naming the path when it is missing, unreadable or not text."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise error(f"{path}: {what} not found") from None
    except IsADirectoryError:
        raise error(f"{path}: is a directory; expected a {what}") from None
    except OSError as e:
        raise error(f"{path}: cannot read ({os_reason(e)})") from None
    try:
        return decode_text(raw, path)
    except MoeError as e:
        raise error(str(e)) from None


def read_lines(path: str | os.PathLike) -> Iterator[tuple[int, bytes]]:
    """(1-based line number, raw line without its b"\\n") of a file, lazily; a line over MAX_LINE_BYTES is an
    error naming the line, found after reading MAX_LINE_BYTES of it and no more."""
    path = Path(path)
    try:
        f = open(path, "rb")
    except OSError as e:
        raise MoeError(f"{path}: cannot read ({os_reason(e)})") from None
    with f:
        lineno = 0
        while True:
            try:
                raw = f.readline(MAX_LINE_BYTES + 1)
            except OSError as e:
                raise MoeError(f"{path}:{lineno + 1}: cannot read ({os_reason(e)})") from None
            if not raw:
                return
            lineno += 1
            if raw.endswith(b"\n"):
                raw = raw[:-1]
            elif len(raw) > MAX_LINE_BYTES:
                raise MoeError(f"{path}:{lineno}: line longer than {MAX_LINE_BYTES:,} bytes; expected at most "
                               f"{MAX_LINE_BYTES // 2**20} MiB per line")
            yield lineno, raw


# -----------------------------------------------------------------------------
# JSONL records


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON value")


def _finite_float(s: str) -> float:
    value = float(s)
    if value in (float("inf"), float("-inf")):
        raise ValueError(f"number {s[:20]}{'…' if len(s) > 20 else ''} is out of range")
    return value


def _short_int(s: str) -> int:
    if len(s) > 100:  # int() of a huge digit string is quadratic (and refused past 4300 digits)
        raise ValueError(f"integer of {len(s)} digits is out of range")
    return int(s)


def parse_json(text: str) -> Any:
    """json.loads, strictly: ValueError for NaN / Infinity, out-of-range numbers and nesting too deep."""
    try:
        return json.loads(text, parse_constant=_no_constant, parse_float=_finite_float, parse_int=_short_int)
    except RecursionError:
        raise ValueError("nested too deeply") from None


def json_error(e: ValueError) -> str:
    return f"{e.msg} at column {e.colno}" if isinstance(e, json.JSONDecodeError) else str(e)


def _unicode_ok(value: Any) -> bool:
    """Whether `value` can be written back as UTF-8 JSON (no unpaired surrogates from \\ud800-style escapes)."""
    try:
        json.dumps(value, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def read_objects(path: str | os.PathLike, expected: str = EXPECTED) -> Iterator[tuple[int, str, dict[str, Any]]]:
    """(line number, "path:line", object) of every non-blank line of a JSONL file, lazily; MoeError naming the file
    and line for a line that is not a JSON object (`expected`: what the caller wants, for the message)."""
    path = Path(path)
    if not path.exists():
        raise MoeError(f"{path}: input file not found")
    if not path.is_file():
        raise MoeError(f"{path}: not a file; {expected}")
    for lineno, raw in read_lines(path):
        where = f"{path}:{lineno}"
        line = decode_text(raw, where, unit="column")
        if not line.strip():
            continue
        try:
            obj = parse_json(line)
        except ValueError as e:
            raise MoeError(f"{where}: invalid JSON ({json_error(e)}); {expected}") from None
        if not isinstance(obj, dict):
            raise MoeError(f"{where}: got a JSON {json_type(obj)}; {expected}")
        yield lineno, where, obj


def _check_unicode(obj: dict[str, Any], key: str, where: str) -> None:
    if not _unicode_ok(obj.get(key)):
        raise MoeError(f'{where}: "{key}" holds an unpaired UTF-16 surrogate escape (\\ud800-\\udfff); '
                       "expected valid Unicode")


def string_field(obj: dict[str, Any], key: str, where: str, expected: str = EXPECTED) -> str:
    """obj[key] of a record read at `where`: present, a string, valid Unicode."""
    if key not in obj:
        raise MoeError(f'{where}: missing "{key}" field; {expected}')
    if not isinstance(obj[key], str):
        raise MoeError(f'{where}: "{key}" is a JSON {json_type(obj[key])}; {expected}')
    _check_unicode(obj, key, where)
    return obj[key]


def record_id(obj: dict[str, Any], where: str, lineno: int) -> Any:
    """The record's "id" (any JSON value that can be written back), else its line number."""
    _check_unicode(obj, "id", where)
    return obj.get("id", lineno)


def read_records(path: str | os.PathLike) -> Iterator[Record]:
    """Records of a JSONL file, lazily; MoeError naming the file and line for anything malformed."""
    for lineno, where, obj in read_objects(path):
        text = string_field(obj, "text", where)
        yield Record(lineno, record_id(obj, where, lineno), text)
