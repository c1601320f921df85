"""The training loop: data, model, AdamW with parameter groups, warmup + cosine LR, clipping, evaluation,
metrics and the run directory of DESIGN.md section 2."""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import signal
import statistics
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from moe_core.checkpoint import CONFIG_FILE, TOKENIZER_FILE, WEIGHTS_FILE, atomic_write_text, save_run
from moe_core.errors import CheckpointError, ConfigError, MoeError, os_reason
from moe_core.model import ModelOutput, RecursiveMoE
from moe_core.tokenizer import read_tokenizer

from .checkpointing import (
    STATE_DIR,
    LoopState,
    checkpoint_sets,
    clean_partial_sets,
    load_checkpoint,
    read_metrics_until,
    save_checkpoint,
    saved_config,
)
from .config import RunConfig, parse_override, seed_for, with_absolute_paths
from .distributed import SINGLE, Dist, autocast_for, full_tensor, init_from_env, parallelize, shutdown
from .plots import write_plots
from .rundir_lock import LOCK_FILE, RunDirLock, check_not_in_use
from .schedule import lr_multiplier, warmup_steps
from .tasks import Task, evaluate, make_task  # noqa: F401 - evaluate: part of this module's API

METRICS_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"


def check_run_dir(out: Path, overwrite: bool) -> None:
    """Refuse an output that is a file, that another moe process is writing, or that holds something (unless
    overwrite) — before any work is done, and changing nothing."""
    if out.exists() and not out.is_dir():
        raise MoeError(f"{out}: exists and is not a directory")
    if out.is_dir():
        check_not_in_use(out)
        _check_empty(out, overwrite)


def _check_empty(out: Path, overwrite: bool) -> None:
    if not overwrite and any(p.name != LOCK_FILE for p in out.iterdir()):  # a lock file alone is no run
        raise MoeError(f"{out}: directory exists and is not empty (pass --overwrite to replace the run)")


def claim_run_dir(out: Path, overwrite: bool, lock: RunDirLock) -> None:
    """Create `out` if needed and take its lock; then, holding it, refuse `out` again if it filled up since
    check_run_dir (another process wrote a run there meanwhile)."""
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise MoeError(f"{out}: cannot create the output directory ({os_reason(e)})") from None
    lock.acquire()
    _check_empty(out, overwrite)


def prepare_run_dir(out: Path, overwrite: bool, lock: RunDirLock) -> None:
    """Create and lock `out`, clear a previous run's files from it; fail with the path if it is not writable."""
    claim_run_dir(out, overwrite, lock)
    for name in (CONFIG_FILE, WEIGHTS_FILE, TOKENIZER_FILE, METRICS_FILE):
        (out / name).unlink(missing_ok=True)
    shutil.rmtree(out / STATE_DIR, ignore_errors=True)
    shutil.rmtree(out / "plots", ignore_errors=True)
    shutil.rmtree(out / TENSORBOARD_DIR, ignore_errors=True)
    try:
        probe = out / ".write-test"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise MoeError(f"{out}: output directory is not writable ({e.strerror or e})") from None


def lock_on_rank0(lock: RunDirLock, dist: Dist, device: torch.device) -> None:
    """Rank 0 takes the run directory's lock (it is the one that writes the directory's files); if it cannot,
    every rank stops, rank 0 with the reason and the others pointing at it."""
    error = None
    if dist.is_main:
        try:
            lock.acquire()
        except MoeError as e:
            error = e
    if dist.any(error is not None, device):
        if error is not None:
            raise error
        raise MoeError(f"rank {dist.rank}: stopping, rank 0 could not lock {lock.run_dir} (its error is above)")


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


def compile_blocks(model: RecursiveMoE, backend: str = "inductor") -> None:
    """`moe train --compile`: regional compilation. Every call of the recursion goes through the same blocks, so
    compiling each block (one shared graph) costs a fraction of tracing the whole unrolled step, for the same
    kernels."""
    for block in model.net.blocks:
        block.compile(backend=backend)


