"""The Sudoku task in the trainer: batches, the cell loss and its halt target, evaluation, and config checks."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from moe_core.common.errors import ConfigError
from moe_core.model import ModelOutput, RecursiveMoE
from moe_core.tasks import sudoku as S
from moe_core.tasks.config import SudokuConfig
from moe_core.tasks.sudoku import cell_answers, digit_tokenizer
from train.config import RunConfig, build_config
from train.loss import training_loss
from train.sudoku_task import SudokuTask, check_model


@pytest.fixture(scope="module")
def task() -> SudokuTask:
    cfg = build_config("sudoku-tiny", None, ["sudoku.train=16", "sudoku.test=8", "train.batch_size=6"])
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


@pytest.mark.parametrize("preset", ["sudoku-tiny", "sudoku", "sudoku-hard", "sudoku-large"])
def test_sudoku_presets_describe_a_valid_grid_model(preset: str) -> None:
    """Every shipped Sudoku preset validates, fits the task's checks and builds (on the meta device: no memory); its
    token mixing knows the cells' places beyond rotary (MoH with the learned bias, or the token-mixing MLP)."""
    cfg = build_config(preset, None, [])
    assert cfg.train.task == "sudoku" and cfg.model.recursive
    assert cfg.model.attn_bias or cfg.model.token_mixer == "mlp"
    check_model(cfg)
    with torch.device("meta"):
        model = RecursiveMoE(cfg.model)
    assert sum(p.numel() for p in model.parameters()) > 0


def test_curriculum_draws_from_puzzles_with_enough_givens() -> None:
    cfg = build_config("sudoku-tiny", None, ["sudoku.train=40", "sudoku.test=4", "train.batch_size=32",
                                             "train.max_steps=20", "sudoku.curriculum_start=47",
                                             "sudoku.curriculum_frac=0.5"])
    task = SudokuTask(cfg, log=lambda _: None)
    # 47 at step 0, down linearly to givens_min (40) at step 10 = 0.5 x max_steps, then the whole set
    assert [task.givens_floor(s) for s in (0, 1, 5, 9, 10, 19)] == [47, 47, 44, 41, 40, 40]
    assert task.schedule(5) == {"givens_floor": 44.0}
    for step in (0, 5):
        x, y = task.batch(step, slice(None))
        givens = (x > 0).sum(1)
        assert (givens >= task.givens_floor(step)).all()  # augmentation keeps the number of givens
        assert S.valid_solutions(x.numpy().astype(np.uint8), y.numpy()).all()
    assert ((task.batch(15, slice(None))[0] > 0).sum(1) < 44).any()  # harder puzzles have joined
    off = SudokuTask(build_config("sudoku-tiny", None, ["sudoku.train=40", "sudoku.test=4",
                                                        "train.batch_size=32"]), log=lambda _: None)
    assert off.givens_floor(0) is None and off.schedule(0) == {}


def test_curriculum_start_needs_puzzles(tmp_path) -> None:
    path = tmp_path / "puzzles.txt"
    path.write_text("53..7....6..195....98....6.8...6...34..8.3..17...2...6.6....28....419..5....8..79\n")  # 30 givens
    cfg = build_config("sudoku-tiny", None, [f"train.data={str(path)!r}", "sudoku.test=2",
                                             "sudoku.curriculum_start=45"])
    with pytest.raises(ConfigError, match="sudoku.curriculum_start = 45: no train puzzle has that many givens"):
        SudokuTask(cfg, log=lambda _: None)


@pytest.mark.parametrize("override, needle", [
    ("train.ema_decay=1.0", "train.ema_decay: expected in [0, 1) (0 = off), got 1.0"),
    ("train.ema_decay=-0.5", "train.ema_decay: expected in [0, 1)"),
    ("train.keep_best=1", "train.keep_best: expected true or false"),
    ("sudoku.curriculum_start=39", "sudoku.curriculum_start: expected 0 (off) or a number of givens in "
                                  "givens_min..max (40..50), got 39"),
    ("sudoku.curriculum_start=51", "got 51"),
    ("sudoku.curriculum_frac=0", "sudoku.curriculum_frac: expected in (0, 1], got 0.0"),
])
def test_training_feature_settings_are_checked(override: str, needle: str) -> None:
    with pytest.raises(ConfigError) as e:
        build_config("sudoku-tiny", None, [override])
    assert needle in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("feature", ["train.ema_decay=0.99", "train.keep_best=true"])
