"""How eager inference time grows with each factor, one factor at a time, against the FLOPs it executes.

From a base (model config, batch, seq) each factor takes a few values while the others stay put; each point
is the median time of the eager scoring call, the points of one factor timed in one interleaved loop. The
growth is the least-squares slope of log time on log x: time ~ x^p. The same fit over the executed FLOPs
(benchmarks/flops.py) gives the exponent the arithmetic alone predicts, so the table shows both: where time
grows slower than FLOPs, fixed per-call overhead hides the work; faster, the added work runs less
efficiently. Weights are random (the graph is static: time does not depend on them).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from matplotlib.figure import Figure

from moe_core.config import ModelConfig
from moe_core.model import RecursiveMoE
from train.plots import save_figure

from .flops import executed_flops_per_token
from .suites import eager_logprobs, random_batch
from .timing import measure

FACTORS = ("seq_len", "batch", "H_cycles", "L_cycles", "halt_max_steps", "n_experts")


def point(cfg: ModelConfig, batch: int, seq: int, factor: str, x: int) -> tuple[ModelConfig, int, int]:
    """(config, batch, seq) of the base with `factor` set to x."""
    if factor == "batch":
        return cfg, x, seq
    if factor == "seq_len":
        return dataclasses.replace(cfg, max_seq_len=max(cfg.max_seq_len, x)), batch, x
    change: dict[str, Any] = {factor: x}  # a ModelConfig field, named at run time
    return dataclasses.replace(cfg, **change), batch, seq


def loglog_slope(xs: Sequence[float], ys: Sequence[float]) -> float:
    return float(np.polyfit(np.log(xs), np.log(ys), 1)[0])


def growth(p: float) -> str:
    """A word for an exponent: flat, sublinear, linear, superlinear, quadratic."""
    for bound, word in ((0.25, "flat"), (0.85, "sublinear"), (1.15, "linear"), (1.85, "superlinear"),
                        (2.15, "quadratic")):
        if p < bound:
            return word
    return "super-quadratic"


def scaling(cfg: ModelConfig, batch: int, seq: int, points: dict[str, list[int]], warmup: int,
            repeats: int) -> dict[str, Any]:
    out: dict[str, Any] = {"base": {"batch": batch, "seq": seq, **{f: getattr(cfg, f) for f in FACTORS[2:]}},
                           "factors": {}}
    for factor, xs in points.items():
        calls: dict[int, Callable[[], Any]] = {}
        flops: list[float] = []
        for x in xs:
            c, B, T = point(cfg, batch, seq, factor, x)
            model = RecursiveMoE(c).eval()
            ids, mask = (torch.from_numpy(a) for a in random_batch(c.vocab_size, B, T))
            calls[x] = functools.partial(eager_logprobs, model, ids, mask)
            flops.append(executed_flops_per_token(c, T) * B * T)
        # The points of a factor are timed in one interleaved loop: a load change hits them all, not the slope.
        times = [t.median for t in measure(calls, warmup, repeats).values()]
        p_time, p_flops = loglog_slope(xs, times), loglog_slope(xs, flops)
        out["factors"][factor] = {"x": xs, "median_s": times, "executed_flops": flops, "time_exponent": p_time,
                                  "flops_exponent": p_flops, "growth": growth(p_time)}
    return out


def plot(result: dict[str, Any], path: Path, title: str) -> Path:
    """One figure: a log-log panel per factor, measured times, the fitted power law, and the FLOPs' growth
    scaled to the first point."""
    factors = result["factors"]
    cols = 3
    rows = -(-len(factors) // cols)
    fig = Figure(figsize=(4.2 * cols, 3.4 * rows), layout="constrained")
    fig.suptitle(title, fontsize=10)
    for i, (factor, f) in enumerate(factors.items()):
        ax = fig.add_subplot(rows, cols, i + 1)
        xs, ts = np.asarray(f["x"], float), np.asarray(f["median_s"]) * 1e3
        fit = np.exp(np.polyval(np.polyfit(np.log(xs), np.log(ts), 1), np.log(xs)))
        ax.loglog(xs, ts, "o", label="measured")
        ax.loglog(xs, fit, "-", label=f"fit: time ~ x^{f['time_exponent']:.2f}")
        flops = np.asarray(f["executed_flops"])
        ax.loglog(xs, ts[0] * flops / flops[0], "--", color="gray", label=f"FLOPs ~ x^{f['flops_exponent']:.2f}")
        ax.set_xticks(xs, [f"{int(x)}" for x in xs])
        ax.set_yticks(ts, [f"{t:.0f}" if t >= 10 else f"{t:.1f}" for t in ts])  # the measured values themselves
        ax.minorticks_off()
        ax.set_title(f"{factor}: {f['growth']}")
        ax.set_xlabel(factor)
        ax.set_ylabel("ms per call")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
    return save_figure(fig, path)
