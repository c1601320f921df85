"""Schedules over the steps of a run: the learning rate (linear warmup, cosine decay to a floor) and linear ramps of
integer settings (a curriculum's floor, the carried rows' step limit). Pure functions of the step, so a resumed
run gets exactly what it would have had."""

import math


def warmup_steps(max_steps: int, warmup_frac: float) -> int:
    return round(warmup_frac * max_steps)


def lr_multiplier(step: int, max_steps: int, warmup: int, floor: float) -> float:
    """Multiplier of the base LR for 0-based `step` of `max_steps`, with `warmup` warmup steps.

    Warmup reaches 1.0 on its last step (never 0 on the first, which would waste a step); decay runs from
    1.0 at the first step after warmup to `floor` at the last step. Works for warmup = 0 and for
    warmup >= max_steps (all warmup, no decay) without dividing by zero.
    """
    if step < warmup:
        return (step + 1) / warmup
    decay_steps = max_steps - warmup - 1
    if decay_steps <= 0:
        return 1.0
    progress = min(1.0, (step - warmup) / decay_steps)
    return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


def ramp(step: int, max_steps: int, frac: float, start: int, end: int) -> int:
    """An integer setting going linearly from `start` at step 0 to `end` at `frac` of `max_steps`, then held;
    truncated towards `start`."""
    done = min(1.0, step / (frac * max_steps))
    return start + int((end - start) * done)
