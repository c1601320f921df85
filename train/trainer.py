"""The training loop: per step the learning rate, the task's batch, forward, loss, backward, the guarded
update, then logging, evaluation and checkpoints; and its two entry points, `train` (a new run) and `resume`.

The loop's parts live in their own modules: the run directory's preparation (run_dir.py), the optimizer and
gradient norms (optimizer.py), metrics.jsonl and TensorBoard (metrics_log.py), console lines (console.py),
SIGINT / SIGTERM (signals.py), checkpoints (checkpointing.py), the rows carried across updates under
train.supervision = "carry" (carry.py) and the tasks (tasks.py, sudoku_task.py). The run
directory's layout: docs/training.md.
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import os
import shutil
import signal
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from moe_core.checkpoint import save_run
from moe_core.common.errors import CheckpointError, ConfigError, MoeError
from moe_core.common.files import atomic_write_text
from moe_core.common.tokenizer import read_tokenizer
from moe_core.model import ModelOutput, RecursiveMoE
from moe_core.run_layout import CONFIG_FILE, METRICS_FILE, TOKENIZER_FILE

from .carry import CarriedRows, carry_steps
from .checkpointing import (
    LoopState,
    checkpoint_sets,
    clean_partial_sets,
    load_checkpoint,
    save_best,
    save_checkpoint,
    saved_config,
)
from .config import SECTIONS, RunConfig, parse_override, seed_for, with_absolute_paths
from .console import final_lines, model_line, routing_summary
from .distributed import SINGLE, Dist, autocast_for, init_from_env, parallelize, shutdown
from .ema import EMA
from .metrics_log import MetricsLog, to_record
from .optimizer import build_optimizer, global_grad_norm, norm_groups
from .plots import write_plots
from .run_dir import check_run_dir, lock_on_rank0, prepare_run_dir
from .rundir_lock import RunDirLock
from .schedule import lr_multiplier, warmup_steps
from .signals import StopSignals, TrainingInterrupted
from .tasks import Task, evaluate, make_task  # noqa: F401 - evaluate: part of this module's API


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
    total_norm = global_grad_norm(params)  # FSDP: the global norm of the DTensor pieces, as a plain tensor
    grad_norm, loss_value = float(total_norm), float(parts["loss"])
    updated = decide(loss_value, grad_norm)
    if updated:
        if grad_clip > 0:
            torch.nn.utils.clip_grads_with_norm_(params, grad_clip, total_norm)
        optimizer.step()
    return StepResult(out, parts, grad_norm, loss_value, updated)


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
            assert tok_text is not None  # rank 0 got past the finally above: broadcast_text returned its text
            try:
                save_run(run_dir, model, tok_text, cfg.run_sections())  # complete from the start
            except BaseException:
                if created:  # a run that never saved leaves nothing a later command could mistake for a run
                    shutil.rmtree(run_dir, ignore_errors=True)
                raise
        return Trainer(cfg, run_dir, device, task, model, dist).run(LoopState(data_fingerprint=task.fingerprint))
    finally:
        lock.release()
        shutdown(dist)


def resume(run_dir: str | os.PathLike, overrides: Sequence[str] = ()) -> dict[str, Any]:
    """Continue the run in `run_dir` from its newest checkpoint, exactly as if it had never stopped."""
    run_dir = Path(run_dir)
    saved, sections = saved_config(run_dir)
    config_path = run_dir / CONFIG_FILE
    RunConfig.from_dict(sections, str(config_path))  # the saved config itself, so that its faults name its file
    changed = {}
    for item in overrides:
        section, key, value = parse_override(item)
        if section != "train" or key not in RESUMABLE:
            raise ConfigError(f"--set {item!r}: {section}.{key} cannot change when resuming (the run would not "
                              f"continue the same way); allowed: {', '.join(RESUMABLE)}")
        sections["train"][key] = changed[key] = value
    cfg = RunConfig.from_dict(sections, "--set")  # a fault now is one of the overrides
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
            state = load_checkpoint(sets[-1][1], model, trainer.optimizer, dist.rank, dist.world,
                                    trainer.ema.model if trainer.ema else None)
            dist.log(f"resume: {sets[-1][1]} (step {state.step})")
        else:  # killed before the first checkpoint: the seeded start is the checkpoint
            state = LoopState()
            dist.log("resume: no checkpoint yet, starting again from step 0 with the run's seed")
        if state.data_fingerprint and state.data_fingerprint != task.fingerprint:
            raise CheckpointError(f"{run_dir}: the training data differs from the data this run was trained on "
                                  f"(train.data = {cfg.train.data!r}); resume needs the same data")
        state.data_fingerprint = task.fingerprint
        if "max_steps" in changed and cfg.train.max_steps < state.step:
            raise ConfigError(f"--set train.max_steps={cfg.train.max_steps}: the run is at step {state.step}; "
                              "expected at least that (a run is never cut back)")
        if dist.is_main:
            kept = {k: v for k, v in saved.items() if k not in SECTIONS}  # versions, what eval added
            atomic_write_text(config_path, json.dumps({"model": saved["model"], **cfg.run_sections(), **kept},
                                                      indent=2) + "\n")
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

    step_times: list[float]  # set by run: the seconds of each step after the first

    def __init__(self, cfg: RunConfig, run_dir: Path, device: torch.device, task: Task, model: RecursiveMoE,
                 dist: Dist = SINGLE) -> None:
        mc, tc = cfg.model, cfg.train
        self.cfg, self.run_dir, self.device, self.task, self.model = cfg, run_dir, device, task, model
        self.dist, self.log = dist, dist.log
        # Before compiling: the average is a plain copy (evaluated eagerly), the weights as seeded
        self.ema = EMA(model, tc.ema_decay) if tc.ema_decay > 0 else None
        if tc.compile:
            compile_blocks(model)
        # Under torchrun: DDP averages the gradients over ranks during backward (the baseline never uses the halt
        # head or the initial carry, so DDP must look for unused parameters there; the recursive model uses every
        # one), or FSDP shards the model in place. Before the optimizer and the groups: FSDP replaces parameters.
        self.forward = parallelize(model, dist, device, tc.parallel, find_unused=not mc.recursive)
        self.optimizer = build_optimizer(model, cfg)
        self.params = list(model.parameters())
        self.groups = norm_groups(model)
        self.autocast = autocast_for(device)
        self.warmup = warmup_steps(tc.max_steps, tc.warmup_frac)
        self.carried = CarriedRows(cfg, model, task, dist.shard(tc.batch_size), device) \
            if tc.supervision == "carry" else None

    @property
    def evaluated(self) -> RecursiveMoE:
        """The weights the run is evaluated with, keeps as its best and exports: the moving average when on."""
        return self.ema.model if self.ema else self.model

    def run(self, state: LoopState, resumed: bool = False) -> dict[str, Any]:
        mc, tc = self.cfg.model, self.cfg.train
        self.start_step, self.first_step_s, self.step_times = state.step, 0.0, []
        n_params = sum(p.numel() for p in self.model.parameters())
        self.log(model_line(mc, n_params, self.device, tc.compile))
        self.metrics = MetricsLog(self.run_dir / METRICS_FILE, keep_until=state.step if resumed else None,
                                  files=self.dist.is_main)
        if state.step == 0 and not self.metrics.has_eval_at(0):
            self._evaluate(state)
        elif state.step == 0 and tc.keep_best:
            # resumed before the first checkpoint: the logged step-0 evaluation (of these seeded weights) is the
            # first best, as it was for the run that stopped
            rec = self.metrics.last_eval
            assert rec is not None  # has_eval_at(0): the log holds an evaluation
            self._keep_if_best(state, {k: v for k, v in rec.items()
                                       if k not in ("kind", "step", *self.task.baselines)})
        if state.step >= tc.max_steps:
            self.log(f"run is complete at step {state.step} (raise train.max_steps with --set to train further)")
            # A complete run whose log lost its last evaluation (metrics.jsonl removed or cut by hand) is evaluated
            # again, so that its summary describes the weights it has. Only rank 0 reads the log: every rank learns
            # the answer from it, as the evaluation is collective.
            lost = self.dist.is_main and not self.metrics.has_eval_at(state.step)
            if self.dist.sum_([float(lost)], self.device)[0] > 0:
                self._evaluate(state)
        else:
            self._loop(state)

        self.dist.barrier()  # rank 0 has written the last checkpoint before any rank exits
        if not self.dist.is_main:
            return {}
        ev = self.metrics.last_eval
        assert ev is not None  # evaluated at step 0 and at the last step (or logged so by the run resumed)
        steady = statistics.median(self.step_times) if self.step_times else self.first_step_s
        result = {
            **{k: v for k, v in ev.items() if k not in ("kind", "step")}, "steps": state.step,
            "skipped_steps": state.skipped_steps, "params": n_params,
            "median_grad_norm_after_warmup": statistics.median(state.grad_norms) if state.grad_norms else math.nan,
            "first_step_s": self.first_step_s, "step_s": steady,
            "tokens_per_s": tc.batch_size * mc.max_seq_len / steady if steady else 0.0,
        }
        if tc.keep_best and state.best_step >= 0:
            result["best_step"] = state.best_step
        self.metrics.write({"kind": "summary", **result})
        self.metrics.close()
        if tc.plots:
            write_plots(self.run_dir)
        timed = bool(self.step_times or self.first_step_s)
        print(final_lines(self.task.describe(ev), result, tc.compile, self.run_dir, timed))
        if tc.keep_best and state.best_step >= 0:
            print(f"{self.run_dir / 'model.safetensors'}: the best evaluation's weights (step {state.best_step}"
                  f"{', EMA' if self.ema else ''}; trainer_state/best/best.json)")
        return result

    def _loop(self, state: LoopState) -> None:
        mc, tc = self.cfg.model, self.cfg.train
        model, optimizer, dist = self.model, self.optimizer, self.dist
        tokens_per_step = tc.batch_size * mc.max_seq_len  # the global batch
        rows = dist.shard(tc.batch_size)
        bar = tqdm(range(state.step, tc.max_steps), desc="train", dynamic_ncols=True, mininterval=1.0,
                   initial=state.step, total=tc.max_steps, disable=True if not dist.is_main else None)
        model.train()
        if self.carried and state.rows:
            self.carried.load(state.rows, dist.rank)
        group_norms: dict[str, torch.Tensor] = {}
        log_step = stop = False
        forward: Callable[[torch.Tensor], ModelOutput]  # the model, or with carried rows a partial of it

        def decide(loss_value: float, grad_norm: float) -> bool:
            """Between backward and the update: the group norms a log step records, and the skip and stop decisions,
            which every rank takes together (the gradients are already the same on all ranks)."""
            nonlocal stop, group_norms
            if log_step:  # per-group norms (before clipping) only where they are logged: not on the hot path
                group_norms = {f"grad_norm.{name}": global_grad_norm(ps) for name, ps in self.groups.items()}
            bad, stop = dist.flags([not finite(loss_value, grad_norm), signals.received is not None], self.device)
            return not bad

        with StopSignals() as signals:
            for step in bar:
                t_step = time.perf_counter()
                mult = lr_multiplier(step, tc.max_steps, self.warmup, tc.min_lr_ratio)
                for g in optimizer.param_groups:
                    g["lr"] = tc.lr * g["lr_mult"] * mult
                if self.carried:  # one supervision step of the carried rows, the halted ones refilled
                    x, y, carry = self.carried.inputs(step)
                    forward = functools.partial(self.forward, carry=carry)
                else:  # this rank's rows of the batch, every supervision step
                    x, y = (t.to(self.device) for t in self.task.batch(step, rows))
                    forward = self.forward
                last = step == tc.max_steps - 1
                log_step = step % tc.log_every == 0 or last
                state.step = step + 1
                r = train_step(forward, optimizer, self.task.loss, x, y, self.params, tc.grad_clip,
                               self.autocast, decide)
                out, parts, grad_norm = r.out, r.parts, r.grad_norm
                if self.carried and r.updated:
                    self.carried.update(r.out, step)
                elif self.carried:
                    self.carried.drop()
                if r.updated:
                    if self.ema:
                        self.ema.update(model, state.step - state.skipped_steps)  # updates so far, this one too
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
                    if self.carried:  # the rows that halted since the last log
                        halting = {"halt_hist": self.carried.halt_hist(mc.n_steps)}
                    else:  # this batch's samples
                        halting = {"halt_step_mean": out.halt_step.float().mean(),
                                   "halt_hist": torch.bincount(out.halt_step - 1, minlength=mc.n_steps)}
                    stats = dist.reduce_stats({**parts, **out.stats, **halting})  # over all ranks' samples
                    hist = stats["halt_hist"].float()
                    if self.carried and hist.sum() > 0:
                        stats["halt_step_mean"] = (hist * torch.arange(1, len(hist) + 1)).sum() / hist.sum()
                    rec = {"kind": "train", "step": step + 1, "lr": tc.lr * mult, "grad_norm": grad_norm,
                           "tokens_per_s": tok_s, "skipped_steps": state.skipped_steps,
                           **self.task.schedule(step), **to_record(stats), **to_record(group_norms)}
                    if self.carried:
                        rec["carry_steps"] = carry_steps(self.cfg, step)
                    rec["halt_hist"] = [int(c) for c in rec["halt_hist"]]
                    self.metrics.write(rec)
                    bar.set_postfix(loss=f"{rec[self.task.loss_key]:.3f}", lr=f"{rec['lr']:.2e}",
                                    gnorm=f"{grad_norm:.2f}", tok_s=f"{tok_s:.0f}", refresh=False)
                    if step % (tc.log_every * 5) == 0 or last:
                        summary = routing_summary(rec, mc.n_layers)
                        if summary:
                            self.log(summary)
                if state.step % tc.eval_every == 0 or last:
                    self._evaluate(state)
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
        tc = self.cfg.train
        if self.carried:
            state.rows = self.carried.gathered(self.dist)
        # every rank: each writes its shards of an FSDP model. keep_best publishes the run's weights itself.
        save_checkpoint(self.run_dir, self.model, self.optimizer, state, tc.keep_checkpoints, rng, self.dist,
                        self.device, self.ema.model if self.ema else None, publish=not tc.keep_best)

    def _skip(self, state: LoopState, loss_value: float) -> None:
        """A non-finite loss or gradient: no update, count it, name the culprit, stop after too many in a row."""
        state.skipped_steps += 1
        state.bad_in_a_row += 1
        bad = [name for name, ps in self.groups.items() if not math.isfinite(float(global_grad_norm(ps)))]
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

    def _evaluate(self, state: LoopState) -> None:
        step = state.step
        ev = self.task.evaluate(self.evaluated, self.device, self.autocast, self.dist)
        self.metrics.write({"kind": "eval", "step": step, **ev, **self.task.baselines})
        self.log(f"step {step}: {self.task.describe(ev)}" + (f" | halt step {ev['val_halt_step']:.2f}" if step else ""))
        if self.cfg.train.keep_best:
            self._keep_if_best(state, ev)

    def _keep_if_best(self, state: LoopState, ev: dict[str, float]) -> None:
        """train.keep_best: an evaluation strictly better than the best so far (by Task.best_by, in order) becomes
        the run's weights. A non-finite figure never does. Every rank decides alike (the figures are reduced)."""
        sign = 1.0 if self.task.higher_is_better else -1.0
        key = [sign * float(ev[name]) for name in self.task.best_by]
        if not all(math.isfinite(v) for v in key) or (state.best_step >= 0 and key <= state.best_key):
            return
        state.best_step, state.best_key = state.step, key
        if self.dist.is_main:
            save_best(self.run_dir, self.evaluated, state.step, self.task.best_by, ev, self.ema is not None)
