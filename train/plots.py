"""Training plots: read a run's metrics.jsonl and write PNGs under RUN_DIR/plots/.

`write_plots(run_dir)` writes whichever of these the logged data supports (a plot whose data is absent is
skipped, so a baseline model or a run killed after the step-0 eval still gets what it can):

  loss.png         the task's train loss (lm_loss / cell_loss) and val_loss, with the ln(V) and unigram baselines
  lr.png           learning rate (and a Sudoku curriculum's fewest givens, `givens_floor`)
  grad_norm.png    total (pre-clip) grad norm and the router / halt parameter-group norms
  heads.png        MoH heads per token per layer; threshold mean with min-max band, and complexity
  head_load.png    MoH fraction of tokens using each head per layer, with the even share dashed
  expert_load.png  MoE load fraction per expert per layer, with the ideal share dashed; load CV; dropped tokens
  halting.png      mean halt step (train, val) and halt accuracy — recursive models only
  halt_hist.png    share of samples halting at each step, over training and summed (needs `halt_hist`)

Figures are built with `matplotlib.figure.Figure` (no pyplot, no global backend state) and written
atomically, so a reader never sees a half-written PNG.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from moe_core.checkpoint import read_run_config
from moe_core.common.errors import MoeError, os_reason
from moe_core.common.files import atomic_write
from moe_core.common.jsonl import json_error, read_lines
from moe_core.run_layout import METRICS_FILE, PLOTS_DIR

if TYPE_CHECKING:
    from matplotlib.figure import Figure

DPI = 110

Record = dict[str, Any]


# -----------------------------------------------------------------------------
# reading


def read_metrics(path: str | Path) -> list[Record]:
    """All records of a metrics.jsonl. A torn last line (a killed run) is ignored; a bad line elsewhere is an error.

    Lines are read one at a time and at most moe_core.common.jsonl.MAX_LINE_BYTES long (a longer one is an error)."""
    path = Path(path)
    if not path.is_file():
        raise MoeError(f"{path}: metrics file not found (expected a run directory written by `moe train`)")
    records: list[Record] = []
    torn: str | None = None  # the error of a line that is not JSON: fine if it is the last line
    for lineno, raw in read_lines(path):
        line = raw.decode("utf-8", errors="replace")
        if not line.strip():
            continue
        if torn is not None:
            raise MoeError(torn)
        try:
            rec = json.loads(line)
        except (ValueError, RecursionError) as e:
            torn = f"{path}:{lineno}: not valid JSON ({json_error(e) if isinstance(e, ValueError) else 'too deep'})"
            continue
        if isinstance(rec, dict):
            records.append(rec)
    if not records:
        raise MoeError(f"{path}: no metrics records (the run logged nothing yet)")
    return records


def split_records(records: list[Record]) -> tuple[list[Record], list[Record]]:
    """(train, eval) records, each sorted by step."""
    train = sorted((r for r in records if r.get("kind") == "train"), key=lambda r: _num(r.get("step")) or 0)
    evals = sorted((r for r in records if r.get("kind") == "eval"), key=lambda r: _num(r.get("step")) or 0)
    return train, evals


# The largest magnitude a plot draws. matplotlib widens an axis around its data (margins, tick steps); near the
# float maximum that arithmetic overflows and drawing fails, so a value beyond this (a diverged run's loss) is
# left out of its curve, as a non-finite one is, and write_plots says so.
PLOT_MAX = 1e300


def _num(v: Any) -> float | None:
    """A plottable number: finite and within ±PLOT_MAX (bools and other types are not numbers here)."""
    if isinstance(v, bool) or not isinstance(v, int | float):
        return None
    try:
        v = float(v)
    except OverflowError:  # an int beyond the float range
        return None
    return v if math.isfinite(v) and abs(v) <= PLOT_MAX else None


def _unplottable(records: list[Record]) -> list[tuple[str, Any]]:
    """(key, step) of every finite number too large to draw (PLOT_MAX), in the records' order."""
    out = []
    for r in records:
        for key, value in r.items():
            for v in value if isinstance(value, list) else [value]:
                if isinstance(v, int | float) and not isinstance(v, bool) and _num(v) is None and \
                        not (isinstance(v, float) and not math.isfinite(v)):
                    out.append((key, r.get("step")))
                    break
    return out


