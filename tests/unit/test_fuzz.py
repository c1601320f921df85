"""Fuzzing the input parsers with hypothesis (issue #6): whatever the bytes, a parser returns a value or raises
MoeError — the one-line, exit-code-2 error — never another exception.

Parsers: the JSONL reader (serve --input, train --data), config TOML and `--set` (train), config.json and
model.safetensors (load_model: export, serve's eager twin, resume), tokenizer.json (train, export, serve) and the
exported model's file and metadata (serve). Inputs are random bytes, random structures in the right syntax, and
mutations of valid files.

Bounded and reproducible: every test is derandomized (the same examples on every run and machine) with no example
database, and has a fixed example budget; the file runs in well under 20 s on a 2-core CPU.
"""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
import struct
import tempfile
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from moe_core import ModelConfig, MoeError, RecursiveMoE, load_model
from moe_core.checkpoint import save_run
from moe_core.common.jsonl import read_records
from moe_core.common.tokenizer import read_tokenizer
from moe_core.run_layout import CONFIG_FILE, WEIGHTS_FILE
from train.config import TrainConfig, build_config, parse_override

FUZZ = settings(deadline=None, derandomize=True, database=None, print_blob=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                       HealthCheck.function_scoped_fixture])

TINY = dict(vocab_size=64, max_seq_len=8, d_model=16, n_heads=2, n_layers=1, min_heads=1, max_heads=2, n_experts=2,
            top_k=1, d_expert=16, H_cycles=1, L_cycles=1, halt_max_steps=2)


def returns_or_moe_error(fn, *args):
    """fn(*args), or None when it raised MoeError; any other exception fails the test."""
    try:
        return fn(*args)
    except MoeError as e:
        assert "\n" not in str(e), f"a multi-line message: {e!r}"
        return None


@pytest.fixture(scope="module")
def scratch(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("fuzz")


# -----------------------------------------------------------------------------
# value strategies

json_scalars = st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats() | st.text(max_size=12)
json_values = st.recursive(json_scalars, lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=6), c,
                                                                                          max_size=4), max_leaves=12)
TRICKY = ['"\\ud800"', '"\\udfff"', "NaN", "-Infinity", "1e999", "9" * 400, "[" * 3000, "\ufeff", "\u2028", "\x00",
          '"\\u0000"', "{", "}", ",", ":", '"text"', '"id"', " ", "\t", "\r"]
tricky_json = st.lists(st.sampled_from(TRICKY) | st.text(max_size=5), min_size=1, max_size=8).map("".join)


def jsonl_line() -> st.SearchStrategy[bytes]:
    record = st.fixed_dictionaries({"text": st.text(max_size=30) | json_values}, optional={"id": json_values})
    text_lines = st.one_of(record.map(json.dumps), json_values.map(json.dumps), tricky_json,
                           st.text(max_size=30), record.map(lambda r: json.dumps(r, ensure_ascii=False)))
    return text_lines.map(lambda s: s.encode("utf-8", "surrogatepass")) | st.binary(max_size=40)


# -----------------------------------------------------------------------------
# JSONL: serve --input, train --data


@settings(FUZZ, max_examples=250)
@given(lines=st.lists(jsonl_line(), max_size=6), newline=st.sampled_from([b"\n", b"\r\n"]), bom=st.booleans())
def test_jsonl_reader_returns_records_or_moe_error(scratch, lines, newline, bom):
    path = scratch / "in.jsonl"
    path.write_bytes((b"\xef\xbb\xbf" if bom else b"") + newline.join(lines))
    records = returns_or_moe_error(lambda: list(read_records(path)))
    for r in records or []:  # what is accepted can be tokenized and written back as UTF-8 JSON
        assert isinstance(r.text, str)
        json.dumps({"id": r.id, "text": r.text}, ensure_ascii=False, allow_nan=False).encode("utf-8")


@settings(FUZZ, max_examples=100)
@given(records=st.lists(st.fixed_dictionaries({"text": st.text(max_size=40)},
                                              optional={"id": json_values.filter(lambda v: v is not None)}),
                        min_size=1, max_size=6),
       ascii_only=st.booleans())
