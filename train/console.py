"""The trainer's console lines: the model at the start, the routing and halting summary of a log step, and the
run's final figures."""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any

import torch

from moe_core.config import ModelConfig


def routing_summary(stats: dict[str, Any], n_layers: int) -> str:
    """One console line per mechanism, e.g.
    `MoH L1: 2.80h@0.55θ | Complexity 0.59 [0.50-0.68] | PredNorm 2.2 | grad router 1.2e-03 predictor 4.0e-04`
    `MoE L1: load 0.31 0.22 0.25 0.22 CV 0.14 dropped 0`
    `Halt steps 1:12% 2:30% 3:58% | mean 2.46 | head acc 0.81 | grad 2.1e-02`"""
    layers = [f"L{i + 1}" for i in range(n_layers)]
    if f"{layers[0]}.moh_heads" not in stats:
        return ""
    moh = " | ".join(f"{L}: {stats[f'{L}.moh_heads']:.2f}h@{stats[f'{L}.moh_threshold']:.2f}θ" for L in layers)
    cx = [stats[f"{L}.moh_complexity"] for L in layers]
    cx_lo = min(stats[f"{L}.moh_complexity_min"] for L in layers)
    cx_hi = max(stats[f"{L}.moh_complexity_max"] for L in layers)
    pred = statistics.fmean(stats[f"{L}.moh_pred_norm"] for L in layers)
    grads = " ".join(f"{g} {stats[f'grad_norm.{g}']:.1e}" for g in ("router", "predictor") if f"grad_norm.{g}" in stats)
    moe = " | ".join(f"{L}: load " + " ".join(f"{x:.2f}" for x in stats[f"{L}.moe_load"])
                     + f" CV {stats.get(f'{L}.moe_load_cv', float('nan')):.2f}"
                     + f" dropped {stats.get(f'{L}.moe_dropped', 0):g}" for L in layers)
    lines = [f"MoH {moh} | Complexity {statistics.fmean(cx):.2f} [{cx_lo:.2f}-{cx_hi:.2f}] | PredNorm {pred:.2f}"
             + (f" | grad {grads}" if grads else ""), f"MoE {moe}"]
    hist = stats.get("halt_hist")
    if isinstance(hist, list) and len(hist) > 1 and sum(hist):
        shares = " ".join(f"{i + 1}:{100 * c / sum(hist):.0f}%" for i, c in enumerate(hist))
        lines.append(f"Halt steps {shares} | mean {stats['halt_step_mean']:.2f}"
                     + (f" | head acc {stats['halt_acc']:.2f}" if "halt_acc" in stats else "")
                     + (f" | grad {stats['grad_norm.halt']:.1e}" if "grad_norm.halt" in stats else ""))
    return "\n".join(lines)


def model_line(mc: ModelConfig, n_params: int, device: torch.device, compile: bool) -> str:
    """The run's first line: parameters, device, compilation and the recursion's shape."""
    compiled = f"compile={'on' if compile else 'off'}"
    if not mc.recursive:
        return f"model: {n_params / 1e6:.2f}M parameters on {device} (baseline, no recursion), {compiled}"
    return (f"model: {n_params / 1e6:.2f}M parameters on {device}, {compiled}, {mc.n_steps} supervision "
            f"step(s) x {mc.H_cycles}x({mc.L_cycles}+1) net calls")


def final_lines(described: str, result: dict[str, Any], compile: bool, run_dir: Path, timed: bool) -> str:
    """The run's last lines: the final evaluation (`described`, the task's words for it) and, when steps were
    timed, the first step's time and the steady speed."""
    lines = [f"done: {described} | median grad norm after warmup {result['median_grad_norm_after_warmup']:.2f}"]
    if timed:
        first = f"first step {result['first_step_s']:.1f}s"
        lines.append((f"time: {first} (includes torch.compile, or loading its cache)" if compile else f"time: {first}")
                     + f", then {result['step_s'] * 1000:.0f} ms/step, {result['tokens_per_s']:.0f} tokens/s "
                     f"| run: {run_dir}")
    return "\n".join(lines)