def series(records: list[Record], key: str) -> tuple[list[float], list[float]]:
    """(steps, values) of the records that have a finite number under `key`."""
    xs, ys = [], []
    for r in records:
        step, v = _num(r.get("step")), _num(r.get(key))
        if step is not None and v is not None:
            xs.append(step)
            ys.append(v)
    return xs, ys


def _list_series(records: list[Record], key: str) -> tuple[list[float], list[list[float]]]:
    """(steps, vectors) for a list-valued key, keeping only vectors of the most common length."""
    rows = []
    for r in records:
        step, v = _num(r.get("step")), r.get(key)
        if step is not None and isinstance(v, list) and v and all(_num(x) is not None for x in v):
            rows.append((step, [float(x) for x in v]))
    if not rows:
        return [], []
    lengths = [len(v) for _, v in rows]
    n = max(set(lengths), key=lengths.count)
    rows = [(s, v) for s, v in rows if len(v) == n]
    return [s for s, _ in rows], [v for _, v in rows]


def layer_numbers(records: list[Record], suffix: str) -> list[int]:
    pat = re.compile(rf"^L(\d+)\.{re.escape(suffix)}$")
    found = {int(m.group(1)) for r in records for k in r if (m := pat.match(k))}
    return sorted(found)


def _first(records: list[Record], key: str) -> float | None:
    for r in records:
        v = _num(r.get(key))
        if v is not None:
            return v
    return None


# -----------------------------------------------------------------------------
# figure helpers


def style_axes(ax, title: str, ylabel: str, xlabel: str = "step (optimizer updates)", legend: bool = True) -> None:
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(True, alpha=0.3)
    if legend and ax.get_legend_handles_labels()[0]:
        ax.legend(loc="best", fontsize=8, framealpha=0.85)


def new_figure(**kwargs: Any) -> Figure:
    """A matplotlib Figure, matplotlib imported only here: a run with train.plots = false trains without it."""
    from matplotlib.figure import Figure

    return Figure(**kwargs)


def save_figure(fig: Figure, path: Path, overwrite: bool = True) -> Path:
    """Write `fig` as a PNG, atomically; overwrite=False: only where `path` does not exist yet."""
    atomic_write(path, lambda tmp: write_png(fig, tmp), overwrite)
    return path


def write_png(fig: Figure, path: str | Path) -> None:
    """`fig` as a PNG at `path`, written in place (save_figure, or a set of files committed together)."""
    fig.savefig(path, format="png", dpi=DPI)


def _marker(xs: list[float]) -> str | None:
    return "o" if len(xs) <= 20 else None


# -----------------------------------------------------------------------------
# the plots (each returns a Figure, or None when its data is absent)


def plot_loss(train: list[Record], evals: list[Record]) -> Figure | None:
    # The task's own loss (Task.loss_key: lm_loss, cell_loss), else the total.
    for key in ("lm_loss", "cell_loss", "loss"):
        tx, ty = series(train, key)
        train_label = f"train {key}"
        if tx:
            break
    vx, vy = series(evals, "val_loss")
    if not tx and not vx:
        return None
    fig = new_figure(layout="constrained", figsize=(8, 4.8))
    ax = fig.add_subplot()
    if tx:
        ax.plot(tx, ty, color="C0", lw=1.3, marker=_marker(tx), ms=3, label=train_label)
    if vx:
        ax.plot(vx, vy, color="C1", lw=1.8, marker="o", ms=5, label="val_loss")
        ax.annotate(f"{vy[-1]:.3f}", (vx[-1], vy[-1]), textcoords="offset points", xytext=(-4, 8), ha="right",
                    color="C1", fontsize=8, bbox={"boxstyle": "round,pad=0.15", "fc": "white", "ec": "none"})
    uniform, unigram = _first(evals, "uniform_baseline"), _first(evals, "unigram_baseline")
    if uniform is not None:
        ax.axhline(uniform, color="0.35", ls="--", lw=1, label=f"uniform ln(V) = {uniform:.3f}")
    if unigram is not None:
        ax.axhline(unigram, color="C2", ls="--", lw=1, label=f"unigram = {unigram:.3f}")
    style_axes(ax, "Loss", "cross-entropy (nats / token)")
    return fig


