"""Streaming input for `moe serve`: the shared JSONL reader (moe_core.jsonl) plus what serving adds — an up-front
validation pass that rejects an empty input, chunking, and the puzzle inputs of `--mode solve`."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from moe_core import sudoku as S
from moe_core.errors import MoeError
from moe_core.jsonl import EXPECTED, Record, read_objects, read_records, record_id, string_field

__all__ = ["EXPECTED", "PUZZLE_EXPECTED", "PuzzleRecord", "Record", "chunked", "count_records", "read_puzzles",
           "read_records"]

T = TypeVar("T")

PUZZLE_EXPECTED = ('expected one JSON object per line with an 81-character "puzzle" (or "text") field and optional '
                   '"solution" and "id", or a puzzle file of 81-character lines (.txt / .csv)')
JSONL_SUFFIXES, PUZZLE_FILE_SUFFIXES = (".jsonl", ".json", ".ndjson"), (".txt", ".csv")


def count_records(path: str | os.PathLike, read: Callable[[str | os.PathLike], Iterable[Any]] = read_records,
                  expected: str = EXPECTED) -> int:
    """Validate every record (before any compute is spent) and count them; an empty input is an error."""
    n = sum(1 for _ in read(path))
    if n == 0:
        raise MoeError(f"{path}: no input records (the file is empty or holds only blank lines); {expected}")
    return n


def chunked(items: Iterable[T], size: int) -> Iterator[list[T]]:
    it = iter(items)
    while chunk := list(islice(it, size)):
        yield chunk


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
        puzzles, solutions = S.read_puzzle_file(path)
        for i, p in enumerate(puzzles):
            yield PuzzleRecord(i + 1, p, None if solutions is None else solutions[i])
        return
    for lineno, where, obj in read_objects(path, PUZZLE_EXPECTED):
        key = "puzzle" if "puzzle" in obj or "text" not in obj else "text"
        puzzle = S.parse_grid(string_field(obj, key, where, PUZZLE_EXPECTED), f'{where}: "{key}"')
        broken = S.conflict(puzzle)
        if broken:
            raise MoeError(f'{where}: "{key}": the givens conflict ({broken}); expected no digit twice in a row, '
                           "column or box")
        solution = None
        if obj.get("solution") is not None:
            solution = S.parse_grid(string_field(obj, "solution", where, PUZZLE_EXPECTED), f'{where}: "solution"')
            reason = S.why_invalid(puzzle, solution)
            if reason:
                raise MoeError(f'{where}: "solution" does not solve the puzzle ({reason})')
        yield PuzzleRecord(record_id(obj, where, lineno), puzzle, solution)
