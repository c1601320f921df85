"""`moe eval RUN --ladder`: a Sudoku run on a difficulty ladder — held-out puzzle sets with an exact number of
givens each (default 50, 40, 35, 30, 25), harder as the givens get fewer, whatever range the run trained on.

    moe eval runs/sudoku-hard --ladder --halt-max-steps 1,2,4,8,16 --baseline runs/sudoku-hard-baseline

The ladder (moe_core.tasks.sudoku.make_ladder) is deterministic from --ladder-seed, in seed streams of its own, with
unique solutions, and held out under the symmetry group: no puzzle is equivalent to one of the run's train or
test puzzles (or the baseline's, when it trained on other puzzles). Each level's difficulty is measured by the
solver: rounds of singles placed all at once (moe_core.tasks.sudoku.deduction_rounds: a pass of the block can take
about one), the share that singles alone solve, and the guesses an exact search needs.

For each K in --halt-max-steps and each level, as `moe eval` does on the held-out set: whole-puzzle accuracy
(rule-checked), cell accuracy on the blanks and mean steps, with halting (each sample keeps the first step whose
halt logit is > 0, step K at the latest: what serving computes) and with the halt head ignored (all K steps).
Every K comes from one run of max(K) steps (sudoku_task.solve_steps); the baseline run is evaluated as trained.
How well halting is calibrated: ladder.json also has, per row, the share of puzzles that stopped before step K
and the share that stopped there without a solution.
OUT gets ladder.md (the tables, also printed), ladder.json (every figure), ladder.png and ladder_puzzles.txt (the
ladder with solutions, a comment line before each level: `moe serve --mode solve --input` reads it).
"""

from __future__ import annotations

import contextlib
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click
import numpy as np
import torch

from moe_core.checkpoint import drop_sharded_weights
from moe_core.common.errors import ConfigError
from moe_core.common.files import atomic_outputs, updating_input
from moe_core.model import RecursiveMoE
from moe_core.run_layout import CALIBRATION_FILE, WEIGHTS_FILE
from moe_core.tasks import sudoku

from . import halt_calibration
from .checkpointing import read_best, saved_run_config
from .config import RunConfig
from .distributed import autocast_for
from .eval_modes import BASELINE, MODES, baseline_label
from .plots import write_png
from .sudoku_task import SudokuTask, counts, data_spec, figures, halted_at, solve_batches, solve_steps, sudoku_config
from .tasks import make_task

if TYPE_CHECKING:
    from matplotlib.figure import Figure

OUTPUTS = ("ladder.md", "ladder.json", "ladder.png", "ladder_puzzles.txt")


def parse_givens(text: str) -> list[int]:
    """'50,40,35' -> distinct numbers of givens, most first (easiest level first)."""
    lo, hi = sudoku.GENERATED_GIVENS
    levels: set[int] = set()
    for part in text.split(","):
        try:
            g = int(part.strip())
        except ValueError:
            raise ConfigError(f"--ladder-givens: {part.strip()!r} is not a number of givens") from None
        if not lo <= g <= hi:
            raise ConfigError(f"--ladder-givens: {g}: expected numbers of givens in {lo}..{hi}")
        levels.add(g)
    return sorted(levels, reverse=True)


@dataclass
class Level:
    givens: int
    puzzles: np.ndarray  # uint8 [N, 81]
    solutions: np.ndarray  # uint8 [N, 81]
    guesses: np.ndarray  # [N] the exact search's guesses to solve and prove unique (sudoku.Search.guesses)
    rounds: np.ndarray  # [N] rounds of singles (sudoku.deduction_rounds)
    left: np.ndarray  # [N] blanks left when singles stall (0: singles alone solve it)
    skipped: int  # stream puzzles skipped as equivalent to an excluded or earlier puzzle

    def difficulty(self) -> dict[str, Any]:
        return {"givens": self.givens, "puzzles": len(self.puzzles), "blanks": sudoku.CELLS - self.givens,
                "rounds_median": float(np.median(self.rounds)), "rounds_mean": float(self.rounds.mean()),
                "rounds_max": int(self.rounds.max()), "solved_by_singles": float((self.left == 0).mean()),
                "guesses_mean": float(self.guesses.mean()), "skipped": self.skipped}


def training_keys(tasks: list[SudokuTask]) -> set[bytes]:
    """The equivalence keys of every train and test puzzle of the given Sudoku tasks: what the ladder excludes."""
    keys: set[bytes] = set()
    for task in tasks:
        for puzzles in (task.train_puzzles, task.test_puzzles):
            keys.update(sudoku.equivalence_keys(puzzles))
    return keys


