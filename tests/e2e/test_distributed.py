"""Data-parallel training on torchrun (CPU, gloo, 2 processes), with DDP and with FSDP2 (train.parallel=fsdp):
two ranks with a per-rank batch of b give the same weights as one process with batch 2b, a 2-rank run stopped
with SIGTERM resumes bit-identically, and FSDP's sharded checkpoints (per-rank safetensors + a JSON index) are
what load_model reads, merged.

Every run of the file starts at once in the module fixture (the ranks of a run wait on each other, so
concurrent runs fill the gaps): ~55 s and ~100 CPU-seconds on 2 shared CPU cores. `moe export` reads a run
through load_model, tested here on a sharded run; the export itself (~40 s even with --no-check) is not
repeated here (test_export.py covers it on an unsharded run)."""

from __future__ import annotations

import json
import math
import re
import shutil
import signal
import subprocess
import sys
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from helpers import REPO, CliResult, finish, run_moe, stop_at, subprocess_env
from safetensors.torch import load_file

from moe_core import CheckpointError, load_model
from moe_core.run_layout import SHARD_INDEX, WEIGHTS_FILE
from train.distributed import Dist
from train.schedule import lr_multiplier, warmup_steps

STEPS = 8
NO_AUX = [f"train.{name}_weight=0" for name in ("moe_balance", "moe_z", "moh_balance", "moh_complexity",
                                                 "moh_sparsity")]
FSDP = "train.parallel=fsdp"
PLOTS = "train.plots=true"
FP32_U = 2.0 ** -24  # float32 unit roundoff
LOGGED = 1e-6  # metrics.jsonl rounds losses and statistics to 6 decimals: two roundings add at most 1e-6


def args(corpus: Path, out: Path, *sets: str) -> list[str]:
    base = ["--preset", "tiny", "--no-compile", "--data", str(corpus), "--device", "cpu", "--out", str(out),
            "--set", "model.vocab_size=300", "--set", f"train.max_steps={STEPS}", "--set", "train.batch_size=8",
            "--set", "train.eval_every=4", "--set", "train.log_every=1", "--set", "train.checkpoint_every=2",
            "--set", "train.eval_batches=3",  # 3 batches (8, 8, 7 rows) on 2 ranks: uneven shares
            "--set", "train.plots=false"]  # drawn by the runs that check rank 0 alone draws them (PLOTS)
    return base + [a for s in sets for a in ("--set", s)]


def spawn_torchrun(train_args: list[str], nproc: int = 2) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           "-m", "train", *map(str, train_args)]
    return subprocess.Popen(cmd, cwd=REPO, env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)


def merged_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    """A run's weights: model.safetensors, or (FSDP) the rank files concatenated on dim 0 as the index says —
    read here without moe_core, so the test checks load_model's merge against an independent one."""
    if not (run_dir / SHARD_INDEX).exists():
        return load_file(run_dir / WEIGHTS_FILE)
    index = json.loads((run_dir / SHARD_INDEX).read_text(encoding="utf-8"))
    files = [load_file(run_dir / name) for name in index["files"]]
    return {name: torch.cat([f[name] for f in files]) if info["sharded"] else files[0][name]
            for name, info in index["tensors"].items()}


def weights_diff(a: Path, b: Path) -> float:
    wa, wb = merged_weights(a), merged_weights(b)
    assert wa.keys() == wb.keys()
    return max((wa[k] - wb[k]).abs().max().item() for k in wa)


def train_records(run_dir: Path) -> list[dict]:
    lines = (run_dir / "metrics.jsonl").read_text(encoding="utf-8").splitlines()
    return [r for r in map(json.loads, lines) if r["kind"] == "train"]


def run_config(run_dir: Path) -> dict:
    return json.loads((run_dir / "config.json").read_text(encoding="utf-8"))


def summation_error(cfg: dict) -> float:
    """Relative difference two fp32 summation orders can make in a training step's sums: N terms summed in any
    order are within gamma_N = N*u / (1 - N*u) of exact (Higham), and no sum here has more than one term per
    (token, block call): a weight's gradient, the loss (per token and step), the statistics."""
    m, t = cfg["model"], cfg["train"]
    n = t["batch_size"] * m["max_seq_len"] * m["halt_max_steps"] * m["H_cycles"] * (m["L_cycles"] + 1) * m["n_layers"]
    return n * FP32_U / (1 - n * FP32_U)


