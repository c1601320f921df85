"""The benchmark suite (issue 7): `python -m benchmarks [--quick | --smoke]` — see benchmarks/cli.py.

    timing.py   warm-up, interleaved repeats, median / IQR; the machine and versions
    flops.py    FLOPs per token (model and executed) from the config and the measured routing; matmul peak
    suites.py   serving (eager vs ONNX Runtime fp32 / int8), training step (eager vs torch.compile), MoE dispatch
    scaling.py  time against one factor at a time, fitted exponents, the plot
    report.py   the targets as ratios, the closing notes, the printed table
    cli.py      the modes (full / quick / smoke), the run, the JSON
"""
