"""The measurements: serving (eager PyTorch vs ONNX Runtime fp32 / int8), the training step (eager vs
torch.compile) and MoE dispatch. Each returns plain dicts for the JSON report; the model, the exported graph,
the ORT sessions and the training step are the project's own (moe_core, export, serve, train).
"""

from __future__ import annotations

import copy
import dataclasses
import itertools
import logging
import shutil
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

import numpy as np
import onnx
import torch
from tokenizers import Tokenizer, models

from export.onnx_export import convert_precision, export_run
from moe_core.checkpoint import save_run
from moe_core.config import ModelConfig
from moe_core.model import RecursiveMoE
from moe_core.model.moe import MoEFeedForward, resolve_moe_dispatch
from moe_core.runtime.graph_contract import decode_path_for, step_path_for, tokenizer_path_for
from moe_core.runtime.metrics import token_logprobs
from serve.graph import TOKEN_LOGPROBS
from serve.runtime import OrtModel
from train.config import RunConfig, TrainConfig
from train.loss import training_loss
from train.optimizer import build_optimizer
from train.trainer import compile_blocks, train_step

from .flops import PEAK, matmul_call, peak_record
from .timing import measure

# -----------------------------------------------------------------------------
# serving: the same work on every runtime


def eager_logprobs(model: RecursiveMoE, ids: torch.Tensor, mask: torch.Tensor) -> np.ndarray:
    """What a scoring call computes: the forward pass and the log-prob of every next token [B, T-1]."""
    with torch.inference_mode():
        logits = model(ids, mask).logits
    return token_logprobs(logits[:, :-1].numpy(), ids[:, 1:].numpy())


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
                  log: Callable[[str], None], stepwise: bool = False, int8: bool = True,
                  decode: bool = False) -> tuple[dict[str, Path], float | None]:
    """{"ort_fp32": path[, "ort_int8": path]} of `model` in `tmp` — with `stepwise` / `decode`, the fp32 graph has
    its step graph / decode graph beside it — and the export time (None when `onnx_path`, the run's already exported
    graph, serves). A random-init model is written as a run directory first, so that `moe export`'s own code
    (export_run at its default opset, no parity check) builds the graphs; int8 is export's conversion of that same
    fp32 graph. Every section that serves uses these graphs: the model is exported once per run."""
    export_s = None
    if onnx_path is None or (stepwise and not step_path_for(onnx_path).exists()) \
            or (decode and not decode_path_for(onnx_path).exists()):
        if run_dir is None:
            run_dir = tmp / "run"
            save_run(run_dir, model, placeholder_tokenizer(model.config.vocab_size))
        extra = [what for what, on in (("step graph", stepwise), ("decode graph", decode)) if on]
        log(f"exporting the model{' and its ' + ' and '.join(extra) if extra else ''} to ONNX (no parity check; "
            "`moe export` does that) ...")
        result = export_run(run_dir, tmp / "model.onnx", check=False, stepwise=stepwise, decode=decode, log=log)
        onnx_path, export_s = result.path, result.seconds
    if not int8:
        return {"ort_fp32": onnx_path}, export_s
    int8_path = tmp / "model-int8.onnx"
    shutil.copyfile(onnx_path, int8_path)
    tokenizer = tokenizer_path_for(onnx_path)  # the name both graphs' metadata gives for their tokenizer
    if not (tmp / tokenizer.name).exists():
        shutil.copyfile(tokenizer, tmp / tokenizer.name)
    metadata = {p.key: p.value for p in onnx.load(str(onnx_path)).metadata_props}
    convert_precision(str(int8_path), "int8", metadata)
    return {"ort_fp32": onnx_path, "ort_int8": int8_path}, export_s