def adamw_drift(cfg: dict, rel: float) -> float:
    """Largest |w - w'| after STEPS AdamW steps on gradients that differ by a relative `rel`. The step is
    lr * m/(sqrt(v) + eps) with |m| <= A*sqrt(v) for any gradients (Cauchy-Schwarz on the bias-corrected moment
    sums), whatever their scale; `rel` moves m by <= A*rel*sqrt(v) and sqrt(v) by <= rel*sqrt(v), so the step by
    <= 2*A*rel*lr. Decoupled weight decay multiplies a difference by 1 - lr*wd < 1. Summed over the schedule at
    the largest LR multiplier."""
    t = cfg["train"]
    b1, b2 = t["beta1"], t["beta2"]
    a = max((1 - b1) / (1 - b1 ** k) * math.sqrt((1 - b2 ** k) / (1 - b2) * sum((b1 * b1 / b2) ** j for j in range(k)))
            for k in range(1, STEPS + 1))
    lr = t["lr"] * max([1.0, *(v for k, v in t.items() if k.endswith("lr_mult"))])
    warmup = warmup_steps(STEPS, t["warmup_frac"])
    return 2 * a * rel * sum(lr * lr_multiplier(s, STEPS, warmup, t["min_lr_ratio"]) for s in range(STEPS))


def routing_counts(record: dict, cfg: dict) -> tuple[list[int], int]:
    """Layer 1's routing decisions of a step as counts, with how many decisions they count: [heads chosen, then
    (token, slot) pairs per expert], over the step's tokens and block calls (the logged means times these
    denominators; rounding to 6 decimals moves the products by < 0.01)."""
    m = cfg["model"]
    tokens = cfg["train"]["batch_size"] * m["max_seq_len"] * m["halt_max_steps"] * m["H_cycles"] * (m["L_cycles"] + 1)
    counts = [round(record["L1.moh_heads"] * tokens), *(round(f * tokens * m["top_k"]) for f in record["L1.moe_load"])]
    return counts, tokens * (1 + m["top_k"])


def assert_same_routing(a: dict, b: dict, cfg: dict) -> None:
    """Routing decisions agree but for near-ties. From step 2 on the weights differ by summation order, and a choice
    whose margin is within that difference may go either way in the two runs (export/parity.py allows at most
    NEAR_TIES_PER_1000 of them per 1,000 decisions; the same bound here). Statistics not reduced over ranks, or a
    rank routing other rows, would move these counts by a fraction of the whole."""
    from export.parity import NEAR_TIES_PER_1000

    (ca, n), (cb, _) = routing_counts(a, cfg), routing_counts(b, cfg)
    flips = sum(abs(x - y) for x, y in zip(ca, cb, strict=True))
    assert flips <= max(1, n * NEAR_TIES_PER_1000 // 1000), (a["step"], ca, cb)


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory, corpus_file: Path) -> dict[str, tuple[CliResult, Path]]:
    """All at once: two ranks with 4 rows each (DDP and FSDP, aux losses off — see the test — and DDP with them
    on), one process with batch 8 (aux off and on), and for DDP and FSDP a 2-rank run stopped with SIGTERM after
    step 3 ("NAME_stopped") then resumed under torchrun ("NAME_resumed")."""
    root = tmp_path_factory.mktemp("dist")
    procs: list[subprocess.Popen] = []

    def torchrun(train_args: list) -> subprocess.Popen:
        procs.append(spawn_torchrun(train_args))
        return procs[-1]

    def full_run(name: str, *sets: str) -> Callable[[], dict[str, tuple[CliResult, Path]]]:
        return lambda: {name: (finish(torchrun(args(corpus_file, root / name, *sets)), timeout=300), root / name)}

    def stop_and_resume(name: str, *sets: str) -> Callable[[], dict[str, tuple[CliResult, Path]]]:
        def run() -> dict[str, tuple[CliResult, Path]]:
            out = root / f"{name}_resumed"
            stopped = stop_at(torchrun(args(corpus_file, out, *sets)), out, 3, signal.SIGTERM)
            return {f"{name}_stopped": (stopped, out), f"{name}_resumed": (finish(torchrun(["--resume", out])), out)}
        return run

    def single_runs() -> dict[str, tuple[CliResult, Path]]:  # in-process (one at a time): no import cost
        return {name: (run_moe(args(corpus_file, root / name, *sets), module="train", in_process=True), root / name)
                for name, sets in (("single", NO_AUX), ("single_aux", []))}

    jobs = [full_run("ddp", PLOTS, *NO_AUX), full_run("fsdp", FSDP, PLOTS, *NO_AUX), full_run("ddp_aux"), single_runs,
            stop_and_resume("ddp", *NO_AUX), stop_and_resume("fsdp", FSDP, *NO_AUX)]
    try:
        with ThreadPoolExecutor(len(jobs)) as pool:
            return {k: v for future in [pool.submit(job) for job in jobs] for k, v in future.result().items()}
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_two_ranks_match_one_process_with_the_global_batch(runs, mode: str) -> None:
    for name in (mode, "single"):
        assert runs[name][0].returncode == 0, runs[name][0].describe()
    (ranks, ranks_dir), (_, single_dir) = runs[mode], runs["single"]
    assert "config:" in ranks.stdout and ranks.stdout.count("config:") == 1  # rank 0 speaks for both
    assert ranks.stdout.count("done: val loss") == 1
    # Same global batch, gradients averaged over ranks: every sum of a step equal up to its summation order
    # (relative `rel`), to first order in the differences. A rank whose gradient is dropped or mis-weighted moves
    # weights by ~lr (3e-3, routers 3e-2) per step; scaling every gradient alike is what grad_norm catches.
    cfg = run_config(single_dir)
    rel = summation_error(cfg)
    assert weights_diff(ranks_dir, single_dir) <= adamw_drift(cfg, rel)
    records, single_records = train_records(ranks_dir), train_records(single_dir)
    # Step 1 runs the same weights on the same rows: loss and gradient norms differ by summation order only (the
    # norm also sums n_params squares in another order: relative n_params * u / 2 after the square root).
    n_params = sum(w.numel() for w in merged_weights(single_dir).values())
    norm_rel = rel + n_params * FP32_U / 2
    a, b = records[0], single_records[0]
    assert abs(a["lm_loss"] - b["lm_loss"]) <= rel * b["lm_loss"] + LOGGED
    assert abs(a["grad_norm"] - b["grad_norm"]) <= norm_rel * b["grad_norm"]  # FSDP: the global norm of the shards
    assert abs(a["grad_norm.router"] - b["grad_norm.router"]) <= norm_rel * b["grad_norm.router"] + LOGGED
    for a, b in zip(records, single_records, strict=True):  # decisions at every step
        assert a["halt_hist"] == b["halt_hist"]  # statistics reduced over ranks: counts over all 8 samples
        assert sum(a["halt_hist"]) == 8
        assert_same_routing(a, b, cfg)
    evals = [[r["val_loss"] for r in map(json.loads, (d / "metrics.jsonl").read_text().splitlines())
              if r["kind"] == "eval"] for d in (ranks_dir, single_dir)]
    # The eval batches split over ranks, counted once: at step 0 (same weights) equal up to summation order.
    assert len(evals[0]) == len(evals[1]) and abs(evals[0][0] - evals[1][0]) <= rel * evals[1][0]
    # Only rank 0 writes: one metrics file, checkpoint sets, plots; no stray files.
    assert (ranks_dir / "plots").is_dir() and (ranks_dir / "trainer_state").is_dir()


