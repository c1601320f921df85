"""The Mixture-of-Experts SwiGLU feed-forward: top-k routing, dense and sparse dispatch (the same function)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..config import ModelConfig
from .common import Aux, Tracing, ranked

# -- MoE dispatch -----------------------------------------------------------------------------------------------
#
# Dense dispatch runs all E experts on every token: n_experts / top_k times the useful FLOPs, but as three plain
# matmuls against the stored [D, E*F] / [E*F, D] weights. Sparse dispatch (token sort, as torchtitan's MoE) lists
# the N*k routed (token, expert) pairs, sorts them by expert, gathers their tokens into one [N*k, D] matrix whose
# rows come in contiguous groups (counts[e] rows for expert e), runs each expert's SwiGLU on its own group only
# (`grouped_mm`), and puts the rows back in (token, slot) order to sum the k slots with the combine weights.
# Nothing is dropped (no capacity): the outputs are dense's up to float rounding.
#
# "auto" (resolve_moe_dispatch) takes sparse on CPU when a call's tokens together skip at least
# SPARSE_MIN_SKIPPED_MACS multiply-adds, tokens * (n_experts - top_k) * d_model * d_expert. Sparse pays costs
# (the sort, the gather and scatter of the N*k routed rows, one matmul call per expert) to skip that work, and
# the per-call ones shrink per token as calls grow: at 64 x 128, 4/2 it loses at 256 tokens and wins 1.3x at
# 1,024, 2x at 2,592. 2^23 is where the MoE layer alone, dense against sparse on CPU (inference forward,
# training forward + backward), crosses over at every size measured (32 x 64 to 128 x 256, 256 to 8,192 tokens).
# The timings and the command that makes them: benchmarks/RESULTS.md. The decision is taken per call from the
# call's shape (a compiled block guards on it); an exported graph, whose sizes are symbols, takes the decision at
# EXPORT_TOKENS tokens. Off CPU "auto" stays dense: sparse has no timings there, and nothing says it would win
# (CUDA autocasts dense's matmuls to bf16 but not the custom op, and each grouped matmul reads its group sizes
# back to the host). Both are exact: the choice is only about speed.
SPARSE_MIN_SKIPPED_MACS = 1 << 23
EXPORT_TOKENS = 256


def resolve_moe_dispatch(cfg: ModelConfig, device_type: str = "cpu", tokens: int = EXPORT_TOKENS) -> str:
    """The dispatch a config runs on a device for a call of `tokens` tokens: its moe_dispatch, with "auto"
    decided by SPARSE_MIN_SKIPPED_MACS."""
    if cfg.moe_dispatch != "auto":
        return cfg.moe_dispatch
    skipped = (cfg.n_experts - cfg.top_k) * cfg.d_model * cfg.d_expert  # multiply-adds sparse skips per token
    return "sparse" if device_type == "cpu" and skipped * tokens >= SPARSE_MIN_SKIPPED_MACS else "dense"


# The group sizes are data. torch.compile cannot trace data-dependent sizes without a graph break (and recompiles
# as they change), so eager and compiled code call the grouped matmul through a custom op: one opaque node with
# static shapes, whose gradient is two more of them.
@torch.library.custom_op("moe::grouped_mm", mutates_args=())
def grouped_mm(x: Tensor, w: Tensor, counts: Tensor) -> Tensor:
    """x [M, K] whose rows come in groups of counts[e] rows (e = 0..E-1), w [E, K, N] -> [M, N]: group e @ w[e].
    One matmul per group, from a contiguous slice of x into one of the output; w[e] may be a strided view (a
    column block of the stored [D, E*F] weight)."""
    sizes = counts.tolist()
    y = x.new_empty(x.shape[0], w.shape[-1])
    for e, (xe, ye) in enumerate(zip(x.split(sizes), y.split(sizes), strict=True)):
        torch.mm(xe, w[e], out=ye)
    return y


@grouped_mm.register_fake
def _(x: Tensor, w: Tensor, counts: Tensor) -> Tensor:
    return x.new_empty(x.shape[0], w.shape[-1])


@torch.library.custom_op("moe::grouped_mm_weight_grad", mutates_args=())
def grouped_mm_weight_grad(x: Tensor, dy: Tensor, counts: Tensor) -> Tensor:
    """d(loss)/dw of grouped_mm: [E, K, N], group e's x_e^T @ dy_e (zeros for an empty group)."""
    sizes = counts.tolist()
    return torch.stack([xe.T @ ge for xe, ge in zip(x.split(sizes), dy.split(sizes), strict=True)])