def serving(model: RecursiveMoE, sessions: dict[str, OrtModel], shapes: list[tuple[int, int]], warmup: int,
            repeats: int, peak_n: int, peak_at: tuple[int, int]) -> list[dict[str, Any]]:
    """Scoring throughput of eager PyTorch and of each ORT session, per (batch, seq), in one loop per cell; in
    the cell `peak_at` (where utilisation is stated) the matmul peak (benchmarks/flops.py) joins the loop. Each
    runtime also reports its largest log-prob difference from eager on the same inputs."""
    rows = []
    for B, T in shapes:
        ids, mask = random_batch(model.config.vocab_size, B, T)
        t_ids, t_mask = torch.from_numpy(ids), torch.from_numpy(mask)
        runtimes: dict[str, Callable[[], Any]] = {"eager": lambda: eager_logprobs(model, t_ids, t_mask)}  # noqa: B023
        for name, s in sessions.items():
            def run(s: OrtModel = s) -> np.ndarray:
                return s.run(ids, mask, [TOKEN_LOGPROBS])[0]  # noqa: B023

            runtimes[name] = run
        if (B, T) == peak_at:
            runtimes[PEAK] = matmul_call(peak_n)
        timings = measure(runtimes, warmup, repeats)
        row: dict[str, Any] = {"batch": B, "seq": T}
        if PEAK in timings:
            row[PEAK] = peak_record(peak_n, timings.pop(PEAK))
        ref = timings["eager"]
        for name, t in timings.items():
            row[name] = {**t.to_dict(), "tokens_per_s": B * T / t.median, "vs_eager": ref.median / t.median,
                         "max_abs_logprob_diff": float(np.abs(t.output - ref.output).max()) if T > 1 else 0.0}
        rows.append(row)
    return rows


# -----------------------------------------------------------------------------
# training: one optimizer step, eager vs torch.compile


def train_step_fn(model: RecursiveMoE, rc: RunConfig, x: torch.Tensor, y: torch.Tensor) -> Callable[[], None]:
    """One training step as `moe train` takes it (train.trainer.train_step: forward, the language task's loss
    with its aux terms, backward, gradient norm, clip, AdamW), on a fixed batch at the initial learning rate."""
    tc = rc.train
    optimizer, params = build_optimizer(model, rc), list(model.parameters())

    def loss_fn(out: Any, targets: torch.Tensor) -> Any:
        return training_loss(out, targets, tc.aux_weights, tc.halt_weight)

    def step() -> None:
        train_step(model, optimizer, loss_fn, x, y, params, tc.grad_clip)

    return step


# Kernels torch.compile hands back to the same library calls on CPU (MKL sgemm, the flash-attention kernel).
MATMUL_OPS = ("aten::mm", "aten::addmm", "aten::bmm", "moe::grouped_mm", "aten::_scaled_dot_product")


def matmul_share(fn: Callable[[], Any]) -> float:
    """The fraction of one call's self CPU time spent in matmul and attention kernels (torch.profiler)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events)
    return sum(e.self_cpu_time_total for e in events if e.key.startswith(MATMUL_OPS)) / total


def training(cfg: ModelConfig, tc: TrainConfig, batch: int, warmup: int, repeats: int,
             backend: str = "inductor") -> dict[str, Any]:
    """Steps/s and tokens/s of the eager and the compiled model (the trainer's regional compilation: each
    block compiled, one graph for every call of the recursion). The first compiled step — compilation, or
    loading it from the inductor cache — is timed apart; the medians are of steady-state steps. An eager step
    is also profiled once: the share of its time in matmul and attention kernels, which compiling leaves as they
    are, bounds what torch.compile can gain (Amdahl: 1 / share if everything else took no time)."""
    torch.manual_seed(0)
    eager = RecursiveMoE(cfg).train()
    compiled = copy.deepcopy(eager)
    compile_blocks(compiled, backend)
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
    out["eager_matmul_share"] = matmul_share(steps["eager"])
    return out


# -----------------------------------------------------------------------------
# MoE dispatch: dense (every expert on every token) vs sparse (each expert on its own tokens)

DISPATCH_MODES = ("dense", "sparse")  # ModelConfig.moe_dispatch's implementations ("auto" picks one of them)
DISPATCH_PATHS = ("eager", "ort", "ort_int8", "train_eager", "train_compiled")  # the timings of each mode


class MoELayer(torch.nn.Module):
    """The MoE feed-forward layer's inference function x [B, T, D] -> y, as a module the exporter can trace."""

    def __init__(self, ffn: MoEFeedForward) -> None:
        super().__init__()
        self.ffn = ffn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.ffn(x, False)[0]


