"""An exponential moving average of the weights (train.ema_decay), as TRM keeps one for evaluation.

The average is a model of its own (a copy of the trained one, never compiled, never in training mode): the
trainer evaluates it, keep_best keeps it, and RUN_DIR/model.safetensors holds it. Checkpoint sets save it beside
the raw weights (train/checkpointing.py), so a resumed run continues the same average bit for bit.
"""

from __future__ import annotations

import copy

import torch

from moe_core.model import RecursiveMoE


def ema_decay_at(decay: float, updates: int) -> float:
    """The decay of the `updates`-th update (1-based): min(decay, (1 + n) / (10 + n)). A plain decay would keep a
    short run's average near its random start; this one averages over about the last tenth of the updates made
    so far until that window reaches 1 / (1 - decay) updates."""
    return min(decay, (1 + updates) / (10 + updates))


class EMA:
    def __init__(self, model: RecursiveMoE, decay: float) -> None:
        self.decay = decay
        self.model = copy.deepcopy(model).requires_grad_(False).eval()  # buffers (the initial carry) as they are

    @torch.no_grad()
    def update(self, model: RecursiveMoE, updates: int) -> None:
        """Move the average towards `model`'s weights after its `updates`-th optimizer update."""
        weight = 1.0 - ema_decay_at(self.decay, updates)
        for avg, p in zip(self.model.parameters(), model.parameters(), strict=True):
            avg.lerp_(p.detach(), weight)
