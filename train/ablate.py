"""`moe ablate`: train a named grid of variants of one base config and compare them in one table.

    moe ablate --preset tiny --no-compile --out runs/ablate              # the built-in seeds-study grid
    moe ablate --config base.toml --grid my-grid.toml --steps 200 --out runs/mine

A grid is a TOML file of named variants, each a set of overrides over the base config (the format is described
in configs/grids/seeds-study.toml, the built-in grid). Every variant trains for the same number of steps on the
same data with one tokenizer, trained once into DIR/tokenizer.json, into DIR/NAME/. Then DIR/ablation.md,
DIR/ablation.csv and DIR/val_loss.png compare them, and the table is printed. A variant that fails (a bad
override, a non-finite loss, anything) is a row of the table with its reason; the other variants still run.
"""

from __future__ import annotations

import csv
import io
import json
import re
import statistics
import sys
import time
import traceback
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import click

from moe_core.common.errors import ConfigError, MoeError
from moe_core.common.files import atomic_write_text
from moe_core.run_layout import METRICS_FILE, TOKENIZER_FILE

from .config import CONFIG_FILE_HELP, SECTIONS, RunConfig, build_config, parse_override, preset_names, read_toml
from .plots import layer_numbers, plot_val_loss_overlay, read_metrics, save_figure, series, split_records

GRIDS_DIR = "grids"  # inside the train.configs package (configs/grids/)
DEFAULT_GRID = "seeds-study"
OUTPUTS = ("ablation.md", "ablation.csv", "val_loss.png", TOKENIZER_FILE)
# What makes variants comparable: the same steps on the same tokens. These cannot vary inside a grid.
FIXED = {("train", "max_steps"), ("train", "data"), ("train", "tokenizer"), ("train", "val_fraction"),
         ("model", "vocab_size")}
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]*$")

# (key in Row.figures, markdown header, format) — the comparison columns, in table order.
COLUMNS = [
    ("val_loss", "val loss", "{:.4f}"),
    ("val_ppl", "ppl", "{:.1f}"),
    ("tokens_per_s", "tokens/s", "{:,.0f}"),
    ("mean_heads", "heads/token", "{:.2f}"),
    ("halt_step", "halt step", "{:.2f}"),
    ("max_grad_norm", "max grad norm", "{:.2f}"),
    ("params", "params", "{:,.0f}"),
    ("wall_s", "time (s)", "{:.0f}"),
]
NOT_APPLICABLE = "—"


# -----------------------------------------------------------------------------
# grids


@dataclass
class Grid:
    source: str  # the file, or the built-in grid's name
    description: str
    variants: dict[str, list[str]]  # name -> overrides as `--set` items, e.g. ["model.top_k=1"]


def grid_names() -> list[str]:
    return sorted(p.name[: -len(".toml")] for p in (resources.files("train.configs") / GRIDS_DIR).iterdir()
                  if p.name.endswith(".toml"))


def load_grid(grid: str) -> Grid:
    """A grid from a TOML file, or a built-in grid (configs/grids/NAME.toml) by name."""
    if Path(grid).is_file():
        return parse_grid(read_toml(grid), grid)
    if grid in grid_names():
        with resources.as_file(resources.files("train.configs") / GRIDS_DIR / f"{grid}.toml") as path:
            return parse_grid(read_toml(path), grid)
    raise ConfigError(f"--grid {grid}: no such file, and no built-in grid of that name "
                      f"(built-in: {', '.join(grid_names())})")


def parse_grid(data: dict[str, Any], where: str) -> Grid:
    """Check a grid's shape. The overrides' keys and values are checked per variant, when it is built."""
    unknown = sorted(set(data) - {"description", "variants"})
    if unknown:
        raise ConfigError(f"{where}: unknown key {unknown[0]!r} (a grid has `description` and [variants.NAME] tables)")
    description = data.get("description", "")
    if not isinstance(description, str):
        raise ConfigError(f"{where}: description: expected a string, got {description!r}")
    variants = data.get("variants")
    if not isinstance(variants, dict) or not variants:
        raise ConfigError(f"{where}: no variants (expected [variants.NAME] tables of overrides)")
    parsed = {}
    for name, table in variants.items():
        here = f"{where}: variants.{name}"
        if not _NAME.match(name) or name in OUTPUTS:
            raise ConfigError(f"{here}: a variant's name is its run directory: expected letters, digits and _ - . + "
                              f"(not {', '.join(OUTPUTS)})")
        if not isinstance(table, dict):
            raise ConfigError(f"{here}: expected a table of overrides, got {table!r}")
        parsed[name] = _overrides(table, here)
    return Grid(where, description, parsed)


