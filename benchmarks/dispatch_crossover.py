"""Where sparse MoE dispatch starts to beat dense on this CPU, by layer size and by tokens per call: the figures
behind moe_core.model.moe.SPARSE_MIN_SKIPPED_MACS.

    python -m benchmarks.dispatch_crossover --threads 1

For each (d_model, d_expert, n_experts, top_k) and each number of tokens in one call, the MoE layer alone with the
same weights under both dispatches: an inference forward and a training forward + backward (output and aux
losses), timed in one interleaved loop (benchmarks.timing.measure). Prints dense time / sparse time (> 1: sparse
is faster) beside skipped multiply-adds per call, tokens * (n_experts - top_k) * d_model * d_expert, and what
"auto" picks for that call.
"""

from __future__ import annotations

import argparse
import dataclasses
import math

import torch

from moe_core.config import ModelConfig
from moe_core.model.moe import MoEFeedForward, resolve_moe_dispatch

from .suites import layer_inference, moe_layer, moe_layer_train_step
from .timing import cpu_name, measure, set_threads

LAYERS = ((32, 64, 4, 2), (64, 128, 4, 2), (128, 256, 4, 2), (128, 256, 8, 2))  # d_model, d_expert, experts, top-k
TOKENS = (256, 1024, 2592, 8192)


def layer_pair(cfg: ModelConfig) -> dict[str, MoEFeedForward]:
    """The config's MoE layer under dense and sparse dispatch, with the same (model-initialised) weights."""
    layers: dict[str, MoEFeedForward] = {}
    for mode in ("dense", "sparse"):
        torch.manual_seed(0)
        layers[mode] = moe_layer(dataclasses.replace(cfg, moe_dispatch=mode))
    return layers


def crossover_row(cfg: ModelConfig, tokens: int, warmup: int, repeats: int) -> dict[str, float | str | int]:
    layers = layer_pair(cfg)
    g = torch.Generator().manual_seed(0)
    shape = (max(1, tokens // 64), 64, cfg.d_model) if tokens % 81 else (tokens // 81, 81, cfg.d_model)
    x = torch.randn(*shape, generator=g)
    xs = [torch.randn(*shape, generator=g, requires_grad=True) for _ in range(3)]
    with torch.inference_mode():
        inference = measure({m: layer_inference(f, x) for m, f in layers.items()}, warmup, repeats)
    training = measure({m: moe_layer_train_step(f, xs) for m, f in layers.items()}, warmup, repeats)
    n = shape[0] * shape[1]
    return {"layer": f"{cfg.d_model} x {cfg.d_expert}, {cfg.n_experts}/{cfg.top_k}", "tokens": n,
            "skipped_macs": n * (cfg.n_experts - cfg.top_k) * cfg.d_model * cfg.d_expert,
            "inference": inference["dense"].median / inference["sparse"].median,
            "training": training["dense"].median / training["sparse"].median,
            "auto": resolve_moe_dispatch(dataclasses.replace(cfg, moe_dispatch="auto"), "cpu", n)}


def table(rows: list[dict[str, float | str | int]]) -> str:
    lines = ["| layer | tokens | skipped MACs per call | dense / sparse, inference | training | auto |",
             "|---|---:|---:|---:|---:|---|"]
    lines += [f"| {r['layer']} | {r['tokens']:,} | 2^{math.log2(float(r['skipped_macs'])):.1f} | "
              f"{r['inference']:.2f} | {r['training']:.2f} | {r['auto']} |" for r in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m benchmarks.dispatch_crossover", description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=int, default=1, help="intra-op threads (default 1)")
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--warmup", type=int, default=3)
    args = p.parse_args(argv)
    threads = set_threads(args.threads)
    base = ModelConfig(vocab_size=10, max_seq_len=81, n_heads=4, min_heads=1, max_heads=4)
    rows = [crossover_row(dataclasses.replace(base, d_model=d, d_expert=f, n_experts=e, top_k=k), n, args.warmup,
                          args.repeats) for d, f, e, k in LAYERS for n in TOKENS]
    print(f"CPU: {cpu_name()}, {threads} thread(s), median of {args.repeats} interleaved calls")
    print(table(rows))


if __name__ == "__main__":
    main()
