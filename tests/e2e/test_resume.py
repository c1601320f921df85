"""Exact resume: a real `moe train` killed (SIGKILL, SIGTERM) at random steps and resumed ends with the same
weights, val losses and metrics as the same run left alone; checkpoint sets, the torn metrics line, the
numerical guard and the resume errors."""

from __future__ import annotations

import json
import random
import signal
from pathlib import Path

import pytest
import torch
from helpers import run_moe, spawn_moe, stop_at
from safetensors.torch import load_file

STEPS = 24


def train_args(corpus: Path, out: Path, *extra: str) -> list[str]:
    # dropout > 0: the global RNG matters, so the test also proves the RNG state is restored
    return ["--preset", "tiny", "--no-compile", "--data", str(corpus), "--device", "cpu", "--out", str(out),
            "--set", "model.vocab_size=300", "--set", "model.dropout=0.1", "--set", f"train.max_steps={STEPS}",
            "--set", "train.eval_every=8", "--set", "train.checkpoint_every=3", "--set", "train.keep_checkpoints=2",
            "--set", "train.log_every=1", "--set", "train.eval_batches=2", "--set", "train.plots=false", *extra]


def records(run_dir: Path) -> list[dict]:
    """metrics.jsonl without the wall-clock fields (everything else must match exactly)."""
    out = []
    for line in (run_dir / "metrics.jsonl").read_text(encoding="utf-8").splitlines():
        r = json.loads(line)
        if r["kind"] == "summary":
            r = {k: v for k, v in r.items() if k in ("kind", "val_loss", "steps", "skipped_steps",
                                                      "median_grad_norm_after_warmup")}
        r.pop("tokens_per_s", None)
        out.append(r)
    return out


def assert_same_run(a: Path, b: Path) -> None:
    wa, wb = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    assert wa.keys() == wb.keys()
    different = [k for k in wa if not torch.equal(wa[k], wb[k])]
    assert not different, f"weights differ bit-wise in {different[:5]}"
    ra, rb = records(a), records(b)
    assert [r["step"] for r in ra if r["kind"] == "train"] == list(range(1, STEPS + 1))
    assert ra == rb


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory, corpus_file: Path) -> Path:
    out = tmp_path_factory.mktemp("resume") / "reference"
    result = run_moe(train_args(corpus_file, out), module="train")
    assert result.returncode == 0, result.describe()
    return out