def layer_sessions(ffn: MoEFeedForward, path: Path, max_seq: int, threads: int | None) -> dict[str, Any]:
    """{"ort": fp32, "ort_int8": int8} ONNX Runtime CPU sessions (the serving options) of `ffn` exported alone
    to `path` by the dynamo exporter (dynamic batch and sequence axes, as `moe export` makes the model's graph),
    int8 being export's conversion of it (convert_precision) beside it."""
    import onnxruntime as ort

    from moe_core.runtime.ort_session import session_options

    export_layer(ffn, path, max_seq)
    int8 = path.with_name(f"{path.stem}-int8.onnx")
    shutil.copyfile(path, int8)
    convert_precision(str(int8), "int8", {})
    return {name: ort.InferenceSession(str(p), sess_options=session_options(threads),
                                       providers=["CPUExecutionProvider"]) for name, p in (("ort", path),
                                                                                           ("ort_int8", int8))}


def export_layer(ffn: MoEFeedForward, path: Path, max_seq: int) -> None:
    x = torch.randn(2, min(max_seq, 8), ffn.router.in_features)
    dims = {0: torch.export.Dim("batch", min=1, max=65536), 1: torch.export.Dim("seq", min=1, max=max(max_seq, 2))}
    registration_log = logging.getLogger("torch.onnx._internal.exporter._registration")  # "torchvision is not ..."
    level = registration_log.level
    registration_log.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")  # the exporter's own deprecation noise, silenced as `moe export` does
            program = torch.onnx.export(MoELayer(ffn).eval(), (x,), dynamo=True, input_names=["x"],
                                        output_names=["y"], dynamic_shapes={"x": dims}, optimize=False, verbose=False)
    finally:
        registration_log.setLevel(level)
    assert program is not None  # the dynamo exporter returns its ONNXProgram
    program.save(str(path))


def moe_layer(cfg: ModelConfig) -> MoEFeedForward:
    """The MoE layer of a model of `cfg` (its first block's), initialised as the model initialises it."""
    return cast(MoEFeedForward, RecursiveMoE(cfg).net.blocks[0].ffn)  # ModuleList types its blocks as Module


def layer_inference(ffn: MoEFeedForward, x: torch.Tensor) -> Callable[[], torch.Tensor]:
    """An inference forward of the MoE layer `ffn` on `x`: its output (what MoELayer exports)."""
    return lambda: ffn(x, False)[0]


def moe_layer_train_step(ffn: MoEFeedForward, xs: list[torch.Tensor]) -> Callable[[], torch.Tensor]:
    """A training forward + backward of the MoE layer `ffn` (output and aux losses), cycling over the inputs `xs`
    (tensors that require grad) so that routing changes from call to call; returns the input's gradient."""
    inputs = itertools.cycle(xs)

    def step() -> torch.Tensor:
        xi = next(inputs)
        xi.grad = None
        ffn.zero_grad(set_to_none=True)
        y, aux = ffn(xi, True)
        (y.square().mean() + sum(aux.losses.values())).backward()
        assert xi.grad is not None  # xi requires grad: backward gave it one
        return xi.grad

    return step


