"""The run directory: writing it, and loading a model back from config.json + model.safetensors.

Every file here carries `format_version` (moe_core.common.formats); outputs are checked and written through
moe_core.common.files, the torch-free half that serve shares.

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

import json
import os
from pathlib import Path
from typing import Any, Literal, overload

import torch
from safetensors.torch import load_file, save_file

from . import __version__
from .common.errors import CheckpointError, ConfigError
from .common.files import atomic_write, atomic_write_text, note_inputs
from .common.formats import FORMAT_VERSION, check_format
from .common.jsonl import json_type, parse_json, read_text_file
from .config import ModelConfig
from .model import RecursiveMoE
from .run_layout import CONFIG_FILE, SHARD_FILES, SHARD_INDEX, TOKENIZER_FILE, WEIGHTS_FILE


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



def save_weights(model: torch.nn.Module, path: str | os.PathLike) -> None:
    atomic_write(path, lambda tmp: write_weights(model, tmp))


def write_weights(model: torch.nn.Module, path: str | os.PathLike) -> None:
    """The model's weights as safetensors at `path`, written in place (save_weights moves them into place)."""
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(path), metadata={"format": "pt", "moe_version": __version__})


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
    """A JSON file, parsed strictly (moe_core.common.jsonl.parse_json); CheckpointError naming the file otherwise."""
    path = Path(path)
    text = read_text_file(path, "file", error=CheckpointError)
    try:
        return parse_json(text)
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: invalid JSON at line {e.lineno} column {e.colno} ({e.msg})") from None
    except ValueError as e:
        raise CheckpointError(f"{path}: invalid JSON ({e})") from None


@overload
def read_run_config(run_dir: str | os.PathLike, missing_ok: Literal[False] = False) -> dict[str, Any]: ...


@overload
def read_run_config(run_dir: str | os.PathLike, missing_ok: bool) -> dict[str, Any] | None: ...


def read_run_config(run_dir: str | os.PathLike, missing_ok: bool = False) -> dict[str, Any] | None:
    """A run directory's config.json as a dict: a JSON object of a format this version reads (its sections are
    the caller's to check: load_run_config). The one reader of that file. missing_ok: None when the directory
    has no config.json (a reader that can do without it, such as the plots); CheckpointError for any other
    problem, naming the file."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise CheckpointError(f"{run_dir}: not a run directory (expected a folder with {CONFIG_FILE})")
    path = run_dir / CONFIG_FILE
    if missing_ok and not path.exists():
        return None
    data = read_json(path)
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: got a JSON {json_type(data)}; expected an object with a \"model\" section")
    check_format(data.get("format_version", 1), data.get("moe_version", "(unknown version)"), path)
    return data


def load_run_config(run_dir: str | os.PathLike) -> tuple[ModelConfig, dict[str, Any]]:
    """The run's model config (validated, every key present) and the whole config.json as a dict."""
    data = read_run_config(run_dir)
    path = Path(run_dir) / CONFIG_FILE
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
