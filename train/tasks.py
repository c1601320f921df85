"""What the trainer trains on. A task owns its data, batches, loss, evaluation and baselines; the training loop
(train/trainer.py) is the same for every task.

  lm      next-token language modelling on a text corpus (the default): causal, val loss against ln(V) and
          the unigram baseline.
  sudoku  one token per cell, bidirectional: loss on the cells, cell and whole-puzzle accuracy, the halt head
          trained on "is the current answer completely right".

Every batch is a function of (seed, step), so a resumed run sees exactly the batches it would have seen.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable
from typing import Any

import torch
from tokenizers import Tokenizer
from torch import Tensor

from moe_core.common.errors import MoeError
from moe_core.model import ModelOutput, RecursiveMoE
from moe_core.tasks import TASKS

from .checkpointing import data_fingerprint
from .config import RunConfig, seed_for
from .data import (
    describe_data,
    eval_batches,
    get_batch,
    load_documents,
    load_tokenizer,
    tokenize_corpus,
    train_tokenizer,
    unigram_baseline,
)
from .distributed import SINGLE, Dist, is_sharded
from .loss import per_sample_nll, training_loss
from .task import Task


def make_task(cfg: RunConfig, tokenizer_json: str | None, log: Any = print, new_run: bool = False) -> Task:
    """The run's task (one builder per name of moe_core.tasks.TASKS). tokenizer_json: the tokenizer to use (resume,
    and ranks > 0), None to build it. new_run: tokenizer_json was made for this new run (by rank 0), not read from a
    saved run."""
    return BUILDERS[cfg.train.task](cfg, tokenizer_json, log, new_run)


def _sudoku_task(cfg: RunConfig, tokenizer_json: str | None, log: Any, new_run: bool) -> Task:
    from .sudoku_task import SudokuTask  # noqa: PLC0415 - only sudoku runs need the generator

    return SudokuTask(cfg, log)


def _language_task(cfg: RunConfig, tokenizer_json: str | None, log: Any, new_run: bool) -> Task:
    return LanguageTask(cfg, tokenizer_json, log, new_run=new_run)


BUILDERS: dict[str, Callable[[RunConfig, str | None, Any, bool], Task]] = {"lm": _language_task,
                                                                          "sudoku": _sudoku_task}
assert set(BUILDERS) == set(TASKS), "every task of moe_core.tasks.TASKS has a builder here"


# -----------------------------------------------------------------------------
# language modelling


class LanguageTask(Task):
    name = "lm"
    loss_key = "lm_loss"  # mean next-token cross-entropy
    best_by = ("val_loss",)
    higher_is_better = False

    def __init__(self, cfg: RunConfig, tokenizer_json: str | None, log: Any = print, new_run: bool = False) -> None:
        import time

        mc, tc = cfg.model, cfg.train
        self.cfg = cfg
        t0 = time.perf_counter()
        docs = load_documents(tc.data)
        trained = tokenizer_json is None and tc.tokenizer is None
        if tokenizer_json is not None:
            tok = Tokenizer.from_str(tokenizer_json)
        elif tc.tokenizer is not None:
            tok = load_tokenizer(tc.tokenizer)
        else:
            tok = train_tokenizer(docs, mc.vocab_size)
        if tc.tokenizer is not None:
            mc.vocab_size = tok.get_vocab_size()  # the model's vocabulary is the user tokenizer's
        elif (trained or new_run) and tok.get_vocab_size() < mc.vocab_size:
            # BPE stops merging when the corpus has no pair left to merge, so a small corpus gives fewer tokens
            # than asked for. The model takes the tokenizer's size, as with --tokenizer: embedding and output
            # rows no token id can reach would only cost memory and compute, and would make the uniform
            # baseline ln(V) describe a vocabulary that does not exist. Refusing would not help: the size a
            # corpus supports is only known once the tokenizer is trained. (A resumed run keeps its saved size.)
            if trained:
                log(f"note: model.vocab_size {mc.vocab_size} lowered to {tok.get_vocab_size()}: the BPE trained "
                    f"on {describe_data(tc.data)} stops there (the corpus has no more pairs to merge)")
            mc.vocab_size = tok.get_vocab_size()
        self.tokenizer_json = tokenizer_json or tok.to_str(pretty=False)
        self.data = tokenize_corpus(docs, tok, tc.val_fraction, mc.max_seq_len, where=describe_data(tc.data))
        if self.data.vocab_size > mc.vocab_size:
            raise MoeError(f"tokenizer has {self.data.vocab_size} tokens but model.vocab_size is {mc.vocab_size}")
        self.val_batches = eval_batches(self.data.val, tc.batch_size, mc.max_seq_len, tc.eval_batches)
        self.fingerprint = data_fingerprint(self.data.train)
        self.baselines = {"uniform_baseline": math.log(mc.vocab_size),
                          "unigram_baseline": unigram_baseline(self.data.train, self.data.val, mc.vocab_size)}
        self._gen = torch.Generator()
        log(f"data: {len(docs)} documents, {len(self.data.train):,} train / {len(self.data.val):,} val tokens, "
            f"tokenizer {self.data.vocab_size} tokens ({time.perf_counter() - t0:.1f}s)")
        log(f"baselines: uniform ln(V) = {self.baselines['uniform_baseline']:.3f}, unigram = "
            f"{self.baselines['unigram_baseline']:.3f} nats/token")

    def batch(self, step: int, rows: slice) -> tuple[Tensor, Tensor]:
        tc = self.cfg.train
        self._gen.manual_seed(seed_for(tc.seed * 1_000_003, step))  # the global batch; each rank takes its rows
        x, y = get_batch(self.data.train, tc.batch_size, self.cfg.model.max_seq_len, self._gen)
        return x[rows], y[rows]

    def loss(self, out: ModelOutput, y: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        tc = self.cfg.train
        return training_loss(out, y, tc.aux_weights, tc.halt_weight, halt_target="no_gain", loss_key=self.loss_key)

    def evaluate(self, model: RecursiveMoE, device: torch.device, autocast: contextlib.AbstractContextManager,
                 dist: Dist = SINGLE) -> dict[str, float]:
        return evaluate(model, self.val_batches, device, autocast, dist)

    def describe(self, ev: dict[str, float]) -> str:
        b = self.baselines
        return (f"val loss {ev['val_loss']:.4f} (ppl {ev['val_ppl']:.1f}) | uniform ln(V) {b['uniform_baseline']:.4f} "
                f"| unigram {b['unigram_baseline']:.4f}")


@torch.no_grad()
def evaluate(model: RecursiveMoE, batches: list[tuple[Tensor, Tensor]], device: torch.device,
             autocast: contextlib.AbstractContextManager, dist: Dist = SINGLE) -> dict[str, float]:
    """Val loss of the eval-mode model: the halting-selected logits, exactly what export and serve compute.
    With several ranks each evaluates every world-th batch and the sums are reduced (an FSDP model runs as many
    forwards on every rank: a short share repeats a batch it does not count)."""
    was_training = model.training
    model.eval()
    n_tokens: float  # counts: ints, until dist.sum_ returns them summed over the ranks as floats
    n_samples: float
    nll_sum, n_tokens, halt_sum, n_samples = 0.0, 0, 0.0, 0
    indices, counted = dist.eval_indices(len(batches), is_sharded(model))
    for j, i in enumerate(indices):
        x, y = (t.to(device) for t in batches[i])
        with autocast:
            out = model(x)
        if j >= counted:
            continue
        nll_sum += per_sample_nll(out.logits, y).sum().item() * y.shape[1]
        n_tokens += y.numel()
        halt_sum += out.halt_step.float().sum().item()
        n_samples += y.shape[0]
    model.train(was_training)
    nll_sum, n_tokens, halt_sum, n_samples = dist.sum_([nll_sum, n_tokens, halt_sum, n_samples], device)
    val_loss = nll_sum / n_tokens
    return {"val_loss": val_loss, "val_ppl": math.exp(min(val_loss, 50.0)), "val_halt_step": halt_sum / n_samples}
