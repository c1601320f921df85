"""The run directory: atomic writes, and loading a model back from config.json + model.safetensors.

Compatibility: every file moe writes for another command to read (a run's config.json, the exported model's
metadata) carries `format_version`, an integer bumped on any change a reader of the previous format would
misread. A reader accepts exactly its own FORMAT_VERSION and refuses any other, naming both versions; files
written before the field existed are format 1. Within a format, config.json must hold every model key.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from . import __version__
from .config import ModelConfig
from .errors import CheckpointError, ConfigError, MoeError, is_io_error, os_reason
from .jsonl import json_type, parse_json, read_text_file
from .model import RecursiveMoE

FORMAT_VERSION = 1
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
TOKENIZER_FILE = "tokenizer.json"

_UMASK = os.umask(0)
os.umask(_UMASK)


def check_output(path: str | os.PathLike, overwrite: bool) -> Path:
    """Refuse an output file path before any work is done: an existing file (unless `overwrite`), a directory,
    a missing or unwritable (read-only) parent directory."""
    path = Path(path)
    if path.is_dir():
        raise MoeError(f"{path}: is a directory; expected the path of a file to write")
    if path.exists() and not path.is_file():  # a device or a pipe: a rename would replace it, not write to it
        raise MoeError(f"{path}: not a regular file (a device, pipe or socket); expected the path of a file to write")
    if (path.exists() or path.is_symlink()) and not overwrite:
        raise MoeError(f"{path}: already exists (pass --overwrite to replace it)")
    if not path.parent.is_dir():
        raise MoeError(f"{path.parent}: output directory does not exist")
    if not os.access(path.parent, os.W_OK):
        read_only = os.statvfs(path.parent).f_flag & os.ST_RDONLY
        raise MoeError(f"{path.parent}: output directory is not writable "
                       f"({os.strerror(errno.EROFS if read_only else errno.EACCES)})")
    return path


def atomic_write(path: str | os.PathLike, write: Callable[[str], None]) -> None:
    """Call write(tmp_path) on a temp file beside `path`, fsync it, then rename it over `path`.

    A reader sees the old file or the complete new one, never a torn one; on failure nothing is left. An I/O
    error (a full disk, a read-only directory) becomes a one-line MoeError naming `path` and the reason.
    """
    path = Path(path)
    if not path.parent.is_dir():
        raise MoeError(f"{path.parent}: output directory does not exist")
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.close(fd)
        write(tmp)
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600 (and some writers recreate the file)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        if tmp is not None:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
        if isinstance(e, Exception) and not isinstance(e, MoeError) and is_io_error(e):
            raise MoeError(f"{path}: cannot write ({os_reason(e)}); nothing was written") from None
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
    config = {"model": model.config.to_dict(), **(extra_config or {}), "moe_version": __version__,
              "format_version": FORMAT_VERSION}
    atomic_write_text(run_dir / CONFIG_FILE, json.dumps(config, indent=2) + "\n")
    atomic_write_text(run_dir / TOKENIZER_FILE, tokenizer_json)
    save_weights(model, run_dir / WEIGHTS_FILE)


def read_json(path: str | os.PathLike) -> Any:
    """A JSON file, parsed strictly (moe_core.jsonl.parse_json); CheckpointError naming the file otherwise."""
    path = Path(path)
    text = read_text_file(path, "file", error=CheckpointError)
    try:
        return parse_json(text)
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: invalid JSON at line {e.lineno} column {e.colno} ({e.msg})") from None
    except ValueError as e:
        raise CheckpointError(f"{path}: invalid JSON ({e})") from None


def check_format(version: Any, written_by: Any, where: str | os.PathLike) -> None:
    """Refuse a file of another format version than this moe's, naming both (see the module docstring)."""
    if isinstance(version, bool) or not isinstance(version, int):
        raise CheckpointError(f"{where}: format_version: expected an integer, got {str(version)[:40]!r}")
    if version != FORMAT_VERSION:
        advice = ("upgrade moe to read it" if version > FORMAT_VERSION
                  else "retrain or re-export it with this version")
        raise CheckpointError(f"{where}: written by moe {str(written_by)[:40]} in format {version}; this moe "
                              f"{__version__} reads format {FORMAT_VERSION} only ({advice})")


