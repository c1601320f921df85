"""The token mixers of a block: Mixture-of-Heads attention (with rotary embeddings and the KV cache of cached
decoding) and TRM's token-mixing MLP (model.token_mixer = "mlp")."""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..config import ModelConfig
from .common import Aux, Traced, Tracing, ranked

# Temperature of the relaxed (straight-through) head mask: small enough that the soft mask is close to the
# hard one, large enough that the complexity and threshold predictors get a useful gradient.
MASK_TEMPERATURE = 0.1


# Rotary embeddings as one operator: the ONNX RotaryEmbedding (opset 23) computes exactly the rotate-half form
# below from half-width tables, and torch.onnx.ops.rotary_embedding traces to that one node (eager, it runs the
# operator's reference implementation). The exporter turns it on for graphs of opset >= 23 only; training and the
# eager model keep the plain form.
@contextmanager
def onnx_rotary(model: Traced) -> Iterator[None]:
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
        self.cos: Tensor
        self.sin: Tensor
        self.cos_half: Tensor
        self.sin_half: Tensor
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
            assert key_mask is not None  # cached_forward always passes its attention mask
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

    def _scores_mask(self, key_mask: Tensor | None, T: int, q: Tensor) -> Tensor | None:
        """SDPA's attn_mask: which keys each query may see (boolean), or the learned bias with -inf where it may
        not (float), or None when every key is visible. Padding keys are never attended to; causal models see no
        later key."""
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
