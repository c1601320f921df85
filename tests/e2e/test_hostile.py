"""Hostile and broken input, across every command (issue #6): each case runs the command and checks the exit code
(2), the message (one line `error: <path>[:line]: <what was wrong>`, no traceback) and that no output — not even
a temp file — exists afterwards (or that a pre-existing output is unchanged).

Commands run in-process through moe_core.cli.run, exactly as the `moe` console entry point runs them (one
subprocess test checks the real entry point too). Full and read-only disks are simulated by fault injection —
root ignores file modes, and CI cannot mount a small filesystem: `os.fsync` fails with ENOSPC (where a full disk
shows up at the latest) or `tempfile.mkstemp` with EROFS / EACCES (a directory that takes no new files).

One tiny random model is saved as a run directory (no training), and a graph with the exported model's contract
stands in for its export (see contract_graph); every damaged variant is a copy.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import shutil
import struct
from pathlib import Path

import onnx
import pytest
import torch
from helpers import (
    GOOD_JSONL,
    REPO,
    TINY_LM,
    VOCAB,
    assert_refused,
    contract_graph,
    finish,
    leftovers,
    moe,
    spawn_moe,
    tokenizer_json,
)
from safetensors.torch import load_file, save_file

from moe_core import ModelConfig, RecursiveMoE
from moe_core.checkpoint import save_run, save_weights
from moe_core.common.errors import MoeError
from moe_core.common.files import atomic_write
from moe_core.common.jsonl import MAX_LINE_BYTES
from moe_core.run_layout import CONFIG_FILE, TOKENIZER_FILE, WEIGHTS_FILE
from moe_core.runtime.graph_contract import tokenizer_path_for

# -----------------------------------------------------------------------------
# running a command and checking a refusal


@pytest.fixture
def disk_fault(monkeypatch):
    """disk_fault("full"): every fsync fails with ENOSPC (after `after` good ones); disk_fault("readonly" |
    "denied"): no file can be created (EROFS / EACCES)."""

    def inject(kind: str, after: int = 0) -> None:
        if kind == "full":
            real, calls = os.fsync, []

            def fsync(fd):
                calls.append(fd)
                if len(calls) > after:
                    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
                return real(fd)

            monkeypatch.setattr(os, "fsync", fsync)
        else:
            code = {"readonly": errno.EROFS, "denied": errno.EACCES}[kind]

            def mkstemp(*args, dir=None, **kwargs):
                raise OSError(code, os.strerror(code), dir)

            import tempfile

            monkeypatch.setattr(tempfile, "mkstemp", mkstemp)

    return inject


# -----------------------------------------------------------------------------
# fixtures: one run directory, one exported model


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    run = tmp_path_factory.mktemp("hostile") / "run"
    save_run(run, RecursiveMoE(ModelConfig(**TINY_LM)), tokenizer_json(VOCAB), {"train": {}})
    return run


@pytest.fixture(scope="module")
def exported(run_dir, tmp_path_factory) -> Path:
    """m.onnx and m.tokenizer.json: what `moe export` writes, for serving (see contract_graph)."""
    out = tmp_path_factory.mktemp("onnx") / "m.onnx"
    text = (run_dir / TOKENIZER_FILE).read_text(encoding="utf-8")
    onnx.save(contract_graph(VOCAB, text, json.loads((run_dir / CONFIG_FILE).read_text(encoding="utf-8"))), str(out))
    tokenizer_path_for(out).write_text(text, encoding="utf-8")
    return out


@pytest.fixture
def run_copy(run_dir, tmp_path) -> Path:
    return Path(shutil.copytree(run_dir, tmp_path / "run"))


def model_copy(exported: Path, dst: Path) -> Path:
    """A copy of the exported model and its tokenizer in `dst`."""
    dst.mkdir(exist_ok=True)
    shutil.copy(exported, dst / exported.name)
    shutil.copy(tokenizer_path_for(exported), tokenizer_path_for(dst / exported.name))
    return dst / exported.name


# -----------------------------------------------------------------------------
# moe export: a damaged run directory


def _edit_config(run: Path, edit) -> None:
    cfg = json.loads((run / CONFIG_FILE).read_text(encoding="utf-8"))
    edit(cfg)
    (run / CONFIG_FILE).write_text(json.dumps(cfg), encoding="utf-8")


def _edit_state(run: Path, edit) -> None:
    state = load_file(run / WEIGHTS_FILE)
    edit(state)
    save_file(state, run / WEIGHTS_FILE)


def _edit_header(run: Path, edit) -> None:
    """Rewrite the safetensors header bytes (the JSON after the 8-byte length) with `edit`, length unchanged."""
    data = (run / WEIGHTS_FILE).read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    header = edit(data[8:8 + n])
    assert len(header) == n
    (run / WEIGHTS_FILE).write_bytes(data[:8] + header + data[8 + n:])


def _swap_shape(header: bytes) -> bytes:
    """lm_head.weight [300, 32] -> [32, 300]: same byte count, so only the shape check can notice."""
    start = header.index(b'"lm_head.weight"')
    i = header.index(b"[300,32]", start)
    return header[:i] + b"[32,300]" + header[i + 8:]


def _nan(state):
    state["lm_head.weight"][3, 5] = float("nan")


def _inf(state):
    state["halt_head.bias"][0] = float("inf")


WEIGHT_DAMAGE = {  # name -> (damage(run), message)
    "truncated": (lambda r: (r / WEIGHTS_FILE).write_bytes((r / WEIGHTS_FILE).read_bytes()[:5000]),
                  "model.safetensors: not a valid safetensors file"),
    "empty": (lambda r: (r / WEIGHTS_FILE).write_bytes(b""), "model.safetensors: not a valid safetensors file"),
    "not_safetensors": (lambda r: (r / WEIGHTS_FILE).write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 8),
                        "model.safetensors: not a valid safetensors file"),
    "header_length_huge": (lambda r: (r / WEIGHTS_FILE).write_bytes(
        struct.pack("<Q", 1 << 40) + (r / WEIGHTS_FILE).read_bytes()[8:]), "header too large"),
    "header_not_json": (lambda r: _edit_header(r, lambda h: b"[" + h[1:]), "invalid JSON in header"),
    "header_renamed_tensor": (lambda r: _edit_header(r, lambda h: h.replace(b'"lm_head.weight"', b'"lm_head.weighx"')),
                              "weights do not match config.json: missing tensor 'lm_head.weight'"),
    "header_dtype": (lambda r: _edit_header(r, lambda h: h.replace(b'"F32"', b'"I32"', 1)),
                     "has dtype int32, expected float32"),
    "header_shape": (lambda r: _edit_header(r, _swap_shape),
                     "lm_head.weight has shape (32, 300), the config implies (300, 32)"),
    "wrong_dtype": (lambda r: _edit_state(r, lambda s: s.update({"lm_head.weight": s["lm_head.weight"].half()})),
                    "tensor lm_head.weight has dtype float16, expected float32"),
    "wrong_shape": (lambda r: _edit_state(r, lambda s: s.update({"halt_head.weight": torch.zeros(1, 16)})),
                    "halt_head.weight has shape (1, 16), the config implies (1, 32)"),
    "extra_tensor": (lambda r: _edit_state(r, lambda s: s.update({"backdoor": torch.zeros(2)})),
                     "unexpected tensor 'backdoor'"),
    "missing_tensor": (lambda r: _edit_state(r, lambda s: s.pop("halt_head.bias")), "missing tensor 'halt_head.bias'"),
    "nan_weights": (lambda r: _edit_state(r, _nan), "tensor lm_head.weight holds non-finite values"),
    "inf_weights": (lambda r: _edit_state(r, _inf), "tensor halt_head.bias holds non-finite values"),
    "no_weights": (lambda r: (r / WEIGHTS_FILE).unlink(), "model.safetensors: file not found"),
}

CONFIG_DAMAGE = {
    "wrong_type": (lambda r: _edit_config(r, lambda c: c["model"].update(d_model="32")),
                   "config.json: model.d_model: expected an integer, got '32'"),
    "float_for_int": (lambda r: _edit_config(r, lambda c: c["model"].update(n_layers=1.5)),
                      "config.json: model.n_layers: expected an integer, got 1.5"),
    "missing_key": (lambda r: _edit_config(r, lambda c: c["model"].pop("n_heads")),
                    "config.json: model: missing key 'n_heads'"),
    "unknown_key": (lambda r: _edit_config(r, lambda c: c["model"].update(n_hedas=4)),
                    "config.json: model: unknown key 'n_hedas'"),
    "no_model_section": (lambda r: _edit_config(r, lambda c: c.pop("model")),
                         'config.json: "model" section is missing'),
    "model_not_object": (lambda r: _edit_config(r, lambda c: c.update(model=[1, 2])),
                         'config.json: "model" section is a JSON array'),
    "not_an_object": (lambda r: (r / CONFIG_FILE).write_text("[1, 2, 3]\n", encoding="utf-8"),
                      "config.json: got a JSON array; expected an object"),
    "not_json": (lambda r: (r / CONFIG_FILE).write_text('{"model": {"d_model": 32,', encoding="utf-8"),
                 "config.json: invalid JSON at line 1"),
    "nan_value": (lambda r: (r / CONFIG_FILE).write_text(
        (r / CONFIG_FILE).read_text(encoding="utf-8").replace('"dropout": 0.0', '"dropout": NaN'), encoding="utf-8"),
        "config.json: invalid JSON (NaN is not a JSON value)"),
    "binary": (lambda r: (r / CONFIG_FILE).write_bytes(b"\x1f\x8b\x08\x00" + bytes(200)),
               "config.json: binary data (NUL byte at offset 3); expected UTF-8 text"),
    "non_utf8": (lambda r: (r / CONFIG_FILE).write_bytes(b'{"model": "\xff"}'),
                 "config.json: not valid UTF-8 (byte 0xff at offset 11)"),
    "empty": (lambda r: (r / CONFIG_FILE).write_bytes(b""), "config.json: invalid JSON at line 1 column 1"),
    "out_of_range": (lambda r: _edit_config(r, lambda c: c["model"].update(top_k=9)),
                     "config.json: model.top_k: expected <= n_experts=4, got 9"),
    "absurd_size": (lambda r: _edit_config(r, lambda c: c["model"].update(max_seq_len=10**9)),
                    "config.json: model.max_seq_len: expected <= 65536"),
    "size_mismatch": (lambda r: _edit_config(r, lambda c: c["model"].update(d_model=4096 * 8)),
                      "weights do not match config.json: z_H_init has shape (32,), the config implies (32768,)"),
    "newer_format": (lambda r: _edit_config(r, lambda c: c.update(format_version=2, moe_version="0.9.0")),
                     "config.json: written by moe 0.9.0 in format 2; this moe 0.1.0 reads format 1 only "
                     "(upgrade moe to read it)"),
    "older_format": (lambda r: _edit_config(r, lambda c: c.update(format_version=0, moe_version="0.0.1")),
                     "in format 0; this moe 0.1.0 reads format 1 only (retrain or re-export it"),
    "format_not_int": (lambda r: _edit_config(r, lambda c: c.update(format_version="1")),
                       "config.json: format_version: expected an integer, got '1'"),
    "no_config": (lambda r: (r / CONFIG_FILE).unlink(), "config.json: file not found"),
}


def _tokenizer_gap(run: Path) -> None:
    tok = json.loads((run / TOKENIZER_FILE).read_text(encoding="utf-8"))
    tok["model"]["vocab"]["zzz"] = 100_000
    (run / TOKENIZER_FILE).write_text(json.dumps(tok), encoding="utf-8")


TOKENIZER_DAMAGE = {
    "json_not_tokenizer": (lambda r: (r / TOKENIZER_FILE).write_text('{"vocab": ["a", "b"]}', encoding="utf-8"),
                           "tokenizer.json: not a tokenizers JSON file"),
    "not_json": (lambda r: (r / TOKENIZER_FILE).write_text("merges:\n- a b\n", encoding="utf-8"),
                 "tokenizer.json: not a tokenizers JSON file"),
    "binary": (lambda r: (r / TOKENIZER_FILE).write_bytes(b"PK\x03\x04\x14\x00\x00\x00" + bytes(64)),
               "tokenizer.json: binary data (NUL byte at offset 5); expected UTF-8 text"),
    "empty": (lambda r: (r / TOKENIZER_FILE).write_bytes(b""), "tokenizer.json: not a tokenizers JSON file"),
    "too_big": (lambda r: (r / TOKENIZER_FILE).write_text(tokenizer_json(400), encoding="utf-8"),
                "tokenizer.json: tokenizer has 400 tokens but the model in"),
    "id_gap": (_tokenizer_gap, "tokenizer.json: token ids must be 0..300 for 301 tokens, found id 100000"),
    "missing": (lambda r: (r / TOKENIZER_FILE).unlink(), "tokenizer.json: tokenizer file not found"),
}


@pytest.mark.parametrize("case", [*(f"weights:{k}" for k in WEIGHT_DAMAGE), *(f"config:{k}" for k in CONFIG_DAMAGE),
                                  *(f"tokenizer:{k}" for k in TOKENIZER_DAMAGE)])
def test_export_refuses_a_damaged_run(run_copy, tmp_path, case):
    kind, name = case.split(":")
    damage, message = {"weights": WEIGHT_DAMAGE, "config": CONFIG_DAMAGE, "tokenizer": TOKENIZER_DAMAGE}[kind][name]
    damage(run_copy)
    out = tmp_path / "m.onnx"
    line = assert_refused(moe("export", run_copy, "--out", out), message, outputs=(out, tokenizer_path_for(out)))
    assert str(run_copy) in line  # the path of the damaged file, in full


def test_export_refuses_a_missing_run_dir(tmp_path):
    out = tmp_path / "m.onnx"
    assert_refused(moe("export", tmp_path / "nowhere", "--out", out), "nowhere: not a run directory", outputs=(out,))
    (tmp_path / "a_file").write_text("x", encoding="utf-8")
    assert_refused(moe("export", tmp_path / "a_file", "--out", out), "a_file: not a run directory", outputs=(out,))


def test_resume_refuses_a_run_of_another_format(run_copy):
    """`moe train --resume` reads config.json through the same loader: a run of another format is refused."""
    _edit_config(run_copy, lambda c: c.update(format_version=3, moe_version="1.2.0"))
    before = {p.name: p.read_bytes() for p in run_copy.iterdir()}
    assert_refused(moe("train", "--resume", run_copy),
                   f"{run_copy / CONFIG_FILE}: written by moe 1.2.0 in format 3; this moe 0.1.0 reads format 1 only")
    assert {p.name: p.read_bytes() for p in run_copy.iterdir()} == before


def test_load_model_refuses_before_allocating_a_huge_config(run_copy):
    """A tampered config asking for a vocabulary of 2**31 x 2**31 floats is refused from the file's shapes (the
    config's tensors are built on the meta device first), not by running out of memory."""
    from moe_core import CheckpointError, load_model

    _edit_config(run_copy, lambda c: c["model"].update(vocab_size=2**31, d_model=2**31, n_heads=2**30))
    with pytest.raises(CheckpointError, match="describe tensors too large to exist"):
        load_model(run_copy)
    _edit_config(run_copy, lambda c: c["model"].update(vocab_size=2**24, d_model=2**20, n_heads=4))  # 64 TB
    with pytest.raises(CheckpointError, match="z_H_init has shape"):
        load_model(run_copy)


