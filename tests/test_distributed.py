"""Data-parallel training on torchrun (CPU, gloo, 2 processes): two ranks with a per-rank batch of b give the
same weights as one process with batch 2b, and a 2-rank run stopped with SIGTERM resumes bit-identically."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import REPO, CliResult, finish, run_moe, subprocess_env
from safetensors.torch import load_file
from test_resume import stop_at

STEPS = 8
NO_AUX = [f"train.{name}_weight=0" for name in ("moe_balance", "moe_z", "moh_balance", "moh_complexity",
                                                 "moh_sparsity")]


def args(corpus: Path, out: Path, *sets: str) -> list[str]:
    base = ["--preset", "tiny", "--no-compile", "--data", str(corpus), "--device", "cpu", "--out", str(out),
            "--set", "model.vocab_size=300", "--set", f"train.max_steps={STEPS}", "--set", "train.batch_size=8",
            "--set", "train.eval_every=4", "--set", "train.log_every=1", "--set", "train.checkpoint_every=2",
            "--set", "train.eval_batches=2"]
    return base + [a for s in sets for a in ("--set", s)]


def spawn_torchrun(train_args: list[str], nproc: int = 2) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           "-m", "train", *map(str, train_args)]
    return subprocess.Popen(cmd, cwd=REPO, env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)


def weights_diff(a: Path, b: Path) -> float:
    wa, wb = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    assert wa.keys() == wb.keys()
    return max((wa[k] - wb[k]).abs().max().item() for k in wa)


def train_records(run_dir: Path) -> list[dict]:
    lines = (run_dir / "metrics.jsonl").read_text(encoding="utf-8").splitlines()
    return [r for r in map(json.loads, lines) if r["kind"] == "train"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory, corpus_file: Path) -> dict[str, tuple[CliResult, Path]]:
    """One process with batch 8 and two ranks with 4 each, with the aux losses off (see the test) and on."""
    root = tmp_path_factory.mktemp("ddp")
    procs = {
        "ddp": (spawn_torchrun(args(corpus_file, root / "ddp", *NO_AUX)), root / "ddp"),
        "ddp_aux": (spawn_torchrun(args(corpus_file, root / "ddp_aux")), root / "ddp_aux"),
    }
    try:
        results = {name: (finish(p, timeout=300), out) for name, (p, out) in procs.items()}
    finally:
        for p, _ in procs.values():
            if p.poll() is None:
                p.kill()
    for name, sets in (("single", NO_AUX), ("single_aux", [])):
        out = root / name
        results[name] = (run_moe(args(corpus_file, out, *sets), module="train"), out)
    return results


def test_two_ranks_match_one_process_with_the_global_batch(runs) -> None:
    for result, _ in runs.values():
        assert result.returncode == 0, result.describe()
    (ddp, ddp_dir), (_, single_dir) = runs["ddp"], runs["single"]
    assert "config:" in ddp.stdout and ddp.stdout.count("config:") == 1  # rank 0 speaks for both
    assert ddp.stdout.count("done: val loss") == 1
    # Same global batch, gradients averaged over ranks: equal up to float summation order.
    assert weights_diff(ddp_dir, single_dir) < 1e-6
    for a, b in zip(train_records(ddp_dir), train_records(single_dir), strict=True):
        assert a["lm_loss"] == pytest.approx(b["lm_loss"], abs=1e-5)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-4)
        assert a["halt_hist"] == b["halt_hist"]  # statistics reduced over ranks: counts over all 8 samples
        assert sum(a["halt_hist"]) == 8
        assert a["L1.moh_heads"] == pytest.approx(b["L1.moh_heads"], abs=1e-4)
        assert a["L1.moe_load"] == pytest.approx(b["L1.moe_load"], abs=1e-4)
    # Only rank 0 writes: one metrics file, checkpoint sets, plots; no stray files.
    assert (ddp_dir / "plots").is_dir() and (ddp_dir / "trainer_state").is_dir()


def test_aux_losses_are_per_rank(runs) -> None:
    """With the aux losses on, each rank balances its own tokens (as Switch Transformer balances per device), so
    the runs are close but not equal: the balance losses are non-linear in the batch's routing statistics."""
    (_, ddp_dir), (_, single_dir) = runs["ddp_aux"], runs["single_aux"]
    ddp, single = train_records(ddp_dir), train_records(single_dir)
    assert ddp[0]["lm_loss"] == pytest.approx(single[0]["lm_loss"], abs=1e-5)  # same weights, same batch
    for a, b in zip(ddp, single, strict=True):
        assert a["lm_loss"] == pytest.approx(b["lm_loss"], abs=2e-2)


def test_resume_under_torchrun_is_bit_identical(runs, corpus_file: Path, tmp_path: Path) -> None:
    reference, out = runs["ddp"][1], tmp_path / "stopped"
    result = stop_at(spawn_torchrun(args(corpus_file, out, *NO_AUX)), out, 3, signal.SIGTERM)
    assert result.returncode != 0, result.describe()
    assert "interrupted by SIGTERM" in result.stderr, result.describe()
    assert len(list((out / "trainer_state").glob("step-*"))) >= 1
    result = finish(spawn_torchrun(["--resume", out]))
    assert result.returncode == 0, result.describe()
    wa, wb = load_file(reference / "model.safetensors"), load_file(out / "model.safetensors")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert [r["lm_loss"] for r in train_records(out)] == [r["lm_loss"] for r in train_records(reference)]