def _overrides(table: dict[str, Any], where: str) -> list[str]:
    """{"model": {"top_k": 1}, "lr": 1e-4} -> ["model.top_k=1", "lr=0.0001"]: the items `--set` takes (a table
    per config section)."""
    flat = []
    for key, value in table.items():
        pairs = value.items() if key in SECTIONS and isinstance(value, dict) else [(None, value)]
        for sub, v in pairs:
            name = key if sub is None else f"{key}.{sub}"
            if isinstance(v, dict | list) or not isinstance(v, bool | int | float | str):
                raise ConfigError(f"{where}: {name}: expected a number, string or boolean, got {v!r}")
            flat.append(f"{name}={json.dumps(v)}")  # JSON scalars are TOML literals, as --set reads them
    for item in flat:
        try:
            section, key, _ = parse_override(item)
        except ConfigError:
            continue  # an unknown key: reported as this variant's failure when it is built
        if (section, key) in FIXED:
            raise ConfigError(f"{where}: {section}.{key} cannot vary within a grid: every variant trains the same "
                              f"steps on the same data and tokenizer (use --steps, --data, --set)")
    return flat


# -----------------------------------------------------------------------------
# one row per variant


@dataclass
class Row:
    name: str
    overrides: list[str]
    config: RunConfig | None = None
    status: str = "pending"  # pending | ok | failed | "same as NAME"
    reason: str = ""
    figures: dict[str, float | None] = field(default_factory=dict)
    curve: tuple[list[float], list[float]] = field(default_factory=lambda: ([], []))  # (steps, val losses)
    baselines: tuple[float | None, float | None] = (None, None)  # (uniform ln V, unigram)

    def fail(self, e: BaseException) -> None:
        self.status = "failed"
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        self.reason = (first if isinstance(e, MoeError) else f"{type(e).__name__}: {first}")[:200]


def summarise(run_dir: Path, result: dict[str, Any], recursive: bool) -> tuple[dict[str, float | None], Any, Any]:
    """The table's figures for one finished run, from its result and its metrics.jsonl."""
    train, evals = split_records(read_metrics(run_dir / METRICS_FILE))
    last_step = max((r["step"] for r in train), default=0)
    tail = [r for r in train if r["step"] > 0.75 * last_step]  # routing at the end of training, not its start
    heads = [v for li in layer_numbers(tail, "moh_heads") for v in series(tail, f"L{li}.moh_heads")[1]]
    grad_norms = series(train, "grad_norm")[1]
    halt = series(evals, "val_halt_step")[1]
    figures = {
        "val_loss": result["val_loss"], "val_ppl": result["val_ppl"], "tokens_per_s": result["tokens_per_s"],
        "mean_heads": statistics.fmean(heads) if heads else None,
        "halt_step": halt[-1] if recursive and halt else None,
        "max_grad_norm": max(grad_norms) if grad_norms else None,
        "params": result["params"],
    }
    baselines = (evals[0].get("uniform_baseline"), evals[0].get("unigram_baseline")) if evals else (None, None)
    return figures, series(evals, "val_loss"), baselines


# -----------------------------------------------------------------------------
# the tables and the plot


def _cell(value: float | None, fmt: str) -> str:
    return NOT_APPLICABLE if value is None else fmt.format(value)


def markdown_table(rows: list[Row]) -> str:
    header = ["variant", "overrides", "status", *(h for _, h, _ in COLUMNS)]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] * 3 + ["---:"] * len(COLUMNS)) + "|"]
    for r in rows:
        status = f"{r.status}: {r.reason}" if r.reason else r.status
        cells = [r.name, ", ".join(r.overrides) or "(base config)", status,
                 *(_cell(r.figures.get(k), fmt) for k, _, fmt in COLUMNS)]
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    return "\n".join(lines) + "\n"


