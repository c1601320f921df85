"""The package layers, checked on the source: moe_core is the bottom layer; train, export and serve sit on it and
never on each other, except export on train's nothing and serve on nobody's model code:

    moe_core  imports none of train, export, serve, benchmarks
    export    imports no serve and no train
    serve     imports no export and no train, and nothing it imports (transitively) imports torch
    no import cycle between the project's modules (benchmarks/ included; tests/ may import anything)
    moe_core.cli  names the commands of train, export and serve (SUBCOMMANDS) and imports them only to run them
    moe_core.tasks  the one list of tasks: train builds each, serve's modes come from it, no layer branches on a
              task's name

Imports are read from every .py file with ast, function-local ones included (a lazy import still runs).
tests/e2e/test_serving_install.py runs `moe serve` for real where `import torch` fails.
"""

from __future__ import annotations

import ast
from pathlib import Path

from helpers import REPO

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


def test_the_cli_reaches_up_only_through_its_dispatch_table():
    """`moe` (moe_core.cli) is the one place the bottom layer names the others: by module name in SUBCOMMANDS,
    imported when that command runs, so that `moe serve` never loads the training stack. Every target is a module
    of an upper package holding the command, and the import graph above holds for each of them."""
    from moe_core.cli import SUBCOMMANDS

    graph = import_graph()
    for name, (module, attr, _) in SUBCOMMANDS.items():
        assert top(module) in ("train", "export", "serve") and module in graph, (name, module)
        assert f"def {attr}(" in project_files()[module].read_text(encoding="utf-8"), (name, module, attr)
    assert not [m for m, imported in graph.items() if "moe_core.cli" in imported and top(m) == "moe_core"]


def test_every_task_is_built_by_every_layer_that_asks_for_it():
    """The task registry (moe_core.tasks) is the one list of tasks: train builds a Task for each, serve's modes
    come from it, and nothing outside it compares a task's name to decide what to do."""
    from moe_core.tasks import MODES, TASKS
    from train.tasks import BUILDERS

    assert set(BUILDERS) == set(TASKS) and set(MODES) == {m for t in TASKS.values() for m in t.serve_modes}
    compares = [f"{m}: {line.strip()}" for m, path in project_files().items() if m != "moe_core.tasks"
                for line in path.read_text(encoding="utf-8").splitlines()
                if any(f'task == "{t}"' in line or f'task != "{t}"' in line for t in TASKS)]
    assert not compares, "decided by a task's name:\n  " + "\n  ".join(compares)


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


def test_every_package_is_in_the_distribution():
    """pyproject lists the packages a wheel holds: a subpackage missing there imports from a checkout (and an
    editable install) but not from an installed wheel."""
    import tomllib

    listed = set(tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))["tool"]["setuptools"]["packages"])
    found = {module_name(p) for pkg in LAYERED for p in (REPO / pkg).rglob("__init__.py")}
    assert found <= listed, f"packages missing from pyproject.toml [tool.setuptools] packages: {sorted(found - listed)}"