# -----------------------------------------------------------------------------
# moe export: outputs


@pytest.mark.parametrize("existing", ["model", "tokenizer"])
def test_export_refuses_existing_outputs_without_overwrite(run_dir, tmp_path, existing):
    out = tmp_path / "m.onnx"
    target = out if existing == "model" else tokenizer_path_for(out)
    target.write_bytes(b"precious")
    assert_refused(moe("export", run_dir, "--out", out), f"{target}: already exists (pass --overwrite to replace it)")
    assert target.read_bytes() == b"precious"
    other = tokenizer_path_for(out) if existing == "model" else out
    assert leftovers(other) == []


@pytest.mark.parametrize("where, message", [
    ("dir", "is a directory; expected the path of a file to write"),
    ("no_parent", "no_such_dir: output directory does not exist"),
])
def test_export_refuses_bad_output_paths(run_dir, tmp_path, where, message):
    out = tmp_path / "m.onnx" if where == "dir" else tmp_path / "no_such_dir" / "m.onnx"
    if where == "dir":
        out.mkdir()
    assert_refused(moe("export", run_dir, "--out", out), message)
    assert out.is_dir() if where == "dir" else not out.parent.exists()


@pytest.mark.parametrize("content, message", [
    (b"ab\x00cd " * 100, "eval.txt: binary data (NUL byte at offset 2)"),
    (b"caf\xe9 " * 100, "eval.txt: not valid UTF-8 (byte 0xe9 at offset 3)"),
    (b"", "eval.txt: 0 tokens; need at least 17"),
    (None, "eval.txt: --eval-text file not found"),
])
def test_export_refuses_a_bad_eval_text(run_dir, tmp_path, content, message):
    text = tmp_path / "eval.txt"
    if content is not None:
        text.write_bytes(content)
    out = tmp_path / "m.onnx"
    assert_refused(moe("export", run_dir, "--out", out, "--eval-text", text), message,
                   outputs=(out, tokenizer_path_for(out)))