def test_jsonl_reader_round_trips_valid_records(scratch, records, ascii_only):
    """Any text survives: U+2028 and other line separators inside strings, a leading U+FEFF, astral characters."""
    records = [r for r in records if _finite(r)]
    assume(records)
    path = scratch / "ok.jsonl"
    path.write_text("".join(json.dumps(r, ensure_ascii=ascii_only) + "\n" for r in records), encoding="utf-8")
    got = list(read_records(path))
    assert [(g.text, g.id) for g in got] == [(r["text"], r.get("id", i + 1)) for i, r in enumerate(records)]


def _finite(value) -> bool:
    try:
        json.dumps(value, allow_nan=False)
    except ValueError:
        return False
    return True


# -----------------------------------------------------------------------------
# train --config TOML and --set


def toml_value() -> st.SearchStrategy[str]:
    scalar = st.one_of(st.integers(-2**80, 2**80).map(str), st.floats().map(_toml_float),
                       st.sampled_from(["true", "false", "nan", "inf", "-inf", "0x10", "1_000"]),
                       st.text(max_size=10).map(json.dumps))
    return st.one_of(scalar, st.lists(scalar, max_size=3).map(lambda xs: f"[{', '.join(xs)}]"),
                     st.lists(scalar, max_size=2).map(lambda xs: "{" + ", ".join(f"k{i} = {x}" for i, x in
                                                                                   enumerate(xs)) + "}"),
                     st.text(max_size=8))


def _toml_float(x: float) -> str:
    return {"nan": "nan", "inf": "inf", "-inf": "-inf"}.get(repr(x), repr(x))


MODEL_KEYS = [f.name for f in dataclasses.fields(ModelConfig)]
TRAIN_KEYS = [f.name for f in dataclasses.fields(TrainConfig)]
config_key = st.sampled_from(MODEL_KEYS + TRAIN_KEYS) | st.text(max_size=8)


@settings(FUZZ, max_examples=200)
@given(sections=st.lists(st.tuples(st.sampled_from(["model", "train", "optim", "model.extra", ""]),
                                   st.lists(st.tuples(config_key, toml_value()), max_size=4)), max_size=3),
       garbage=st.binary(max_size=20) | st.just(b""))
def test_config_file_builds_or_raises_moe_error(scratch, sections, garbage):
    text = "".join((f"[{name}]\n" if name else "") + "".join(f"{k} = {v}\n" for k, v in items)
                   for name, items in sections)
    path = scratch / "c.toml"
    path.write_bytes(text.encode("utf-8", "surrogatepass") + garbage)
    cfg = returns_or_moe_error(build_config, None, str(path), [])
    if cfg is not None:
        cfg.model.validate()
        cfg.train.validate()


@settings(FUZZ, max_examples=200)
@given(items=st.lists(st.one_of(st.tuples(st.sampled_from(["", "model.", "train.", "x."]), config_key, toml_value())
                                .map(lambda t: f"{t[0]}{t[1]}={t[2]}"), st.text(max_size=20)), max_size=4))
def test_set_overrides_build_or_raise_moe_error(items):
    for item in items:
        returns_or_moe_error(parse_override, item)
    cfg = returns_or_moe_error(build_config, "tiny", None, items)
    if cfg is not None:
        cfg.model.validate()
        cfg.train.validate()


@settings(FUZZ, max_examples=200)
@given(changes=st.dictionaries(st.sampled_from(MODEL_KEYS) | st.text(max_size=6), json_values, max_size=4))
def test_model_config_from_dict_builds_or_raises_moe_error(changes):
    cfg = returns_or_moe_error(ModelConfig.from_dict, {**TINY, **changes})
    if cfg is not None:
        cfg.validate()


# -----------------------------------------------------------------------------
# a run directory: config.json + model.safetensors (load_model)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    run = tmp_path_factory.mktemp("fuzz_run") / "run"
    save_run(run, RecursiveMoE(ModelConfig(**TINY)), "{}")
    return run


def load_mutated(run_dir: Path, weights: bytes | None = None, config: bytes | None = None):
    with tempfile.TemporaryDirectory() as tmp:
        run = Path(shutil.copytree(run_dir, Path(tmp) / "run"))
        if weights is not None:
            (run / WEIGHTS_FILE).write_bytes(weights)
        if config is not None:
            (run / CONFIG_FILE).write_bytes(config)
        model = returns_or_moe_error(load_model, run)
        if model is not None:
            assert isinstance(model, RecursiveMoE) and not model.training


