"""Training with carried rows (train.supervision = "carry", TRM's deep supervision): one update per supervision
step, rows kept across updates until they halt, halted rows refilled; its schedule, its halting and exploration
rules, determinism under the seed, exact resume with the rows in the checkpoint; and the model pieces it needs
(a carried forward step, evaluation that stops once all halted)."""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import pytest
import torch
from helpers import run_moe
from safetensors.torch import load_file

from moe_core.common.errors import ConfigError
from moe_core.model import Carry, ModelOutput, RecursiveMoE
from moe_core.tasks import sudoku as S
from train.carry import CarriedRows, carry_steps
from train.config import build_config
from train.sudoku_task import SudokuTask

STEPS = 12
CARRY = ["train.supervision=carry", "model.halt_max_steps=4", "train.halt_explore=0.5", "train.batch_size=8",
         "sudoku.train=32", "sudoku.test=8"]


def cli_args(out: Path, *extra: str) -> list[str]:
    sets = [*CARRY, f"train.max_steps={STEPS}", "train.eval_every=6", "train.checkpoint_every=3",
            "train.keep_checkpoints=20", "train.log_every=1", "train.plots=false", "model.dropout=0.1",
            "train.ema_decay=0.9", "train.keep_best=true", "sudoku.val=6", "sudoku.val_givens=45",
            *extra]
    return ["--preset", "sudoku-tiny", "--no-compile", "--device", "cpu", "--out", str(out),
            *[a for s in sets for a in ("--set", s)]]


def records(run: Path) -> list[dict]:
    out = []
    for line in (run / "metrics.jsonl").read_text(encoding="utf-8").splitlines():
        r = json.loads(line)
        if r["kind"] == "summary":
            r = {k: v for k, v in r.items() if k in ("kind", "val_loss", "puzzle_acc", "hard_puzzle_acc", "steps")}
        r.pop("tokens_per_s", None)
        out.append(r)
    return out


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("carry") / "reference"
    result = run_moe(cli_args(out), module="train", in_process=True)
    assert result.returncode == 0, result.describe()
    return out


def test_a_carried_run_is_a_function_of_its_seed(reference: Path, tmp_path: Path) -> None:
    """Rows, refills, exploration and halting depend on the seed and the rows' state only: the same run again
    logs the same records (halt histograms included) and ends with the same weights."""
    again = tmp_path / "again"
    assert run_moe(cli_args(again), module="train", in_process=True).returncode == 0
    assert records(again) == records(reference)
    a, b = load_file(reference / "model.safetensors"), load_file(again / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    train = [r for r in records(reference) if r["kind"] == "train"]
    assert [r["step"] for r in train] == list(range(1, STEPS + 1))
    # every row halts by its 4th step at the latest: 8 rows over 12 updates halt at least 16 times
    assert sum(sum(r["halt_hist"]) for r in train) >= 16 and all(len(r["halt_hist"]) == 4 for r in train)
    assert all(r["carry_steps"] == 4 for r in train)
    for r in train:  # the mean of the rows that halted since the last record, when any did
        n = sum(r["halt_hist"])
        assert ("halt_step_mean" in r) == (n > 0)
        if n:
            assert r["halt_step_mean"] == pytest.approx(sum(i * c for i, c in enumerate(r["halt_hist"], 1)) / n,
                                                        abs=1e-6)
    evals = [r for r in records(reference) if r["kind"] == "eval"]
    assert all("hard_puzzle_acc" in r and "hard_halt_step" in r for r in evals)


def test_a_carried_run_resumes_bit_identically(reference: Path, tmp_path: Path) -> None:
    """Killed after any checkpoint (or before the first), resumed: the rows carried at that checkpoint are
    restored, and the run ends as the one that never stopped (weights, EMA, best, every logged value)."""
    seed = random.randrange(1 << 30)
    resume_at = random.Random(seed).choice([0, *range(3, STEPS, 3)])
    run = tmp_path / "stopped"
    shutil.copytree(reference, run)
    for s in run.glob("trainer_state/step-*"):
        if int(s.name.split("-")[1]) > resume_at:
            shutil.rmtree(s)
    if resume_at:
        saved = load_file(run / "trainer_state" / f"step-{resume_at:08d}" / "optimizer.safetensors")
        assert {"rows.0.z_H", "rows.0.x", "rows.0.steps", "rows.0.halted"} <= set(saved)
    result = run_moe(["--resume", run], module="train", in_process=True)
    assert result.returncode == 0, f"seed {seed}, resumed at {resume_at}: " + result.describe()
    last = sorted((reference / "trainer_state").glob("step-*"))[-1].name
    for name in ("model.safetensors", f"trainer_state/{last}/model.safetensors",
                 f"trainer_state/{last}/ema.safetensors", f"trainer_state/{last}/optimizer.safetensors"):
        a, b = load_file(reference / name), load_file(run / name)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), \
            f"seed {seed}, resumed at {resume_at}: {name} differs"
    assert records(run) == records(reference), f"seed {seed}, resumed at {resume_at}"