@pytest.fixture
def fast_export(exported, monkeypatch):
    """export_run without the trace: the graph is the fixture's, so failures after tracing cost no re-export."""
    import export.onnx_export as ox

    monkeypatch.setattr(ox, "to_onnx", lambda model, path, opset, **_: shutil.copyfile(exported, path))


@pytest.mark.parametrize("kind, after, failing, reason", [
    ("full", 0, "m.tokenizer.json", "No space left on device"),  # the tokenizer's write fails
    ("full", 1, "m.onnx", "No space left on device"),  # the tokenizer is written, the model's fsync fails
    ("readonly", 0, "m.onnx", "Read-only file system"),
    ("denied", 0, "m.onnx", "Permission denied"),
])
def test_export_on_a_full_or_read_only_disk(run_dir, tmp_path, fast_export, disk_fault, kind, after, failing, reason):
    out = tmp_path / "m.onnx"
    disk_fault(kind, after)
    # --no-decode: the writes counted are the model's and its tokenizer's (tests/e2e/test_decode.py: the decode
    # graph)
    assert_refused(moe("export", run_dir, "--out", out, "--no-check", "--no-decode"),
                   f"{tmp_path / failing}: cannot write ({reason})", outputs=(out, tokenizer_path_for(out)))
    assert list(tmp_path.iterdir()) == []