def test_sigkill_at_random_steps_then_resume_is_bit_identical(reference: Path, corpus_file: Path,
                                                              tmp_path: Path) -> None:
    seed = random.randrange(1 << 30)
    rng = random.Random(seed)
    out = tmp_path / "killed"
    # first kill: before the first checkpoint (step 0..2) or after it; the second one inside the resumed run
    k1 = rng.choice([0, rng.randint(1, 2), rng.randint(3, STEPS // 2)])
    k2 = rng.randint(k1 + 1, STEPS - 2)
    killed = stop_at(spawn_moe(train_args(corpus_file, out), module="train"), out, k1, signal.SIGKILL)
    assert killed.returncode == -signal.SIGKILL, f"seed {seed}: " + killed.describe()
    killed = stop_at(spawn_moe(["--resume", out], module="train"), out, k2, signal.SIGKILL)
    assert killed.returncode == -signal.SIGKILL, f"seed {seed}: " + killed.describe()
    result = run_moe(["--resume", out], module="train")
    assert result.returncode == 0, f"seed {seed}, kills at {k1}, {k2}: " + result.describe()
    assert "resume: " in result.stdout
    assert_same_run(reference, out)
    sets = sorted(p.name for p in (out / "trainer_state").iterdir())
    assert sets == [f"step-{s:08d}" for s in (STEPS - 3, STEPS)], sets  # keep_checkpoints=2, no temp dirs


def test_sigterm_checkpoints_then_resume_is_bit_identical(reference: Path, corpus_file: Path, tmp_path: Path) -> None:
    out = tmp_path / "terminated"
    step = random.randint(4, STEPS - 4)
    result = stop_at(spawn_moe(train_args(corpus_file, out), module="train"), out, step, signal.SIGTERM)
    assert result.returncode == 128 + signal.SIGTERM, result.describe()
    message = result.stderr.strip().splitlines()[-1]
    assert message.startswith("interrupted by SIGTERM at step ") and f"--resume {out}" in message, message
    stopped_at = int(message.split("at step ")[1].split(":")[0])
    assert stopped_at >= step
    assert (out / "trainer_state" / f"step-{stopped_at:08d}" / "state.json").is_file()
    with open(out / "metrics.jsonl", "a", encoding="utf-8") as f:
        f.write('{"kind": "train", "step": 9')  # a torn last line, as a kill mid-write leaves it
    result = run_moe(["--resume", out], module="train")
    assert result.returncode == 0, result.describe()
    assert_same_run(reference, out)


def test_resume_a_finished_run_and_extend_it(reference: Path, tmp_path: Path) -> None:
    import shutil

    run = tmp_path / "run"
    shutil.copytree(reference, run)
    result = run_moe(["--resume", run], module="train", in_process=True)
    assert result.returncode == 0 and "run is complete at step 24" in result.stdout, result.describe()
    result = run_moe(["--resume", run, "--set", f"train.max_steps={STEPS + 3}"], module="train", in_process=True)
    assert result.returncode == 0, result.describe()
    assert json.loads((run / "config.json").read_text(encoding="utf-8"))["train"]["max_steps"] == STEPS + 3
    assert [r["step"] for r in records(run) if r["kind"] == "train"][-3:] == [STEPS + 1, STEPS + 2, STEPS + 3]


@pytest.mark.parametrize("args,needle", [
    (["--set", "model.d_model=64"], "model.d_model cannot change when resuming"),
    (["--set", "train.lr=1"], "train.lr cannot change when resuming"),
    (["--out", "elsewhere"], "--out cannot be combined"),
    (["--preset", "tiny"], "--preset cannot be combined"),
])
def test_resume_refuses_changes(reference: Path, args: list[str], needle: str) -> None:
    before = sorted((p.name, p.stat().st_mtime_ns) for p in reference.rglob("*"))
    result = run_moe(["--resume", reference, *args], module="train", in_process=True)
    assert result.returncode == 2 and needle in result.stderr, result.describe()
    assert sorted((p.name, p.stat().st_mtime_ns) for p in reference.rglob("*")) == before


def test_resume_errors(reference: Path, tmp_path: Path) -> None:
    import shutil

    result = run_moe(["--resume", tmp_path / "nothing"], module="train", in_process=True)
    assert result.returncode == 2 and "not a run directory" in result.stderr, result.describe()

    other_data = tmp_path / "other.txt"
    other_data.write_text("Completely different words here.\n" * 400, encoding="utf-8")
    run = tmp_path / "run"
    shutil.copytree(reference, run)
    config = json.loads((run / "config.json").read_text(encoding="utf-8"))
    config["train"]["data"] = str(other_data)
    (run / "config.json").write_text(json.dumps(config), encoding="utf-8")
    result = run_moe(["--resume", run], module="train", in_process=True)
    assert result.returncode == 2 and "training data differs" in result.stderr, result.describe()

    shutil.rmtree(run)
    shutil.copytree(reference, run)
    state = sorted((run / "trainer_state").glob("step-*"))[-1] / "state.json"
    meta = json.loads(state.read_text(encoding="utf-8"))
    state.write_text(json.dumps({**meta, "format": 99}), encoding="utf-8")
    result = run_moe(["--resume", run], module="train", in_process=True)
    assert result.returncode == 2 and "checkpoint format 99" in result.stderr, result.describe()


def test_non_finite_steps_are_skipped_then_stop(monkeypatch: pytest.MonkeyPatch, corpus_file: Path,
                                                tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from moe_core.common.errors import MoeError
    from train import tasks, trainer
    from train.config import build_config

    real_loss = tasks.training_loss
    calls = {"n": 0}
    poisoned: set[int] = set()

    def loss_with_nan(out, *args, **kwargs):  # poison the router's gradient on chosen steps
        calls["n"] += 1
        total, parts = real_loss(out, *args, **kwargs)
        if calls["n"] in poisoned:
            router_param = trainer_model["m"].param_groups()["router"][0]
            total = total + (router_param * float("nan")).sum()
        return total, parts

    trainer_model: dict = {}
    real_init = trainer.Trainer.__init__

    def init(self, cfg, run_dir, device, data, model, *args):
        trainer_model["m"] = model
        real_init(self, cfg, run_dir, device, data, model, *args)

    monkeypatch.setattr(tasks, "training_loss", loss_with_nan)
    monkeypatch.setattr(trainer.Trainer, "__init__", init)
    cfg = build_config("tiny", None, ["train.compile=false", "train.device=\"cpu\"", f"train.data=\"{corpus_file}\"",
                                      "model.vocab_size=300", "train.max_steps=8", "train.max_bad_steps=3"])

    poisoned.update({3, 4})
    result = trainer.train(cfg, tmp_path / "skips")
    assert result["skipped_steps"] == 2 and result["steps"] == 8
    skips = [r for r in records(tmp_path / "skips") if r["kind"] == "skip"]
    assert [(r["step"], r["in_a_row"]) for r in skips] == [(3, 1), (4, 2)]
    assert "router" in skips[0]["reason"] and "decay" not in skips[0]["reason"]
    out = capsys.readouterr().out
    assert "step 3: skipped (loss is finite, gradient non-finite in parameter group(s) router)" in out

    calls["n"] = 0
    poisoned.update(range(1, 100))
    cfg.train.max_steps = 8
    with pytest.raises(MoeError, match=r"step 3: stopped after 3 steps in a row .* parameter group\(s\) router"):
        trainer.train(cfg, tmp_path / "stops")


def test_metrics_go_to_tensorboard_when_installed(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """The optional TensorBoard sink gets every numeric train/eval field, and resume purges after the checkpoint."""
    from train import metrics_log

    calls: list[tuple] = []

    class FakeWriter:
        def __init__(self, log_dir: Path, purge_step: int) -> None:
            calls.append(("open", Path(log_dir).name, purge_step))

        def add_scalar(self, name: str, value: float, step: int) -> None:
            calls.append((name, value, step))

        def flush(self) -> None: ...

        def close(self) -> None: ...

    monkeypatch.setattr(metrics_log, "_tensorboard_writer", FakeWriter)
    log = metrics_log.MetricsLog(tmp_path / "metrics.jsonl")
    log.write({"kind": "train", "step": 3, "loss": 2.5, "L1.moe_load": [0.25, 0.75], "note": "text"})
    log.write({"kind": "eval", "step": 3, "val_loss": 2.0})
    log.write({"kind": "summary", "val_loss": 2.0})
    assert calls == [("open", "tensorboard", 1), ("train/loss", 2.5, 3), ("train/L1.moe_load/0", 0.25, 3),
                     ("train/L1.moe_load/1", 0.75, 3), ("eval/val_loss", 2.0, 3)]
    calls.clear()
    metrics_log.MetricsLog(tmp_path / "metrics.jsonl", keep_until=2)
    assert calls == [("open", "tensorboard", 3)]
    assert (tmp_path / "metrics.jsonl").read_text(encoding="utf-8") == ""  # step-3 records dropped on resume


def test_ema_and_keep_best_resume_exactly(corpus_file: Path, tmp_path: Path) -> None:
    """With train.ema_decay and train.keep_best, a run resumed from any checkpoint (or from none) ends as the run
    that never stopped: raw and EMA weights, the best evaluation's weights and record, every logged value — also
    when the stopped run had already kept a best from after that checkpoint, and left a torn best behind."""
    import shutil

    from moe_core.checkpoint import load_model
    from train.checkpointing import read_best
    from train.config import build_config
    from train.tasks import make_task

    extra = ["--set", "train.ema_decay=0.9", "--set", "train.keep_best=true", "--set", "train.keep_checkpoints=20"]
    reference = tmp_path / "reference"
    result = run_moe(train_args(corpus_file, reference, *extra), module="train", in_process=True)
    assert result.returncode == 0, result.describe()
    evals = [r for r in records(reference) if r["kind"] == "eval"]
    best = read_best(reference)
    first_lowest = min(evals, key=lambda r: r["val_loss"])  # min keeps the first of equal ones, as keep_best does
    assert best["step"] == first_lowest["step"] and best["weights"] == "ema"
    assert best["figures"]["val_loss"] == first_lowest["val_loss"]
    state = reference / "trainer_state"
    assert (reference / "model.safetensors").read_bytes() == (state / "best" / "model.safetensors").read_bytes()
    last = sorted(state.glob("step-*"))[-1]
    assert load_file(last / "ema.safetensors").keys() == load_file(last / "model.safetensors").keys()
    # the exported weights are the ones evaluated: evaluating them again gives the kept evaluation's figures
    cfg = build_config("tiny", None, [f"train.data={str(corpus_file)!r}", "model.vocab_size=300",
                                      "train.eval_batches=2"])
    tok = (reference / "tokenizer.json").read_text(encoding="utf-8")
    again = make_task(cfg, tok, lambda _: None).evaluate(load_model(reference), torch.device("cpu"),
                                                         torch.autocast("cpu", enabled=False))
    assert again["val_loss"] == best["figures"]["val_loss"]

    seed = random.randrange(1 << 30)
    resume_at = random.Random(seed).choice([0, *range(3, STEPS, 3)])
    run = tmp_path / "stopped"
    shutil.copytree(reference, run)
    for s in run.glob("trainer_state/step-*"):  # as if killed after the checkpoint at resume_at
        if int(s.name.split("-")[1]) > resume_at:
            shutil.rmtree(s)
    shutil.copytree(run / "trainer_state" / "best", run / "trainer_state" / ".best.tmp")  # a torn save of the best
    result = run_moe(["--resume", run], module="train", in_process=True)
    assert result.returncode == 0, f"seed {seed}, resumed at {resume_at}: " + result.describe()
    for name in ("model.safetensors", "trainer_state/best/model.safetensors",
                 f"trainer_state/{last.name}/model.safetensors", f"trainer_state/{last.name}/ema.safetensors"):
        a, b = load_file(reference / name), load_file(run / name)
        assert all(torch.equal(a[k], b[k]) for k in a), f"seed {seed}, resumed at {resume_at}: {name} differs"
    assert read_best(run) == best and records(run) == records(reference)
    assert not (run / "trainer_state" / ".best.tmp").exists()
