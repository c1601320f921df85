"""The run directory: atomic writes, and loading a model back from config.json + model.safetensors.

Compatibility: every file moe writes for another command to read (a run's config.json, the exported model's
metadata) carries `format_version`, an integer bumped on any change a reader of the previous format would
misread. A reader accepts exactly its own FORMAT_VERSION and refuses any other, naming both versions; files
written before the field existed are format 1. Within a format, config.json must hold every model key.

Sharded weights. A run trained with FSDP (train.parallel = "fsdp" under torchrun) publishes its model as one
safetensors file per rank plus an index, `model.shards.json`, in place of model.safetensors:

    {"format_version": 1, "moe_version": "...", "world_size": 2, "step": 150,
     "files": ["model-00000150-rank00000-of-00002.safetensors", ...],            # one per rank, in rank order
     "tensors": {"embed.weight": {"shape": [512, 64], "dtype": "float32", "sharded": true,
                                  "local_shapes": [[256, 64], [256, 64]]},      # rank r's rows, in order
                 "z_H_init": {"shape": [64], "dtype": "float32", "sharded": false}, ...}}

A sharded tensor is the concatenation on dim 0 of its pieces in the rank files (FSDP2 splits dim 0 as
torch.chunk does: pieces may be uneven or empty); an unsharded one is stored whole in every rank file. The
same layout (with another file prefix) holds the optimizer state of train/checkpointing.py's sharded sets.
`read_weights`, `load_weights` and `load_model` merge shards transparently when given / finding the index.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import signal
import tempfile
from collections.abc import Callable, Iterable, Iterator
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
SHARD_INDEX = "model.shards.json"  # a sharded model (see above), read in place of WEIGHTS_FILE when present
SHARD_FILES = "model-*-rank*-of-*.safetensors"  # glob of the rank files an index names (shard_file_name)
TOKENIZER_FILE = "tokenizer.json"

_UMASK = os.umask(0)
os.umask(_UMASK)


def check_output(path: str | os.PathLike, overwrite: bool, option: str = "this output") -> Path:
    """Refuse an output file path before any work is done: an existing file (unless `overwrite`), a directory,
    a missing or unwritable (read-only) parent directory, or a file the running command reads (see
    check_not_inputs: an output never aliases an input, whatever `overwrite` says)."""
    path = Path(path)
    if path.is_dir():
        raise MoeError(f"{path}: is a directory; expected the path of a file to write")
    if path.exists() and not path.is_file():  # a device or a pipe: a rename would replace it, not write to it
        raise MoeError(f"{path}: not a regular file (a device, pipe or socket); expected the path of a file to write")
    check_not_inputs([path], option=option)
    if (path.exists() or path.is_symlink()) and not overwrite:
        raise MoeError(f"{path}: already exists (pass --overwrite to replace it)")
    if not path.parent.is_dir():
        raise MoeError(f"{path.parent}: output directory does not exist")
    if not os.access(path.parent, os.W_OK):
        read_only = os.statvfs(path.parent).f_flag & os.ST_RDONLY
        raise MoeError(f"{path.parent}: output directory is not writable "
                       f"({os.strerror(errno.EROFS if read_only else errno.EACCES)})")
    return path


# -----------------------------------------------------------------------------
# outputs never alias inputs
#
# A command must not write over a file it reads: `moe serve M.onnx --output M.onnx --overwrite` would replace the
# model with JSONL, `moe export RUN --out RUN/model.safetensors --overwrite` the run's weights. Two paths alias
# when they resolve to the same path (symlinks, `..`) or, when both exist, are the same file (st_dev, st_ino:
# a hard link, or a symlink to it). Commands name their inputs explicitly (check_not_inputs(outputs, inputs));
# within a command run by moe_core.cli.run, the files read through note_inputs (load_model, the served model
# and its input) are also refused by check_output and, at the last moment, by atomic_write, so a command that
# forgets the explicit check still cannot replace what it read.

_command_inputs: list[tuple[Path, str]] | None = None  # (path, what) read by the running command; None: no command


@contextlib.contextmanager
def command_inputs() -> Iterator[None]:
    """The scope of one command (moe_core.cli.run): note_inputs records into it; nested scopes share the outer."""
    global _command_inputs
    outer = _command_inputs
    if outer is None:
        _command_inputs = []
    try:
        yield
    finally:
        _command_inputs = outer


Inputs = Iterable[str | os.PathLike | tuple[str | os.PathLike, str]]  # paths, or (path, what it is) pairs


def _pairs(inputs: Inputs, what: str = "an input of this command") -> list[tuple[Path, str]]:
    return [(Path(i[0]), i[1]) if isinstance(i, tuple) else (Path(i), what) for i in inputs]


def note_inputs(inputs: Inputs, what: str = "an input of this command") -> None:
    """Record files the running command reads, so that no output of it may alias them (no-op outside a command)."""
    if _command_inputs is not None:
        _command_inputs.extend(_pairs(inputs, what))


def _identity(path: Path) -> tuple[Path, tuple[int, int] | None]:
    try:
        resolved = path.resolve()
    except (OSError, RuntimeError):  # a symlink loop: compared as written
        resolved = Path(os.path.abspath(path))
    try:
        st = os.stat(path)
        return resolved, (st.st_dev, st.st_ino)
    except OSError:
        return resolved, None


def check_not_inputs(outputs: Iterable[str | os.PathLike], inputs: Inputs = (), option: str = "this output") -> None:
    """MoeError naming the first output that is one of `inputs` or of the files the running command noted
    (note_inputs): the same resolved path, or the same existing file. `option` names the output in the message."""
    known = [(p, what, *_identity(p)) for p, what in _pairs(inputs) + (_command_inputs or [])]
    if not known:
        return
    for out in map(Path, outputs):
        resolved, ident = _identity(out)
        for p, what, r, i in known:
            if resolved == r or (ident is not None and ident == i):
                same = "" if out == p else f" {p}"
                raise MoeError(f"{out}: {option} is {what}{same}; expected a file that is not an input of this "
                               "command (--overwrite does not change this)")


def run_files(run_dir: str | os.PathLike) -> list[Path]:
    """The files of a run directory its readers depend on: config, weights (whole or sharded), tokenizer and
    every file under trainer_state/ (the checkpoints)."""
    run_dir = Path(run_dir)
    files = [run_dir / CONFIG_FILE, run_dir / WEIGHTS_FILE, run_dir / TOKENIZER_FILE, run_dir / SHARD_INDEX,
             *run_dir.glob(SHARD_FILES)]
    state = run_dir / "trainer_state"
    if state.is_dir():
        files += [p for p in state.rglob("*") if not p.is_dir()]
    return files


# -----------------------------------------------------------------------------
# atomic, exclusive writes


def _commit(tmp: str, path: Path, overwrite: bool) -> None:
    """Move the finished temp file to `path`. overwrite: os.replace. Otherwise exclusively: os.link fails when
    `path` exists, so a file another process created after check_output is never replaced (and the temp file is
    then removed by the caller). A filesystem without hard links falls back to check-then-replace."""
    if overwrite:
        os.replace(tmp, path)
        return
    try:
        os.link(tmp, path)
    except FileExistsError:
        raise MoeError(f"{path}: already exists (another process created it while this one ran; pass --overwrite "
                       "to replace it); nothing was written") from None
    except OSError as e:
        if e.errno not in (errno.EPERM, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EMLINK, errno.EXDEV):
            raise
        if path.exists() or path.is_symlink():
            raise MoeError(f"{path}: already exists (another process created it while this one ran; pass "
                           "--overwrite to replace it); nothing was written") from None
        os.replace(tmp, path)
        return
    os.unlink(tmp)


def atomic_write(path: str | os.PathLike, write: Callable[[str], None], overwrite: bool = True) -> None:
    """Call write(tmp_path) on a temp file beside `path`, fsync it, then move it to `path`: over an existing file
    with `overwrite`, else only if `path` still does not exist (see _commit).

    A reader sees the old file or the complete new one, never a torn one; on failure (an interrupting signal
    included) nothing is left. An I/O error (a full disk, a read-only directory) becomes a one-line MoeError
    naming `path` and the reason. Within a command, a `path` that aliases a file the command read is refused.
    """
    path = Path(path)
    if not path.parent.is_dir():
        raise MoeError(f"{path.parent}: output directory does not exist")
    check_not_inputs([path])
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.close(fd)
        write(tmp)
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600 (and some writers recreate the file)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        check_not_inputs([path])
        # The move is not interrupted half-way by SIGINT / SIGTERM: their handlers run after it.
        with _signals_deferred():
            _commit(tmp, path, overwrite)
            tmp = None
    except BaseException as e:
        if tmp is not None:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
        if isinstance(e, Exception) and not isinstance(e, MoeError) and is_io_error(e):
            raise MoeError(f"{path}: cannot write ({os_reason(e)}); nothing was written") from None
        raise


@contextlib.contextmanager
def _signals_deferred() -> Iterator[None]:
    blocked = {signal.SIGINT, signal.SIGTERM}
    old = signal.pthread_sigmask(signal.SIG_BLOCK, blocked) if hasattr(signal, "pthread_sigmask") else None
    try:
        yield
    finally:
        if old is not None:
            signal.pthread_sigmask(signal.SIG_SETMASK, old)


def atomic_write_text(path: str | os.PathLike, text: str, overwrite: bool = True) -> None:
    atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"), overwrite)


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
    drop_sharded_weights(run_dir)


def shard_file_name(prefix: str, step: int, rank: int, world: int) -> str:
    """The file of rank `rank`'s shards at `step`: the step in the name keeps the files of two checkpoints apart,
    so a reader never pairs one rank's new file with another rank's old one."""
    return f"{prefix}-{step:08d}-rank{rank:05d}-of-{world:05d}.safetensors"


def weights_path(run_dir: str | os.PathLike) -> Path:
    """The weights load_model reads: the shard index an FSDP run published, else model.safetensors."""
    index = Path(run_dir) / SHARD_INDEX
    return index if index.is_file() else Path(run_dir) / WEIGHTS_FILE


def drop_sharded_weights(run_dir: str | os.PathLike) -> None:
    """Remove a published sharded model (index first, so no reader finds an index without its files): called
    once model.safetensors holds the run's weights."""
    run_dir = Path(run_dir)
    (run_dir / SHARD_INDEX).unlink(missing_ok=True)
    for f in run_dir.glob(SHARD_FILES):
        f.unlink(missing_ok=True)


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
    """Every tensor of a safetensors file, or of a sharded checkpoint (`path` its JSON index) merged into whole
    tensors; CheckpointError naming the file if it is missing or malformed."""
    path = Path(path)
    if path.suffix == ".json":
        return read_shards(read_json(path), path)
    if not path.is_file():
        raise CheckpointError(f"{path}: file not found" if not path.exists() else f"{path}: not a file")
    try:
        return load_file(path)
    except Exception as e:  # SafetensorError for a bad header, OSError, and whatever a hostile header provokes
        reason = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"{path}: not a valid safetensors file ({reason})") from None


