"""`moe train` (also `python -m train`)."""

from __future__ import annotations

import json
import os
import sys

import click

from moe_core.cli import run

from .config import CONFIG_FILE_HELP, DEVICES, build_config, preset_names, with_absolute_paths


@click.command(context_settings={"show_default": True})
@click.option("--config", "config_file", type=click.Path(),
              help=CONFIG_FILE_HELP)
@click.option("--preset", default=None, metavar="NAME",
              help=f"Named config from configs/: {', '.join(preset_names())}. Default: 'default' when no --config.")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
              help="Override one setting, e.g. --set model.d_model=64 --set train.lr=1e-3 (or lr=1e-3). Repeatable.")
@click.option("--data", default=None, type=click.Path(),
              help="Training text: a .txt file, a folder of .txt files, or .jsonl with a \"text\" field. "
                   "Default: the embedded corpus (Shakespeare's plays).")
@click.option("--tokenizer", default=None, type=click.Path(),
              help="Use this tokenizer.json (its vocabulary sets model.vocab_size) instead of training a BPE.")
@click.option("--out", default=None, type=click.Path(), help="Run directory to write.")
@click.option("--resume", "resume_dir", default=None, type=click.Path(),
              help="Continue the run in this directory from its newest checkpoint, exactly where it stopped. "
                   "Only --set train.max_steps/eval_every/log_every/checkpoint_every/keep_checkpoints/"
                   "max_bad_steps/compile/device may change.")
@click.option("--overwrite", is_flag=True, help="Replace an existing run in --out.")
@click.option("--compile/--no-compile", "compile_", default=None,
              help="torch.compile the training step (default: train.compile, on in every preset).")
@click.option("--device", type=click.Choice(DEVICES), default=None,
              help="Device (default: train.device = auto: CUDA with bf16 autocast where present, else CPU).")
def train(config_file, preset, overrides, data, tokenizer, out, resume_dir, overwrite, compile_, device) -> None:
    """Train a recursive MoE/MoH model and write the run directory OUT, or continue one with --resume.

    Settings are layered: dataclass defaults, then --preset, then --config, then --set. The full config is
    printed at the start and saved to OUT/config.json. Checkpoints go to OUT/trainer_state/ every
    train.checkpoint_every steps, at the end, and on Ctrl-C / SIGTERM (exit code 130 / 143).
    """
    from moe_core.common.errors import MoeError

    from . import trainer  # torch is imported only when a run starts
    from .signals import TrainingInterrupted

    extra = list(overrides)
    for key, value in (("data", data), ("tokenizer", tokenizer), ("device", device)):
        if value is not None:
            extra.append(f"train.{key}={json.dumps(value)}")
    if compile_ is not None:
        extra.append(f"train.compile={'true' if compile_ else 'false'}")
    try:
        if resume_dir is not None:
            given = [name for name, v in (("--out", out), ("--preset", preset), ("--config", config_file),
                                          ("--data", data), ("--tokenizer", tokenizer), ("--overwrite", overwrite))
                     if v]
            if given:
                raise MoeError(f"--resume continues a run with its saved config: {given[0]} cannot be combined "
                               f"with it (use --set for the settings that may change)")
            trainer.resume(resume_dir, extra)
            return
        if out is None:
            raise MoeError("--out: required (the run directory to write), or --resume RUN_DIR")
        if preset is None and config_file is None:
            preset = "default"
        cfg = with_absolute_paths(build_config(preset, config_file, extra))  # printed as config.json records it
        if os.environ.get("RANK", "0") == "0":  # under torchrun, rank 0 speaks for all
            click.echo("config:\n" + json.dumps(cfg.to_dict(), indent=2))
        trainer.train(cfg, out, overwrite=overwrite)
    except TrainingInterrupted as e:
        click.echo(str(e), err=True)
        sys.exit(128 + e.signum)


def main() -> None:
    run(train)
