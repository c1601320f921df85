"""`moe serve --mode solve` and Server.solve: a Sudoku run exported to ONNX gives the eager model's answers and halting
steps exactly, every served solution is checked by the rules, and bad puzzles and mode / task mismatches fail cleanly.
One sudoku-tiny run is trained in-process and exported once for the whole module."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from helpers import assert_clean_failure, moe_serve, run_moe, write_jsonl

from export.onnx_export import export_run
from moe_core import MoeError, load_model
from moe_core.checkpoint import save_weights
from moe_core.run_layout import WEIGHTS_FILE
from moe_core.runtime.graph_contract import SERVE_MAX_STEPS
from moe_core.tasks import sudoku as S
from moe_core.tasks import sudoku_parity_inputs
from serve import Server
from serve.runtime import StepwiseModel
from train.checkpointing import saved_run_config
from train.sudoku_task import SudokuTask, solve_batches

STEPS = 8


@pytest.fixture(scope="module")
def sudoku(tmp_path_factory) -> tuple[Path, Path, SudokuTask]:
    """(run_dir, model.onnx, the run's task with its test puzzles) of a briefly trained sudoku-tiny run. The recursion
    is cut to H1 x L1 x 2 steps: the export unrolls every block call, and its tracing time grows with their number."""
    tmp = tmp_path_factory.mktemp("solve")
    run = tmp / "run"
    result = run_moe(["--preset", "sudoku-tiny", "--no-compile", "--device", "cpu", "--out", run,
                      "--set", f"train.max_steps={STEPS}", "--set", f"train.eval_every={STEPS}",
                      "--set", "model.H_cycles=1", "--set", "model.L_cycles=1", "--set", "model.halt_max_steps=2",
                      "--set", "sudoku.train=32", "--set", "sudoku.test=24"],
                     module="train", in_process=True)
    assert result.returncode == 0, result.describe()
    out = tmp / "sudoku.onnx"
    lines: list[str] = []
    export_run(run, out, log=lines.append)
    assert any("sudoku_grids" in line and "ok" in line for line in lines), lines  # parity on real puzzles too
    task = SudokuTask(saved_run_config(run), log=lambda _: None)
    return run, out, task


def test_a_sudoku_model_is_checked_on_what_serving_can_feed_it() -> None:
    """Parity inputs of a Sudoku model: 81-cell grids whose givens do not conflict (what `--mode solve` accepts),
    from a handful of givens up to solved grids; nothing else, where a deep recursion is ill-conditioned."""
    cases = sudoku_parity_inputs(S.VOCAB, S.CELLS, 3)
    assert [name for name, _, _ in cases] == ["sudoku_one", "sudoku_grids", "sudoku_hard", "sudoku_solved"]
    givens = []
    for _, ids, mask in cases:
        assert ids.shape[1] == S.CELLS and mask.all()
        assert all(S.conflict(g.astype(np.uint8)) is None for g in ids)
        givens += (ids > 0).sum(1).tolist()
    assert min(givens) <= 28 and max(givens) == S.CELLS
    again = sudoku_parity_inputs(S.VOCAB, S.CELLS, 3)  # deterministic under the seed
    assert all(np.array_equal(a[1], b[1]) for a, b in zip(cases, again, strict=True))


def read_rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def grids(rows: list[dict], key: str) -> np.ndarray:
    return np.array([[int(c) for c in r[key].replace(".", "0")] for r in rows], dtype=np.uint8)


def test_solve_reproduces_the_eager_model(sudoku, tmp_path):
    """Served answers and steps equal eager PyTorch's (train/sudoku_task.solve_batches, what evaluation runs) on the
    run's own test puzzles; the served accuracy is the one the trainer logged; valid is the rules' verdict."""
    run, onnx_path, task = sudoku
    puzzles, solutions = task.test_puzzles, task.test_solutions
    answers, steps, _ = solve_batches(load_model(run), puzzles, 16, torch.device("cpu"))
    pairs = enumerate(zip(puzzles, solutions, strict=True))
    records = [{"id": f"q{i}", "puzzle": S.format_grid(p), "solution": S.format_grid(s)} if i % 2 else
               {"text": S.format_grid(p).replace(".", "0")} for i, (p, s) in pairs]
    inp = write_jsonl(tmp_path / "in.jsonl", records)
    out = tmp_path / "out.jsonl"
    code, stdout, stderr = moe_serve(onnx_path, "--input", inp, "--output", out, "--mode", "solve", "--batch-size", 5)
    assert code == 0, stderr
    rows = read_rows(out)
    assert [r["id"] for r in rows] == [f"q{i}" if i % 2 else i + 1 for i in range(len(puzzles))]
    served = grids(rows, "solution")
    assert np.array_equal(served, answers) and [r["steps"] for r in rows] == steps.tolist()
    assert np.array_equal(grids(rows, "puzzle"), puzzles)
    valid = S.valid_solutions(puzzles, served)
    assert [r["valid"] for r in rows] == valid.tolist()
    assert [r.get("correct") for r in rows] == [bool((a == s).all()) if i % 2 else None
                                               for i, (a, s) in enumerate(zip(served, solutions, strict=True))]
    # The accuracy the trainer logged at its last evaluation (same weights, same puzzles) is the served one.
    last = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()
            if '"kind": "eval"' in line][-1]
    blank = puzzles == 0
    assert ((served == solutions) & blank).sum() / blank.sum() == pytest.approx(last["cell_acc"], abs=1e-12)
    assert valid.mean() == pytest.approx(last["puzzle_acc"], abs=1e-12)
    summary = stdout.strip().splitlines()[-1]
    n = len(puzzles)
    assert summary.startswith(f"solve: {n} puzzles | valid {valid.sum()}/{n}") and "rule-checked" in summary
    assert f"correct {sum(bool(r.get('correct')) for r in rows)}/{n // 2}" in summary
    assert f"mean steps {steps.mean():.2f}" in summary


def test_a_token_mlp_model_trains_exports_and_serves_as_eager(tmp_path):
    """model.token_mixer = "mlp" (TRM's token-mixing MLP) end to end: trained, exported with its step graph (parity,
    fixed 81-cell axis), served step-wise with the eager model's answers and steps."""
    run = tmp_path / "run"
    result = run_moe(["--preset", "sudoku-tiny", "--no-compile", "--device", "cpu", "--out", run,
                      "--set", "train.max_steps=4", "--set", "train.eval_every=4", "--set", "model.token_mixer=mlp",
                      "--set", "model.attn_bias=false", "--set", "model.H_cycles=1", "--set", "model.L_cycles=1",
                      "--set", "model.halt_max_steps=2", "--set", "sudoku.train=16", "--set",
                      "sudoku.test=8"], module="train", in_process=True)
    assert result.returncode == 0, result.describe()
    out = tmp_path / "mlp.onnx"
    lines: list[str] = []
    export_run(run, out, stepwise=True, log=lines.append)
    assert sum("sudoku_grids" in line and "ok" in line for line in lines) == 2, lines  # unrolled and step graph
    puzzles = S.generate(6, 5, givens=(30, 45)).puzzles
    answers, steps, _ = solve_batches(load_model(run), puzzles, 16, torch.device("cpu"))
    solved = Server.open(out, provider="cpu", threads=1).solve(puzzles)
    assert np.array_equal(np.array([[int(c) for c in r.solution] for r in solved], dtype=np.uint8), answers)
    assert [r.steps for r in solved] == steps.tolist()


def test_puzzle_file_input(sudoku, tmp_path):
    """A plain puzzle file (CSV with a header, '0' blanks) gives the same answers as the API; ids are positions."""
    _, onnx_path, task = sudoku
    puzzles, solutions = task.test_puzzles[:7], task.test_solutions[:7]
    inp = tmp_path / "puzzles.csv"
    lines = [f"{S.format_grid(p).replace('.', '0')},{S.format_grid(s)}\n"
             for p, s in zip(puzzles, solutions, strict=True)]
    inp.write_text("quizzes,solutions\n" + "".join(lines), encoding="utf-8")
    out = tmp_path / "out.jsonl"
    code, _, stderr = moe_serve(onnx_path, "--input", inp, "--output", out, "--mode", "solve")
    assert code == 0, stderr
    rows = read_rows(out)
    api = Server.open(onnx_path, provider="cpu", threads=1).solve(puzzles, solutions, batch_size=3)
    assert [r["id"] for r in rows] == list(range(1, 8))
    assert [{k: v for k, v in r.items() if k != "id"} for r in rows] == [r.as_record() for r in api]
    assert all("correct" in r for r in rows)


def test_valid_is_decided_by_the_rules(sudoku):
    """Whatever the model answers, `valid` is moe_core.tasks.sudoku's verdict: a right answer, a repeated digit and a
    changed given, through Server.solve with the model's logits replaced."""
    _, onnx_path, task = sudoku
    server = Server.open(onnx_path, provider="cpu", threads=1)
    p, s = task.test_puzzles[:3], task.test_solutions[:3].copy()
    wrong_digit, changed_given = s[1].copy(), s[2].copy()
    blank = int(np.argmax(p[1] == 0))
    wrong_digit[blank] = wrong_digit[blank] % 9 + 1  # the row now holds a digit twice
    given = int(np.argmax(p[2] > 0))
    row = given // 9 * 9
    other = next(c for c in range(row, row + 9) if p[2][c] == 0)  # swap a given with a blank of its row: rows stay
    changed_given[[given, other]] = changed_given[[other, given]]  # permutations, the given does not
    answers = {p[0].tobytes(): s[0], p[1].tobytes(): wrong_digit, p[2].tobytes(): changed_given}

    def fake_forward(rows, outputs):
        digits = np.stack([answers[r.astype(np.uint8).tobytes()] for r in rows])
        return [np.eye(10, dtype=np.float32)[digits], np.full(len(rows), 2, dtype=np.int64)]

    server._forward = fake_forward
    results = server.solve([S.format_grid(g) for g in p], list(s), batch_size=2)
    assert [(r.valid, r.correct, r.steps) for r in results] == [(True, True, 2), (False, False, 2), (False, False, 2)]
    assert S.why_invalid(p[1], wrong_digit) and "the given" in S.why_invalid(p[2], changed_given)
    assert server.stats.valid == 1 and server.stats.correct == 1 and server.stats.checked == 3


# -- bad input: one line naming the file and line, exit 2, no output -----------------------------------------------

def test_bad_puzzles_are_named_by_line(sudoku, tmp_path):
    _, onnx_path, task = sudoku
    good = json.dumps({"puzzle": S.format_grid(task.test_puzzles[0])}) + "\n"
    conflicting = "11" + S.format_grid(task.test_puzzles[0])[2:]
    unsolved = json.dumps({"puzzle": S.format_grid(task.test_puzzles[0]),
                           "solution": S.format_grid(task.test_solutions[1])})
    cases = [
        (good + '{"puzzle": "123"}\n', "in.jsonl", 'in.jsonl:2: "puzzle": a grid of 3 characters; expected 81'),
        (good + good + json.dumps({"text": "x" * 81}) + "\n", "in.jsonl",
         "in.jsonl:3: \"text\": character 'x' at cell 1"),
        (good + '{"id": 4}\n', "in.jsonl", 'in.jsonl:2: missing "puzzle" field'),
        (good + json.dumps({"puzzle": 81}) + "\n", "in.jsonl", 'in.jsonl:2: "puzzle" is a JSON number'),
        (good + json.dumps({"puzzle": conflicting}) + "\n", "in.jsonl", "in.jsonl:2: \"puzzle\": the givens conflict"),
        (good + unsolved + "\n", "in.jsonl", 'in.jsonl:2: "solution": does not solve the puzzle'),
        ("", "in.jsonl", "in.jsonl: no input records"),
        ("# puzzles\n" + S.format_grid(task.test_puzzles[0]) + "\n" + "5" * 80 + "\n", "in.txt",
         "in.txt:3 (puzzle): a grid of 80 characters"),
    ]
    for i, (content, name, message) in enumerate(cases):
        case = tmp_path / str(i)
        case.mkdir()
        inp = case / name
        inp.write_text(content, encoding="utf-8")
        assert_clean_failure(case, message, onnx_path, "--input", inp, "--mode", "solve")


def test_modes_other_than_solve_are_refused(sudoku, tmp_path):
    _, onnx_path, task = sudoku
    inp = write_jsonl(tmp_path / "in.jsonl", [{"text": S.format_grid(task.test_puzzles[0])}])
    for mode in ("score", "generate"):
        assert_clean_failure(tmp_path, f"sudoku.onnx: --mode {mode} needs a language model (task lm), but this "
                             "model's task is sudoku; use --mode solve", onnx_path, "--input", inp, "--mode", mode)
    server = Server.open(onnx_path, provider="cpu", threads=1)
    with pytest.raises(MoeError, match="task is sudoku"):
        server.score(["123"])


def test_eval_text_is_refused_for_a_sudoku_run(sudoku, tmp_path):
    from click.testing import CliRunner

    from moe_core.cli import cli

    text = tmp_path / "eval.txt"
    text.write_text("some text\n", encoding="utf-8")
    out = tmp_path / "m.onnx"
    r = CliRunner().invoke(cli, ["export", str(sudoku[0]), "--out", str(out), "--eval-text", str(text)])
    lines = [line for line in r.output.splitlines() if line.strip()]
    assert r.exit_code == 2 and len(lines) == 1 and "--eval-text: a language-model option" in lines[0], r.output
    assert "is a sudoku run" in lines[0] and not out.exists()


def test_eval_sweeps_halt_max_steps_and_writes_the_held_out_set(sudoku, tmp_path):
    """`moe eval`: one row per (K, mode); the halting row at the trained K is the trainer's last evaluation, the
    'all K' rows run exactly K steps; test_puzzles.txt is the run's held-out set, and serving it with the exported
    model gives the same number of correct answers."""
    run, onnx_path, task = sudoku
    base = tmp_path / "base"  # the same task and held-out set, recursion off
    result = run_moe(["--preset", "sudoku-tiny", "--no-compile", "--device", "cpu", "--out", base,
                      "--set", "train.max_steps=3", "--set", "model.recursive=false",
                      "--set", "sudoku.train=32", "--set", "sudoku.test=24"],
                     module="train", in_process=True)
    assert result.returncode == 0, result.describe()
    out = tmp_path / "eval"
    result = run_moe(["eval", run, "--halt-max-steps", "1,2-3", "--baseline", base, "--out", out, "--device", "cpu"],
                     in_process=True)
    assert result.returncode == 0, result.describe()
    rows = list(csv.DictReader((out / "eval.csv").open(encoding="utf-8")))
    assert [(int(r["halt_max_steps"]), r["mode"]) for r in rows] == [(k, m) for k in (1, 2, 3)
                                                                   for m in ("halting", "all K")] + [
        (1, "baseline: base (recursion off)")]
    base_last = [json.loads(line) for line in (base / "metrics.jsonl").read_text().splitlines()
                 if '"kind": "eval"' in line][-1]
    assert float(rows[-1]["cell_acc"]) == pytest.approx(base_last["cell_acc"], abs=1e-12)
    rows = rows[:-1]
    for r in rows:
        if r["mode"] == "all K":
            assert float(r["val_halt_step"]) == int(r["halt_max_steps"])
        assert float(r["val_halt_step"]) <= int(r["halt_max_steps"])
    last = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()
            if '"kind": "eval"' in line][-1]
    trained = next(r for r in rows if r["halt_max_steps"] == "2" and r["mode"] == "halting")
    for key in ("puzzle_acc", "cell_acc", "val_loss", "val_halt_step"):
        assert float(trained[key]) == pytest.approx(last[key], rel=1e-9, abs=1e-12), key
    assert "| **2** (trained) | halting |" in (out / "eval.md").read_text(encoding="utf-8")
    assert (out / "eval.png").stat().st_size > 0
    puzzles, solutions = S.read_puzzle_file(out / "test_puzzles.txt")
    assert np.array_equal(puzzles, task.test_puzzles) and np.array_equal(solutions, task.test_solutions)
    served = tmp_path / "served.jsonl"
    code, _, stderr = moe_serve(onnx_path, "--input", out / "test_puzzles.txt", "--output", served, "--mode", "solve")
    assert code == 0, stderr
    assert sum(r["correct"] for r in read_rows(served)) == round(float(trained["puzzle_acc"]) * len(puzzles))