# -----------------------------------------------------------------------------
# moe serve: the model file, its tokenizer, the input, the output


def _set_metadata(model: Path, **values: str) -> None:
    proto = onnx.load(str(model))
    meta = {p.key: p.value for p in proto.metadata_props} | values
    del proto.metadata_props[:]
    for k, v in meta.items():
        proto.metadata_props.add(key=k, value=v)
    onnx.save(proto, str(model))


def _external_data(model: Path) -> None:
    proto = onnx.load(str(model))
    init = max(proto.graph.initializer, key=lambda t: len(t.raw_data))
    init.ClearField("raw_data")
    init.data_location = onnx.TensorProto.EXTERNAL
    init.external_data.add(key="location", value="../../../etc/passwd")
    onnx.save(proto, str(model))


def _retokenize(model: Path, text: str) -> None:
    """Replace the model's tokenizer with `text`, and the sha256 in the model's metadata to match."""
    tokenizer_path_for(model).write_text(text, encoding="utf-8")
    _set_metadata(model, tokenizer_sha256=hashlib.sha256(text.encode("utf-8")).hexdigest())


MODEL_DAMAGE = {
    "not_onnx": (lambda m: m.write_text("this is not an onnx model\n"), "m.onnx: not an ONNX model"),
    "truncated": (lambda m: m.write_bytes(m.read_bytes()[:3000]), "m.onnx: not an ONNX model"),
    "empty": (lambda m: m.write_bytes(b""), "m.onnx: not a `moe export` model: expected inputs"),
    "directory": (lambda m: (m.unlink(), m.mkdir()), "m.onnx: not a file"),
    "missing": (lambda m: m.unlink(), "m.onnx: model file not found"),
    "newer_format": (lambda m: _set_metadata(m, format_version="7", moe_version="3.0.0"),
                     "m.onnx: written by moe 3.0.0 in format 7; this moe 0.1.0 reads format 1 only"),
    "format_not_int": (lambda m: _set_metadata(m, format_version="one"), "m.onnx: format_version: expected an integer"),
    "bad_vocab_size": (lambda m: _set_metadata(m, vocab_size="-3"),
                       "m.onnx: malformed metadata vocab_size: expected a positive integer, got '-3'"),
    "vocab_size_mismatch": (lambda m: _set_metadata(m, vocab_size="500"),
                            "m.onnx: output logits has shape ['batch', 'seq', 300]; expected [batch, seq, 500]"),
    "config_not_json": (lambda m: _set_metadata(m, config="{model"), "m.onnx: malformed metadata config: invalid JSON"),
    "tokenizer_file_path": (lambda m: _set_metadata(m, tokenizer_file="../run/tokenizer.json"),
                            "m.onnx: metadata tokenizer_file must be a file name beside the model"),
    "external_data": (_external_data, "m.onnx: the model refers to external data files"),
    "tokenizer_not_tokenizer": (lambda m: _retokenize(m, '{"vocab": {"a": 0}}'),
                                "m.tokenizer.json: not a tokenizers JSON file"),
    "tokenizer_binary": (lambda m: tokenizer_path_for(m).write_bytes(b"\xff\xfe\x00t\x00o\x00k"),
                         "m.tokenizer.json: binary data (NUL byte at offset 2)"),
    "tokenizer_non_utf8": (lambda m: tokenizer_path_for(m).write_bytes(b'{"version": "1.0", "x": "\xe9"}'),
                           "m.tokenizer.json: not valid UTF-8 (byte 0xe9 at offset 25)"),
    "tokenizer_missing": (lambda m: tokenizer_path_for(m).unlink(), "m.tokenizer.json: tokenizer file not found"),
    "tokenizer_too_big": (lambda m: _retokenize(m, tokenizer_json(400)),
                          "m.tokenizer.json: tokenizer has 400 tokens but the model m.onnx has vocab_size 300"),
    "tokenizer_swapped": (lambda m: tokenizer_path_for(m).write_text(tokenizer_json(VOCAB, seed=9), encoding="utf-8"),
                          "m.tokenizer.json: tokenizer does not match the model m.onnx"),
}


