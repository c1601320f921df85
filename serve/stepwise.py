"""Step-wise serving: run a recursive model one supervision step at a time and stop each sample when it halts.

The unrolled graph (MODEL.onnx) computes all halt_max_steps steps for every sample and selects each sample's
halting step with masks: a static graph cannot do less. `moe export --stepwise` also writes MODEL.step.onnx, one
supervision step as a graph of its own (RecursiveMoE.step, the code forward itself runs):

    inputs  input_ids, attention_mask  int64 [batch, seq]
            z_H, z_L                   float32 [batch, seq, d_model]   the carry
    outputs next_z_H, next_z_L         float32 [batch, seq, d_model]   the carry after the step
            logits                     float32 [batch, seq, vocab]     this step's logits
            halt_logit                 float32 [batch]                 the sample halts at this step when > 0

The initial carry is the model's fixed z_H_init / z_L_init vectors broadcast over [batch, seq]; they are in the
step graph's metadata (JSON lists of float32 values, exact). `run_stepwise` is the loop: after each step the
samples whose halt logit is > 0 keep that step's outputs and leave the batch (the still-running rows are
gathered, carry included, for the next step); it stops when every sample has halted, or at halt_max_steps, where
the rest keep the last step's outputs. That is the unrolled graph's rule (the first step whose halt probability is
> 0.5, else the last), so the results are the same: identical halt steps, logits equal within fp32 noise (rows
are independent: attention, routing and halting never mix samples).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from moe_core.errors import MoeError

HALT_STEP = "halt_step"  # computed by the loop (the unrolled graph's output of the same name)
STEP_INPUTS = ("input_ids", "attention_mask", "z_H", "z_L")
STEP_OUTPUTS = ("next_z_H", "next_z_L", "logits", "halt_logit")
STEP_SUFFIX = ".step.onnx"
INIT_KEYS = ("z_H_init", "z_L_init")

# Runs one step: (feeds by input name, output names) -> the outputs, as host arrays.
StepFn = Callable[[dict[str, np.ndarray], list[str]], list[np.ndarray]]


def step_path_for(onnx_path: str | os.PathLike) -> Path:
    """The step graph written beside MODEL.onnx: MODEL.step.onnx."""
    p = Path(onnx_path)
    return p.with_name(p.stem + STEP_SUFFIX)


def init_metadata(z_H_init: np.ndarray, z_L_init: np.ndarray) -> dict[str, str]:
    """The initial-carry vectors as metadata values: float32 -> Python float (exact) -> JSON (shortest repr)."""
    return {k: json.dumps(np.asarray(v, dtype=np.float32).tolist()) for k, v in zip(INIT_KEYS, (z_H_init, z_L_init),
                                                                                     strict=True)}


def read_step_metadata(meta: dict[str, str], where: str | os.PathLike) -> tuple[np.ndarray, np.ndarray, int]:
    """(z_H_init [D], z_L_init [D], halt_max_steps) from a step graph's metadata; MoeError naming `where`."""
    inits = []
    for key in INIT_KEYS:
        try:
            v = np.asarray(json.loads(meta[key]), dtype=np.float32)
        except KeyError:
            raise MoeError(f"{where}: missing metadata {key} (expected a step graph written by `moe export "
                           "--stepwise`)") from None
        except (ValueError, TypeError):
            v = None
        if v is None or v.ndim != 1 or not v.size or not np.isfinite(v).all():
            raise MoeError(f"{where}: malformed metadata {key}: expected a JSON list of finite numbers")
        inits.append(v)
    if inits[0].shape != inits[1].shape:
        raise MoeError(f"{where}: metadata z_H_init and z_L_init differ in length ({inits[0].size} vs {inits[1].size})")
    steps = meta.get("halt_max_steps", "")
    if not (steps.isascii() and steps.isdigit() and 0 < int(steps) < 10**6):
        raise MoeError(f"{where}: malformed metadata halt_max_steps: expected a positive integer, got {steps[:40]!r}")
    return inits[0], inits[1], int(steps)


@dataclass
class StepCounts:
    """What a runtime ran: graph calls, and the supervision steps computed summed over samples (`rows`) against
    what the unrolled graph computes for the same batches (`full` = samples * halt_max_steps)."""

    calls: int = 0
    rows: int = 0
    full: int = 0


def run_stepwise(step: StepFn, z_init: tuple[np.ndarray, np.ndarray], n_steps: int, input_ids: np.ndarray,
                 attention_mask: np.ndarray, outputs: list[str], counts: StepCounts | None = None,
                 halting: bool = True) -> list[np.ndarray]:
    """The named outputs of a batch as the unrolled graph gives them (HALT_STEP included), computed step by step
    with halted samples dropped from the batch (see the module docstring). Every other output name must be a
    per-sample output of the step graph ([batch, ...]: logits, or an output serve added from them).
    halting=False ignores the halt head: every sample runs all n_steps (what `moe eval` calls "all K")."""
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
        names = wanted + ["halt_logit"] + ([] if last else ["next_z_H", "next_z_L"])
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
        feeds = {"input_ids": feeds["input_ids"][running], "attention_mask": feeds["attention_mask"][running],
                 "z_H": got["next_z_H"][running], "z_L": got["next_z_L"][running]}
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
