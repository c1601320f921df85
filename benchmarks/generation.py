"""Generation: greedy tokens/s, time to first token and KV-cache memory on four paths, all through serve's own
generation loop (serve.server.Server.generate: batching, prefill, cached or uncached calls, greedy picking, finished
samples leaving the batch):

    ort_cached      the decode graph (MODEL.decode.onnx) on ONNX Runtime: Server.open(..., cache=True)
    ort_uncached    the unrolled graph (MODEL.onnx) over the whole context for every new token: cache=False
    eager_cached    the eager model's cache path, RecursiveMoE.cached_forward (export.decode.eager_runner) behind the
                    same Decoder (moe_core/runtime/decoding.py) the decode graph runs in
    eager_uncached  the eager forward over the whole context for every new token

Rules of the measurement:
- Prompts are random token ids (timing does not depend on them, as for scoring), fed to Server as ids: no
  tokenizer's text would round-trip to the same ids (IdServer).
- tokens/s = tokens generated / wall time of the whole generate call (prefill included); TTFT = the wall time of the
  same call with max_new_tokens=1 (tokenising, the prefill or first forward, the first pick). The paths of one cell
  are timed in one interleaved loop (benchmarks/timing.py).
- Uncached generation may be timed for fewer new tokens than cached (Mode.gen_uncached_new): its cost per token
  grows with the context (up to max_seq_len), so its first tokens are its cheapest and the cached / uncached ratios
  measured that way are lower bounds.
- Greedy tokens are compared exactly, as discrete decisions: ORT cached with eager cached and ORT uncached with eager
  uncached over every token both generated; cached with uncached over the tokens whose context fits max_seq_len
  (past it the decoder refills its cache from the last 3/4 window while uncached generation slides one token at a
  time: different contexts by design, moe_core/runtime/decoding.py).
- KV-cache memory = the bytes of every present key and value the largest decoding call of the cell returned (the
  cache a batch holds at its longest), beside the formula 2 x entries x batch x heads x length x head_dim x 4.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, cast

import numpy as np
import onnx
import torch

from export.decode import cache_entries, eager_runner
from moe_core.model import RecursiveMoE
from moe_core.runtime.decoding import Decoder
from moe_core.runtime.graph_contract import HALT_STEP, LOGITS, decode_path_for
from serve.graph import LAST_LOGITS
from serve.runtime import ModelInfo, OrtModel
from serve.server import GenerateResult, Server

from .timing import measure

PATHS = ("ort_cached", "ort_uncached", "eager_cached", "eager_uncached")
CACHED = ("ort_cached", "eager_cached")


class IdServer(Server):
    """serve's Server fed token ids: a prompt text is its ids separated by spaces. Everything after encoding is
    Server.generate's own code."""

    def encode(self, texts: Sequence[str]) -> list[list[int]]:
        return [[int(t) for t in s.split()] for s in texts]


class EagerModel:
    """The eager model behind the `run` an unrolled graph's OrtModel offers (what Server's uncached generation
    calls): the full forward over the right-padded context, the halting-selected logits at each row's last token."""

    runtime = "eager"

    def __init__(self, model: RecursiveMoE, info: ModelInfo, tokenizer: Any) -> None:
        self.model, self.info, self.tokenizer, self.note = model.eval(), info, tokenizer, ""

    def run(self, input_ids: np.ndarray, attention_mask: np.ndarray, outputs: list[str]) -> list[np.ndarray]:
        with torch.inference_mode():
            out = self.model(torch.from_numpy(input_ids), torch.from_numpy(attention_mask))
        last = torch.from_numpy(attention_mask.sum(1) - 1)
        values = {LAST_LOGITS: lambda: out.logits[torch.arange(len(last)), last].float().numpy(),
                  HALT_STEP: lambda: out.halt_step.numpy(), LOGITS: lambda: out.logits.float().numpy()}
        return [values[name]() for name in outputs]


