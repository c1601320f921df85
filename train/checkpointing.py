"""Checkpoint sets for exact resume, in RUN_DIR/trainer_state/:

    trainer_state/step-00000150/
      model.safetensors       # the weights at that step (the raw ones: what training continues from)
      ema.safetensors         # with train.ema_decay: the moving average of the weights at that step
      optimizer.safetensors   # AdamW moments, the RNG states, the grad-norm history and (supervision =
                              # "carry") the carried rows, as tensors
      state.json              # step, optimizer param groups, counters, the best evaluation so far, data
                              # fingerprint, format version
    trainer_state/best/       # with train.keep_best: the weights of the best evaluation so far
      model.safetensors       # (the EMA weights with train.ema_decay)
      best.json               # its step, the figures it was chosen by and every figure of that evaluation

RUN_DIR/model.safetensors, what load_model and `moe export` read, is published from these: the best weights
with keep_best, else the newest set's EMA weights with ema_decay, else its raw weights. The raw weights of
a run with EMA or keep_best are only in the sets.

A model sharded with FSDP is saved sharded (format 2): no rank ever holds the whole model or optimizer.

    trainer_state/step-00000150/
      model-00000150-rank00000-of-00002.safetensors      # rank 0's pieces of the weights (one file per rank)
      optimizer-00000150-rank00000-of-00002.safetensors  # its pieces of the AdamW moments, the step counts, the
                                                         # grad-norm history and its own RNG states
      model.shards.json       # the model's shard index (moe_core.checkpoint: global shapes, which tensors
                              # are sharded, each rank's local shapes, files, world size, step)
      state.json              # as above, plus "optimizer": the optimizer files' index in the same layout

and the model's rank files and index are published at the run directory's top level in place of
model.safetensors, which load_model and `moe export` read, merging the shards.

A set is built in a hidden temp directory and renamed into place in one step, so `step-*` directories are
always complete: a run killed at any instant leaves the previous sets intact and at most a temp directory,
which the next resume deletes. The newest K sets are kept. Nothing is pickled: tensors go to safetensors,
everything else to JSON (torch.distributed.checkpoint is not used: its writer pickles its metadata).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import save_file

from moe_core import __version__
from moe_core.checkpoint import (
    check_weights,
    drop_sharded_weights,
    load_run_config,
    load_weights,
    read_json,
    read_shards,
    read_weights,
    save_weights,
    shard_file_name,
)
from moe_core.common.errors import CheckpointError
from moe_core.common.files import atomic_write, fsync_dir
from moe_core.common.formats import FORMAT_VERSION
from moe_core.run_layout import (
    BEST_DIR,
    BEST_FILE,
    CONFIG_FILE,
    EMA_FILE,
    OPTIMIZER_FILE,
    SHARD_FILES,
    SHARD_INDEX,
    STATE_DIR,
    STATE_FILE,
    WEIGHTS_FILE,
)

from .config import SECTIONS, RunConfig
from .distributed import SINGLE, Dist, is_dtensor, is_sharded

FORMAT = 1  # bump when the layout below changes; resume refuses other formats by name
SHARDED_FORMAT = 2  # the sharded layout below (FSDP); format 1 readers refuse it by name
_CPU = torch.device("cpu")
_SET = re.compile(r"^step-(\d{8})$")


@dataclass
class LoopState:
    """What the training loop carries from step to step besides the model and optimizer."""

    step: int = 0  # optimizer steps taken (the next step to run)
    skipped_steps: int = 0  # steps skipped for a non-finite loss or gradient, in total
    bad_in_a_row: int = 0
    grad_norms: list[float] = field(default_factory=list)  # pre-clip global norm of every step after warmup
    data_fingerprint: str = ""  # of the tokenized training split: resume refuses different data
    best_step: int = -1  # train.keep_best: the step of the best evaluation so far (-1: none yet)
    best_key: list[float] = field(default_factory=list)  # its Task.best_by figures, signed so that higher is better
    # train.supervision = "carry": every rank's carried rows (train/carry.py), "rows.{rank}.{name}" -> tensor
    rows: dict[str, torch.Tensor] = field(default_factory=dict)


def checkpoint_sets(run_dir: Path) -> list[tuple[int, Path]]:
    """(step, path) of every complete set, oldest first."""
    state_dir = Path(run_dir) / STATE_DIR
    if not state_dir.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in state_dir.iterdir() if (m := _SET.match(p.name)) and p.is_dir()]
    return sorted(found)


def save_checkpoint(run_dir: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer, state: LoopState,
                    keep: int, rng: dict[str, torch.Tensor], dist: Dist = SINGLE,
                    device: torch.device = _CPU, ema: torch.nn.Module | None = None, publish: bool = True) -> Path:
    """Write the set for `state.step`, keep the newest `keep`, and (`publish`) make its weights — `ema`'s when
    given — what load_model reads.

    Called on every rank. `rng` holds every rank's generator states by name (`rng.cpu.{rank}`,
    `rng.cuda.{rank}`). A model sharded with FSDP is saved sharded (every rank writes its pieces, rank 0 the
    indexes; train.config refuses ema and keep_best with FSDP); otherwise rank 0 writes the whole set and the
    other ranks return at once."""
    sd = optimizer.state_dict()
    opt = {f"opt.{i}.{k}": v for i, s in sd["state"].items() for k, v in s.items() if isinstance(v, torch.Tensor)}
    norms = {"grad_norms": torch.tensor(state.grad_norms, dtype=torch.float64)}
    meta = {"format": FORMAT, **{k: v for k, v in asdict(state).items() if k not in ("grad_norms", "rows")},
            "world_size": dist.world, "param_groups": sd["param_groups"]}
    final = Path(run_dir) / STATE_DIR / f"step-{state.step:08d}"
    tmp = final.parent / f".{final.name}.tmp"
    if is_sharded(model):
        if ema is not None or not publish:
            raise CheckpointError("a sharded model is saved without ema or keep_best (train.parallel = 'fsdp')")
        mine = {k: v for k, v in rng.items() if k.rsplit(".", 1)[1] == str(dist.rank)}
        mine.update({k: v for k, v in state.rows.items() if k.split(".")[1] == str(dist.rank)})
        _save_sharded(Path(run_dir), final, tmp, model.state_dict(), {**opt, **norms}, mine, meta, keep, dist,
                      device)
    elif dist.is_main:
        _start_set(tmp)
        try:
            save_weights(model, tmp / WEIGHTS_FILE)
            if ema is not None:
                save_weights(ema, tmp / EMA_FILE)
            tensors = {**{k: v.detach().cpu().contiguous() for k, v in opt.items()}, **rng, **norms, **state.rows}
            atomic_write(tmp / OPTIMIZER_FILE, lambda p: save_file(tensors, p))
            _write_json(tmp / STATE_FILE, meta)
            _finish_set(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        if publish:
            _publish(final / (WEIGHTS_FILE if ema is None else EMA_FILE), Path(run_dir) / WEIGHTS_FILE)
            drop_sharded_weights(run_dir)
        _prune(Path(run_dir), keep)
    return final


def _save_sharded(run_dir: Path, final: Path, tmp: Path, model_state: dict[str, torch.Tensor],
                  opt_state: dict[str, torch.Tensor], rng: dict[str, torch.Tensor], meta: dict[str, Any], keep: int,
                  dist: Dist, device: torch.device) -> None:
    """The sharded set: each rank writes its model and optimizer pieces (with its own RNG states), rank 0 the
    model's shard index, state.json (with the optimizer's index), and publishes the model shards. A failure on
    any rank fails every rank, and no set appears."""
    step, rank = meta["step"], dist.rank
    with _all_or_none(dist, device, final, tmp):
        if dist.is_main:
            _start_set(tmp)
    model_local, model_index = _shard(model_state, "model", step, dist, device)
    opt_local, opt_index = _shard(opt_state, "optimizer", step, dist, device)
    with _all_or_none(dist, device, final, tmp):
        atomic_write(tmp / model_index["files"][rank], lambda p: save_file(model_local, p))
        atomic_write(tmp / opt_index["files"][rank], lambda p: save_file({**opt_local, **rng}, p))
    with _all_or_none(dist, device, final, tmp):
        if dist.is_main:
            _write_json(tmp / SHARD_INDEX, {"format_version": FORMAT_VERSION, "moe_version": __version__,
                                            **model_index})
            _write_json(tmp / STATE_FILE, {**meta, "format": SHARDED_FORMAT, "optimizer": opt_index})
            _finish_set(tmp, final)
            for name in (*model_index["files"], SHARD_INDEX):  # the index last: it switches readers over
                _publish(final / name, run_dir / name)
            (run_dir / WEIGHTS_FILE).unlink(missing_ok=True)
            for f in run_dir.glob(SHARD_FILES):
                if f.name not in model_index["files"]:
                    f.unlink(missing_ok=True)
            _prune(run_dir, keep)


def _shard(tensors: dict[str, torch.Tensor], prefix: str, step: int, dist: Dist,
           device: torch.device) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """This rank's part of `tensors` (a DTensor's local piece, any other tensor whole) and the index of every
    rank's parts (moe_core.checkpoint's shard layout). Gathers the ranks' row counts: call it on every rank."""
    local: dict[str, torch.Tensor] = {}
    info: dict[str, dict[str, Any]] = {}
    for name, t in tensors.items():
        local[name] = (t.to_local() if is_dtensor(t) else t).detach().cpu().contiguous()
        info[name] = {"shape": list(t.shape), "dtype": str(t.dtype).removeprefix("torch."), "sharded": is_dtensor(t)}
    sharded = [name for name, i in info.items() if i["sharded"]]
    rows = dist.gather(torch.tensor([local[name].shape[0] for name in sharded], dtype=torch.int64), device)
    for j, name in enumerate(sharded):
        info[name]["local_shapes"] = [[int(r[j]), *info[name]["shape"][1:]] for r in rows]
    files = [shard_file_name(prefix, step, r, dist.world) for r in range(dist.world)]
    return local, {"world_size": dist.world, "step": step, "files": files, "tensors": info}


