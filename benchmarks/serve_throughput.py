"""Scoring throughput of `moe serve` (ONNX Runtime) against the eager PyTorch model, in one run.

    python -m benchmarks.serve_throughput RUN_DIR [--onnx MODEL.onnx] [--batch-sizes 1,8,32] [--repeats 7]

Both sides do the same work on the same inputs: a forward pass over random token ids [batch, max_seq_len]
(all valid, attention_mask = 1) and the log-prob of every next token. ORT runs serve's session (the exported
graph as serve prepares it, with the session options `moe serve` uses); eager runs
`load_model(RUN_DIR)` under torch.inference_mode with log_softmax + gather. Both get the same number of
threads. Each cell: warm-up calls, then the median of --repeats timed calls (eager and ORT alternating), as
tokens/s (batch * seq / s).
Without --onnx the run is exported to a temp dir first (no parity check; `moe export` does that).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from moe_core import load_model
from serve.graph import TOKEN_LOGPROBS
from serve.runtime import HALT_STEP, OrtModel, physical_cores


def median_seconds(fns: dict[str, Callable[[], object]], warmup: int, repeats: int) -> dict[str, float]:
    """Median wall time of each function. Calls alternate between the functions, so that a load change on a
    shared machine hits every contender alike instead of whichever happened to run at the time."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(t) for name, t in times.items()}


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("run_dir", type=Path)
    ap.add_argument("--onnx", type=Path, default=None, help="the run's exported model (default: export it now)")
    ap.add_argument("--batch-sizes", default="1,8,32")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--threads", type=int, default=None, help="threads for both runtimes (default: physical cores)")
    args = ap.parse_args()

    import onnxruntime

    threads = args.threads or physical_cores()
    torch.set_num_threads(threads)
    eager = load_model(args.run_dir)
    cfg = eager.config
    with tempfile.TemporaryDirectory() as tmp:
        onnx_path = args.onnx
        if onnx_path is None:
            from export.onnx_export import export_run

            onnx_path = Path(tmp) / "model.onnx"
            t0 = time.perf_counter()
            export_run(args.run_dir, onnx_path, check=False, log=lambda _: None)
            print(f"exported {args.run_dir} in {time.perf_counter() - t0:.0f}s (no parity check)")
        ort_model = OrtModel(onnx_path, provider="cpu", threads=threads)

    def eager_score(ids: torch.Tensor, mask: torch.Tensor) -> None:
        with torch.inference_mode():
            out = eager(ids, mask)
            out.logits[:, :-1].log_softmax(-1).gather(-1, ids[:, 1:, None])

    n_params = sum(p.numel() for p in eager.parameters())
    print(f"machine: {cpu_name()}, {torch.get_num_threads()} threads of {os.cpu_count()} "
          f"cpus ({physical_cores()} physical) | {platform.system()} {platform.machine()} | python "
          f"{platform.python_version()} | torch {torch.__version__} | onnxruntime {onnxruntime.__version__}")
    print(f"model: {args.run_dir} | {n_params / 1e6:.2f}M params | d_model {cfg.d_model} | n_layers {cfg.n_layers} | "
          f"experts {cfg.n_experts} top-{cfg.top_k} | H{cfg.H_cycles} x L{cfg.L_cycles} x {cfg.halt_max_steps} steps | "
          f"vocab {cfg.vocab_size} | seq {cfg.max_seq_len}")
    print(f"scoring throughput (median of {args.repeats} interleaved calls after {args.warmup} warm-up calls)")
    print(f"{'batch':>5} {'seq':>5} {'eager ms':>9} {'ORT ms':>9} {'eager tok/s':>12} {'ORT tok/s':>12} "
          f"{'ORT/eager':>9}")
    rng = np.random.default_rng(0)
    T = cfg.max_seq_len
    for B in (int(b) for b in args.batch_sizes.split(",")):
        ids = rng.integers(0, cfg.vocab_size, size=(B, T), dtype=np.int64)
        mask = np.ones_like(ids)
        t_ids, t_mask = torch.from_numpy(ids), torch.from_numpy(mask)
        t = median_seconds({"eager": lambda: eager_score(t_ids, t_mask),  # noqa: B023
                            "ort": lambda: ort_model.run(ids, mask, [TOKEN_LOGPROBS, HALT_STEP])},  # noqa: B023
                           args.warmup, args.repeats)
        print(f"{B:>5} {T:>5} {t['eager'] * 1e3:>9.1f} {t['ort'] * 1e3:>9.1f} {B * T / t['eager']:>12,.0f} "
              f"{B * T / t['ort']:>12,.0f} {t['eager'] / t['ort']:>8.2f}x")

if __name__ == "__main__":
    main()