def read_shards(index: Any, where: str | os.PathLike, rank: int | None = None) -> dict[str, torch.Tensor]:
    """The tensors of a sharded checkpoint (layout in the module docstring) whose index `index` was read from
    `where` (the rank files sit beside it). rank=None: merged — every sharded tensor concatenated on dim 0 in
    rank order, every unsharded one from rank 0's file. rank=r: rank r's own file as written (its pieces, the
    unsharded tensors and anything else it holds), checked against the index. Errors name the file at fault."""
    where = Path(where)
    tensors, files = _check_index(index, where)
    ranks = range(len(files)) if rank is None else [rank]
    if rank is not None and not 0 <= rank < len(files):
        raise CheckpointError(f"{where}: written by {len(files)} rank(s), has no shard for rank {rank}")
    parts = {r: read_weights(where.parent / files[r]) for r in ranks}
    out: dict[str, torch.Tensor] = dict(parts[rank]) if rank is not None else {}
    for name, info in tensors.items():
        for r in ranks if info["sharded"] else ranks[:1]:
            piece = parts[r].get(name)
            shape = info["local_shapes"][r] if info["sharded"] else info["shape"]
            if piece is None or list(piece.shape) != shape:
                got = "is missing" if piece is None else f"has shape {tuple(piece.shape)}"
                raise CheckpointError(f"{where.parent / files[r]}: tensor {name} {got}, {where.name} says "
                                      f"{tuple(shape)} (a shard of another checkpoint, or a corrupt one)")
        if rank is None:
            out[name] = torch.cat([parts[r][name] for r in ranks]) if info["sharded"] else parts[0][name]
    return out


