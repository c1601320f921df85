"""What the model's modules share: the ranking rule of every routing decision, the record of those decisions an
exporter asks for (Tracing), the aux losses and statistics a block call returns, RMSNorm."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def ranked(x: Tensor) -> tuple[Tensor, Tensor]:
    """x sorted in descending order along its last axis, with its indices; exact ties go to the lower index first.

    This is the tie rule of ONNX TopK, which the exported graph's routing runs on (the exporter writes a sort as
    TopK). torch.topk and an unstable sort promise no order among equal values, so an exact tie could route a
    token to another expert or head in eager than in the graph. Every ranking in the model goes through here.
    (The exporter has no translation of the stable overload; the plain sort it translates is TopK, whose order is
    this one. Sparse dispatch's argsorts need no rule: the rows they order are put back in place.)"""
    if torch.compiler.is_exporting():
        return x.sort(dim=-1, descending=True)
    return x.sort(dim=-1, descending=True, stable=True)


# -- routing and halting decisions --------------------------------------------------------------------------------
#
# Every discrete choice of the model is a comparison of computed values: the experts a token is routed to
# (router probabilities ranked), the heads it uses (ranked probabilities against the threshold and the target
# count) and whether a sample halts (its halt logit against 0). Two runtimes compute those values with
# different fp32 summation orders, so a choice whose margin is within that noise may go either way. Parity
# (export/parity.py) compares the choices themselves; `recording_decisions` collects them, with each choice's
# margin: how far the compared values are from changing it, relative to their scale (probabilities and
# thresholds are <= 1, the head count is relative to max_heads + 0.5, a halt logit to max(1, max |logit|)).

DECISION_KINDS = ("heads", "experts", "halt")


@dataclass
class Decision:
    kind: str  # one of DECISION_KINDS
    choice: Tensor  # heads: [B, T, H] 0/1 mask; experts: [B, T, k] chosen ids; halt: [B] halt logit (halts if > 0)
    margin: Tensor  # >= 0. heads: [B, T, 2], of the head count and of the set at that count; experts: [B, T]; halt: [B]


@dataclass
class Tracing:
    """What an exporter asks of one model's forward, for the duration of a trace: every routing and halting
    decision appended to `decisions` (when it is a list), rotary embeddings as ONNX's fused operator. One object per
    model, shared by its modules (RecursiveMoE.__init__), set through recording_decisions (below) and
    attention.onnx_rotary: state of that model, not of the process."""

    decisions: list[Decision] | None = None
    onnx_rotary: bool = False

    def record(self, kind: str, choice: Tensor, margin: Tensor) -> None:
        if self.decisions is not None:
            self.decisions.append(Decision(kind, choice, margin))


class Traced(Protocol):
    """A model whose modules share one Tracing (RecursiveMoE)."""

    tracing: Tracing


@contextmanager
def recording_decisions(model: Traced) -> Iterator[list[Decision]]:
    """Within the block, every forward of `model` appends its decisions, in call order, to the yielded list."""
    previous, model.tracing.decisions = model.tracing.decisions, []
    try:
        yield model.tracing.decisions
    finally:
        model.tracing.decisions = previous


class AuxAccumulator:
    """Collects the aux losses (what the trainer weights and backpropagates) and the statistics (what it logs) over
    the block calls of one forward pass, each kind in its own table.

    Keys ending in `_min` / `_max` reduce by min / max, everything else by mean over calls. The caller adds a
    loss only from a call that backpropagates (grad enabled): a no-grad cycle's value cannot move a weight, and
    averaging it in would scale every loss's gradient by the share of calls that do, so that a weight would mean
    1 / H_cycles of itself. Statistics describe every call.
    """

    def __init__(self) -> None:
        self._values: dict[str, dict[str, Tensor]] = {"loss": {}, "stat": {}}
        self._counts: dict[str, dict[str, int]] = {"loss": {}, "stat": {}}

    def add_loss(self, key: str, value: Tensor) -> None:
        self._add("loss", key, value)

    def add_stat(self, key: str, value: Tensor) -> None:
        self._add("stat", key, value)

    def _add(self, kind: str, key: str, value: Tensor) -> None:
        values, counts = self._values[kind], self._counts[kind]
        if key not in values:
            values[key], counts[key] = value, 1
        elif key.endswith("_min"):
            values[key] = torch.minimum(values[key], value)
        elif key.endswith("_max"):
            values[key] = torch.maximum(values[key], value)
        else:
            values[key] = values[key] + value
            counts[key] += 1

    def losses(self) -> dict[str, Tensor]:
        return self._result("loss")

    def stats(self) -> dict[str, Tensor]:
        return self._result("stat")

    def _result(self, kind: str) -> dict[str, Tensor]:
        counts = self._counts[kind]
        return {k: v if k.endswith(("_min", "_max")) else v / counts[k] for k, v in self._values[kind].items()}


@dataclass
class Aux:
    """What one module call adds to the aux losses (differentiable) and to the statistics (detached)."""

    losses: dict[str, Tensor] = field(default_factory=dict)
    stats: dict[str, Tensor] = field(default_factory=dict)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)
