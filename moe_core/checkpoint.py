"""The run directory: atomic writes, and loading a model back from config.json + model.safetensors."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from . import __version__
from .config import ModelConfig
from .errors import CheckpointError, ConfigError
from .model import RecursiveMoE

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
TOKENIZER_FILE = "tokenizer.json"

_UMASK = os.umask(0)
os.umask(_UMASK)


def atomic_write(path: str | os.PathLike, write: Callable[[str], None]) -> None:
    """Call write(tmp_path) on a temp file beside `path`, fsync it, then rename it over `path`.

    A reader sees the old file or the complete new one, never a torn one; on failure nothing is left.
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600 (and some writers recreate the file)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def save_weights(model: torch.nn.Module, path: str | os.PathLike) -> None:
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    atomic_write(path, lambda tmp: save_file(state, tmp, metadata={"format": "pt", "moe_version": __version__}))


def save_run(run_dir: str | os.PathLike, model: RecursiveMoE, tokenizer_json: str,
             extra_config: dict[str, Any] | None = None) -> None:
    """Write a complete run directory for `model`: config.json, model.safetensors and tokenizer.json."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    config = {"model": model.config.to_dict(), **(extra_config or {}), "moe_version": __version__}
    atomic_write_text(run_dir / CONFIG_FILE, json.dumps(config, indent=2) + "\n")
    atomic_write_text(run_dir / TOKENIZER_FILE, tokenizer_json)
    save_weights(model, run_dir / WEIGHTS_FILE)


def read_json(path: str | os.PathLike) -> Any:
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise CheckpointError(f"{path}: file not found") from None
    except (OSError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: cannot read ({e})") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: invalid JSON at line {e.lineno} column {e.colno} ({e.msg})") from None


def load_run_config(run_dir: str | os.PathLike) -> tuple[ModelConfig, dict[str, Any]]:
    """The run's model config (validated) and the whole config.json as a dict."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise CheckpointError(f"{run_dir}: not a run directory (expected a folder with {CONFIG_FILE})")
    path = run_dir / CONFIG_FILE
    data = read_json(path)
    if not isinstance(data, dict) or not isinstance(data.get("model"), dict):
        raise CheckpointError(f"{path}: expected an object with a \"model\" section")
    try:
        return ModelConfig.from_dict(data["model"], where=f"{path}: model"), data
    except ConfigError as e:
        raise CheckpointError(str(e)) from None


def load_weights(model: torch.nn.Module, path: str | os.PathLike) -> None:
    """Load safetensors weights into `model`, naming the file and the first mismatch on any problem."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: file not found")
    try:
        state = load_file(path)
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{path}: not a valid safetensors file ({e})") from None
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        what = f"missing tensor {missing[0]!r}" if missing else f"unexpected tensor {unexpected[0]!r}"
        raise CheckpointError(f"{path}: weights do not match config.json: {what} "
                              f"({len(missing)} missing, {len(unexpected)} unexpected)")
    for name, ref in expected.items():
        if state[name].shape != ref.shape:
            raise CheckpointError(f"{path}: weights do not match config.json: {name} has shape "
                                  f"{tuple(state[name].shape)}, the config implies {tuple(ref.shape)}")
        if not torch.isfinite(state[name]).all():
            raise CheckpointError(f"{path}: tensor {name} holds non-finite values")
    model.load_state_dict(state)


def load_model(run_dir: str | os.PathLike, device: str | torch.device = "cpu") -> RecursiveMoE:
    """The eval-mode model of a run directory. `model.config` is its ModelConfig."""
    cfg, _ = load_run_config(run_dir)
    model = RecursiveMoE(cfg)
    load_weights(model, Path(run_dir) / WEIGHTS_FILE)
    return model.to(device).eval()