def build_ladder(givens: list[int], size: int, seed: int, exclude: set[bytes]) -> list[Level]:
    levels = []
    for s, skipped in sudoku.make_ladder(givens, size, seed, exclude):
        g = int((s.puzzles[0] > 0).sum())
        rounds = [sudoku.deduction_rounds(p) for p in s.puzzles]
        levels.append(Level(g, s.puzzles, s.solutions, s.guesses, np.array([r.rounds for r in rounds]),
                            np.array([r.left for r in rounds]), skipped))
    return levels


def _row(name: str, level: Level, k: int, mode: str, answers: np.ndarray, steps: np.ndarray) -> dict[str, Any]:
    """The figures of one level at K = k. halted_early: the share that stopped before step k (the halt head
    said "done"); halted_early_wrong: the share that stopped before step k without a solution — where halting
    is not calibrated."""
    f = figures(*counts(level.puzzles, level.solutions, answers, steps))
    early = steps < k
    wrong = early & ~sudoku.valid_solutions(level.puzzles, answers)
    return {"model": name, "givens": level.givens, "halt_max_steps": k, "mode": mode,
            "puzzle_acc": f["puzzle_acc"], "cell_acc": f["cell_acc"], "mean_steps": f["val_halt_step"],
            "halted_early": float(early.mean()), "halted_early_wrong": float(wrong.mean())}


def ladder_rows(model: RecursiveMoE, name: str, levels: list[Level], steps: list[int], device: torch.device,
                batch_size: int) -> list[dict[str, Any]]:
    """One row per (level, K, mode) for the run's model, every K from one run of max(K) steps."""
    rows = []
    for level in levels:
        if model.config.recursive:
            answers, halt = solve_steps(model, level.puzzles, max(steps), batch_size, device, autocast_for(device))
        else:  # one pass: K does not apply, both modes are that pass
            answers = solve_batches(model, level.puzzles, batch_size, device, autocast_for(device))[0][None]
            halt = np.full((1, len(level.puzzles)), -np.inf)
        for k in steps:
            for mode in MODES:
                kept = halted_at(halt, k, halting=mode == "halting")  # [N] 1-based
                rows.append(_row(name, level, k, mode, answers[kept - 1, np.arange(len(kept))], kept))
    return rows


def baseline_rows(model: RecursiveMoE, name: str, levels: list[Level], device: torch.device,
                  batch_size: int) -> list[dict[str, Any]]:
    """The other run's model as trained (its own steps and halting), one row per level."""
    rows = []
    for level in levels:
        answers, steps, _ = solve_batches(model, level.puzzles, batch_size, device, autocast_for(device))
        rows.append(_row(name, level, model.config.n_steps, baseline_label(model, name), answers, steps))
    return rows