@dataclass
class StepResult:
    out: ModelOutput  # the forward pass's output (its stats are logged)
    parts: dict[str, torch.Tensor]  # the loss's parts, detached
    grad_norm: float  # the global gradient norm before clipping
    loss_value: float
    updated: bool  # False: `decide` said no, the optimizer did not step (the gradients are left as they are)


def finite(loss_value: float, grad_norm: float) -> bool:
    return math.isfinite(loss_value) and math.isfinite(grad_norm)


def train_step(forward: Callable[[torch.Tensor], ModelOutput], optimizer: torch.optim.Optimizer,
               loss_fn: Callable[[ModelOutput, torch.Tensor], tuple[torch.Tensor, dict[str, torch.Tensor]]],
               x: torch.Tensor, y: torch.Tensor, params: list[torch.nn.Parameter], grad_clip: float,
               autocast: contextlib.AbstractContextManager | None = None,
               decide: Callable[[float, float], bool] = finite) -> StepResult:
    """One optimizer step as `moe train` takes it: forward and loss (under `autocast`), backward, the global
    gradient norm, then — when `decide(loss, grad norm)` agrees (by default: both finite) — clipping to
    `grad_clip` (0: none) and the optimizer step. `params` are the model's parameters (the norm's); the
    learning rate is the caller's to set."""
    with autocast or contextlib.nullcontext():
        out = forward(x)
        loss, parts = loss_fn(out, y)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    total_norm = _grad_norm(params)  # FSDP: the global norm of the DTensor pieces, as a plain tensor
    grad_norm, loss_value = float(total_norm), float(parts["loss"])
    updated = decide(loss_value, grad_norm)
    if updated:
        if grad_clip > 0:
            torch.nn.utils.clip_grads_with_norm_(params, grad_clip, total_norm)
        optimizer.step()
    return StepResult(out, parts, grad_norm, loss_value, updated)


class MetricsLog:
    """metrics.jsonl: one JSON object per line, flushed as written so a killed run keeps what it logged.

    A resumed run keeps the records up to its checkpoint's step (dropping a torn last line and whatever the
    killed run logged after the checkpoint), so the file reads as if the run had never stopped.
    """

    def __init__(self, path: Path, keep_until: int | None = None, files: bool = True) -> None:
        self.path, self.files = path, files  # files=False on ranks other than 0: track, write nothing
        lines = read_metrics_until(path, keep_until)[0] if keep_until is not None and files else []
        records = [json.loads(line) for line in lines]
        self.eval_steps = {r["step"] for r in records if r.get("kind") == "eval"}
        self.last_eval = next((r for r in reversed(records) if r.get("kind") == "eval"), None)
        self.tensorboard = None
        if files:
            atomic_write_text(path, "".join(line + "\n" for line in lines))
            self.tensorboard = _tensorboard_writer(path.parent / TENSORBOARD_DIR, purge_step=(keep_until or 0) + 1)

    def has_eval_at(self, step: int) -> bool:
        return step in self.eval_steps

    def write(self, record: dict[str, Any]) -> None:
        if self.files:
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(json.dumps(record) + "\n")
                f.flush()
                os.fsync(f.fileno())
        if record.get("kind") == "eval":
            self.eval_steps.add(record["step"])
            self.last_eval = record
        if self.tensorboard is not None and record.get("kind") in ("train", "eval"):
            for key, value in record.items():
                values = value if isinstance(value, list) else [value]
                for i, v in enumerate(values):
                    if isinstance(v, (int, float)) and key != "step":
                        name = f"{record['kind']}/{key}" + (f"/{i}" if isinstance(value, list) else "")
                        self.tensorboard.add_scalar(name, v, record["step"])
            self.tensorboard.flush()

    def close(self) -> None:
        if self.tensorboard is not None:
            self.tensorboard.close()