def load_run_config(run_dir: str | os.PathLike) -> tuple[ModelConfig, dict[str, Any]]:
    """The run's model config (validated, every key present) and the whole config.json as a dict."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise CheckpointError(f"{run_dir}: not a run directory (expected a folder with {CONFIG_FILE})")
    path = run_dir / CONFIG_FILE
    data = read_json(path)
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: got a JSON {json_type(data)}; expected an object with a \"model\" section")
    check_format(data.get("format_version", 1), data.get("moe_version", "(unknown version)"), path)
    if not isinstance(data.get("model"), dict):
        what = "missing" if "model" not in data else f"a JSON {json_type(data['model'])}"
        raise CheckpointError(f"{path}: \"model\" section is {what}; expected an object with the model config")
    try:
        return ModelConfig.from_dict(data["model"], where=f"{path}: model", complete=True), data
    except ConfigError as e:
        raise CheckpointError(str(e)) from None


def read_weights(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Every tensor of a safetensors file; CheckpointError naming the file if it is missing or malformed."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: file not found" if not path.exists() else f"{path}: not a file")
    try:
        return load_file(path)
    except Exception as e:  # SafetensorError for a bad header, OSError, and whatever a hostile header provokes
        reason = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"{path}: not a valid safetensors file ({reason})") from None


def check_weights(expected: dict[str, torch.Tensor], state: dict[str, torch.Tensor], path: str | os.PathLike) -> None:
    """`state` (read from `path`) has exactly the tensors of `expected` (a state_dict, possibly on the meta
    device), with their shapes and dtypes, all finite; else CheckpointError naming the first mismatch."""
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        what = f"missing tensor {missing[0]!r}" if missing else f"unexpected tensor {unexpected[0]!r}"
        raise CheckpointError(f"{path}: weights do not match config.json: {what} "
                              f"({len(missing)} missing, {len(unexpected)} unexpected)")
    for name, ref in expected.items():
        t = state[name]
        if t.shape != ref.shape:
            raise CheckpointError(f"{path}: weights do not match config.json: {name} has shape "
                                  f"{tuple(t.shape)}, the config implies {tuple(ref.shape)}")
        if t.dtype != ref.dtype:
            raise CheckpointError(f"{path}: tensor {name} has dtype {str(t.dtype).removeprefix('torch.')}, "
                                  f"expected {str(ref.dtype).removeprefix('torch.')}")
        if not torch.isfinite(t).all():
            raise CheckpointError(f"{path}: tensor {name} holds non-finite values (NaN or infinity)")


def load_weights(model: torch.nn.Module, path: str | os.PathLike) -> None:
    """Load safetensors weights into `model`, naming the file and the first mismatch on any problem."""
    state = read_weights(path)
    check_weights(model.state_dict(), state, path)
    model.load_state_dict(state)


def load_model(run_dir: str | os.PathLike, device: str | torch.device = "cpu") -> RecursiveMoE:
    """The eval-mode model of a run directory. `model.config` is its ModelConfig."""
    cfg, _ = load_run_config(run_dir)
    path = Path(run_dir) / WEIGHTS_FILE
    state = read_weights(path)
    try:
        with torch.device("meta"):  # the config's tensors, checked against the file before memory is spent on them
            expected = RecursiveMoE(cfg).state_dict()
    except RuntimeError as e:  # sizes whose byte count overflows
        raise CheckpointError(f"{path}: weights do not match config.json: its model sizes describe tensors too "
                              f"large to exist ({str(e).splitlines()[0][:120]})") from None
    check_weights(expected, state, path)
    model = RecursiveMoE(cfg)
    model.load_state_dict(state)
    return model.to(device).eval()
