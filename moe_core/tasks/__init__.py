"""The tasks a run can have (its train.task) and what every layer asks of one: a TaskSpec each, in TASKS.

Export, serve, eval and benchmarks look the run's task up here instead of comparing its name; the training side of a
task (its data, loss, batches and evaluation) is train's Task of the same name (train/tasks.py). A new task is a
TaskSpec here and a Task there. Torch-free: serve imports it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from ..common.errors import MoeError
from . import sudoku
from .config import SudokuConfig

Case = tuple[str, np.ndarray, np.ndarray]  # (name, input_ids [B, T] int64, attention_mask [B, T] int64)


@dataclass(frozen=True)
class TaskSpec:
    name: str  # train.task
    title: str  # what a model of the task is called in a message
    serve_modes: tuple[str, ...]  # the `moe serve --mode` values that serve it
    generates: bool  # causal generation with a KV cache: export writes the decode graph, serve opens it
    carry: bool  # train.supervision = "carry": a row's halt target is known at each step
    puzzles: bool  # inputs are generated puzzles: `moe eval` writes the ones it ran and takes --ladder
    # moe eval's figures, in table order: (key, header, format); the first is the plot's y axis.
    figures: tuple[tuple[str, str, str], ...]
    # (vocab_size, max_seq_len, seed) -> the inputs export's parity check runs: what serving can feed such a model.
    parity_inputs: Callable[[int, int, int], list[Case]]
    # (vocab_size, max_seq_len, the graph's `causal` metadata) -> why a graph cannot serve the task, or None.
    graph_problem: Callable[[int, int, str], str | None]
    # The dataclass of the task's own config section, `[name]` (moe_core.tasks.config); None: the task has none.
    config: type | None = None


def language_parity_inputs(vocab_size: int, max_seq_len: int, seed: int) -> list[Case]:
    """Batch 1 and larger, lengths 1 / middle / maximum, right-padded batches, and every token id of the vocabulary."""
    rng = np.random.default_rng(seed)
    T, mid = max_seq_len, max(1, max_seq_len // 2)

    def rand(b: int, t: int) -> np.ndarray:
        return rng.integers(0, vocab_size, size=(b, t), dtype=np.int64)

    cases = [("batch1_seq1", rand(1, 1)), ("batch1_max", rand(1, T)), ("batch4_mid", rand(4, mid)),
             ("batch8_max", rand(8, T)), ("batch5_seq1", rand(5, 1))]
    out = [(name, ids, np.ones_like(ids)) for name, ids in cases]
    # Every id appears at least once (first, last and everything between), with random context around it.
    n = -(-vocab_size // T)
    ids = rand(n, T).reshape(-1)
    ids[:vocab_size] = rng.permutation(vocab_size)
    out.append(("whole_vocab", ids.reshape(n, T), np.ones((n, T), dtype=np.int64)))
    # Right padding: random lengths 1..T, pad id 0 (any id: padded positions must not matter).
    lengths = np.concatenate([[1, T], rng.integers(1, T + 1, size=4)])
    mask = (np.arange(T)[None, :] < lengths[:, None]).astype(np.int64)
    out.append(("padded_batch6", np.where(mask == 1, rand(6, T), 0), mask))
    return out


def sudoku_parity_inputs(vocab_size: int, max_seq_len: int, seed: int) -> list[Case]:
    """What `--mode solve` feeds a Sudoku model: 81-cell grids whose givens do not conflict (it refuses anything
    else, and the other modes refuse the model), from a handful of givens up to solved grids. Outside that domain a
    deep recursion is ill-conditioned, so no fp32 implementation can agree with another there: a trained 16-step
    model's eager fp32 logits differ from its own fp64 ones by up to 0.3 of the logit scale on random digit strings
    and single cells, against 1e-5 on puzzles (benchmarks/RESULTS.md)."""
    def puzzles(n: int, givens: tuple[int, int], stream: str) -> np.ndarray:
        return sudoku.generate(n, f"parity/{seed}/{stream}", givens=givens).puzzles.astype(np.int64)

    solved = sudoku.generate(2, f"parity/{seed}/solved", givens=(40, 50)).solutions.astype(np.int64)
    cases = [("sudoku_one", puzzles(1, (25, 50), "one")), ("sudoku_grids", puzzles(8, (25, 50), "grids")),
             ("sudoku_hard", puzzles(4, (23, 28), "hard")), ("sudoku_solved", solved)]
    return [(name, ids, np.ones_like(ids)) for name, ids in cases]


def _language_graph_problem(vocab_size: int, max_seq_len: int, causal: str) -> str | None:
    if causal != "true":
        return (f"the model is not causal (metadata causal={causal}); scoring and generation need a causal language "
                "model")
    return None


def _sudoku_graph_problem(vocab_size: int, max_seq_len: int, causal: str) -> str | None:
    if vocab_size != sudoku.VOCAB or max_seq_len < sudoku.CELLS:
        return (f"a sudoku model with vocab_size {vocab_size} and max_seq_len {max_seq_len}; expected vocab_size "
                f"{sudoku.VOCAB} (blank + 9 digits) and max_seq_len >= {sudoku.CELLS}")
    return None


TASKS: dict[str, TaskSpec] = {spec.name: spec for spec in (
    TaskSpec("lm", "a language model", ("score", "generate"), generates=True, carry=False, puzzles=False,
             figures=(("val_loss", "val loss", "{:.4f}"), ("val_ppl", "ppl", "{:.2f}"),
                      ("val_halt_step", "mean steps", "{:.2f}")),
             parity_inputs=language_parity_inputs, graph_problem=_language_graph_problem),
    TaskSpec("sudoku", "a Sudoku model", ("solve",), generates=False, carry=True, puzzles=True,
             figures=(("puzzle_acc", "puzzle acc", "{:.4f}"), ("cell_acc", "cell acc (blanks)", "{:.4f}"),
                      ("val_loss", "val loss", "{:.4f}"), ("val_halt_step", "mean steps", "{:.2f}")),
             parity_inputs=sudoku_parity_inputs, graph_problem=_sudoku_graph_problem, config=SudokuConfig),
)}
MODES: dict[str, TaskSpec] = {mode: spec for spec in TASKS.values() for mode in spec.serve_modes}  # serve's --mode


def task_spec(name: str) -> TaskSpec:
    """The TaskSpec of `name`; MoeError for a name no task has (a run or graph from elsewhere)."""
    try:
        return TASKS[name]
    except KeyError:
        raise MoeError(f"task {name!r}: expected one of {', '.join(TASKS)}") from None
