"""Reading a `tokenizers` JSON file — the one loader that train, export and serve share."""

from __future__ import annotations

import os
from pathlib import Path

from tokenizers import Tokenizer

from .errors import MoeError


def read_tokenizer(path: str | os.PathLike, vocab_size: int | None = None,
                   owner: str = "the model") -> tuple[str, Tokenizer]:
    """(file text, Tokenizer); MoeError naming the path for a missing, unreadable or malformed file, and — given
    the model's vocab_size — for a tokenizer with more tokens than `owner`'s embedding has rows."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise MoeError(f"{path}: tokenizer file not found; expected a tokenizers JSON file (tokenizer.json)") from None
    except (OSError, UnicodeDecodeError) as e:
        raise MoeError(f"{path}: cannot read the tokenizer ({e})") from None
    try:
        tok = Tokenizer.from_str(text)
    except Exception as e:  # tokenizers raises a bare Exception for every kind of bad file
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise MoeError(f"{path}: not a tokenizers JSON file ({reason[:200]})") from None
    if vocab_size is not None and tok.get_vocab_size() > vocab_size:
        raise MoeError(f"{path}: tokenizer has {tok.get_vocab_size()} tokens but {owner} has vocab_size {vocab_size}")
    return text, tok
