"""Incremental decoding (RecursiveMoE.cached_forward): a prefill of right-padded prompts of different lengths, then
one token at a time against the keys and values of every block application, gives what the full forward gives at
the same positions — logits within the parity tolerance, the same halting, the same greedy tokens."""

from __future__ import annotations

import pytest
import torch
from helpers import vary_routing

from export.parity import TOLERANCE
from moe_core import ModelConfig, RecursiveMoE
from moe_core.model.attention import KVCache

VOCAB = 97
CFG = dict(vocab_size=VOCAB, max_seq_len=24, d_model=32, n_heads=4, n_layers=2, min_heads=1, max_heads=4,
           n_experts=4, top_k=2, d_expert=32, H_cycles=2, L_cycles=1, halt_max_steps=3)


def random_model(seed: int = 0, **overrides) -> RecursiveMoE:
    """Random routers and predictors (routing varies per token) and a halt head that stops samples of one batch at
    different steps."""
    torch.manual_seed(seed)
    return vary_routing(RecursiveMoE(ModelConfig(**{**CFG, **overrides})).eval())


def right_padded(seqs: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    T = max(map(len, seqs))
    ids = torch.tensor([s + [0] * (T - len(s)) for s in seqs])
    mask = torch.tensor([[1] * len(s) + [0] * (T - len(s)) for s in seqs])
    return ids, mask


def close(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Parity's rule: max |a - b| relative to the logit scale (summation order differs between the two ways)."""
    return float((a - b).abs().max()) <= TOLERANCE * float(b.abs().max())


def decode(model: RecursiveMoE, prompts: list[list[int]], continuations: list[list[int]]):
    """Prefill `prompts`, then feed each continuation's tokens one at a time: the logits predicting each next
    token (per sample: the prompt's last position, then each fed token), and halt_step."""
    ids, mask = right_padded(prompts)
    lengths = torch.tensor([len(p) for p in prompts])
    positions = torch.arange(ids.shape[1]).expand_as(ids)
    with torch.no_grad():
        out = model.cached_forward(ids, mask, positions)
        logits = [[out.logits[b, lengths[b] - 1]] for b in range(len(prompts))]
        cache, halt = out.present, out.halt_step
        for j in range(len(continuations[0])):
            new = torch.tensor([[c[j]] for c in continuations])
            mask = torch.cat([mask, torch.ones(len(prompts), 1, dtype=mask.dtype)], dim=1)
            out = model.cached_forward(new, mask, (lengths + j)[:, None], cache, halt)
            assert torch.equal(out.halt_step, halt)
            cache = out.present
            for b in range(len(prompts)):
                logits[b].append(out.logits[b, 0])
    return [torch.stack(x) for x in logits], halt, cache


@pytest.mark.parametrize("recursive", [True, False], ids=["recursive", "baseline"])
def test_cached_decoding_equals_the_full_forward(recursive):
    model = random_model(seed=4, recursive=recursive, learned_pos=True)
    g = torch.Generator().manual_seed(1)
    lengths = [1, 5, 9, 3, 12, 7, 4, 6, 2, 10, 8, 5]
    prompts = [torch.randint(0, VOCAB, (n,), generator=g).tolist() for n in lengths]
    continuations = [torch.randint(0, VOCAB, (8,), generator=g).tolist() for _ in lengths]
    got, halt, cache = decode(model, prompts, continuations)
    ids, mask = right_padded([p + c for p, c in zip(prompts, continuations, strict=True)])
    with torch.no_grad():
        full = model(ids, mask)
    assert torch.equal(halt, full.halt_step)
    if recursive:
        assert len(set(full.halt_step.tolist())) >= 2, "halting did not vary across the batch"
    for b, n in enumerate(lengths):
        assert close(got[b], full.logits[b, n - 1: n + 8]), b
    # One cache entry per block application the eager decode ran: up to the batch's last kept step.
    calls_per_step = CFG["H_cycles"] * (CFG["L_cycles"] + 1) * CFG["n_layers"]
    steps = int(full.halt_step.max()) if recursive else 1
    assert len(cache.keys) == len(cache.values) == steps * (calls_per_step if recursive else CFG["n_layers"])
    assert cache.length == max(lengths) + 8 and cache.keys[0].shape == (len(lengths), 4, cache.length, 8)


def test_cached_greedy_tokens_equal_uncached():
    model = random_model(seed=1)
    g = torch.Generator().manual_seed(4)
    prompts = [torch.randint(0, VOCAB, (n,), generator=g).tolist() for n in (2, 6, 4, 1, 9, 3, 5, 7)]
    with torch.no_grad():
        assert len(set(model(*right_padded(prompts)).halt_step.tolist())) >= 2, "halting did not vary"

    def greedy_uncached(n: int) -> list[list[int]]:
        seqs = [list(p) for p in prompts]
        for _ in range(n):
            ids, mask = right_padded(seqs)
            with torch.no_grad():
                logits = model(ids, mask).logits
            for b, s in enumerate(seqs):
                s.append(int(logits[b, len(s) - 1].argmax()))
        return [s[len(p):] for s, p in zip(seqs, prompts, strict=True)]

    def greedy_cached(n: int) -> list[list[int]]:
        ids, mask = right_padded(prompts)
        lengths = torch.tensor([len(p) for p in prompts])
        with torch.no_grad():
            out = model.cached_forward(ids, mask, torch.arange(ids.shape[1]).expand_as(ids))
            nxt = out.logits[torch.arange(len(prompts)), lengths - 1].argmax(-1)
            tokens, cache, halt = [nxt], out.present, out.halt_step
            for j in range(n - 1):
                mask = torch.cat([mask, torch.ones(len(prompts), 1, dtype=mask.dtype)], dim=1)
                out = model.cached_forward(nxt[:, None], mask, (lengths + j)[:, None], cache, halt)
                cache, nxt = out.present, out.logits[:, 0].argmax(-1)
                tokens.append(nxt)
        return torch.stack(tokens, 1).tolist()

    assert greedy_cached(10) == greedy_uncached(10)


def test_cached_forward_refuses_what_it_cannot_cache():
    with pytest.raises(ValueError, match="causal"):
        random_model(causal=False).cached_forward(torch.zeros(1, 2, dtype=torch.long), torch.ones(1, 2),
                                                  torch.arange(2)[None])
    model = random_model()
    ids, mask, pos = torch.zeros(1, 2, dtype=torch.long), torch.ones(1, 2), torch.arange(2)[None]
    with torch.no_grad():
        out = model.cached_forward(ids, mask, pos)
    with pytest.raises(ValueError, match="block applications cached"):
        model.cached_forward(ids[:, :1], torch.ones(1, 3), pos[:, :1] + 2,
                             KVCache(out.present.keys[:1], out.present.values[:1]),
                             torch.full((1,), CFG["halt_max_steps"]))
