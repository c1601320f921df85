"""Reading a `tokenizers` JSON file — the one loader that train, export and serve share."""

from __future__ import annotations

import os
from pathlib import Path

from tokenizers import Tokenizer

from .errors import MoeError
from .jsonl import read_text_file

EXPECTED = "expected a tokenizers JSON file (tokenizer.json)"


def read_tokenizer(path: str | os.PathLike, vocab_size: int | None = None,
                   owner: str = "the model") -> tuple[str, Tokenizer]:
    """(file text, Tokenizer); MoeError naming the path for a missing, unreadable or malformed file, one whose
    token ids are not 0..N-1, and — given the model's vocab_size — one with more tokens than `owner`'s
    embedding has rows."""
    path = Path(path)
    text = read_text_file(path, "tokenizer file")
    try:
        tok = Tokenizer.from_str(text)
    except Exception as e:  # tokenizers raises a bare Exception for every kind of bad file
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise MoeError(f"{path}: not a tokenizers JSON file ({reason[:200]})") from None
    n = tok.get_vocab_size()
    top = max(tok.get_vocab().values(), default=-1)
    if n == 0:
        raise MoeError(f"{path}: tokenizer has no tokens; {EXPECTED}")
    if top != n - 1:  # an id past the count would index past the model's embedding
        raise MoeError(f"{path}: token ids must be 0..{n - 1} for {n} tokens, found id {top}; {EXPECTED}")
    if vocab_size is not None and n > vocab_size:
        raise MoeError(f"{path}: tokenizer has {n} tokens but {owner} has vocab_size {vocab_size}")
    return text, tok