@pytest.mark.parametrize("case", sorted(MODEL_DAMAGE))
def test_serve_refuses_a_damaged_model(exported, tmp_path, case):
    damage, message = MODEL_DAMAGE[case]
    model = model_copy(exported, tmp_path / "models")
    damage(model)
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    inp.write_text(GOOD_JSONL, encoding="utf-8")
    line = assert_refused(moe("serve", model, "--input", inp, "--output", out), message, outputs=(out,))
    assert str(tmp_path / "models") in line


@pytest.fixture(scope="module")
def huge_line(tmp_path_factory) -> bytes:
    """Two JSONL lines, the second a record of MAX_LINE_BYTES + 1 bytes (cut off at the cap, never read whole)."""
    pad = MAX_LINE_BYTES + 1 - len('{"text": ""}')
    return (GOOD_JSONL + '{"text": "' + "a" * pad + '"}\n').encode()


JSONL_CASES = {  # name -> (content, message); the file is in.jsonl
    "invalid_json": ('{"text": "ok"}\n{"text": "broken\n', "in.jsonl:2: invalid JSON (Unterminated string"),
    "not_object": (GOOD_JSONL + '["text"]\n', "in.jsonl:2: got a JSON array; expected one JSON object per line"),
    "missing_text": (GOOD_JSONL * 2 + '{"id": 3}\n', 'in.jsonl:3: missing "text" field'),
    "text_not_string": ('{"text": 5}\n', 'in.jsonl:1: "text" is a JSON number'),
    "text_null": ('{"text": null}\n', 'in.jsonl:1: "text" is a JSON null'),
    "nan": ('{"text": "a", "id": NaN}\n', "in.jsonl:1: invalid JSON (NaN is not a JSON value)"),
    "overflow": ('{"text": "a", "id": 1e999}\n', "in.jsonl:1: invalid JSON (number 1e999 is out of range)"),
    "huge_int": ('{"text": "a", "id": ' + "9" * 5000 + "}\n", "in.jsonl:1: invalid JSON (integer of 5000 digits"),
    "deep": ('{"text": "a", "id": ' + "[" * 100_000 + "]" * 100_000 + "}\n", "in.jsonl:1: invalid JSON (nested"),
    "surrogate": ('{"text": "a\\ud800b"}\n', 'in.jsonl:1: "text" holds an unpaired UTF-16 surrogate escape'),
    "surrogate_id": ('{"text": "a", "id": "\\udfff"}\n', 'in.jsonl:1: "id" holds an unpaired UTF-16 surrogate'),
    "non_utf8": (GOOD_JSONL.encode() + b'{"text": "caf\xe9"}\n',
                 "in.jsonl:2: not valid UTF-8 (byte 0xe9 at column 14)"),
    "binary": (b"\x7fELF\x02\x01\x01\x00" + bytes(300), "in.jsonl:1: binary data (NUL byte at column 8)"),
    "empty": ("", "in.jsonl: no input records (the file is empty or holds only blank lines)"),
    "blank": ("\n  \n\t\n", "in.jsonl: no input records"),
    "huge_line": ("huge", f"in.jsonl:2: line longer than {MAX_LINE_BYTES:,} bytes; expected at most 16 MiB per line"),
    "missing": (None, "in.jsonl: input file not found"),
    # a directory is sharded input (serve/shards.py): one without shards is refused
    "empty_directory": ("dir", "in.jsonl: no input shards in this directory; expected files ending in .jsonl"),
}


def write_case(path: Path, content, huge_line: bytes) -> None:
    if content == "huge":
        path.write_bytes(huge_line)
    elif content == "dir":
        path.mkdir()
    elif isinstance(content, bytes):
        path.write_bytes(content)
    elif content is not None:
        path.write_text(content, encoding="utf-8")


@pytest.mark.parametrize("case", sorted(JSONL_CASES))
def test_serve_refuses_bad_input(exported, tmp_path, huge_line, case):
    content, message = JSONL_CASES[case]
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    write_case(inp, content, huge_line)
    assert_refused(moe("serve", exported, "--input", inp, "--output", out), message, outputs=(out,))


def test_serve_refuses_existing_or_bad_output(exported, tmp_path):
    inp = tmp_path / "in.jsonl"
    inp.write_text(GOOD_JSONL, encoding="utf-8")
    out = tmp_path / "out.jsonl"
    out.write_text("precious", encoding="utf-8")
    assert_refused(moe("serve", exported, "--input", inp, "--output", out),
                   "out.jsonl: already exists (pass --overwrite")
    assert out.read_text(encoding="utf-8") == "precious"
    assert_refused(moe("serve", exported, "--input", inp, "--output", inp, "--overwrite"),
                   "in.jsonl: --output is the --input file")
    assert inp.read_text(encoding="utf-8") == GOOD_JSONL
    (tmp_path / "outdir").mkdir()
    assert_refused(moe("serve", exported, "--input", inp, "--output", tmp_path / "outdir"), "outdir: is a directory")
    assert_refused(moe("serve", exported, "--input", inp, "--output", tmp_path / "nope" / "o.jsonl"),
                   "nope: output directory does not exist")
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)  # as root, --overwrite would otherwise rename a regular file over a device or a pipe
    assert_refused(moe("serve", exported, "--input", inp, "--output", fifo, "--overwrite"),
                   "fifo: not a regular file (a device, pipe or socket)")
    assert fifo.is_fifo()


def test_export_and_serve_check_the_output_directory_is_writable(run_dir, exported, tmp_path, monkeypatch):
    """Before any work: a directory that takes no new files (as root, only a read-only mount does that)."""
    inp = tmp_path / "in.jsonl"
    inp.write_text(GOOD_JSONL, encoding="utf-8")
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode, **kw: Path(p) != out_dir and real_access(p, mode, **kw))
    message = f"{out_dir}: output directory is not writable (Permission denied)"
    assert_refused(moe("export", run_dir, "--out", out_dir / "m.onnx"), message)
    assert_refused(moe("serve", exported, "--input", inp, "--output", out_dir / "o.jsonl"), message)
    assert list(out_dir.iterdir()) == []


