"""train: LR schedule, config layering, CLI error handling, and real (tiny) runs with and without torch.compile.

The fixture corpus is generated in conftest.py; nothing is downloaded. The only slow test is the last one
(torch.compile, about a minute on a 2-core CPU).
"""

from __future__ import annotations

import json
import math
import subprocess
from pathlib import Path

import pytest
import torch
from helpers import TINY_RUN_STEPS, TINY_RUN_VOCAB, CliResult, run_moe, tiny_train_args
from tokenizers import Tokenizer

from moe_core import ConfigError, ModelConfig, load_model
from train.config import RunConfig, TrainConfig, build_config, parse_override
from train.data import eval_batches, load_documents, tokenize_corpus
from train.schedule import lr_multiplier, warmup_steps
from train.trainer import evaluate

# -----------------------------------------------------------------------------
# learning-rate schedule


def schedule(max_steps: int, warmup: int, floor: float) -> list[float]:
    return [lr_multiplier(s, max_steps, warmup, floor) for s in range(max_steps)]


def test_schedule_without_warmup_starts_at_one_and_ends_at_floor() -> None:
    lrs = schedule(10, 0, 0.1)
    assert lrs[0] == 1.0
    assert lrs[-1] == pytest.approx(0.1)
    assert all(a >= b for a, b in zip(lrs, lrs[1:], strict=False))


def test_schedule_all_warmup() -> None:
    lrs = schedule(8, 8, 0.1)
    assert lrs == pytest.approx([(s + 1) / 8 for s in range(8)])
    assert lrs[-1] == 1.0


def test_schedule_single_step() -> None:
    for warmup in (0, 1):
        for floor in (0.0, 0.1, 1.0):
            assert lr_multiplier(0, 1, warmup, floor) == 1.0


def test_schedule_warmup_then_cosine() -> None:
    max_steps, warmup, floor = 30, 6, 0.1
    lrs = schedule(max_steps, warmup, floor)
    assert lrs[0] == pytest.approx(1 / 6) and lrs[0] > 0  # the first step is never wasted at LR 0
    assert lrs[:warmup] == sorted(lrs[:warmup]) and lrs[warmup - 1] == 1.0  # monotone warmup, reaching 1
    assert lrs[warmup] == 1.0  # decay starts at 1
    decay = lrs[warmup:]
    assert all(a > b for a, b in zip(decay, decay[1:], strict=False))
    assert lrs[-1] == pytest.approx(floor)
    mid = warmup + (max_steps - warmup - 1) / 2  # half-way through the decay: the cosine's midpoint
    assert lr_multiplier(int(mid), max_steps, warmup, floor) == pytest.approx(floor + (1 - floor) * 0.5, abs=0.06)


def test_schedule_never_divides_by_zero_and_stays_in_range() -> None:
    for max_steps in range(1, 25):
        for warmup in range(0, max_steps + 1):
            for floor in (0.0, 0.05, 0.5, 1.0):
                for step in range(max_steps):
                    m = lr_multiplier(step, max_steps, warmup, floor)
                    assert math.isfinite(m) and m <= 1.0, (max_steps, warmup, floor, step, m)
                    if step < warmup:
                        assert m == pytest.approx((step + 1) / warmup)
                    else:
                        assert m >= floor - 1e-12, (max_steps, warmup, floor, step, m)
                    if floor > 0:
                        assert m > 0
                # The last step lands on the floor whenever there is a decay phase.
                if max_steps - warmup >= 2:
                    assert lr_multiplier(max_steps - 1, max_steps, warmup, floor) == pytest.approx(floor)
                # Past the end (a resumed run asked for one more step) it stays at the floor, no error.
                if max_steps - warmup >= 2:
                    assert lr_multiplier(max_steps + 3, max_steps, warmup, floor) == pytest.approx(floor)


def test_warmup_steps() -> None:
    assert warmup_steps(300, 0.2) == 60
    assert warmup_steps(30, 0.0) == 0
    assert warmup_steps(30, 1.0) == 30
    assert warmup_steps(1, 0.2) == 0


# -----------------------------------------------------------------------------
# build_config: defaults <- preset <- config file <- --set


