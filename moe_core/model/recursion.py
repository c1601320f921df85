"""The block, the block stack (the net) and the recursion around it: RecursiveMoE."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import cast

import torch
from torch import Tensor, nn

from ..config import ModelConfig
from .attention import CacheCursor, KVCache, MoHAttention, Rotary, TokenMLP
from .common import Aux, AuxAccumulator, RMSNorm, Tracing
from .moe import MoEFeedForward


@dataclass
class ModelOutput:
    logits: Tensor  # [B, T, V] halting-selected (eval) or the last step's (training)
    halt_step: Tensor  # [B] int64, 1-based step whose logits were kept
    step_logits: list[Tensor] = field(default_factory=list)  # training: one [B, T, V] per supervision step
    halt_logits: Tensor | None = None  # training: [S, B] halting logit of every step
    aux_losses: dict[str, Tensor] = field(default_factory=dict)  # training: unweighted mean over grad calls, by name
    stats: dict[str, Tensor] = field(default_factory=dict)  # training: detached statistics, by name
    carry: Carry | None = None  # forward(carry=...): the state after this step, detached (the next update's start)


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
                        acc.add_loss(k, v)
                for k, v in aux.stats.items():
                    acc.add_stat(f"L{i + 1}.{k}", v)
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
        self.z_H_init: Tensor
        self.z_L_init: Tensor
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
        if not cfg.causal or cast(Block, self.net.blocks[0]).attn.attn_bias is not None:
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
            got_mask = list(attention_mask.shape) if isinstance(attention_mask, Tensor) \
                else type(attention_mask).__name__
            raise ValueError(f"attention_mask: expected the shape of input_ids {list(input_ids.shape)}, got "
                             f"{got_mask}")
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
        stats = {k: v.detach() for k, v in acc.stats().items()}
        return ModelOutput(logits, halt_step, step_logits, halt_logits, acc.losses(), stats)

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
