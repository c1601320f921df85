"""The task interface the trainer uses (train/tasks.py: LanguageTask, the reference implementation, and make_task;
train/sudoku_task.py: SudokuTask). Its own module so that every task can implement it without importing the others.
"""

from __future__ import annotations

import contextlib

import torch
from torch import Tensor

from moe_core.model import ModelOutput, RecursiveMoE

from .distributed import SINGLE, Dist


class Task:
    """The interface the trainer uses (LanguageTask is the reference implementation)."""

    name: str
    loss_key: str  # the metrics key of the task's own loss (before the halt and aux losses)
    tokenizer_json: str  # written to RUN_DIR/tokenizer.json: export and serve read it
    fingerprint: str  # identity of the training data: resume refuses other data
    baselines: dict[str, float]  # logged with every evaluation
    # train.keep_best compares evaluations by these figures, in order (the first decides, the next break ties)
    best_by: tuple[str, ...]
    higher_is_better: bool

    def batch(self, step: int, rows: slice) -> tuple[Tensor, Tensor]:
        """The training batch of `step`, this rank's `rows` of it: (inputs, targets)."""
        raise NotImplementedError

    def schedule(self, step: int) -> dict[str, float]:
        """The task's scheduled settings at `step` (e.g. a curriculum's level), logged with the train records."""
        return {}

    def loss(self, out: ModelOutput, y: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        """The training loss of `out` against the targets `y`, and its parts by metrics key."""
        raise NotImplementedError

    def evaluate(self, model: RecursiveMoE, device: torch.device, autocast: contextlib.AbstractContextManager,
                 dist: Dist = SINGLE) -> dict[str, float]:
        """The held-out figures of `model` (run in eval mode), over every rank of `dist`."""
        raise NotImplementedError

    def describe(self, ev: dict[str, float]) -> str:
        """An evaluation's figures as one line of the log."""
        raise NotImplementedError
