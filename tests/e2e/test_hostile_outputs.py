"""Hostile use of outputs, signals, options and the serving API, across commands: no output ever aliases an input
(with or without --overwrite), outputs are created exclusively without --overwrite, SIGTERM leaves nothing behind
(exit 143), click's usage errors and bad sampling options are one line with exit code 2, memory and thread counts
are bounded whatever is asked, and the Python API names a bad argument.

The run directory is a random tiny model saved as is and the served model is tests/e2e/test_hostile.py's contract graph
(no export is traced here), with the end-of-text token made impossible so that generation runs as long as asked.
"""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import onnx
import pytest
import torch
from click.testing import CliRunner
from helpers import (
    GOOD_JSONL,
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
from onnx import numpy_helper

from moe_core import EOT, ModelConfig, MoeError, RecursiveMoE
from moe_core.checkpoint import load_model, save_run
from moe_core.cli import cli
from moe_core.common.files import atomic_write_text, command_inputs
from moe_core.run_layout import CONFIG_FILE, TOKENIZER_FILE, WEIGHTS_FILE
from moe_core.runtime.graph_contract import step_path_for, tokenizer_path_for
from moe_core.runtime.ort_session import usable_cpus
from serve import Server
from serve.jsonl import chunked
from serve.runtime import ModelInfo
from serve.server import MAX_BATCH_ELEMENTS


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    run = tmp_path_factory.mktemp("outputs") / "run"
    save_run(run, RecursiveMoE(ModelConfig(**TINY_LM)), tokenizer_json(VOCAB), {"train": {}})
    state = run / "trainer_state" / "step-00000001"
    state.mkdir(parents=True)
    (state / "state.json").write_text("{}\n", encoding="utf-8")
    return run


def write_model(run_dir: Path, dst: Path, step_graph: bool = False) -> Path:
    """dst/m.onnx + m.tokenizer.json: the contract graph, whose <|endoftext|> logit is -1e4 (never generated); with
    step_graph, its metadata names m.step.onnx (a placeholder file: served with --runtime unrolled)."""
    from tokenizers import Tokenizer

    text = (run_dir / TOKENIZER_FILE).read_text(encoding="utf-8")
    proto = contract_graph(VOCAB, text, json.loads((run_dir / CONFIG_FILE).read_text(encoding="utf-8")))
    table = next(t for t in proto.graph.initializer if t.name == "table")
    values = numpy_helper.to_array(table).copy()
    values[:, Tokenizer.from_str(text).token_to_id(EOT)] = -1e4
    table.CopyFrom(numpy_helper.from_array(values, "table"))
    if step_graph:
        proto.metadata_props.add(key="step_graph", value="m.step.onnx")
    dst.mkdir(parents=True, exist_ok=True)
    out = dst / "m.onnx"
    onnx.save(proto, str(out))
    tokenizer_path_for(out).write_text(text, encoding="utf-8")
    if step_graph:
        step_path_for(out).write_text("the step graph\n", encoding="utf-8")
    return out


@pytest.fixture(scope="module")
def model(run_dir, tmp_path_factory) -> Path:
    return write_model(run_dir, tmp_path_factory.mktemp("model"))


@pytest.fixture
def inp(tmp_path) -> Path:
    path = tmp_path / "in.jsonl"
    path.write_text(GOOD_JSONL * 3, encoding="utf-8")
    return path


def snapshot(*paths: Path) -> dict[Path, bytes]:
    return {p: p.read_bytes() for p in paths}


# -----------------------------------------------------------------------------
# 1. no output aliases an input


@pytest.mark.parametrize("case", ["model", "tokenizer", "dotdot", "symlink", "hardlink_input", "input", "step_graph"])
def test_serve_output_never_aliases_an_input(run_dir, tmp_path, inp, case):
    m = write_model(run_dir, tmp_path / "models", step_graph=case == "step_graph")
    (tmp_path / "sub").mkdir()
    out, what = {
        "model": (m, "m.onnx: --output is the model"),
        "tokenizer": (tokenizer_path_for(m), "m.tokenizer.json: --output is the model's tokenizer"),
        "dotdot": (tmp_path / "sub" / ".." / "models" / "m.onnx", "--output is the model"),
        "symlink": (tmp_path / "link.jsonl", "link.jsonl: --output is the model"),
        "hardlink_input": (tmp_path / "hard.jsonl", "hard.jsonl: --output is the --input file"),
        "input": (inp, "in.jsonl: --output is the --input file"),
        "step_graph": (step_path_for(m), "m.step.onnx: --output is the model's step graph"),
    }[case]
    if case == "symlink":
        out.symlink_to(m)
    if case == "hardlink_input":
        os.link(inp, out)
    files = [m, tokenizer_path_for(m), inp, *([step_path_for(m)] if case == "step_graph" else [])]
    before = snapshot(*files)
    assert_refused(moe("serve", m, "--input", inp, "--output", out, "--overwrite", "--runtime", "unrolled"), what,
                   "--overwrite does not change this")
    assert snapshot(*files) == before
    assert not list(tmp_path.rglob(".*.tmp"))


@pytest.mark.parametrize("case", ["weights", "config", "tokenizer", "trainer_state", "hardlink_weights",
                                  "hardlink_tokenizer", "symlinked_dir"])
def test_export_output_never_aliases_a_file_of_the_run(run_dir, tmp_path, case):
    files = [run_dir / WEIGHTS_FILE, run_dir / CONFIG_FILE, run_dir / TOKENIZER_FILE,
             run_dir / "trainer_state" / "step-00000001" / "state.json"]
    out = {"weights": files[0], "config": files[1], "tokenizer": files[2], "trainer_state": files[3],
           "hardlink_weights": tmp_path / "m.onnx", "hardlink_tokenizer": tmp_path / "m.onnx",
           "symlinked_dir": tmp_path / "alias" / WEIGHTS_FILE}[case]
    if case == "hardlink_weights":
        os.link(files[0], out)
    if case == "hardlink_tokenizer":
        os.link(files[2], tokenizer_path_for(out))
    if case == "symlinked_dir":
        (tmp_path / "alias").symlink_to(run_dir)
    before = snapshot(*files)
    assert_refused(moe("export", run_dir, "--out", out, "--overwrite", "--no-check", "--stepwise"),
                   f"is a file of the run {run_dir}", "--overwrite does not change this")
    assert snapshot(*files) == before


def test_a_command_never_writes_over_the_run_it_loaded(run_dir, tmp_path):
    """What keeps `moe eval --out` (and any command) off the run's files: within a command, load_model makes them
    inputs, and atomic_write refuses a path that aliases one — here a hard link to config.json."""
    alias = tmp_path / "eval.csv"
    os.link(run_dir / CONFIG_FILE, alias)
    before = snapshot(run_dir / CONFIG_FILE)
    with command_inputs():
        load_model(run_dir)
        with pytest.raises(MoeError, match=f"eval.csv: this output is a file of the run {run_dir}"):
            atomic_write_text(alias, "step,loss\n")
    assert snapshot(run_dir / CONFIG_FILE) == before
    atomic_write_text(tmp_path / "eval.md", "outside a command nothing is recorded\n")


# -----------------------------------------------------------------------------
# 2. exclusive creation without --overwrite


@pytest.mark.parametrize("overwrite", [False, True])
def test_an_output_that_appears_while_serving_is_not_replaced(model, inp, tmp_path, monkeypatch, overwrite):
    """Another process creates --output after the existence check (here: just before the final fsync): without
    --overwrite the move fails, the other file stays and nothing is left; with it, the new output replaces it."""
    out = tmp_path / "out.jsonl"
    real_fsync = os.fsync

    def fsync(fd):
        if not out.exists():
            out.write_text("the other process's output\n", encoding="utf-8")
        return real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    args = ("serve", model, "--input", inp, "--output", out, *(["--overwrite"] if overwrite else []))
    if overwrite:
        code, _, stderr = moe(*args)
        assert code == 0, stderr
        assert len(out.read_text(encoding="utf-8").splitlines()) == 3
    else:
        assert_refused(moe(*args), "out.jsonl: already exists (another process created it while this one ran; pass "
                       "--overwrite to replace it)")
        assert out.read_text(encoding="utf-8") == "the other process's output\n"
    assert leftovers(out) == [out]


# -----------------------------------------------------------------------------
# 3. SIGTERM: exit 143, nothing left


def wait_for_temp(directory: Path, proc, seconds: float = 60) -> None:
    end = time.monotonic() + seconds
    while time.monotonic() < end and proc.poll() is None and not list(directory.glob(".*.tmp")):
        time.sleep(0.05)
    time.sleep(0.5)  # the command is inside its write now (or a second has passed)


@pytest.mark.parametrize("command", ["serve", "export"])
def test_sigterm_removes_temp_files_and_exits_143(model, run_dir, tmp_path, inp, command):
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    if command == "serve":
        out = out_dir / "out.jsonl"
        args = ["serve", model, "--input", inp, "--output", out, "--mode", "generate", "--max-new-tokens", 100000]
        outputs = (out,)
    else:
        out = out_dir / "m.onnx"
        args = ["export", run_dir, "--out", out, "--stepwise"]
        outputs = (out, tokenizer_path_for(out), step_path_for(out))
    proc = spawn_moe(args)
    wait_for_temp(out_dir, proc)
    assert proc.poll() is None, finish(proc).describe()
    proc.send_signal(signal.SIGTERM)
    result = finish(proc, timeout=120)
    assert result.returncode == 143, result.describe()
    lines = [line for line in result.stderr.splitlines() if line.strip() and "%|" not in line]
    assert lines == ["interrupted by SIGTERM; unfinished outputs removed"], result.describe()
    assert list(out_dir.iterdir()) == [] and leftovers(*outputs) == []


# -----------------------------------------------------------------------------
# 4. bad sampling options and colliding ids: one line, exit 2


@pytest.mark.parametrize("options, message", [
    (["--temperature", "1", "--seed", "-1"], "--seed: expected a value in the range x>=0, got -1"),
    (["--temperature", "inf"], "--temperature: expected a finite number >= 0, got inf"),
    (["--temperature", "nan"], "--temperature: expected a finite number >= 0, got nan"),
    (["--temperature", "-1"], "--temperature: expected a finite number >= 0, got -1.0"),
    (["--temperature", "1", "--top-p", "nan"], "--top-p: expected a number in (0, 1], got nan"),
])
def test_serve_refuses_bad_sampling_options(model, inp, tmp_path, options, message):
    out = tmp_path / "out.jsonl"
    assert_refused(moe("serve", model, "--input", inp, "--output", out, "--mode", "generate", *options), message,
                   outputs=(out,))


@pytest.mark.parametrize("lines, message", [
    (['{"text": "a", "id": 2}', '{"text": "b"}'],
     'in.jsonl:2: has no "id" (its id would be its line number), and line 1 has a numeric "id": the ids could collide'),
    (['{"text": "a"}', '{"text": "b", "id": 7.5}'],
     'in.jsonl:2: has the numeric "id" 7.5, and line 1 has no "id" and gets its line number as id'),
    (['{"puzzle": "' + "." * 81 + '"}', '{"puzzle": "' + "." * 81 + '", "id": 1}'], 'in.jsonl:2: has the numeric "id"'),
])
def test_serve_refuses_ids_that_could_collide(model, tmp_path, lines, message):
    path, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    mode = "solve" if "puzzle" in lines[0] else "score"
    if mode == "solve":  # ids are read before the model is asked for its task
        from serve.jsonl import count_records, read_puzzles

        with pytest.raises(MoeError, match=message):
            count_records(path, read_puzzles)
        return
    assert_refused(moe("serve", model, "--input", path, "--output", out), message, outputs=(out,))


def test_ids_that_cannot_collide_pass(model, tmp_path):
    path, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    path.write_text('{"text": "a", "id": "x"}\n{"text": "b"}\n{"text": "c"}\n', encoding="utf-8")
    code, _, stderr = moe("serve", model, "--input", path, "--output", out)
    assert code == 0, stderr
    assert [json.loads(line)["id"] for line in out.read_text(encoding="utf-8").splitlines()] == ["x", 2, 3]


# -----------------------------------------------------------------------------
# 5. click's usage errors: one line, exit 2, for every command


@pytest.mark.parametrize("args, message", [
    (["serve", "M", "--input", "i", "--output", "o", "--batch-size", "0"],
     "error: --batch-size: expected a value in the range x>=1, got 0"),
    (["export", "RUN", "--out", "m.onnx", "--opset", "7"], "error: --opset: expected a value in the range 18<=x<=23"),
    (["export", "RUN", "--out", "m.onnx", "--precision", "bogus"],
     "error: --precision: expected one of 'fp32', 'fp16', 'bf16', 'int8', got 'bogus'"),
    (["serve", "M", "--input", "i", "--output", "o", "--bogus"], "error: --bogus: no such option of moe serve"),
    (["serve", "--input", "i", "--output", "o"], "error: MODEL: missing; this argument is required"),
    (["serve", "M", "--output", "o"], "error: --input: missing; this option is required"),
    (["export", "RUN"], "error: --out: missing; this option is required"),
    (["eval"], "error: RUN_DIR: missing; this argument is required"),
    (["plot", "a", "b"], "error: moe plot: got unexpected extra argument (b)"),
    (["train", "--bogus"], "error: --bogus: no such option of moe train"),
    (["ablate", "--steps", "x"], "error: --steps: 'x' is not a valid integer"),
    (["nosuchcommand"], "error: moe: no such command 'nosuchcommand'"),
    (["--bogus"], "error: --bogus: no such option of moe"),
])
def test_usage_errors_are_one_line(args, message):
    code, _, stderr = moe(*args)
    assert code == 2 and stderr.splitlines() == [stderr.splitlines()[0]] and stderr.startswith(message), stderr
    result = CliRunner().invoke(cli, args)  # click's standalone mode, as CliRunner runs it: the same line
    assert result.exit_code == 2 and result.stderr.strip().splitlines() == [stderr.strip()], result.stderr


# -----------------------------------------------------------------------------
# 6. memory and threads are bounded


def test_batch_rows_are_capped_by_the_memory_budget(model, monkeypatch):
    server = Server.open(model, provider="cpu", threads=1)
    cap = server.max_batch_rows
    info = server.info
    per_row = info.max_seq_len * (info.halt_max_steps * VOCAB + 4 * 16 + 4 * 32 + 8 * 32)  # the TINY_LM sizes
    assert cap == MAX_BATCH_ELEMENTS // per_row
    texts = ["the king walked"] * (cap + 5)
    rows, real_run = [], server.model.run
    monkeypatch.setattr(server.model, "run", lambda ids, mask, outputs: rows.append(len(ids)) or
                        real_run(ids, mask, outputs))
    huge = server.score(texts, batch_size=10**9)
    assert max(rows) == cap and len(rows) == 2
    small = server.score(texts, batch_size=7)
    assert [r.nll for r in huge] == pytest.approx([r.nll for r in small], rel=1e-5)


def test_serve_notes_a_cut_batch_size_and_thread_count(model, inp, tmp_path):
    out = tmp_path / "out.jsonl"
    code, _, stderr = moe("serve", model, "--input", inp, "--output", out, "--batch-size", 10**8,
                          "--threads", 100000)
    assert code == 0, stderr
    assert f"note: --threads 100000: using {usable_cpus()}, the CPUs this process may use" in stderr
    assert "note: --batch-size 100000000:" in stderr and "rows per forward pass" in stderr


def test_threads_are_capped_at_the_usable_cpus(model):
    t0 = time.perf_counter()
    server = Server.open(model, provider="cpu", threads=100_000)
    assert server.model.threads == usable_cpus() and time.perf_counter() - t0 < 30
    assert len(server.generate(["the quiet king"], max_new_tokens=2)[0].tokens) == 2


def test_chunks_are_bounded_in_text_as_well_as_in_records():
    chunks = list(chunked(["x" * 10] * 10, 100, weight=len, max_weight=25))
    assert [len(c) for c in chunks] == [3, 3, 3, 1]
    assert [len(c) for c in chunked(range(10), 4)] == [4, 4, 2]


# -----------------------------------------------------------------------------
# 7. the serving API names a bad argument


@pytest.mark.parametrize("call, message", [
    (lambda s: s.score([None]), "texts[0]: expected a string, got NoneType None"),
    (lambda s: s.score("a string"), "texts: expected a list of strings, got a single str (wrap it in a list)"),
    (lambda s: s.score(5), "texts: expected a list of strings, got int"),
    (lambda s: s.score(["a", b"b"]), "texts[1]: expected a string, got bytes"),
    (lambda s: s.score(["a"], batch_size=0), "batch_size: expected an integer >= 1, got 0"),
    (lambda s: s.score(["a"], batch_size=2.5), "batch_size: expected an integer >= 1, got float 2.5"),
    (lambda s: s.score(["a"], stride="4"), "stride: expected an integer >= 1, got str '4'"),
    (lambda s: s.generate([None]), "texts[0]: expected a string, got NoneType"),
    (lambda s: s.generate("a prompt"), "texts: expected a list of strings, got a single str"),
    (lambda s: s.generate(["a"], temperature=1.0, seed=-1), "seed: expected an integer >= 0, got -1"),
    (lambda s: s.generate(["a"], temperature=float("inf")), "temperature: expected a finite number >= 0"),
    (lambda s: s.generate(["a"], temperature=float("nan")), "temperature: expected a finite number >= 0"),
    (lambda s: s.generate(["a"], top_p=float("nan")), "top_p: expected a number in (0, 1], got nan"),
    (lambda s: s.generate(["a"], max_new_tokens="8"), "max_new_tokens: expected an integer >= 1, got str '8'"),
    (lambda s: s.generate(["a"], top_k=None), "top_k: expected an integer >= 0 (0 = no limit), got NoneType"),
])
def test_server_api_names_a_bad_argument(model, call, message):
    server = Server.open(model, provider="cpu", threads=1)
    with pytest.raises(MoeError) as e:
        call(server)
    assert str(e.value).startswith(message), str(e.value)


def sudoku_server() -> Server:
    """A Server of a Sudoku model that never runs: solve's arguments are checked before any forward pass."""
    info = ModelInfo(Path("sudoku.onnx"), Path("sudoku.tokenizer.json"), 10, 81, 2, "0.1.0", {}, "", "fp32", "sudoku")
    fake = SimpleNamespace(info=info, tokenizer=SimpleNamespace(token_to_id=lambda _: None),
                           run=lambda *a: pytest.fail("ran the model"))
    return Server(fake)


@pytest.mark.parametrize("call, message", [
    (lambda s: s.solve("." * 81), "puzzles: expected a list of grids (81-character strings or 81 integers 0-9) or an "
                                  "array [N, 81], got a single str (wrap it in a list)"),
    (lambda s: s.solve([None]), "puzzles[0]: expected 81 characters or 81 integers 0-9 (81 cells), got NoneType"),
    (lambda s: s.solve([[1, 2, 3]]), "puzzles[0]: expected 81 characters or 81 integers 0-9 (81 cells), got shape"),
    (lambda s: s.solve([np.full(81, 12)]), "puzzles[0]: expected 81 characters or 81 integers 0-9"),
    (lambda s: s.solve(np.zeros(81, dtype=np.uint8)), "puzzles: expected an array [N, 81], got shape (81,)"),
    (lambda s: s.solve(7), "puzzles: expected a list of grids"),
    (lambda s: s.solve(["." * 81], [5]), "solutions[0]: expected 81 characters or 81 integers 0-9 (81 cells), got sh"),
    (lambda s: s.solve(["." * 81], "1" * 81), "solutions: expected a list of grids"),
    (lambda s: s.solve(["." * 81], batch_size=0), "batch_size: expected an integer >= 1, got 0"),
])
def test_solve_names_a_bad_argument(call, message):
    with pytest.raises(MoeError) as e:
        call(sudoku_server())
    assert str(e.value).startswith(message), str(e.value)


# -----------------------------------------------------------------------------
# files that belong together are published together: a failure replaces nothing


def test_a_failed_export_overwrite_keeps_every_file_of_the_previous_export(run_dir, tmp_path, monkeypatch):
    """`moe export --overwrite` whose last move fails (ENOSPC at OUT) leaves the earlier export's graphs and
    tokenizer exactly as they were: its new decode / step graph was published first and is taken back. (The graphs
    are placeholders: what is tested is the publishing, files.atomic_outputs.)"""
    from export import onnx_export
    from moe_core.common import files

    out = tmp_path / "m.onnx"
    paths = [out, step_path_for(out), tokenizer_path_for(out), out.with_name("m.decode.onnx")]
    for p in paths:
        p.write_text(f"the earlier {p.name}\n", encoding="utf-8")
    before = snapshot(*paths)

    def placeholder(job, tmp, name, log, **_):
        Path(tmp).write_text(f"new {name.name}\n", encoding="utf-8")
        return []

    monkeypatch.setattr(onnx_export, "write_graph", placeholder)
    monkeypatch.setattr(onnx_export, "write_decode_graph", placeholder)
    real = files._commit

    def out_fails(tmp, path, overwrite):
        if path == out:
            raise OSError(28, os.strerror(28))
        real(tmp, path, overwrite)

    monkeypatch.setattr(files, "_commit", out_fails)
    decode = onnx_export.can_decode(load_model(run_dir).config, "lm")
    with pytest.raises(MoeError, match="nothing was written"):
        onnx_export.export_run(run_dir, out, check=False, overwrite=True, stepwise=True, decode=decode,
                               log=lambda _: None)
    assert snapshot(*paths) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(p.name for p in paths)


def test_overwrite_replaces_only_an_output_set_moe_wrote(model, tmp_path):
    """--overwrite of a sharded output replaces a directory only when it is a set this project wrote: its manifest
    (format and shard list) and the shards it lists, nothing else. A user's folder that happens to hold a
    manifest.json, or a real set a user added a file to, is refused and left as it was."""
    shards = tmp_path / "in"
    shards.mkdir()
    for name in ("a.jsonl", "b.jsonl"):
        (shards / name).write_text(GOOD_JSONL * 2, encoding="utf-8")
    out = tmp_path / "out"
    args = ("serve", model, "--input", shards, "--output", out, "--provider", "cpu")
    code, _, err = moe(*args)
    assert code == 0, err
    (out / "notes.txt").write_text("mine\n", encoding="utf-8")
    before = snapshot(*out.iterdir())
    assert_refused(moe(*args, "--overwrite"), f"{out}: it holds files its manifest.json does not list (notes.txt)")
    assert snapshot(*out.iterdir()) == before
    (out / "notes.txt").unlink()
    assert moe(*args, "--overwrite")[0] == 0

    foreign = tmp_path / "extension"
    foreign.mkdir()
    (foreign / "manifest.json").write_text('{"name": "my-extension"}\n', encoding="utf-8")
    (foreign / "notes.txt").write_text("mine\n", encoding="utf-8")
    before = snapshot(*foreign.iterdir())
    assert_refused(moe("serve", model, "--input", shards, "--output", foreign, "--provider", "cpu", "--overwrite"),
                   "manifest.json is not one moe serve wrote")
    assert snapshot(*foreign.iterdir()) == before
    assert_refused(moe("serve", model, "--input", shards, "--output", ".", "--provider", "cpu", "--overwrite"),
                   "not . or ..")
    assert not list(Path(".").glob("..*.old"))


def test_a_corrupted_graph_is_refused_and_non_finite_outputs_never_reach_json(run_dir, tmp_path):
    """A graph whose weights differ from the sha256 export recorded is refused when opened; a graph without that
    record (an older export) whose outputs are not finite stops the command with one line, writing nothing."""
    from moe_core.runtime.graph_contract import INITIALIZERS_SHA256, initializers_sha256

    out = write_model(run_dir, tmp_path / "model")
    proto = onnx.load(str(out))
    proto.metadata_props.add(key=INITIALIZERS_SHA256, value=initializers_sha256(proto))
    table = next(t for t in proto.graph.initializer if t.name == "table")
    values = numpy_helper.to_array(table).copy()
    values[3, 5] = np.nan
    table.CopyFrom(numpy_helper.from_array(values, "table"))
    onnx.save(proto, str(out))
    inp = tmp_path / "in.jsonl"
    inp.write_text(GOOD_JSONL * 3, encoding="utf-8")
    result = tmp_path / "out.jsonl"
    assert_refused(moe("serve", out, "--input", inp, "--output", result, "--provider", "cpu"),
                   f"{out}: its weights differ from those `moe export` wrote", outputs=(result,))
    del proto.metadata_props[len(proto.metadata_props) - 1]
    values[:] = np.nan
    table.CopyFrom(numpy_helper.from_array(values, "table"))
    onnx.save(proto, str(out))
    for mode in ("score", "generate"):
        assert_refused(moe("serve", out, "--input", inp, "--output", result, "--provider", "cpu", "--mode", mode),
                       f"{out}: non-finite", "nothing was written", outputs=(result,))


def test_a_tiny_temperature_samples_the_greedy_token(model, inp, tmp_path):
    """--temperature 1e-310 divides the logits into overflow; shifted by their maximum first, the sampling
    distribution is the greedy token's (ties shared), never NaN."""
    outs = {}
    for name, extra in (("greedy", ()), ("tiny", ("--temperature", "1e-310", "--seed", "3"))):
        outs[name] = tmp_path / f"{name}.jsonl"
        code, _, err = moe("serve", model, "--input", inp, "--output", outs[name], "--provider", "cpu", "--mode",
                           "generate", "--max-new-tokens", "4", *extra)
        assert code == 0, err
    assert outs["tiny"].read_text(encoding="utf-8") == outs["greedy"].read_text(encoding="utf-8")


def test_a_name_too_long_for_the_filesystem_is_one_line(run_dir, tmp_path):
    """A path component over 255 bytes, in the output itself or only in the tokenizer name derived from it."""
    for stem in ("x" * 300, "x" * 245):  # 245 + ".onnx" fits; 245 + ".tokenizer.json" does not
        out = tmp_path / f"{stem}.onnx"
        line = assert_refused(moe("export", run_dir, "--out", out, "--no-check", "--no-decode"), "File name too long")
        assert "Traceback" not in line
    assert list(tmp_path.iterdir()) == []


def test_a_result_that_is_not_a_finite_number_is_refused_naming_the_record():
    from serve.server import ScoreResult
    from serve.shards import record_line

    with pytest.raises(MoeError, match=r'record "r7": a result is not a finite number'):
        record_line("r7", ScoreResult(800.0, float("inf"), 3, 1, 1))