def test_aux_losses_are_per_rank(runs) -> None:
    """With the aux losses on, each rank balances its own tokens (as Switch Transformer balances per device), so
    the runs are close but not equal: the balance losses are non-linear in the batch's routing statistics."""
    (_, ddp_dir), (_, single_dir) = runs["ddp_aux"], runs["single_aux"]
    ddp, single = train_records(ddp_dir), train_records(single_dir)
    plain = train_records(runs["single"][1])
    cfg = run_config(single_dir)
    # Same weights, same batch at step 1: the lm loss differs by summation order only.
    assert abs(ddp[0]["lm_loss"] - single[0]["lm_loss"]) <= summation_error(cfg) * single[0]["lm_loss"] + LOGGED
    # Balancing each rank's half of the batch instead of the whole changes the run by less than the aux losses
    # change it at all (aux off vs on, same weights and batches).
    per_rank = sum(abs(a["lm_loss"] - b["lm_loss"]) for a, b in zip(ddp, single, strict=True))
    aux_effect = sum(abs(a["lm_loss"] - b["lm_loss"]) for a, b in zip(single, plain, strict=True))
    assert per_rank <= aux_effect + len(single) * LOGGED, (per_rank, aux_effect)


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_resume_under_torchrun_is_bit_identical(runs, mode: str) -> None:
    (result, out), reference = runs[f"{mode}_stopped"], runs[mode][1]
    assert result.returncode != 0, result.describe()
    assert "interrupted by SIGTERM" in result.stderr, result.describe()
    assert len(list((out / "trainer_state").glob("step-*"))) >= 1
    result = runs[f"{mode}_resumed"][0]
    assert result.returncode == 0, result.describe()
    wa, wb = merged_weights(reference), merged_weights(out)
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert [r["lm_loss"] for r in train_records(out)] == [r["lm_loss"] for r in train_records(reference)]


