"""The recursive Mixture-of-Experts / Mixture-of-Heads model, in the order data flows through it.

    x    = embed(ids) * sqrt(d_model)
    for step in 1..halt_max_steps:                       # supervision steps
        for h in 1..H_cycles:
            for l in 1..L_cycles:  z_L = net(z_L + z_H + x)
            z_H = net(z_H + z_L)
        logits_step = lm_head(norm(z_H)); halt_logit_step = halt_head(norm(z_H))

`net` is a stack of pre-norm blocks: h = x + MoH(norm(x)); y = h + MoE(norm(h)).
With recursion off the model is the plain baseline: logits = lm_head(norm(net(x))).

Training returns every step's logits (deep supervision) with the aux losses and statistics; evaluation runs
every step and keeps, per sample, the state of the first step whose halt probability is > 0.5 (the last
step if none) — selected with masks, so eager eval and the exported ONNX graph are the same function.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .config import ModelConfig

# Temperature of the relaxed (straight-through) head mask: small enough that the soft mask is close to the
# hard one, large enough that the complexity and threshold predictors get a useful gradient.
MASK_TEMPERATURE = 0.1


def ranked(x: Tensor) -> tuple[Tensor, Tensor]:
    """x sorted in descending order along its last axis, with its indices; exact ties go to the lower index first.

    This is the tie rule of ONNX TopK, which the exported graph's routing runs on (the exporter writes a sort as
    TopK). torch.topk and an unstable sort promise no order among equal values, so an exact tie could route a
    token to another expert or head in eager than in the graph. Every ranking in the model goes through here.
    (The exporter has no translation of the stable overload; the plain sort it translates is TopK, whose order is
    this one. Sparse dispatch's argsorts need no rule: the rows they order are put back in place.)"""
    if torch.compiler.is_exporting():
        return x.sort(dim=-1, descending=True)
    return x.sort(dim=-1, descending=True, stable=True)


# -- routing and halting decisions --------------------------------------------------------------------------------
#
# Every discrete choice of the model is a comparison of computed values: the experts a token is routed to
# (router probabilities ranked), the heads it uses (ranked probabilities against the threshold and the target
# count) and whether a sample halts (its halt logit against 0). Two runtimes compute those values with
# different fp32 summation orders, so a choice whose margin is within that noise may go either way. Parity
# (export/parity.py) compares the choices themselves; `recording_decisions` collects them, with each choice's
# margin: how far the compared values are from changing it, relative to their scale (probabilities and
# thresholds are <= 1, the head count is relative to max_heads + 0.5, a halt logit to max(1, max |logit|)).

DECISION_KINDS = ("heads", "experts", "halt")


@dataclass
class Decision:
    kind: str  # one of DECISION_KINDS
    choice: Tensor  # heads: [B, T, H] 0/1 mask; experts: [B, T, k] chosen ids; halt: [B] halt logit (halts if > 0)
    margin: Tensor  # >= 0. heads: [B, T, 2], of the head count and of the set at that count; experts: [B, T]; halt: [B]


@dataclass
class Tracing:
    """What an exporter asks of one model's forward, for the duration of a trace: every routing and halting
    decision appended to `decisions` (when it is a list), rotary embeddings as ONNX's fused operator. One object per
    model, shared by its modules (RecursiveMoE.__init__), set through the context managers below: state of that
    model, not of the process."""

    decisions: list[Decision] | None = None
    onnx_rotary: bool = False

    def record(self, kind: str, choice: Tensor, margin: Tensor) -> None:
        if self.decisions is not None:
            self.decisions.append(Decision(kind, choice, margin))


@contextmanager
def recording_decisions(model: RecursiveMoE) -> Iterator[list[Decision]]:
    """Within the block, every forward of `model` appends its decisions, in call order, to the yielded list."""
    previous, model.tracing.decisions = model.tracing.decisions, []
    try:
        yield model.tracing.decisions
    finally:
        model.tracing.decisions = previous


class AuxAccumulator:
    """Collects aux losses and statistics over the block calls of one forward pass.

    Keys ending in `_min` / `_max` reduce by min / max, everything else by mean over calls. The caller adds a
    loss only from a call that backpropagates (grad enabled): a no-grad cycle's value cannot move a weight, and
    averaging it in would scale every loss's gradient by the share of calls that do, so that a weight would mean
    1 / H_cycles of itself. Statistics describe every call.
    """

    def __init__(self) -> None:
        self._values: dict[str, Tensor] = {}
        self._counts: dict[str, int] = {}

    def add(self, key: str, value: Tensor) -> None:
        if key not in self._values:
            self._values[key], self._counts[key] = value, 1
        elif key.endswith("_min"):
            self._values[key] = torch.minimum(self._values[key], value)
        elif key.endswith("_max"):
            self._values[key] = torch.maximum(self._values[key], value)
        else:
            self._values[key] = self._values[key] + value
            self._counts[key] += 1

    def result(self) -> dict[str, Tensor]:
        return {k: v if k.endswith(("_min", "_max")) else v / self._counts[k] for k, v in self._values.items()}


@dataclass
class Aux:
    """What one module call adds to the aux losses (differentiable) and to the statistics (detached)."""

    losses: dict[str, Tensor] = field(default_factory=dict)
    stats: dict[str, Tensor] = field(default_factory=dict)


@dataclass
class ModelOutput:
    logits: Tensor  # [B, T, V] halting-selected (eval) or the last step's (training)
    halt_step: Tensor  # [B] int64, 1-based step whose logits were kept
    step_logits: list[Tensor] = field(default_factory=list)  # training: one [B, T, V] per supervision step
    halt_logits: Tensor | None = None  # training: [S, B] halting logit of every step
    aux_losses: dict[str, Tensor] = field(default_factory=dict)  # training: unweighted mean over grad calls, by name
    stats: dict[str, Tensor] = field(default_factory=dict)  # training: detached statistics, by name
    carry: Carry | None = None  # forward(carry=...): the state after this step, detached (the next update's start)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)


# Rotary embeddings as one operator: the ONNX RotaryEmbedding (opset 23) computes exactly the rotate-half form
# below from half-width tables, and torch.onnx.ops.rotary_embedding traces to that one node (eager, it runs the
# operator's reference implementation). The exporter turns it on for graphs of opset >= 23 only; training and the
# eager model keep the plain form.
@contextmanager
def onnx_rotary(model: RecursiveMoE) -> Iterator[None]:
    """Within the block, every Rotary of `model` is the ONNX RotaryEmbedding operator."""
    previous, model.tracing.onnx_rotary = model.tracing.onnx_rotary, True
    try:
        yield
    finally:
        model.tracing.onnx_rotary = previous


class Rotary(nn.Module):
    """Rotary position embeddings (rotate-half form), tables precomputed up to max_seq_len."""

    def __init__(self, head_dim: int, max_seq_len: int, theta: float) -> None:
        super().__init__()
        inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
        half = torch.outer(torch.arange(max_seq_len, dtype=torch.float32), inv_freq)  # [T, hd/2]
        angles = torch.cat([half, half], dim=-1)  # [T, hd]
        # Not persistent: derived from the config, so never stored in (or demanded from) a checkpoint.
        self.register_buffer("cos", angles.cos(), persistent=False)
        self.register_buffer("sin", angles.sin(), persistent=False)
        self.register_buffer("cos_half", half.cos(), persistent=False)  # the ONNX operator's tables
        self.register_buffer("sin_half", half.sin(), persistent=False)
        self.tracing = Tracing()  # the model's own, once it is part of one

    def forward(self, x: Tensor, positions: Tensor | None = None) -> Tensor:
        """x: [B, H, T, hd] at positions 0..T-1, or at `positions` [B, T] (cached decoding)."""
        if self.tracing.onnx_rotary:
            if positions is None:
                positions = torch.arange(x.shape[-2], device=x.device).expand(x.shape[0], -1)
            from torch.onnx import ops as onnx_ops

            return onnx_ops.rotary_embedding(x, self.cos_half, self.sin_half, positions)
        if positions is None:
            cos, sin = self.cos[: x.shape[-2]], self.sin[: x.shape[-2]]
        else:
            cos, sin = self.cos[positions].unsqueeze(1), self.sin[positions].unsqueeze(1)  # [B, 1, T, hd]
        x1, x2 = x.chunk(2, dim=-1)
        return x * cos + torch.cat([-x2, x1], dim=-1) * sin


@dataclass
class KVCache:
    """The keys and values of every block application of a causal model's forward, in call order (supervision
    step, H-cycle, net call, layer), each [B, n_heads, T, head_dim]. Position t's state in every block application
    depends on positions <= t only, so running new positions against these keys and values gives exactly what a
    forward over the whole sequence gives at them."""

    keys: list[Tensor] = field(default_factory=list)
    values: list[Tensor] = field(default_factory=list)

    @property
    def length(self) -> int:
        return self.keys[0].shape[2] if self.keys else 0


class CacheCursor:
    """One cached forward: the logical positions of its new tokens [B, T], and each block application's past keys
    and values in call order, extended by the new ones into `present`."""

    def __init__(self, past: KVCache | None, positions: Tensor) -> None:
        self.past, self.positions, self.present = past, positions, KVCache()

    def extend(self, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        i = len(self.present.keys)
        if self.past is not None:
            if i >= len(self.past.keys):
                raise ValueError(f"past: {len(self.past.keys)} block applications cached, this forward has more")
            k, v = torch.cat([self.past.keys[i], k], dim=2), torch.cat([self.past.values[i], v], dim=2)
        self.present.keys.append(k)
        self.present.values.append(v)
        return k, v

    def attend(self, q: Tensor, k: Tensor, v: Tensor, key_mask: Tensor) -> Tensor:
        """Attention of the new positions' queries [B, H, T, hd] over the cached and the new keys and values (which
        this extends the cache with); key_mask [B, past + T]."""
        T = q.shape[2]
        k, v = self.extend(k, v)
        tril = torch.ones(T, k.shape[2], dtype=torch.bool, device=q.device).tril(diagonal=k.shape[2] - T)
        # the causal rule in cache order, which is position order for every token (holes are masked)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=key_mask[:, None, None, :] & tril)


@dataclass
class HeadRouting:
    probs: Tensor  # [B, T, H] router probabilities
    mask: Tensor  # [B, T, H] selected heads: exactly 0/1 forward; relaxed gradient in training
    complexity: Tensor  # [B, T] in [0, 1]
    target: Tensor  # [B, T] target head count in [min_heads, max_heads]
    threshold: Tensor  # [B, T] top-p threshold in [0.3, 0.8]


class MoHAttention(nn.Module):
    """Fully adaptive Mixture-of-Heads attention: every head is a candidate, each token picks its own.

    Per token: complexity c = sigmoid(w_c x + b_c) sets a target head count t = min + c (max - min);
    threshold theta = 0.3 + 0.5 sigmoid(w_t x + b_t); heads are taken in descending router probability
    while the probability taken so far is below theta and the count is below round(t), never fewer than
    min_heads. Each selected head's output is weighted by its router probability, renormalised over the
    selected heads as the MoE combine weights are: a token's attention output is a convex combination of its
    heads, so concentrating the router buys no output scale (raw probabilities would let a router grow its
    output by collapsing onto one head).
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.n_heads, self.head_dim = cfg.n_heads, cfg.head_dim
        self.min_heads, self.max_heads = cfg.min_heads, cfg.max_heads
        self.causal = cfg.causal
        self.dropout = cfg.dropout
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model, bias=False)
        self.o_proj = nn.Linear(cfg.d_model, cfg.d_model, bias=False)
        self.router = nn.Linear(cfg.d_model, cfg.n_heads, bias=False)
        self.complexity_head = nn.Linear(cfg.d_model, 1)
        self.threshold_head = nn.Linear(cfg.d_model, 1)
        self.rotary = Rotary(cfg.head_dim, cfg.max_seq_len, cfg.rope_theta)
        # [H, max_seq_len, max_seq_len] added to every score (ModelConfig.attn_bias); zero at start.
        self.attn_bias = nn.Parameter(torch.zeros(cfg.n_heads, cfg.max_seq_len, cfg.max_seq_len)) \
            if cfg.attn_bias else None
        self.tracing = Tracing()  # the model's own, once it is part of one

    def route(self, x: Tensor) -> HeadRouting:
        H = self.n_heads
        probs = self.router(x).float().softmax(dim=-1)  # [B, T, H]
        complexity = torch.sigmoid(self.complexity_head(x).float()).squeeze(-1)
        target = self.min_heads + complexity * (self.max_heads - self.min_heads)
        threshold = 0.3 + 0.5 * torch.sigmoid(self.threshold_head(x).float()).squeeze(-1)

        sorted_p, order = ranked(probs)
        taken_before = sorted_p.cumsum(dim=-1) - sorted_p  # probability mass of the better-ranked heads
        rank = torch.arange(1, H + 1, device=x.device, dtype=probs.dtype)  # 1-based rank of each sorted head
        t, th = target.unsqueeze(-1), threshold.unsqueeze(-1)
        forced = rank <= self.min_heads
        by_count, by_mass = rank <= t + 0.5, taken_before < th
        keep = forced | (by_count & by_mass)  # a prefix of the ranking: both conditions only turn false with rank
        mask_sorted = keep.to(probs.dtype)
        if self.training:
            # Straight-through: the forward value is the hard 0/1 mask, the gradient is that of a sigmoid
            # relaxation of both conditions, so the complexity and threshold predictors learn.
            soft = torch.sigmoid((t + 0.5 - rank) / MASK_TEMPERATURE) * torch.sigmoid(
                (th - taken_before) / MASK_TEMPERATURE)
            soft = torch.where(forced, torch.ones_like(soft), soft)
            mask_sorted = (soft - soft.detach()) + mask_sorted  # this order keeps the forward value exact
        mask = torch.zeros_like(probs).scatter(-1, order, mask_sorted)  # back to head order
        if self.tracing.decisions is not None:
            self.tracing.record("heads", mask, self._selection_margin(sorted_p, keep, forced, by_count, by_mass,
                                                          (t + 0.5 - rank) / (self.max_heads + 0.5), th - taken_before))
        return HeadRouting(probs, mask, complexity, target, threshold)

    @staticmethod
    def _selection_margin(sorted_p: Tensor, keep: Tensor, forced: Tensor, by_count: Tensor, by_mass: Tensor,
                          count_gap: Tensor, mass_gap: Tensor) -> Tensor:
        """How far a token's head selection is from changing: [B, T, 2], (its head count, its set of heads at that
        count). A kept head is dropped when either of its conditions turns, a dropped head is taken only when every
        condition it fails turns; at the same count, the set changes when the last kept and the first dropped head
        swap ranks."""
        m_count, m_mass = count_gap.abs(), mass_gap.abs()
        inf = torch.full_like(m_count, math.inf)
        kept_margin = torch.minimum(m_count, m_mass)
        dropped_margin = torch.maximum(torch.where(by_count, 0.0, m_count), torch.where(by_mass, 0.0, m_mass))
        per_rank = torch.where(forced, inf, torch.where(keep, kept_margin, dropped_margin))
        n = keep.sum(-1, keepdim=True)  # [B, T, 1] heads kept, >= min_heads >= 1
        H = sorted_p.shape[-1]
        last = sorted_p.gather(-1, n - 1)
        first_out = sorted_p.gather(-1, n.clamp(max=H - 1))
        swap = torch.where(n < H, last - first_out, math.inf)
        return torch.stack([per_rank.amin(-1), swap.squeeze(-1)], dim=-1)

    def forward(self, x: Tensor, key_mask: Tensor | None, collect: bool,
                cache: CacheCursor | None = None) -> tuple[Tensor, Aux]:
        """x [B, T, D]; key_mask [B, T] (or, with `cache`, [B, past + T] over the cached and the new positions)."""
        B, T, D = x.shape
        H, hd = self.n_heads, self.head_dim
        r = self.route(x)
        q, k, v = self.qkv(x).view(B, T, 3, H, hd).permute(2, 0, 3, 1, 4)  # each [B, H, T, hd]
        dropout = self.dropout if self.training else 0.0
        if cache is not None:
            q, k = self.rotary(q, cache.positions), self.rotary(k, cache.positions)
            o = cache.attend(q, k, v, key_mask)
        elif key_mask is None and self.attn_bias is None:
            q, k = self.rotary(q), self.rotary(k)
            o = F.scaled_dot_product_attention(q, k, v, is_causal=self.causal, dropout_p=dropout)
        else:
            q, k = self.rotary(q), self.rotary(k)
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=self._scores_mask(key_mask, T, q),
                                               dropout_p=dropout)
        weights = r.probs * r.mask
        weights = (weights / weights.sum(dim=-1, keepdim=True)).to(o.dtype)  # [B, T, H], sums to 1 per token
        o = o * weights.transpose(1, 2).unsqueeze(-1)
        y = self.o_proj(o.transpose(1, 2).reshape(B, T, D))
        return y, (self._aux(r) if collect else Aux())

    def _scores_mask(self, key_mask: Tensor | None, T: int, q: Tensor) -> Tensor:
        """SDPA's attn_mask: which keys each query may see (boolean), or the learned bias with -inf where it may
        not (float). Padding keys are never attended to; causal models see no later key."""
        allowed = None if key_mask is None else key_mask[:, None, None, :]  # [B, 1, 1, T]
        if self.causal:
            tril = torch.ones(T, T, dtype=torch.bool, device=q.device).tril()
            allowed = tril if allowed is None else allowed & tril
        if self.attn_bias is None:
            return allowed
        bias = self.attn_bias[:, :T, :T].to(q.dtype)  # [H, T, T]
        return bias if allowed is None else bias.masked_fill(~allowed, float("-inf"))

    def _aux(self, r: HeadRouting) -> Aux:
        active = r.mask.sum(dim=-1)  # [B, T] heads per token (carries the relaxed gradient)
        load = r.mask.detach().mean(dim=(0, 1))  # [H] fraction of tokens using each head
        th, c = r.threshold.detach(), r.complexity.detach()
        w = torch.cat([self.complexity_head.weight, self.threshold_head.weight]).detach()
        losses = {
            "moh_balance": (r.probs.mean(dim=(0, 1)) * load).sum(),
            "moh_complexity": (active.mean() - r.target.mean()).abs(),
            "moh_sparsity": active.mean() / self.n_heads,
        }
        stats = {
            "moh_heads": active.detach().mean(), "moh_head_load": load,
            "moh_threshold": th.mean(), "moh_threshold_min": th.min(), "moh_threshold_max": th.max(),
            "moh_complexity": c.mean(), "moh_complexity_min": c.min(), "moh_complexity_max": c.max(),
            "moh_pred_norm": w.norm(),
        }
        return Aux(losses, stats)


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


class TokenMLP(nn.Module):
    """TRM's token-mixing MLP (model.token_mixer = "mlp"): a SwiGLU across positions, the same for every channel,
    so that every position's output is a learned function of every position. Inputs fill max_seq_len (the config
    refuses a causal model; forward refuses other lengths and padding)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        T, hidden = cfg.max_seq_len, 4 * cfg.max_seq_len
        self.w_gate = nn.Parameter(torch.empty(T, hidden))
        self.w_up = nn.Parameter(torch.empty(T, hidden))
        self.w_down = nn.Parameter(torch.empty(hidden, T))

    def forward(self, x: Tensor, key_mask: Tensor | None, collect: bool,
                cache: CacheCursor | None = None) -> tuple[Tensor, Aux]:
        u = x.transpose(1, 2)  # [B, D, T]: each channel's sequence is one input of the MLP
        y = (F.silu(u @ self.w_gate) * (u @ self.w_up)) @ self.w_down
        return y.transpose(1, 2), Aux()


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.attn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.attn: MoHAttention | TokenMLP = TokenMLP(cfg) if cfg.token_mixer == "mlp" else MoHAttention(cfg)
        self.ffn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.ffn = MoEFeedForward(cfg)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x: Tensor, key_mask: Tensor | None, collect: bool,
                cache: CacheCursor | None = None) -> tuple[Tensor, Aux]:
        a, attn_aux = self.attn(self.attn_norm(x), key_mask, collect, cache)
        h = x + self.drop(a)
        f, ffn_aux = self.ffn(self.ffn_norm(h), collect)
        return h + self.drop(f), Aux({**attn_aux.losses, **ffn_aux.losses}, {**attn_aux.stats, **ffn_aux.stats})


