"""moe_core: MoH routing, MoE combine, gradients, causality, halting, init, baseline, padding, config and checkpoints.

Tiny configs on CPU; every test seeds its own RNG.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from moe_core import CheckpointError, ConfigError, ModelConfig, RecursiveMoE, load_model
from moe_core.checkpoint import save_weights
from moe_core.model.attention import MoHAttention
from moe_core.model.common import AuxAccumulator
from moe_core.model.moe import (
    SPARSE_MIN_SKIPPED_MACS,
    MoEFeedForward,
    grouped_mm,
    grouped_mm_weight_grad,
    resolve_moe_dispatch,
)
from moe_core.run_layout import CONFIG_FILE, WEIGHTS_FILE
from train.config import TrainConfig
from train.loss import training_loss

# -----------------------------------------------------------------------------
# helpers


def seeded(seed: int) -> torch.Generator:
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


@torch.no_grad()
def randomize_routing(model: torch.nn.Module, seed: int, std: float = 1.0) -> None:
    """Give routers and MoH predictors O(1) random weights, so routing really depends on the token."""
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        if any(s in name for s in ("router.weight", "complexity_head", "threshold_head")):
            p.copy_(torch.randn(p.shape, generator=g) * std / math.sqrt(p.shape[-1]) * 4)


def random_ids(cfg: ModelConfig, B: int, T: int, seed: int) -> torch.Tensor:
    return torch.randint(0, cfg.vocab_size, (B, T), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def calibrate_halting(model: RecursiveMoE, ids: torch.Tensor, seed: int) -> None:
    """Random halt-head weights, oriented and biased so that on `ids` some samples halt at the first step,
    some in the middle and some never: the halt logit rises over the steps and the bias puts the middle
    step's median (half-way between two samples, away from 0) at 0."""
    g = torch.Generator().manual_seed(seed)
    model.halt_head.weight.copy_(torch.randn(model.halt_head.weight.shape, generator=g))
    model.halt_head.bias.zero_()
    was_training = model.training
    q = model.train()(ids).halt_logits  # [S, B] = w . pooled state
    model.train(was_training)
    if (q[-1] - q[0]).mean() < 0:
        model.halt_head.weight.neg_()
        q = -q
    v = q[(q.shape[0] - 1) // 2].sort().values
    k = len(v) // 2
    model.halt_head.bias.fill_(-0.5 * (v[k - 1] + v[k]).item())


@torch.no_grad()
def calibrate_on_padded(model: RecursiveMoE, ids: torch.Tensor, mask: torch.Tensor, seed: int) -> None:
    """calibrate_halting for a right-padded batch (the halt head pools over valid positions only)."""
    original = model.forward
    model.forward = lambda x: original(x, attention_mask=mask)  # type: ignore[method-assign]
    try:
        calibrate_halting(model, ids, seed)
    finally:
        del model.forward


def varied_model(cfg: ModelConfig, seed: int, calibrate_on: torch.Tensor | None = None) -> RecursiveMoE:
    """A model whose routing depends on the input and (recursive) whose samples halt at different steps."""
    torch.manual_seed(seed)
    model = RecursiveMoE(cfg)
    randomize_routing(model, seed + 1)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, MoHAttention) and m.attn_bias is not None:  # a bias that changes who attends to whom
                m.attn_bias.copy_(torch.randn(m.attn_bias.shape, generator=seeded(seed + 4)) * 2.0)
    if cfg.recursive:
        ids = random_ids(cfg, 8, cfg.max_seq_len, seed + 2) if calibrate_on is None else calibrate_on
        calibrate_halting(model, ids, seed + 3)
    return model


def reference_head_selection(probs: np.ndarray, target: np.ndarray, threshold: np.ndarray, min_heads: int
                             ) -> tuple[np.ndarray, np.ndarray]:
    """The adaptive top-p rule, recomputed independently in float64.

    Heads are ranked by descending probability (rank 1 = best). A head is kept when its rank <= min_heads, or
    when its rank <= target + 0.5 (count below round-half-up(target)) and the probability taken by the
    better-ranked heads is still below the threshold. Returns (mask [N, H], ambiguous [N]): `ambiguous` marks
    tokens where a comparison is within float32 noise and the rule could go either way.
    """
    probs = probs.astype(np.float64)
    N, H = probs.shape
    mask = np.zeros((N, H))
    ambiguous = np.zeros(N, dtype=bool)
    for n in range(N):
        order = sorted(range(H), key=lambda h: -probs[n, h])
        taken = 0.0
        for rank, h in enumerate(order, start=1):
            by_count = rank <= target[n] + 0.5
            by_mass = taken < threshold[n]
            if rank > min_heads and (
                    (by_count and abs(taken - threshold[n]) < 1e-5)
                    or (by_mass and abs(rank - (target[n] + 0.5)) < 1e-5)):
                ambiguous[n] = True  # a comparison that decides this head is within float32 noise
            if rank <= min_heads or (by_count and by_mass):
                mask[n, h] = 1.0
            taken += probs[n, h]
        k = int(mask[n].sum())
        top = np.sort(probs[n])[::-1]
        if k < H and top[k - 1] - top[k] < 1e-6:
            ambiguous[n] = True  # a near-tie straddles the cut: either head may be ranked first
    return mask, ambiguous


# -----------------------------------------------------------------------------
# Mixture-of-Heads routing

ROUTING_SETTINGS = [  # (n_heads, min_heads, max_heads)
    (4, 1, 4), (4, 2, 3), (4, 1, 1), (4, 4, 4), (8, 1, 8), (8, 3, 6), (8, 2, 2),
]


@pytest.mark.parametrize("n_heads,min_heads,max_heads", ROUTING_SETTINGS)
@pytest.mark.parametrize("training", [False, True])
def test_moh_route_is_the_adaptive_top_p_rule(make_config, n_heads, min_heads, max_heads, training) -> None:
    cfg = make_config(d_model=8 * n_heads, n_heads=n_heads, min_heads=min_heads, max_heads=max_heads)
    g = seeded(100 + n_heads * 10 + min_heads + max_heads)
    attn = MoHAttention(cfg).train(training)
    randomize_routing(attn, seed=7)
    x = torch.randn(6, 16, cfg.d_model, generator=g)
    with torch.no_grad():
        r = attn.route(x)
    H = n_heads
    assert r.mask.shape == r.probs.shape == (6, 16, H)
    assert r.complexity.shape == r.target.shape == r.threshold.shape == (6, 16)

    counts = r.mask.sum(dim=-1)
    assert counts.min() >= min_heads and counts.max() <= max_heads + 1e-6
    assert torch.allclose(r.probs.sum(-1), torch.ones(6, 16), atol=1e-6)
    assert ((r.complexity >= 0) & (r.complexity <= 1)).all()
    assert ((r.threshold >= 0.3) & (r.threshold <= 0.8)).all()
    assert torch.allclose(r.target, min_heads + r.complexity * (max_heads - min_heads), atol=1e-6)

    expected, ambiguous = reference_head_selection(
        r.probs.reshape(-1, H).numpy(), r.target.reshape(-1).double().numpy(),
        r.threshold.reshape(-1).double().numpy(), min_heads)
    got = r.mask.reshape(-1, H).numpy()
    assert ambiguous.mean() < 0.02
    mismatched = np.flatnonzero((got != expected).any(axis=1) & ~ambiguous)
    assert mismatched.size == 0, f"tokens {mismatched[:5]} select heads {got[mismatched[:5]]}, " \
                                 f"rule says {expected[mismatched[:5]]}"
    # The selected set is a prefix of the ranking: every chosen head beats every unchosen one.
    for n in range(got.shape[0]):
        p = r.probs.reshape(-1, H)[n].numpy()
        chosen, rest = p[got[n] == 1], p[got[n] == 0]
        if rest.size:
            assert chosen.min() >= rest.max()