@pytest.fixture(scope="module")
def task() -> SudokuTask:
    return SudokuTask(build_config("sudoku-tiny", None, CARRY), log=lambda _: None)


def test_rows_halt_by_the_head_after_their_minimum_or_at_the_limit(task: SudokuTask) -> None:
    """A row halts when its halt logit is > 0 and it has taken its minimum number of steps, or when it has taken
    carry_steps; halted rows are refilled from the step's batch and start from the initial carry, the others keep
    their puzzle and carry."""
    model = RecursiveMoE(task.cfg.model)
    rows = CarriedRows(task.cfg, model, task, slice(None), torch.device("cpu"))
    x, y, carry = rows.inputs(0)
    assert torch.equal(x, task.batch(0, slice(None))[0]) and rows.state.steps.eq(0).all()
    init = model.initial_carry(*x.shape)
    assert torch.equal(carry.z_H, init.z_H) and torch.equal(carry.z_L, init.z_L)
    rows.state.min_steps = torch.tensor([1, 1, 3, 1, 1, 1, 1, 1])
    q = torch.tensor([5.0, -5.0, 5.0, -5.0, 5.0, -5.0, -5.0, -5.0])
    after = Carry(torch.randn_like(carry.z_H), torch.randn_like(carry.z_L))
    rows.update(ModelOutput(x, torch.ones(8, dtype=torch.long), [], q[None], carry=after), step=0)
    assert rows.state.halted.tolist() == [True, False, False, False, True, False, False, False]  # row 2: min 3
    x1, _, carry1 = rows.inputs(1)
    fresh, batch = rows.state.steps == 0, task.batch(1, slice(None))[0]
    assert fresh.tolist() == [True, False, False, False, True, False, False, False]
    assert torch.equal(x1[fresh], batch[fresh]) and torch.equal(x1[~fresh], x[~fresh])
    assert torch.equal(carry1.z_H[fresh], init.z_H[fresh]) and torch.equal(carry1.z_H[~fresh], after.z_H[~fresh])
    for step in range(1, 4):  # no head halts: every row stops at carry_steps = 4
        rows.update(ModelOutput(x, torch.ones(8, dtype=torch.long), [], torch.full((1, 8), -5.0), carry=after), step)
        if step < 3:
            rows.inputs(step + 1)
    assert rows.state.halted[~fresh].all() and rows.state.steps[~fresh].eq(4).all()
    assert rows.halt_hist(4).tolist() == [2, 0, 0, 6] and rows.halt_hist(4).tolist() == [0, 0, 0, 0]


