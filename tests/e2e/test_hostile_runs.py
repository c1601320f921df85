"""Hostile input to the training side: two writers on one run directory (moe train, --resume, moe ablate,
torchrun), a run resumed from another directory, out-of-range seeds, unplottable metrics, a bad `moe eval
--baseline`, a corpus too small for its settings, and model.vocab_size above what the corpus's BPE can reach.

Every refusal is one line `error: ...` on stderr with exit code 2 and leaves the directories as they were."""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from helpers import REPO, CliResult, finish, run_moe, spawn_moe, subprocess_env, tiny_train_args
from tokenizers import Tokenizer

from moe_core.run_layout import LOCK_FILE, METRICS_FILE, STATE_DIR
from train.checkpointing import checkpoint_sets
from train.rundir_lock import RunDirLock


def snapshot(run: Path) -> dict[str, tuple[int, int, bytes]]:
    """Every file and directory below `run` with its size, mtime and (for files) content."""
    return {str(p.relative_to(run)): (p.stat().st_size, p.stat().st_mtime_ns, p.read_bytes() if p.is_file() else b"")
            for p in sorted(run.rglob("*"))}


def error_line(result: CliResult) -> str:
    """The refusal's single stderr line (asserting exit code 2, exactly one line, no traceback)."""
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), result.describe()
    assert "Traceback" not in result.stdout + result.stderr
    return lines[0]


def in_use(run: Path, pid: int) -> str:
    return f"error: {run}: in use by another moe process (pid {pid}); "


# -----------------------------------------------------------------------------
# one writer per run directory


@pytest.mark.parametrize("planted", ["symlink", "fifo"])
def test_a_lock_file_that_is_not_one_is_never_opened_through(tiny_run_dir: Path, tmp_path: Path,
                                                            planted: str) -> None:
    """RUN_DIR/.lock is opened, never followed: a symlink planted there (to a file the writer could write) or a FIFO
    (whose open would block) is refused in one line, and what it points to is untouched."""
    run = tmp_path / "run"
    shutil.copytree(tiny_run_dir, run)
    victim = tmp_path / "victim.txt"
    victim.write_text("precious\n", encoding="utf-8")
    if planted == "symlink":
        (run / LOCK_FILE).symlink_to(victim)
    else:
        os.mkfifo(run / LOCK_FILE)
    line = error_line(run_moe(["--resume", run], module="train", in_process=True))
    what = "a symbolic link" if planted == "symlink" else "not a regular file"
    assert line.startswith(f"error: {run / LOCK_FILE}: {what}; expected the lock file"), line
    assert victim.read_text(encoding="utf-8") == "precious\n"


