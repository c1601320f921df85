"""Step-wise running of a step graph (moe_core.runtime.graph_contract): one supervision step at a time, each sample
stopped when it halts. Torch-free (numpy; the session is any object with ONNX Runtime's `run`): serve runs its
models with it and the parity check of `moe export` proves the step graph with it.

The unrolled graph (MODEL.onnx) computes all halt_max_steps steps for every sample and selects each sample's
halting step with masks: a static graph cannot do less. `run_stepwise` is the loop over the step graph: after each
step the samples whose halt logit is > 0 keep that step's outputs and leave the batch (the still-running rows are
gathered, carry included, for the next step); it stops when every sample has halted, or at halt_max_steps, where
the rest keep the last step's outputs. The carry starts as the step graph's initial-carry metadata broadcast over
[batch, seq]. That is the unrolled graph's rule (the first step whose halt probability is > 0.5, else the last),
so the results are the same: identical halt steps, logits equal within fp32 noise (rows are independent:
attention, routing and halting never mix samples).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from .decoding import HostBuffers
from .graph_contract import HALT_STEP, read_step_metadata

# Runs one step: (feeds by input name, output names) -> the outputs: host arrays, except that the carry (CARRY_OUT)
# may stay where the runtime keeps it (OrtValues on a device), which `carry`'s take gathers rows of.
StepFn = Callable[[dict[str, Any], list[str]], list[Any]]
CARRY_OUT = ("next_z_H", "next_z_L")


@dataclass
class StepCounts:
    """What a runtime ran: graph calls, and the supervision steps computed summed over samples (`rows`) against
    what the unrolled graph computes for the same batches (`full` = samples * halt_max_steps)."""

    calls: int = 0
    rows: int = 0
    full: int = 0


def run_stepwise(step: StepFn, z_init: tuple[np.ndarray, np.ndarray], n_steps: int, input_ids: np.ndarray,
                 attention_mask: np.ndarray, outputs: list[str], counts: StepCounts | None = None,
                 halting: bool = True, carry: Any = None) -> list[np.ndarray]:
    """The named outputs of a batch as the unrolled graph gives them (HALT_STEP included), computed step by step
    with halted samples dropped from the batch (see the module docstring). Every other output name must be a
    per-sample output of the step graph ([batch, ...]: logits, or an output serve added from them).
    halting=False ignores the halt head: every sample runs all n_steps (what `moe eval` calls "all K"). `carry`: how
    the running rows of the carry are gathered between steps (moe_core/runtime/decoding.py HostBuffers, the default, or
    DeviceBuffers, which keeps a device's carry on the device)."""
    carry = carry if carry is not None else HostBuffers()
    B, T = input_ids.shape
    if counts is not None:
        counts.full += B * n_steps
    wanted = [name for name in outputs if name != HALT_STEP]
    halt_step = np.full(B, n_steps, dtype=np.int64)
    kept: dict[str, np.ndarray] = {}
    rows = np.arange(B)  # batch positions of the samples still running
    feeds = {"input_ids": input_ids, "attention_mask": attention_mask,
             "z_H": np.ascontiguousarray(np.broadcast_to(z_init[0], (B, T, z_init[0].size))),
             "z_L": np.ascontiguousarray(np.broadcast_to(z_init[1], (B, T, z_init[1].size)))}
    for s in range(1, n_steps + 1):
        last = s == n_steps
        names = wanted + ["halt_logit"] + ([] if last else list(CARRY_OUT))
        got = dict(zip(names, step(feeds, names), strict=True))
        if counts is not None:
            counts.calls += 1
            counts.rows += len(rows)
        done = np.full(len(rows), last) if last or not halting else got["halt_logit"] > 0
        for name in wanted:
            if name not in kept:
                kept[name] = np.empty((B, *got[name].shape[1:]), dtype=got[name].dtype)
            kept[name][rows[done]] = got[name][done]
        halt_step[rows[done]] = s
        if done.all():
            break
        running = ~done
        rows = rows[running]
        index = np.flatnonzero(running)
        feeds = {"input_ids": feeds["input_ids"][running], "attention_mask": feeds["attention_mask"][running],
                 "z_H": carry.take(got["next_z_H"], index), "z_L": carry.take(got["next_z_L"], index)}
    return [halt_step if name == HALT_STEP else kept[name] for name in outputs]


class StepwiseSession:
    """An ONNX Runtime session of a step graph that answers `run(output_names, feeds)` as an InferenceSession of
    the unrolled graph would (feeds: input_ids and attention_mask; outputs: halt_step and per-sample outputs) —
    what the parity check and the benchmarks compare with the unrolled graph."""

    def __init__(self, session: Any, where: str | os.PathLike = "step graph") -> None:
        self.session = session
        z_H, z_L, self.n_steps = read_step_metadata(session.get_modelmeta().custom_metadata_map, where)
        self.z_init = (z_H, z_L)
        self.counts = StepCounts()

    def run(self, output_names: list[str], feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        return run_stepwise(lambda f, names: self.session.run(names, f), self.z_init, self.n_steps,
                            feeds["input_ids"], feeds["attention_mask"], list(output_names), self.counts)