def plot_lr(train: list[Record]) -> Figure | None:
    x, y = series(train, "lr")
    if not x:
        return None
    fig = new_figure(layout="constrained", figsize=(8, 3.6))
    ax = fig.add_subplot()
    ax.plot(x, y, color="C0", lw=1.5, marker=_marker(x), ms=3, label="lr (base param group)")
    ax.ticklabel_format(axis="y", style="sci", scilimits=(-2, 3))
    ax.set_ylim(bottom=0)
    style_axes(ax, "Learning rate", "learning rate (AdamW step size)")
    gx, gy = series(train, "givens_floor")  # the Sudoku curriculum's schedule, on its own axis
    if gx:
        twin = ax.twinx()
        twin.plot(gx, gy, color="C2", lw=1.2, ls="--", label="curriculum: fewest givens")
        twin.set_ylabel("fewest givens a batch draws")
        twin.legend(loc="lower right", fontsize=8, framealpha=0.85)
    return fig


def plot_grad_norm(train: list[Record], grad_clip: float | None = None) -> Figure | None:
    curves = [("grad_norm", "total (pre-clip)", "C0", 1.8),
              ("grad_norm.router", "router params", "C3", 1.2),
              ("grad_norm.predictor", "MoH predictors", "C4", 1.2),
              ("grad_norm.halt", "halt head", "C2", 1.2)]
    data = [(label, c, lw, *series(train, key)) for key, label, c, lw in curves]
    data = [d for d in data if d[3]]
    if not data:
        return None
    fig = new_figure(layout="constrained", figsize=(8, 4.4))
    ax = fig.add_subplot()
    for label, c, lw, x, y in data:
        ax.plot(x, y, color=c, lw=lw, marker=_marker(x), ms=3, label=label)
    if grad_clip:
        ax.axhline(grad_clip, color="0.35", ls="--", lw=1, label=f"grad_clip = {grad_clip:g}")
    pos = [v for *_, y in data for v in y if v > 0]
    if pos and max(pos) / min(pos) > 100:
        ax.set_yscale("log")
    style_axes(ax, "Gradient norm (global L2, before clipping)", "L2 norm")
    return fig


def plot_heads(train: list[Record], n_heads: int | None = None, min_heads: int | None = None) -> Figure | None:
    head_layers = [li for li in layer_numbers(train, "moh_heads") if series(train, f"L{li}.moh_heads")[0]]
    thr_layers = [li for li in layer_numbers(train, "moh_threshold") if series(train, f"L{li}.moh_threshold")[0]]
    cx_layers = [li for li in layer_numbers(train, "moh_complexity") if series(train, f"L{li}.moh_complexity")[0]]
    if not head_layers and not thr_layers and not cx_layers:
        return None
    second = bool(thr_layers or cx_layers)
    fig = new_figure(layout="constrained", figsize=(8, 7.2 if second else 4.2))
    ax1 = fig.add_subplot(2 if second else 1, 1, 1)
    for li in head_layers:
        x, y = series(train, f"L{li}.moh_heads")
        ax1.plot(x, y, color=f"C{(li - 1) % 10}", lw=1.5, marker=_marker(x), ms=3, label=f"layer {li}")
    if n_heads:
        ax1.axhline(n_heads, color="0.35", ls="--", lw=1, label=f"all heads = {n_heads}")
        ax1.set_ylim(0, n_heads * 1.08)
    if min_heads:
        ax1.axhline(min_heads, color="0.55", ls=":", lw=1, label=f"min_heads = {min_heads}")
    style_axes(ax1, "MoH: mean attention heads per token", "heads / token")
    if second:
        ax2 = fig.add_subplot(2, 1, 2, sharex=ax1)
        for li in sorted(set(thr_layers) | set(cx_layers)):
            c = f"C{(li - 1) % 10}"
            x, y = series(train, f"L{li}.moh_threshold")
            if x:
                ax2.plot(x, y, color=c, lw=1.6, marker=_marker(x), ms=3, label=f"L{li} threshold (mean)")
                lo = dict(zip(*series(train, f"L{li}.moh_threshold_min"), strict=True))
                hi = dict(zip(*series(train, f"L{li}.moh_threshold_max"), strict=True))
                bx = [s for s in x if s in lo and s in hi]
                if bx:
                    ax2.fill_between(bx, [lo[s] for s in bx], [hi[s] for s in bx], color=c, alpha=0.18, lw=0,
                                     label=f"L{li} threshold min–max")
            x, y = series(train, f"L{li}.moh_complexity")
            if x:
                ax2.plot(x, y, color=c, lw=1.2, ls=":", marker=_marker(x) and "s", ms=3,
                         label=f"L{li} complexity (mean)")
        style_axes(ax2, "MoH: routing threshold and token complexity", "value (dimensionless)")
        ax1.set_xlabel("")
    return fig