@pytest.mark.parametrize("args, needle", [
    (["--halt-max-steps", "0"], "--halt-max-steps: '0': expected counts in 1..64"),
    (["--halt-max-steps", "3-1"], "expected counts in 1..64, low to high"),
    (["--halt-max-steps", "two"], "--halt-max-steps: 'two' is not a step count"),
])
def test_eval_refuses_bad_step_lists(sudoku, tmp_path, args, needle):
    result = run_moe(["eval", sudoku[0], *args, "--out", tmp_path / "e"], in_process=True)
    assert result.returncode == 2 and needle in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "e").exists()


def test_eval_refuses_a_directory_that_is_not_a_run(tmp_path):
    result = run_moe(["eval", tmp_path, "--out", tmp_path / "e"], in_process=True)
    assert result.returncode == 2 and ("not a run directory" in result.stderr or "config.json" in result.stderr)
    assert len(result.stderr.strip().splitlines()) == 1 and not (tmp_path / "e").exists()


def test_eval_refuses_before_any_evaluation(sudoku, tiny_run_dir, tmp_path):
    """Bad outputs and baselines are refused, one line each, before the sweep spends any time; existing outputs
    need --overwrite."""
    run = sudoku[0]
    (tmp_path / "file").write_text("x", encoding="utf-8")
    cases = [(["--out", tmp_path / "file" / "sub"], "cannot create the output directory"),
             (["--out", tmp_path / "e", "--baseline", tiny_run_dir], "a 'lm' run; expected the task of"),
             (["--out", tmp_path / "e", "--baseline", tmp_path / "nothing"], "not a run directory")]
    if not torch.cuda.is_available():
        cases.append((["--out", tmp_path / "e", "--device", "cuda"], "--device: 'cuda' requested but no CUDA"))
    for args, needle in cases:
        result = run_moe(["eval", run, "--halt-max-steps", "1", *args], in_process=True)
        assert result.returncode == 2 and needle in result.stderr, (args, result.describe())
        assert len(result.stderr.strip().splitlines()) == 1 and "K=" not in result.stdout
        assert not list((tmp_path / "e").glob("*")) if (tmp_path / "e").exists() else True
    (tmp_path / "e").mkdir(exist_ok=True)
    (tmp_path / "e" / "eval.md").write_text("old", encoding="utf-8")
    result = run_moe(["eval", run, "--halt-max-steps", "1", "--out", tmp_path / "e"], in_process=True)
    assert result.returncode == 2 and "eval.md: exists; pass --overwrite" in result.stderr
    assert (tmp_path / "e" / "eval.md").read_text(encoding="utf-8") == "old"


