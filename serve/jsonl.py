"""Streaming input for `moe serve`: the shared JSONL reader (moe_core.common.jsonl) plus what serving adds — an up-front
validation pass that rejects an empty input, the rule that keeps ids apart, chunking bounded in records and in
text, and the puzzle inputs of `--mode solve`.

Ids. A record's "id" is any JSON value, written back as given; a line without one gets its 1-based line number.
So that an automatic id can never equal an explicit one, an input that has lines without "id" may not give a
number as an explicit "id" (a number could be another line's line number): such a file is refused at the second
of the two lines, naming both. Checking this needs two line numbers, not a set of every id seen, so validating an
input of any size takes constant memory. Duplicates among explicit ids are the input's own choice.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from moe_core.common.errors import MoeError
from moe_core.common.jsonl import EXPECTED, Record, read_objects, record_id, string_field
from moe_core.tasks import sudoku

__all__ = ["EXPECTED", "PUZZLE_EXPECTED", "PuzzleRecord", "Record", "chunked", "count_records", "read_puzzles",
           "read_records"]

CHUNK_TEXT_CHARS = 32 * 2**20  # a chunk of records holds at most this much text (plus one record)

T = TypeVar("T")
PathT = TypeVar("PathT", bound="str | os.PathLike")

PUZZLE_EXPECTED = ('expected one JSON object per line with an 81-character "puzzle" (or "text") field and optional '
                   '"solution" and "id", or a puzzle file of 81-character lines (.txt / .csv)')
JSONL_SUFFIXES, PUZZLE_FILE_SUFFIXES = (".jsonl", ".json", ".ndjson"), (".txt", ".csv")


def chunked(items: Iterable[T], size: int, weight: Callable[[T], int] | None = None,
            max_weight: int = CHUNK_TEXT_CHARS) -> Iterator[list[T]]:
    """Lists of at most `size` items; with `weight`, a list also ends once its items weigh max_weight or more (so a
    chunk of long texts stays bounded in memory, not only in count)."""
    it = iter(items)
    if weight is None:
        while chunk := list(islice(it, size)):
            yield chunk
        return
    chunk, total = [], 0
    for item in it:
        chunk.append(item)
        total += weight(item)
        if len(chunk) >= size or total >= max_weight:
            yield chunk
            chunk, total = [], 0
    if chunk:
        yield chunk


class IdRule:
    """The ids rule of the module docstring, checked line by line: automatic (line-number) ids and explicit
    numeric ids do not mix."""

    def __init__(self) -> None:
        self.first_auto: int | None = None  # first line without "id"
        self.first_number: int | None = None  # first line with a numeric "id"

    def check(self, obj: dict[str, Any], where: str, lineno: int) -> Any:
        ident = record_id(obj, where, lineno)
        if "id" not in obj:
            self.first_auto = self.first_auto or lineno
        elif isinstance(ident, (int, float)) and not isinstance(ident, bool):
            self.first_number = self.first_number or lineno
        if self.first_auto is not None and self.first_number is not None:
            auto, number = self.first_auto, self.first_number
            this = ('has no "id" (its id would be its line number)' if lineno == auto
                    else f'has the numeric "id" {str(ident)[:40]}')
            other = (f'line {number} has a numeric "id"' if lineno == auto
                     else f'line {auto} has no "id" and gets its line number as id')
            raise MoeError(f"{where}: {this}, and {other}: the ids could collide; expected an \"id\" on every line "
                           "or no numeric \"id\" at all (e.g. a string)")
        return ident


def read_records(path: str | os.PathLike) -> Iterator[Record]:
    """Text records of a JSONL file, lazily (moe_core.common.jsonl), their ids checked by IdRule; MoeError naming the
    file and line for anything malformed."""
    ids = IdRule()
    for lineno, where, obj in read_objects(path):
        text = string_field(obj, "text", where)
        yield Record(lineno, ids.check(obj, where, lineno), text)


def count_records(path: PathT, read: Callable[[PathT], Iterable[Any]] = read_records, expected: str = EXPECTED
                  ) -> int:
    """Validate every record (before any compute is spent) and count them; an empty input is an error."""
    n = sum(1 for _ in read(path))
    if n == 0:
        raise MoeError(f"{path}: no input records (the file is empty or holds only blank lines); {expected}")
    return n


# -----------------------------------------------------------------------------
# puzzles (--mode solve)


@dataclass
class PuzzleRecord:
    id: Any  # the input's "id"; else the JSONL line number, or the puzzle's 1-based position in a puzzle file
    puzzle: np.ndarray  # uint8 [81], 0 = blank
    solution: np.ndarray | None  # uint8 [81] when the input gave one (checked to solve the puzzle)


def is_jsonl(path: str | os.PathLike) -> bool:
    """JSONL by suffix (.jsonl / .json / .ndjson), a puzzle file by suffix (.txt / .csv); otherwise JSONL when the
    first non-blank character is '{'."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix in JSONL_SUFFIXES + PUZZLE_FILE_SUFFIXES:
        return suffix in JSONL_SUFFIXES
    try:
        with open(path, "rb") as f:
            head = f.read(4096).lstrip()
    except OSError:
        return True  # the JSONL reader names the problem
    return head.startswith(b"{")


def read_puzzles(path: str | os.PathLike) -> Iterator[PuzzleRecord]:
    """The puzzles of a JSONL or puzzle file (see is_jsonl), lazily for JSONL; MoeError naming path:line for a bad
    grid, conflicting givens, or a given solution that does not solve its puzzle."""
    if not is_jsonl(path):
        puzzles, solutions = sudoku.read_puzzle_file(path)
        for i, p in enumerate(puzzles):
            yield PuzzleRecord(i + 1, p, None if solutions is None else solutions[i])
        return
    ids = IdRule()
    for lineno, where, obj in read_objects(path, PUZZLE_EXPECTED):
        key = "puzzle" if "puzzle" in obj or "text" not in obj else "text"
        field = f'{where}: "{key}"'
        puzzle = sudoku.check_givens(sudoku.parse_grid(string_field(obj, key, where, PUZZLE_EXPECTED), field), field)
        solution = None
        if obj.get("solution") is not None:
            field = f'{where}: "solution"'
            solution = sudoku.check_solution(
                puzzle, sudoku.parse_grid(string_field(obj, "solution", where, PUZZLE_EXPECTED), field), field)
        yield PuzzleRecord(ids.check(obj, where, lineno), puzzle, solution)
