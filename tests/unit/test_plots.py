"""train.plots: PNGs from a synthetic metrics.jsonl (recursive MoE/MoH, baseline, empty, torn last line)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from click.testing import CliRunner

from moe_core.common.errors import MoeError
from train.plots import plot, plot_expert_load, read_metrics, write_plots

ALL_PLOTS = {"loss.png", "lr.png", "grad_norm.png", "heads.png", "head_load.png", "expert_load.png", "halting.png",
             "halt_hist.png"}
HALT_PLOTS = {"halting.png", "halt_hist.png"}
VOCAB = 97
N_LAYERS, N_EXPERTS, N_HEADS = 2, 4, 4


def _eval(step: int, loss: float, recursive: bool) -> dict:
    rec = {"kind": "eval", "step": step, "val_loss": loss, "val_ppl": math.exp(loss),
           "uniform_baseline": math.log(VOCAB), "unigram_baseline": 4.1}
    rec["val_halt_step"] = 2.5 if recursive else 1.0
    return rec


def _train(step: int, recursive: bool) -> dict:
    t = step / 40
    rec = {"kind": "train", "step": step, "lr": 3e-3 * min(1.0, step / 8), "grad_norm": 0.8 - 0.3 * t,
           "tokens_per_s": 1000.0, "halt_step_mean": 3.0 - t if recursive else 1.0,
           "loss": 4.6 - t, "lm_loss": 4.5 - t, "last_step_loss": 4.5 - t,
           "grad_norm.router": 1e-3 * (1 + t), "grad_norm.decay": 0.7, "grad_norm.no_decay": 0.05}
    if recursive:
        rec.update({"halt_loss": 0.7, "halt_acc": 0.5 + 0.4 * t, "halt_target": 0.5, "grad_norm.halt": 0.2,
                    "halt_hist": [round(12 * t), 4, 12 - round(12 * t)]})
    for name in ("moe_balance", "moe_z", "moh_balance", "moh_complexity", "moh_sparsity"):
        rec[f"aux.{name}"] = 1.0
        rec[f"aux_weighted.{name}"] = 0.01
    for li in range(1, N_LAYERS + 1):
        rec.update({f"L{li}.moh_heads": 3.0 - li * t, f"L{li}.moh_threshold": 0.5 + 0.2 * t,
                    f"L{li}.moh_threshold_min": 0.45, f"L{li}.moh_threshold_max": 0.7 + 0.1 * t,
                    f"L{li}.moh_complexity": 0.5 - 0.3 * t, f"L{li}.moh_complexity_min": 0.2,
                    f"L{li}.moh_complexity_max": 0.8, f"L{li}.moh_pred_norm": 0.3,
                    f"L{li}.moh_head_load": [0.7, 0.6, 0.5, 0.4],
                    f"L{li}.moe_load": [0.25 + 0.1 * t, 0.25 - 0.1 * t, 0.3, 0.2],
                    f"L{li}.moe_load_cv": 0.2 + 0.3 * t, f"L{li}.moe_dropped": 0.0})
    return rec


def _write_run(run_dir: Path, recursive: bool, torn: bool = False) -> Path:
    run_dir.mkdir(parents=True, exist_ok=True)
    recs = [_eval(0, math.log(VOCAB), recursive)]
    for step in (1, 6, 11, 16, 21, 26, 31, 36, 40):
        recs.append(_train(step, recursive))
        if step in (21, 40):
            recs.append(_eval(step, 4.6 - step / 40, recursive))
    recs.append({"kind": "summary", "val_loss": 3.6, "steps": 40})
    text = "".join(json.dumps(r) + "\n" for r in recs)
    if torn:
        text += json.dumps(_train(41, recursive))[:57]  # a killed run: half a line, no newline
    (run_dir / "metrics.jsonl").write_text(text)
    config = {"model": {"vocab_size": VOCAB, "n_layers": N_LAYERS, "n_heads": N_HEADS, "min_heads": 1,
                        "n_experts": N_EXPERTS, "recursive": recursive, "halt_max_steps": 3},
              "train": {"grad_clip": 1.0}}
    (run_dir / "config.json").write_text(json.dumps(config))
    return run_dir


def _check_pngs(paths: list[Path]) -> None:
    for p in paths:
        data = p.read_bytes()
        assert data.startswith(b"\x89PNG\r\n\x1a\n"), p
        assert len(data) > 5000, (p, len(data))


def test_recursive_run_writes_all_six_plots(tmp_path: Path) -> None:
    run = _write_run(tmp_path / "run", recursive=True, torn=True)
    paths = write_plots(run)
    assert {p.name for p in paths} == ALL_PLOTS
    assert all(p.parent == run / "plots" for p in paths)
    _check_pngs(paths)
    assert not [p for p in (run / "plots").iterdir() if p.name not in ALL_PLOTS]  # no temp files left behind


def test_torn_last_line_is_ignored_but_a_bad_middle_line_is_an_error(tmp_path: Path) -> None:
    run = _write_run(tmp_path / "run", recursive=True, torn=True)
    recs = read_metrics(run / "metrics.jsonl")
    assert recs[-1]["kind"] == "summary"
    lines = (run / "metrics.jsonl").read_text().splitlines()
    (run / "metrics.jsonl").write_text("\n".join([lines[0], "{oops", *lines[1:]]) + "\n")
    with pytest.raises(MoeError, match=r"metrics\.jsonl:2"):
        read_metrics(run / "metrics.jsonl")


def test_baseline_run_skips_halting(tmp_path: Path) -> None:
    run = _write_run(tmp_path / "base", recursive=False)
    paths = write_plots(run)
    assert {p.name for p in paths} == ALL_PLOTS - HALT_PLOTS
    _check_pngs(paths)


def test_metrics_without_newer_statistics_still_plot(tmp_path: Path) -> None:
    """Older metrics files have no halt_hist, head load, load CV or dropped counts: those parts are skipped."""
    run = _write_run(tmp_path / "old", recursive=True)
    newer = ("halt_hist", "moh_head_load", "moe_load_cv", "moe_dropped")
    lines = [json.dumps({k: v for k, v in json.loads(line).items() if not k.endswith(newer)})
             for line in (run / "metrics.jsonl").read_text().splitlines()]
    (run / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    paths = write_plots(run)
    assert {p.name for p in paths} == ALL_PLOTS - {"halt_hist.png", "head_load.png"}
    _check_pngs(paths)


def test_expert_load_adds_cv_and_dropped_panels_only_when_logged() -> None:
    train = [_train(step, recursive=True) for step in (1, 11, 21)]
    assert len(plot_expert_load(train).axes) == N_LAYERS + 1  # loads per layer + CV (no drops: said in a title)
    train[1]["L2.moe_dropped"] = 3.0
    assert len(plot_expert_load(train).axes) == N_LAYERS + 2


def test_only_step0_eval_does_not_crash(tmp_path: Path) -> None:
    run = tmp_path / "early"
    run.mkdir()
    (run / "metrics.jsonl").write_text(json.dumps(_eval(0, 4.6, recursive=True)) + "\n")
    paths = write_plots(run)
    assert {p.name for p in paths} <= {"loss.png", *HALT_PLOTS}
    _check_pngs(paths)


@pytest.mark.parametrize("content", [None, "", "\n\n", '{"kind": "tra'])
def test_missing_or_empty_metrics_is_a_moe_error(tmp_path: Path, content: str | None) -> None:
    if content is not None:
        (tmp_path / "metrics.jsonl").write_text(content)
    with pytest.raises(MoeError, match="metrics.jsonl"):
        write_plots(tmp_path)
    assert not (tmp_path / "plots").exists()


def test_plot_command_prints_paths(tmp_path: Path) -> None:
    run = _write_run(tmp_path / "run", recursive=True)
    result = CliRunner().invoke(plot, [str(run)])
    assert result.exit_code == 0, result.output
    assert {Path(line).name for line in result.output.split()} == ALL_PLOTS