def test_eval_of_a_language_model_run(tiny_run_dir, tmp_path):
    """`moe eval` is task-generic: on a language-model run it reports val loss and ppl against K."""
    out = tmp_path / "lm"
    result = run_moe(["eval", tiny_run_dir, "--halt-max-steps", "1-2", "--out", out, "--device", "cpu"],
                     in_process=True)
    assert result.returncode == 0, result.describe()
    rows = list(csv.DictReader((out / "eval.csv").open(encoding="utf-8")))
    assert [(r["halt_max_steps"], r["mode"]) for r in rows] == [("1", "halting"), ("1", "all K"), ("2", "halting"),
                                                               ("2", "all K")]
    assert all(float(r["val_loss"]) > 0 and float(r["val_ppl"]) > 1 for r in rows)
    assert "| val loss | ppl |" in (out / "eval.md").read_text(encoding="utf-8")
    assert not (out / "test_puzzles.txt").exists() and (out / "eval.png").exists()


def test_serve_runs_the_steps_the_run_validated_by_default(sudoku, tmp_path):
    """`moe eval --ladder --calibrate-halting` validates a K (the halting threshold is chosen there); export passes it
    on (metadata serve_max_steps) while the weights are the calibrated ones, and serve runs that many steps on the
    step graph by default: the answers of --max-steps K, which still overrides."""
    run = tmp_path / "run"
    shutil.copytree(sudoku[0], run)
    result = run_moe(["eval", run, "--ladder", "--ladder-givens", "45", "--ladder-size", "4", "--steps", "1,4",
                      "--calibrate-halting", "--device", "cpu", "--out", tmp_path / "ladder"], in_process=True)
    assert result.returncode == 0, result.describe()
    out = tmp_path / "m.onnx"
    export_run(run, out, check=False, stepwise=True, log=lambda _: None)
    assert {p.key: p.value for p in onnx.load(str(out)).metadata_props}[SERVE_MAX_STEPS] == "4"
    served = Server.open(out, provider="cpu", threads=1)
    assert isinstance(served.model, StepwiseModel) and served.model.n_steps == 4
    assert "serving up to 4 steps" in served.steps_note()
    assert Server.open(out, provider="cpu", threads=1, max_steps=2).model.n_steps == 2
    puzzles = sudoku[2].test_puzzles[:8]
    explicit = Server.open(out, provider="cpu", threads=1, max_steps=4).solve(puzzles)
    assert [(r.solution, r.steps) for r in served.solve(puzzles)] == [(r.solution, r.steps) for r in explicit]

    model = load_model(run)  # new weights published since the calibration: its K no longer applies
    with torch.no_grad():
        model.halt_head.bias.add_(1.0)
    save_weights(model, run / WEIGHTS_FILE)
    export_run(run, out, check=False, stepwise=True, overwrite=True, log=lambda _: None)
    assert SERVE_MAX_STEPS not in {p.key for p in onnx.load(str(out)).metadata_props}