def _layer_lists(train: list[Record], suffix: str) -> list[tuple[int, list[float], list[list[float]]]]:
    """[(layer, steps, vectors)] for a list-valued per-layer statistic such as `L1.moe_load`."""
    out = []
    for li in layer_numbers(train, suffix):
        x, rows = _list_series(train, f"L{li}.{suffix}")
        if x:
            out.append((li, x, rows))
    return out


def plot_head_load(train: list[Record]) -> Figure | None:
    layers = _layer_lists(train, "moh_head_load")
    if not layers:
        return None
    n_heads = max(len(rows[0]) for *_, rows in layers)
    fig = new_figure(layout="constrained", figsize=(8, 1.0 + 3.0 * len(layers)))
    axes = fig.subplots(len(layers), 1, sharex=True, squeeze=False)[:, 0]
    for ax, (li, x, rows) in zip(axes, layers, strict=True):
        for h in range(len(rows[0])):
            ax.plot(x, [v[h] for v in rows], color=f"C{h % 10}", lw=1.4, marker=_marker(x), ms=3, label=f"head {h}")
        # A balanced router spreads the heads a token uses evenly: each head's share is (heads per token) / H.
        ax.plot(x, [sum(v) / len(v) for v in rows], color="0.2", ls="--", lw=1.2,
                label="even share = heads per token / n_heads")
        ax.set_ylim(0, 1.05)
        style_axes(ax, f"MoH head load — layer {li} ({len(rows[0])} heads)", "fraction of tokens using the head",
               xlabel="step (optimizer updates)" if ax is axes[-1] else "", legend=False)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside upper center", fontsize=8, ncols=min(n_heads + 1, 5), framealpha=0.85)
    return fig


