"""A task's own section of a run's config, named after the task: `[sudoku]` for train.task = "sudoku".

TaskSpec.config names the section's dataclass (None: the task has no section). A run's config holds the section of
its own task only; train/config.py reads and writes it beside [model] and [train].
"""

from __future__ import annotations

from dataclasses import dataclass

from ..config import _check
from .sudoku import GENERATED_GIVENS


@dataclass
class SudokuConfig:
    # Base puzzles generated (augmented on the fly by the symmetry group) and held-out test puzzles, no test puzzle
    # equivalent to a train one; givens per puzzle; min_guesses 1 = only puzzles that singles alone do not solve.
    # train.data may name a puzzle file (81-character lines, '.' or '0' for blanks) to train on instead.
    train: int = 1000
    test: int = 500
    givens_min: int = 25
    givens_max: int = 35
    min_guesses: int = 0
    # A curriculum over givens (0 = off): training batches are drawn from the train puzzles with at least L givens,
    # L going linearly from curriculum_start at step 0 to givens_min at curriculum_frac of train.max_steps (the
    # whole set from then on). Easy puzzles stay in the mix as harder ones join. The train and test sets are
    # generated over givens_min..max as without it.
    curriculum_start: int = 0
    curriculum_frac: float = 0.5
    # A validation set of `val` puzzles with exactly val_givens givens each (0 = none), held out from train and test
    # under the symmetry group. Every evaluation reports its whole-puzzle accuracy at the model's halt_max_steps
    # with halting (what `moe serve` runs by default) as hard_puzzle_acc, and keep_best ranks evaluations by it
    # first.
    val: int = 0
    val_givens: int = 30

    def validate(self, where: str = "sudoku") -> None:
        for name in ("train", "test"):
            _check(getattr(self, name) >= 1, where, f"{name}: expected >= 1, got {getattr(self, name)}")
        lo, hi = GENERATED_GIVENS
        _check(lo <= self.givens_min <= self.givens_max <= hi, where,
               f"givens_min/max: expected {lo} <= min <= max <= {hi}, got {self.givens_min}, {self.givens_max}")
        _check(self.min_guesses >= 0, where, f"min_guesses: expected >= 0, got {self.min_guesses}")
        start = self.curriculum_start
        _check(start == 0 or self.givens_min <= start <= self.givens_max, where,
               f"curriculum_start: expected 0 (off) or a number of givens in givens_min..max "
               f"({self.givens_min}..{self.givens_max}), got {start}")
        _check(0.0 < self.curriculum_frac <= 1.0, where,
               f"curriculum_frac: expected in (0, 1], got {self.curriculum_frac}")
        _check(self.val >= 0, where, f"val: expected >= 0 (0 = none), got {self.val}")
        _check(lo <= self.val_givens <= hi, where, f"val_givens: expected {lo}..{hi}, got {self.val_givens}")