def csv_table(rows: list[Row]) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["variant", "overrides", "status", "reason", *(k for k, _, _ in COLUMNS)])
    for r in rows:
        w.writerow([r.name, " ".join(r.overrides), r.status, r.reason,
                    *("" if r.figures.get(k) is None else r.figures[k] for k, _, _ in COLUMNS)])
    return buf.getvalue()


def write_report(out: Path, grid: Grid, base: RunConfig, rows: list[Row]) -> str:
    """Write ablation.md / ablation.csv (and val_loss.png once a variant has finished); returns the markdown."""
    done = [r for r in rows if r.status == "ok"]
    n_failed = sum(r.status == "failed" for r in rows)
    md = (f"# Ablation: {grid.source}\n\n{grid.description}\n\n"
          f"{len(rows)} variants, {base.train.max_steps} steps each, the same data and tokenizer; "
          f"{len(done)} trained, {n_failed} failed.\n\n"
          + markdown_table(rows) +
          "\nval loss / ppl: the last evaluation (halting-selected logits, as exported). heads/token: MoH heads per "
          "token, mean over layers and the logged steps of the last quarter of training. halt step: mean halt step "
          "on the validation set at the end (— without recursion). max grad norm: largest pre-clip global norm "
          "over the logged steps. tokens/s: steady-state training throughput. A variant whose config equals an "
          "earlier one's is not trained again (status `same as NAME`, its figures repeated).\n")
    atomic_write_text(out / "ablation.md", md)
    atomic_write_text(out / "ablation.csv", csv_table(rows))
    if done:
        uniform, unigram = done[0].baselines
        fig = plot_val_loss_overlay({r.name: r.curve for r in done}, uniform, unigram,
                                    title=f"Validation loss by variant ({base.train.max_steps} steps each)")
        if fig is not None:
            save_figure(fig, out / "val_loss.png")
    return md


# -----------------------------------------------------------------------------
# running the grid


def run_ablation(grid: Grid, preset: str | None, config_file: str | None, sets: list[str], out: str | Path,
                 overwrite: bool = False) -> list[Row]:
    """Train every variant of `grid` over the base config into OUT/NAME/ and write the comparison into OUT."""
    from .run_dir import check_run_dir, claim_run_dir
    from .rundir_lock import RunDirLock  # torch and the trainer are imported only when a grid runs

    out = Path(out)
    check_run_dir(out, overwrite)
    base = build_config(preset, config_file, sets)  # a bad base config stops everything: every variant needs it
    shared = [] if base.train.tokenizer else [f"train.tokenizer={json.dumps(str((out / TOKENIZER_FILE).resolve()))}"]

    rows = [Row(name, overrides) for name, overrides in grid.variants.items()]
    seen: dict[str, Row] = {}  # resolved config -> the first row that has it
    for row in rows:
        try:
            row.config = build_config(preset, config_file, [*sets, *shared, *row.overrides])
        except MoeError as e:
            row.fail(e)
            click.echo(f"variant {row.name}: {row.reason} — reported as failed", err=True)
            continue
        key = json.dumps(row.config.to_dict(), sort_keys=True)
        if key in seen:
            row.status = f"same as {seen[key].name}"
        else:
            seen[key] = row

    with RunDirLock(out) as lock:  # one ablation writes OUT at a time (each variant's run locks its own)
        claim_run_dir(out, overwrite, lock)
        _run_grid(out, grid, base, rows, shared, overwrite)
    return rows


