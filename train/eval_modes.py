"""The rows every `moe eval` table has (train/evaluate.py, and the Sudoku ladder, train/ladder.py): each K with
halting and with every step run, and the baseline run's rows."""

from __future__ import annotations

from moe_core.model import RecursiveMoE

MODES = ("halting", "all K")
BASELINE = "baseline"


def baseline_label(model: RecursiveMoE, name: str) -> str:
    """The mode column of the other run's rows: its name and how it runs."""
    kind = "recursion off" if not model.config.recursive else f"halt_max_steps {model.config.halt_max_steps}"
    return f"{BASELINE}: {name} ({kind})"