class ReasoningNet(nn.Module):
    """The block stack that refines z_L and z_H (and, with recursion off, maps x to the final state)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        # The recursion feeds the net sums of states (z_L + z_H + x) many times over; with pre-norm blocks
        # alone those sums grow geometrically with the cycles. Normalising the net's input keeps every
        # cycle's state at unit scale, as the post-norm blocks of TRM/HRM do.
        self.in_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))

    def forward(self, u: Tensor, key_mask: Tensor | None, acc: AuxAccumulator | None,
                cache: CacheCursor | None = None) -> Tensor:
        u = self.in_norm(u)
        for i, block in enumerate(self.blocks):
            # Blocks return their aux values instead of recording them, so that a compiled block is a pure
            # function (one graph for all layers and calls); the accumulation happens out here.
            u, aux = block(u, key_mask, acc is not None, cache)
            if acc is not None:
                if torch.is_grad_enabled():
                    for k, v in aux.losses.items():
                        acc.add(k, v)
                for k, v in aux.stats.items():
                    acc.add(f"L{i + 1}.{k}", v)
        return u


@dataclass
class CachedOutput:
    logits: Tensor  # [B, T, V] the kept step's logits at the new positions
    halt_step: Tensor  # [B] int64, decided at the prefill and carried
    present: KVCache  # every block application's keys and values, past and new


@dataclass
class Carry:
    """The recurrent state between supervision steps."""

    z_H: Tensor  # [B, T, D]
    z_L: Tensor  # [B, T, D]

    def detach(self) -> Carry:
        return Carry(self.z_H.detach(), self.z_L.detach())


class RecursiveMoE(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        cfg.validate()
        self.config = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.embed_scale = math.sqrt(cfg.d_model)
        self.pos_embed = nn.Embedding(cfg.max_seq_len, cfg.d_model) if cfg.learned_pos else None
        self.net = ReasoningNet(cfg)
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        self.halt_head = nn.Linear(cfg.d_model, 1)
        # Fixed (not learned) initial states, as in TRM; saved with the weights.
        self.register_buffer("z_H_init", torch.empty(cfg.d_model))
        self.register_buffer("z_L_init", torch.empty(cfg.d_model))
        self.tracing = Tracing()  # what an export asks of this model's forward, shared by every module that reads it
        for m in self.modules():
            if isinstance(m, (Rotary, MoHAttention, MoEFeedForward)):
                m.tracing = self.tracing
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        cfg = self.config
        std = 0.02
        out_std = std / math.sqrt(2 * cfg.n_layers)  # residual-branch outputs, as in GPT-2
        for name, p in self.named_parameters():
            if name.endswith(("o_proj.weight", "w_down")):
                nn.init.normal_(p, std=out_std)
            elif p.dim() >= 2:
                nn.init.normal_(p, std=std)
        # Unit-RMS embeddings after the sqrt(d_model) scale.
        for emb in (self.embed, self.pos_embed):
            if emb is not None:
                nn.init.normal_(emb.weight, std=1.0 / math.sqrt(cfg.d_model))
        for norm in (m for m in self.modules() if isinstance(m, RMSNorm)):
            norm.weight.fill_(1.0)
        for m in self.net.modules():
            if isinstance(m, MoHAttention):
                # complexity 0.5 and threshold 0.55 for every token at start; the router starts uniform.
                m.complexity_head.bias.zero_()
                m.threshold_head.bias.zero_()
                if m.attn_bias is not None:  # attention starts from the query-key scores alone
                    m.attn_bias.zero_()
        # A fresh model keeps thinking: halt probability sigmoid(-5) ~ 0.007 at every step (as TRM).
        self.halt_head.weight.zero_()
        self.halt_head.bias.fill_(-5.0)
        nn.init.trunc_normal_(self.z_H_init, std=1.0, a=-2.0, b=2.0)
        nn.init.trunc_normal_(self.z_L_init, std=1.0, a=-2.0, b=2.0)

    # -- the pieces of the recursion ------------------------------------------------------------------

    def _h_cycle(self, c: Carry, x: Tensor, key_mask: Tensor | None, acc: AuxAccumulator | None,
                 cache: CacheCursor | None = None) -> Carry:
        z_L = c.z_L
        for _ in range(self.config.L_cycles):
            z_L = self.net(z_L + c.z_H + x, key_mask, acc, cache)
        return Carry(self.net(c.z_H + z_L, key_mask, acc, cache), z_L)

    def _supervision_step(self, c: Carry, x: Tensor, key_mask: Tensor | None,
                          acc: AuxAccumulator | None, cache: CacheCursor | None = None) -> Carry:
        n_free = self.config.H_cycles - 1 if (self.training and self.config.no_grad_cycles) else 0
        with torch.no_grad():
            for _ in range(n_free):
                c = self._h_cycle(c, x, key_mask, acc, cache)
        for _ in range(self.config.H_cycles - n_free):
            c = self._h_cycle(c, x, key_mask, acc, cache)
        return c

    def embed_inputs(self, input_ids: Tensor, positions: Tensor | None = None) -> Tensor:
        """x = embed(ids) * sqrt(d_model) (+ learned positions, likewise scaled): [B, T, D]; tokens at positions
        0..T-1, or at `positions` [B, T]. The only place the scale is applied."""
        x = self.embed(input_ids) * self.embed_scale
        if self.pos_embed is not None:
            if positions is None:
                positions = torch.arange(input_ids.shape[1], device=input_ids.device)
            x = x + self.pos_embed(positions) * self.embed_scale
        return x

    def initial_carry(self, B: int, T: int) -> Carry:
        return Carry(self.z_H_init.expand(B, T, -1), self.z_L_init.expand(B, T, -1))

    def step(self, c: Carry, x: Tensor, key_mask: Tensor | None, acc: AuxAccumulator | None = None,
             cache: CacheCursor | None = None) -> tuple[Carry, Tensor, Tensor]:
        """One supervision step from the carry `c`: (the carry after it, h = norm(z_H) [B, T, D] — what lm_head
        reads — and the halt logit [B]: the sample halts at this step when it is > 0). forward runs it
        halt_max_steps times; a step-wise runtime (`moe export --stepwise`) runs it as a graph of its own."""
        c = self._supervision_step(c, x, key_mask, acc, cache)
        h = self.norm(c.z_H)
        return c, h, self._halt_logit(h, key_mask)

    def _halt_logit(self, h: Tensor, key_mask: Tensor | None) -> Tensor:  # h = norm(z_H): [B, T, D] -> [B]
        if self.config.causal:
            # The first position sees only the first token, so halting never lets a later token change an
            # earlier token's logits: the model stays causal, per sample, whatever the sequence length.
            pooled = h[:, 0]
        elif key_mask is None:
            pooled = h.mean(dim=1)
        else:
            w = key_mask.to(h.dtype).unsqueeze(-1)
            pooled = (h * w).sum(dim=1) / w.sum(dim=1).clamp_min(1.0)
        return self.halt_head(pooled).squeeze(-1).float()

    # -- forward -------------------------------------------------------------------------------------

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None, carry: Carry | None = None,
                stop_when_halted: bool = False) -> ModelOutput:
        """input_ids: [B, T] int64; attention_mask: [B, T] (1 = token, 0 = right padding) or None.

        stop_when_halted (evaluation, eager): skip the steps after every sample has halted. The output is the same
        (every kept step is fixed by then); off where every forward must run alike on every rank (FSDP).

        carry (training a recursive model one supervision step per update, train.supervision = "carry"): run one
        step from it instead of halt_max_steps from the initial state; the output holds that step's logits and
        halt logit ([1, B]) and the carry after it, detached. The caller keeps rows' carries across updates and
        resets halted rows to initial_carry."""
        cfg = self.config
        eager = not (torch.compiler.is_compiling() or torch.compiler.is_exporting())
        if eager:
            self._check_inputs(input_ids, attention_mask)
        B, T = input_ids.shape
        key_mask = None if attention_mask is None else attention_mask.bool()
        acc = AuxAccumulator() if self.training else None
        x = self.embed_inputs(input_ids)  # [B, T, D]

        if not cfg.recursive:
            logits = self.lm_head(self.norm(self.net(x, key_mask, acc)))
            halt_step = torch.ones(B, dtype=torch.long, device=input_ids.device)
            return self._output(logits, halt_step, [logits], None, acc)

        if carry is not None:
            if not self.training:
                raise ValueError("carry: a carried step is a training step (model.train()); evaluation runs forward "
                                 "without it")
            c, h, q = self.step(carry, x, key_mask, acc)
            logits = self.lm_head(h)
            out = self._output(logits, torch.ones(B, dtype=torch.long, device=input_ids.device), [logits], q[None], acc)
            out.carry = c.detach()
            return out

        c = self.initial_carry(B, T)
        halted = torch.zeros(B, dtype=torch.bool, device=input_ids.device)
        halt_step = torch.full((B,), cfg.halt_max_steps, dtype=torch.long, device=input_ids.device)
        kept = c.z_H  # eval: the normed state of the step each sample halted at
        step_logits, halt_logits = [], []
        for step in range(1, cfg.halt_max_steps + 1):
            c, h, q = self.step(c, x, key_mask, acc)  # q: [B] halt logits
            if self.tracing.decisions is not None:
                self.tracing.record("halt", q, q.abs() / q.abs().max().clamp_min(1.0))
            # A sample keeps the first step whose halt probability is > 0.5; the last step if none.
            newly = ~halted & (q > 0)
            halt_step = torch.where(newly, torch.full_like(halt_step, step), halt_step)
            if self.training:
                step_logits.append(self.lm_head(h))
                halt_logits.append(q)
                c = c.detach()  # deep supervision: every step is its own graph
            else:
                kept = torch.where(halted[:, None, None], kept, h)
            halted = halted | (q > 0)
            if stop_when_halted and eager and not self.training and bool(halted.all()):
                break  # every sample's kept step is fixed: the later steps cannot change the output

        if self.training:
            return self._output(step_logits[-1], halt_step, step_logits, torch.stack(halt_logits), acc)
        return self._output(self.lm_head(kept), halt_step, [], None, acc)

    def cached_forward(self, input_ids: Tensor, attention_mask: Tensor, positions: Tensor,
                       past: KVCache | CacheCursor | None = None, halt_step: Tensor | None = None) -> CachedOutput:
        """Incremental decoding of a causal model (eval): what forward gives at the new positions, from the keys and
        values of every block application at the earlier ones.

        input_ids [B, T]: the new tokens, at logical `positions` [B, T]; attention_mask [B, past + T] over the
        cached and the new indices (0: a hole that right padding left in the cache); past: the previous call's
        present (None or length 0 at the prefill), or a cursor over it that does its own attention (the decode
        graph's, export/decode.py). A sample whose new tokens start at position 0 is at its prefill: its halting
        is decided here, from position 0 as forward decides it; afterwards pass that halt_step back
        (it is ignored at a prefill). In eager code a decoding call runs only the steps up to the batch's last kept
        one, and a prefill stops once every sample has halted (their cache then holds just those steps); a traced
        graph runs them all."""
        cfg = self.config
        if not cfg.causal or self.net.blocks[0].attn.attn_bias is not None:
            raise ValueError("cached_forward: a causal model without attn_bias (its keys depend on later positions "
                             "otherwise)")
        B, T = input_ids.shape
        key_mask = attention_mask.bool()
        cursor = past if isinstance(past, CacheCursor) else CacheCursor(past, positions)
        x = self.embed_inputs(input_ids, positions)
        if not cfg.recursive:
            logits = self.lm_head(self.norm(self.net(x, key_mask, None, cursor)))
            return CachedOutput(logits, torch.ones(B, dtype=torch.long, device=x.device), cursor.present)
        S = cfg.halt_max_steps
        fresh = positions[:, 0] == 0  # [B] at its prefill
        given = torch.full((B,), S, dtype=torch.long, device=x.device) if halt_step is None else halt_step
        eager = not (torch.compiler.is_exporting() or torch.compiler.is_compiling())
        last = S if not eager or bool(fresh.any()) else int(given.max())
        decided = torch.full_like(given, S)
        halted = torch.zeros(B, dtype=torch.bool, device=x.device)
        c = self.initial_carry(B, T)
        kept = c.z_H
        for step in range(1, last + 1):
            c, h, q = self.step(c, x, key_mask, None, cursor)
            keep = (fresh & ~halted) | (~fresh & (given >= step))  # the prefill's rule (forward's), or the carried step
            kept = torch.where(keep[:, None, None], h, kept)
            decided = torch.where(~halted & (q > 0), torch.full_like(decided, step), decided)
            halted = halted | (q > 0)
            if eager and bool(fresh.all() & halted.all()):
                break
        return CachedOutput(self.lm_head(kept), torch.where(fresh, decided, given), cursor.present)

    def _check_inputs(self, input_ids: Tensor, attention_mask: Tensor | None) -> None:
        """The Python API's guard: errors that name the argument and what was expected, instead of an indexing error
        deep inside. Shapes and dtypes always; the id range in evaluation (a host sync per forward, which a training
        step's batches, built by the trainer, do not need)."""
        cfg = self.config
        if not isinstance(input_ids, Tensor) or input_ids.dtype not in (torch.int64, torch.int32):
            got = input_ids.dtype if isinstance(input_ids, Tensor) else type(input_ids).__name__
            raise TypeError(f"input_ids: expected an int64 tensor [batch, seq] of token ids, got {got}")
        if input_ids.dim() != 2 or input_ids.shape[0] == 0 or not 1 <= input_ids.shape[1] <= cfg.max_seq_len:
            raise ValueError(f"input_ids: expected shape [batch >= 1, seq in 1..max_seq_len={cfg.max_seq_len}], got "
                             f"{list(input_ids.shape)}")
        if attention_mask is not None and (not isinstance(attention_mask, Tensor)
                                           or attention_mask.shape != input_ids.shape):
            got = list(attention_mask.shape) if isinstance(attention_mask, Tensor) else type(attention_mask).__name__
            raise ValueError(f"attention_mask: expected the shape of input_ids {list(input_ids.shape)}, got {got}")
        if cfg.token_mixer == "mlp" and input_ids.shape[1] != cfg.max_seq_len:
            raise ValueError(f"input_ids: expected {cfg.max_seq_len} positions (token_mixer = 'mlp' mixes exactly "
                             f"max_seq_len), got {input_ids.shape[1]}")
        if not self.training:
            if cfg.token_mixer == "mlp" and attention_mask is not None and not bool(attention_mask.all()):
                raise ValueError("attention_mask: expected no padding (token_mixer = 'mlp' mixes every position)")
            lo, hi = int(input_ids.min()), int(input_ids.max())
            if lo < 0 or hi >= cfg.vocab_size:
                raise ValueError(f"input_ids: expected token ids in 0..{cfg.vocab_size - 1} (vocab_size), got "
                                 f"{lo if lo < 0 else hi}")

    @staticmethod
    def _output(logits: Tensor, halt_step: Tensor, step_logits: list[Tensor], halt_logits: Tensor | None,
                acc: AuxAccumulator | None) -> ModelOutput:
        if acc is None:
            return ModelOutput(logits, halt_step)
        aux = acc.result()
        losses = {k: v for k, v in aux.items() if "." not in k}
        stats = {k: v.detach() for k, v in aux.items() if "." in k}
        return ModelOutput(logits, halt_step, step_logits, halt_logits, losses, stats)

    def use_dispatch(self, dispatch: str) -> None:
        """Every MoE layer runs `dispatch` ("dense" | "sparse") on every device from now on, whatever its config
        resolved to: a graph exported for another device than the one the config chose for needs this (sparse
        dispatch's group sizes are data, which a CUDA graph cannot hold; both dispatches compute the same function)."""
        if dispatch not in ("dense", "sparse"):
            raise ValueError(f"dispatch: expected 'dense' or 'sparse', got {dispatch!r}")
        for m in self.modules():
            if isinstance(m, MoEFeedForward):
                m.dispatch = m.dispatch_off_cpu = dispatch

    def param_groups(self) -> dict[str, list[nn.Parameter]]:
        """Parameters by optimiser treatment: routers and predictors (own LR), no-decay, decay."""
        groups: dict[str, list[nn.Parameter]] = {"router": [], "no_decay": [], "decay": []}
        for name, p in self.named_parameters():
            if any(s in name for s in ("router", "complexity_head", "threshold_head")):
                groups["router"].append(p)
            elif p.dim() < 2 or name.startswith(("embed.", "pos_embed.")) or name.endswith(".attn_bias"):
                groups["no_decay"].append(p)
            else:
                groups["decay"].append(p)
        return groups