def header_split(data: bytes) -> tuple[dict, bytes]:
    (n,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8:8 + n]), data[8 + n:]


def header_join(header: dict, body: bytes) -> bytes:
    raw = json.dumps(header).encode("utf-8")
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw + body


@settings(FUZZ, max_examples=60)
@given(data=st.binary(max_size=200) | st.binary(max_size=40).map(lambda b: struct.pack("<Q", len(b)) + b))
def test_load_model_random_weights_bytes(run_dir, data):
    load_mutated(run_dir, weights=data)


@settings(FUZZ, max_examples=150)
@given(data=st.data())
def test_load_model_mutated_weights_file(run_dir, data):
    """Byte-level damage to a valid file, most of it in the header (the body only holds values)."""
    raw = bytearray((run_dir / WEIGHTS_FILE).read_bytes())
    header_end = 8 + struct.unpack("<Q", raw[:8])[0]
    for _ in range(data.draw(st.integers(1, 4))):
        op = data.draw(st.sampled_from(["set", "truncate", "insert", "delete"]))
        pos = data.draw(st.integers(0, header_end) | st.integers(0, len(raw)))
        if op == "set" and pos < len(raw):
            raw[pos] = data.draw(st.integers(0, 255))
        elif op == "truncate":
            del raw[pos:]
        elif op == "insert":
            raw[pos:pos] = data.draw(st.binary(min_size=1, max_size=8))
        elif op == "delete":
            del raw[pos:pos + data.draw(st.integers(1, 16))]
    load_mutated(run_dir, weights=bytes(raw))


DTYPES = ["F32", "F16", "BF16", "F64", "I64", "I32", "I8", "U8", "BOOL", "F8_E4M3", "F8_E5M2", "C64", "XX", ""]


@settings(FUZZ, max_examples=150)
@given(data=st.data())
def test_load_model_tampered_header(run_dir, data):
    """Structural edits of the header: dtypes, shapes, offsets, names, metadata — with the body kept or resized."""
    header, body = header_split((run_dir / WEIGHTS_FILE).read_bytes())
    names = sorted(k for k in header if k != "__metadata__")
    for _ in range(data.draw(st.integers(1, 3))):
        name = data.draw(st.sampled_from(names))
        field = data.draw(st.sampled_from(["dtype", "shape", "data_offsets", "drop", "rename", "metadata", "junk",
                                           "retype", "reshape", "retype", "reshape"]))
        if not isinstance(header.get(name), dict):  # dropped or junked by an earlier edit
            header[name] = {}
        shape = header[name].get("shape")
        numel = math.prod(shape) if isinstance(shape, list) and all(type(d) is int for d in shape) else None
        if field == "retype":  # another dtype of the same size: a file safetensors accepts, the model must not
            header[name]["dtype"] = data.draw(st.sampled_from(["I32", "U32", "F32"]))
        elif field == "reshape" and numel is not None:  # another shape of as many values
            header[name]["shape"] = data.draw(st.sampled_from([[numel], [1, numel], shape[::-1], [*shape, 1]]))
        elif field == "dtype":
            header[name]["dtype"] = data.draw(st.sampled_from(DTYPES) | json_values)
        elif field == "shape":
            header[name]["shape"] = data.draw(st.lists(st.integers(0, 2**40) | st.integers(-2, 64), max_size=4)
                                              | json_values)
        elif field == "data_offsets":
            header[name]["data_offsets"] = data.draw(st.lists(st.integers(-1, 2**64) | st.integers(0, len(body)),
                                                              min_size=2, max_size=2) | json_values)
        elif field == "drop":
            header.pop(name, None)
        elif field == "rename" and name in header:
            header[data.draw(st.text(max_size=20))] = header.pop(name)
        elif field == "metadata":
            header["__metadata__"] = data.draw(json_values)
        else:
            header[name] = data.draw(json_values)
    if data.draw(st.booleans()):
        body = body[: data.draw(st.integers(0, len(body)))]
    load_mutated(run_dir, weights=header_join(header, body))