def run_ladder(run: Path, cfg: RunConfig, model: RecursiveMoE, task: SudokuTask, tokenizer_json: str,
               steps: list[int], givens: list[int], size: int, seed: int, baseline_dir: str | None,
               base_model: RecursiveMoE | None, device: torch.device, out_dir: Path, overwrite: bool,
               halt_budget: float | None = None) -> None:
    """`moe eval --ladder` once its arguments are checked and the run's task is built (train/evaluate.py); with
    halt_budget, halting calibrated first (train/halt_calibration.py) and the ladder run with the calibrated head."""
    tasks = [task]
    if base_model is not None:
        assert baseline_dir is not None  # the baseline model is loaded from baseline_dir
        base_cfg = saved_run_config(Path(baseline_dir))
        if data_spec(base_cfg) != data_spec(cfg):  # the baseline trained on other puzzles: exclude those too
            base_task = make_task(base_cfg, tokenizer_json, click.echo)
            assert isinstance(base_task, SudokuTask)  # the run's task: load_baseline checked it
            tasks.append(base_task)
    t0 = time.perf_counter()
    levels = build_ladder(givens, size, seed, training_keys(tasks))
    click.echo(f"ladder: {len(levels)} levels of {size} puzzles ({', '.join(str(g) for g in givens)} givens), "
               f"seed {seed}, none equivalent to a puzzle the run trained or was tested on "
               f"({time.perf_counter() - t0:.1f}s)")
    batch = cfg.train.batch_size
    calibration = None
    if halt_budget is not None:
        t0 = time.perf_counter()
        calibration = halt_calibration.calibrate(run, model, task.test_puzzles, max(steps), halt_budget, batch,
                                                 device, autocast_for(device))
        click.echo(f"{halt_calibration.describe(calibration)} ({time.perf_counter() - t0:.1f}s)")
    t0 = time.perf_counter()
    rows = ladder_rows(model, run.name, levels, steps, device, batch)
    if base_model is not None:
        assert baseline_dir is not None
        rows += baseline_rows(base_model, Path(baseline_dir).name, levels, device, batch)
    click.echo(f"ladder: evaluated K = {', '.join(map(str, steps))} ({time.perf_counter() - t0:.1f}s)")
    trained = model.config.halt_max_steps if model.config.recursive else 1
    weights = describe_weights(run, cfg)
    about = {"run": str(run), "weights": weights, "trained": describe_run(cfg),
             "ladder": {"seed": seed, "size": size, "givens": givens}, "halt_max_steps": steps,
             "trained_halt_max_steps": trained,
             "halt_calibration": None if calibration is None else halt_calibration.record(calibration)}
    title = f"{run.name}: difficulty ladder"
    calibrated = "" if calibration is None else f" {halt_calibration.describe(calibration)}."
    md = to_markdown(title, f"{describe_run(cfg)}; weights: {weights}. {size} puzzles per level, ladder seed "
                     f"{seed}.{calibrated}", levels, rows, steps, trained)
    # Every output, and with calibration the run's record and weights (last), published together or not at all
    # (files.atomic_outputs): figures that claim a calibration never stay without it, nor it without them. Without
    # --overwrite each output is created, never replaced.
    texts = {"ladder.json": to_json(about, levels, rows), "ladder_puzzles.txt": puzzles_text(levels), "ladder.md": md}
    paths = [out_dir / n for n in OUTPUTS]
    run_files = [] if calibration is None else [run / CALIBRATION_FILE, run / WEIGHTS_FILE]
    with contextlib.ExitStack() as stack:
        if run_files:
            stack.enter_context(updating_input(run / WEIGHTS_FILE))  # the one input this command exists to update
        tmps = stack.enter_context(atomic_outputs([*paths, *run_files],
                                                  [overwrite] * len(paths) + [True] * len(run_files)))
        for path, tmp in zip(paths, tmps, strict=False):
            if path.name == "ladder.png":
                write_png(figure(rows, levels, steps, trained, title), tmp)
            else:
                Path(tmp).write_text(texts[path.name], encoding="utf-8")
        if run_files:
            assert calibration is not None  # run_files is empty without one
            halt_calibration.write_into(tmps[len(paths)], tmps[len(paths) + 1], model, calibration)
    if run_files:
        drop_sharded_weights(run)  # an FSDP run's published shards would be read in place of these weights
    click.echo(md + f"written: {', '.join(str(p) for p in [*paths, *run_files])}")


# -----------------------------------------------------------------------------
# outputs


def describe_weights(run: Path, cfg: RunConfig) -> str:
    """Which weights RUN_DIR/model.safetensors holds (train.keep_best, train.ema_decay)."""
    best = read_best(run)
    ema = "the moving average (EMA)" if cfg.train.ema_decay > 0 else "raw"
    if best is not None:
        return f"{ema}, best evaluation (step {best['step']}, by {', '.join(map(str, best['by']))})"
    if cfg.train.keep_best:
        return "as seeded (keep_best: no evaluation kept yet)"
    return f"{ema}, last checkpoint"


def describe_run(cfg: RunConfig) -> str:
    mc, tc, sc = cfg.model, cfg.train, sudoku_config(cfg)
    trained = (f"{Path(tc.data).name}" if tc.data else
               f"{sc.givens_min}-{sc.givens_max} givens"
               + (f" (curriculum from {sc.curriculum_start})" if sc.curriculum_start else ""))
    shape = (f"halt_max_steps {mc.halt_max_steps}, H{mc.H_cycles} x L{mc.L_cycles}" if mc.recursive
             else "recursion off")
    return f"trained on {trained}, {shape}"


