"""`moe eval`: a trained run's held-out figures against the number of supervision steps it may take.

    moe eval runs/sudoku --halt-max-steps 1,2,4,8,16 --out runs/sudoku/eval

The run's own task and held-out set (rebuilt from its config.json: the generated Sudoku test puzzles or the
language-model val batches) are evaluated by the eval-mode model with halt_max_steps set to each K in turn,
two ways:

  halting   what export and serve compute: each sample stops at the first step whose halt logit is > 0, at
            step K at the latest;
  all K     the halt head ignored: every sample runs all K steps (what more thinking alone buys).

K may exceed the trained halt_max_steps: the steps share their weights, so the model runs further as it is.
OUT/eval.md, OUT/eval.csv and OUT/eval.png (the task's headline figure against K, both ways) are written
atomically and the table is printed. A Sudoku run also gets OUT/test_puzzles.txt: the held-out puzzles with
their solutions, one line each, for `moe serve --mode solve --input` (its `correct` count reproduces the
halting row at the trained halt_max_steps).

`--ladder` evaluates a Sudoku run on a difficulty ladder instead: held-out sets by number of givens
(train/ladder.py).
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import io
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click
import torch
from tokenizers import Tokenizer

from moe_core.checkpoint import load_model
from moe_core.cli import finite
from moe_core.common.errors import ConfigError, os_reason
from moe_core.common.files import atomic_outputs, check_not_inputs
from moe_core.common.tokenizer import read_tokenizer
from moe_core.config import MAX_CYCLES
from moe_core.model import RecursiveMoE
from moe_core.run_layout import EVAL_DIR, PUZZLES_FILE, TOKENIZER_FILE
from moe_core.tasks import TASKS

from .checkpointing import saved_run_config
from .config import DEVICES, RunConfig
from .distributed import autocast_for, use_cuda
from .eval_modes import BASELINE, MODES, baseline_label
from .ladder import OUTPUTS as LADDER_OUTPUTS
from .ladder import parse_givens, run_ladder
from .plots import write_png
from .rundir_lock import RunDirLock
from .sudoku_task import SudokuTask
from .tasks import Task, make_task

if TYPE_CHECKING:
    from matplotlib.figure import Figure

OUTPUTS = ("eval.md", "eval.csv", "eval.png")


def parse_steps(text: str) -> list[int]:
    """'1,2,4' or '1-8' or a mix -> sorted distinct ints in 1..MAX_CYCLES."""
    steps: set[int] = set()
    for part in text.split(","):
        part = part.strip()
        try:
            lo, _, hi = part.partition("-")
            a, b = int(lo), int(hi or lo)
        except ValueError:
            raise ConfigError(f"--halt-max-steps: {part!r} is not a step count or a range like 1-8") from None
        if not 1 <= a <= b <= MAX_CYCLES:
            raise ConfigError(f"--halt-max-steps: {part!r}: expected counts in 1..{MAX_CYCLES}, low to high")
        steps.update(range(a, b + 1))
    return sorted(steps)


def with_steps(model: RecursiveMoE, k: int, halting: bool) -> RecursiveMoE:
    """The same weights, running at most k supervision steps; halting=False silences the halt head (its logit is
    -inf, so no sample halts before step k)."""
    m = RecursiveMoE(dataclasses.replace(model.config, halt_max_steps=k)).to(next(model.parameters()).device)
    m.load_state_dict(model.state_dict())
    if not halting:
        with torch.no_grad():
            m.halt_head.bias.fill_(-math.inf)
    return m.eval()


def sweep(model: RecursiveMoE, task: Task, steps: list[int], device: torch.device,
          log: Any = print) -> list[dict[str, Any]]:
    """One row per (K, mode): the task's evaluation of the model limited to K steps (under the trainer's
    autocast: bf16 on CUDA, so the trained-K halting row is the trainer's evaluation on every device)."""
    rows = []
    for k in steps:
        for mode in MODES:
            ev = task.evaluate(with_steps(model, k, mode == "halting"), device, autocast_for(device))
            rows.append({"halt_max_steps": k, "mode": mode, **ev})
            log(f"K={k:>2} {mode:<8} {task.describe(ev)} | mean steps {ev['val_halt_step']:.2f}")
    return rows