def _tensorboard_writer(log_dir: Path, purge_step: int) -> Any:
    """A SummaryWriter when the optional `tensorboard` package is installed (pip install 'moe[tensorboard]').

    On resume, purge_step drops the events a killed run logged after its checkpoint, as metrics.jsonl does.
    """
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        return None
    return SummaryWriter(str(log_dir), purge_step=purge_step)


def to_record(values: dict[str, torch.Tensor]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in values.items():
        v = v.detach().float().cpu()
        out[k] = round(v.item(), 6) if v.dim() == 0 else [round(x, 6) for x in v.reshape(-1).tolist()]
    return out


def routing_summary(stats: dict[str, Any], n_layers: int) -> str:
    """One console line per mechanism, e.g.
    `MoH L1: 2.80h@0.55θ | Complexity 0.59 [0.50-0.68] | PredNorm 2.2 | grad router 1.2e-03 predictor 4.0e-04`
    `MoE L1: load 0.31 0.22 0.25 0.22 CV 0.14 dropped 0`
    `Halt steps 1:12% 2:30% 3:58% | mean 2.46 | head acc 0.81 | grad 2.1e-02`"""
    layers = [f"L{i + 1}" for i in range(n_layers)]
    if f"{layers[0]}.moh_heads" not in stats:
        return ""
    moh = " | ".join(f"{L}: {stats[f'{L}.moh_heads']:.2f}h@{stats[f'{L}.moh_threshold']:.2f}θ" for L in layers)
    cx = [stats[f"{L}.moh_complexity"] for L in layers]
    cx_lo = min(stats[f"{L}.moh_complexity_min"] for L in layers)
    cx_hi = max(stats[f"{L}.moh_complexity_max"] for L in layers)
    pred = statistics.fmean(stats[f"{L}.moh_pred_norm"] for L in layers)
    grads = " ".join(f"{g} {stats[f'grad_norm.{g}']:.1e}" for g in ("router", "predictor") if f"grad_norm.{g}" in stats)
    moe = " | ".join(f"{L}: load " + " ".join(f"{x:.2f}" for x in stats[f"{L}.moe_load"])
                     + f" CV {stats.get(f'{L}.moe_load_cv', float('nan')):.2f}"
                     + f" dropped {stats.get(f'{L}.moe_dropped', 0):g}" for L in layers)
    lines = [f"MoH {moh} | Complexity {statistics.fmean(cx):.2f} [{cx_lo:.2f}-{cx_hi:.2f}] | PredNorm {pred:.2f}"
             + (f" | grad {grads}" if grads else ""), f"MoE {moe}"]
    hist = stats.get("halt_hist")
    if isinstance(hist, list) and len(hist) > 1 and sum(hist):
        shares = " ".join(f"{i + 1}:{100 * c / sum(hist):.0f}%" for i, c in enumerate(hist))
        lines.append(f"Halt steps {shares} | mean {stats['halt_step_mean']:.2f}"
                     + (f" | head acc {stats['halt_acc']:.2f}" if "halt_acc" in stats else "")
                     + (f" | grad {stats['grad_norm.halt']:.1e}" if "grad_norm.halt" in stats else ""))
    return "\n".join(lines)


class TrainingInterrupted(Exception):
    """SIGINT/SIGTERM arrived: the loop saved a checkpoint at `step` and stopped."""

    def __init__(self, signum: int, step: int, run_dir: Path) -> None:
        super().__init__(f"interrupted by {signal.Signals(signum).name} at step {step}: checkpoint saved; "
                         f"continue with: moe train --resume {run_dir}")
        self.signum = signum


class StopSignals:
    """Turn the first SIGINT/SIGTERM into a flag the loop checks between steps (a second one acts as usual)."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self) -> None:
        self.received: int | None = None
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame: Any) -> None:
        self.received = signum
        for s, h in self._previous.items():  # the next signal interrupts at once
            signal.signal(s, h)

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            self._previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}
        return self

    def __exit__(self, *exc: object) -> None:
        for s, h in self._previous.items():
            signal.signal(s, h)


# Settings a resumed run may change: they do not alter what a step computes (max_steps does change the LR
# schedule's length; that is the way to extend a finished run, and a different run from then on).
RESUMABLE = ("max_steps", "eval_every", "log_every", "checkpoint_every", "keep_checkpoints", "max_bad_steps",
             "compile", "device")


def train(cfg: RunConfig, out: str | os.PathLike, overwrite: bool = False) -> dict[str, Any]:
    """Train per `cfg`, writing the run directory `out`. Returns the final figures (on rank 0; {} elsewhere).

    Under torchrun, rank 0 checks the output, trains the tokenizer and writes the run directory; the other ranks
    get the tokenizer from it, so every rank tokenizes the same way.
    """
    run_dir = Path(out)
    cfg = with_absolute_paths(cfg)
    dist, device = init_from_env(cfg.train.device)
    lock = RunDirLock(run_dir)  # taken by rank 0 before its first write, held until the run ends
    try:
        dist.shard(cfg.train.batch_size)  # a global batch the ranks cannot split evenly fails before any work
        tok_text = None
        if dist.is_main:
            try:
                check_run_dir(run_dir, overwrite)
                task = make_task(cfg, None, dist.log)
                created = not run_dir.exists()
                prepare_run_dir(run_dir, overwrite, lock)  # only now: bad data leaves no empty run directory
                tok_text = task.tokenizer_json
            finally:
                tok_text = dist.broadcast_text(tok_text, device)  # None (rank 0 failed) stops the other ranks
        else:
            task = make_task(cfg, dist.broadcast_text(None, device), dist.log, new_run=True)
        model = _seeded_model(cfg, device, dist)
        if dist.is_main:
            try:
                save_run(run_dir, model, tok_text, {"train": cfg.to_dict()["train"]})  # complete from the start
            except BaseException:
                if created:  # a run that never saved leaves nothing a later command could mistake for a run
                    shutil.rmtree(run_dir, ignore_errors=True)
                raise
        return Trainer(cfg, run_dir, device, task, model, dist).run(LoopState(data_fingerprint=task.fingerprint))
    finally:
        lock.release()
        shutdown(dist)


def resume(run_dir: str | os.PathLike, overrides: list[str] = ()) -> dict[str, Any]:
    """Continue the run in `run_dir` from its newest checkpoint, exactly as if it had never stopped."""
    run_dir = Path(run_dir)
    saved, sections = saved_config(run_dir)
    config_path = run_dir / CONFIG_FILE
    for item in overrides:
        section, key, value = parse_override(item)
        if section != "train" or key not in RESUMABLE:
            raise ConfigError(f"--set {item!r}: {section}.{key} cannot change when resuming (the run would not "
                              f"continue the same way); allowed: {', '.join(RESUMABLE)}")
        sections["train"][key] = value
    cfg = RunConfig.from_dict(sections, str(config_path))
    dist, device = init_from_env(cfg.train.device)  # every rank reads the run directory (a shared filesystem)
    lock = RunDirLock(run_dir)
    try:
        lock_on_rank0(lock, dist, device)  # before anything in the directory is tidied or rewritten
        tok_text, _ = read_tokenizer(run_dir / TOKENIZER_FILE, cfg.model.vocab_size)
        task = make_task(cfg, tok_text, dist.log)
        sets = checkpoint_sets(run_dir)
        dist.barrier()  # every rank has listed the sets before rank 0 tidies up
        if dist.is_main:
            clean_partial_sets(run_dir)
        model = _seeded_model(cfg, device, dist)
        trainer = Trainer(cfg, run_dir, device, task, model, dist)
        if sets:
            state = load_checkpoint(sets[-1][1], model, trainer.optimizer, dist.rank, dist.world)
            dist.log(f"resume: {sets[-1][1]} (step {state.step})")
        else:  # killed before the first checkpoint: the seeded start is the checkpoint
            state = LoopState()
            dist.log("resume: no checkpoint yet, starting again from step 0 with the run's seed")
        if state.data_fingerprint and state.data_fingerprint != task.fingerprint:
            raise CheckpointError(f"{run_dir}: the training data differs from the data this run was trained on "
                                  f"(train.data = {cfg.train.data!r}); resume needs the same data")
        state.data_fingerprint = task.fingerprint
        if dist.is_main:
            atomic_write_text(config_path, json.dumps({**saved, "train": cfg.to_dict()["train"]}, indent=2) + "\n")
        return trainer.run(state, resumed=True)
    finally:
        lock.release()
        shutdown(dist)


def _seeded_model(cfg: RunConfig, device: torch.device, dist: Dist) -> RecursiveMoE:
    """The model as seeded by train.seed: identical on every rank. Ranks then draw different dropout masks."""
    torch.manual_seed(cfg.train.seed)
    model = RecursiveMoE(cfg.model).to(device)
    if dist.enabled:
        torch.manual_seed(seed_for(cfg.train.seed, 1_000_003 * dist.rank))
    return model


class Trainer:
    """The loop of one run: steps, logging, evaluation, checkpoints, numerical guards, signals."""

    def __init__(self, cfg: RunConfig, run_dir: Path, device: torch.device, task: Task, model: RecursiveMoE,
                 dist: Dist = SINGLE) -> None:
        mc, tc = cfg.model, cfg.train
        self.cfg, self.run_dir, self.device, self.task, self.model = cfg, run_dir, device, task, model
        self.dist, self.log = dist, dist.log
        if tc.compile:
            compile_blocks(model)
        # Under torchrun: DDP averages the gradients over ranks during backward (the baseline never uses the halt
        # head or the initial carry, so DDP must look for unused parameters there; the recursive model uses every
        # one), or FSDP shards the model in place. Before the optimizer and the groups: FSDP replaces parameters.
        self.forward = parallelize(model, dist, device, tc.parallel, find_unused=not mc.recursive)
        self.optimizer = build_optimizer(model, cfg)
        self.params = list(model.parameters())
        # Gradient norms are logged per group, so "does gradient reach the router" is a number, not a guess.
        named = dict(model.named_parameters())
        predictor = [p for n, p in named.items() if "complexity_head" in n or "threshold_head" in n]
        self.groups = {**model.param_groups(), "halt": list(model.halt_head.parameters())}
        self.groups["router"] = [p for p in self.groups["router"] if not any(p is q for q in predictor)]
        self.groups["predictor"] = predictor
        self.autocast = autocast_for(device)
        self.warmup = warmup_steps(tc.max_steps, tc.warmup_frac)

    def run(self, state: LoopState, resumed: bool = False) -> dict[str, Any]:
        mc, tc = self.cfg.model, self.cfg.train
        self.start_step, self.first_step_s, self.step_times = state.step, 0.0, []
        n_params = sum(p.numel() for p in self.model.parameters())
        compiled = f"compile={'on' if tc.compile else 'off'}"
        self.log(f"model: {n_params / 1e6:.2f}M parameters on {self.device}, {compiled}, {mc.n_steps} supervision "
              f"step(s) x {mc.H_cycles}x({mc.L_cycles}+1) net calls" if mc.recursive else
              f"model: {n_params / 1e6:.2f}M parameters on {self.device} (baseline, no recursion), {compiled}")
        self.metrics = MetricsLog(self.run_dir / METRICS_FILE, keep_until=state.step if resumed else None,
                                  files=self.dist.is_main)
        if state.step == 0 and not self.metrics.has_eval_at(0):
            self._evaluate(0)
        if state.step >= tc.max_steps:
            self.log(f"run is complete at step {state.step} (raise train.max_steps with --set to train further)")
        else:
            self._loop(state)

        self.dist.barrier()  # rank 0 has written the last checkpoint before any rank exits
        if not self.dist.is_main:
            return {}
        ev = self.metrics.last_eval
        steady = statistics.median(self.step_times) if self.step_times else self.first_step_s
        result = {
            **{k: v for k, v in ev.items() if k not in ("kind", "step")}, "steps": state.step,
            "skipped_steps": state.skipped_steps, "params": n_params,
            "median_grad_norm_after_warmup": statistics.median(state.grad_norms) if state.grad_norms else math.nan,
            "first_step_s": self.first_step_s, "step_s": steady,
            "tokens_per_s": tc.batch_size * mc.max_seq_len / steady if steady else 0.0,
        }
        self.metrics.write({"kind": "summary", **result})
        self.metrics.close()
        write_plots(self.run_dir)
        print(f"done: {self.task.describe(ev)} | median grad norm after warmup "
              f"{result['median_grad_norm_after_warmup']:.2f}")
        if self.step_times or self.first_step_s:
            first = f"first step {self.first_step_s:.1f}s"
            print(f"time: {first} (includes torch.compile, or loading its cache)" if tc.compile else f"time: {first}",
                  end="")
            print(f", then {steady * 1000:.0f} ms/step, {result['tokens_per_s']:.0f} tokens/s | run: {self.run_dir}")
        return result

    def _loop(self, state: LoopState) -> None:
        mc, tc = self.cfg.model, self.cfg.train
        model, optimizer, dist = self.model, self.optimizer, self.dist
        tokens_per_step = tc.batch_size * mc.max_seq_len  # the global batch
        rows = dist.shard(tc.batch_size)
        bar = tqdm(range(state.step, tc.max_steps), desc="train", dynamic_ncols=True, mininterval=1.0,
                   initial=state.step, total=tc.max_steps, disable=True if not dist.is_main else None)
        model.train()
        group_norms: dict[str, torch.Tensor] = {}
        log_step = stop = False

        def decide(loss_value: float, grad_norm: float) -> bool:
            """Between backward and the update: the group norms a log step records, and the skip and stop decisions,
            which every rank takes together (the gradients are already the same on all ranks)."""
            nonlocal stop, group_norms
            if log_step:  # per-group norms (before clipping) only where they are logged: not on the hot path
                group_norms = {f"grad_norm.{name}": _grad_norm(ps) for name, ps in self.groups.items()}
            bad, stop = dist.flags([not finite(loss_value, grad_norm), signals.received is not None], self.device)
            return not bad

        with StopSignals() as signals:
            for step in bar:
                t_step = time.perf_counter()
                mult = lr_multiplier(step, tc.max_steps, self.warmup, tc.min_lr_ratio)
                for g in optimizer.param_groups:
                    g["lr"] = tc.lr * g["lr_mult"] * mult
                x, y = (t.to(self.device) for t in self.task.batch(step, rows))  # this rank's rows of the batch
                last = step == tc.max_steps - 1
                log_step = step % tc.log_every == 0 or last
                state.step = step + 1
                r = train_step(self.forward, optimizer, self.task.loss, x, y, self.params, tc.grad_clip,
                               self.autocast, decide)
                out, parts, grad_norm = r.out, r.parts, r.grad_norm
                if r.updated:
                    state.bad_in_a_row = 0
                    if step >= self.warmup:
                        state.grad_norms.append(grad_norm)
                else:
                    self._skip(state, r.loss_value)
                dt = time.perf_counter() - t_step
                if step == self.start_step:
                    self.first_step_s = dt
                else:
                    self.step_times.append(dt)

                if log_step:
                    recent = self.step_times[-tc.log_every:]
                    tok_s = tokens_per_step / statistics.median(recent) if recent else 0.0
                    stats = dist.reduce_stats({  # over all ranks' samples
                        **parts, **out.stats, "halt_step_mean": out.halt_step.float().mean(),
                        "halt_hist": torch.bincount(out.halt_step - 1, minlength=mc.n_steps)})
                    rec = {"kind": "train", "step": step + 1, "lr": tc.lr * mult, "grad_norm": grad_norm,
                           "tokens_per_s": tok_s, "skipped_steps": state.skipped_steps,
                           **to_record(stats), **to_record(group_norms)}
                    rec["halt_hist"] = [int(c) for c in rec["halt_hist"]]
                    self.metrics.write(rec)
                    bar.set_postfix(loss=f"{rec['lm_loss']:.3f}", lr=f"{rec['lr']:.2e}", gnorm=f"{grad_norm:.2f}",
                                    tok_s=f"{tok_s:.0f}", refresh=False)
                    if step % (tc.log_every * 5) == 0 or last:
                        summary = routing_summary(rec, mc.n_layers)
                        if summary:
                            self.log(summary)
                if state.step % tc.eval_every == 0 or last:
                    self._evaluate(state.step)
                if state.step % tc.checkpoint_every == 0 or last or stop:
                    self._checkpoint(state)
                if stop:
                    bar.close()
                    dist.barrier()  # the checkpoint is complete before any rank exits
                    raise TrainingInterrupted(signals.received or signal.SIGTERM, state.step, self.run_dir)
        bar.close()

    def _checkpoint(self, state: LoopState) -> None:
        rng = {f"rng.cpu.{r}": s for r, s in enumerate(self.dist.gather(torch.get_rng_state(), self.device))}
        if self.device.type == "cuda":
            states = self.dist.gather(torch.cuda.get_rng_state(self.device), self.device)
            rng.update({f"rng.cuda.{r}": s for r, s in enumerate(states)})
        save_checkpoint(self.run_dir, self.model, self.optimizer, state, self.cfg.train.keep_checkpoints, rng,
                        self.dist, self.device)  # every rank: each writes its shards of an FSDP model

    def _skip(self, state: LoopState, loss_value: float) -> None:
        """A non-finite loss or gradient: no update, count it, name the culprit, stop after too many in a row."""
        state.skipped_steps += 1
        state.bad_in_a_row += 1
        bad = [name for name, ps in self.groups.items() if not math.isfinite(float(_grad_norm(ps)))]
        what = (f"loss is {loss_value}" if not math.isfinite(loss_value) else "loss is finite") + \
            (f", gradient non-finite in parameter group(s) {', '.join(bad)}" if bad else "")
        self.optimizer.zero_grad(set_to_none=True)
        self.log(f"step {state.step}: skipped ({what}); {state.bad_in_a_row} in a row, "
                   f"{state.skipped_steps} in total")
        self.metrics.write({"kind": "skip", "step": state.step, "reason": what, "in_a_row": state.bad_in_a_row})
        if state.bad_in_a_row >= self.cfg.train.max_bad_steps:
            raise MoeError(f"step {state.step}: stopped after {state.bad_in_a_row} steps in a row with a non-finite "
                           f"loss or gradient ({what}); the last checkpoint holds the last good weights. Lower "
                           f"train.lr or train.grad_clip, or check the data")

    def _evaluate(self, step: int) -> None:
        ev = self.task.evaluate(self.model, self.device, self.autocast, self.dist)
        self.metrics.write({"kind": "eval", "step": step, **ev, **self.task.baselines})
        self.log(f"step {step}: {self.task.describe(ev)}" + (f" | halt step {ev['val_halt_step']:.2f}" if step else ""))


def _grad_norm(params: list[torch.nn.Parameter]) -> torch.Tensor:
    """The global L2 norm of the group's gradients, a plain tensor (with FSDP a collective: all ranks call it)."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return torch.zeros(())
    return full_tensor(torch.nn.utils.get_total_norm(grads))