def test_build_config_tiny_preset() -> None:
    cfg = build_config("tiny", None, [])
    assert isinstance(cfg, RunConfig)
    assert (cfg.model.vocab_size, cfg.model.max_seq_len, cfg.model.d_model, cfg.model.n_layers) == (512, 32, 32, 1)
    assert (cfg.train.batch_size, cfg.train.max_steps, cfg.train.eval_every) == (8, 30, 15)
    assert cfg.train.compile is True  # every preset compiles unless told not to
    assert cfg.train.weight_decay == TrainConfig().weight_decay  # not in the preset: the dataclass default


def test_build_config_default_preset_and_no_preset() -> None:
    assert build_config("default", None, []).model.vocab_size == 2048
    plain = build_config(None, None, [])
    assert plain.model == ModelConfig() and plain.train == TrainConfig()


def test_build_config_overrides() -> None:
    cfg = build_config("tiny", None, [
        "model.d_model=64",  # dotted
        "lr=1e-3",  # bare train key
        "n_heads=8",  # bare model key
        "train.compile=false",  # TOML boolean
        "model.dropout=0",  # int accepted for a float
        "data=corpus.txt",  # a bare word is a string
        'train.tokenizer="my tok.json"',  # a quoted TOML string
        "model.causal = true",  # spaces around '='
    ])
    assert cfg.model.d_model == 64 and cfg.train.lr == 1e-3 and cfg.model.n_heads == 8
    assert cfg.train.compile is False and cfg.model.dropout == 0.0 and isinstance(cfg.model.dropout, float)
    assert cfg.train.data == "corpus.txt" and cfg.train.tokenizer == "my tok.json"
    assert cfg.model.causal is True
    assert build_config("tiny", None, ["max_steps=5", "max_steps=7"]).train.max_steps == 7  # last one wins


def test_parse_override() -> None:
    assert parse_override("model.d_model=64") == ("model", "d_model", 64)
    assert parse_override("lr=3e-4") == ("train", "lr", 3e-4)
    assert parse_override("halt_max_steps=2") == ("model", "halt_max_steps", 2)
    assert parse_override("data=a=b.txt") == ("train", "data", "a=b.txt")


def test_build_config_layers_config_file(tmp_path: Path) -> None:
    path = tmp_path / "run.toml"
    path.write_text("[model]\nd_model = 48\nn_heads = 6\n[train]\nlr = 0.002\nmax_steps = 40\n", encoding="utf-8")
    cfg = build_config("tiny", str(path), ["train.max_steps=50"])
    assert cfg.model.d_model == 48 and cfg.model.n_heads == 6  # file over preset
    assert cfg.model.vocab_size == 512  # preset kept where the file is silent
    assert cfg.train.lr == 0.002 and cfg.train.max_steps == 50  # --set over file


@pytest.mark.parametrize("overrides,key", [
    (["model.n_hedas=4"], "n_hedas"),
    (["n_hedas=4"], "n_hedas"),
    (["optim.lr=1"], "optim"),
    (["model.d_model=abc"], "d_model"),
    (["model.d_model=64.5"], "d_model"),
    (["train.compile=1"], "compile"),
    (["train.lr=[1, 2]"], "lr"),
    (["model.top_k=5"], "top_k"),
    (["model.min_heads=4", "model.max_heads=2"], "min_heads"),
    (["model.max_heads=8"], "max_heads"),
    (["model.d_model=30"], "d_model"),
    (["train.warmup_frac=1.5"], "warmup_frac"),
    (["train.batch_size=0"], "batch_size"),
    (["train.device=tpu"], "device"),
    (["model.d_model"], "model.d_model"),
])
def test_build_config_errors_name_the_key(overrides, key) -> None:
    with pytest.raises(ConfigError, match=rf"\b{key}\b"):
        build_config("tiny", None, overrides)


def test_build_config_file_errors_name_file_and_key(tmp_path: Path) -> None:
    bad_key = tmp_path / "bad_key.toml"
    bad_key.write_text("[model]\nd_modle = 64\n", encoding="utf-8")
    with pytest.raises(ConfigError, match=r"bad_key\.toml.*d_modle"):
        build_config("tiny", str(bad_key), [])
    bad_section = tmp_path / "bad_section.toml"
    bad_section.write_text("[optim]\nlr = 1\n", encoding="utf-8")
    with pytest.raises(ConfigError, match=r"bad_section\.toml.*optim"):
        build_config(None, str(bad_section), [])
    bad_toml = tmp_path / "bad.toml"
    bad_toml.write_text("[model\n", encoding="utf-8")
    with pytest.raises(ConfigError, match=r"bad\.toml"):
        build_config(None, str(bad_toml), [])
    with pytest.raises(ConfigError, match=r"missing\.toml"):
        build_config(None, str(tmp_path / "missing.toml"), [])
    with pytest.raises(ConfigError, match="nosuchpreset"):
        build_config("nosuchpreset", None, [])


