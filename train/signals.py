"""Stopping a run cleanly: the first SIGINT / SIGTERM becomes a flag the loop checks between steps, so the
step in progress finishes and a checkpoint is saved before the run exits (128 + the signal, as every moe
command). This differs from moe_core.cli.stop_signals_raise, which raises at once; the signals are the same
(moe_core.cli.STOP_SIGNALS), and a second one gets the handler that was there before (that one)."""

from __future__ import annotations

import signal
import threading
from pathlib import Path
from typing import Any

from moe_core.cli import STOP_SIGNALS


class TrainingInterrupted(Exception):
    """SIGINT/SIGTERM arrived: the loop saved a checkpoint at `step` and stopped."""

    def __init__(self, signum: int, step: int, run_dir: Path) -> None:
        super().__init__(f"interrupted by {signal.Signals(signum).name} at step {step}: checkpoint saved; "
                         f"continue with: moe train --resume {run_dir}")
        self.signum = signum


class StopSignals:
    """Turn the first SIGINT/SIGTERM into a flag the loop checks between steps (a second one acts as usual)."""

    def __init__(self) -> None:
        self.received: int | None = None
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame: Any) -> None:
        self.received = signum
        for s, h in self._previous.items():  # the next signal interrupts at once
            signal.signal(s, h)

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            self._previous = {s: signal.signal(s, self._handle) for s in STOP_SIGNALS}
        return self

    def __exit__(self, *exc: object) -> None:
        for s, h in self._previous.items():
            signal.signal(s, h)
