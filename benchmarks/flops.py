"""FLOPs per token, from the config and the routing the real forward pass made, and the machine's matmul peak.

A multiply-add is 2 FLOPs; only matmuls and attention are counted (norms, softmax, routing sorts and
elementwise ops are < 2% here). Per block call and token (D = d_model, hd = head_dim, F = d_expert):

    head   : its q, k, v, o projection slices 4 * 2*D*hd, plus scores and weighted values 2 * 2*hd*ctx
    expert : gate, up, down 3 * 2*D*F
    routers: MoH router 2*D*H, complexity and threshold 2 * 2*D, MoE router 2*D*E

Block calls per token: steps run * H_cycles * (L_cycles + 1) * n_layers (n_layers for the baseline), plus the
lm head 2*D*V once. Two counts:

- **model FLOPs** (the useful work, as in MFU): the heads each token selected (mean measured in the real
  forward), top_k experts, causal context (T+1)/2, and the steps the runtime runs — all halt_max_steps for
  eager eval and the exported graph, which unroll every step and select the halting step with masks (a
  step-wise runtime would pass the samples' mean halt step instead);
- **executed FLOPs** (what the code computes): every head with the masked full T x T attention, every expert
  under dense dispatch (top_k under sparse: moe_core.model.moe.resolve_moe_dispatch), and every step.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import torch

from moe_core.config import ModelConfig
from moe_core.model import RecursiveMoE
from moe_core.model.moe import resolve_moe_dispatch

from .timing import Timing, measure


@dataclass
class Routing:
    heads_per_token: float  # mean MoH heads per token, over every layer and block call
    halt_step_mean: float  # mean 1-based halt step of the samples: the steps a step-wise runtime would run


def measure_routing(model: RecursiveMoE, input_ids: torch.Tensor) -> Routing:
    """Routing of a real forward pass on `input_ids`. The statistics are only collected in training mode:
    the forward runs there under no_grad — the same routing as eval when dropout is 0 (the hard 0/1 head mask
    is the forward value in both modes; halting is selected the same way)."""
    was_training = model.training
    model.train()
    try:
        with torch.no_grad():
            out = model(input_ids)
    finally:
        model.train(was_training)
    cfg = model.config
    heads = [float(out.stats[f"L{i + 1}.moh_heads"]) for i in range(cfg.n_layers)]
    return Routing(sum(heads) / len(heads), float(out.halt_step.float().mean()))


def block_flops(cfg: ModelConfig, heads: float, experts: float, ctx: float) -> float:
    D, hd = cfg.d_model, cfg.head_dim
    per_head = 4 * 2 * D * hd + 2 * 2 * hd * ctx
    routers = 2 * D * cfg.n_heads + 2 * 2 * D + 2 * D * cfg.n_experts
    return heads * per_head + experts * 3 * 2 * D * cfg.d_expert + routers


def flops_per_token(cfg: ModelConfig, seq_len: int, heads: float, experts: float, steps: float,
                    causal_ctx: bool) -> float:
    ctx = (seq_len + 1) / 2 if causal_ctx and cfg.causal else seq_len
    calls = steps * cfg.H_cycles * (cfg.L_cycles + 1) * cfg.n_layers if cfg.recursive else cfg.n_layers
    return calls * block_flops(cfg, heads, experts, ctx) + 2 * cfg.d_model * cfg.vocab_size


def model_flops_per_token(cfg: ModelConfig, seq_len: int, routing: Routing, steps: float | None = None) -> float:
    """Useful FLOPs per token of a runtime that runs `steps` supervision steps (default: all of them)."""
    steps = cfg.n_steps if steps is None else steps
    return flops_per_token(cfg, seq_len, routing.heads_per_token, cfg.top_k, steps, causal_ctx=True)


def experts_run(cfg: ModelConfig) -> int:
    """Experts each token goes through on CPU: all of them under dense dispatch, its top_k under sparse."""
    return cfg.top_k if resolve_moe_dispatch(cfg) == "sparse" else cfg.n_experts


def executed_flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    return flops_per_token(cfg, seq_len, cfg.n_heads, experts_run(cfg), cfg.n_steps, causal_ctx=False)


def flops_summary(cfg: ModelConfig, seq_len: int, routing: Routing) -> dict[str, float]:
    model, executed = model_flops_per_token(cfg, seq_len, routing), executed_flops_per_token(cfg, seq_len)
    return {**asdict(routing), "seq_len": seq_len, "steps_run": cfg.n_steps, "experts_run": experts_run(cfg),
            "moe_dispatch": resolve_moe_dispatch(cfg), "model_flops_per_token": model,
            "executed_flops_per_token": executed, "executed_per_model": executed / model}


PEAK = "matmul_peak"


def matmul_call(n: int) -> Callable[[], torch.Tensor]:
    """One large fp32 [n, n] @ [n, n] torch.matmul (2 n^3 FLOPs): timed, the machine's dense peak. The serving
    suite times it in the same loop as the runtimes, so the peak and the throughput see the same machine load."""
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(n, n, generator=g), torch.randn(n, n, generator=g)
    c = torch.empty(n, n)
    return lambda: torch.matmul(a, b, out=c)


def peak_record(n: int, t: Timing) -> dict[str, Any]:
    return {"n": n, "flops_per_s": 2 * n**3 / t.median, **t.to_dict()}


def matmul_peak(n: int, warmup: int, repeats: int) -> dict[str, Any]:
    """The peak timed alone (when the serving suite, which times it with the runtimes, does not run)."""
    return peak_record(n, measure({PEAK: matmul_call(n)}, warmup, repeats)[PEAK])