def test_moh_different_tokens_use_different_head_counts(make_config) -> None:
    cfg = make_config(d_model=64, n_heads=8, min_heads=1, max_heads=8)
    g = seeded(3)
    attn = MoHAttention(cfg).eval()
    randomize_routing(attn, seed=4)
    with torch.no_grad():
        r = attn.route(torch.randn(4, 16, cfg.d_model, generator=g))
    counts = r.mask.sum(-1)
    assert len(torch.unique(counts)) >= 3, torch.unique(counts)
    assert r.complexity.std() > 0.05 and r.threshold.std() > 0.02


@pytest.mark.parametrize("scale", [1e3, -1e3, 1e6, -1e6])
def test_moh_predictors_stay_in_range_for_extreme_weights(make_config, scale) -> None:
    cfg = make_config(d_model=64, n_heads=8, min_heads=2, max_heads=6)
    g = seeded(5)
    attn = MoHAttention(cfg)
    with torch.no_grad():
        for head in (attn.complexity_head, attn.threshold_head):
            head.weight.copy_(torch.randn(head.weight.shape, generator=g) * scale)
            head.bias.fill_(scale)
    for training in (False, True):
        attn.train(training)
        with torch.no_grad():
            r = attn.route(torch.randn(3, 16, cfg.d_model, generator=g) * 10)
        for t in (r.threshold, r.complexity, r.target, r.mask, r.probs):
            assert torch.isfinite(t).all()
        assert ((r.threshold >= 0.3) & (r.threshold <= 0.8)).all()
        assert ((r.complexity >= 0) & (r.complexity <= 1)).all()
        assert ((r.target >= 2) & (r.target <= 6)).all()
        counts = r.mask.sum(-1)
        assert counts.min() >= 2 - 1e-5 and counts.max() <= 6 + 1e-5


@pytest.mark.parametrize("training", [True, False])
def test_moh_mask_is_exactly_zero_one(make_config, training) -> None:
    cfg = make_config()
    seeded(11)
    attn = MoHAttention(cfg).train(training)
    randomize_routing(attn, seed=12)
    r = attn.route(torch.randn(4, 16, cfg.d_model))
    # Training carries the relaxed gradient; the forward value is exactly 0/1 in both modes.
    assert r.mask.requires_grad == training
    values = set(torch.unique(r.mask.detach()).tolist())
    assert values <= {0.0, 1.0}, sorted(values - {0.0, 1.0})[:3]


# -----------------------------------------------------------------------------
# Mixture-of-Experts feed-forward


def expert_output(ffn: MoEFeedForward, x: torch.Tensor, e: int) -> torch.Tensor:
    """One SwiGLU expert on x [..., D]."""
    gate, up, down = ffn.experts()
    return (F.silu(x @ gate[e]) * (x @ up[e])) @ down[e]


DISPATCHES = ("dense", "sparse")


def make_ffn(cfg: ModelConfig, seed: int, dispatch: str = "dense") -> MoEFeedForward:
    g = seeded(seed)
    ffn = MoEFeedForward(dataclasses.replace(cfg, moe_dispatch=dispatch))
    assert ffn.dispatch == dispatch
    with torch.no_grad():
        for p in (ffn.w_gate, ffn.w_up, ffn.w_down):
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
        ffn.router.weight.copy_(torch.randn(ffn.router.weight.shape, generator=g))
    return ffn


@pytest.mark.parametrize("dispatch", DISPATCHES)
@pytest.mark.parametrize("n_experts,top_k", [(4, 1), (4, 2), (4, 4), (6, 3)])
def test_moe_output_is_top_k_renormalised_mixture(make_config, n_experts, top_k, dispatch) -> None:
    cfg = make_config(n_experts=n_experts, top_k=top_k)
    ffn = make_ffn(cfg, seed=20 + n_experts + top_k, dispatch=dispatch)
    x = torch.randn(2, 5, cfg.d_model, generator=torch.Generator().manual_seed(21))
    with torch.no_grad():
        y = ffn(x, False)[0]
        probs = (x @ ffn.router.weight.T).softmax(-1)
        for b in range(2):
            for t in range(5):
                p = probs[b, t]
                chosen = torch.argsort(p, descending=True)[:top_k]
                w = p[chosen] / p[chosen].sum()
                ref = sum(w[i] * expert_output(ffn, x[b, t], int(e)) for i, e in enumerate(chosen))
                assert torch.allclose(y[b, t], ref, atol=1e-5, rtol=1e-4), (b, t)