def plot_expert_load(train: list[Record]) -> Figure | None:
    layers = _layer_lists(train, "moe_load")
    if not layers:
        return None
    cv = [(li, *series(train, f"L{li}.moe_load_cv")) for li in layer_numbers(train, "moe_load_cv")]
    cv = [c for c in cv if c[1]]
    dropped = [(li, *series(train, f"L{li}.moe_dropped")) for li in layer_numbers(train, "moe_dropped")]
    dropped = [d for d in dropped if d[1]]
    any_dropped = any(v > 0 for *_, y in dropped for v in y)
    n_exp = max(len(v[0]) for *_, v in layers)
    n_panels = len(layers) + bool(cv) + any_dropped
    fig = new_figure(layout="constrained", figsize=(8, 1.0 + 3.0 * n_panels))
    axes = fig.subplots(n_panels, 1, sharex=True, squeeze=False)[:, 0]
    for ax, (li, x, loads) in zip(axes, layers, strict=False):
        n = len(loads[0])
        total = sum(sum(v) for v in loads) / len(loads)  # 1 if loads are fractions of routed tokens
        for e in range(n):
            ys = [v[e] for v in loads]
            ax.plot(x, ys, color=f"C{e % 10}", lw=1.4, marker=_marker(x), ms=3, label=f"expert {e}")
        ideal = total / n
        ax.axhline(ideal, color="0.2", ls="--", lw=1.2, label=f"ideal 1/E = {ideal:.3g}")
        ax.set_ylim(bottom=0)
        style_axes(ax, f"MoE expert load — layer {li} ({n} experts)", "fraction of routed tokens", xlabel="",
               legend=False)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside upper center", fontsize=8, ncols=min(n_exp + 1, 5), framealpha=0.85)
    extra = list(axes[len(layers):])
    if cv:
        ax = extra.pop(0)
        for li, x, y in cv:
            ax.plot(x, y, color=f"C{(li - 1) % 10}", lw=1.5, marker=_marker(x), ms=3, label=f"layer {li}")
        ax.set_ylim(bottom=0)
        note = "" if not dropped or any_dropped else " — no dropped tokens at any logged step"
        style_axes(ax, f"MoE load imbalance (0 = balanced){note}",
                   "coefficient of variation\n(std / mean over experts)", xlabel="")
    if any_dropped:
        ax = extra.pop(0)
        for li, x, y in dropped:
            ax.plot(x, y, color=f"C{(li - 1) % 10}", lw=1.5, marker=_marker(x), ms=3, label=f"layer {li}")
        ax.set_ylim(bottom=0)
        style_axes(ax, "MoE dropped tokens", "dropped (token, expert) pairs\nper net call", xlabel="")
    axes[-1].set_xlabel("step (optimizer updates)")
    return fig


def plot_halting(train: list[Record], evals: list[Record], halt_max_steps: int | None = None) -> Figure | None:
    tx, ty = series(train, "halt_step_mean")
    vx, vy = series(evals, "val_halt_step")
    ax_, ay = series(train, "halt_acc")
    if not ax_ and all(v == 1 for v in ty + vy):  # baseline model: one step always, nothing to show
        return None
    fig = new_figure(layout="constrained", figsize=(8, 4.6))
    ax = fig.add_subplot()
    if halt_max_steps:
        ax.axhline(halt_max_steps, color="0.55", ls="--", lw=1, zorder=1, label=f"halt_max_steps = {halt_max_steps}")
    if vx:
        ax.plot(vx, vy, color="C1", lw=2.2, marker="o", ms=7, zorder=2, label="val_halt_step")
    if tx:
        ax.plot(tx, ty, color="C0", lw=1.2, marker=_marker(tx), ms=3, zorder=3, label="train halt_step_mean")
        # Halt steps run 1..halt_max_steps; without a config.json to give it, the data's own top is the limit.
        ax.set_ylim(0, (halt_max_steps or max(ty + vy)) + 0.5)
    ax.set_title("Halting (ACT)")
    ax.set_xlabel("step (optimizer updates)")
    ax.set_ylabel("mean halt step (recursion steps / sequence)")
    ax.grid(True, alpha=0.3)
    handles, labels = ax.get_legend_handles_labels()
    if ax_:
        ax2 = ax.twinx()
        ax2.plot(ax_, ay, color="C2", lw=1.2, ls="--", marker=_marker(ax_) and "^", ms=3, label="train halt_acc")
        ax2.set_ylim(-0.02, 1.02)
        ax2.set_ylabel("halt accuracy (fraction)", color="C2")
        ax2.tick_params(axis="y", colors="C2")
        h2, l2 = ax2.get_legend_handles_labels()
        handles, labels = handles + h2, labels + l2
    if handles:
        ax.legend(handles, labels, loc="lower right", fontsize=8, framealpha=0.85)
    return fig


