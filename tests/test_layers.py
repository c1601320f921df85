"""The package layers, checked on the source: moe_core is the bottom layer; train, export and serve sit on it and
never on each other, except export on train's nothing and serve on nobody's model code:

    moe_core  imports none of train, export, serve, benchmarks
    export    imports no serve and no train
    serve     imports no export and no train, and nothing it imports (transitively) imports torch
    no import cycle between the project's modules (benchmarks/ included; tests/ may import anything)

Imports are read from every .py file with ast, function-local ones included (a lazy import still runs). The last
tests run `moe serve` for real where `import torch` fails, and compare its outputs with a normal run's.
"""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import onnx
import pytest
import test_serve
from conftest import REPO, subprocess_env
from test_hostile import contract_graph

from moe_core.graph_contract import tokenizer_path_for

LAYERED = ("moe_core", "train", "export", "serve")
PROJECT = (*LAYERED, "benchmarks")
FORBIDDEN = {  # package -> project packages it may not import
    "moe_core": {"train", "export", "serve", "benchmarks"},
    "export": {"serve", "train", "benchmarks"},
    "serve": {"export", "train", "benchmarks"},
}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def project_files() -> dict[str, Path]:
    return {module_name(p): p for pkg in PROJECT for p in sorted((REPO / pkg).rglob("*.py"))}


def imports_of(name: str, path: Path, modules: set[str]) -> set[str]:
    """Every module `name` (at `path`) imports, absolute names: `from a import b` gives a.b when that is a module
    of the project, else a."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module
            for alias in node.names:
                sub = f"{source}.{alias.name}"
                found.add(sub if sub in modules else source)
    return found


def import_graph() -> dict[str, set[str]]:
    files = project_files()
    return {name: imports_of(name, path, set(files)) for name, path in files.items()}


def top(module: str) -> str:
    return module.partition(".")[0]


def test_layer_rules():
    bad = [f"{m} imports {i}" for m, imported in sorted(import_graph().items()) for i in sorted(imported)
           if top(i) in FORBIDDEN.get(top(m), ())]
    assert not bad, "layer rule broken:\n  " + "\n  ".join(bad)


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (or a module importing itself), Tarjan."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in graph:
                continue
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1 or v in graph[v]:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_no_import_cycles():
    found = cycles(import_graph())
    assert not found, "import cycles:\n  " + "\n  ".join(" <-> ".join(c) for c in found)


def test_the_cycle_finder_finds_cycles():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"a"}}) == [["a"]] and cycles({"a": {"b"}, "b": set()}) == []


TORCH = {"torch", "safetensors", "matplotlib", "onnxscript"}  # the training stack, torch and what needs it


def serve_imports() -> dict[str, str | None]:
    """Every module importing serve runs -> the module that imports it (None: a serve module): from every serve
    module, through every import, the parent packages of each module included (importing a.b runs a/__init__.py).
    Modules outside the project appear as their top-level package."""
    graph = import_graph()
    via: dict[str, str | None] = {}
    todo: list[tuple[str, str | None]] = [(m, None) for m in sorted(graph) if top(m) == "serve"]
    while todo:
        m, parent = todo.pop(0)
        if m in via:
            continue
        via[m] = parent
        if m not in graph:
            continue
        parts = m.split(".")
        todo.extend((".".join(parts[:i]), m) for i in range(1, len(parts)))
        for i in sorted(graph[m]):
            if i in graph:
                todo.append((i, m))
            elif top(i) in PROJECT:  # a name of a project package that is not a module: the package itself
                todo.append((i.rpartition(".")[0], m))
            else:
                todo.append((top(i), m))
    return via


def test_serve_never_imports_torch():
    via = serve_imports()
    chains = []
    for bad in sorted(TORCH & set(via)):
        chain = [bad]
        while via[chain[-1]] is not None:
            chain.append(via[chain[-1]])
        chains.append(" <- ".join(chain))
    assert not chains, "serve imports the training stack:\n  " + "\n  ".join(chains)
    assert "numpy" in via and "onnxruntime" in via  # the walk does reach outside packages


# -----------------------------------------------------------------------------
# `moe serve` where torch cannot be imported

exported = test_serve.exported  # a tiny random model, exported once with its step graph (m.step.onnx)


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
    inp.write_text("".join(json.dumps({"text": t}) + "\n" for t in test_serve.make_texts(8, seed=3)),
                   encoding="utf-8")
    blocked = moe_serve_outputs(exported[1], inp, tmp_path / "blocked.jsonl", args, no_torch)
    assert blocked == moe_serve_outputs(exported[1], inp, tmp_path / "normal.jsonl", args, None)
    assert len(blocked) == 8


def test_moe_serve_solves_without_torch(sudoku_model, no_torch, tmp_path):
    from moe_core import sudoku as S

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
    inp.write_text("".join(json.dumps({"text": t}) + "\n" for t in test_serve.make_texts(8, seed=4)),
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
