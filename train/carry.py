"""TRM's deep supervision (train.supervision = "carry"): one optimizer update per supervision step. Each row of
the batch keeps its puzzle and its carry (z_H, z_L) across updates until it halts; a halted row is refilled from
the update's batch and starts again from the initial state.

A row halts after an update when its halt logit is > 0 (and it has taken its minimum number of steps), or when it
has taken carry_steps steps. With probability train.halt_explore a new row draws a minimum of 2..carry_steps
steps (TRM's exploration: the halt head also sees later steps of rows it would stop early). Every draw is a
function of (seed, step) and every decision a function of the rows' state, so a run is deterministic under its
seed, and the rows' state is saved with each checkpoint (`tensors`) so that a resumed run continues bit-identically.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import numpy as np
import torch
from torch import Tensor

from moe_core.model import Carry, ModelOutput, RecursiveMoE

from .config import RunConfig
from .distributed import Dist
from .schedule import ramp
from .task import Task


def carry_steps(cfg: RunConfig, step: int) -> int:
    """The most supervision steps a row takes at update `step`: model.halt_max_steps, or from carry_steps_start
    linearly up to it over the first carry_ramp_frac of the run."""
    tc, n = cfg.train, cfg.model.halt_max_steps
    return ramp(step, tc.max_steps, tc.carry_ramp_frac, tc.carry_steps_start, n) if tc.carry_steps_start else n


@dataclass
class Rows:
    """This rank's rows between updates."""

    z_H: Tensor  # [B, T, D] the carry
    z_L: Tensor
    x: Tensor  # [B, T] int64 the rows' inputs and targets
    y: Tensor
    steps: Tensor  # [B] int64 supervision steps taken on the current input
    min_steps: Tensor  # [B] int64 steps to take before the halt head may stop the row
    halted: Tensor  # [B] bool: refilled at the next update

    def tensors(self, prefix: str) -> dict[str, Tensor]:
        return {f"{prefix}{f.name}": getattr(self, f.name).detach().cpu().contiguous() for f in fields(self)}

    @classmethod
    def from_tensors(cls, tensors: dict[str, Tensor], prefix: str, device: torch.device) -> Rows:
        return cls(**{f.name: tensors[f"{prefix}{f.name}"].to(device) for f in fields(cls)})


class CarriedRows:
    """The rows' state and the rules that move it from update to update (the trainer's part of the scheme)."""

    def __init__(self, cfg: RunConfig, model: RecursiveMoE, task: Task, rows: slice, device: torch.device) -> None:
        self.cfg, self.model, self.task, self.rows, self.device = cfg, model, task, rows, device
        self.state: Rows | None = None  # None: every row is refilled at the next update
        self.halted_steps: list[Tensor] = []  # steps of the rows halted since the last log (logged, then cleared)

    def inputs(self, step: int) -> tuple[Tensor, Tensor, Carry]:
        """The inputs, targets and carry of update `step`: the carried rows, with the halted ones refilled from
        the task's batch of this step."""
        tc = self.cfg.train
        x_new, y_new = (t.to(self.device) for t in self.task.batch(step, self.rows))
        B, T = x_new.shape
        rng = np.random.default_rng([tc.seed, step, 1])  # the global batch's draws, then this rank's rows
        explore = rng.random(tc.batch_size) < tc.halt_explore
        n = carry_steps(self.cfg, step)
        least = rng.integers(2, n + 1, tc.batch_size) if n >= 2 else np.ones(tc.batch_size, dtype=np.int64)
        min_new = torch.from_numpy(np.where(explore, least, 1)[self.rows]).to(self.device)
        init = self.model.initial_carry(B, T)
        s = self.state
        if s is None:  # every row is fresh
            zeros = torch.zeros(B, dtype=torch.long, device=self.device)
            s = Rows(init.z_H, init.z_L, x_new, y_new, zeros, min_new, torch.ones(B, dtype=torch.bool,
                                                                                  device=self.device))
        fresh = s.halted
        f3 = fresh[:, None, None]
        self.state = Rows(torch.where(f3, init.z_H, s.z_H), torch.where(f3, init.z_L, s.z_L),
                          torch.where(fresh[:, None], x_new, s.x), torch.where(fresh[:, None], y_new, s.y),
                          torch.where(fresh, 0, s.steps), torch.where(fresh, min_new, s.min_steps),
                          torch.zeros_like(fresh))
        return self.state.x, self.state.y, Carry(self.state.z_H, self.state.z_L)

    def update(self, out: ModelOutput, step: int) -> None:
        """After the update: the rows' carry and step counts, and which rows halt."""
        s = self.state
        assert s is not None and out.carry is not None and out.halt_logits is not None
        steps = s.steps + 1
        q = out.halt_logits[-1].detach()
        halted = (steps >= carry_steps(self.cfg, step)) | ((q > 0) & (steps >= s.min_steps))
        self.state = Rows(out.carry.z_H, out.carry.z_L, s.x, s.y, steps, s.min_steps, halted)
        self.halted_steps.append(steps[halted])

    def halt_hist(self, n_bins: int) -> Tensor:
        """How many rows halted at each step 1..n_bins since the last call (the train record's halt_hist)."""
        done = torch.cat(self.halted_steps) if self.halted_steps else torch.zeros(0, dtype=torch.long)
        self.halted_steps = []
        return torch.bincount(done - 1, minlength=n_bins)[:n_bins]

    def drop(self) -> None:
        """Every row starts afresh at the next update (after a skipped update: the carry may be non-finite)."""
        self.state = None

    def gathered(self, dist: Dist) -> dict[str, Tensor]:
        """Every rank's rows by name, "rows.{rank}.{field}" (what a checkpoint saves); {} when none are carried.
        Called on every rank (a collective under torchrun)."""
        if self.state is None:  # the same on every rank: the ranks update in lockstep
            return {}
        out: dict[str, Tensor] = {}
        for name, t in self.state.tensors("").items():
            # gather moves one dtype per call; booleans travel as bytes (not every backend sends bool)
            parts = dist.gather(t.to(torch.uint8) if t.dtype == torch.bool else t, self.device)
            for r, part in enumerate(parts):
                out[f"rows.{r}.{name}"] = part.to(t.dtype)
        return out

    def load(self, tensors: dict[str, Tensor], rank: int) -> None:
        """The rows a checkpoint saved for this rank (`gathered`); none there: the rows start afresh."""
        prefix = f"rows.{rank}."
        if any(k.startswith(prefix) for k in tensors):
            self.state = Rows.from_tensors(tensors, prefix, self.device)
