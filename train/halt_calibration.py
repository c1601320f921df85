"""Calibrated halting for Sudoku runs: `moe eval RUN --ladder --calibrate-halting`.

A sample halts at the first step whose halt logit is > 0. The head is trained on "the current answer is completely
right" at the trained steps only; served with more steps (K beyond halt_max_steps), it says "done" on some wrong
answers, and halting then costs accuracy. Calibration moves the decision threshold: on a calibration set, the
halting rule "first step whose logit is > tau, step K if none" is evaluated for every candidate tau at the largest K
served, and the tau that computes the fewest steps while solving at most `budget` fewer puzzles than running all K
steps is kept. The rule is then made the model's own: tau is subtracted from the halt head's bias (a logit minus tau
is the same linear head with bias - tau), so every reader of the weights — eval, export, serve — halts by the same
"> 0" test and needs nothing new.

The calibration set is the run's own held-out test set; the ladder (train/ladder.py) excludes every puzzle equivalent
to it, so the ladder's halting figures are measured on puzzles the threshold was not chosen on.

RUN_DIR/halt_calibration.json records tau, the halt head's trained bias and the calibration figures; calibrating
again starts from that trained bias, so it never compounds. RUN_DIR/model.safetensors is rewritten with the
calibrated bias, published with the record and the ladder's figures as one set (all or nothing), under the run
directory's lock (one writer at a time). Training on (resume) publishes new weights, whose halting is the trained
head's again.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from moe_core.checkpoint import read_json, write_weights
from moe_core.common.errors import ConfigError
from moe_core.model import RecursiveMoE
from moe_core.run_layout import CALIBRATION_FILE
from moe_core.tasks import sudoku

from .sudoku_task import solve_steps

NEVER = -1e9  # the halt bias of "never halt before step K"
CANDIDATES = 512  # thresholds tried: quantiles of the calibration set's halt logits, plus 0 (the trained rule)


@dataclass
class Calibration:
    tau: float  # the threshold folded into the halt head's bias
    trained_bias: float  # the halt head's bias as trained
    calibrated_bias: float  # the bias written: trained_bias - tau (NEVER for tau = +inf)
    k: int  # the largest K served, at which tau was chosen
    budget: float  # the puzzle accuracy halting may lose against all K steps, on the calibration set
    puzzles: int  # in the calibration set
    acc_all_steps: float  # its whole-puzzle accuracy with all K steps
    acc_trained: float  # ... halting with the trained head (tau = 0)
    steps_trained: float  # mean steps, trained head
    acc_calibrated: float  # ... halting at tau
    steps_calibrated: float  # mean steps at tau


def kept_steps(halt: np.ndarray, tau: float) -> np.ndarray:
    """[N] the 1-based step each sample keeps when every step of halt logits [K, N] runs: the first whose logit is
    > tau, the last if none."""
    over = halt > tau
    return np.where(over.any(axis=0), over.argmax(axis=0) + 1, len(halt))


def choose_tau(halt: np.ndarray, solved: np.ndarray, budget: float) -> tuple[float, float, float]:
    """(tau, puzzle accuracy, mean steps) of the threshold that computes the fewest steps with at most `budget` less
    accuracy than all K steps, from halt logits [K, N] and whether each step's answer is a solution [K, N]. Among
    equal step counts the lowest tau; tau = +inf (never halt early) always qualifies."""
    n = halt.shape[1]
    floor = solved[-1].mean() - budget - 1e-12
    candidates = np.unique(np.concatenate([np.quantile(halt, np.linspace(0.0, 1.0, CANDIDATES)), [0.0]]))
    best = (float("inf"), float(solved[-1].mean()), float(len(halt)))
    for tau in candidates:
        kept = kept_steps(halt, tau)
        acc, steps = float(solved[kept - 1, np.arange(n)].mean()), float(kept.mean())
        if acc >= floor and steps < best[2]:
            best = (float(tau), acc, steps)
    return best


def trained_bias(run: Path, model: RecursiveMoE) -> float:
    """The halt head's bias as trained: an earlier calibration's record of it while the weights still hold that
    calibration's bias, else the weights' own (new weights were published since, or none was calibrated)."""
    bias = float(model.halt_head.bias.item())
    path = run / CALIBRATION_FILE
    if not path.exists():
        return bias
    record = read_json(path)
    numbers: list[Any] = [record.get(key) if isinstance(record, dict) else None  # JSON values, checked below
                          for key in ("trained_bias", "calibrated_bias")]
    largest = torch.finfo(model.halt_head.bias.dtype).max  # what the halt head's bias can hold
    if not all(isinstance(v, float | int) and not isinstance(v, bool) and abs(v) <= largest for v in numbers):
        raise ConfigError(f"{path}: trained_bias / calibrated_bias: expected numbers a {model.halt_head.bias.dtype} "
                          "bias can hold (delete the file to calibrate from the weights as they are)")
    trained, calibrated = map(float, numbers)
    return trained if calibrated == bias else bias


def calibrate(run: Path, model: RecursiveMoE, puzzles: np.ndarray, k: int, budget: float, batch_size: int,
              device: torch.device, autocast: Any) -> Calibration:
    """Choose tau on `puzzles` at K = k from the trained head, set the model's halt bias to trained - tau (in memory)
    and return the record; write() makes it the run's."""
    bias = trained_bias(run, model)
    with torch.no_grad():
        model.halt_head.bias.fill_(bias)
    answers, halt = solve_steps(model, puzzles, k, batch_size, device, autocast)
    solved = np.stack([sudoku.valid_solutions(puzzles, a) for a in answers])  # [K, N], checked by the rules
    tau, acc, steps = choose_tau(halt, solved, budget)
    trained = kept_steps(halt, 0.0)
    n = np.arange(halt.shape[1])
    with torch.no_grad():
        model.halt_head.bias.fill_(bias - tau if np.isfinite(tau) else NEVER)
    return Calibration(tau, bias, float(model.halt_head.bias.item()), k, budget, int(halt.shape[1]),
                       float(solved[-1].mean()), float(solved[trained - 1, n].mean()), float(trained.mean()), acc,
                       steps)


def write_into(record_path: str, weights_path: str, model: RecursiveMoE, calibration: Calibration) -> None:
    """The record and the calibrated weights, written in place at these temp paths, which `moe eval --ladder`
    publishes with its figures as one set (files.atomic_outputs: all or nothing), the record first: a
    process killed between the two still leaves the trained bias on record (it then names a calibration the weights
    lack, which the next calibration starts from all the same: trained_bias)."""
    Path(record_path).write_text(json.dumps(record(calibration), indent=1) + "\n", encoding="utf-8")
    write_weights(model, weights_path)


def record(calibration: Calibration) -> dict[str, Any]:
    """The calibration as JSON values: tau = +inf (never halt early) as null."""
    return {k: None if isinstance(v, float) and not np.isfinite(v) else v for k, v in asdict(calibration).items()}


def describe(c: Calibration) -> str:
    tau = "never halt early" if not np.isfinite(c.tau) else f"tau {c.tau:+.3f}"
    return (f"halting calibrated at K = {c.k} on the run's {c.puzzles} held-out puzzles (budget {c.budget:.1%}): "
            f"{tau}; all K steps solve {c.acc_all_steps:.1%}; the trained head {c.acc_trained:.1%} in "
            f"{c.steps_trained:.2f} steps; calibrated {c.acc_calibrated:.1%} in {c.steps_calibrated:.2f} steps")