@pytest.mark.parametrize("kind, reason", [("full", "No space left on device"), ("readonly", "Read-only file system"),
                                          ("denied", "Permission denied")])
def test_serve_on_a_full_or_read_only_disk(exported, tmp_path, disk_fault, kind, reason):
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    inp.write_text(GOOD_JSONL * 3, encoding="utf-8")
    disk_fault(kind)
    assert_refused(moe("serve", exported, "--input", inp, "--output", out, "--provider", "cpu"),
                   f"{out}: cannot write ({reason}); nothing was written", outputs=(out,))


def test_serve_overwrite_on_a_full_disk_keeps_the_old_output(exported, tmp_path, disk_fault):
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    inp.write_text(GOOD_JSONL, encoding="utf-8")
    out.write_text("old results\n", encoding="utf-8")
    disk_fault("full")
    assert_refused(moe("serve", exported, "--input", inp, "--output", out, "--overwrite"), "No space left on device")
    assert out.read_text(encoding="utf-8") == "old results\n" and leftovers(out) == [out]


# -----------------------------------------------------------------------------
# moe train: data, config, tokenizer, output


def train_args(out: Path, data: Path | None = None, *extra) -> list:
    args = ["train", "--preset", "tiny", "--no-compile", "--device", "cpu", "--set", f"model.vocab_size={VOCAB}",
            "--set", "train.max_steps=2", "--set", "train.plots=false", "--out", out, *extra]
    return args + (["--data", data] if data is not None else [])


DATA_CASES = {  # name -> (file name, content, message); "dir:" names are folders of (name, content) files
    "binary_txt": ("c.txt", b"PK\x03\x04\x00\x00data", "c.txt: binary data (NUL byte at offset 4)"),
    "non_utf8_txt": ("c.txt", b"ok caf\xe9 text", "c.txt: not valid UTF-8 (byte 0xe9 at offset 6)"),
    "utf16_txt": ("c.txt", "hello".encode("utf-16"), "c.txt: binary data (NUL byte at offset 3); expected UTF-8 text"),
    "empty_txt": ("c.txt", b"", "c.txt: corpus is empty"),
    "whitespace_txt": ("c.txt", b" \n\t\r\n  ", "c.txt: corpus is empty"),
    "dir_with_binary": ("dir:corpus", [("a.txt", b"fine text\n"), ("b.txt", b"\x00\x01\x02")],
                        "b.txt: binary data (NUL byte at offset 0)"),
    "dir_with_non_utf8": ("dir:corpus", [("a.txt", b"fine text\n"), ("sub/b.txt", b"\xc3\x28")],
                          "b.txt: not valid UTF-8 (byte 0xc3 at offset 0)"),
    "dir_empty": ("dir:corpus", [], "corpus: no .txt files found below this directory"),
    "dir_only_whitespace": ("dir:corpus", [("a.txt", b"\n"), ("b.txt", b"   ")], "corpus: corpus is empty"),
    "jsonl_invalid_line": ("c.jsonl", b'{"text": "ok"}\n\n{"text": oops}\n', "c.jsonl:3: invalid JSON"),
    "jsonl_not_object": ("c.jsonl", b'{"text": "ok"}\n"just a string"\n', "c.jsonl:2: got a JSON string"),
    "jsonl_missing_text": ("c.jsonl", b'{"body": "b"}\n', 'c.jsonl:1: missing "text" field'),
    "jsonl_text_wrong_type": ("c.jsonl", b'{"text": ["a"]}\n', 'c.jsonl:1: "text" is a JSON array'),
    "jsonl_no_text": ("c.jsonl", b'{"text": ""}\n{"text": "  "}\n', "c.jsonl: corpus is empty"),
    "jsonl_empty": ("c.jsonl", b"", "c.jsonl: corpus is empty"),
    "jsonl_non_utf8": ("c.jsonl", b'{"text": "\xff"}\n', "c.jsonl:1: not valid UTF-8 (byte 0xff at column 11)"),
    "jsonl_surrogate": ("c.jsonl", b'{"text": "\\udc80"}\n', 'c.jsonl:1: "text" holds an unpaired UTF-16 surrogate'),
    "jsonl_huge_line": ("c.jsonl", "huge", f"c.jsonl:2: line longer than {MAX_LINE_BYTES:,} bytes"),
    "unsupported_type": ("c.csv", b"text\nhello\n", "c.csv: unsupported file type '.csv'"),
    "missing": ("missing.txt", None, "missing.txt: no such file or directory"),
}


@pytest.mark.parametrize("case", sorted(DATA_CASES))
def test_train_refuses_bad_data(tmp_path, huge_line, case):
    name, content, message = DATA_CASES[case]
    if name.startswith("dir:"):
        data = tmp_path / name[4:]
        data.mkdir()
        for rel, raw in content:
            (data / rel).parent.mkdir(parents=True, exist_ok=True)
            (data / rel).write_bytes(raw)
    else:
        data = tmp_path / name
        write_case(data, content, huge_line)
    out = tmp_path / "run"
    assert_refused(moe(*train_args(out, data)), message, outputs=(out,))


