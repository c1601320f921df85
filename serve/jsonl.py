"""Streaming JSONL input for `moe serve`: the shared reader (moe_core.jsonl) plus what serving adds —
an up-front validation pass that rejects an empty input, and chunking."""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from itertools import islice
from typing import TypeVar

from moe_core.errors import MoeError
from moe_core.jsonl import EXPECTED, Record, read_records

__all__ = ["Record", "chunked", "count_records", "read_records"]

T = TypeVar("T")


def count_records(path: str | os.PathLike) -> int:
    """Validate every line (before any compute is spent) and count the records; an empty input is an error."""
    n = sum(1 for _ in read_records(path))
    if n == 0:
        raise MoeError(f"{path}: no input records (the file is empty or holds only blank lines); {EXPECTED}")
    return n


def chunked(items: Iterable[T], size: int) -> Iterator[list[T]]:
    it = iter(items)
    while chunk := list(islice(it, size)):
        yield chunk
