"""`moe train` (also `python -m train`)."""

from __future__ import annotations

import json

import click

from moe_core.cli import run

from .config import build_config, preset_names


@click.command(context_settings={"show_default": True})
@click.option("--config", "config_file", type=click.Path(dir_okay=False),
              help="TOML file with [model] and [train] sections, applied over the preset.")
@click.option("--preset", default=None, metavar="NAME",
              help=f"Named config from configs/: {', '.join(preset_names())}. Default: 'default' when no --config.")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
              help="Override one setting, e.g. --set model.d_model=64 --set train.lr=1e-3 (or lr=1e-3). Repeatable.")
@click.option("--data", default=None, type=click.Path(),
              help="Training text: a .txt file, a folder of .txt files, or .jsonl with a \"text\" field. "
                   "Default: the embedded corpus (Shakespeare's plays).")
@click.option("--tokenizer", default=None, type=click.Path(dir_okay=False),
              help="Use this tokenizer.json (its vocabulary sets model.vocab_size) instead of training a BPE.")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Run directory to write.")
@click.option("--overwrite", is_flag=True, help="Replace an existing run in --out.")
@click.option("--compile/--no-compile", "compile_", default=None,
              help="torch.compile the training step (default: train.compile, on in every preset).")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default=None,
              help="Device (default: train.device = auto: CUDA with bf16 autocast where present, else CPU).")
def train(config_file, preset, overrides, data, tokenizer, out, overwrite, compile_, device) -> None:
    """Train a recursive MoE/MoH model and write the run directory OUT.

    Settings are layered: dataclass defaults, then --preset, then --config, then --set. The full config is
    printed at the start and saved to OUT/config.json.
    """
    from .trainer import train as run_training  # torch is imported only when a run starts

    if preset is None and config_file is None:
        preset = "default"
    extra = list(overrides)
    for key, value in (("data", data), ("tokenizer", tokenizer), ("device", device)):
        if value is not None:
            extra.append(f"train.{key}={json.dumps(value)}")
    if compile_ is not None:
        extra.append(f"train.compile={'true' if compile_ else 'false'}")
    cfg = build_config(preset, config_file, extra)
    click.echo("config:\n" + json.dumps(cfg.to_dict(), indent=2))
    run_training(cfg, out, overwrite=overwrite)


def main() -> None:
    run(train)