CONFIG_CASES = {  # name -> (TOML text or bytes, message); the file is bad.toml
    "wrong_type": ('[model]\nd_model = "big"\n', "bad.toml: model.d_model: expected an integer, got 'big'"),
    "float_for_bool": ("[train]\ncompile = 1.0\n", "bad.toml: train.compile: expected true or false, got 1.0"),
    "nan": ("[train]\nlr = nan\n", "bad.toml: train.lr: expected a finite number, got nan"),
    "inf": ("[model]\ndropout = -inf\n", "bad.toml: model.dropout: expected a finite number, got -inf"),
    "unknown_key": ("[model]\nd_modle = 64\n", "bad.toml: model: unknown key 'd_modle'"),
    "unknown_section": ("[optim]\nlr = 1\n", "bad.toml: unknown section 'optim' (expected [model], [train], [sudoku])"),
    "section_not_table": ("model = 3\n", "bad.toml: model: expected a table of settings, got int"),
    "not_toml": ("[model\nd_model = 64\n", "bad.toml: invalid TOML (Expected ']'"),
    "json_not_toml": ('{"model": {"d_model": 64}}', "bad.toml: invalid TOML"),
    "binary": (b"\x00\x01\x02\x03", "bad.toml: binary data (NUL byte at offset 0)"),
    "non_utf8": (b"[model]\n# caf\xe9\n", "bad.toml: not valid UTF-8 (byte 0xe9 at offset 13)"),
    "absurd_value": ("[model]\nn_layers = 100000\n", "model.n_layers: expected <= 256, got 100000"),
    "missing": (None, "bad.toml: config file not found"),
}


@pytest.mark.parametrize("case", sorted(CONFIG_CASES))
def test_train_refuses_a_bad_config(tmp_path, corpus_file, case):
    content, message = CONFIG_CASES[case]
    config = tmp_path / "bad.toml"
    if isinstance(content, bytes):
        config.write_bytes(content)
    elif content is not None:
        config.write_text(content, encoding="utf-8")
    out = tmp_path / "run"
    assert_refused(moe(*train_args(out, corpus_file, "--config", config)), message, outputs=(out,))


@pytest.mark.parametrize("item, message", [
    ("model.d_model=abc", "config: model.d_model: expected an integer, got 'abc'"),
    ("train.lr=inf", "config: train.lr: expected a finite number, got inf"),
    ("model.H_cycles=1000", "config: model.H_cycles: expected <= 64, got 1000"),
    ("nonsense", "--set 'nonsense': expected key=value"),
    ("a.b.c=1", "--set 'a.b.c=1': unknown section 'a'"),
])
def test_train_refuses_bad_overrides(tmp_path, corpus_file, item, message):
    out = tmp_path / "run"
    assert_refused(moe(*train_args(out, corpus_file, "--set", item)), message, outputs=(out,))


@pytest.mark.parametrize("case", ["json_not_tokenizer", "not_json", "binary", "empty", "id_gap", "missing"])
def test_train_refuses_a_bad_tokenizer(run_copy, tmp_path, corpus_file, case):
    damage, message = TOKENIZER_DAMAGE[case]
    damage(run_copy)
    out = tmp_path / "out"
    assert_refused(moe(*train_args(out, corpus_file, "--tokenizer", run_copy / TOKENIZER_FILE)), message,
                   outputs=(out,))


def test_train_refuses_an_existing_run_directory(tmp_path, corpus_file):
    out = tmp_path / "run"
    out.mkdir()
    (out / "notes.txt").write_text("keep me\n", encoding="utf-8")
    assert_refused(moe(*train_args(out, corpus_file)), "run: directory exists and is not empty (pass --overwrite")
    assert [p.name for p in out.iterdir()] == ["notes.txt"]


@pytest.mark.parametrize("option, message", [
    ("--out", "a_file: exists and is not a directory"),
    ("--config", "a_dir: is a directory; expected a config file"),
    ("--tokenizer", "a_dir: is a directory; expected a tokenizer file"),
])
def test_train_refuses_a_file_for_a_directory_and_back(tmp_path, corpus_file, option, message):
    (tmp_path / "a_file").write_text("not a run\n", encoding="utf-8")
    (tmp_path / "a_dir").mkdir()
    out = tmp_path / "a_file" if option == "--out" else tmp_path / "run"
    extra = [] if option == "--out" else [option, tmp_path / "a_dir"]
    assert_refused(moe(*train_args(out, corpus_file, *extra)), message)
    assert (tmp_path / "a_file").read_text(encoding="utf-8") == "not a run\n" and not (tmp_path / "run").exists()


@pytest.mark.parametrize("kind, reason", [("full", "No space left on device"), ("readonly", "Read-only file system")])
def test_train_on_a_full_or_read_only_disk_names_the_file(tmp_path, corpus_file, disk_fault, kind, reason):
    """The first write of the run fails: one line naming the file and the reason, and no file is torn (every temp
    file is gone)."""
    out = tmp_path / "run"
    disk_fault(kind)
    assert_refused(moe(*train_args(out, corpus_file)), f"{out / CONFIG_FILE}: cannot write ({reason})")
    assert [p for p in tmp_path.rglob("*") if p.name.endswith(".tmp")] == []
    assert not (out / CONFIG_FILE).exists() and not (out / WEIGHTS_FILE).exists()


def test_train_that_fails_before_its_first_save_leaves_no_run_directory(tmp_path, corpus_file, disk_fault):
    out = tmp_path / "run"
    disk_fault("full")
    assert_refused(moe(*train_args(out, corpus_file)), "No space left on device", outputs=(out,))


# -----------------------------------------------------------------------------
# moe plot: metrics.jsonl


def metrics_run(tmp_path: Path, content) -> Path:
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    write_case(run_dir / "metrics.jsonl", content, b"")
    return run_dir


GOOD_METRICS = "".join(json.dumps(r) + "\n" for r in (
    {"kind": "eval", "step": 0, "val_loss": 5.0}, {"kind": "train", "step": 1, "lm_loss": 5.0, "lr": 1e-3},
    {"kind": "train", "step": 2, "lm_loss": 4.0, "lr": 1e-3}, {"kind": "eval", "step": 2, "val_loss": 4.5}))