class CacheProbe:
    """Wraps a Decoder's `run` and keeps the largest cache a call was given: (bytes of every key and value buffer,
    batch, buffer length)."""

    peak: tuple[int, int, int]

    def __init__(self, decoder: Decoder) -> None:
        self.reset()
        inner = decoder.run

        def run(feeds: dict[str, Any], outputs: list[str], into: dict[str, Any]) -> list[np.ndarray]:
            buffers = list(into.values())  # the present buffers, which are the past ones
            nbytes = sum(b.nbytes for b in buffers)
            if nbytes > self.peak[0]:
                self.peak = (nbytes, buffers[0].shape[0], buffers[0].shape[2])
            return inner(feeds, outputs, into)

        decoder.run = run

    def reset(self) -> None:
        self.peak = (0, 0, 0)


def opset_of(path: Path) -> int:
    """The default-domain ONNX opset a graph was written in."""
    return next(o.version for o in onnx.load(str(path), load_external_data=False).opset_import
                if o.domain in ("", "ai.onnx"))


def open_servers(model: RecursiveMoE, path: Path, threads: int) -> tuple[dict[str, IdServer], dict[str, CacheProbe]]:
    """The four paths as Servers on the exported model at `path` (its decode graph beside it), and a cache probe on
    each cached one."""
    ort_cached = IdServer.open(path, provider="cpu", threads=threads, runtime="unrolled", cache=True)
    if ort_cached.decoder is None:
        raise RuntimeError(f"{path}: no decode graph beside it ({ort_cached.model.note})")
    ort_uncached = IdServer.open(path, provider="cpu", threads=threads, runtime="unrolled", cache=False)
    cfg = model.config
    eager = EagerModel(model, ort_uncached.info, ort_uncached.tokenizer)
    decoder = Decoder(eager_runner(model), cache_entries(cfg), cfg.n_heads, cfg.head_dim, cfg.max_seq_len,
                      "eager cached_forward")
    # EagerModel stands in for the unrolled graph's OrtModel: Server.generate uses only its info, tokenizer and run.
    stand_in = cast(OrtModel, eager)
    servers = {"ort_cached": ort_cached, "ort_uncached": ort_uncached,
               "eager_cached": IdServer(stand_in, decoder), "eager_uncached": IdServer(stand_in)}
    probes = {"ort_cached": CacheProbe(ort_cached.decoder), "eager_cached": CacheProbe(decoder)}  # the CACHED paths
    return servers, probes


def random_prompts(vocab_size: int, batch: int, length: int, seed: int) -> list[str]:
    ids = np.random.default_rng(seed).integers(0, vocab_size, size=(batch, length))
    return [" ".join(map(str, row)) for row in ids]


def generated(results: list[GenerateResult]) -> int:
    """Tokens computed: each kept token, and the <|endoftext|> that ended a sample (it was generated, not kept)."""
    return sum(len(r.tokens) + (r.finish_reason == "eot") for r in results)


def first_difference(a: list[GenerateResult], b: list[GenerateResult], upto: int) -> dict[str, Any]:
    """Whether two paths chose the same greedy tokens over the first `upto` of every sample, and where they first
    did not (sample, token index)."""
    rows = [(x.tokens[:upto], y.tokens[:upto]) for x, y in zip(a, b, strict=True)]
    same = sum(x == y for x, y in rows)
    out: dict[str, Any] = {"tokens_compared": upto, "samples_equal": same, "samples": len(rows),
                           "equal": same == len(rows), "first_difference": None}
    for i, (x, y) in enumerate(rows):
        if x != y:
            j = next((k for k, (u, v) in enumerate(zip(x, y, strict=False)) if u != v), min(len(x), len(y)))
            out["first_difference"] = {"sample": i, "token": j}
            break
    return out