def _check_index(index: Any, where: Path) -> tuple[dict[str, dict[str, Any]], list[str]]:
    """The tensors and files of a shard index, each field checked; CheckpointError naming `where` otherwise."""
    def fail(msg: str) -> CheckpointError:
        return CheckpointError(f"{where}: {msg} (not a shard index written by moe train)")

    def is_shape(v: Any) -> bool:
        return isinstance(v, list) and all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in v)

    if not isinstance(index, dict):
        raise fail(f"got a JSON {json_type(index)}, expected an object")
    if "format_version" in index:
        check_format(index["format_version"], index.get("moe_version", "(unknown version)"), where)
    files, tensors = index.get("files"), index.get("tensors")
    plain_names = isinstance(files, list) and all(isinstance(f, str) and f == Path(f).name and f not in ("", ".", "..")
                                                  for f in files)
    if not (plain_names and files):
        raise fail('"files": expected a list of file names, one per rank')
    if index.get("world_size", len(files)) != len(files):
        raise fail(f'"world_size" is {str(index.get("world_size"))[:20]} but {len(files)} file(s) are listed')
    if not isinstance(tensors, dict):
        raise fail('"tensors": expected an object')
    for name, info in tensors.items():
        ok = isinstance(info, dict) and is_shape(info.get("shape")) and isinstance(info.get("sharded"), bool)
        if ok and info["sharded"]:
            local = info.get("local_shapes")
            ok = (isinstance(local, list) and len(local) == len(files) and all(is_shape(s) for s in local)
                  and sum(s[0] if s else -1 for s in local) == (info["shape"] or [0])[0]
                  and all(s[1:] == info["shape"][1:] for s in local))
        if not ok:
            raise fail(f"tensor {name}: expected shape, sharded and (when sharded) one local shape per rank whose "
                       f"rows add up to the shape")
    return tensors, files


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
    """The eval-mode model of a run directory. `model.config` is its ModelConfig. Within a command, the run's
    files become its inputs (note_inputs): no output of the command may replace them."""
    note_inputs(run_files(run_dir), f"a file of the run {run_dir}")
    cfg, _ = load_run_config(run_dir)
    path = weights_path(run_dir)
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
