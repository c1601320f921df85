"""`moe eval --ladder`: every K's figures from one run of max(K) steps equal the model limited to K (halting and
not), and the command writes the ladder's sets, difficulty, tables and plot, held out from the runs' puzzles."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import vary_routing

from moe_core.checkpoint import load_model, save_run
from moe_core.model import RecursiveMoE
from moe_core.tasks import sudoku as S
from train.config import RunConfig, build_config
from train.evaluate import with_steps
from train.sudoku_task import SudokuTask, counts, figures, halted_at, solve_batches, solve_steps

CPU = torch.device("cpu")
TINY = ["sudoku.train=16", "sudoku.test=8", "train.batch_size=8"]


def varied_model(cfg: RunConfig, seed: int) -> RecursiveMoE:
    """An untrained model whose routing varies and whose samples halt at different steps: a bidirectional model's
    halt logit pools over all cells, so random weights give every puzzle nearly the same one; the bias centres it
    on Sudoku puzzles."""
    torch.manual_seed(seed)
    model = vary_routing(RecursiveMoE(cfg.model)).eval()
    if cfg.model.recursive:
        _, halt = solve_steps(model, S.generate(8, seed=seed, givens=35).puzzles, cfg.model.halt_max_steps, 8, CPU)
        with torch.no_grad():
            model.halt_head.bias -= float(np.median(halt))
    return model


def saved_run(path: Path, cfg: RunConfig, seed: int) -> RecursiveMoE:
    """A run directory of varied_model (no training needed to evaluate it)."""
    model = varied_model(cfg, seed)
    save_run(path, model, S.digit_tokenizer().to_str(pretty=False), cfg.run_sections())
    return model


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("ladder")
    saved_run(root / "run", build_config("sudoku-tiny", None, TINY), seed=0)
    # another training set (seed) and recursion off: its puzzles are excluded too, and it runs as trained
    saved_run(root / "base", build_config("sudoku-tiny", None, [*TINY, "train.seed=7", "model.recursive=false"]), 1)
    return root / "run", root / "base"


def test_every_k_from_one_run_equals_the_model_limited_to_k() -> None:
    model = varied_model(build_config("sudoku-tiny", None, TINY), seed=0)
    puzzles = S.generate(16, seed=3, givens=35).puzzles
    answers, halt = solve_steps(model, puzzles, 4, 8, CPU)
    assert answers.shape == (4, 16, 81) and halt.shape == (4, 16)
    for k in (1, 3, 4):
        for halting in (True, False):
            ref_answers, ref_steps, _ = solve_batches(with_steps(model, k, halting), puzzles, 8, CPU)
            kept = halted_at(halt, k, halting)
            assert np.array_equal(kept, ref_steps), (k, halting)
            assert np.array_equal(answers[kept - 1, np.arange(16)], ref_answers), (k, halting)
    assert len(set(halted_at(halt, 4).tolist())) > 1  # samples halt at different steps: the choice is exercised


def test_ladder_command(runs: tuple[Path, Path], tmp_path: Path, moe_cli) -> None:
    run, base = runs
    out = tmp_path / "out"
    args = ["eval", run, "--ladder", "--ladder-givens", "30,45", "--ladder-size", "5", "--steps", "1,3",
            "--baseline", base, "--out", out, "--device", "cpu"]
    result = moe_cli(*args, in_process=True)
    assert result.returncode == 0, result.describe()
    report = json.loads((out / "ladder.json").read_text(encoding="utf-8"))
    assert [lv["givens"] for lv in report["levels"]] == [45, 30]  # easiest first
    assert all(lv["puzzles"] == 5 and lv["blanks"] == 81 - lv["givens"] for lv in report["levels"])
    rows = report["rows"]
    assert len(rows) == 2 * 2 * 2 + 2  # levels x K x modes, and the baseline's row per level
    assert [r["mode"] for r in rows[-2:]] == ["baseline: base (recursion off)"] * 2

    puzzles, solutions = S.read_puzzle_file(out / "ladder_puzzles.txt")
    assert ((puzzles > 0).sum(1) == [45] * 5 + [30] * 5).all() and S.valid_solutions(puzzles, solutions).all()
    cfgs = [build_config("sudoku-tiny", None, TINY), build_config("sudoku-tiny", None, [*TINY, "train.seed=7"])]
    trained = set()
    for cfg in cfgs:  # the run's and the baseline's train and test puzzles
        task = SudokuTask(cfg, log=lambda _: None)
        trained.update(S.equivalence_keys(np.concatenate([task.train_puzzles, task.test_puzzles])))
    assert not trained & set(S.equivalence_keys(puzzles))
    rounds = [S.deduction_rounds(p).rounds for p in puzzles[5:]]
    assert report["levels"][1]["rounds_max"] == max(rounds)

    # the figures are the model's own at K (with_steps): the 30-givens level at K = 3 with halting
    answers, steps, _ = solve_batches(with_steps(load_model(run), 3, True), puzzles[5:], 8, CPU)
    expected = figures(*counts(puzzles[5:], solutions[5:], answers, steps))
    row = next(r for r in rows if r["givens"] == 30 and r["halt_max_steps"] == 3 and r["mode"] == "halting")
    assert (row["puzzle_acc"], row["cell_acc"], row["mean_steps"]) == \
        (expected["puzzle_acc"], expected["cell_acc"], expected["val_halt_step"])

    md = (out / "ladder.md").read_text(encoding="utf-8")
    assert md in result.stdout and "| 30 | 5 | 51 |" in md and "K=3 (trained)" in md
    assert (out / "ladder.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    again = moe_cli(*args, in_process=True)
    assert again.returncode == 2 and "exists; pass --overwrite" in again.stderr, again.describe()


@pytest.mark.parametrize("extra, needle", [
    (["--ladder-size", "3"], "--ladder-size: only with --ladder"),
    (["--ladder", "--ladder-givens", "19"], "--ladder-givens: 19: expected numbers of givens in 22..80"),
    (["--ladder", "--ladder-givens", "40,x"], "--ladder-givens: 'x' is not a number of givens"),
    (["--ladder", "--ladder-size", "0"], "--ladder-size: expected a value in the range"),
])
def test_ladder_refusals(runs: tuple[Path, Path], tmp_path: Path, moe_cli, extra: list[str], needle: str) -> None:
    out = tmp_path / "out"
    result = moe_cli("eval", runs[0], "--out", out, *extra, in_process=True)
    assert result.returncode == 2 and needle in result.stderr and result.stderr.count("\n") == 1, result.describe()
    assert not out.exists()


def test_ladder_refuses_a_language_run(tmp_path: Path, moe_cli) -> None:
    cfg = build_config("tiny", None, [])
    run = tmp_path / "lm"
    torch.manual_seed(0)
    save_run(run, RecursiveMoE(cfg.model), "{}", cfg.run_sections())
    result = moe_cli("eval", run, "--ladder", "--out", tmp_path / "out", in_process=True)
    assert result.returncode == 2 and "expected a Sudoku run (train.task = 'sudoku')" in result.stderr, \
        result.describe()
    assert not (tmp_path / "out").exists()


def test_choose_tau_takes_the_fewest_steps_within_the_budget() -> None:
    """Four puzzles, three steps: solved from step 2 on except the last (never); halting is free to stop at step
    1 only where that answer is already right."""
    from train.halt_calibration import choose_tau, kept_steps

    solved = np.array([[1, 0, 0, 0], [1, 1, 0, 0], [1, 1, 1, 0]], dtype=bool)
    halt = np.array([[3.0, 2.0, 0.5, 1.0], [4.0, 3.0, 0.5, 1.5], [5.0, 4.0, 0.5, 2.0]])
    assert kept_steps(halt, 0.0).tolist() == [1, 1, 1, 1]  # the trained rule halts everything at once: 1/4
    tau, acc, steps = choose_tau(halt, solved, budget=0.0)
    assert acc == 0.75 and kept_steps(halt, tau).tolist()[:2] == [1, 2] and steps == kept_steps(halt, tau).mean()
    assert choose_tau(halt, solved, budget=0.5)[2] == 1.0  # half the puzzles may be lost: one step each


def test_calibrated_halting_is_the_run_s_own_and_never_compounds(tmp_path: Path, moe_cli) -> None:
    """--calibrate-halting folds the threshold into the halt head's bias: the run's weights then halt calibrated
    for every reader (load_model here), the record keeps the trained bias, and calibrating again gives the same."""
    from moe_core.run_layout import CALIBRATION_FILE
    from train.halt_calibration import kept_steps

    cfg = build_config("sudoku-tiny", None, TINY)
    run = tmp_path / "run"
    saved_run(run, cfg, seed=0)
    trained = load_model(run).halt_head.bias.item()
    args = ["eval", run, "--ladder", "--ladder-givens", "45", "--ladder-size", "4", "--steps", "1,4",
            "--calibrate-halting", "--halt-budget", "0.0", "--device", "cpu"]
    result = moe_cli(*args, "--out", tmp_path / "a", in_process=True)
    assert result.returncode == 0, result.describe()
    record = json.loads((run / CALIBRATION_FILE).read_text(encoding="utf-8"))
    assert record["trained_bias"] == trained and record["k"] == 4 and "halting calibrated at K = 4" in result.stdout
    model = load_model(run)
    assert model.halt_head.bias.item() == record["calibrated_bias"]
    task = SudokuTask(cfg, log=lambda _: None)
    answers, halt = solve_steps(model, task.test_puzzles, 4, 8, CPU)
    kept = kept_steps(halt, 0.0)  # the calibrated weights' own "> 0" rule
    solved = S.valid_solutions(task.test_puzzles, answers[kept - 1, np.arange(len(kept))]).mean()
    assert solved >= S.valid_solutions(task.test_puzzles, answers[-1]).mean()  # budget 0: nothing lost
    assert (kept.mean(), solved) == (record["steps_calibrated"], record["acc_calibrated"])
    again = moe_cli(*args, "--out", tmp_path / "b", in_process=True)
    assert again.returncode == 0 and json.loads((run / CALIBRATION_FILE).read_text(encoding="utf-8")) == record
    ladder = json.loads((tmp_path / "b" / "ladder.json").read_text(encoding="utf-8"))
    assert ladder["halt_calibration"] == record


def test_calibrating_a_run_without_recursion_is_refused(runs: tuple[Path, Path], tmp_path: Path, moe_cli) -> None:
    out = tmp_path / "out"
    result = moe_cli("eval", runs[1], "--ladder", "--calibrate-halting", "--out", out, in_process=True)
    assert result.returncode == 2 and "--calibrate-halting:" in result.stderr and "recursion off" in result.stderr
    assert result.stderr.count("\n") == 1 and not out.exists()


def test_calibration_is_a_writer_of_the_run_and_commits_weights_and_record_together(tmp_path: Path, moe_cli,
                                                                                   monkeypatch) -> None:
    """Calibration rewrites the run's weights: it holds the run's lock (a training run or another calibration holding
    it refuses this one before anything is read or written), and its two files are published all or nothing (a
    failure at the second leaves both as they were)."""
    import os

    from moe_core.common import files
    from moe_core.run_layout import CALIBRATION_FILE
    from train.rundir_lock import RunDirLock

    run = tmp_path / "run"
    saved_run(run, build_config("sudoku-tiny", None, TINY), seed=0)
    weights = (run / "model.safetensors").read_bytes()
    args = ["eval", run, "--ladder", "--ladder-givens", "45", "--ladder-size", "4", "--steps", "1,4",
            "--calibrate-halting", "--device", "cpu", "--out", tmp_path / "out"]
    with RunDirLock(run) as lock:
        lock.acquire()
        held = moe_cli(*args, in_process=True)
    assert held.returncode == 2 and "in use by another moe process" in held.stderr, held.describe()
    assert not (tmp_path / "out").exists() and not (run / CALIBRATION_FILE).exists()

    real = files._commit
    calls = []

    def weights_fail(tmp, path, overwrite):
        calls.append(path.name)
        if path.name == "model.safetensors":
            raise OSError(28, os.strerror(28))  # ENOSPC, at the last file of the set
        real(tmp, path, overwrite)

    monkeypatch.setattr(files, "_commit", weights_fail)
    failed = moe_cli(*args, in_process=True)
    assert failed.returncode == 2 and "nothing was written" in failed.stderr, failed.describe()
    assert calls[-2:] == [CALIBRATION_FILE, "model.safetensors"]  # the ladder's figures, then the run's two files
    assert (run / "model.safetensors").read_bytes() == weights and not (run / CALIBRATION_FILE).exists()
    assert sorted(p.name for p in run.iterdir()) == ["config.json", "model.safetensors", "tokenizer.json"]
    assert not (tmp_path / "out").exists(), "figures claiming a calibration stayed without it"


def test_a_nan_halt_budget_is_refused(runs: tuple[Path, Path], tmp_path: Path, moe_cli) -> None:
    result = moe_cli("eval", runs[0], "--ladder", "--calibrate-halting", "--halt-budget", "nan", "--out",
                     tmp_path / "o", in_process=True)
    assert result.returncode == 2 and "--halt-budget" in result.stderr and "got nan" in result.stderr
    assert result.stderr.count("\n") == 1 and not (tmp_path / "o").exists()


def test_a_calibration_record_the_bias_cannot_hold_is_refused(runs: tuple[Path, Path], tmp_path: Path,
                                                               moe_cli) -> None:
    import shutil

    from moe_core.run_layout import CALIBRATION_FILE

    run = tmp_path / "run"
    shutil.copytree(runs[0], run)
    (run / CALIBRATION_FILE).write_text('{"trained_bias": 1e308, "calibrated_bias": 0.5}\n', encoding="utf-8")
    result = moe_cli("eval", run, "--ladder", "--ladder-size", "4", "--calibrate-halting", "--device", "cpu",
                     "--out", tmp_path / "o", in_process=True)
    assert result.returncode == 2 and result.stderr.count("\n") == 1, result.describe()
    needle = f"{run / CALIBRATION_FILE}: trained_bias / calibrated_bias: expected numbers a torch.float32"
    assert needle in result.stderr


def test_calibrating_a_run_directory_it_cannot_write_is_refused_before_the_ladder(runs: tuple[Path, Path],
                                                                                   tmp_path: Path, moe_cli,
                                                                                   monkeypatch) -> None:
    """A read-only run directory (its lock file cannot be made) refuses calibration before the ladder runs, so no
    figures claim a calibration that is never written."""
    import errno
    import os

    import train.rundir_lock as rundir_lock

    real = os.open

    def read_only(path, flags, *args):
        if str(path).endswith(rundir_lock.LOCK_FILE) and flags & os.O_CREAT:
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))
        return real(path, flags, *args)

    monkeypatch.setattr(rundir_lock.os, "open", read_only)
    result = moe_cli("eval", runs[0], "--ladder", "--ladder-size", "4", "--calibrate-halting", "--device", "cpu",
                     "--out", tmp_path / "o", in_process=True)
    assert result.returncode == 2 and result.stderr.count("\n") == 1, result.describe()
    assert f"{runs[0]}: cannot lock the run directory (Read-only file system)" in result.stderr
    assert "ladder:" not in result.stdout and not (tmp_path / "o").exists()