def cell(servers: dict[str, IdServer], probes: dict[str, CacheProbe], cfg: Any, batch: int, prompt: int, new: int,
         new_uncached: int, repeats: int, seed: int = 0) -> dict[str, Any]:
    """One (batch, prompt length) cell: TTFT, then the whole generation, each path in one interleaved loop."""
    texts = random_prompts(cfg.vocab_size, batch, prompt, seed)
    n_of = {name: new if name in CACHED else new_uncached for name in PATHS}

    def gen(name: str, n: int) -> Callable[[], list[GenerateResult]]:
        return lambda: servers[name].generate(texts, max_new_tokens=n, batch_size=batch)

    # Warm-up, one call of two tokens per path: the prefill (or first forward) and one cached (or uncached) call at
    # this batch's shapes, so that no timed call pays for first-use allocations.
    for name in PATHS:
        gen(name, 2)()
    ttft = measure({name: gen(name, 1) for name in PATHS}, 0, repeats)
    for p in probes.values():
        p.reset()
    full = measure({name: gen(name, n_of[name]) for name in PATHS}, 0, repeats)
    out: dict[str, Any] = {"batch": batch, "prompt": prompt, "new_tokens": new, "uncached_new_tokens": new_uncached}
    results = {name: t.output for name, t in full.items()}
    for name, t in full.items():
        tokens = generated(results[name])
        out[name] = {**t.to_dict(), "generated_tokens": tokens, "tokens_per_s": tokens / t.median,
                     "ttft_s": ttft[name].median, "ttft": ttft[name].to_dict(),
                     # the tokens after the first, over the time after it: the decoding rate alone
                     "after_first_tokens_per_s": (tokens - batch) / max(t.median - ttft[name].median, 1e-9)}
    tps = {name: out[name]["tokens_per_s"] for name in PATHS}
    out["ratios"] = {"ort_cached_vs_eager_cached": tps["ort_cached"] / tps["eager_cached"],
                     "ort_cached_vs_ort_uncached": tps["ort_cached"] / tps["ort_uncached"],
                     "eager_cached_vs_eager_uncached": tps["eager_cached"] / tps["eager_uncached"],
                     "ort_uncached_vs_eager_uncached": tps["ort_uncached"] / tps["eager_uncached"]}
    fits = max(0, cfg.max_seq_len - prompt + 1)  # tokens predicted from a context of at most max_seq_len tokens
    out["same_tokens"] = {
        "ort_cached = eager_cached": first_difference(results["ort_cached"], results["eager_cached"], new),
        "ort_uncached = eager_uncached": first_difference(results["ort_uncached"], results["eager_uncached"],
                                                          new_uncached),
        "ort_cached = ort_uncached": first_difference(results["ort_cached"], results["ort_uncached"],
                                                      min(new_uncached, fits))}
    out["same_tokens_all"] = all(c["equal"] for c in out["same_tokens"].values())
    # Halting, a discrete decision too: each runtime against the other on the same path; cached against uncached when
    # no context passed max_seq_len (a refill or a sliding window decides halting again, from another first token).
    halts = {name: [r.halt_step for r in results[name]] for name in PATHS}
    pairs = [("ort_cached", "eager_cached"), ("ort_uncached", "eager_uncached")]
    if prompt + new - 1 <= cfg.max_seq_len:
        pairs.append(("ort_cached", "ort_uncached"))
    out["halt_steps"] = sorted({h for hs in halts.values() for h in hs})
    out["same_halt_steps"] = all(halts[a] == halts[b] for a, b in pairs)
    out["halt_pairs_compared"] = [f"{a} = {b}" for a, b in pairs]
    nbytes, b, length = probes["ort_cached"].peak
    entries, hd = cache_entries(cfg), cfg.head_dim
    out["kv_cache"] = {"bytes": nbytes, "batch": b, "length": length, "entries": entries,
                       "formula_bytes": 2 * entries * b * cfg.n_heads * length * hd * 4,
                       "eager_bytes": probes["eager_cached"].peak[0]}
    return out


def generation_section(model: RecursiveMoE, path: Path, batches: tuple[int, ...], prompts: tuple[int, ...],
                       new: int, uncached_new: dict[int, int], repeats: int, threads: int,
                       source: str, log: Callable[[str], None]) -> dict[str, Any]:
    """Every (batch, prompt) cell on the four paths, on the exported model at `path` and its decode graph."""
    cfg = model.config
    servers, probes = open_servers(model, path, threads)
    cells = []
    for P in prompts:
        for B in batches:
            n_u = min(new, uncached_new.get(B, new))
            log(f"generation: batch {B}, prompt {P}, {new} new tokens ({n_u} uncached)")
            cells.append(cell(servers, probes, cfg, B, P, new, n_u, repeats))
    halts = sorted({h for c in cells for h in c["halt_steps"]})
    ort_cached = servers["ort_cached"]
    assert ort_cached.decoder is not None  # open_servers refuses a model without its decode graph
    return {"graph": str(path), "decode_graph": str(decode_path_for(path)),
            "opset": {"unrolled": opset_of(path), "decode": opset_of(decode_path_for(path))},
            "decoder": ort_cached.decoder.describe, "session": ort_cached.model.describe(),
            "cache_entries": cache_entries(cfg), "max_seq_len": cfg.max_seq_len, "new_tokens": new,
            "halting": halting_statement(model, source, halts), "halt_steps": halts, "cells": cells}


