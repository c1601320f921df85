"""Shared fixtures: tiny model configs, a generated fixture corpus, and helpers to run the `moe` CLI.

Everything here is deterministic and offline: the corpus is built from a word list with a seeded
random.Random (never downloaded, never the real corpus), and every model is small enough for a 2-core CPU.

Fixtures other test files can reuse:
  make_config(**overrides) -> ModelConfig     a tiny, valid model config (vocab 97, seq 16, d_model 32, ...)
  tiny_config                                 make_config() with no overrides
  corpus_file                                 session-scoped path of a ~12 KB generated .txt corpus
  moe_cli(*args, in_process=False)            run `moe ...` (subprocess, or in-process via click's CliRunner)
  tiny_run_dir                                session-scoped run directory of a short --preset tiny run
"""

from __future__ import annotations

import os
import random
import subprocess
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from moe_core.config import ModelConfig

# Tiny tensors gain nothing from intra-op threads, and on a shared 2-core machine a second thread mostly spins:
# single-threaded, the model tests run ~10x faster under load. (Affects this test process only.)
torch.set_num_threads(1)

REPO = Path(__file__).resolve().parents[1]

# -----------------------------------------------------------------------------
# tiny model configs

TINY_MODEL = dict(vocab_size=97, max_seq_len=16, d_model=32, n_heads=4, n_layers=1, min_heads=1, max_heads=4,
                  n_experts=4, top_k=2, d_expert=32, H_cycles=2, L_cycles=2, halt_max_steps=3, dropout=0.0)


def tiny_model_config(**overrides) -> ModelConfig:
    """A validated tiny ModelConfig; keyword arguments override single fields."""
    cfg = ModelConfig(**{**TINY_MODEL, **overrides})
    cfg.validate()
    return cfg


@torch.no_grad()
def vary_routing(model: torch.nn.Module, lm_scale: float = 1.0) -> torch.nn.Module:
    """Random routers and predictors (a fresh model routes almost uniformly: here tokens use different experts and
    head counts) and a halt head that stops samples of one batch at different steps (halting is decided at the
    first position in a causal model). lm_scale widens the logits' spread, so that greedy argmax never sits within
    float noise of a tie."""
    for name, p in model.named_parameters():
        if any(k in name for k in ("router", "complexity_head", "threshold_head")):
            p.normal_(0.0, 0.5)
    model.halt_head.weight.normal_(0.0, 1.0)
    model.halt_head.bias.zero_()
    model.lm_head.weight.mul_(lm_scale)
    return model


@pytest.fixture
def make_config() -> Callable[..., ModelConfig]:
    return tiny_model_config


@pytest.fixture
def tiny_config() -> ModelConfig:
    return tiny_model_config()


# -----------------------------------------------------------------------------
# fixture corpus

_WORDS = (
    "the a an one every some old young quiet bright dark small large green river mountain city garden king "
    "queen child teacher merchant sailor farmer soldier poet walked sang whispered carried found lost watched "
    "built opened closed remembered under over beside through across before after slowly quickly gently "
    "loudly happily stone water fire wind light shadow bread letter ship road house door window morning "
    "evening night winter summer and but because while when although if then so"
).split()


def make_corpus(n_chars: int = 12_000, seed: int = 1234) -> str:
    """English-like text: sentences of random words with capitals and punctuation, one per line."""
    rng = random.Random(seed)
    lines: list[str] = []
    size = 0
    while size < n_chars:
        words = [rng.choice(_WORDS) for _ in range(rng.randint(4, 14))]
        sentence = " ".join(words)
        sentence = sentence[0].upper() + sentence[1:] + rng.choice(".,.!?;")
        if rng.random() < 0.15:
            sentence = rng.choice(["ALICE", "BOB", "CAROL"]) + ":\n" + sentence
        lines.append(sentence)
        size += len(sentence) + 1
    return "\n".join(lines) + "\n"


@pytest.fixture(scope="session")
def corpus_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("corpus") / "corpus.txt"
    path.write_text(make_corpus(), encoding="utf-8")
    return path


# -----------------------------------------------------------------------------
# running the CLI