def _run_grid(out: Path, grid: Grid, base: RunConfig, rows: list[Row], shared: list[str], overwrite: bool) -> None:
    """The tokenizer, then every variant, with the report rewritten after each (OUT exists and is locked)."""
    from .data import load_documents, train_tokenizer
    from .trainer import train as train_run

    if shared:  # one tokenizer for every variant: the same tokens, and its training is paid once
        t0 = time.perf_counter()
        tok = train_tokenizer(load_documents(base.train.data), base.model.vocab_size)
        atomic_write_text(out / TOKENIZER_FILE, tok.to_str(pretty=False))
        click.echo(f"tokenizer: {tok.get_vocab_size()} tokens, shared by every variant "
                   f"({time.perf_counter() - t0:.1f}s) -> {out / TOKENIZER_FILE}")

    to_run = [r for r in rows if r.status == "pending"]
    write_report(out, grid, base, rows)
    for i, row in enumerate(to_run, start=1):
        click.echo(f"\n=== variant {i}/{len(to_run)}: {row.name} ({', '.join(row.overrides) or 'base config'}) ===")
        t0 = time.perf_counter()
        assert row.config is not None  # a pending row's config was built (a failed build marks the row failed)
        try:
            if row.config.train.compile:
                import torch._dynamo

                torch._dynamo.reset()  # each variant compiles its own blocks; don't pile up guards across runs
            result = train_run(row.config, out / row.name, overwrite=overwrite)
            row.figures, row.curve, row.baselines = summarise(out / row.name, result, row.config.model.recursive)
            row.figures["wall_s"] = time.perf_counter() - t0
            row.status = "ok"
            if result.get("skipped_steps"):
                row.reason = f"{result['skipped_steps']} non-finite step(s) skipped"
        except Exception as e:  # one variant's failure is a row of the table, not the end of the grid
            row.fail(e)
            if not isinstance(e, MoeError):
                traceback.print_exc(file=sys.stderr)
            click.echo(f"variant {row.name} failed: {row.reason}", err=True)
        for twin in rows:  # variants with the same config share this run's outcome
            if twin.status == f"same as {row.name}":
                twin.figures, twin.reason = row.figures, row.reason
        write_report(out, grid, base, rows)  # after every variant: a killed grid keeps what it measured


# -----------------------------------------------------------------------------
# the command


@click.command(context_settings={"show_default": True})
@click.option("--preset", default=None, metavar="NAME",
              help=f"Base preset from configs/: {', '.join(preset_names())}. Default: 'default' when no --config.")
@click.option("--config", "config_file", type=click.Path(dir_okay=False),
              help=CONFIG_FILE_HELP)
@click.option("--grid", default=DEFAULT_GRID, metavar="FILE|NAME",
              help="Grid of variants: a TOML file of [variants.NAME] override tables, or a built-in grid's name.")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
              help="Override a base setting for every variant, e.g. --set train.eval_every=25. Repeatable.")
@click.option("--steps", type=click.IntRange(min=1), default=None,
              help="Training steps of every variant (default: the base config's train.max_steps).")
@click.option("--data", default=None, type=click.Path(),
              help="Training text for every variant (default: the base config's, else the embedded corpus).")
@click.option("--only", multiple=True, metavar="NAME", help="Run only these variants of the grid. Repeatable.")
@click.option("--out", required=True, type=click.Path(file_okay=False),
              help="Directory for the variants' runs and the comparison.")
@click.option("--overwrite", is_flag=True, help="Replace the runs of an earlier ablation in --out.")
@click.option("--compile/--no-compile", "compile_", default=None,
              help="torch.compile the training step (default: the base config's train.compile).")
def ablate(preset, config_file, grid, overrides, steps, data, only, out, overwrite, compile_) -> None:
    """Train a grid of variants of one base config and compare them.

    Writes OUT/NAME/ (one run directory per variant), OUT/ablation.md and OUT/ablation.csv (final val loss,
    perplexity, tokens/s, heads per token, halt step, max grad norm) and OUT/val_loss.png (every variant's
    val-loss curve), and prints the table. Built-in grids: configs/grids/ (the default covers the seeds' study).
    """
    if preset is None and config_file is None:
        preset = "default"
    g = load_grid(grid)
    if only:
        unknown = [n for n in only if n not in g.variants]
        if unknown:
            raise ConfigError(f"--only {unknown[0]}: no such variant in {g.source} (variants: {', '.join(g.variants)})")
        g.variants = {n: v for n, v in g.variants.items() if n in only}
    sets = list(overrides)
    if steps is not None:
        sets.append(f"train.max_steps={steps}")
    if data is not None:
        sets.append(f"train.data={json.dumps(data)}")
    if compile_ is not None:
        sets.append(f"train.compile={'true' if compile_ else 'false'}")
    rows = run_ablation(g, preset, config_file, sets, out, overwrite)
    click.echo("\n" + markdown_table(rows))
    written = [str(Path(out) / name) for name in OUTPUTS[:3] if (Path(out) / name).exists()]
    click.echo(f"wrote {', '.join(written)}")
    if not any(r.status == "ok" for r in rows):
        raise MoeError(f"all {len(rows)} variants failed (see {Path(out) / 'ablation.md'})")
