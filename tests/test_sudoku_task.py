"""The Sudoku task in the trainer: batches, the cell loss and its halt target, evaluation, and config checks."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from moe_core import sudoku as S
from moe_core.errors import ConfigError
from moe_core.model import ModelOutput, RecursiveMoE
from moe_core.sudoku import cell_answers, digit_tokenizer
from train.config import build_config
from train.loss import training_loss
from train.sudoku_task import SudokuTask, check_model


@pytest.fixture(scope="module")
def task() -> SudokuTask:
    cfg = build_config("sudoku-tiny", None, ["train.sudoku_train=16", "train.sudoku_test=8", "train.batch_size=6"])
    return SudokuTask(cfg, log=lambda _: None)


def test_batches_are_valid_augmented_and_a_function_of_seed_and_step(task: SudokuTask) -> None:
    x, y = task.batch(7, slice(None))
    assert x.shape == y.shape == (6, 81) and x.dtype == y.dtype == torch.int64
    assert S.valid_solutions(x.numpy().astype(np.uint8), y.numpy()).all()  # augmentation keeps pairs valid
    x2, y2 = task.batch(7, slice(None))
    assert torch.equal(x, x2) and torch.equal(y, y2)
    assert not torch.equal(task.batch(8, slice(None))[0], x)
    rows = task.batch(7, slice(2, 4))  # a rank's rows are rows of the same global batch
    assert torch.equal(rows[0], x[2:4]) and torch.equal(rows[1], y[2:4])
    seen = {bytes(p) for p in task.train_puzzles}  # augmented: not (all) copies of the base puzzles
    assert any(bytes(p.astype(np.uint8)) not in seen for p in x.numpy())


def test_train_and_test_puzzles_are_disjoint_under_symmetry(task: SudokuTask) -> None:
    train_keys = set(S.equivalence_keys(task.train_puzzles))
    assert not train_keys & set(S.equivalence_keys(task.test_puzzles))


def test_halt_target_is_the_answer_being_completely_right() -> None:
    y = torch.randint(1, 10, (3, 81))
    right = torch.nn.functional.one_hot(y, 10).float() * 10  # logits whose argmax is y
    wrong = right.clone()
    wrong[1, 5] = torch.nn.functional.one_hot((y[1, 5] % 9) + 1, 10).float() * 10  # sample 1, one cell wrong
    out = ModelOutput(logits=right, halt_step=torch.ones(3, dtype=torch.long), step_logits=[wrong, right],
                      halt_logits=torch.tensor([[5.0, -5.0, 5.0], [5.0, 5.0, 5.0]]))
    _, parts = training_loss(out, y, {}, halt_weight=1.0, halt_target="correct")
    # targets: step 1 = [1, 0, 1], step 2 = [1, 1, 1]; the halt logits say exactly that
    assert parts["halt_target"].item() == pytest.approx(5 / 6)
    assert parts["halt_acc"].item() == 1.0
    assert parts["exact_last_step"].item() == 1.0


def test_evaluate_reports_rule_checked_accuracy(task: SudokuTask) -> None:
    model = RecursiveMoE(task.cfg.model)
    ev = task.evaluate(model, torch.device("cpu"), torch.autocast("cpu", enabled=False))
    assert set(ev) >= {"val_loss", "cell_acc", "puzzle_acc", "val_halt_step"}
    assert 0.0 <= ev["cell_acc"] <= 0.3 and ev["puzzle_acc"] == 0.0  # an untrained model guesses
    assert 1.0 <= ev["val_halt_step"] <= task.cfg.model.halt_max_steps


def test_digits_never_answers_blank_and_tokenizer_maps_cells_to_digits() -> None:
    logits = torch.zeros(1, 81, 10)
    logits[..., 0] = 100.0  # the blank token scores highest, yet an answer is a digit
    logits[..., 4] = 1.0
    assert (cell_answers(logits) == 4).all()
    tok = digit_tokenizer()
    assert tok.encode("53..7" + "0" * 76).ids[:5] == [5, 3, 0, 0, 7]


@pytest.mark.parametrize("override, needle", [
    ("model.vocab_size=12", "model.vocab_size: expected 10"),
    ("model.causal=true", "model.causal: expected false"),
    ("model.max_seq_len=64", "model.max_seq_len: expected >= 81"),
])
def test_sudoku_needs_a_grid_model(override: str, needle: str) -> None:
    cfg = build_config("sudoku-tiny", None, [override])
    with pytest.raises(ConfigError, match=needle):
        SudokuTask(cfg, log=lambda _: None)


@pytest.mark.parametrize("preset", ["sudoku-tiny", "sudoku", "sudoku-large"])
def test_sudoku_presets_describe_a_valid_grid_model(preset: str) -> None:
    """Every shipped Sudoku preset validates, fits the task's checks and builds (on the meta device: no memory)."""
    cfg = build_config(preset, None, [])
    assert cfg.train.task == "sudoku" and cfg.model.attn_bias and cfg.model.recursive
    check_model(cfg)
    with torch.device("meta"):
        model = RecursiveMoE(cfg.model)
    assert sum(p.numel() for p in model.parameters()) > 0