# -----------------------------------------------------------------------------
# the CLI on bad input: exit code 2, one line on stderr, no traceback, nothing half-written


@pytest.fixture(scope="module")
def bad_cli_runs(tmp_path_factory: pytest.TempPathFactory, corpus_file: Path) -> dict[str, tuple[CliResult, Path]]:
    """Every bad-input case of `python -m train`, run in-process (the real entry point's exit code and stderr:
    test_hostile.py)."""
    root = tmp_path_factory.mktemp("bad_cli")
    empty = root / "empty.txt"
    empty.write_text("\n  \n\n", encoding="utf-8")
    a_file = root / "a_file"
    a_file.write_text("not a directory\n", encoding="utf-8")
    existing = root / "existing"
    existing.mkdir()
    (existing / "notes.txt").write_text("keep me\n", encoding="utf-8")
    cases = {  # name -> (extra args, --data, --out)
        "unknown_key": (["--set", "model.n_hedas=4"], corpus_file, root / "out_unknown_key"),
        "top_k": (["--set", "model.top_k=5"], corpus_file, root / "out_top_k"),
        "min_heads": (["--set", "model.min_heads=4", "--set", "model.max_heads=2"], corpus_file,
                      root / "out_min_heads"),
        "missing_data": ([], root / "no_such_corpus.txt", root / "out_missing_data"),
        "empty_data": ([], empty, root / "out_empty_data"),
        "unwritable_out": ([], corpus_file, a_file / "run"),
        "existing_out": ([], corpus_file, existing),
    }
    return {name: (run_moe(["--preset", "tiny", "--no-compile", "--device", "cpu", "--set", "model.vocab_size=300",
                            "--data", data, "--out", out, *extra], module="train", in_process=True), out)
            for name, (extra, data, out) in cases.items()}


@pytest.mark.parametrize("case,needle", [
    ("unknown_key", "n_hedas"),
    ("top_k", "top_k"),
    ("min_heads", "min_heads"),
    ("missing_data", "no_such_corpus.txt"),
    ("empty_data", "empty.txt"),
    ("unwritable_out", "a_file"),
    ("existing_out", "--overwrite"),
])
def test_cli_bad_input(bad_cli_runs, case, needle) -> None:
    result, out = bad_cli_runs[case]
    assert result.returncode == 2, result.describe()
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.describe()
    assert lines[0].startswith("error: ") and needle in lines[0], lines[0]
    assert "Traceback" not in result.stderr + result.stdout
    if case == "existing_out":
        assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]
        assert (out / "notes.txt").read_text(encoding="utf-8") == "keep me\n"
    elif case == "unwritable_out":
        assert out.parent.is_file() and out.parent.read_text(encoding="utf-8") == "not a directory\n"
    else:  # nothing written, not even an empty run directory
        assert not out.exists(), sorted(out.rglob("*"))


def test_cli_help_runs_in_process() -> None:
    result = run_moe(["--help"], module="train", in_process=True)
    assert result.returncode == 0 and "--preset" in result.stdout and "tiny" in result.stdout


# -----------------------------------------------------------------------------
# a real tiny run (session fixture `tiny_run_dir`, --no-compile)


def read_metrics(run_dir: Path) -> list[dict]:
    lines = (run_dir / "metrics.jsonl").read_text(encoding="utf-8").splitlines()
    return [json.loads(line) for line in lines if line.strip()]


def check_run_files(run_dir: Path) -> None:
    for name in ("config.json", "model.safetensors", "tokenizer.json", "metrics.jsonl"):
        assert (run_dir / name).is_file() and (run_dir / name).stat().st_size > 0, name
    sets = sorted((run_dir / "trainer_state").glob("step-*"))
    assert sets, "no checkpoint set"
    for name in ("state.json", "optimizer.safetensors", "model.safetensors"):
        assert (sets[-1] / name).is_file(), name
    leftovers = [p.name for p in run_dir.rglob("*") if p.name.endswith(".tmp") or p.name == ".write-test"]
    assert leftovers == [], "temp files left behind"