@grouped_mm_weight_grad.register_fake
def _(x: Tensor, dy: Tensor, counts: Tensor) -> Tensor:
    return x.new_empty(counts.shape[0], x.shape[1], dy.shape[1])


def _grouped_mm_setup(ctx, inputs, output) -> None:
    ctx.save_for_backward(*inputs)


def _grouped_mm_backward(ctx, dy: Tensor) -> tuple[Tensor | None, Tensor | None, None]:
    x, w, counts = ctx.saved_tensors
    dx = grouped_mm(dy, w.transpose(1, 2), counts) if ctx.needs_input_grad[0] else None
    dw = grouped_mm_weight_grad(x, dy, counts) if ctx.needs_input_grad[1] else None
    return dx, dw, None


grouped_mm.register_autograd(_grouped_mm_backward, setup_context=_grouped_mm_setup)


class MoEFeedForward(nn.Module):
    """Top-k routed SwiGLU experts, with dense or sparse dispatch (see above; same routing, same outputs).

    Weight layout: w_gate, w_up [D, E*F] and w_down [E*F, D] (expert e owns columns / rows e*F..(e+1)*F), so
    that all experts are one plain matmul each way with the weight fed straight in: ONNX Runtime runs an einsum
    over 3-D weights far slower than plain MatMuls (benchmarks/RESULTS.md), and int8 dynamic quantisation only
    picks up MatMuls whose weight is an initializer.
    `experts()` gives the per-expert [E, ...] views (which sparse dispatch multiplies by).
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.n_experts, self.top_k, self.d_expert = cfg.n_experts, cfg.top_k, cfg.d_expert
        # The dispatch on CPU ("auto": decided per call, see resolve_moe_dispatch), and on other devices.
        self.config = cfg
        self.dispatch = cfg.moe_dispatch
        self.dispatch_off_cpu = resolve_moe_dispatch(cfg, "cuda")
        E, D, Fd = cfg.n_experts, cfg.d_model, cfg.d_expert
        self.router = nn.Linear(D, E, bias=False)
        self.w_gate = nn.Parameter(torch.empty(D, E * Fd))
        self.w_up = nn.Parameter(torch.empty(D, E * Fd))
        self.w_down = nn.Parameter(torch.empty(E * Fd, D))
        self.tracing = Tracing()  # the model's own, once it is part of one

    def experts(self) -> tuple[Tensor, Tensor, Tensor]:
        """Views of the weights per expert: gate and up [E, D, F], down [E, F, D]."""
        E, Fd = self.n_experts, self.d_expert
        return (self.w_gate.unflatten(1, (E, Fd)).transpose(0, 1), self.w_up.unflatten(1, (E, Fd)).transpose(0, 1),
                self.w_down.unflatten(0, (E, Fd)))

    def dense(self, x: Tensor, top_w: Tensor, top_i: Tensor) -> Tensor:
        """Every expert on every token; experts outside a token's top k get combine weight exactly zero."""
        E, Fd = self.n_experts, self.d_expert
        gates = x.new_zeros(*x.shape[:-1], E).scatter(-1, top_i, top_w)  # [B, T, E]
        gate = (x @ self.w_gate).unflatten(-1, (E, Fd))  # [B, T, E, F]
        up = (x @ self.w_up).unflatten(-1, (E, Fd))
        h = F.silu(gate) * up * gates.unsqueeze(-1)
        return h.flatten(-2) @ self.w_down  # [B, T, D]

    def sparse(self, x: Tensor, top_w: Tensor, top_i: Tensor) -> Tensor:
        """Each expert on the tokens routed to it only: pairs sorted by expert, one matmul per expert group."""
        k, D = self.top_k, x.shape[-1]
        expert = top_i.flatten()  # [N*k]: pair j is (token j // k, slot j % k)
        order = expert.argsort()  # pairs grouped by expert: the i-th row of the groups is pair order[i]
        counts = (expert[:, None] == torch.arange(self.n_experts, device=x.device)).sum(0)  # [E] pairs per expert
        xs = x.reshape(-1, D).index_select(0, order // k)  # [N*k, D] each pair's token, in expert order
        gate, up, down = self.experts()
        if torch.compiler.is_exporting():
            # The ONNX exporter has no translation for a custom op: torch.export traces the loop instead, with the
            # sizes as symbols, and the graph slices each expert's rows by the runtime counts (Slice + MatMul).
            sizes = counts.tolist()
            ys = torch.cat([(F.silu(xe @ gate[e]) * (xe @ up[e])) @ down[e] for e, xe in enumerate(xs.split(sizes))])
        else:
            ys = grouped_mm(F.silu(grouped_mm(xs, gate, counts)) * grouped_mm(xs, up, counts), down, counts)
        y = ys.index_select(0, order.argsort())  # back to pair order: [N*k, D]
        return (y.view(*x.shape[:-1], k, D) * top_w.unsqueeze(-1)).sum(-2)  # [B, T, D]

    def forward(self, x: Tensor, collect: bool) -> tuple[Tensor, Aux]:
        logits = self.router(x).float()  # [B, T, E]
        probs = logits.softmax(dim=-1)
        sorted_p, order = ranked(probs)
        top_p, top_i = sorted_p[..., : self.top_k], order[..., : self.top_k]
        if self.tracing.decisions is not None:  # the choice changes when the k-th and the (k+1)-th expert swap
            gap = sorted_p[..., self.top_k - 1] - sorted_p[..., self.top_k] if self.top_k < self.n_experts \
                else torch.full_like(sorted_p[..., 0], math.inf)
            self.tracing.record("experts", top_i, gap)
        top_w = (top_p / top_p.sum(dim=-1, keepdim=True)).to(x.dtype)  # combine weights, sum to 1 over the k
        dispatch = self.dispatch if x.device.type == "cpu" else self.dispatch_off_cpu
        if dispatch == "auto":
            tokens = EXPORT_TOKENS if torch.compiler.is_exporting() else x.shape[0] * x.shape[1]
            dispatch = resolve_moe_dispatch(self.config, "cpu", tokens)
        y = self.sparse(x, top_w, top_i) if dispatch == "sparse" else self.dense(x, top_w, top_i)
        if not collect:
            return y, Aux()
        # Switch-style balance: f = fraction of routed (token, slot) pairs per expert, P = mean prob.
        load = torch.zeros_like(probs).scatter(-1, top_i, 1.0).mean(dim=(0, 1)) / self.top_k  # [E]
        losses = {"moe_balance": self.n_experts * (load * probs.mean(dim=(0, 1))).sum(),
                  "moe_z": torch.logsumexp(logits, dim=-1).square().mean()}
        load = load.detach()
        # Dropped: routed (token, slot) pairs whose expert output never reaches the token (zero combine weight).
        # Both dispatches compute every routed pair, so none is dropped unless a weight underflows.
        dropped = (top_w.detach() == 0).sum().to(load.dtype)
        stats = {"moe_load": load, "moe_load_cv": load.std(correction=0) / load.mean(), "moe_dropped": dropped}
        return y, Aux(losses, stats)