METRICS_CASES = {
    "bad_middle_line": (GOOD_METRICS + "{oops\n" + GOOD_METRICS, "metrics.jsonl:5: not valid JSON"),
    "binary": (b"\x00\x01garbage\n\x00\x02more garbage\n", "metrics.jsonl:1: not valid JSON"),
    "empty": ("", "metrics.jsonl: no metrics records"),
    "only_torn_line": ('{"kind": "tra', "metrics.jsonl: no metrics records"),
    "huge_line": ("x" * (MAX_LINE_BYTES + 10) + "\n", f"metrics.jsonl:1: line longer than {MAX_LINE_BYTES:,} bytes"),
    "missing": (None, "metrics.jsonl: metrics file not found"),
}


@pytest.mark.parametrize("case", sorted(METRICS_CASES))
def test_plot_refuses_bad_metrics(tmp_path, case):
    content, message = METRICS_CASES[case]
    run_dir = metrics_run(tmp_path, content)
    assert_refused(moe("plot", run_dir), message, outputs=(run_dir / "plots",))


@pytest.mark.parametrize("kind, reason", [("full", "No space left on device"), ("readonly", "Read-only file system")])
def test_plot_on_a_full_or_read_only_disk(tmp_path, disk_fault, kind, reason):
    run_dir = metrics_run(tmp_path, GOOD_METRICS)
    disk_fault(kind)
    assert_refused(moe("plot", run_dir), f"{run_dir / 'plots' / 'loss.png'}: cannot write ({reason})")
    assert list((run_dir / "plots").iterdir()) == []


def test_plot_in_a_read_only_run_directory(tmp_path, monkeypatch):
    run_dir = metrics_run(tmp_path, GOOD_METRICS)
    real_mkdir = Path.mkdir

    def mkdir(self, *args, **kwargs):
        if self.parent == run_dir:
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(self))
        return real_mkdir(self, *args, **kwargs)

    monkeypatch.setattr(Path, "mkdir", mkdir)
    assert_refused(moe("plot", run_dir), "plots: cannot write (Read-only file system)", outputs=(run_dir / "plots",))


# -----------------------------------------------------------------------------
# the pieces: atomic_write and the safetensors writer under I/O errors


def test_atomic_write_turns_io_errors_into_one_line_and_leaves_nothing(tmp_path):
    target = tmp_path / "f.bin"

    def half_then_full(tmp: str) -> None:
        Path(tmp).write_bytes(b"half")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    with pytest.raises(MoeError, match=re.escape(f"{target}: cannot write (No space left on device)")):
        atomic_write(target, half_then_full)
    assert list(tmp_path.iterdir()) == []

    def not_io(tmp: str) -> None:
        raise ValueError("a bug, not the disk")

    with pytest.raises(ValueError, match="a bug"):  # only I/O errors are the user's business
        atomic_write(target, not_io)
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(MoeError, match="nowhere: output directory does not exist"):
        atomic_write(tmp_path / "nowhere" / "f.bin", lambda tmp: None)


def test_save_weights_on_a_full_disk(tmp_path, monkeypatch):
    """safetensors reports a full disk as SafetensorError("... (os error 28)"), not OSError."""
    from safetensors import SafetensorError

    import moe_core.checkpoint as ck

    def full(state, path, metadata=None):
        Path(path).write_bytes(b"\x00" * 100)
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(ck, "save_file", full)
    target = tmp_path / WEIGHTS_FILE
    with pytest.raises(MoeError, match=re.escape(f"{target}: cannot write (No space left on device)")):
        save_weights(RecursiveMoE(ModelConfig(**TINY_LM)), target)
    assert list(tmp_path.iterdir()) == []


# -----------------------------------------------------------------------------
# the real entry point, and no unpickling anywhere


def test_real_entry_point_exit_code_and_stderr(run_dir, tmp_path):
    """The same refusals from `moe` in its own process: exit code 2 and one line on stderr."""
    bad_run = Path(shutil.copytree(run_dir, tmp_path / "run"))
    _edit_config(bad_run, lambda c: c.update(format_version=2))
    procs = [(spawn_moe(["export", bad_run, "--out", tmp_path / "m.onnx"]), "in format 2", tmp_path / "m.onnx"),
             (spawn_moe(["plot", tmp_path]), "metrics.jsonl: metrics file not found", tmp_path / "plots")]
    for proc, message, output in procs:
        result = finish(proc, timeout=300)
        assert_refused((result.returncode, result.stdout, result.stderr), message, outputs=(output,))


UNPICKLING = re.compile(r"\bpickle\b|\bdill\b|\bjoblib\b|allow_pickle\s*=\s*True|"
                        r"torch\.load\((?![^)]*weights_only=True)")


def test_no_code_path_unpickles_a_file():
    """Weights are safetensors, state is JSON: no pickle, and torch.load only with weights_only=True."""
    offenders = []
    for package in ("moe_core", "train", "export", "serve", "benchmarks"):
        for path in sorted((REPO / package).rglob("*.py")):
            for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
                code = line.split("#", 1)[0]
                if UNPICKLING.search(code) and "no pickle" not in line.lower():
                    offenders.append(f"{path.relative_to(REPO)}:{lineno}: {line.strip()}")
    assert offenders == []


def test_readers_name_a_directory_given_for_a_file(tmp_path):
    """What train would say for the cases click intercepts today (see CLICK_PATH_CHECKS)."""
    from moe_core.common.tokenizer import read_tokenizer
    from train.config import read_toml

    with pytest.raises(MoeError, match=re.escape(f"{tmp_path}: is a directory; expected a config file")):
        read_toml(tmp_path)
    with pytest.raises(MoeError, match=re.escape(f"{tmp_path}: is a directory; expected a tokenizer file")):
        read_tokenizer(tmp_path)