def plot_halt_hist(train: list[Record]) -> Figure | None:
    """Distribution of the step each training sample halted at: over training (stacked) and summed."""
    x, counts = _list_series(train, "halt_hist")
    if not x or len(counts[0]) < 2:  # absent (older metrics) or a baseline model: nothing to show
        return None
    S = len(counts[0])
    fracs = [[c / max(sum(row), 1e-12) for c in row] for row in counts]
    fig = new_figure(layout="constrained", figsize=(10, 4.6))
    ax, ax_bar = fig.subplots(1, 2, width_ratios=[3, 1.2])
    ax.stackplot(x, *zip(*fracs, strict=True), colors=[f"C{s % 10}" for s in range(S)], alpha=0.85,
                 labels=[f"halted at step {s + 1}" for s in range(S)])
    ax.set_ylim(0, 1)
    if x[-1] > x[0]:  # one logged step: matplotlib picks the x range itself
        ax.set_xlim(x[0], x[-1])
    style_axes(ax, "Halting: share of samples by halt step (training batches)", "fraction of samples", legend=False)
    ax.legend(loc="upper left", fontsize=8, framealpha=0.85)  # early training halts late: the top left is quiet
    tail = [row for step, row in zip(x, counts, strict=True) if step >= x[0] + 0.75 * (x[-1] - x[0])]
    width = 0.4
    for j, (rows, label, hatch) in enumerate(((counts, "whole run", None), (tail, "last 25% of steps", "//"))):
        totals = [sum(row[s] for row in rows) for s in range(S)]
        n = max(sum(totals), 1e-12)
        pos = [s + 1 + (j - 0.5) * width for s in range(S)]
        bars = ax_bar.bar(pos, [t / n for t in totals], width, color=[f"C{s % 10}" for s in range(S)],
                          edgecolor="0.2", hatch=hatch, alpha=0.85 if j == 0 else 0.55, label=label)
        ax_bar.bar_label(bars, fmt="%.2f", fontsize=7, padding=1)
    ax_bar.set_xticks(range(1, S + 1))
    ax_bar.set_ylim(0, 1.1)
    style_axes(ax_bar, "Halt step histogram", "fraction of samples", xlabel="halt step (recursion steps)")
    return fig


