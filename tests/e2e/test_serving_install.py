"""`moe serve` for real where torch cannot be imported (a blocked torch first on PYTHONPATH, and the serving-only
install `make test` builds), compared with a normal run's outputs. tests/unit/test_layers.py checks the source."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import onnx
import pytest
from helpers import REPO, contract_graph, make_texts, subprocess_env

from moe_core.runtime.graph_contract import tokenizer_path_for

# -----------------------------------------------------------------------------
# `moe serve` where torch cannot be imported



@pytest.fixture(scope="module")
def no_torch(tmp_path_factory) -> Path:
    """A directory whose torch package fails to import: first on PYTHONPATH, it hides the installed one. Every
    attempt is also written to $MOE_TORCH_ATTEMPTS, so one caught by an `except ImportError` is seen too."""
    root = tmp_path_factory.mktemp("no_torch")
    (root / "torch").mkdir()
    (root / "torch" / "__init__.py").write_text(
        "import os, traceback\n"
        "with open(os.environ['MOE_TORCH_ATTEMPTS'], 'a', encoding='utf-8') as f:\n"
        "    traceback.print_stack(file=f)\n"
        "raise ImportError('torch is blocked here')\n", encoding="utf-8")
    return root


@pytest.fixture(scope="module")
def sudoku_model(tmp_path_factory) -> Path:
    """A model with the exported graph's contract and task "sudoku" (digits 0..9, 81 cells): what serve solves
    with (the graph's own values do not matter here, only that both runs agree)."""
    from train.sudoku_task import digit_tokenizer

    text = digit_tokenizer().to_str()
    proto = contract_graph(10, text, {"train": {"task": "sudoku"}})
    for p in proto.metadata_props:
        if p.key == "max_seq_len":
            p.value = "81"
    proto.metadata_props.add(key="task", value="sudoku")
    out = tmp_path_factory.mktemp("sudoku") / "m.onnx"
    onnx.save(proto, str(out))
    tokenizer_path_for(out).write_text(text, encoding="utf-8")
    return out


def moe_serve_outputs(model: Path, inp: Path, out: Path, args: list[str], blocked: Path | None,
                      python: str = sys.executable) -> list[dict]:
    """The records `moe serve MODEL` writes, run as a subprocess of `python`; `blocked`: with the no_torch directory
    first on PYTHONPATH, and no attempt to import torch allowed."""
    env = subprocess_env()
    env["PYTHONPATH"] = os.pathsep.join([*([str(blocked)] if blocked else []), str(REPO)])
    attempts = out.with_suffix(".torch-imports")
    env["MOE_TORCH_ATTEMPTS"] = str(attempts)
    argv = [python, "-c", "from moe_core.cli import main; main()", "serve", str(model), "--input", str(inp),
            "--output", str(out), "--provider", "cpu", "--threads", "1", *args]
    proc = subprocess.run(argv, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert not attempts.exists(), f"torch was imported:\n{attempts.read_text(encoding='utf-8')}"
    return [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]


@pytest.mark.parametrize("args", [["--mode", "score", "--runtime", "unrolled"],
                                  ["--mode", "score", "--runtime", "stepwise"],
                                  ["--mode", "generate", "--runtime", "unrolled", "--max-new-tokens", "6"],
                                  ["--mode", "generate", "--runtime", "stepwise", "--max-new-tokens", "6"]],
                         ids=["score", "score-stepwise", "generate", "generate-stepwise"])
def test_moe_serve_runs_without_torch(exported, no_torch, tmp_path, args):
    inp = tmp_path / "in.jsonl"
    inp.write_text("".join(json.dumps({"text": t}) + "\n" for t in make_texts(8, seed=3)),
                   encoding="utf-8")
    blocked = moe_serve_outputs(exported[1], inp, tmp_path / "blocked.jsonl", args, no_torch)
    assert blocked == moe_serve_outputs(exported[1], inp, tmp_path / "normal.jsonl", args, None)
    assert len(blocked) == 8


def test_moe_serve_solves_without_torch(sudoku_model, no_torch, tmp_path):
    from moe_core.tasks import sudoku as S

    inp = tmp_path / "in.jsonl"
    puzzles = S.generate(4, 0, givens=(30, 40)).puzzles
    inp.write_text("".join(json.dumps({"puzzle": "".join(map(str, p))}) + "\n" for p in puzzles), encoding="utf-8")
    args = ["--mode", "solve"]
    blocked = moe_serve_outputs(sudoku_model, inp, tmp_path / "blocked.jsonl", args, no_torch)
    assert blocked == moe_serve_outputs(sudoku_model, inp, tmp_path / "normal.jsonl", args, None)
    assert len(blocked) == 4


# The serving-only install (README): a venv with onnxruntime, numpy, tokenizers, click, tqdm and onnx, and moe
# installed without its dependencies. `make test` builds it (.venv-serve) and names its interpreter here.
SERVING_PYTHON = os.environ.get("MOE_SERVING_PYTHON")


@pytest.mark.skipif(not SERVING_PYTHON, reason="MOE_SERVING_PYTHON (the serving-only venv) not set: make test sets it")
def test_moe_serve_in_the_serving_only_install(exported, tmp_path):
    args = ["--mode", "generate", "--runtime", "stepwise", "--max-new-tokens", "6"]
    probe = subprocess.run([SERVING_PYTHON, "-c", "import importlib.util as u; print(u.find_spec('torch') is None)"],
                           capture_output=True, text=True, timeout=60)
    assert probe.stdout.strip() == "True", f"torch is installed in the serving venv {SERVING_PYTHON}"
    inp = tmp_path / "in.jsonl"
    inp.write_text("".join(json.dumps({"text": t}) + "\n" for t in make_texts(8, seed=4)),
                   encoding="utf-8")
    served = moe_serve_outputs(exported[1], inp, tmp_path / "serving.jsonl", args, None, python=SERVING_PYTHON)
    assert served == moe_serve_outputs(exported[1], inp, tmp_path / "normal.jsonl", args, None)


@pytest.mark.skipif(not SERVING_PYTHON, reason="MOE_SERVING_PYTHON (the serving-only venv) not set: make test sets it")
@pytest.mark.parametrize("command", [["train", "--preset", "tiny", "--out", "run"],
                                     ["export", "run", "--out", "m.onnx"], ["plot", "run"]])
def test_the_serving_only_install_names_what_it_lacks(tmp_path, command):
    """Commands other than serve need torch (and matplotlib): in the serving-only install they say so in one line."""
    moe = os.path.join(os.path.dirname(os.path.abspath(SERVING_PYTHON)), "moe")  # the serving venv's script
    r = subprocess.run([moe, *command], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert r.returncode == 2 and r.stderr.count("\n") == 1, r.stderr
    assert r.stderr.startswith(f"error: moe {command[0]}: needs the package torch"), r.stderr
