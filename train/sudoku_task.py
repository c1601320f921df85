"""The Sudoku task: one token per cell (0 = blank, 1..9), a bidirectional model, loss on the cells, and the halt
head trained on "is the current answer completely right" (TRM's rule).

Puzzles are generated at start-up (moe_core.tasks.sudoku: unique solutions, deterministic by train.seed), train and
test disjoint under the symmetry group; every training batch is drawn from the train puzzles (under a curriculum,
from those with enough givens for the step: [sudoku] curriculum_start) and augmented with a random symmetry,
both a function of (seed, step).
"""

from __future__ import annotations

import contextlib
import math
import time
from typing import Any

import numpy as np
import torch
from torch import Tensor

from moe_core.common.errors import ConfigError
from moe_core.model import ModelOutput, RecursiveMoE
from moe_core.tasks import sudoku
from moe_core.tasks.config import SudokuConfig
from moe_core.tasks.sudoku import VOCAB, cell_answers, digit_tokenizer

from .checkpointing import data_fingerprint
from .config import RunConfig
from .distributed import SINGLE, Dist, is_sharded
from .loss import per_sample_nll, training_loss
from .schedule import ramp
from .task import Task


def check_model(cfg: RunConfig) -> None:
    mc = cfg.model
    for ok, msg in ((mc.vocab_size == VOCAB, f"model.vocab_size: expected {VOCAB} (blank + 9 digits), got "
                     f"{mc.vocab_size}"),
                    (mc.max_seq_len >= sudoku.CELLS,
                     f"model.max_seq_len: expected >= {sudoku.CELLS}, got {mc.max_seq_len}"),
                    (not mc.causal, "model.causal: expected false (every cell attends to every cell)")):
        if not ok:
            raise ConfigError(f"train.task = 'sudoku': {msg}; start from --preset sudoku-tiny or sudoku")


def sudoku_config(cfg: RunConfig) -> SudokuConfig:
    """The run's [sudoku] section (RunConfig.from_dict gives a sudoku run one)."""
    assert isinstance(cfg.task_config, SudokuConfig), "a sudoku run's config has its [sudoku] section"
    return cfg.task_config


def data_spec(cfg: RunConfig) -> tuple:
    """What the task's train and test puzzles are a function of: two runs with the same spec hold the same sets."""
    tc, sc = cfg.train, sudoku_config(cfg)
    return (tc.data, tc.seed, sc.train, sc.test, sc.givens_min, sc.givens_max, sc.min_guesses)


@torch.no_grad()
def solve_batches(model: RecursiveMoE, puzzles: np.ndarray, batch_size: int, device: torch.device,
                  autocast: contextlib.AbstractContextManager | None = None
                  ) -> tuple[np.ndarray, np.ndarray, Tensor]:
    """The eval-mode model on puzzles [N, 81]: (answers [N, 81] digits, halt steps [N], logits [N, 81, V])."""
    autocast = autocast or contextlib.nullcontext()
    was_training = model.training
    model.eval()
    answers, steps, logits_all = [], [], []
    for i in range(0, len(puzzles), batch_size):
        x = torch.from_numpy(puzzles[i:i + batch_size].astype(np.int64)).to(device)
        with autocast:
            out = model(x, stop_when_halted=not is_sharded(model))
        answers.append(cell_answers(out.logits).cpu().numpy())
        steps.append(out.halt_step.cpu().numpy())
        logits_all.append(out.logits.float().cpu())
    model.train(was_training)
    return np.concatenate(answers), np.concatenate(steps), torch.cat(logits_all)