def plot_val_loss_overlay(curves: dict[str, tuple[list[float], list[float]]], uniform: float | None = None,
                          unigram: float | None = None, title: str = "Validation loss by variant") -> Figure | None:
    """Several runs' val-loss curves on one axis (left) and their final val loss, best first (right).

    `curves` maps a run's name to its (steps, val losses). The right panel doubles as the legend: each name is
    drawn in its curve's colour, with its curve's marker."""
    curves = {name: xy for name, xy in curves.items() if xy[0]}
    if not curves:
        return None
    ranked = sorted(curves, key=lambda n: curves[n][1][-1])
    # Ten strong colours, then the same colours with another line style and marker: 30 runs stay distinct.
    styles = {name: (f"C{i % 10}", ("-", "--", ":")[i // 10 % 3], "os^"[i // 10 % 3]) for i, name in enumerate(curves)}
    fig = new_figure(layout="constrained", figsize=(12, max(4.8, 0.26 * len(curves) + 1.6)))
    ax, ax_rank = fig.subplots(1, 2, width_ratios=[2.2, 1])
    for name, (x, y) in curves.items():
        color, ls, marker = styles[name]
        ax.plot(x, y, color=color, ls=ls, lw=1.5, marker=_marker(x) and marker, ms=3, label=name)
    for value, label, ls in ((uniform, "uniform ln(V)", "--"), (unigram, "unigram", ":")):
        if value is not None:
            ax.axhline(value, color="0.35", ls=ls, lw=1)
            ax.annotate(f"{label} = {value:.3f}", (1.0, value), xycoords=("axes fraction", "data"), ha="right",
                        va="bottom", fontsize=8, color="0.3", xytext=(-4, 2), textcoords="offset points")
    style_axes(ax, title, "val loss (nats / token)", legend=False)
    finals = [curves[n][1][-1] for n in ranked]
    for rank, name in enumerate(ranked):
        color, _, marker = styles[name]
        ax_rank.plot([finals[rank]], [rank], marker, color=color, ms=7)
        ax_rank.annotate(f"{finals[rank]:.3f}", (finals[rank], rank), xytext=(6, -3), textcoords="offset points",
                         fontsize=8)
    ax_rank.set_yticks(range(len(ranked)), ranked, fontsize=8)
    for tick, name in zip(ax_rank.get_yticklabels(), ranked, strict=True):
        tick.set_color(styles[name][0])
    ax_rank.invert_yaxis()
    lo, hi = min(finals), max(finals)
    pad = 0.08 * (hi - lo) + 0.02
    ax_rank.set_xlim(lo - pad, hi + 3 * pad)
    for value, label, ls in ((uniform, "uniform ln(V)", "--"), (unigram, "unigram", ":")):
        if value is not None and lo - pad <= value <= hi + 3 * pad:
            ax_rank.axvline(value, color="0.35", ls=ls, lw=1, label=f"{label} = {value:.3f}")
    style_axes(ax_rank, "Final val loss (best first)", "", xlabel="val loss (nats / token)")
    return fig


# -----------------------------------------------------------------------------
# entry points


def write_plots(run_dir: str | Path) -> list[Path]:
    """Write RUN_DIR/plots/*.png from RUN_DIR/metrics.jsonl; returns the paths written (skipped plots omitted)."""
    run_dir = Path(run_dir)
    records = read_metrics(run_dir / METRICS_FILE)
    skipped = _unplottable(records)
    if skipped:
        keys = ", ".join(dict.fromkeys(key for key, _ in skipped))
        click.echo(f"note: {run_dir / METRICS_FILE}: {len(skipped)} value(s) beyond ±{PLOT_MAX:g} left out of the "
                   f"plots, too large to draw ({keys}; the first at step {skipped[0][1]})", err=True)
    train, evals = split_records(records)
    cfg = read_run_config(run_dir, missing_ok=True) or {}  # without config.json: what the metrics alone show
    model_cfg = section if isinstance(section := cfg.get("model"), dict) else {}
    train_cfg = section if isinstance(section := cfg.get("train"), dict) else {}
    n_heads, min_heads = _count(model_cfg.get("n_heads")), _count(model_cfg.get("min_heads"))
    halt_max = _count(model_cfg.get("halt_max_steps"))
    if model_cfg.get("recursive") is False:
        halt_max = None
    grad_clip = _num(train_cfg.get("grad_clip"))

    figures = {
        "loss.png": lambda: plot_loss(train, evals),
        "lr.png": lambda: plot_lr(train),
        "grad_norm.png": lambda: plot_grad_norm(train, grad_clip),
        "heads.png": lambda: plot_heads(train, n_heads, min_heads),
        "head_load.png": lambda: plot_head_load(train),
        "expert_load.png": lambda: plot_expert_load(train),
        "halting.png": lambda: plot_halting(train, evals, halt_max),
        "halt_hist.png": lambda: plot_halt_hist(train),
    }
    out_dir = run_dir / PLOTS_DIR
    written: list[Path] = []
    for name, build in figures.items():
        try:
            fig = build()
            if fig is None:
                continue
            try:
                out_dir.mkdir(parents=True, exist_ok=True)
            except OSError as e:
                raise MoeError(f"{out_dir}: cannot write ({os_reason(e)})") from None
            written.append(save_figure(fig, out_dir / name))  # matplotlib computes the axes while it saves
        except (ValueError, OverflowError, ZeroDivisionError) as e:  # numbers no plot can take (atomic: no file)
            reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise MoeError(f"{run_dir / METRICS_FILE}: cannot draw {name} from its values ({reason[:200]})") \
                from None
    return written


def _count(v: Any) -> int | None:
    """A positive count from config.json (heads, steps), or None for anything else (absent, mistyped, absurd)."""
    return v if isinstance(v, int) and not isinstance(v, bool) and 0 < v <= 1_000_000 else None


@click.command()
@click.argument("run_dir")
def plot(run_dir: str) -> None:
    """Write training plots (loss, lr, grad norms, heads, head load, expert load, halting) to RUN_DIR/plots/."""
    paths = write_plots(run_dir)  # a MoeError is reported by the `moe` group (one line, exit code 2)
    if not paths:
        click.echo(f"{run_dir}: no plottable metrics yet", err=True)
    for p in paths:
        click.echo(str(p))
