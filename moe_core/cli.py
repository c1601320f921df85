"""The `moe` command. Subcommands live with their packages and are imported only when run, so
`moe serve` never loads the trainer and `moe --help` stays fast.

Every way a command can end badly is one line on stderr, the same for every command:
- a MoeError (bad input): `error: <file[:line]/field>: <what was expected>`, exit code 2;
- a usage error click finds while parsing (an unknown option, a missing argument, a value out of range):
  `error: <option or argument>: <what was expected>`, exit code 2 (usage_message);
- SIGINT / SIGTERM: `interrupted by SIGTERM; unfinished outputs removed`, exit code 128 + the signal's number
  (130 / 143). The signal is raised as Interrupted in the main thread, so every atomic_write in progress removes
  its temp file on the way out (the trainer installs its own handlers while it trains, to save a checkpoint
  first: train/trainer.py).
"""

from __future__ import annotations

import contextlib
import importlib
import math
import re
import signal
import sys
import threading
from collections.abc import Iterator

import click

from . import __version__
from .common.errors import Interrupted, MoeError, os_reason
from .common.files import command_inputs


def finite(expected: str, ok):
    """A click callback for every float option: the value must be finite and satisfy ok (click's FloatRange lets
    nan and inf through)."""

    def check(ctx: click.Context, param: click.Parameter, value: float | None) -> float | None:
        if value is not None and not (math.isfinite(value) and ok(value)):
            raise click.BadParameter(f"expected {expected}, got {value}", ctx, param)
        return value

    return check


SUBCOMMANDS = {  # name -> (module, attribute, one-line help)
    "train": ("train.cli", "train", "Train a model into a run directory."),
    "export": ("export.cli", "export", "Export a run to one static ONNX graph and prove parity."),
    "serve": ("serve.cli", "serve", "Batch inference on ONNX Runtime (CUDA where present, else CPU)."),
    "plot": ("train.plots", "plot", "Write (or refresh) the PNG plots of a run directory."),
    "ablate": ("train.ablate", "ablate", "Train a grid of config variants and compare them in one table."),
    "eval": ("train.evaluate", "eval_", "Evaluate a run on its held-out set against the steps it may take."),
}
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class UserError(click.ClickException):
    """A MoeError on its way out of click: one line on stderr, exit code 2."""

    exit_code = 2

    def show(self, file=None) -> None:
        click.echo(f"error: {self.message}", err=True)


def _param_name(param: click.Parameter | None) -> str | None:
    if param is None:
        return None
    if isinstance(param, click.Option):
        return next((o for o in param.opts if o.startswith("--")), param.opts[0])
    return param.human_readable_name


_OUT_OF_RANGE = re.compile(r"^(.*) is not in the range (.*?)\.?$", re.S)
_NOT_ONE_OF = re.compile(r"^(.*) is not one of (.*?)\.?$", re.S)


def usage_message(e: click.UsageError) -> str:
    """A click usage error as `<option or argument>: <what was expected>` (the text after `error: `), one line."""
    ctx = e.ctx
    command = "moe" if ctx is None or ctx.parent is None else f"moe {ctx.info_name}"
    if isinstance(e, click.NoSuchOption):
        hint = f"; did you mean {' or '.join(sorted(e.possibilities))}?" if e.possibilities else ""
        return f"{e.option_name}: no such option of {command}{hint} (see {command} --help)"
    name = _param_name(getattr(e, "param", None))
    if isinstance(e, click.MissingParameter) and name is not None:
        kind = "argument" if isinstance(e.param, click.Argument) else "option"
        return f"{name}: missing; this {kind} is required (see {command} --help)"
    message = " ".join(str(e.message).split()).rstrip(".")
    if name is not None:
        if m := _OUT_OF_RANGE.match(message):
            message = f"expected a value in the range {m[2]}, got {m[1]}"
        elif m := _NOT_ONE_OF.match(message):
            message = f"expected one of {m[2]}, got {m[1]}"
        return f"{name}: {message}"
    return f"{command}: {message[:1].lower()}{message[1:]} (see {command} --help)"