@contextlib.contextmanager
def _all_or_none(dist: Dist, device: torch.device, final: Path, tmp: Path) -> Iterator[None]:
    """Run the body on every rank and agree on the outcome: if it failed on any rank, every rank fails (the
    failing one with its own error) and rank 0 removes the partial set, rather than leaving the others to wait
    for it in the next collective."""
    error: Exception | None = None
    try:
        yield
    except Exception as e:  # noqa: BLE001 - re-raised below, after the ranks agree
        error = e
    if dist.any(error is not None, device):
        if dist.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
        if error is not None:
            raise error
        raise CheckpointError(f"{final}: not written: another rank failed to write its part (its error is above)")


def _start_set(tmp: Path) -> None:
    tmp.parent.mkdir(exist_ok=True)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()


def _write_json(path: Path, data: dict[str, Any]) -> None:
    atomic_write(path, lambda p: Path(p).write_text(json.dumps(data, indent=1), encoding="utf-8"))


def _finish_set(tmp: Path, final: Path) -> None:
    """Rename the complete temp set into place in one step."""
    if final.exists():  # the same step saved again (a resumed run that was interrupted at once): replace it
        old = final.parent / f".{final.name}.{os.getpid()}.old"
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)
    fsync_dir(final.parent)


def save_best(run_dir: Path, model: torch.nn.Module, step: int, by: tuple[str, ...], figures: dict[str, float],
              ema: bool) -> None:
    """trainer_state/best/ for the evaluation at `step` (weights, then best.json: built in a temp directory and
    renamed into place, as a set is), then published as RUN_DIR/model.safetensors. Rank 0 only."""
    final = Path(run_dir) / STATE_DIR / BEST_DIR
    tmp = final.parent / f".{BEST_DIR}.tmp"
    _start_set(tmp)
    try:
        save_weights(model, tmp / WEIGHTS_FILE)
        _write_json(tmp / BEST_FILE, {"format": FORMAT, "step": step, "by": list(by),
                                      "weights": "ema" if ema else "raw", "figures": figures})
        _finish_set(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _publish(final / WEIGHTS_FILE, Path(run_dir) / WEIGHTS_FILE)
    drop_sharded_weights(run_dir)


def read_best(run_dir: Path) -> dict[str, Any] | None:
    """trainer_state/best/best.json of a run trained with keep_best (step, by, weights, figures), else None."""
    path = Path(run_dir) / STATE_DIR / BEST_DIR / BEST_FILE
    if not path.exists():
        return None
    best = read_json(path)
    ok = (isinstance(best, dict) and isinstance(best.get("step"), int) and isinstance(best.get("figures"), dict)
          and isinstance(best.get("by"), list) and best.get("weights") in ("ema", "raw"))
    if not ok:
        raise CheckpointError(f"{path}: expected step, by, weights and figures (a file written by moe train)")
    return best


def _prune(run_dir: Path, keep: int) -> None:
    for _, old_set in checkpoint_sets(run_dir)[:-keep]:
        shutil.rmtree(old_set, ignore_errors=True)


def _publish(src: Path, dst: Path) -> None:
    """Make `dst` (what load_model and export read) the set's file `src`: a hard link where possible, else a copy."""
    def link_or_copy(tmp: str) -> None:
        os.unlink(tmp)
        try:
            os.link(src, tmp)
        except OSError:
            shutil.copyfile(src, tmp)

    atomic_write(dst, link_or_copy)


def clean_partial_sets(run_dir: Path) -> None:
    """Delete the temp directories a killed save leaves behind."""
    state_dir = Path(run_dir) / STATE_DIR
    if state_dir.is_dir():
        for p in state_dir.iterdir():
            if p.name.startswith((".step-", f".{BEST_DIR}.")) and p.is_dir():
                shutil.rmtree(p, ignore_errors=True)


def load_checkpoint(path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer, rank: int = 0,
                    world: int = 1, ema: torch.nn.Module | None = None) -> LoopState:
    """Restore model, optimizer, this rank's RNG and (given `ema`) the weights' moving average from the set at
    `path`; return the loop state.

    Errors name the file. A sharded set resumed on as many ranks reads only this rank's files; any other
    combination (another number of ranks, a sharded set into a whole model or the reverse) reads whole tensors
    and takes this rank's piece. A set saved with another number of ranks resumes, but the ranks' dropout
    streams cannot continue where they were, so such a run is no longer bit-identical to an uninterrupted one.
    """
    meta = read_json(path / STATE_FILE)
    fmt = meta.get("format") if isinstance(meta, dict) else None
    if fmt not in (FORMAT, SHARDED_FORMAT):
        raise CheckpointError(f"{path / STATE_FILE}: checkpoint format {fmt!r}, this version of moe reads "
                              f"format {FORMAT} and {SHARDED_FORMAT} (resume it with the moe version that wrote it)")
    try:
        state = LoopState(step=int(meta["step"]), skipped_steps=int(meta["skipped_steps"]),
                          bad_in_a_row=int(meta["bad_in_a_row"]), data_fingerprint=str(meta["data_fingerprint"]),
                          best_step=int(meta.get("best_step", -1)),
                          best_key=[float(v) for v in meta.get("best_key", [])])
        groups = meta["param_groups"]
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{path / STATE_FILE}: missing or invalid field {e}") from None
    if ema is not None:
        load_weights(ema, path / EMA_FILE)
    own = fmt == SHARDED_FORMAT and meta.get("world_size") == world and is_sharded(model)
    if fmt == SHARDED_FORMAT:
        index = read_json(path / SHARD_INDEX)
        weights = read_shards(index, path / SHARD_INDEX, rank if own else None)
        tensors = read_shards(meta.get("optimizer"), path / STATE_FILE, rank if own else None)
        model_path, opt_path = (path / index["files"][rank], path / meta["optimizer"]["files"][rank]) if own else \
            (path / SHARD_INDEX, path / STATE_FILE)
    else:
        model_path, opt_path = path / WEIGHTS_FILE, path / OPTIMIZER_FILE
        weights, tensors = read_weights(model_path), read_weights(opt_path)
    ours = model.state_dict()
    check_weights({k: v.to_local() if own and is_dtensor(v) else v for k, v in ours.items()}, weights, model_path)
    model.load_state_dict({k: _like(weights[k], v, own, model_path, k) for k, v in ours.items()})
    params = [p for g in optimizer.param_groups for p in g["params"]]
    opt_state: dict[int, dict[str, torch.Tensor]] = {}
    try:
        for name, t in tensors.items():
            if name.startswith("opt."):
                _, i, k = name.split(".", 2)
                like = params[int(i)] if int(i) < len(params) else t
                opt_state.setdefault(int(i), {})[k] = _like(t, like, own, opt_path, name)
        optimizer.load_state_dict({"state": opt_state, "param_groups": groups})
        if meta.get("world_size", 1) == world:
            state.rows = {k: v for k, v in tensors.items() if k.startswith(f"rows.{rank}.")}
            torch.set_rng_state(tensors[f"rng.cpu.{rank}"])
            if f"rng.cuda.{rank}" in tensors and torch.cuda.is_available():
                torch.cuda.set_rng_state(tensors[f"rng.cuda.{rank}"])
        elif rank == 0:
            print(f"note: {path} was saved by {meta.get('world_size')} rank(s), resuming on {world}: the random "
                  f"streams (dropout) restart from the seed and carried rows (train.supervision = 'carry') start "
                  f"afresh, so this run will not be bit-identical to an uninterrupted one")
        state.grad_norms = tensors["grad_norms"].tolist()
    except (KeyError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"{opt_path}: does not match this model's optimizer ({str(e).splitlines()[0]})") from None
    return state


def _like(value: torch.Tensor, like: torch.Tensor, own: bool, where: Path, name: str) -> torch.Tensor:
    """`value` in the form the model's / optimizer's tensor `like` takes. `like` a DTensor (FSDP): `value` is
    this rank's piece (own) or the whole tensor, of which this rank takes its rows as FSDP splits dim 0
    (torch.chunk: ceil(n / world) rows per rank, the last ones shorter or empty). Otherwise `value` itself."""
    if not is_dtensor(like) or value.dim() == 0:  # AdamW's step count is a plain scalar in every mode
        return value
    from torch.distributed.tensor import DTensor  # noqa: PLC0415 - a DTensor exists, so this is loaded

    if not own:
        n, parts = value.shape[0], like.device_mesh.size()
        rows = -(-n // parts)
        start = min(like.device_mesh.get_local_rank() * rows, n)
        value = value[start:min(start + rows, n)]
    if value.shape != like.to_local().shape:
        raise CheckpointError(f"{where}: tensor {name}: this rank's piece has shape {tuple(value.shape)}, the "
                              f"sharded model holds {tuple(like.to_local().shape)}")
    return DTensor.from_local(value.to(like.device), like.device_mesh, like.placements, run_check=False,
                              shape=like.shape, stride=like.stride())


def saved_config(run_dir: Path) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
    """A run's config.json (checked: a run that `moe train` wrote) and its config sections (train.config.SECTIONS:
    [model], [train] and the task's own)."""
    _, saved = load_run_config(run_dir)
    if not isinstance(saved.get("train"), dict):
        raise CheckpointError(f"{run_dir / CONFIG_FILE}: no \"train\" section: not a run written by moe train")
    return saved, {k: dict(v) if isinstance(v, dict) else v for k, v in saved.items() if k in SECTIONS}


def saved_run_config(run_dir: Path) -> RunConfig:
    """The RunConfig a run was trained with (saved_config, validated; keys it lacks take today's defaults)."""
    return RunConfig.from_dict(saved_config(run_dir)[1], str(run_dir / CONFIG_FILE))


def data_fingerprint(tokens: np.ndarray) -> str:
    """The identity of the training tokens (sha256 of the ids): resuming on other data would not be a resume."""
    return hashlib.sha256(np.ascontiguousarray(tokens, dtype=np.int64).tobytes()).hexdigest()


def read_metrics_until(path: Path, step: int) -> tuple[list[str], int]:
    """The lines of metrics.jsonl to keep when resuming from `step`: records up to that step, no summary.

    A torn last line (the run was killed mid-write) is dropped. Returns (lines, number of records dropped).
    """
    if not path.is_file():
        return [], 0
    raw = path.read_bytes().decode("utf-8", errors="replace").split("\n")
    keep, dropped = [], 0
    for n, line in enumerate(raw, 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            if n == len(raw):  # the last line had no newline: torn by a kill
                dropped += 1
                continue
            raise CheckpointError(f"{path}: line {n} is not valid JSON (the metrics log is corrupt)") from None
        if isinstance(rec, dict) and rec.get("kind") != "summary" and isinstance(rec.get("step"), int) \
                and rec["step"] <= step:
            keep.append(line)
        else:
            dropped += 1
    return keep, dropped