def test_tiny_run_writes_the_run_directory(tiny_run_dir: Path, corpus_file: Path) -> None:
    check_run_files(tiny_run_dir)
    assert not (tiny_run_dir / "plots").exists()  # train.plots = false (a run draws them by default: test_ablate)
    config = json.loads((tiny_run_dir / "config.json").read_text(encoding="utf-8"))
    assert set(config) >= {"model", "train"}
    assert config["model"]["vocab_size"] == TINY_RUN_VOCAB and config["model"]["d_model"] == 32
    assert config["train"]["data"] == str(corpus_file) and config["train"]["compile"] is False
    assert config["train"]["max_steps"] == TINY_RUN_STEPS
    assert RunConfig.from_dict({k: config[k] for k in ("model", "train")}, "config.json").model.vocab_size == 300
    last = sorted((tiny_run_dir / "trainer_state").glob("step-*"))[-1]
    assert last.name == f"step-{TINY_RUN_STEPS:08d}"
    state = json.loads((last / "state.json").read_text(encoding="utf-8"))
    assert state["step"] == TINY_RUN_STEPS and state["skipped_steps"] == 0
    tok = Tokenizer.from_file(str(tiny_run_dir / "tokenizer.json"))
    assert tok.get_vocab_size() <= TINY_RUN_VOCAB
    text = "The quiet sailor found a letter."
    assert tok.decode(tok.encode(text).ids) == text


