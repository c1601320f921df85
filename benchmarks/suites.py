"""The measurements: serving (eager PyTorch vs ONNX Runtime fp32 / int8), the training step (eager vs
torch.compile) and MoE dispatch. Each returns plain dicts for the JSON report; the model, the exported graph,
the ORT sessions and the training step are the project's own (moe_core, export, serve, train).
"""

from __future__ import annotations

import copy
import dataclasses
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from tokenizers import Tokenizer, models

from export.onnx_export import convert_precision, export_run, tokenizer_path_for
from moe_core.checkpoint import save_run
from moe_core.config import ModelConfig
from moe_core.model import RecursiveMoE
from serve.graph import TOKEN_LOGPROBS
from serve.runtime import OrtModel
from train.config import RunConfig, TrainConfig
from train.loss import training_loss
from train.trainer import build_optimizer

from .flops import PEAK, matmul_call, peak_record
from .timing import measure

# -----------------------------------------------------------------------------
# serving: the same work on every runtime


def eager_logprobs(model: RecursiveMoE, ids: torch.Tensor, mask: torch.Tensor) -> np.ndarray:
    """What a scoring call computes: the forward pass and the log-prob of every next token [B, T-1]."""
    with torch.inference_mode():
        logits = model(ids, mask).logits
        return logits[:, :-1].log_softmax(-1).gather(-1, ids[:, 1:, None])[..., 0].numpy()


