"""The training loop: data, model, AdamW with parameter groups, warmup + cosine LR, clipping, evaluation,
metrics and the run directory of DESIGN.md section 2."""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import statistics
import time
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from tqdm import tqdm

from moe_core.checkpoint import (
    CONFIG_FILE,
    TOKENIZER_FILE,
    WEIGHTS_FILE,
    atomic_write,
    atomic_write_text,
    save_run,
    save_weights,
)
from moe_core.errors import MoeError
from moe_core.model import RecursiveMoE

from . import data as D
from .config import RunConfig
from .loss import per_sample_nll, training_loss
from .plots import write_plots
from .schedule import lr_multiplier, warmup_steps

METRICS_FILE = "metrics.jsonl"
STATE_DIR = "trainer_state"


def select_device(requested: str) -> torch.device:
    if requested == "cuda" and not torch.cuda.is_available():
        raise MoeError("train.device: 'cuda' requested but no CUDA device is available (use auto or cpu)")
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(requested)


def check_run_dir(out: Path, overwrite: bool) -> None:
    """Refuse an output that is a file or holds something (unless overwrite) — before any work is done."""
    if out.exists() and not out.is_dir():
        raise MoeError(f"{out}: exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise MoeError(f"{out}: directory exists and is not empty (pass --overwrite to replace the run)")


def prepare_run_dir(out: Path) -> None:
    """Create `out` (clearing a previous run's files from it); fail with the path if it is not writable."""
    if out.is_dir():
        for name in (CONFIG_FILE, WEIGHTS_FILE, TOKENIZER_FILE, METRICS_FILE):
            (out / name).unlink(missing_ok=True)
        shutil.rmtree(out / STATE_DIR, ignore_errors=True)
        shutil.rmtree(out / "plots", ignore_errors=True)
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".write-test"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise MoeError(f"{out}: output directory is not writable ({e.strerror or e})") from None


def build_optimizer(model: RecursiveMoE, cfg: RunConfig) -> torch.optim.AdamW:
    tc = cfg.train
    groups = model.param_groups()
    spec = [  # (name, weight decay, LR multiplier)
        ("decay", tc.weight_decay, 1.0),
        ("no_decay", 0.0, 1.0),
        ("router", 0.0, tc.router_lr_mult),
    ]
    param_groups = [{"params": groups[name], "name": name, "weight_decay": wd, "lr_mult": mult, "lr": tc.lr * mult}
                    for name, wd, mult in spec if groups[name]]
    return torch.optim.AdamW(param_groups, lr=tc.lr, betas=(tc.beta1, tc.beta2),
                             fused=None if any(p.is_cuda for p in model.parameters()) else False)


class MetricsLog:
    """metrics.jsonl: one JSON object per line, flushed as written so a killed run keeps what it logged."""

    def __init__(self, path: Path) -> None:
        self.path = path
        atomic_write_text(path, "")

    def write(self, record: dict[str, Any]) -> None:
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
            f.flush()
            os.fsync(f.fileno())


def to_record(values: dict[str, torch.Tensor]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in values.items():
        v = v.detach().float().cpu()
        out[k] = round(v.item(), 6) if v.numel() == 1 else [round(x, 6) for x in v.tolist()]
    return out


def routing_summary(stats: dict[str, Any], n_layers: int) -> str:
    """One console line per mechanism, e.g. `MoH L1: 2.80h@0.55θ | Complexity 0.59 [0.50-0.68] | PredNorm 2.2`."""
    layers = [f"L{i + 1}" for i in range(n_layers)]
    if f"{layers[0]}.moh_heads" not in stats:
        return ""
    moh = " | ".join(f"{L}: {stats[f'{L}.moh_heads']:.2f}h@{stats[f'{L}.moh_threshold']:.2f}θ" for L in layers)
    cx = [stats[f"{L}.moh_complexity"] for L in layers]
    cx_lo = min(stats[f"{L}.moh_complexity_min"] for L in layers)
    cx_hi = max(stats[f"{L}.moh_complexity_max"] for L in layers)
    pred = statistics.fmean(stats[f"{L}.moh_pred_norm"] for L in layers)
    loads = " | ".join(f"{L}: " + " ".join(f"{x:.2f}" for x in stats[f"{L}.moe_load"]) for L in layers)
    return (f"MoH {moh} | Complexity {statistics.fmean(cx):.2f} [{cx_lo:.2f}-{cx_hi:.2f}] | PredNorm {pred:.2f}\n"
            f"MoE load {loads}")


@torch.no_grad()
def evaluate(model: RecursiveMoE, batches: list[tuple[torch.Tensor, torch.Tensor]], device: torch.device,
             autocast: contextlib.AbstractContextManager) -> dict[str, float]:
    """Val loss of the eval-mode model: the halting-selected logits, exactly what export and serve compute."""
    was_training = model.training
    model.eval()
    nll_sum, n_tokens, halt_sum, n_samples = 0.0, 0, 0.0, 0
    for x, y in batches:
        x, y = x.to(device), y.to(device)
        with autocast:
            out = model(x)
        nll_sum += per_sample_nll(out.logits, y).sum().item() * y.shape[1]
        n_tokens += y.numel()
        halt_sum += out.halt_step.float().sum().item()
        n_samples += y.shape[0]
    model.train(was_training)
    val_loss = nll_sum / n_tokens
    return {"val_loss": val_loss, "val_ppl": math.exp(min(val_loss, 50.0)), "val_halt_step": halt_sum / n_samples}


def save_trainer_state(run_dir: Path, optimizer: torch.optim.Optimizer, step: int) -> None:
    """Optimizer moments, RNG and position as safetensors + JSON (no pickle anywhere)."""
    state_dir = run_dir / STATE_DIR
    state_dir.mkdir(exist_ok=True)
    sd = optimizer.state_dict()
    tensors = {f"{i}.{k}": v.detach().cpu().contiguous() for i, s in sd["state"].items() for k, v in s.items()}
    tensors["rng.torch"] = torch.get_rng_state()
    atomic_write(state_dir / "optimizer.safetensors", lambda tmp: save_file(tensors, tmp))
    groups = [{k: v for k, v in g.items()} for g in sd["param_groups"]]
    atomic_write_text(state_dir / "state.json", json.dumps({"step": step, "param_groups": groups}, indent=1))


def save_checkpoint(run_dir: Path, model: RecursiveMoE, optimizer: torch.optim.Optimizer, step: int) -> None:
    save_weights(model, run_dir / WEIGHTS_FILE)
    save_trainer_state(run_dir, optimizer, step)


def train(cfg: RunConfig, out: str | os.PathLike, overwrite: bool = False) -> dict[str, Any]:
    """Train per `cfg`, writing the run directory `out`. Returns the final figures."""
    mc, tc = cfg.model, cfg.train
    run_dir = Path(out)
    device = select_device(tc.device)
    check_run_dir(run_dir, overwrite)
    torch.manual_seed(tc.seed)

    # -- data and tokenizer --------------------------------------------------------------------------
    t0 = time.perf_counter()
    docs = D.load_documents(tc.data)
    if tc.tokenizer is not None:
        tok = D.load_tokenizer(tc.tokenizer)
        mc.vocab_size = tok.get_vocab_size()  # the model's vocabulary is the tokenizer's
    else:
        tok = D.train_tokenizer(docs, mc.vocab_size)
    data = D.tokenize_corpus(docs, tok, tc.val_fraction, mc.max_seq_len)
    if data.vocab_size > mc.vocab_size:
        raise MoeError(f"tokenizer has {data.vocab_size} tokens but model.vocab_size is {mc.vocab_size}")
    val_batches = D.eval_batches(data.val, tc.batch_size, mc.max_seq_len, tc.eval_batches)
    prepare_run_dir(run_dir)  # only now: bad data leaves no empty run directory behind
    uniform = math.log(mc.vocab_size)
    unigram = D.unigram_baseline(data.train, data.val, mc.vocab_size)
    print(f"data: {len(docs)} documents, {len(data.train):,} train / {len(data.val):,} val tokens, "
          f"tokenizer {data.vocab_size} tokens ({time.perf_counter() - t0:.1f}s)")
    print(f"baselines: uniform ln(V) = {uniform:.3f}, unigram = {unigram:.3f} nats/token")

    # -- model and optimiser ---------------------------------------------------------------------------
    model = RecursiveMoE(mc).to(device)
    save_run(run_dir, model, tok.to_str(pretty=False), {"train": cfg.to_dict()["train"]})  # complete from the start
    n_params = sum(p.numel() for p in model.parameters())
    optimizer = build_optimizer(model, cfg)
    if tc.compile:
        # Regional compilation: every call of the recursion goes through the same blocks, so compiling each
        # block (one shared graph) costs a fraction of tracing the whole unrolled step, for the same kernels.
        for block in model.net.blocks:
            block.compile()
    autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda"
                else contextlib.nullcontext())
    warmup = warmup_steps(tc.max_steps, tc.warmup_frac)
    groups = model.param_groups()
    print(f"model: {n_params / 1e6:.2f}M parameters on {device}, compile={'on' if tc.compile else 'off'}, "
          f"{mc.n_steps} supervision step(s) x {mc.H_cycles}x({mc.L_cycles}+1) net calls"
          if mc.recursive else f"model: {n_params / 1e6:.2f}M parameters on {device} (baseline, no recursion), "
          f"compile={'on' if tc.compile else 'off'}")

    metrics = MetricsLog(run_dir / METRICS_FILE)
    ev = evaluate(model, val_batches, device, autocast)
    metrics.write({"kind": "eval", "step": 0, **ev, "uniform_baseline": uniform, "unigram_baseline": unigram})
    print(f"step 0: val loss {ev['val_loss']:.4f} (ppl {ev['val_ppl']:.1f}) | uniform ln(V) {uniform:.4f} | "
          f"unigram {unigram:.4f}")

    # -- loop ------------------------------------------------------------------------------------------
    tokens_per_step = tc.batch_size * mc.max_seq_len
    batch_gen = torch.Generator()
    grad_norms_after_warmup: list[float] = []
    first_step_s, step_times = 0.0, []
    bar = tqdm(range(tc.max_steps), desc="train", dynamic_ncols=True, mininterval=1.0)
    model.train()
    for step in bar:
        t_step = time.perf_counter()
        mult = lr_multiplier(step, tc.max_steps, warmup, tc.min_lr_ratio)
        for g in optimizer.param_groups:
            g["lr"] = tc.lr * g["lr_mult"] * mult
        batch_gen.manual_seed(tc.seed * 1_000_003 + step)  # the batch is a function of (seed, step): exact resume
        x, y = (t.to(device) for t in D.get_batch(data.train, tc.batch_size, mc.max_seq_len, batch_gen))
        with autocast:
            out = model(x)
            loss, parts = training_loss(out, y, tc.aux_weights, tc.halt_weight)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        last = step == tc.max_steps - 1
        log_step = step % tc.log_every == 0 or last
        if log_step:  # per-group norms (before clipping) only where they are logged: not on the hot path
            group_norms = {f"grad_norm.{name}": _grad_norm(ps) for name, ps in groups.items()}
            group_norms["grad_norm.halt"] = _grad_norm(list(model.halt_head.parameters()))
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), tc.grad_clip if tc.grad_clip > 0 else math.inf)
        optimizer.step()
        dt = time.perf_counter() - t_step
        if step == 0:
            first_step_s = dt
        else:
            step_times.append(dt)
        if step >= warmup:
            grad_norms_after_warmup.append(float(grad_norm))

        if log_step:
            tok_s = tokens_per_step / statistics.median(step_times[-tc.log_every:]) if step_times else 0.0
            rec = {"kind": "train", "step": step + 1, "lr": tc.lr * mult, "grad_norm": float(grad_norm),
                   "tokens_per_s": tok_s, "halt_step_mean": out.halt_step.float().mean().item(),
                   **to_record(parts), **to_record(group_norms), **to_record(out.stats)}
            if not math.isfinite(rec["loss"]):
                raise MoeError(f"step {step + 1}: loss is not finite ({rec['loss']}); lower train.lr or check data")
            metrics.write(rec)
            bar.set_postfix(loss=f"{rec['lm_loss']:.3f}", lr=f"{rec['lr']:.2e}", gnorm=f"{rec['grad_norm']:.2f}",
                            tok_s=f"{tok_s:.0f}", refresh=False)
            if step % (tc.log_every * 5) == 0 or last:
                summary = routing_summary(rec, mc.n_layers)
                if summary:
                    tqdm.write(summary)
        if (step + 1) % tc.eval_every == 0 or last:
            ev = evaluate(model, val_batches, device, autocast)
            metrics.write({"kind": "eval", "step": step + 1, **ev, "uniform_baseline": uniform,
                           "unigram_baseline": unigram})
            tqdm.write(f"step {step + 1}: val loss {ev['val_loss']:.4f} (ppl {ev['val_ppl']:.1f}) | "
                       f"uniform {uniform:.4f} | unigram {unigram:.4f} | halt step {ev['val_halt_step']:.2f}")
            save_checkpoint(run_dir, model, optimizer, step + 1)
    bar.close()

    steady = statistics.median(step_times) if step_times else first_step_s
    result = {
        "val_loss": ev["val_loss"], "val_ppl": ev["val_ppl"], "uniform_baseline": uniform,
        "unigram_baseline": unigram, "steps": tc.max_steps, "params": n_params,
        "median_grad_norm_after_warmup": statistics.median(grad_norms_after_warmup) if grad_norms_after_warmup
        else float("nan"),
        "first_step_s": first_step_s, "step_s": steady, "tokens_per_s": tokens_per_step / steady,
    }
    metrics.write({"kind": "summary", **result})
    write_plots(run_dir)
    print(f"done: val loss {result['val_loss']:.4f} (ppl {result['val_ppl']:.1f}) vs uniform {uniform:.4f} / "
          f"unigram {unigram:.4f} | median grad norm after warmup {result['median_grad_norm_after_warmup']:.2f}")
    print(f"time: first step {first_step_s:.1f}s (includes torch.compile, or loading its cache)" if tc.compile else
          f"time: first step {first_step_s:.1f}s", end="")
    print(f", then {steady * 1000:.0f} ms/step, {result['tokens_per_s']:.0f} tokens/s | run: {run_dir}")
    return result


def _grad_norm(params: list[torch.nn.Parameter]) -> torch.Tensor:
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return torch.zeros(())
    return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))