def _interrupt(signum: int, frame: object) -> None:
    for s in STOP_SIGNALS:  # a second signal acts as usual: it ends the process at once
        signal.signal(s, signal.SIG_DFL)
    raise Interrupted(signum)


@contextlib.contextmanager
def stop_signals_raise() -> Iterator[None]:
    """While a command runs: SIGINT / SIGTERM raise Interrupted in the main thread (module docstring); the previous
    handlers come back afterwards. Nested uses (run, then LazyGroup.invoke) install it once."""
    if threading.current_thread() is not threading.main_thread() or signal.getsignal(signal.SIGTERM) is _interrupt:
        yield
        return
    previous = {s: signal.signal(s, _interrupt) for s in STOP_SIGNALS}
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


@contextlib.contextmanager
def command_scope() -> Iterator[None]:
    """One command's run: stop signals raise, and the files it reads are recorded so that no output replaces them
    (moe_core.common.files.command_inputs)."""

    with stop_signals_raise(), command_inputs():
        yield


def missing_module(e: ModuleNotFoundError, command: str) -> MoeError:
    """A package this install lacks, named in one line: the serving-only install (no torch, no matplotlib) runs
    `moe serve` only."""
    return MoeError(f"moe {command}: needs the package {e.name or str(e)}, which this Python environment lacks (the "
                    "serving-only install runs `moe serve` only; `pip install -e .` gives every command)")


class LazyGroup(click.Group):
    def invoke(self, ctx: click.Context):
        try:
            with command_scope():
                return super().invoke(ctx)
        except MoeError as e:
            raise UserError(str(e)) from None
        except ModuleNotFoundError as e:
            raise UserError(str(missing_module(e, ctx.invoked_subcommand or "command"))) from None
        except click.UsageError as e:  # a subcommand's own parse errors
            raise UserError(usage_message(e)) from None

    def make_context(self, info_name, args, parent=None, **extra) -> click.Context:
        try:
            return super().make_context(info_name, args, parent=parent, **extra)
        except click.UsageError as e:  # the group's own parse errors: `moe --bogus`, `moe nosuchcommand`
            raise UserError(usage_message(e)) from None

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(SUBCOMMANDS)

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name not in SUBCOMMANDS:
            return None
        module, attr, _ = SUBCOMMANDS[name]
        try:
            return getattr(importlib.import_module(module), attr)
        except ModuleNotFoundError as e:
            raise UserError(str(missing_module(e, name))) from None

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        with formatter.section("Commands"):
            formatter.write_dl([(name, SUBCOMMANDS[name][2]) for name in self.list_commands(ctx)])


@click.group(cls=LazyGroup)
@click.version_option(__version__, prog_name="moe")
def cli() -> None:
    """Recursive MoE/MoH reasoning models: train, export to ONNX, serve on ONNX Runtime."""


def run(command: click.Command, args: list[str] | None = None) -> None:
    """Run a click command; a MoeError or a usage error becomes one line on stderr and exit code 2, SIGINT / SIGTERM
    one line and exit code 128 + the signal (module docstring)."""
    try:
        with command_scope():
            command.main(args=args, standalone_mode=False)
    except MoeError as e:
        click.echo(f"error: {e}", err=True)
        sys.exit(2)
    except Interrupted as e:
        click.echo(f"interrupted by {e.name}; unfinished outputs removed", err=True)
        sys.exit(128 + e.signum)
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        sys.exit(130)
    except click.UsageError as e:
        click.echo(f"error: {usage_message(e)}", err=True)
        sys.exit(2)
    except click.ClickException as e:
        e.show()
        sys.exit(e.exit_code)
    except OSError as e:  # what the OS refused where no check looked first (a name over 255 bytes, ...): one line
        click.echo(f"error: {e.filename or command.name}: {os_reason(e)}", err=True)
        sys.exit(2)


def main() -> None:
    run(cli)