def random_batch(vocab_size: int, batch: int, seq: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Random token ids [batch, seq] (timing does not depend on the ids) and an all-ones attention mask."""
    ids = np.random.default_rng(seed).integers(0, vocab_size, size=(batch, seq), dtype=np.int64)
    return ids, np.ones_like(ids)


def placeholder_tokenizer(vocab_size: int) -> str:
    """A word-level tokenizer of vocab_size tokens: what a run directory needs to be exported and served.
    The benchmark feeds token ids directly, so the tokens themselves never matter."""
    vocab = {f"<{i}>": i for i in range(vocab_size)}
    return Tokenizer(models.WordLevel(vocab, unk_token="<0>")).to_str()


def export_graphs(model: RecursiveMoE, run_dir: Path | None, onnx_path: Path | None, tmp: Path,
                  log: Callable[[str], None]) -> tuple[dict[str, Path], float | None]:
    """{"ort_fp32": path, "ort_int8": path} of `model` in `tmp`, and the export time (None when `onnx_path`,
    the run's already exported graph, is used). A random-init model is written as a run directory first, so
    that `moe export`'s own code (export_run, no parity check) builds the graph; int8 is export's conversion
    of that same fp32 graph."""
    export_s = None
    if onnx_path is None:
        if run_dir is None:
            run_dir = tmp / "run"
            save_run(run_dir, model, placeholder_tokenizer(model.config.vocab_size))
        log("exporting the model to ONNX (no parity check; `moe export` does that) ...")
        result = export_run(run_dir, tmp / "model.onnx", check=False, log=log)
        onnx_path, export_s = result.path, result.seconds
    int8 = tmp / "model-int8.onnx"
    shutil.copyfile(onnx_path, int8)
    tokenizer = tokenizer_path_for(onnx_path)  # the name both graphs' metadata gives for their tokenizer
    if not (tmp / tokenizer.name).exists():
        shutil.copyfile(tokenizer, tmp / tokenizer.name)
    metadata = {p.key: p.value for p in onnx.load(str(onnx_path)).metadata_props}
    convert_precision(str(int8), "int8", metadata)
    return {"ort_fp32": onnx_path, "ort_int8": int8}, export_s


def serving(model: RecursiveMoE, sessions: dict[str, OrtModel], shapes: list[tuple[int, int]], warmup: int,
            repeats: int, peak_n: int) -> list[dict[str, Any]]:
    """Scoring throughput of eager PyTorch and of each ORT session, per (batch, seq), in one loop per cell
    together with the matmul peak (benchmarks/flops.py). Each runtime also reports its largest log-prob
    difference from eager on the same inputs."""
    rows = []
    for B, T in shapes:
        ids, mask = random_batch(model.config.vocab_size, B, T)
        t_ids, t_mask = torch.from_numpy(ids), torch.from_numpy(mask)
        runtimes: dict[str, Callable[[], np.ndarray]] = {"eager": lambda: eager_logprobs(model, t_ids, t_mask)}  # noqa: B023
        for name, s in sessions.items():
            runtimes[name] = lambda s=s: s.run(ids, mask, [TOKEN_LOGPROBS])[0]  # noqa: B023
        timings = measure({**runtimes, PEAK: matmul_call(peak_n)}, warmup, repeats)
        row: dict[str, Any] = {"batch": B, "seq": T, PEAK: peak_record(peak_n, timings.pop(PEAK))}
        ref = timings["eager"]
        for name, t in timings.items():
            row[name] = {**t.to_dict(), "tokens_per_s": B * T / t.median, "vs_eager": ref.median / t.median,
                         "max_abs_logprob_diff": float(np.abs(t.output - ref.output).max()) if T > 1 else 0.0}
        rows.append(row)
    return rows


# -----------------------------------------------------------------------------
# training: one optimizer step, eager vs torch.compile


def train_step_fn(model: RecursiveMoE, rc: RunConfig, x: torch.Tensor, y: torch.Tensor) -> Callable[[], None]:
    """One training step as the trainer makes it: forward, loss with aux terms, backward, clip, AdamW."""
    tc = rc.train
    optimizer = build_optimizer(model, rc)

    def step() -> None:
        out = model(x)
        loss, _ = training_loss(out, y, tc.aux_weights, tc.halt_weight)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), tc.grad_clip if tc.grad_clip > 0 else float("inf"))
        optimizer.step()

    return step


def training(cfg: ModelConfig, tc: TrainConfig, batch: int, warmup: int, repeats: int,
             backend: str = "inductor") -> dict[str, Any]:
    """Steps/s and tokens/s of the eager and the compiled model (the trainer's regional compilation: each
    block compiled, one graph for every call of the recursion). The first compiled step — compilation, or
    loading it from the inductor cache — is timed apart; the medians are of steady-state steps."""
    torch.manual_seed(0)
    eager = RecursiveMoE(cfg).train()
    compiled = copy.deepcopy(eager)
    for block in compiled.net.blocks:
        block.compile(backend=backend)
    rc = RunConfig(cfg, tc)
    ids = torch.from_numpy(random_batch(cfg.vocab_size, batch, cfg.max_seq_len + 1)[0])
    x, y = ids[:, :-1], ids[:, 1:]
    steps = {"eager": train_step_fn(eager, rc, x, y), "compiled": train_step_fn(compiled, rc, x, y)}
    t0 = time.perf_counter()
    steps["compiled"]()
    first = time.perf_counter() - t0
    timings = measure(steps, warmup, repeats)
    tokens = batch * cfg.max_seq_len
    out: dict[str, Any] = {"batch": batch, "seq": cfg.max_seq_len, "backend": backend, "first_compiled_step_s": first,
                           "compile_s": first - timings["compiled"].median}
    for name, t in timings.items():
        out[name] = {**t.to_dict(), "tokens_per_s": tokens / t.median}
    out["compiled_vs_eager"] = timings["eager"].median / timings["compiled"].median
    return out


# -----------------------------------------------------------------------------
# MoE dispatch

DISPATCH_OPTION = "moe_dispatch"  # the ModelConfig field that will choose the dispatch, once it exists


def dispatch_modes() -> tuple[str, ...]:
    """The MoE dispatch implementations this checkout has: dense only, until ModelConfig gets `moe_dispatch`."""
    names = {f.name for f in dataclasses.fields(ModelConfig)}
    return ("dense", "sparse") if DISPATCH_OPTION in names else ("dense",)


def moe_dispatch(cfg: ModelConfig, batch: int, seq: int, warmup: int, repeats: int, n_experts: int = 8,
                 top_k: int = 2) -> dict[str, Any]:
    """The MoE feed-forward layer alone (inference forward) at n_experts / top_k, per dispatch mode, with the
    same weights and inputs; each mode's largest output difference from dense."""
    base = dataclasses.replace(cfg, n_experts=n_experts, top_k=top_k)
    layers, state = {}, None
    for mode in dispatch_modes():
        c = dataclasses.replace(base, **{DISPATCH_OPTION: mode}) if mode != "dense" else base
        torch.manual_seed(0)
        ffn = RecursiveMoE(c).net.blocks[0].ffn.eval()  # initialised as the model initialises it
        if state is None:
            state = ffn.state_dict()
        else:
            ffn.load_state_dict(state)
        layers[mode] = ffn
    x = torch.randn(batch, seq, cfg.d_model, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        timings = measure({m: lambda f=f: f(x, False)[0] for m, f in layers.items()}, warmup, repeats)
    dense = timings["dense"]
    out: dict[str, Any] = {"batch": batch, "seq": seq, "n_experts": n_experts, "top_k": top_k,
                           "modes": list(layers)}
    for mode, t in timings.items():
        out[mode] = {**t.to_dict(), "tokens_per_s": batch * seq / t.median, "vs_dense": dense.median / t.median,
                     "max_abs_diff": float((t.output - dense.output).abs().max())}
    out["sparse_vs_dense"] = out["sparse"]["vs_dense"] if "sparse" in out else None
    return out