def test_exploration_and_the_growing_limit_follow_the_config() -> None:
    """carry_steps grows linearly from carry_steps_start to halt_max_steps over carry_ramp_frac of the run; the
    exploring rows' minimum is drawn in 2..carry_steps, the others' is 1."""
    cfg = build_config("sudoku-tiny", None, [*CARRY, "model.halt_max_steps=16", "train.carry_steps_start=4",
                                             "train.carry_ramp_frac=0.5", "train.max_steps=100",
                                             "train.halt_explore=0.5", "train.batch_size=64"])
    assert [carry_steps(cfg, s) for s in (0, 25, 49, 50, 99)] == [4, 10, 15, 16, 16]
    task = SudokuTask(cfg, log=lambda _: None)
    rows = CarriedRows(cfg, RecursiveMoE(cfg.model), task, slice(None), torch.device("cpu"))
    rows.inputs(60)
    m = rows.state.min_steps
    assert set(m.tolist()) - {1} <= set(range(2, 17)) and 10 <= int((m > 1).sum()) <= 54  # about half explore


@pytest.mark.parametrize("override, needle", [
    (["train.supervision=sometimes"], "supervision: expected batch or carry"),
    (["train.supervision=carry", "train.carry_steps_start=9"], "carry_steps_start: expected at most"),
    (["train.supervision=carry", "model.recursive=false"], "the baseline has no carry"),
    (["train.halt_explore=1.5"], "halt_explore: expected in [0, 1]"),
    (["sudoku.val=-1"], "sudoku.val: expected >= 0"),
])
def test_carry_settings_are_checked(override: list[str], needle: str) -> None:
    with pytest.raises(ConfigError, match=needle.replace("[", r"\[").replace("]", r"\]")):
        build_config("sudoku-tiny", None, override)
    with pytest.raises(ConfigError, match="'carry' needs a task whose halt target"):
        build_config("tiny", None, ["train.supervision=carry"])


def test_hard_validation_set_is_held_out_and_ranks_evaluations_first() -> None:
    cfg = build_config("sudoku-tiny", None, ["sudoku.train=16", "sudoku.test=8", "sudoku.val=5",
                                             "sudoku.val_givens=44"])
    task = SudokuTask(cfg, log=lambda _: None)
    assert task.val_puzzles.shape == (5, 81) and ((task.val_puzzles > 0).sum(1) == 44).all()
    held = set(S.equivalence_keys(task.train_puzzles)) | set(S.equivalence_keys(task.test_puzzles))
    assert not held & set(S.equivalence_keys(task.val_puzzles))
    assert task.best_by == ("hard_puzzle_acc", "puzzle_acc", "cell_acc")
    ev = task.evaluate(RecursiveMoE(cfg.model), torch.device("cpu"), torch.autocast("cpu", enabled=False))
    assert ev["hard_puzzle_acc"] == 0.0 and ev["hard_halt_step"] == cfg.model.halt_max_steps


def test_carried_forward_is_one_step_of_the_recursion(make_config) -> None:
    """forward(carry=c) is model.step from c: its logits, its halt logit and the carry after it (detached)."""
    torch.manual_seed(0)
    model = RecursiveMoE(make_config(dropout=0.0)).train()
    ids = torch.randint(0, 97, (3, 16))
    c = model.initial_carry(3, 16)
    out = model(ids, carry=c)
    c2, h, q = model.step(c, model.embed_inputs(ids), None)
    assert torch.allclose(out.logits, model.lm_head(h)) and torch.equal(out.halt_logits, q[None])
    assert torch.allclose(out.carry.z_H, c2.z_H) and not out.carry.z_H.requires_grad
    assert len(out.step_logits) == 1 and out.aux_losses
    with pytest.raises(ValueError, match="a carried step is a training step"):
        model.eval()(ids, carry=c)


def test_evaluation_stops_once_every_sample_halted(make_config) -> None:
    """stop_when_halted skips the steps after the batch's last halt: the same logits and halt steps."""
    from helpers import vary_routing

    torch.manual_seed(1)
    model = vary_routing(RecursiveMoE(make_config(halt_max_steps=6, causal=False))).eval()
    with torch.no_grad():
        model.halt_head.bias.fill_(3.0)  # every sample halts early
        ids = torch.randint(0, 97, (4, 16))
        full, short = model(ids), model(ids, stop_when_halted=True)
    assert torch.equal(full.logits, short.logits) and torch.equal(full.halt_step, short.halt_step)
    assert int(full.halt_step.max()) < 6