def load_baseline(base: Path, run: Path, cfg: RunConfig, tokenizer_json: str, device: torch.device) -> RecursiveMoE:
    """The other run's model, checked to share `run`'s task and vocabulary (before any evaluation is spent)."""
    base_cfg = saved_run_config(base)
    if base_cfg.train.task != cfg.train.task:
        raise ConfigError(f"--baseline {base}: a {base_cfg.train.task!r} run; expected the task of {run} "
                          f"({cfg.train.task!r})")
    theirs, _ = read_tokenizer(base / TOKENIZER_FILE, base_cfg.model.vocab_size)
    if Tokenizer.from_str(theirs).get_vocab() != Tokenizer.from_str(tokenizer_json).get_vocab():
        raise ConfigError(f"--baseline {base / TOKENIZER_FILE}: another vocabulary than {run}'s; expected the same "
                          f"tokenizer (the same ids mean the same tokens)")
    return load_model(base, device)


def baseline_row(model: RecursiveMoE, name: str, task: Task, device: torch.device) -> dict[str, Any]:
    """The other run's model (as trained: its own steps and halting) on `task`'s held-out set."""
    ev = task.evaluate(model, device, autocast_for(device))
    return {"halt_max_steps": model.config.n_steps, "mode": baseline_label(model, name), **ev}


def table(rows: list[dict[str, Any]], task: str, trained: int) -> str:
    cols = TASKS[task].figures
    lines = ["| K (halt_max_steps) | mode | " + " | ".join(h for _, h, _ in cols) + " |",
             "|---:|---|" + "---:|" * len(cols)]
    for r in rows:
        mine = r["halt_max_steps"] == trained and not r["mode"].startswith(BASELINE)
        k = f"**{r['halt_max_steps']}** (trained)" if mine else str(r["halt_max_steps"])
        lines.append(f"| {k} | {r['mode']} | " + " | ".join(f.format(r[key]) for key, _, f in cols) + " |")
    return "\n".join(lines) + "\n"


def to_csv(rows: list[dict[str, Any]]) -> str:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(rows[0]), lineterminator="\n")
    w.writeheader()
    w.writerows(rows)
    return buf.getvalue()


def figure(rows: list[dict[str, Any]], task: str, trained: int, title: str) -> Figure:
    from matplotlib.ticker import MaxNLocator  # noqa: PLC0415

    from .plots import new_figure, style_axes  # noqa: PLC0415

    key, header, _ = TASKS[task].figures[0]
    fig = new_figure(layout="constrained", figsize=(7, 4.5))
    ax = fig.subplots()
    for mode, style in zip(MODES, ("o-", "s--"), strict=True):
        pts = [(r["halt_max_steps"], r[key]) for r in rows if r["mode"] == mode]
        ax.plot(*zip(*pts, strict=True), style, label=mode if mode == "halting" else "all K steps (halt ignored)")
    for r in rows:
        if r["mode"].startswith(BASELINE):
            ax.axhline(r[key], color="C3", lw=1.2, ls="-.", label=f"{r['mode']}: {r[key]:.3g}")
    ax.axvline(trained, color="grey", lw=0.8, ls=":", label=f"trained with halt_max_steps = {trained}")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    if key.endswith("_acc"):
        ax.set_ylim(0, 1)
    style_axes(ax, title, header, xlabel="K = halt_max_steps at inference")
    return fig


@click.command(context_settings={"show_default": True})
@click.argument("run_dir", type=click.Path())
@click.option("--halt-max-steps", "--steps", "steps_text", default="1-8", metavar="LIST",
              help="The K values to evaluate: counts and ranges, e.g. 1,2,4,8 or 1-16.")