def dispatch_setting(cfg: ModelConfig, batch: int, seq: int, warmup: int, repeats: int, backend: str,
                     threads: int | None, tmp: Path) -> dict[str, Any]:
    """Every dispatch mode of the MoE layer of `cfg`, with the same weights and inputs, on five paths:
    inference forward in eager PyTorch and in ONNX Runtime fp32 and int8, and a training forward + backward
    (output and aux losses) eager and torch.compile'd (the layer compiled as the trainer compiles a block). Each
    path is timed in its own interleaved loop (ORT's spinning threads slowed the eager calls interleaved with
    them); the training paths cycle over three inputs so that routing changes from call to call, and the compiled
    one counts the graphs dynamo compiled after the first call (a recompile per routing would show here)."""
    from torch._dynamo.utils import counters

    layers: dict[str, MoEFeedForward] = {}
    state = None
    for mode in DISPATCH_MODES:
        torch.manual_seed(0)
        ffn = moe_layer(dataclasses.replace(cfg, moe_dispatch=mode))
        if state is None:
            state = ffn.state_dict()  # initialised as the model initialises it
        else:
            ffn.load_state_dict(state)
        layers[mode] = ffn
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, seq, cfg.d_model, generator=g)
    xs = [torch.randn(batch, seq, cfg.d_model, generator=g, requires_grad=True) for _ in range(3)]

    def layer_step(ffn: MoEFeedForward) -> Callable[[], torch.Tensor]:
        return moe_layer_train_step(ffn, xs)

    def ort_call(session: Any) -> Callable[[], torch.Tensor]:
        return lambda: torch.from_numpy(session.run(None, {"x": xn})[0])

    timings: dict[str, dict[str, Any]] = {}
    with torch.inference_mode():
        timings["eager"] = measure({m: layer_inference(f, x) for m, f in layers.items()}, warmup, repeats)
    sessions = {m: layer_sessions(f, tmp / f"moe-{m}.onnx", seq, threads) for m, f in layers.items()}
    xn = x.numpy()
    for path in ("ort", "ort_int8"):
        timings[path] = measure({m: ort_call(s[path]) for m, s in sessions.items()}, warmup, repeats)
    timings["train_eager"] = measure({m: layer_step(f) for m, f in layers.items()}, warmup, repeats)
    compiled, first = {}, {}
    for m, f in layers.items():
        c = copy.deepcopy(f)
        c.compile(backend=backend)
        compiled[m] = layer_step(c)
        t0 = time.perf_counter()
        compiled[m]()
        first[m] = time.perf_counter() - t0
    graphs_before = counters["stats"]["unique_graphs"]
    timings["train_compiled"] = measure(compiled, warmup, repeats)
    out: dict[str, Any] = {"n_experts": cfg.n_experts, "top_k": cfg.top_k, "modes": list(layers),
                           "auto": resolve_moe_dispatch(dataclasses.replace(cfg, moe_dispatch="auto")),
                           "recompiles_after_first_call": counters["stats"]["unique_graphs"] - graphs_before}
    for path, ts in timings.items():
        dense = ts["dense"]
        out[path] = {m: {**t.to_dict(), "tokens_per_s": batch * seq / t.median, "vs_dense": dense.median / t.median,
                         "max_abs_diff": float((t.output - dense.output).abs().max())} for m, t in ts.items()}
    for m, t in first.items():
        out["train_compiled"][m]["first_call_s"] = t
    return out


def moe_dispatch(cfg: ModelConfig, batch: int, seq: int, warmup: int, repeats: int,
                 settings: tuple[tuple[int, int], ...] = ((4, 2), (8, 2), (8, 1)), backend: str = "inductor",
                 threads: int | None = None) -> dict[str, Any]:
    """The MoE layer alone at each (n_experts, top_k) of `settings` (dispatch_setting). The headline ratio is
    sparse / dense at 8 experts top-2 on the slowest of the paths for sparse (it must win on all of them)."""
    with tempfile.TemporaryDirectory() as tmp:
        rows = [dispatch_setting(dataclasses.replace(cfg, n_experts=e, top_k=k), batch, seq, warmup, repeats,
                                 backend, threads, Path(tmp)) for e, k in settings]
    out: dict[str, Any] = {"batch": batch, "seq": seq, "backend": backend, "paths": list(DISPATCH_PATHS),
                           "settings": rows, "sparse_vs_dense": None, "headline": None}
    head = next((r for r in rows if (r["n_experts"], r["top_k"]) == (8, 2)), None)
    if head is not None:
        worst = min(DISPATCH_PATHS, key=lambda p: head[p]["sparse"]["vs_dense"])
        out["sparse_vs_dense"], out["headline"] = head[worst]["sparse"]["vs_dense"], f"8 experts top-2, {worst}"
    return out