def test_ema_and_keep_best_refuse_fsdp(feature: str, moe_cli) -> None:
    result = moe_cli("train", "--preset", "sudoku-tiny", "--set", feature, "--set", "train.parallel=fsdp",
                     "--out", "never-written", in_process=True)
    assert result.returncode == 2 and result.stderr.count("\n") == 1, result.describe()
    assert "expected it off with parallel = 'fsdp'" in result.stderr


def test_ema_follows_its_decay_schedule() -> None:
    """Towards fixed weights c, n updates leave the average at c + prod_k d_k * (start - c), d_k the decay of the
    k-th update; float32 lerp rounds each update by a few ulps of the values' size."""
    from train.ema import EMA, ema_decay_at

    model = RecursiveMoE(build_config("sudoku-tiny", None, []).model)
    ema = EMA(model, decay=0.95)
    start = [p.detach().clone() for p in model.parameters()]
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(0.5)
    n = 40
    for k in range(1, n + 1):
        ema.update(model, k)
    shrink = float(np.prod([ema_decay_at(0.95, k) for k in range(1, n + 1)]))
    assert [ema_decay_at(0.95, k) for k in (1, 10, 200)] == [2 / 11, 11 / 20, 0.95]
    for avg, s in zip(ema.model.parameters(), start, strict=True):
        expected = 0.5 + shrink * (s - 0.5)
        ulp = torch.finfo(torch.float32).eps * max(1.0, float(s.abs().max()))
        assert torch.allclose(avg, expected, rtol=0, atol=4 * n * ulp)
        assert not avg.requires_grad
    assert all(torch.equal(a, b) for a, b in zip(ema.model.buffers(), model.buffers(), strict=True))


def test_lr_plot_shows_the_curriculum() -> None:
    from train.plots import plot_lr

    train = [{"kind": "train", "step": s, "lr": 1e-3, "givens_floor": 45.0 - s} for s in range(1, 6)]
    assert len(plot_lr(train).axes) == 2  # the floor on its own axis
    assert len(plot_lr([{k: v for k, v in r.items() if k != "givens_floor"} for r in train]).axes) == 1


def test_the_sudoku_section_round_trips_and_belongs_to_its_task() -> None:
    """[sudoku] holds the task's data settings; a run's config.json (to_dict) reads back to the same config, and a
    language run with a [sudoku] section is refused in one line."""
    cfg = build_config("sudoku-hard", None, ["sudoku.val=7"])
    assert isinstance(cfg.task_config, SudokuConfig) and cfg.task_config.val == 7
    assert RunConfig.from_dict(json.loads(json.dumps(cfg.to_dict())), "config.json") == cfg
    lm = build_config("tiny", None, [])
    assert lm.task_config is None and "sudoku" not in lm.to_dict()
    with pytest.raises(ConfigError) as e:
        build_config("tiny", None, ["sudoku.val=7"])
    assert str(e.value) == "config: train.task: expected 'sudoku' with a [sudoku] section, got 'lm'"


def test_train_sudoku_keys_of_older_runs_and_files_are_read_into_the_section(tmp_path) -> None:
    """Runs and files written before [sudoku] existed spell its keys train.sudoku_*: they mean the same config,
    an explicit [sudoku] key wins over one, and a language run's (every field was saved) are dropped."""
    new = build_config("sudoku-tiny", None, ["sudoku.val=5", "sudoku.givens_min=41"])
    old = new.to_dict()
    old["train"].update({f"sudoku_{k}": v for k, v in old.pop("sudoku").items()})
    assert RunConfig.from_dict(old, "config.json") == new
    assert build_config("sudoku-tiny", None, ["train.sudoku_val=5", "train.sudoku_givens_min=41"]) == new
    path = tmp_path / "old.toml"
    path.write_text("[train]\nsudoku_val = 5\n[sudoku]\ngivens_min = 41\n")
    assert build_config("sudoku-tiny", str(path), []) == new
    lm = build_config("tiny", None, []).to_dict()
    lm["train"].update({k: v for k, v in old["train"].items() if k.startswith("sudoku_")})
    assert RunConfig.from_dict(lm, "config.json") == build_config("tiny", None, [])