@click.option("--ladder", is_flag=True,
              help="Sudoku: evaluate on a difficulty ladder, one held-out set per number of givens, instead of the "
                   "run's held-out set (ladder.md/.json/.png, ladder_puzzles.txt).")
@click.option("--ladder-givens", default="50,40,35,30,25", metavar="LIST",
              help="With --ladder: the levels, as numbers of givens.")
@click.option("--ladder-size", default=500, type=click.IntRange(1, 100_000),
              help="With --ladder: puzzles per level (whole-puzzle accuracy near 0.5 has a standard error of "
                   "0.5 / sqrt(size)).")
@click.option("--ladder-seed", default=0, type=click.IntRange(0, 2**63 - 1),
              help="With --ladder: the seed of its puzzles (their own streams, never a training set's).")
@click.option("--calibrate-halting", is_flag=True,
              help="With --ladder: choose the halting threshold at the largest K on the run's held-out set (the "
                   "fewest steps that solve at most --halt-budget fewer puzzles than all K steps), fold it into the "
                   "halt head's bias and write RUN_DIR/model.safetensors and halt_calibration.json: the ladder, "
                   "export and serve then halt calibrated.")
@click.option("--halt-budget", default=0.01, type=float, callback=finite("a number in [0, 1]", lambda v: 0 <= v <= 1),
              help="With --calibrate-halting: the puzzle accuracy halting may lose on the held-out set.")
@click.option("--out", default=None, type=click.Path(),
              help="Directory for the outputs (eval.md/.csv/.png, or the ladder's). Default: RUN_DIR/eval.")
@click.option("--baseline", "baseline_dir", default=None, type=click.Path(),
              help="Another run of the same task and tokenizer (e.g. recursion off), evaluated on RUN_DIR's "
                   "held-out set (or ladder): one more row, and a line on the plot.")
@click.option("--device", type=click.Choice(DEVICES), default="auto",
              help="auto: CUDA where present, else CPU.")
@click.option("--overwrite", is_flag=True, help="Replace eval outputs already in --out.")
def eval_(run_dir: str, steps_text: str, ladder: bool, ladder_givens: str, ladder_size: int, ladder_seed: int,
          calibrate_halting: bool, halt_budget: float, out: str | None, baseline_dir: str | None, device: str,
          overwrite: bool) -> None:
    """Evaluate RUN_DIR's model on its held-out set for each K = halt_max_steps, with and without halting."""
    run = Path(run_dir)
    steps = parse_steps(steps_text)
    ctx = click.get_current_context()
    given = [f"--{n.replace('_', '-')}" for n in ("ladder_givens", "ladder_size", "ladder_seed", "calibrate_halting",
                                                  "halt_budget")
             if ctx.get_parameter_source(n) is not click.core.ParameterSource.DEFAULT]
    if given and not ladder:
        raise ConfigError(f"{given[0]}: only with --ladder")
    cfg = saved_run_config(run)
    spec = TASKS[cfg.train.task]
    if ladder and not spec.puzzles:
        raise ConfigError(f"--ladder: {run} is a {cfg.train.task!r} run; expected a Sudoku run (train.task = "
                          f"'sudoku')")
    if ladder:

        levels = parse_givens(ladder_givens)
        names = list(LADDER_OUTPUTS)
    else:
        names = [*OUTPUTS, PUZZLES_FILE] if spec.puzzles else list(OUTPUTS)
    dev = torch.device("cuda" if use_cuda(device, "--device") else "cpu")
    out_dir = Path(out) if out is not None else run / EVAL_DIR
    # Everything that can be refused is refused before the evaluations are spent, and every argument before
    # anything is created: a refused command leaves no empty output directory behind.
    if out_dir.exists() and not out_dir.is_dir():
        raise ConfigError(f"--out {out_dir}: exists and is not a directory")
    existing = [n for n in names if (out_dir / n).exists()]
    if existing and not overwrite:
        raise ConfigError(f"--out {out_dir / existing[0]}: exists; pass --overwrite to replace the eval outputs")
    if calibrate_halting:
        # Calibration rewrites the run's weights: it is a writer of the run directory and holds its lock (one writer
        # at a time: a training run or another calibration is refused, and waits for none) from before it reads the
        # weights until it has written them; a run directory it cannot write is refused here, before the ladder.
        lock = RunDirLock(run)
        lock.acquire()
        ctx.call_on_close(lock.release)
    model = load_model(run, dev)  # notes the run's files as inputs of this command
    if calibrate_halting and not model.config.recursive:
        raise ConfigError(f"--calibrate-halting: {run} has recursion off (one step: nothing to halt)")
    tok_text, _ = read_tokenizer(run / TOKENIZER_FILE, cfg.model.vocab_size)
    base_model = None if baseline_dir is None else load_baseline(Path(baseline_dir), run, cfg, tok_text, dev)
    data = [(p, "the run's train.data") for p in (cfg.train.data,) if p]
    check_not_inputs([out_dir / n for n in names], data, option="--out")
    created = not out_dir.exists()
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"--out {out_dir}: cannot create the output directory ({os_reason(e)})") from None
    try:
        evaluate(run, cfg, model, base_model, baseline_dir, tok_text, steps, dev, out_dir, names, overwrite,
                 ladder=(levels, ladder_size, ladder_seed, halt_budget if calibrate_halting else None) if ladder
                 else None)
    except BaseException:
        if created:  # an --out this command made and could not fill goes again (an interrupted run included)
            with contextlib.suppress(OSError):
                out_dir.rmdir()
        raise