def test_moe_combine_weights_sum_to_one(make_config) -> None:
    """With every expert identical, the mixture equals that one expert: the combine weights sum to 1."""
    cfg = make_config(n_experts=5, top_k=3)
    ffn = make_ffn(cfg, seed=30)
    with torch.no_grad():
        for p in ffn.experts():  # [E, ...] views of the weights
            p.copy_(p[0:1].clone().expand_as(p))
        x = torch.randn(3, 7, cfg.d_model, generator=torch.Generator().manual_seed(31))
        assert torch.allclose(ffn(x, False)[0], expert_output(ffn, x, 0), atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("dispatch", DISPATCHES)
def test_moe_token_uses_exactly_its_top_k_experts(make_config, dispatch) -> None:
    """Changing an expert changes exactly the tokens that route to it (among their top k)."""
    cfg = make_config(n_experts=4, top_k=2)
    ffn = make_ffn(cfg, seed=40, dispatch=dispatch)
    x = torch.randn(2, 8, cfg.d_model, generator=torch.Generator().manual_seed(41))
    with torch.no_grad():
        top = (x @ ffn.router.weight.T).topk(2, dim=-1).indices  # [B, T, k]
        base = ffn(x, False)[0]
        for e in range(cfg.n_experts):
            down = ffn.experts()[2]
            saved = down[e].clone()
            down[e].mul_(3.0)
            changed = (ffn(x, False)[0] - base).abs().amax(-1) > 1e-6
            down[e].copy_(saved)
            uses = (top == e).any(-1)
            assert torch.equal(changed, uses), f"expert {e}"


@pytest.mark.parametrize("dispatch", DISPATCHES)
def test_moe_aux_losses_and_load(make_config, dispatch) -> None:
    cfg = make_config(n_experts=4, top_k=2)
    ffn = make_ffn(cfg, seed=50, dispatch=dispatch)
    x = torch.randn(2, 8, cfg.d_model, generator=torch.Generator().manual_seed(51))
    _, aux = ffn(x, True)
    res = {**aux.losses, **aux.stats}
    load = res["moe_load"]
    assert load.shape == (4,) and torch.isclose(load.sum(), torch.tensor(1.0))
    probs = (x @ ffn.router.weight.T).softmax(-1)
    top = probs.topk(2, dim=-1).indices
    f = torch.stack([(top == e).any(-1).float().mean() for e in range(4)]) / 2
    assert torch.allclose(load, f, atol=1e-6)
    expected_balance = 4 * (f * probs.mean(dim=(0, 1))).sum()
    assert torch.isclose(res["moe_balance"], expected_balance, atol=1e-5)
    assert res["moe_z"] > 0
    assert torch.isclose(res["moe_load_cv"], f.std(correction=0) / f.mean(), atol=1e-5)
    assert res["moe_dropped"] == 0  # both dispatches compute every routed (token, expert) pair


@pytest.mark.parametrize("dispatch", DISPATCHES)
def test_moe_dropped_counts_routed_pairs_that_carry_no_weight(make_config, dispatch) -> None:
    """A second choice whose probability underflows to 0 never reaches its token: it is counted as dropped."""
    cfg = make_config(n_experts=4, top_k=2)
    ffn = make_ffn(cfg, seed=52, dispatch=dispatch)
    x = torch.randn(2, 8, cfg.d_model, generator=torch.Generator().manual_seed(53))
    with torch.no_grad():
        ffn.router.weight.mul_(1e4)  # softmax saturates: the top expert takes all the probability
    _, aux = ffn(x, True)
    assert aux.stats["moe_dropped"] == 2 * 8  # one of the two slots of every token
    assert aux.stats["moe_load_cv"] >= 0


def ffn_pair(cfg: ModelConfig, seed: int) -> dict[str, MoEFeedForward]:
    """A dense and a sparse MoE layer with the same weights."""
    dense = make_ffn(cfg, seed)
    sparse = make_ffn(cfg, seed, dispatch="sparse")
    sparse.load_state_dict(dense.state_dict())
    return {"dense": dense, "sparse": sparse}


def run_ffn(ffn: MoEFeedForward, x: torch.Tensor, dy: torch.Tensor) -> dict[str, torch.Tensor]:
    """Output, aux losses and stats of a training call, and the gradients of <y, dy> + aux losses."""
    x = x.clone().requires_grad_()
    y, aux = ffn(x, True)
    ((y * dy).sum() + sum(aux.losses.values())).backward()
    return {"y": y.detach(), "x.grad": x.grad, **{f"{n}.grad": p.grad for n, p in ffn.named_parameters()},
            **{k: v.detach() for k, v in aux.losses.items()}, **aux.stats}


@pytest.mark.parametrize("n_experts,top_k", [(4, 1), (4, 2), (8, 2), (8, 1), (6, 3), (4, 4)])
def test_moe_sparse_dispatch_equals_dense_forward_and_backward(make_config, n_experts, top_k) -> None:
    """Same weights, same inputs: the outputs, every gradient, the aux losses and the statistics agree within fp32
    rounding (the two dispatches sum the same products in another order)."""
    cfg = make_config(d_model=32, d_expert=48, n_experts=n_experts, top_k=top_k)
    g = torch.Generator().manual_seed(60 + n_experts + top_k)
    x, dy = torch.randn(3, 17, cfg.d_model, generator=g), torch.randn(3, 17, cfg.d_model, generator=g)
    res = {name: run_ffn(ffn, x, dy) for name, ffn in ffn_pair(cfg, seed=61).items()}
    dense, sparse = res["dense"], res["sparse"]
    assert dense.keys() == sparse.keys()
    for key in dense:
        # Relative to the tensor's scale; the router's gradient at top-1 is only the aux losses' (the combine weight
        # p / p is 1 whatever p), so its scale is that of the aux terms. Each value chains sums over d_model,
        # d_expert and the tokens (weight gradients): reordered, within (their lengths) * u of that scale.
        scale = max(float(dense[key].abs().max()), 1e-3)
        diff = float((dense[key] - sparse[key]).abs().max())
        bound = (cfg.d_model + cfg.d_expert + x.shape[0] * x.shape[1]) * 2.0 ** -24 * scale
        assert diff <= bound, f"{key}: max |dense - sparse| {diff:.2e} at scale {scale:.2e}"
    assert torch.equal(dense["moe_load"], sparse["moe_load"]) and sparse["moe_dropped"] == 0


def test_moe_sparse_dispatch_handles_experts_without_tokens(make_config) -> None:
    """Experts no token routes to form empty groups: outputs still agree, and their weights get exactly zero
    gradient in both dispatches (a 1-token batch uses at most top_k of the experts)."""
    cfg = make_config(n_experts=8, top_k=2)
    pair = ffn_pair(cfg, seed=62)
    g = torch.Generator().manual_seed(63)
    x, dy = torch.randn(1, 1, cfg.d_model, generator=g), torch.randn(1, 1, cfg.d_model, generator=g)
    res = {name: run_ffn(ffn, x, dy) for name, ffn in pair.items()}
    assert torch.allclose(res["dense"]["y"], res["sparse"]["y"], atol=1e-6, rtol=1e-5)
    used = set(pair["dense"].router(x).topk(2, dim=-1).indices.flatten().tolist())
    for name, r in res.items():
        down = r["w_down.grad"].unflatten(0, (8, cfg.d_expert))  # [E, F, D]
        for e in range(8):
            assert (down[e].abs().max() > 0) == (e in used), (name, e)


def test_moe_grouped_mm_custom_op() -> None:
    """The custom ops behind sparse dispatch pass torch's own checks (schema, fake tensors, autograd)."""
    g = torch.Generator().manual_seed(64)
    counts = torch.tensor([3, 0, 5, 1])
    x = torch.randn(9, 6, generator=g, requires_grad=True)
    w = torch.randn(6, 4 * 5, generator=g).unflatten(1, (4, 5)).transpose(0, 1).requires_grad_()  # strided [E, K, N]
    y = grouped_mm(x, w, counts)
    ref = torch.cat([x[0:3] @ w[0], x[3:8] @ w[2], x[8:9] @ w[3]])
    assert torch.allclose(y, ref, atol=1e-6)
    torch.library.opcheck(grouped_mm, (x, w, counts))
    torch.library.opcheck(grouped_mm_weight_grad, (x.detach(), torch.randn(9, 5, generator=g), counts))


def test_moe_sparse_block_compiles_to_one_graph_without_recompiles(make_config) -> None:
    """torch.compile traces a block with sparse dispatch as one graph (no graph break at the data-dependent group
    sizes) and does not recompile when the routing changes; forward and backward through AOT autograd match eager."""
    from torch._dynamo.testing import CompileCounterWithBackend

    torch._dynamo.reset()
    cfg = make_config(n_experts=8, top_k=2, moe_dispatch="sparse")
    torch.manual_seed(65)
    block = RecursiveMoE(cfg).net.blocks[0].train()  # initialised as the model initialises it
    randomize_routing(block, seed=66)
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(block, backend=counter, fullgraph=True)  # fullgraph: a graph break is an error
    g = torch.Generator().manual_seed(67)
    for _ in range(3):  # new inputs: new routing, new group sizes
        x = torch.randn(2, 16, cfg.d_model, generator=g)
        outs = []
        for fn in (compiled, block):
            block.zero_grad()
            y, aux = fn(x, None, True)
            (y.square().sum() + sum(aux.losses.values())).backward()
            outs.append((y.detach(), [p.grad.clone() for p in block.parameters()], aux.stats))
        (y_c, grads_c, stats_c), (y_e, grads_e, stats_e) = outs
        assert torch.allclose(y_c, y_e, atol=1e-5, rtol=1e-5)
        assert all(torch.allclose(a, b, atol=1e-5, rtol=1e-4) for a, b in zip(grads_c, grads_e, strict=True))
        assert torch.equal(stats_c["moe_load"], stats_e["moe_load"])
    assert counter.frame_count == 1


def test_moe_auto_dispatch_rule(make_config) -> None:
    """"auto" is sparse on CPU when a call's tokens together skip at least 2^23 expert multiply-adds (the measured
    break-even), decided per call from its shape, and at 256 tokens in an exported graph; dense on other devices
    (not measured); an explicit choice is kept everywhere."""
    from moe_core.model.moe import EXPORT_TOKENS
    from train.config import build_config

    assert SPARSE_MIN_SKIPPED_MACS == 1 << 23 and EXPORT_TOKENS == 256
    cases = {  # (d_model, d_expert, n_experts, top_k, tokens) -> "auto" on CPU
        (128, 256, 4, 2, 256): "sparse", (128, 256, 8, 1, 256): "sparse", (128, 256, 4, 3, 256): "sparse",
        (64, 128, 8, 2, 256): "sparse", (128, 256, 4, 4, 8192): "dense", (64, 128, 4, 2, 256): "dense",
        (64, 128, 4, 2, 512): "sparse", (64, 128, 4, 2, 2592): "sparse", (32, 64, 4, 2, 1024): "dense",
        (32, 64, 4, 2, 2592): "sparse", (32, 32, 8, 2, 256): "dense"}
    for (d_model, d_expert, n_experts, top_k, tokens), expected in cases.items():
        cfg = make_config(d_model=d_model, d_expert=d_expert, n_experts=n_experts, top_k=top_k)
        assert cfg.moe_dispatch == "auto"
        assert resolve_moe_dispatch(cfg, "cpu", tokens) == expected, (d_model, d_expert, n_experts, top_k, tokens)
        assert resolve_moe_dispatch(cfg, "cuda", tokens) == "dense"
        ffn = RecursiveMoE(cfg).net.blocks[0].ffn
        assert (ffn.dispatch, ffn.dispatch_off_cpu) == ("auto", "dense")
        for explicit in DISPATCHES:
            assert resolve_moe_dispatch(dataclasses.replace(cfg, moe_dispatch=explicit), "cuda") == explicit
    for preset, expected in (("default", "sparse"), ("tiny", "dense")):
        assert resolve_moe_dispatch(build_config(preset, None, []).model) == expected, preset
    # a Sudoku training batch (32 x 81 tokens) of the sudoku-hard preset runs sparse, its one-puzzle call dense
    hard = build_config("sudoku-hard", None, []).model
    assert (resolve_moe_dispatch(hard, "cpu", 32 * 81), resolve_moe_dispatch(hard, "cpu", 81)) == ("sparse", "dense")


def test_auto_dispatch_is_taken_per_call(make_config, monkeypatch) -> None:
    """The layer asks for the dispatch of each call's size: a small call dense, a large one sparse."""
    cfg = make_config(d_model=32, d_expert=64, n_experts=4, top_k=2)
    ffn = RecursiveMoE(cfg).net.blocks[0].ffn
    taken = []
    for name in DISPATCHES:
        real = getattr(ffn, name)
        monkeypatch.setattr(ffn, name, lambda *a, real=real, name=name: taken.append(name) or real(*a))
    with torch.no_grad():
        ffn(torch.randn(1, 64, 32), False)
        ffn(torch.randn(40, 81, 32), False)
    assert taken == ["dense", "sparse"]


@pytest.mark.parametrize("recursive", [True, False])
def test_model_outputs_do_not_depend_on_the_dispatch(make_config, recursive) -> None:
    """The whole model, same weights: eval logits and halting, training losses and gradients agree."""
    cfg = make_config(n_experts=8, top_k=2, recursive=recursive, moe_dispatch="dense")
    ids = random_ids(cfg, 4, 16, seed=68)
    dense = varied_model(cfg, seed=69, calibrate_on=ids)
    sparse = RecursiveMoE(dataclasses.replace(cfg, moe_dispatch="sparse"))
    sparse.load_state_dict(dense.state_dict())
    with torch.no_grad():
        a, b = dense.eval()(ids), sparse.eval()(ids)
    assert torch.allclose(a.logits, b.logits, atol=1e-5, rtol=1e-5) and torch.equal(a.halt_step, b.halt_step)
    targets = random_ids(cfg, 4, 16, seed=70)
    tc = TrainConfig()
    for m in (dense, sparse):
        loss, _ = training_loss(m.train()(ids), targets, tc.aux_weights, tc.halt_weight)
        loss.backward()
    for (name, p), q in zip(dense.named_parameters(), sparse.parameters(), strict=True):
        if p.grad is None:  # the baseline never uses the halt head
            assert q.grad is None, name
        else:
            assert torch.allclose(p.grad, q.grad, atol=1e-6, rtol=1e-4), name


def test_config_without_moe_dispatch_loads_as_auto(make_config, tmp_path) -> None:
    """A config.json written before moe_dispatch existed loads (the key is optional), as "auto"; a bad value is
    named."""
    cfg = make_config()
    model = RecursiveMoE(cfg)
    section = {k: v for k, v in cfg.to_dict().items() if k != "moe_dispatch"}
    loaded = load_model(write_run(tmp_path / "old", model, section))
    assert loaded.config.moe_dispatch == "auto" and loaded.config == cfg
    with pytest.raises(ConfigError, match=r"moe_dispatch.*dense, sparse, auto.*'fast'"):
        ModelConfig.from_dict({**BASE, "moe_dispatch": "fast"})
    with pytest.raises(CheckpointError, match=rf"{CONFIG_FILE}.*moe_dispatch"):
        load_model(write_run(tmp_path / "bad", model, {**cfg.to_dict(), "moe_dispatch": "sparse!"}))


# -----------------------------------------------------------------------------
# gradients


def test_gradients_reach_routers_predictors_and_halt_head(make_config) -> None:
    cfg = make_config(n_layers=2)
    model = varied_model(cfg, seed=60).train()
    ids = random_ids(cfg, 4, 16, seed=61)
    targets = random_ids(cfg, 4, 16, seed=62)
    out = model(ids)
    tc = TrainConfig()
    loss, parts = training_loss(out, targets, tc.aux_weights, tc.halt_weight)
    assert "halt_loss" in parts and torch.isfinite(loss)
    loss.backward()
    names = []
    for i in range(cfg.n_layers):
        blk = f"net.blocks.{i}"
        names += [f"{blk}.ffn.router.weight", f"{blk}.attn.router.weight", f"{blk}.attn.complexity_head.weight",
                  f"{blk}.attn.complexity_head.bias", f"{blk}.attn.threshold_head.weight",
                  f"{blk}.attn.threshold_head.bias"]
    names += ["halt_head.weight", "halt_head.bias", "lm_head.weight", "embed.weight"]
    params = dict(model.named_parameters())
    for name in names:
        grad = params[name].grad
        assert grad is not None, f"{name}: no gradient"
        assert torch.isfinite(grad).all(), name
        assert grad.abs().max() > 0, f"{name}: gradient is zero"


def test_predictor_gradient_comes_from_the_lm_loss_too(make_config) -> None:
    """Without any aux loss, the relaxed mask still carries the LM loss's gradient to both predictors."""
    cfg = make_config()
    model = varied_model(cfg, seed=65).train()
    out = model(random_ids(cfg, 4, 16, seed=66))
    loss, _ = training_loss(out, random_ids(cfg, 4, 16, seed=67), {k: 0.0 for k in out.aux_losses}, 0.0)
    loss.backward()
    attn = model.net.blocks[0].attn
    for head in (attn.complexity_head, attn.threshold_head, attn.router):
        assert head.weight.grad is not None and head.weight.grad.abs().max() > 0


# -----------------------------------------------------------------------------
# causality


@pytest.mark.parametrize("attn_bias", [False, True])
@pytest.mark.parametrize("training", [False, True])
def test_recursive_model_is_causal(make_config, training, attn_bias) -> None:
    cfg = make_config(n_layers=2, attn_bias=attn_bias)
    B, T = 6, 16
    ids = random_ids(cfg, B, T, seed=71)
    model = varied_model(cfg, seed=70, calibrate_on=ids).train(training)
    with torch.no_grad():
        base = model(ids)
        if not training:
            assert len(torch.unique(base.halt_step)) >= 2, "halting should vary across the batch"
        for t in (1, 5, T - 1):
            changed = ids.clone()
            changed[:, t] = (changed[:, t] + 1 + torch.arange(B)) % cfg.vocab_size
            out = model(changed)
            assert torch.allclose(out.logits[:, :t], base.logits[:, :t], atol=1e-5), f"position {t}"
            assert not torch.allclose(out.logits[:, t:], base.logits[:, t:], atol=1e-5)
            assert torch.equal(out.halt_step, base.halt_step)
            if training:
                for a, b in zip(out.step_logits, base.step_logits, strict=True):
                    assert torch.allclose(a[:, :t], b[:, :t], atol=1e-5)


def test_halting_varies_when_head_is_random(make_config) -> None:
    cfg = make_config()
    ids = random_ids(cfg, 16, 16, seed=71)
    model = varied_model(cfg, seed=70, calibrate_on=ids).eval()
    with torch.no_grad():
        out = model(ids)
    assert set(out.halt_step.tolist()) == {1, 2, 3}


# -----------------------------------------------------------------------------
# halting


class ScriptedHalt:
    """Replaces model._halt_logit: returns the given [S, B] logits, one row per supervision step."""

    def __init__(self, logits: list[list[float]]) -> None:
        self.logits = torch.tensor(logits)
        self.calls = 0

    def __call__(self, h: torch.Tensor, key_mask) -> torch.Tensor:
        q = self.logits[self.calls % len(self.logits)]
        self.calls += 1
        return q.to(h.dtype)


def test_eval_keeps_first_step_whose_halt_probability_exceeds_half(make_config, monkeypatch) -> None:
    cfg = make_config(halt_max_steps=4)
    model = varied_model(cfg, seed=80).eval()
    B = 6
    ids = random_ids(cfg, B, 12, seed=81)
    with torch.no_grad():
        per_step = []
        for k in range(1, 5):  # every sample halts at step k: the logits of step k
            q = [[1.0 if s == k else -1.0] * B for s in range(1, 5)]
            monkeypatch.setattr(model, "_halt_logit", ScriptedHalt(q))
            out = model(ids)
            assert out.halt_step.tolist() == [k] * B
            per_step.append(out.logits)
        assert not torch.allclose(per_step[0], per_step[-1])

        # Mixed: sample b halts at expected[b]. A logit of exactly 0 (probability 0.5) is not "> 0.5".
        script = [  # rows: steps 1..4, columns: samples
            [2.0, -1.0, -1.0, 0.0, -3.0, 0.5],
            [2.0, 1.0, -1.0, 0.5, -3.0, -0.5],
            [-2.0, 1.0, 3.0, 0.5, -3.0, 0.5],
            [-2.0, -1.0, 3.0, 0.5, -3.0, 0.5],
        ]
        expected = [1, 2, 3, 2, 4, 1]
        monkeypatch.setattr(model, "_halt_logit", ScriptedHalt(script))
        out = model(ids)
    assert out.halt_step.dtype == torch.int64 and out.halt_step.shape == (B,)
    assert out.halt_step.tolist() == expected
    for b, k in enumerate(expected):
        assert torch.equal(out.logits[b], per_step[k - 1][b]), f"sample {b} should keep step {k}"


def test_eval_logits_match_training_step_logits_at_halt_step(make_config) -> None:
    cfg = make_config(n_layers=2)
    ids = random_ids(cfg, 12, 16, seed=91)
    model = varied_model(cfg, seed=90, calibrate_on=ids)
    with torch.no_grad():
        ev = model.eval()(ids)
        tr = model.train()(ids)
    assert set(ev.halt_step.tolist()) == {1, 2, 3}, ev.halt_step
    assert len(tr.step_logits) == cfg.halt_max_steps
    assert tr.halt_logits.shape == (cfg.halt_max_steps, 12)
    # The halt step is the first step with a positive halt logit (the last when none is positive).
    q = tr.halt_logits
    first = [next((s + 1 for s in range(q.shape[0]) if q[s, b] > 0), q.shape[0]) for b in range(12)]
    assert ev.halt_step.tolist() == first
    assert torch.equal(tr.halt_step, ev.halt_step)
    assert torch.allclose(tr.logits, tr.step_logits[-1])
    for b, k in enumerate(ev.halt_step.tolist()):
        assert torch.allclose(ev.logits[b], tr.step_logits[k - 1][b], atol=1e-5), f"sample {b}, step {k}"


def test_fresh_model_halts_at_last_step(make_config) -> None:
    for steps in (1, 3):
        cfg = make_config(halt_max_steps=steps)
        seeded(95)
        model = RecursiveMoE(cfg).eval()
        assert model.halt_head.bias.item() == -5.0
        with torch.no_grad():
            out = model(random_ids(cfg, 5, 16, seed=96))
        assert out.halt_step.dtype == torch.int64
        assert out.halt_step.tolist() == [steps] * 5


# -----------------------------------------------------------------------------
# initialisation and the baseline


@pytest.mark.parametrize("recursive", [True, False])
def test_fresh_model_loss_is_near_uniform(make_config, recursive) -> None:
    for vocab in (97, 512):
        cfg = make_config(vocab_size=vocab, recursive=recursive, n_layers=2)
        seeded(100)
        model = RecursiveMoE(cfg).eval()
        ids = random_ids(cfg, 8, 16, seed=101)
        targets = random_ids(cfg, 8, 16, seed=102)
        with torch.no_grad():
            logits = model(ids).logits
        assert logits.shape == (8, 16, vocab)
        ce = F.cross_entropy(logits.reshape(-1, vocab), targets.reshape(-1)).item()
        assert abs(ce - math.log(vocab)) < 0.3, (vocab, ce)


def test_baseline_runs_with_the_same_blocks(make_config) -> None:
    rec_cfg, base_cfg = make_config(), make_config(recursive=False)
    seeded(110)
    rec = RecursiveMoE(rec_cfg)
    seeded(110)
    base = RecursiveMoE(base_cfg)
    assert [n for n, _ in rec.named_parameters()] == [n for n, _ in base.named_parameters()]
    assert {n: p.shape for n, p in rec.named_parameters()} == {n: p.shape for n, p in base.named_parameters()}
    assert base_cfg.n_steps == 1 and rec_cfg.n_steps == 3
    ids = random_ids(base_cfg, 3, 16, seed=111)
    with torch.no_grad():
        ev = base.eval()(ids)
        assert ev.logits.shape == (3, 16, base_cfg.vocab_size)
        assert ev.halt_step.dtype == torch.int64 and ev.halt_step.tolist() == [1, 1, 1]
        assert torch.allclose(ev.logits, base.lm_head(base.norm(base.net(base.embed(ids) * math.sqrt(32), None,
                                                                             None))), atol=1e-6)
    tr = base.train()(ids)
    assert len(tr.step_logits) == 1 and tr.halt_logits is None
    assert tr.halt_step.tolist() == [1, 1, 1]
    assert torch.allclose(tr.logits, ev.logits, atol=1e-5)
    assert set(tr.aux_losses) == {"moe_balance", "moe_z", "moh_balance", "moh_complexity", "moh_sparsity"}
    loss, parts = training_loss(tr, random_ids(base_cfg, 3, 16, seed=112), TrainConfig().aux_weights, 0.1)
    assert "halt_loss" not in parts
    loss.backward()
    assert base.net.blocks[0].attn.router.weight.grad.abs().max() > 0


@pytest.mark.parametrize("no_grad_cycles", [True, False])
def test_aux_losses_average_over_the_calls_that_backpropagate(make_config, monkeypatch, no_grad_cycles) -> None:
    """A weight means what it says: the loss is the mean over the block calls with grad enabled (the no-grad
    H-cycles cannot move a weight); statistics still describe every call."""
    cfg = make_config(n_layers=2, H_cycles=3, L_cycles=2, halt_max_steps=2, no_grad_cycles=no_grad_cycles)
    model = varied_model(cfg, seed=117).train()
    seen: dict[str, list[tuple[bool, float]]] = {"moe_balance": [], "L1.moe_load_cv": []}
    add = AuxAccumulator._add

    def spy(self, kind, key, value):
        if key in seen:
            seen[key].append((torch.is_grad_enabled(), float(value.detach())))
        add(self, kind, key, value)

    monkeypatch.setattr(AuxAccumulator, "_add", spy)
    out = model(random_ids(cfg, 3, 16, seed=118))
    calls = cfg.halt_max_steps * cfg.H_cycles * (cfg.L_cycles + 1)  # net calls, each through every layer
    grad_calls = calls // cfg.H_cycles if no_grad_cycles else calls
    assert [g for g, _ in seen["moe_balance"]] == [True] * (grad_calls * cfg.n_layers)
    assert len(seen["L1.moe_load_cv"]) == calls
    mean = sum(v for _, v in seen["moe_balance"]) / len(seen["moe_balance"])
    assert float(out.aux_losses["moe_balance"]) == pytest.approx(mean, rel=1e-5)
    with torch.no_grad():  # a training forward that backpropagates nothing has no loss to weight
        assert model(random_ids(cfg, 3, 16, seed=118)).aux_losses == {}


def test_training_output_carries_aux_losses_and_stats(make_config) -> None:
    cfg = make_config(n_layers=2)
    model = varied_model(cfg, seed=115).train()
    out = model(random_ids(cfg, 3, 16, seed=116))
    assert set(out.aux_losses) == {"moe_balance", "moe_z", "moh_balance", "moh_complexity", "moh_sparsity"}
    for L in ("L1", "L2"):
        for key in ("moh_heads", "moh_threshold", "moh_threshold_min", "moh_threshold_max", "moh_complexity",
                    "moh_complexity_min", "moh_complexity_max", "moh_pred_norm", "moh_head_load", "moe_load",
                    "moe_load_cv", "moe_dropped"):
            assert f"{L}.{key}" in out.stats, f"{L}.{key}"
        s = out.stats
        assert 0.3 <= s[f"{L}.moh_threshold_min"] <= s[f"{L}.moh_threshold"] <= s[f"{L}.moh_threshold_max"] <= 0.8
        assert 0 <= s[f"{L}.moh_complexity_min"] <= s[f"{L}.moh_complexity"] <= s[f"{L}.moh_complexity_max"] <= 1
        assert cfg.min_heads <= s[f"{L}.moh_heads"] <= cfg.max_heads
        assert torch.isclose(s[f"{L}.moe_load"].sum(), torch.tensor(1.0))
        head_load = s[f"{L}.moh_head_load"]  # fraction of tokens using each head: sums to the heads per token
        assert head_load.shape == (cfg.n_heads,) and ((0 <= head_load) & (head_load <= 1)).all()
        assert torch.isclose(head_load.sum(), s[f"{L}.moh_heads"], atol=1e-5)
        assert s[f"{L}.moe_load_cv"] >= 0 and s[f"{L}.moe_dropped"] == 0
    assert all(not v.requires_grad for v in out.stats.values())
    ev = model.eval()(random_ids(cfg, 3, 16, seed=116))
    assert ev.aux_losses == {} and ev.stats == {} and ev.step_logits == []


# -----------------------------------------------------------------------------
# padding


@pytest.mark.parametrize("attn_bias", [False, True])
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("recursive", [True, False])
def test_right_padding_matches_unpadded_runs(make_config, causal, recursive, attn_bias) -> None:
    cfg = make_config(causal=causal, recursive=recursive, n_layers=2, attn_bias=attn_bias)
    lengths = [16, 11, 5, 1, 9, 16]
    B, T = len(lengths), 16
    ids = random_ids(cfg, B, T, seed=121)
    mask = torch.zeros(B, T, dtype=torch.long)
    for b, n in enumerate(lengths):
        mask[b, :n] = 1
    model = varied_model(cfg, seed=120 + causal, calibrate_on=ids if causal else None).eval()
    if recursive and not causal:  # mean-pooled halting: calibrate on the padded batch itself
        calibrate_on_padded(model, ids, mask, seed=123)
    with torch.no_grad():
        padded = model(ids, attention_mask=mask)
        # Padding content must not matter either.
        garbage = torch.where(mask.bool(), ids, random_ids(cfg, B, T, seed=122))
        padded2 = model(garbage, attention_mask=mask)
        singles = [model(ids[b:b + 1, :n]) for b, n in enumerate(lengths)]
    assert padded.halt_step.tolist() == [s.halt_step.item() for s in singles]
    if recursive:
        assert len(set(padded.halt_step.tolist())) >= 2, padded.halt_step
    for b, n in enumerate(lengths):
        assert torch.allclose(padded.logits[b, :n], singles[b].logits[0], atol=1e-5), f"sample {b} (length {n})"
        assert torch.allclose(padded2.logits[b, :n], singles[b].logits[0], atol=1e-5)
    assert torch.equal(padded.halt_step, padded2.halt_step)


def test_all_ones_attention_mask_equals_no_mask(make_config) -> None:
    for causal in (True, False):
        cfg = make_config(causal=causal)
        model = varied_model(cfg, seed=125).eval()
        ids = random_ids(cfg, 3, 16, seed=126)
        with torch.no_grad():
            a = model(ids)
            b = model(ids, attention_mask=torch.ones_like(ids))
        assert torch.allclose(a.logits, b.logits, atol=1e-5) and torch.equal(a.halt_step, b.halt_step)


# -----------------------------------------------------------------------------
# config validation

BASE = dict(vocab_size=97, max_seq_len=16, d_model=32, n_heads=4, n_layers=1, n_experts=4, d_expert=32)


@pytest.mark.parametrize("changes,key", [
    ({"top_k": 5}, "top_k"),
    ({"min_heads": 3, "max_heads": 2}, "min_heads"),
    ({"max_heads": 5}, "max_heads"),
    ({"d_model": 30}, "d_model"),
    ({"n_layers": 0}, "n_layers"),
    ({"halt_max_steps": 0}, "halt_max_steps"),
    ({"dropout": 1.0}, "dropout"),
    ({"d_model": 12, "n_heads": 4}, "d_model"),  # head_dim 3 is odd: no rotary
])
def test_invalid_model_config_names_the_key(changes, key) -> None:
    data = {**BASE, **changes}
    with pytest.raises(ConfigError, match=rf"\b{key}\b"):
        ModelConfig.from_dict(data)
    with pytest.raises(ConfigError, match=rf"\b{key}\b"):
        RecursiveMoE(ModelConfig(**data))


@pytest.mark.parametrize("changes,key", [
    ({"n_hedas": 4}, "n_hedas"),
    ({"d_model": "32"}, "d_model"),
    ({"d_model": 32.0}, "d_model"),
    ({"n_heads": True}, "n_heads"),
    ({"recursive": 1}, "recursive"),
    ({"dropout": "0.1"}, "dropout"),
])
def test_unknown_key_or_wrong_type_names_the_key(changes, key) -> None:
    with pytest.raises(ConfigError, match=rf"\b{key}\b"):
        ModelConfig.from_dict({**BASE, **changes})


def test_config_round_trips_through_dict(make_config) -> None:
    cfg = make_config(causal=False, dropout=0.1)
    again = ModelConfig.from_dict(json.loads(json.dumps(cfg.to_dict())))
    assert again == cfg
    assert ModelConfig.from_dict({**BASE, "dropout": 0}).dropout == 0.0  # int accepted for float


# -----------------------------------------------------------------------------
# checkpoints


def write_run(run_dir: Path, model: RecursiveMoE, model_section: dict | None = None) -> Path:
    run_dir.mkdir(parents=True, exist_ok=True)
    save_weights(model, run_dir / WEIGHTS_FILE)
    section = model.config.to_dict() if model_section is None else model_section
    (run_dir / CONFIG_FILE).write_text(json.dumps({"model": section}), encoding="utf-8")
    return run_dir


def test_load_model_round_trip(make_config, tmp_path) -> None:
    cfg = make_config(n_layers=2)
    model = varied_model(cfg, seed=130).eval()
    run = write_run(tmp_path / "run", model)
    loaded = load_model(run)
    assert not loaded.training
    assert loaded.config == cfg
    ids = random_ids(cfg, 4, 16, seed=131)
    with torch.no_grad():
        a, b = model(ids), loaded(ids)
    assert torch.equal(a.logits, b.logits) and torch.equal(a.halt_step, b.halt_step)
    assert torch.equal(model.z_H_init, loaded.z_H_init)


@pytest.mark.parametrize("keep", [5, 40, -100])
def test_truncated_weights_raise_checkpoint_error(make_config, tmp_path, keep) -> None:
    cfg = make_config()
    run = write_run(tmp_path / "run", RecursiveMoE(cfg))
    path = run / WEIGHTS_FILE
    data = path.read_bytes()
    path.write_bytes(data[:keep])
    with pytest.raises(CheckpointError, match=WEIGHTS_FILE):
        load_model(run)


def test_shape_mismatched_config_raises_checkpoint_error(make_config, tmp_path) -> None:
    cfg = make_config()
    run = write_run(tmp_path / "run", RecursiveMoE(cfg), {**cfg.to_dict(), "d_expert": 48})
    with pytest.raises(CheckpointError, match=rf"{WEIGHTS_FILE}.*w_(gate|up|down)"):
        load_model(run)
    run2 = write_run(tmp_path / "run2", RecursiveMoE(cfg), {**cfg.to_dict(), "n_layers": 2})
    with pytest.raises(CheckpointError, match=rf"{WEIGHTS_FILE}.*missing tensor"):
        load_model(run2)


def test_missing_or_bad_config_raises_checkpoint_error(make_config, tmp_path) -> None:
    cfg = make_config()
    run = write_run(tmp_path / "run", RecursiveMoE(cfg))
    (run / CONFIG_FILE).unlink()
    with pytest.raises(CheckpointError, match=CONFIG_FILE):
        load_model(run)
    (run / CONFIG_FILE).write_text("{not json", encoding="utf-8")
    with pytest.raises(CheckpointError, match=CONFIG_FILE):
        load_model(run)
    (run / CONFIG_FILE).write_text(json.dumps({"model": {**cfg.to_dict(), "top_k": 9}}), encoding="utf-8")
    with pytest.raises(CheckpointError, match=rf"{CONFIG_FILE}.*top_k"):
        load_model(run)
    (run / CONFIG_FILE).write_text(json.dumps({"train": {}}), encoding="utf-8")
    with pytest.raises(CheckpointError, match=CONFIG_FILE):
        load_model(run)
    with pytest.raises(CheckpointError, match="not a run directory"):
        load_model(tmp_path / "nowhere")


def test_missing_or_non_finite_weights_raise_checkpoint_error(make_config, tmp_path) -> None:
    cfg = make_config()
    model = RecursiveMoE(cfg)
    run = write_run(tmp_path / "run", model)
    (run / WEIGHTS_FILE).unlink()
    with pytest.raises(CheckpointError, match=WEIGHTS_FILE):
        load_model(run)
    with torch.no_grad():
        model.lm_head.weight[0, 0] = float("nan")
    write_run(run, model)
    with pytest.raises(CheckpointError, match=rf"{WEIGHTS_FILE}.*lm_head.weight"):
        load_model(run)


def test_saved_weights_have_normal_file_mode(make_config, tmp_path) -> None:
    umask = os.umask(0)
    os.umask(umask)
    path = tmp_path / WEIGHTS_FILE
    save_weights(RecursiveMoE(make_config()), path)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask


def test_attn_bias_is_a_zero_started_no_decay_table_per_layer_and_head(make_config) -> None:
    """attn_bias: one [n_heads, max_seq_len, max_seq_len] table per layer, zero at start (the model then computes
    exactly what it computes without it), in the no-decay group, and learned (it gets a gradient)."""
    cfg = make_config(attn_bias=True, causal=False)
    torch.manual_seed(0)
    model = RecursiveMoE(cfg)
    torch.manual_seed(0)
    plain = RecursiveMoE(dataclasses.replace(cfg, attn_bias=False))
    tables = [m.attn_bias for m in model.modules() if isinstance(m, MoHAttention)]
    assert len(tables) == cfg.n_layers
    assert all(t.shape == (cfg.n_heads, cfg.max_seq_len, cfg.max_seq_len) and not t.any() for t in tables)
    ids = random_ids(cfg, 2, 12, seed=3)
    plain.load_state_dict({k: v for k, v in model.state_dict().items() if not k.endswith("attn_bias")})
    model.train(), plain.train()
    assert torch.allclose(model(ids).logits, plain(ids).logits, atol=1e-6)
    names = {id(p) for p in model.param_groups()["no_decay"]}
    assert all(id(t) in names for t in tables)
    model(ids).logits.square().mean().backward()
    assert all(t.grad is not None and t.grad[:, :12, :12].abs().sum() > 0 and not t.grad[:, 12:].any()
               for t in tables)
    with pytest.raises(ConfigError, match="max_seq_len: expected <= 4096 with attn_bias"):
        dataclasses.replace(cfg, max_seq_len=5000).validate()


# -----------------------------------------------------------------------------
# the token-mixing MLP (model.token_mixer = "mlp")


def test_token_mlp_mixes_every_position_channel_by_channel(make_config) -> None:
    cfg = make_config(token_mixer="mlp", causal=False)
    model = RecursiveMoE(cfg)
    mixer = model.net.blocks[0].attn
    x = torch.randn(2, cfg.max_seq_len, cfg.d_model, generator=torch.Generator().manual_seed(140))
    y, aux = mixer(x, None, True)
    assert y.shape == x.shape and aux.losses == {} and aux.stats == {}
    # Channel by channel: permuting the channels permutes the output's channels the same way.
    perm = torch.randperm(cfg.d_model, generator=torch.Generator().manual_seed(141))
    assert torch.allclose(mixer(x[..., perm], None, False)[0], y[..., perm], atol=1e-6)
    # Every position reads every other: a change at the last position moves the first.
    x2 = x.clone()
    x2[:, -1] += 1.0
    assert not torch.allclose(mixer(x2, None, False)[0][:, 0], y[:, 0])
    out = model.train()(random_ids(cfg, 2, cfg.max_seq_len, seed=142))
    loss, _ = training_loss(out, random_ids(cfg, 2, cfg.max_seq_len, seed=143), TrainConfig().aux_weights, 0.1)
    loss.backward()
    assert all(p.grad is not None and p.grad.abs().max() > 0 for p in mixer.parameters())
    assert set(out.aux_losses) == {"moe_balance", "moe_z"}  # no heads to balance


@pytest.mark.parametrize("overrides, needle", [
    (dict(token_mixer="mlp"), "causal: expected false with token_mixer = 'mlp'"),
    (dict(token_mixer="mlp", causal=False, attn_bias=True), "attn_bias: expected false with token_mixer = 'mlp'"),
    (dict(token_mixer="conv"), "token_mixer: expected one of moh, mlp, got 'conv'"),
])
def test_token_mixer_settings_are_checked(make_config, overrides, needle) -> None:
    with pytest.raises(ConfigError, match=re.escape(needle)):
        make_config(**overrides)


def test_token_mlp_refuses_other_lengths_and_padding(make_config) -> None:
    cfg = make_config(token_mixer="mlp", causal=False)
    model = RecursiveMoE(cfg).eval()
    with pytest.raises(ValueError, match=rf"input_ids: expected {cfg.max_seq_len} positions"):
        model(random_ids(cfg, 2, cfg.max_seq_len - 1, seed=144))
    mask = torch.ones(2, cfg.max_seq_len, dtype=torch.long)
    mask[1, -2:] = 0
    with pytest.raises(ValueError, match="attention_mask: expected no padding"):
        model(random_ids(cfg, 2, cfg.max_seq_len, seed=145), mask)