def test_a_second_writer_is_refused_and_changes_nothing(corpus_file: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    first = spawn_moe(tiny_train_args(corpus_file, run, steps=100_000) + ["--set", "train.checkpoint_every=1"],
                      module="train")
    try:
        deadline = time.monotonic() + 300
        while not checkpoint_sets(run):
            assert first.poll() is None, finish(first).describe()
            assert time.monotonic() < deadline, "the first run wrote no checkpoint"
            time.sleep(0.05)
        os.kill(first.pid, signal.SIGSTOP)  # frozen: from here on only the second writer could change the run
        assert (run / LOCK_FILE).read_text(encoding="ascii").strip() == str(first.pid)
        before = snapshot(run)
        for args in (["--resume", run], tiny_train_args(corpus_file, run) + ["--overwrite"]):
            line = error_line(run_moe(args, module="train", in_process=True))
            assert line.startswith(in_use(run, first.pid)), line
        line = error_line(run_moe(tiny_train_args(corpus_file, run), module="train", in_process=True))
        assert line.startswith(in_use(run, first.pid)), line  # in use, rather than "not empty"
        assert snapshot(run) == before  # no metrics appended or trimmed, no checkpoint, no lock file rewritten
    finally:
        first.kill()  # SIGKILL (a stopped process too): the kernel releases its lock
        finish(first)
    assert (run / LOCK_FILE).is_file()  # a killed writer's lock file stays, unlocked: readers pay it no mind
    assert run_moe(["plot", run], in_process=True).returncode == 0
    result = run_moe(["eval", run, "--halt-max-steps", "1", "--device", "cpu", "--out", tmp_path / "eval"],
                     in_process=True)
    assert result.returncode == 0, result.describe()
    newest = checkpoint_sets(run)[-1][0]
    result = run_moe(["--resume", run, "--set", f"train.max_steps={newest + 2}"], module="train", in_process=True)
    assert result.returncode == 0 and "resume: " in result.stdout, result.describe()
    assert not [p for p in (run / STATE_DIR).iterdir() if p.name.startswith(".")]  # temp sets tidied
    assert not (run / LOCK_FILE).exists()  # a writer that finishes removes its lock file


def test_ablate_locks_its_output_and_each_variant(corpus_file: Path, tmp_path: Path) -> None:
    out = tmp_path / "ablation"
    out.mkdir()
    args = ["ablate", "--preset", "tiny", "--no-compile", "--only", "recursive", "--steps", "1", "--data",
            corpus_file, "--set", "model.vocab_size=300", "--set", "train.device=cpu", "--set", "train.plots=false",
            "--out", out]
    with RunDirLock(out) as lock:  # this test process is the other writer
        lock.acquire()
        before = snapshot(out)
        assert error_line(run_moe(args, in_process=True)).startswith(in_use(out, os.getpid()))
        assert snapshot(out) == before
    variant = out / "recursive"
    variant.mkdir()
    (variant / "notes.txt").write_text("kept\n", encoding="utf-8")
    with RunDirLock(variant) as lock:
        lock.acquire()
        before = snapshot(variant)
        result = run_moe([*args, "--overwrite"], in_process=True)  # a failed variant is a row of the table
        assert result.returncode == 2, result.describe()
        assert f"variant recursive failed: {in_use(variant, os.getpid())[len('error: '):]}" in result.stderr
        assert snapshot(variant) == before
    report = (out / "ablation.md").read_text(encoding="utf-8")
    assert f"in use by another moe process (pid {os.getpid()})" in report


def test_under_torchrun_rank_0_takes_the_lock_and_every_rank_stops(tiny_run_dir: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    shutil.copytree(tiny_run_dir, run)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "train",
           "--resume", str(run)]
    with RunDirLock(run) as lock:
        lock.acquire()
        before = snapshot(run)
        proc = subprocess.run(cmd, cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=300)
        assert snapshot(run) == before
    assert proc.returncode != 0
    assert in_use(run, os.getpid()) in proc.stderr, proc.stderr[-3000:]
    assert f"rank 1: stopping, rank 0 could not lock {run}" in proc.stderr, proc.stderr[-3000:]


# -----------------------------------------------------------------------------
# resume from another directory


def test_resume_reads_the_data_where_the_run_was_started(tiny_run_dir: Path, corpus_file: Path, tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    start, elsewhere = tmp_path / "start", tmp_path / "elsewhere"
    start.mkdir()
    elsewhere.mkdir()
    shutil.copy(corpus_file, start / "corpus.txt")
    shutil.copy(tiny_run_dir / "tokenizer.json", start / "tok.json")
    monkeypatch.chdir(start)
    args = tiny_train_args(Path("corpus.txt"), Path("run"), steps=2) + ["--tokenizer", "tok.json"]
    result = run_moe(args, module="train", in_process=True)  # relative --data, --tokenizer and --out
    assert result.returncode == 0, result.describe()
    run = start / "run"
    saved = json.loads((run / "config.json").read_text(encoding="utf-8"))["train"]
    assert os.path.isabs(saved["data"]) and os.path.samefile(saved["data"], start / "corpus.txt")
    assert os.path.isabs(saved["tokenizer"]) and os.path.samefile(saved["tokenizer"], start / "tok.json")

    monkeypatch.chdir(elsewhere)
    result = run_moe(["--resume", run, "--set", "train.max_steps=3"], module="train", in_process=True)
    assert result.returncode == 0 and "resume: " in result.stdout, result.describe()

    # A run saved with a relative path keeps resolving it against the directory it is resumed from.
    config = json.loads((run / "config.json").read_text(encoding="utf-8"))
    config["train"]["data"] = "corpus.txt"
    (run / "config.json").write_text(json.dumps(config), encoding="utf-8")
    assert "corpus.txt: no such file" in error_line(run_moe(["--resume", run], module="train", in_process=True))
    monkeypatch.chdir(start)
    result = run_moe(["--resume", run, "--set", "train.max_steps=4"], module="train", in_process=True)
    assert result.returncode == 0 and "resume: " in result.stdout, result.describe()


# -----------------------------------------------------------------------------
# config and data


@pytest.mark.parametrize("seed", [-1, 2**63, 2**64 - 1])
def test_a_seed_out_of_range_is_refused_before_anything_is_created(corpus_file: Path, tmp_path: Path,
                                                                    seed: int) -> None:
    out = tmp_path / "run"
    result = run_moe(tiny_train_args(corpus_file, out) + ["--set", f"train.seed={seed}"], module="train",
                     in_process=True)
    assert error_line(result) == f"error: config: train.seed: expected an integer in 0..{2**63 - 1}, got {seed}"
    assert not out.exists()


def test_a_corpus_too_small_is_named(tmp_path: Path) -> None:
    small, out = tmp_path / "small.txt", tmp_path / "run"
    small.write_text("Hello world. " * 10, encoding="utf-8")
    line = error_line(run_moe(tiny_train_args(small, out), module="train", in_process=True))
    assert line.startswith(f"error: {small}: corpus too small: ") and "model.max_seq_len" in line, line
    assert not out.exists()


def test_vocab_size_above_the_corpus_bpe_is_lowered_to_the_tokenizer(corpus_file: Path, tmp_path: Path) -> None:
    """Also: the largest seed trains (the derived batch and rank seeds wrap into 64 bits), and a stale lock file
    (its holder gone) in an otherwise empty directory is no obstacle."""
    out = tmp_path / "run"
    out.mkdir()
    (out / LOCK_FILE).write_text("999999\n", encoding="ascii")
    args = tiny_train_args(corpus_file, out, steps=1) + ["--set", "model.vocab_size=5000",
                                                         "--set", f"train.seed={2**63 - 1}"]
    result = run_moe(args, module="train", in_process=True)
    assert result.returncode == 0, result.describe()
    n = Tokenizer.from_file(str(out / "tokenizer.json")).get_vocab_size()
    assert f"note: model.vocab_size 5000 lowered to {n}: the BPE trained on {corpus_file}" in result.stdout
    config = json.loads((out / "config.json").read_text(encoding="utf-8"))
    assert config["model"]["vocab_size"] == n < 5000
    first_eval = json.loads((out / "metrics.jsonl").read_text(encoding="utf-8").splitlines()[0])
    assert first_eval["uniform_baseline"] == pytest.approx(math.log(n))


# -----------------------------------------------------------------------------
# moe plot and moe eval


def metrics_dir(tmp_path: Path, *records: dict) -> Path:
    run = tmp_path / "metrics-only"
    run.mkdir()
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return run


def test_plot_without_a_config_draws_what_the_metrics_hold(tmp_path: Path) -> None:
    run = metrics_dir(tmp_path, *({"kind": "train", "step": s, "halt_step_mean": 2.0} for s in (1, 2)))
    result = run_moe(["plot", run], in_process=True)  # no config.json: the halting axis comes from the data
    assert result.returncode == 0 and result.stdout.split() == [str(run / "plots" / "halting.png")], \
        result.describe()


def test_plot_leaves_out_values_too_large_to_draw_and_says_so(tmp_path: Path) -> None:
    # finite, but matplotlib's axis around such values overflows
    run = metrics_dir(tmp_path, *({"kind": "train", "step": s, "lm_loss": 1e308, "lr": 1e-3} for s in (1, 2)))
    result = run_moe(["plot", run], in_process=True)
    assert result.returncode == 0 and "lr.png" in result.stdout, result.describe()
    assert result.stderr.strip() == (f"note: {run / 'metrics.jsonl'}: 2 value(s) beyond ±1e+300 left out of the "
                                     f"plots, too large to draw (lm_loss; the first at step 1)")


def test_eval_refuses_a_bad_baseline_before_creating_anything(tiny_run_dir: Path, corpus_file: Path,
                                                              tmp_path: Path) -> None:
    run = tmp_path / "run"
    shutil.copytree(tiny_run_dir, run)
    for baseline in (corpus_file, tmp_path / "missing"):
        for out in ([], ["--out", tmp_path / "eval"]):  # the default output directory is RUN/eval
            result = run_moe(["eval", run, "--baseline", baseline, "--device", "cpu", *out], in_process=True)
            assert f"error: {baseline}: not a run directory" in error_line(result)
            assert not (tmp_path / "eval").exists() and not (run / "eval").exists()


@pytest.mark.parametrize("ids, error, message", [
    (lambda T, V: torch.zeros(1, T + 1, dtype=torch.long), ValueError, "input_ids: expected shape [batch >= 1, seq in"),
    (lambda T, V: torch.full((1, 3), -1), ValueError, "input_ids: expected token ids in 0.."),
    (lambda T, V: torch.full((1, 3), V), ValueError, "input_ids: expected token ids in 0.."),
    (lambda T, V: torch.zeros(1, 3), TypeError, "input_ids: expected an int64 tensor"),
    (lambda T, V: torch.zeros(3, dtype=torch.long), ValueError, "input_ids: expected shape"),
    (lambda T, V: [[1, 2]], TypeError, "input_ids: expected an int64 tensor"),
], ids=["too-long", "negative", "past-vocab", "float", "1-D", "list"])
def test_the_model_api_names_a_bad_argument(tiny_run_dir, ids, error, message):
    from moe_core import load_model

    model = load_model(tiny_run_dir)
    cfg = model.config
    with pytest.raises(error, match=re.escape(message)):
        model(ids(cfg.max_seq_len, cfg.vocab_size))
    with pytest.raises(ValueError, match=re.escape("attention_mask: expected the shape of input_ids")):
        model(torch.zeros(1, 3, dtype=torch.long), torch.ones(1, 4, dtype=torch.long))


def test_resume_names_a_bad_set_as_one_and_never_cuts_a_run_back(tiny_run_dir: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    shutil.copytree(tiny_run_dir, run)
    before = snapshot(run)
    line = error_line(run_moe(["--resume", run, "--set", "train.max_steps=abc"], module="train", in_process=True))
    assert line.startswith("error: --set: train.max_steps: expected an integer"), line
    line = error_line(run_moe(["--resume", run, "--set", "train.max_steps=1"], module="train", in_process=True))
    assert "--set train.max_steps=1: the run is at step" in line and "a run is never cut back" in line, line
    assert snapshot(run) == before  # config.json unchanged


def test_resuming_a_complete_run_whose_log_was_removed_evaluates_it_again(tiny_run_dir: Path, tmp_path: Path) -> None:
    """The summary of a complete run describes its weights: with metrics.jsonl gone, the resumed run evaluates them
    again (the same figures the run logged) instead of failing."""
    run = tmp_path / "run"
    shutil.copytree(tiny_run_dir, run)
    logged = [json.loads(line) for line in (run / METRICS_FILE).read_text(encoding="utf-8").splitlines()]
    (run / METRICS_FILE).unlink()
    result = run_moe(["--resume", run], module="train", in_process=True)
    assert result.returncode == 0 and "run is complete" in result.stdout, result.describe()
    again = [json.loads(line) for line in (run / METRICS_FILE).read_text(encoding="utf-8").splitlines()]
    last = [r for r in logged if r["kind"] == "eval"][-1]
    assert again[0]["kind"] == "eval" and again[0]["step"] == last["step"]
    assert again[0]["val_loss"] == pytest.approx(last["val_loss"], rel=1e-6)  # same weights, same batches
