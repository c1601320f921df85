"""Serving that uses halting: the unrolled graph (every halting step for every sample, halting selected with masks)
against the step graph run step by step with halted samples dropped from the batch (moe_core/runtime/stepwise.py), on
the same inputs, batch by batch as `moe serve` cuts them.

Real inputs matter here, since the saving is the fraction of steps samples skip: with --run, windows of the run's
own validation text (a language model: the last train.val_fraction of its corpus, as training split it) or fresh
puzzles of the run's difficulty (a Sudoku model); without a run, random ids (a random-init model halts nowhere
before the last step: the step-wise runtime's overhead, not its gain).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from moe_core.model import RecursiveMoE
from moe_core.run_layout import TOKENIZER_FILE
from moe_core.runtime.graph_contract import HALT_STEP, LOGITS
from moe_core.runtime.stepwise import StepCounts
from moe_core.tasks import TASKS, sudoku
from serve.graph import TOKEN_LOGPROBS
from serve.runtime import OrtModel, StepwiseModel, open_model
from train.checkpointing import saved_run_config
from train.sudoku_task import sudoku_config

from .timing import measure


def real_inputs(model: RecursiveMoE, run_dir: Path | None, n: int, seed: int = 0) -> tuple[np.ndarray, str, str]:
    """(input_ids [n, T], the output serving reads, what the inputs are). T = the model's max_seq_len (81 cells)."""
    cfg = model.config
    T = cfg.max_seq_len
    run_cfg = saved_run_config(run_dir) if run_dir is not None else None
    if run_cfg is not None and TASKS[run_cfg.train.task].puzzles:  # new puzzles of the run's range ([sudoku])
        sc = sudoku_config(run_cfg)
        givens = (sc.givens_min, sc.givens_max)
        puzzles = sudoku.generate(n, f"halting-benchmark-{seed}", givens=givens).puzzles.astype(np.int64)
        return puzzles, LOGITS, f"{n} new puzzles of {givens[0]}-{givens[1]} givens (the run's range)"
    if run_dir is None:
        ids = np.random.default_rng(seed).integers(0, cfg.vocab_size, size=(n, T), dtype=np.int64)
        return ids, TOKEN_LOGPROBS, f"{n} x {T} random ids (no --run: a random-init model halts at the last step)"
    from train.data import load_documents, load_tokenizer, tokenize_corpus  # noqa: PLC0415 - a --run only

    assert run_cfg is not None  # run_dir is given
    tc = run_cfg.train
    data = tc.data
    tokens = tokenize_corpus(load_documents(data), load_tokenizer(run_dir / TOKENIZER_FILE), tc.val_fraction, T)
    val = tokens.val[: len(tokens.val) // T * T].reshape(-1, T).astype(np.int64)
    idx = np.random.default_rng(seed).choice(len(val), size=min(n, len(val)), replace=False)
    return val[np.sort(idx)], TOKEN_LOGPROBS, (f"{len(idx)} windows of {T} tokens of the run's validation text "
                                                f"({data or 'the default corpus'})")


def halting_section(model: RecursiveMoE, run_dir: Path | None, path: Path, export_s: float | None,
                    batches: tuple[int, ...], warmup: int, repeats: int, threads: int,
                    log: Callable[[str], None]) -> dict[str, Any]:
    """The suite's section: the exported model at `path` with its step graph beside it (suites.export_graphs),
    real inputs (2x the largest batch), `halting` on them."""
    ids, output, what = real_inputs(model, run_dir, 2 * max(batches))
    log(f"halting: unrolled vs step-wise on {what}, batch {', '.join(map(str, batches))}")
    return {**halting(path, ids, output, batches, warmup, repeats, threads), "inputs_what": what,
            "export_s": export_s}


def halting(path: Path, ids: np.ndarray, output: str, batches: tuple[int, ...], warmup: int, repeats: int,
            threads: int) -> dict[str, Any]:
    """Per batch size: the time to serve all of `ids` in batches of that size with each runtime (interleaved
    calls), tokens/s, the step-wise speed-up, the sample-steps it computed against the unrolled graph's, and
    the check that both give the same halt steps and outputs."""
    runtimes: dict[str, OrtModel | StepwiseModel] = {
        name: open_model(path, provider="cpu", threads=threads, runtime=name) for name in ("unrolled", "stepwise")}
    mask = np.ones_like(ids)
    rows = []
    for B in batches:
        def serve_all(m: OrtModel | StepwiseModel, B: int = B) -> list[np.ndarray]:
            parts = [m.run(ids[i:i + B], mask[i:i + B], [output, HALT_STEP]) for i in range(0, len(ids), B)]
            return [np.concatenate([p[k] for p in parts]) for k in range(2)]

        for m in runtimes.values():
            m.counts = StepCounts()
        t = measure({name: functools.partial(serve_all, m) for name, m in runtimes.items()}, warmup, repeats)
        (out_u, halt_u), (out_s, halt_s) = t["unrolled"].output, t["stepwise"].output
        c = runtimes["stepwise"].counts
        row: dict[str, Any] = {"batch": B, "inputs": len(ids), "seq": ids.shape[1],
                               "halt_steps_equal": bool(np.array_equal(halt_u, halt_s)),
                               "max_abs_output_diff": float(np.abs(out_u - out_s).max()),
                               "sample_steps_fraction": c.rows / c.full,
                               "stepwise_calls_per_pass": c.calls / (warmup + repeats)}
        for name, timing in t.items():
            row[name] = {**timing.to_dict(), "tokens_per_s": ids.size / timing.median}
        row["stepwise_vs_unrolled"] = t["unrolled"].median / t["stepwise"].median
        rows.append(row)
    halt = halt_u  # the same inputs in every cell: the same halting
    hist = np.bincount(halt, minlength=runtimes["unrolled"].info.halt_max_steps + 1)[1:]
    return {"graph": str(path), "output": output, "halt_step_mean": float(halt.mean()), "halt_hist": hist.tolist(),
            "halt_max_steps": runtimes["unrolled"].info.halt_max_steps, "rows": rows}


def table_lines(h: dict[str, Any]) -> list[str]:
    """The section of the printed table."""
    hist = " ".join(f"{s + 1}:{n}" for s, n in enumerate(h["halt_hist"]))
    exported = "" if h["export_s"] is None else f"; exported in {h['export_s']:.0f} s"
    lines = [f"halting: unrolled graph (all {h['halt_max_steps']} steps) vs step graph run step-wise (halted samples "
             f"leave the batch), ORT CPU, same inputs: {h['inputs_what']}; halt steps {hist} (mean "
             f"{h['halt_step_mean']:.2f}){exported}",
             f"  {'batch':>5} {'unrolled tok/s':>15} {'stepwise tok/s':>15} {'speed-up':>9} {'steps computed':>15}  "
             f"{'same halting':>12} {'max|diff|':>9}"]
    for r in h["rows"]:
        lines.append(f"  {r['batch']:>5} {r['unrolled']['tokens_per_s']:>15,.0f} "
                     f"{r['stepwise']['tokens_per_s']:>15,.0f} {r['stepwise_vs_unrolled']:>8.2f}x "
                     f"{r['sample_steps_fraction']:>14.0%}  "
                     f"{'yes' if r['halt_steps_equal'] else 'NO':>12} {r['max_abs_output_diff']:>9.1e}")
    return lines