@dataclass
class CliResult:
    returncode: int
    stdout: str
    stderr: str

    def describe(self) -> str:
        return f"exit {self.returncode}\n--- stdout ---\n{self.stdout[-3000:]}\n--- stderr ---\n{self.stderr[-3000:]}"


def subprocess_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONHASHSEED"] = "0"
    env["TQDM_DISABLE"] = "1"  # keep captured output small; tqdm reads TQDM_* defaults from the environment
    env.setdefault("OMP_NUM_THREADS", "1")  # tiny models: a second thread only contends on a shared 2-core CPU
    return env


def moe_command(args: Sequence[str], module: str | None = None) -> list[str]:
    """argv for `moe ARGS` (module=None) or `python -m MODULE ARGS` (e.g. module="train")."""
    if module is not None:
        return [sys.executable, "-m", module, *map(str, args)]
    return [sys.executable, "-c", "from moe_core.cli import main; main()", *map(str, args)]


def spawn_moe(args: Sequence[str], module: str | None = None, cwd: Path | None = None) -> subprocess.Popen:
    """Start `moe ARGS` (or `python -m MODULE ARGS`) without waiting: several can run at once."""
    return subprocess.Popen(moe_command(args, module), cwd=cwd or REPO, env=subprocess_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(proc: subprocess.Popen, timeout: float = 600) -> CliResult:
    stdout, stderr = proc.communicate(timeout=timeout)
    return CliResult(proc.returncode, stdout, stderr)


def run_moe(args: Sequence[str], module: str | None = None, in_process: bool = False,
            timeout: float = 600) -> CliResult:
    """Run `moe ARGS`: as a subprocess (the real entry point, exit codes and all), or in-process through
    click's CliRunner (no torch import cost; exceptions other than MoeError show up as exit code 1)."""
    if not in_process:
        return finish(spawn_moe(args, module), timeout)
    from click.testing import CliRunner

    from moe_core.cli import cli

    argv = [str(a) for a in args]
    if module == "train":
        argv = ["train", *argv]
    elif module is not None:
        raise ValueError(f"in-process runs support module=None or 'train', got {module!r}")
    result = CliRunner().invoke(cli, argv, catch_exceptions=True)
    stderr = result.stderr
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        import traceback

        stderr += "".join(traceback.format_exception(result.exception))
    return CliResult(result.exit_code, result.stdout, stderr)


@pytest.fixture
def moe_cli() -> Callable[..., CliResult]:
    """moe_cli("train", "--preset", "tiny", ..., in_process=True) -> CliResult."""

    def call(*args: str, module: str | None = None, in_process: bool = False, timeout: float = 600) -> CliResult:
        return run_moe(args, module=module, in_process=in_process, timeout=timeout)

    return call


# -----------------------------------------------------------------------------
# a trained tiny run, shared by every test that needs a run directory

TINY_RUN_STEPS = 12
TINY_RUN_VOCAB = 300


def tiny_train_args(corpus: Path, out: Path, steps: int = TINY_RUN_STEPS, compile_: bool = False) -> list[str]:
    return ["--preset", "tiny", "--compile" if compile_ else "--no-compile", "--data", str(corpus),
            "--device", "cpu", "--out", str(out),
            "--set", f"model.vocab_size={TINY_RUN_VOCAB}",
            "--set", f"train.max_steps={steps}",
            "--set", f"train.eval_every={max(1, steps // 2)}",
            "--set", "train.log_every=3",
            "--set", "train.batch_size=8",
            "--set", "train.eval_batches=2",
            "--set", "train.plots=false"]  # the plots' own tests draw them (test_plots.py)


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory: pytest.TempPathFactory, corpus_file: Path) -> tuple[Path, CliResult]:
    """A finished `moe train --preset tiny --no-compile` run on the fixture corpus (in-process, ~10 s)."""
    out = tmp_path_factory.mktemp("runs") / "tiny"
    result = run_moe(tiny_train_args(corpus_file, out), module="train", in_process=True)
    assert result.returncode == 0, result.describe()
    return out, result


@pytest.fixture(scope="session")
def tiny_run_dir(tiny_run: tuple[Path, CliResult]) -> Path:
    return tiny_run[0]