def test_fsdp_checkpoints_are_sharded_and_load_model_merges_them(runs, tmp_path: Path) -> None:
    run = runs["fsdp"][1]
    files = [f"model-{STEPS:08d}-rank{r:05d}-of-00002.safetensors" for r in range(2)]
    for step_dir in sorted((run / "trainer_state").glob("step-*")):
        names = {p.name for p in step_dir.iterdir()}
        step = int(step_dir.name.removeprefix("step-"))
        assert names == {"state.json", SHARD_INDEX, *(f"{kind}-{step:08d}-rank{r:05d}-of-00002.safetensors"
                                                       for kind in ("model", "optimizer") for r in range(2))}
        meta = json.loads((step_dir / "state.json").read_text(encoding="utf-8"))
        assert meta["format"] == 2 and meta["world_size"] == 2 and meta["step"] == step
        assert meta["optimizer"]["tensors"]["opt.0.exp_avg"]["sharded"] and meta["param_groups"]
    # The run directory publishes the last set's shards and index instead of model.safetensors (and nothing older).
    assert sorted(p.name for p in run.glob("model*")) == sorted([*files, SHARD_INDEX])
    index = json.loads((run / SHARD_INDEX).read_text(encoding="utf-8"))
    assert index["world_size"] == 2 and index["step"] == STEPS and index["files"] == files
    emb = index["tensors"]["embed.weight"]
    assert emb["sharded"] and emb["shape"] == [300, 32] and emb["local_shapes"] == [[150, 32], [150, 32]]
    assert index["tensors"]["halt_head.weight"]["local_shapes"] == [[1, 32], [0, 32]]  # torch.chunk: may be empty
    pieces = [load_file(run / f) for f in files]
    assert pieces[0]["embed.weight"].shape == (150, 32) and "z_H_init" in pieces[1]  # unsharded: in every file
    merged = merged_weights(run)
    model = load_model(run)
    assert all(torch.equal(v, merged[k]) for k, v in model.state_dict().items())
    # A missing or corrupt rank file: one line naming it.
    broken = tmp_path / "broken"
    shutil.copytree(run, broken, ignore=shutil.ignore_patterns("trainer_state", "plots", "tensorboard"))
    (broken / files[1]).write_bytes((broken / files[1]).read_bytes()[:100])
    with pytest.raises(CheckpointError, match=rf"^{re.escape(str(broken / files[1]))}: not a valid safetensors file"):
        load_model(broken)
    (broken / files[1]).unlink()
    with pytest.raises(CheckpointError, match=rf"^{re.escape(str(broken / files[1]))}: file not found"):
        load_model(broken)
    shutil.copy(run / files[1], broken / files[1])
    bad_rows = {**index["tensors"], "embed.weight": {**emb, "local_shapes": [[150, 32]]}}
    for field, value, needle in (("files", ["../model.safetensors", files[1]], '"files": expected a list of file'),
                                 ("world_size", 3, '"world_size" is 3 but 2 file'),
                                 ("tensors", bad_rows, "tensor embed.weight: expected shape"),
                                 ("files", files[::-1], rf"{re.escape(str(broken / files[1]))}: tensor .* has shape")):
        (broken / SHARD_INDEX).write_text(json.dumps({**index, field: value}), encoding="utf-8")
        with pytest.raises(CheckpointError, match=rf"^({re.escape(str(broken / SHARD_INDEX))}: )?{needle}"):
            load_model(broken)


def test_fsdp_run_resumes_in_one_process(runs, tmp_path: Path) -> None:
    """Another world size reads the sharded set whole (and says the dropout streams restart); the single process
    then publishes model.safetensors again, dropping the shards."""
    run = tmp_path / "run"
    shutil.copytree(runs["fsdp"][1], run)
    result = run_moe(["--resume", run, "--set", f"train.max_steps={STEPS + 1}"], module="train", in_process=True)
    assert result.returncode == 0, result.describe()
    assert "saved by 2 rank(s), resuming on 1" in result.stdout
    assert (run / WEIGHTS_FILE).is_file() and not list(run.glob("model-*")) and not (run / SHARD_INDEX).exists()
    assert weights_diff(run, runs["fsdp"][1]) > 0  # one more step was taken from the sharded weights
    assert len(train_records(run)) == STEPS + 1


def test_eval_indices_keep_fsdp_ranks_in_lockstep() -> None:
    """3 eval items on 2 ranks: rank 1 computes 1 of them; under FSDP it also repeats item 0, uncounted."""
    assert Dist(0, 2).eval_indices(3, lockstep=True) == ([0, 2], 2)
    assert Dist(1, 2).eval_indices(3, lockstep=False) == ([1], 1)
    assert Dist(1, 2).eval_indices(3, lockstep=True) == ([1, 0], 1)
    assert Dist().eval_indices(3, lockstep=False) == ([0, 1, 2], 3)