@settings(FUZZ, max_examples=150)
@given(data=st.data())
def test_load_model_mutated_config(run_dir, data):
    config = json.loads((run_dir / CONFIG_FILE).read_text(encoding="utf-8"))
    model = config["model"]
    for _ in range(data.draw(st.integers(1, 3))):
        op = data.draw(st.sampled_from(["set", "small_int", "drop", "add", "top", "replace"]))
        key = data.draw(st.sampled_from(MODEL_KEYS))
        if op == "set":
            model[key] = data.draw(json_values)
        elif op == "small_int":  # plausible values: reach the shape checks and the meta-device model
            model[key] = data.draw(st.integers(-1, 70) | st.sampled_from([128, 256, 257, 2**16, 2**16 + 1, 2**31]))
        elif op == "drop":
            model.pop(key, None)
        elif op == "add":
            model[data.draw(st.text(max_size=8))] = data.draw(json_values)
        elif op == "top":
            config[data.draw(st.sampled_from(["format_version", "moe_version", "model", "train"]))] = \
                data.draw(json_values)
        else:
            config = data.draw(json_values)
            break
    raw = json.dumps(config).encode("utf-8") if data.draw(st.booleans()) else data.draw(st.binary(max_size=60))
    load_mutated(run_dir, config=raw)


# -----------------------------------------------------------------------------
# tokenizer.json


@pytest.fixture(scope="module")
def tokenizer_text() -> str:
    from helpers import make_corpus

    from train.data import train_tokenizer

    return train_tokenizer([make_corpus(3000)], 300).to_str()


@settings(FUZZ, max_examples=120)
@given(data=st.data())
def test_tokenizer_reader_returns_or_raises_moe_error(scratch, tokenizer_text, data):
    tok = json.loads(tokenizer_text)
    op = data.draw(st.sampled_from(["model", "vocab", "merges", "section", "bytes", "text"]))
    if op == "model":
        tok["model"][data.draw(st.sampled_from(sorted(tok["model"])))] = data.draw(json_values)
    elif op == "vocab":
        vocab = tok["model"]["vocab"]
        vocab[data.draw(st.text(max_size=4))] = data.draw(st.integers(-2**40, 2**40) | json_values)
    elif op == "merges":
        tok["model"]["merges"] = data.draw(st.lists(st.text(max_size=6) | json_values, max_size=4))
    elif op == "section":
        tok[data.draw(st.sampled_from(sorted(tok)))] = data.draw(json_values)
    path = scratch / "tokenizer.json"
    if op == "bytes":
        path.write_bytes(data.draw(st.binary(max_size=100)))
    elif op == "text":
        path.write_text(data.draw(tricky_json | st.text(max_size=60)), encoding="utf-8", errors="surrogatepass")
    else:
        path.write_text(json.dumps(tok), encoding="utf-8")
    returns_or_moe_error(read_tokenizer, path, 300)


# -----------------------------------------------------------------------------
# the exported model's file and metadata (serve)


@pytest.fixture(scope="module")
def model_bytes(tokenizer_text) -> bytes:
    from helpers import contract_graph

    return contract_graph(32, tokenizer_text, {"model": {}}).SerializeToString()


@settings(FUZZ, max_examples=150)
@given(data=st.data())
def test_model_file_reader_returns_or_raises_moe_error(scratch, model_bytes, data):
    import onnx

    from moe_core.runtime.graph_contract import METADATA_KEYS
    from serve.runtime import read_model

    if data.draw(st.booleans()):
        proto = onnx.load_from_string(model_bytes)
        meta = {p.key: p.value for p in proto.metadata_props}
        for _ in range(data.draw(st.integers(1, 3))):
            key = data.draw(st.sampled_from([*METADATA_KEYS, "format_version", "precision"]))
            if data.draw(st.booleans()):
                meta[key] = data.draw(st.text(max_size=12) | json_values.map(json.dumps) | st.integers().map(str))
            else:
                meta.pop(key, None)
        del proto.metadata_props[:]
        for k, v in meta.items():
            proto.metadata_props.add(key=k, value=v)
        raw = proto.SerializeToString()
    else:
        raw = bytearray(model_bytes)
        for _ in range(data.draw(st.integers(1, 4))):
            pos = data.draw(st.integers(0, len(raw) - 1))
            if data.draw(st.booleans()):
                raw[pos] = data.draw(st.integers(0, 255))
            else:
                del raw[pos:]
                break
        raw = bytes(raw)
    path = scratch / "m.onnx"
    path.write_bytes(raw)
    returns_or_moe_error(read_model, path)