def evaluate(run: Path, cfg: RunConfig, model: RecursiveMoE, base_model: RecursiveMoE | None,
             baseline_dir: str | None, tok_text: str, steps: list[int], dev: torch.device, out_dir: Path,
             names: list[str], overwrite: bool, ladder: tuple | None) -> None:
    """The evaluation proper, into out_dir: the ladder's (`ladder`: levels, size, seed, calibration budget) or the
    held-out sweep's outputs, published together (files.atomic_outputs)."""
    if not model.config.recursive:
        steps = [1]  # the baseline has one pass: K does not apply
    task = make_task(cfg, tok_text, click.echo)
    if ladder is not None:
        assert isinstance(task, SudokuTask)  # eval_ takes --ladder only for a puzzles task: Sudoku
        levels, size, seed, budget = ladder
        run_ladder(run, cfg, model, task, tok_text, steps, levels, size, seed, baseline_dir, base_model, dev, out_dir,
                   overwrite, budget)
        return
    rows = sweep(model, task, steps, dev, click.echo)
    if base_model is not None:
        assert baseline_dir is not None  # the baseline model is loaded from baseline_dir
        rows.append(baseline_row(base_model, Path(baseline_dir).name, task, dev))
        click.echo(f"{rows[-1]['mode']}: {task.describe(rows[-1])}")
    trained = model.config.halt_max_steps if model.config.recursive else 1
    md = table(rows, task.name, trained)
    texts = {"eval.csv": to_csv(rows), "eval.md": md}
    if TASKS[task.name].puzzles:
        from moe_core.tasks.sudoku import format_grid

        assert isinstance(task, SudokuTask)  # the one task with puzzles

        texts[PUZZLES_FILE] = "".join(f"{format_grid(p)} {format_grid(s)}\n"
                                      for p, s in zip(task.test_puzzles, task.test_solutions, strict=True))
    # Without --overwrite every output is created, never replaced: one that appeared meanwhile is refused.
    with atomic_outputs([out_dir / n for n in names], overwrite) as tmps:
        for name, tmp in zip(names, tmps, strict=True):
            if name == "eval.png":
                write_png(figure(rows, task.name, trained,
                                 f"{run.name}: {TASKS[task.name].figures[0][1]} against the steps allowed"), tmp)
            else:
                Path(tmp).write_text(texts[name], encoding="utf-8")
    click.echo(md + f"written: {', '.join(str(out_dir / n) for n in names)}")
