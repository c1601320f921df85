"""`moe ablate`: a small grid on the tiny preset (one variant fails on purpose), grid checks, the built-in grid."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
from helpers import run_moe

from moe_core.common.errors import ConfigError
from train.ablate import grid_names, load_grid, parse_grid
from train.config import build_config

GRID = """
description = "test grid"

[variants.base]

[variants.top-k-1]
model.top_k = 1

[variants.broken]      # fails when its config is validated: more experts per token than there are
model.top_k = 9

[variants.same-as-base]  # resolves to the base config: reported, not trained twice
model.top_k = 2

[variants.no-recursion]
recursive = false      # a bare key, as --set takes it
"""


@pytest.fixture(scope="module")
def ablation(tmp_path_factory: pytest.TempPathFactory, corpus_file: Path):
    tmp = tmp_path_factory.mktemp("ablate")
    grid = tmp / "grid.toml"
    grid.write_text(GRID)
    out = tmp / "out"
    result = run_moe(["ablate", "--preset", "tiny", "--no-compile", "--grid", grid, "--data", corpus_file,
                      "--steps", "6", "--set", "train.eval_every=3", "--set", "train.log_every=2",
                      "--set", "model.vocab_size=300", "--set", "train.device=cpu", "--out", out], in_process=True)
    return out, result


def test_grid_runs_every_variant_and_reports_the_failure(ablation) -> None:
    out, result = ablation
    assert result.returncode == 0, result.describe()
    rows = {r["variant"]: r for r in csv.DictReader((out / "ablation.csv").open())}
    assert list(rows) == ["base", "top-k-1", "broken", "same-as-base", "no-recursion"]
    assert {n: r["status"] for n, r in rows.items()} == {
        "base": "ok", "top-k-1": "ok", "broken": "failed", "same-as-base": "same as base", "no-recursion": "ok"}
    assert "top_k" in rows["broken"]["reason"] and rows["broken"]["val_loss"] == ""
    assert not (out / "broken").exists() and not (out / "same-as-base").exists()
    # The variants really differ, and the twin repeats its original's figures.
    losses = {n: float(rows[n]["val_loss"]) for n in ("base", "top-k-1", "no-recursion")}
    assert len(set(losses.values())) == 3, losses
    assert rows["same-as-base"]["val_loss"] == rows["base"]["val_loss"]
    # Halting only exists with recursion: the baseline shows no halt step, "—" in the markdown.
    assert rows["no-recursion"]["halt_step"] == "" and 1 <= float(rows["base"]["halt_step"]) <= 3
    for name in ("base", "top-k-1", "no-recursion"):
        assert float(rows[name]["mean_heads"]) >= 1 and float(rows[name]["max_grad_norm"]) > 0
        assert float(rows[name]["tokens_per_s"]) > 0 and int(rows[name]["params"]) > 0
    md = (out / "ablation.md").read_text()
    assert "| broken |" in md and "failed: " in md and "—" in md
    assert "| variant | overrides | status | val loss |" in result.stdout  # the table is printed at the end


def test_variants_share_one_tokenizer_and_write_their_runs(ablation) -> None:
    out, _ = ablation
    shared = (out / "tokenizer.json").read_text()
    for name in ("base", "top-k-1", "no-recursion"):
        assert (out / name / "tokenizer.json").read_text() == shared
        assert (out / name / "metrics.jsonl").is_file() and (out / name / "plots" / "loss.png").is_file()
    png = (out / "val_loss.png").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 10_000
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temp files left behind


def test_existing_output_needs_overwrite(ablation, moe_cli) -> None:
    out, _ = ablation
    result = moe_cli("ablate", "--preset", "tiny", "--only", "recursive", "--out", out, in_process=True)
    assert result.returncode == 2 and "--overwrite" in result.stderr


@pytest.mark.parametrize("text,match", [
    ("[variants.a]\ntrain.max_steps = 5\n", "max_steps cannot vary"),
    ("[variants.a]\ndata = 'x.txt'\n", "data cannot vary"),
    ("description = 'no variants'\n", "no variants"),
    ("[variants.a]\nmodel.top_k = [1, 2]\n", "expected a number"),
    ("[variants.'a/b']\n", "run directory"),
    ("[variant.a]\n", "unknown key 'variant'"),
])
def test_bad_grid_is_one_config_error(text: str, match: str) -> None:
    import tomllib

    with pytest.raises(ConfigError, match=match):
        parse_grid(tomllib.loads(text), "grid.toml")


def test_bad_grid_or_variant_name_exits_2_before_training(tmp_path: Path, moe_cli) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("[variants.a]\ntrain.max_steps = 5\n")
    for args in (["--grid", bad], ["--grid", "no-such-grid"], ["--only", "no-such-variant"]):
        result = moe_cli("ablate", "--preset", "tiny", *args, "--out", tmp_path / "out", in_process=True)
        assert result.returncode == 2, result.describe()
        assert result.stderr.startswith("error: ") and len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_builtin_grid_covers_the_seeds_study_and_builds_on_every_preset() -> None:
    assert "seeds-study" in grid_names()
    grid = load_grid("seeds-study")
    assert len(grid.variants) >= 20
    assert grid.variants["recursive"] == [] and grid.variants["baseline"] == ["model.recursive=false"]
    for preset in ("tiny", "default"):
        configs = {name: build_config(preset, None, overrides) for name, overrides in grid.variants.items()}
        assert not configs["baseline"].model.recursive
        assert [configs[f"lr-{v}"].train.lr for v in ("1e-4", "3e-4", "6e-4")] == [1e-4, 3e-4, 6e-4]
        assert [configs[f"top-k-{k}"].model.top_k for k in (1, 2, 4)] == [1, 2, 4]
        assert configs["small-model"].model.d_model < build_config(preset, None, []).model.d_model
        x1, x10 = configs["aux-x1"].train.aux_weights, configs["aux-x10"].train.aux_weights
        assert x10 == pytest.approx({k: 10 * v for k, v in x1.items()})


def test_a_grid_varies_a_task_section() -> None:
    """A variant's [sudoku] table (like its [model] and [train] ones) becomes `--set sudoku.KEY` items."""
    import tomllib

    grid = parse_grid(tomllib.loads("[variants.hard]\nsudoku = { givens_min = 41 }\nmodel.top_k = 1\n"), "grid.toml")
    assert grid.variants["hard"] == ["sudoku.givens_min=41", "model.top_k=1"]
    cfg = build_config("sudoku-tiny", None, grid.variants["hard"])
    assert cfg.task_config.givens_min == 41 and cfg.model.top_k == 1