def to_markdown(title: str, about: str, levels: list[Level], rows: list[dict[str, Any]], steps: list[int],
                trained: int) -> str:
    lines = [f"# {title}", "", about, "",
             "| givens | puzzles | blanks | rounds of singles: median (mean, max) | solved by singles alone "
             "| mean guesses (exact search) | skipped as equivalent |",
             "|---:|---:|---:|---:|---:|---:|---:|"]
    for lv in levels:
        d = lv.difficulty()
        lines.append(f"| {d['givens']} | {d['puzzles']} | {d['blanks']} | {d['rounds_median']:g} "
                     f"({d['rounds_mean']:.1f}, {d['rounds_max']}) | {d['solved_by_singles']:.1%} "
                     f"| {d['guesses_mean']:.2f} | {d['skipped']} |")
    base = [r for r in rows if r["mode"].startswith(BASELINE)]
    base_modes = list(dict.fromkeys(r["mode"] for r in base))
    for mode, what in zip(MODES, ("puzzle acc / cell acc (blanks) / mean steps, halting as served",
                                  "puzzle acc / cell acc (blanks), the halt head ignored: every puzzle runs K steps"),
                          strict=True):
        heads = [f"K={k}" + (" (trained)" if k == trained else "") for k in steps]
        lines += ["", f"**{mode}**: {what}", "", "| givens | " + " | ".join(heads + base_modes) + " |",
                  "|---:|" + "---:|" * (len(heads) + len(base_modes))]
        for lv in levels:
            cells = []
            for r in [_find(rows, lv.givens, k, mode) for k in steps] + [_find(base, lv.givens, None, m)
                                                                           for m in base_modes]:
                cell = f"{r['puzzle_acc']:.3f} / {r['cell_acc']:.3f}"
                cells.append(cell + (f" / {r['mean_steps']:.2f}" if mode == "halting" else ""))
            lines.append(f"| {lv.givens} | " + " | ".join(cells) + " |")
    lines += ["", "**halting calibration**: the share of puzzles stopped before step K / the share stopped there "
              "unsolved (the halt head said done on a wrong answer)", "",
              "| givens | " + " | ".join(f"K={k}" for k in steps) + " |", "|---:|" + "---:|" * len(steps)]
    for lv in levels:
        cells = [f"{r['halted_early']:.3f} / {r['halted_early_wrong']:.3f}"
                 for r in (_find(rows, lv.givens, k, "halting") for k in steps)]
        lines.append(f"| {lv.givens} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _find(rows: list[dict[str, Any]], givens: int, k: int | None, mode: str) -> dict[str, Any]:
    """The row of a level and mode (and K, unless None: a baseline's one row per level)."""
    return next(r for r in rows if r["givens"] == givens and r["mode"] == mode
                and (k is None or r["halt_max_steps"] == k))


def to_json(about: dict[str, Any], levels: list[Level], rows: list[dict[str, Any]]) -> str:
    return json.dumps({**about, "levels": [lv.difficulty() for lv in levels], "rows": rows}, indent=1) + "\n"


def puzzles_text(levels: list[Level]) -> str:
    out = []
    for lv in levels:
        out.append(f"# {lv.givens} givens: {len(lv.puzzles)} puzzles, each followed by its solution\n")
        out += [f"{sudoku.format_grid(p)} {sudoku.format_grid(s)}\n" for p, s in zip(lv.puzzles, lv.solutions,
                                                                                    strict=True)]
    return "".join(out)


def figure(rows: list[dict[str, Any]], levels: list[Level], steps: list[int], trained: int, title: str) -> Figure:
    """Three panels against the number of givens (fewer, harder, to the right): whole-puzzle accuracy with all K
    steps, the same with halting, and the mean steps halting takes; a line per K, the baseline dashed."""
    from matplotlib import colormaps  # noqa: PLC0415 - matplotlib only when plotting

    from .plots import new_figure, style_axes  # noqa: PLC0415

    givens = [lv.givens for lv in levels]
    colors = colormaps["viridis"](np.linspace(0.0, 0.85, len(steps)))
    fig = new_figure(layout="constrained", figsize=(15, 4.6))
    axes = fig.subplots(1, 3)
    panels = (("all K", "puzzle_acc", "whole-puzzle acc, all K steps"),
              ("halting", "puzzle_acc", "whole-puzzle acc, with halting"),
              ("halting", "mean_steps", "mean steps taken, with halting"))
    for ax, (mode, key, label) in zip(axes, panels, strict=True):
        for k, color in zip(steps, colors, strict=True):
            ys = [_find(rows, g, k, mode)[key] for g in givens]
            ax.plot(givens, ys, "o-", color=color, lw=2.2 if k == trained else 1.2,
                    label=f"K = {k}" + (" (trained)" if k == trained else ""))
        if key == "puzzle_acc":
            for m in dict.fromkeys(r["mode"] for r in rows if r["mode"].startswith(BASELINE)):
                ax.plot(givens, [_find(rows, g, None, m)[key] for g in givens], "k--", lw=1.2, label=m)
            ax.set_ylim(0, 1)
        ax.set_xticks(givens)
        ax.invert_xaxis()
        style_axes(ax, label, label.split(",")[0], xlabel="givens (fewer = harder)", legend=ax is axes[0])
    fig.suptitle(title)
    return fig