def test_tiny_run_metrics(tiny_run_dir: Path) -> None:
    records = read_metrics(tiny_run_dir)
    evals = [r for r in records if r.get("kind") == "eval"]
    trains = [r for r in records if r.get("kind") == "train"]
    assert all("step" in r and "val_loss" in r and math.isfinite(r["val_loss"]) for r in evals)
    assert [r["step"] for r in evals] == [0, TINY_RUN_STEPS // 2, TINY_RUN_STEPS]
    ln_v = math.log(TINY_RUN_VOCAB)
    assert abs(evals[0]["val_loss"] - ln_v) < 0.3, evals[0]
    assert evals[-1]["val_loss"] < evals[0]["val_loss"] - 0.1, (evals[0], evals[-1])
    assert all(r["val_halt_step"] >= 1 for r in evals)

    assert [r["step"] for r in trains] == [1, 4, 7, 10, 12]  # log_every=3, plus the last step
    warmup = warmup_steps(TINY_RUN_STEPS, 0.2)
    for r in trains:
        assert r["grad_norm"] > 0 and math.isfinite(r["grad_norm"])
        assert r["lr"] == pytest.approx(3e-3 * lr_multiplier(r["step"] - 1, TINY_RUN_STEPS, warmup, 0.1))
        for name in ("moe_balance", "moe_z", "moh_balance", "moh_complexity", "moh_sparsity"):
            assert math.isfinite(r[f"aux.{name}"]), name
        assert {"lm_loss", "loss", "halt_loss", "halt_acc", "grad_norm.router", "grad_norm.halt"} <= set(r)
        assert 1 <= r["L1.moh_heads"] <= 4
        assert 0.3 <= r["L1.moh_threshold_min"] <= r["L1.moh_threshold"] <= r["L1.moh_threshold_max"] <= 0.8
        assert 0 <= r["L1.moh_complexity_min"] <= r["L1.moh_complexity"] <= r["L1.moh_complexity_max"] <= 1
        assert r["L1.moh_pred_norm"] > 0
        assert len(r["L1.moe_load"]) == 4 and sum(r["L1.moe_load"]) == pytest.approx(1.0, abs=1e-4)
        assert len(r["L1.moh_head_load"]) == 4
        assert 1 <= r["halt_step_mean"] <= 3
    assert trains[-1]["lm_loss"] < trains[0]["lm_loss"]
    summary = [r for r in records if r.get("kind") == "summary"]
    assert len(summary) == 1 and summary[0]["val_loss"] == evals[-1]["val_loss"]


def test_tiny_run_console_output(tiny_run) -> None:
    _, result = tiny_run
    assert "step 0: val loss" in result.stdout
    assert "MoH L1:" in result.stdout + result.stderr
    assert "Complexity" in result.stdout + result.stderr


def test_load_model_from_tiny_run(tiny_run_dir: Path, corpus_file: Path) -> None:
    model = load_model(tiny_run_dir)
    assert not model.training
    assert isinstance(model.config, ModelConfig) and model.config.vocab_size == TINY_RUN_VOCAB
    config = json.loads((tiny_run_dir / "config.json").read_text(encoding="utf-8"))
    assert model.config == ModelConfig.from_dict(config["model"])
    # The saved weights are the final ones: re-evaluating them gives the logged final val loss.
    tok = Tokenizer.from_file(str(tiny_run_dir / "tokenizer.json"))
    data = tokenize_corpus(load_documents(corpus_file), tok, 0.1, model.config.max_seq_len)
    batches = eval_batches(data.val, 8, model.config.max_seq_len, 2)
    ev = evaluate(model, batches, torch.device("cpu"), torch.autocast("cpu", enabled=False))
    final = [r for r in read_metrics(tiny_run_dir) if r.get("kind") == "eval"][-1]
    assert ev["val_loss"] == pytest.approx(final["val_loss"], abs=1e-4)
    with torch.no_grad():
        out = model(torch.tensor([tok.encode("The old king sang.").ids]))
    assert out.logits.shape[-1] == TINY_RUN_VOCAB and out.halt_step.dtype == torch.int64


# -----------------------------------------------------------------------------
# the one compiled run


def test_compiled_training_run(tmp_path: Path, corpus_file: Path, tiny_run) -> None:
    """`python -m train --compile` on the tiny preset: trains, writes the run, and computes what eager does."""
    eager_dir, _ = tiny_run
    out = tmp_path / "compiled"
    steps = 10
    try:
        result = run_moe(tiny_train_args(corpus_file, out, steps=steps, compile_=True), module="train", timeout=600)
    except subprocess.TimeoutExpired:
        pytest.fail("compiled tiny run did not finish in 10 minutes")
    assert result.returncode == 0, result.describe()
    assert "compile=on" in result.stdout
    check_run_files(out)
    config = json.loads((out / "config.json").read_text(encoding="utf-8"))
    assert config["train"]["compile"] is True
    records = read_metrics(out)
    evals = [r for r in records if r.get("kind") == "eval"]
    assert [r["step"] for r in evals] == [0, steps // 2, steps]
    assert evals[-1]["val_loss"] < evals[0]["val_loss"] - 0.1
    # Same seed, data and init as the eager tiny run: the step-0 eval (never compiled) is identical, and the
    # compiled first training step computes the eager loss.
    eager = read_metrics(eager_dir)
    assert evals[0]["val_loss"] == pytest.approx(eager[0]["val_loss"], abs=1e-6)
    first_c = next(r for r in records if r.get("kind") == "train")
    first_e = next(r for r in eager if r.get("kind") == "train")
    assert first_c["step"] == first_e["step"] == 1
    assert first_c["lm_loss"] == pytest.approx(first_e["lm_loss"], abs=1e-3)
    assert first_c["grad_norm"] == pytest.approx(first_e["grad_norm"], rel=1e-2)
    model = load_model(out)
    with torch.no_grad():
        assert torch.isfinite(model(torch.zeros(1, 8, dtype=torch.long)).logits).all()


def test_user_tokenizer_sets_the_vocabulary(tiny_run_dir: Path, corpus_file: Path, tmp_path: Path) -> None:
    """--tokenizer: the given tokenizer.json is used as is and its size becomes model.vocab_size."""
    import json

    from train.trainer import train

    given = tiny_run_dir / "tokenizer.json"
    n = Tokenizer.from_file(str(given)).get_vocab_size()
    cfg = build_config("tiny", None, [f"train.tokenizer={json.dumps(str(given))}",
                                      f"train.data={json.dumps(str(corpus_file))}", "train.compile=false",
                                      "train.max_steps=2", "model.vocab_size=4096"])
    train(cfg, tmp_path / "run")
    saved = json.loads((tmp_path / "run" / "config.json").read_text())
    assert saved["model"]["vocab_size"] == n != 4096
    assert (tmp_path / "run" / "tokenizer.json").read_text() == Tokenizer.from_file(str(given)).to_str()
