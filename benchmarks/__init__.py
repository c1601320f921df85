"""The benchmark suite: `python -m benchmarks [--quick | --smoke]` — see benchmarks/cli.py.

    timing.py   warm-up, interleaved repeats, median / IQR; the machine and versions
    flops.py    FLOPs per token (model and executed) from the config and the measured routing; matmul peak
    suites.py   serving (eager vs ONNX Runtime fp32 / int8), training step (eager vs torch.compile), MoE dispatch
    scaling.py  time against one factor at a time, fitted exponents, the plot
    halting.py  unrolled vs step-wise serving on real inputs
    generation.py  greedy generation, ORT and eager, with and without the KV cache: tokens/s, TTFT, cache bytes
    report.py   the targets as ratios, the closing notes, the printed table
    cli.py      the modes (full / quick / smoke), the run, the JSON
"""

import os
import sys

# PyTorch's idle OpenMP workers sleep, as ONNX Runtime's do in every session serve opens
# (moe_core/runtime/ort_session.py): both runtimes are timed under one policy, and on a shared machine spinning workers
# take the cores the working threads wait for (figures: benchmarks/RESULTS.md). OpenMP reads the variable when torch
# loads it, so it is set here, before the suite imports torch; a value already in the environment wins, and the results
# record what applied
# (timing.machine_info).
OMP_POLICY_BEFORE_TORCH = "torch" not in sys.modules
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