@torch.no_grad()
def solve_steps(model: RecursiveMoE, puzzles: np.ndarray, n_steps: int, batch_size: int, device: torch.device,
                autocast: contextlib.AbstractContextManager | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The recursive eval-mode model's answer at every supervision step 1..n_steps, from one run of n_steps steps:
    (answers [n_steps, N, 81] digits, halt logits [n_steps, N]). The steps share their weights and step s never
    depends on how many follow, so step s is what a model limited to any K >= s computes there; halted_at gives
    each K's halting choice from these."""
    autocast = autocast or contextlib.nullcontext()
    was_training = model.training
    model.eval()
    answers, halts = [], []
    for i in range(0, len(puzzles), batch_size):
        ids = torch.from_numpy(puzzles[i:i + batch_size].astype(np.int64)).to(device)
        steps_a, steps_q = [], []
        with autocast:
            x = model.embed_inputs(ids)
            c = model.initial_carry(*ids.shape)
            for _ in range(n_steps):
                c, h, q = model.step(c, x, None)
                steps_a.append(cell_answers(model.lm_head(h)).cpu().numpy())
                steps_q.append(q.cpu().numpy())
        answers.append(np.stack(steps_a))
        halts.append(np.stack(steps_q))
    model.train(was_training)
    return np.concatenate(answers, axis=1), np.concatenate(halts, axis=1)


def halted_at(halt_logits: np.ndarray, k: int, halting: bool = True) -> np.ndarray:
    """The 1-based step each sample keeps when at most k steps run, from halt logits [S >= k, N]: the model's rule
    (RecursiveMoE.forward) — the first step whose halt logit is > 0, step k if none; halting=False: step k."""
    over = halt_logits[:k] > 0
    return np.where(over.any(axis=0) & halting, over.argmax(axis=0) + 1, k)


def counts(puzzles: np.ndarray, solutions: np.ndarray, answers: np.ndarray, steps: np.ndarray) -> list[float]:
    """The sums the Sudoku figures are made of (so that ranks can add them up): right blank cells, blank cells,
    rule-checked solved puzzles, steps taken, puzzles."""
    blank = puzzles == 0
    return [float(((answers == solutions) & blank).sum()), float(blank.sum()),
            float(sudoku.valid_solutions(puzzles, answers).sum()), float(np.sum(steps)), float(len(puzzles))]


def figures(right_cells: float, blank_cells: float, solved: float, step_sum: float, n: float) -> dict[str, float]:
    """Cell accuracy on the blanks, whole-puzzle accuracy (checked by the rules) and mean steps, from counts()."""
    return {"cell_acc": right_cells / blank_cells, "puzzle_acc": solved / n, "val_halt_step": step_sum / n}


class SudokuTask(Task):
    name = "sudoku"
    loss_key = "cell_loss"  # cross-entropy over the 81 cells' digits
    # solved puzzles first; cell accuracy breaks ties (early on, all at 0)
    best_by: tuple[str, ...] = ("puzzle_acc", "cell_acc")
    higher_is_better = True

    def __init__(self, cfg: RunConfig, log: Any = print) -> None:
        check_model(cfg)
        tc, sc = cfg.train, sudoku_config(cfg)
        self.cfg, self.sc = cfg, sc
        t0 = time.perf_counter()
        givens = (sc.givens_min, sc.givens_max)
        if tc.data is not None:  # the user's puzzles to train on; test puzzles generated, none equivalent
            puzzles, solutions = sudoku.read_puzzle_file(tc.data)
            if solutions is None:
                solutions = np.stack([_solve_unique(p, f"{tc.data}: puzzle {i + 1}") for i, p in enumerate(puzzles)])
            taken = set(sudoku.equivalence_keys(puzzles))
            _, test = sudoku.make_splits(1, sc.test * 2, tc.seed, givens, sc.min_guesses)
            keep = [i for i, k in enumerate(sudoku.equivalence_keys(test.puzzles)) if k not in taken][:sc.test]
            self.train_puzzles, self.train_solutions = puzzles, solutions
            self.test_puzzles, self.test_solutions = test.puzzles[keep], test.solutions[keep]
            source = str(tc.data)
        else:
            train, test = sudoku.make_splits(sc.train, sc.test, tc.seed, givens, sc.min_guesses)
            self.train_puzzles, self.train_solutions = train.puzzles, train.solutions
            self.test_puzzles, self.test_solutions = test.puzzles, test.solutions
            source = f"generated, {givens[0]}-{givens[1]} givens"
        self.val_puzzles: np.ndarray | None = None
        self.val_solutions: np.ndarray | None = None
        if sc.val:  # held out from train and test under the symmetry group, as the ladder is
            taken = set(sudoku.equivalence_keys(np.concatenate([self.train_puzzles, self.test_puzzles])))
            (val, _), = sudoku.make_ladder([sc.val_givens], sc.val, f"val/{tc.seed}", taken)
            self.val_puzzles, self.val_solutions = val.puzzles, val.solutions
            source += f"; {sc.val} validation puzzles with {sc.val_givens} givens"
            self.best_by = ("hard_puzzle_acc", *self.best_by)
        self.train_givens = (self.train_puzzles > 0).sum(axis=1)
        self._pools: dict[int, np.ndarray] = {}
        floor = self.givens_floor(0)
        if floor is not None:
            if not len(self._pool(floor)):
                raise ConfigError(f"sudoku.curriculum_start = {floor}: no train puzzle has that many givens "
                                  f"(most: {self.train_givens.max()}); expected a lower start")
            source += f", curriculum from {floor}+ givens"
        self.tokenizer_json = digit_tokenizer().to_str(pretty=False)
        self.fingerprint = data_fingerprint(np.concatenate([self.train_puzzles, self.train_solutions], axis=1))
        self.baselines = {"uniform_baseline": math.log(VOCAB)}
        blanks = (self.test_puzzles == 0).sum(axis=1).mean()
        log(f"data: sudoku ({source}): {len(self.train_puzzles):,} train puzzles (augmented every batch), "
            f"{len(self.test_puzzles):,} test puzzles with {blanks:.1f} blanks on average "
            f"({time.perf_counter() - t0:.1f}s)")

    def givens_floor(self, step: int) -> int | None:
        """The fewest givens a training puzzle of this step may have under the curriculum (None: no curriculum):
        [sudoku] curriculum_start at step 0, down by a linear schedule to givens_min at curriculum_frac of
        train.max_steps."""
        sc = self.sc
        if not sc.curriculum_start:
            return None
        return ramp(step, self.cfg.train.max_steps, sc.curriculum_frac, sc.curriculum_start, sc.givens_min)

    def _pool(self, floor: int) -> np.ndarray:
        if floor not in self._pools:
            self._pools[floor] = np.flatnonzero(self.train_givens >= floor)
        return self._pools[floor]

    def schedule(self, step: int) -> dict[str, float]:
        floor = self.givens_floor(step)
        return {} if floor is None else {"givens_floor": float(floor)}

    def batch(self, step: int, rows: slice) -> tuple[Tensor, Tensor]:
        tc = self.cfg.train
        rng = np.random.default_rng([tc.seed, step])  # the global batch: a function of (seed, step)
        floor = self.givens_floor(step)
        if floor is None:
            idx = rng.integers(0, len(self.train_puzzles), tc.batch_size)
        else:
            pool = self._pool(floor)
            idx = pool[rng.integers(0, len(pool), tc.batch_size)]
        p, s = sudoku.augment(self.train_puzzles[idx], self.train_solutions[idx], rng)
        return torch.from_numpy(p[rows].astype(np.int64)), torch.from_numpy(s[rows].astype(np.int64))

    def loss(self, out: ModelOutput, y: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        tc = self.cfg.train
        return training_loss(out, y, tc.aux_weights, tc.halt_weight, halt_target="correct", loss_key=self.loss_key)

    def evaluate(self, model: RecursiveMoE, device: torch.device, autocast: contextlib.AbstractContextManager,
                 dist: Dist = SINGLE) -> dict[str, float]:
        """Cell accuracy (blank cells), whole-puzzle accuracy (rule-checked) and loss on the test puzzles."""
        nll, sums = self._solve(model, self.test_puzzles, self.test_solutions, device, autocast, dist)
        val_loss = nll / (sums[-1] * sudoku.CELLS)
        ev = {"val_loss": val_loss, "val_ppl": math.exp(min(val_loss, 50.0)), **figures(*sums)}
        if self.val_puzzles is not None:  # the hard level, as served: halt_max_steps steps with halting
            assert self.val_solutions is not None  # set together with val_puzzles
            _, sums = self._solve(model, self.val_puzzles, self.val_solutions, device, autocast, dist)
            hard = figures(*sums)
            ev.update(hard_puzzle_acc=hard["puzzle_acc"], hard_halt_step=hard["val_halt_step"])
        return ev

    def _solve(self, model: RecursiveMoE, puzzles: np.ndarray, solutions: np.ndarray, device: torch.device,
               autocast: contextlib.AbstractContextManager, dist: Dist) -> tuple[float, list[float]]:
        """The eval-mode model on `puzzles`, over all ranks: (summed loss over every cell, counts() summed)."""
        indices, n = dist.eval_indices(len(puzzles), is_sharded(model))  # FSDP: equal forwards per rank
        mine, targets = puzzles[indices][:n], solutions[indices][:n]
        all_answers, all_steps, all_logits = solve_batches(model, puzzles[indices], self.cfg.train.batch_size, device,
                                                           autocast)
        answers, steps, logits = all_answers[:n], all_steps[:n], all_logits[:n]
        nll = per_sample_nll(logits, torch.from_numpy(targets.astype(np.int64))).sum().item() * sudoku.CELLS
        nll, *sums = dist.sum_([nll, *counts(mine, targets, answers, steps)], device)
        return nll, sums

    def describe(self, ev: dict[str, float]) -> str:
        hard = f" | {self.sc.val_givens} givens {ev['hard_puzzle_acc']:.4f}" \
            if "hard_puzzle_acc" in ev else ""
        return (f"val loss {ev['val_loss']:.4f} | cell acc {ev['cell_acc']:.4f} (blanks) | "
                f"puzzle acc {ev['puzzle_acc']:.4f} (rule-checked){hard}")


def _solve_unique(puzzle: np.ndarray, where: str) -> np.ndarray:
    found = sudoku.search(puzzle, limit=2)
    if len(found.solutions) != 1:
        raise ConfigError(f"{where}: has {len(found.solutions)} solutions; expected exactly one "
                          f"(or give its solution after the puzzle on the same line)")
    return np.asarray(found.solutions[0], dtype=np.uint8)
