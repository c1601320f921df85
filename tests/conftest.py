"""The fixtures (helpers.py holds what tests import).

  make_config(**overrides) -> ModelConfig     a tiny, valid model config (vocab 97, seq 16, d_model 32, ...)
  tiny_config                                 make_config() with no overrides
  corpus_file                                 session-scoped path of a ~12 KB generated .txt corpus
  moe_cli(*args, in_process=False)            run `moe ...` (subprocess, or in-process via click's CliRunner)
  tiny_run_dir                                session-scoped run directory of a short --preset tiny run
  exported                                    per module: (run_dir, m.onnx + m.step.onnx) of helpers.varied_run

Tests under tests/e2e/ (training runs, exports, subprocesses) are marked `slow`: `make test-fast` leaves them out.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from helpers import VARIED_SEQ_LEN, CliResult, make_corpus, run_moe, tiny_model_config, tiny_train_args, varied_run

from moe_core.config import ModelConfig

# Tiny tensors gain nothing from intra-op threads, and on a shared 2-core machine a second thread mostly spins:
# single-threaded, the model tests run ~10x faster under load. (Affects this test process only.)
torch.set_num_threads(1)


# -----------------------------------------------------------------------------
# tiny model configs


@pytest.fixture
def make_config() -> Callable[..., ModelConfig]:
    return tiny_model_config


@pytest.fixture
def tiny_config() -> ModelConfig:
    return tiny_model_config()


# -----------------------------------------------------------------------------
# fixture corpus


@pytest.fixture(scope="session")
def corpus_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("corpus") / "corpus.txt"
    path.write_text(make_corpus(), encoding="utf-8")
    return path


# -----------------------------------------------------------------------------
# running the CLI


@pytest.fixture
def moe_cli() -> Callable[..., CliResult]:
    """moe_cli("train", "--preset", "tiny", ..., in_process=True) -> CliResult."""

    def call(*args: str, module: str | None = None, in_process: bool = False, timeout: float = 600) -> CliResult:
        return run_moe(args, module=module, in_process=in_process, timeout=timeout)

    return call


# -----------------------------------------------------------------------------
# a trained tiny run, shared by every test that needs a run directory


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


# -----------------------------------------------------------------------------
# one exported model per module that asks for it


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> tuple[Path, Path]:
    """(run_dir, model.onnx) of a random model whose routing and halting really vary between inputs."""
    from export.onnx_export import export_run

    tmp = tmp_path_factory.mktemp("serve")
    run_dir = varied_run(tmp / "run", seed=0, max_seq_len=VARIED_SEQ_LEN, H_cycles=1)
    onnx_path = tmp / "m.onnx"
    export_run(run_dir, onnx_path, check=False, stepwise=True, log=lambda _: None)  # + m.step.onnx
    return run_dir, onnx_path


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    e2e = Path(__file__).parent / "e2e"
    for item in items:
        if e2e in item.path.parents:
            item.add_marker(pytest.mark.slow)
