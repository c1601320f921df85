"""The `moe` command. Subcommands live with their packages and are imported only when run, so
`moe serve` never loads the trainer and `moe --help` stays fast."""

from __future__ import annotations

import importlib
import sys

import click

from . import __version__
from .errors import MoeError

SUBCOMMANDS = {  # name -> (module, attribute, one-line help)
    "train": ("train.cli", "train", "Train a model into a run directory."),
    "export": ("export.cli", "export", "Export a run to one static ONNX graph and prove parity."),
    "serve": ("serve.cli", "serve", "Batch inference on ONNX Runtime (CUDA where present, else CPU)."),
    "plot": ("train.plots", "plot", "Write (or refresh) the PNG plots of a run directory."),
    "ablate": ("train.ablate", "ablate", "Train a grid of config variants and compare them in one table."),
    "eval": ("train.evaluate", "eval_", "Evaluate a run on its held-out set against the steps it may take."),
}


class UserError(click.ClickException):
    """A MoeError on its way out of click: one line on stderr, exit code 2."""

    exit_code = 2

    def show(self, file=None) -> None:
        click.echo(f"error: {self.message}", err=True)


class LazyGroup(click.Group):
    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except MoeError as e:
            raise UserError(str(e)) from None

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(SUBCOMMANDS)

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name not in SUBCOMMANDS:
            return None
        module, attr, _ = SUBCOMMANDS[name]
        return getattr(importlib.import_module(module), attr)

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        with formatter.section("Commands"):
            formatter.write_dl([(name, SUBCOMMANDS[name][2]) for name in self.list_commands(ctx)])


@click.group(cls=LazyGroup)
@click.version_option(__version__, prog_name="moe")
def cli() -> None:
    """Recursive MoE/MoH reasoning models: train, export to ONNX, serve on ONNX Runtime."""


def run(command: click.Command, args: list[str] | None = None) -> None:
    """Run a click command; a MoeError becomes one line on stderr and exit code 2."""
    try:
        command.main(args=args, standalone_mode=False)
    except MoeError as e:
        click.echo(f"error: {e}", err=True)
        sys.exit(2)
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        sys.exit(130)
    except click.ClickException as e:
        e.show()
        sys.exit(e.exit_code)


def main() -> None:
    run(cli)