def halting_statement(model: RecursiveMoE, source: str, halts: list[int]) -> str:
    """How many supervision steps the samples ran, and why that is deterministic."""
    cfg = model.config
    if not cfg.recursive:
        return "no recursion"
    hh = model.halt_head
    never = bool((hh.weight == 0).all() and (hh.bias < 0).all())
    why = ("the random-init halt head (weight 0, negative bias) never fires: every sample runs all "
           f"{cfg.halt_max_steps} steps" if never else f"halting as the weights decide ({source})")
    return f"{why}; halt steps seen: {', '.join(map(str, halts))} (decided at the prefill, carried)"


def targets_cells(g: dict[str, Any]) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The cell where the cached / uncached target is stated (largest batch, longest prompt) and the cells of the
    smallest batch (where ORT / eager cached is)."""
    cells = g["cells"]
    big = max(cells, key=lambda c: (c["batch"], c["prompt"]))
    small_b = min(c["batch"] for c in cells)
    return big, [c for c in cells if c["batch"] == small_b]


def table_lines(g: dict[str, Any]) -> list[str]:
    """The section of the printed table."""
    cut = sorted({(c["batch"], c["uncached_new_tokens"]) for c in g["cells"]
                  if c["uncached_new_tokens"] < c["new_tokens"]})
    uncached = ("; uncached paths timed for the first " + ", ".join(f"{n} tokens at batch {b}" for b, n in cut)
                + " (their cheapest tokens: cached / uncached ratios are lower bounds)") if cut else ""
    lines = [f"generation: greedy, {g['new_tokens']} new tokens, tokens/s of the whole generate call (prefill "
             f"included){uncached}; serve.Server.generate on every path",
             f"  ORT {g['session']}; decode graph opset {g['opset']['decode']}, unrolled graph opset "
             f"{g['opset']['unrolled']}; {g['decoder']}; max_seq_len {g['max_seq_len']} (longer contexts: cached "
             f"refills from the last 3/4 window, uncached slides)",
             f"  halting: {g['halting']}",
             f"  {'batch':>5} {'prompt':>6} | {'tokens/s: ORT c':>15} {'ORT u':>8} {'eager c':>8} {'eager u':>8} | "
             f"{'ORTc/eagc':>9} {'ORTc/ORTu':>9} {'eagc/eagu':>9} {'ORTu/eagu':>9} | "
             f"{'TTFT ms: ORT c':>14} {'ORT u':>6} {'eag c':>6} {'eag u':>6} | {'KV MiB':>7} {'len':>4} | same tokens"]
    for c in g["cells"]:
        r = c["ratios"]
        same = "yes" if c["same_tokens_all"] and c["same_halt_steps"] else "NO: " + "; ".join(
            f"{k} {v['samples_equal']}/{v['samples']}" for k, v in c["same_tokens"].items() if not v["equal"])
        compared = c["same_tokens"]["ort_cached = ort_uncached"]["tokens_compared"]
        lines.append(
            f"  {c['batch']:>5} {c['prompt']:>6} | "
            + f"{c['ort_cached']['tokens_per_s']:>15,.1f} "
            + " ".join(f"{c[p]['tokens_per_s']:>8,.1f}" for p in PATHS[1:]) + " | "
            + " ".join(f"{r[k]:>8.2f}x" for k in ("ort_cached_vs_eager_cached", "ort_cached_vs_ort_uncached",
                                                  "eager_cached_vs_eager_uncached", "ort_uncached_vs_eager_uncached"))
            + f" | {c['ort_cached']['ttft_s'] * 1e3:>14.1f} "
            + " ".join(f"{c[p]['ttft_s'] * 1e3:>6.1f}" for p in PATHS[1:])
            + f" | {c['kv_cache']['bytes'] / 2**20:>7.2f} {c['kv_cache']['length']:>4} | {same}"
            + f" (c=u over {compared})")
    return lines
