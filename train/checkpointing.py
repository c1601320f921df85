"""Checkpoint sets for exact resume, in RUN_DIR/trainer_state/:

    trainer_state/step-00000150/
      model.safetensors       # the weights at that step
      optimizer.safetensors   # AdamW moments, the RNG states and the grad-norm history, as tensors
      state.json              # step, optimizer param groups, counters, data fingerprint, format version

A set is built in a hidden temp directory and renamed into place in one step, so `step-*` directories are
always complete: a run killed at any instant leaves the previous sets intact and at most a temp directory,
which the next resume deletes. The newest K sets are kept. Nothing is pickled: tensors go to safetensors,
everything else to JSON.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from moe_core.checkpoint import WEIGHTS_FILE, atomic_write, load_weights, read_json, save_weights
from moe_core.errors import CheckpointError

STATE_DIR = "trainer_state"
FORMAT = 1  # bump when the layout below changes; resume refuses other formats by name
_SET = re.compile(r"^step-(\d{8})$")
_OPTIMIZER_FILE = "optimizer.safetensors"
_STATE_FILE = "state.json"


@dataclass
class LoopState:
    """What the training loop carries from step to step besides the model and optimizer."""

    step: int = 0  # optimizer steps taken (the next step to run)
    skipped_steps: int = 0  # steps skipped for a non-finite loss or gradient, in total
    bad_in_a_row: int = 0
    grad_norms: list[float] = field(default_factory=list)  # pre-clip global norm of every step after warmup
    data_fingerprint: str = ""  # of the tokenized training split: resume refuses different data


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some filesystems refuse fsync on directories; the rename is still atomic
    finally:
        os.close(fd)


def checkpoint_sets(run_dir: Path) -> list[tuple[int, Path]]:
    """(step, path) of every complete set, oldest first."""
    state_dir = Path(run_dir) / STATE_DIR
    if not state_dir.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in state_dir.iterdir() if (m := _SET.match(p.name)) and p.is_dir()]
    return sorted(found)


def save_checkpoint(run_dir: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer, state: LoopState,
                    keep: int, rng: dict[str, torch.Tensor], world: int = 1) -> Path:
    """Write the set for `state.step`, point RUN_DIR/model.safetensors at its weights, keep the newest `keep`.

    `rng` holds every rank's generator states by name (`rng.cpu.{rank}`, `rng.cuda.{rank}`)."""
    state_dir = Path(run_dir) / STATE_DIR
    state_dir.mkdir(exist_ok=True)
    final = state_dir / f"step-{state.step:08d}"
    tmp = state_dir / f".{final.name}.{os.getpid()}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        save_weights(model, tmp / WEIGHTS_FILE)
        sd = optimizer.state_dict()
        tensors = {f"opt.{i}.{k}": v.detach().cpu().contiguous() for i, s in sd["state"].items() for k, v in s.items()
                   if isinstance(v, torch.Tensor)}
        tensors.update(rng)
        tensors["grad_norms"] = torch.tensor(state.grad_norms, dtype=torch.float64)
        atomic_write(tmp / _OPTIMIZER_FILE, lambda p: save_file(tensors, p))
        meta = {"format": FORMAT, **{k: v for k, v in asdict(state).items() if k != "grad_norms"}, "world_size": world,
                "param_groups": sd["param_groups"]}
        atomic_write(tmp / _STATE_FILE, lambda p: Path(p).write_text(json.dumps(meta, indent=1), encoding="utf-8"))
        if final.exists():  # the same step saved again (a resumed run that was interrupted at once): replace it
            old = state_dir / f".{final.name}.{os.getpid()}.old"
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
        _fsync_dir(state_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _publish_weights(final / WEIGHTS_FILE, Path(run_dir) / WEIGHTS_FILE)
    for _, old_set in checkpoint_sets(run_dir)[:-keep]:
        shutil.rmtree(old_set, ignore_errors=True)
    return final


def _publish_weights(src: Path, dst: Path) -> None:
    """Make `dst` (what load_model and export read) the set's weights: a hard link where possible, else a copy."""
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
            if p.name.startswith(".step-") and p.is_dir():
                shutil.rmtree(p, ignore_errors=True)


def load_checkpoint(path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer, rank: int = 0,
                    world: int = 1) -> LoopState:
    """Restore model, optimizer and this rank's RNG from the set at `path`; return the loop state.

    Errors name the file. A set saved with another number of ranks resumes too, but the ranks' dropout
    streams cannot continue where they were, so such a run is no longer bit-identical to an uninterrupted one.
    """
    meta = read_json(path / _STATE_FILE)
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        got = meta.get("format") if isinstance(meta, dict) else None
        raise CheckpointError(f"{path / _STATE_FILE}: checkpoint format {got!r}, this version of moe reads "
                              f"format {FORMAT} (resume it with the moe version that wrote it)")
    try:
        state = LoopState(step=int(meta["step"]), skipped_steps=int(meta["skipped_steps"]),
                          bad_in_a_row=int(meta["bad_in_a_row"]), data_fingerprint=str(meta["data_fingerprint"]))
        groups = meta["param_groups"]
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{path / _STATE_FILE}: missing or invalid field {e}") from None
    load_weights(model, path / WEIGHTS_FILE)
    opt_path = path / _OPTIMIZER_FILE
    try:
        tensors = load_file(opt_path)
    except FileNotFoundError:
        raise CheckpointError(f"{opt_path}: file not found") from None
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{opt_path}: not a valid safetensors file ({e})") from None
    opt_state: dict[int, dict[str, torch.Tensor]] = {}
    for name, t in tensors.items():
        if name.startswith("opt."):
            _, i, k = name.split(".", 2)
            opt_state.setdefault(int(i), {})[k] = t
    try:
        optimizer.load_state_dict({"state": opt_state, "param_groups": groups})
        if meta.get("world_size", 1) == world:
            torch.set_rng_state(tensors[f"rng.cpu.{rank}"])
            if f"rng.cuda.{rank}" in tensors and torch.cuda.is_available():
                torch.cuda.set_rng_state(tensors[f"rng.cuda.{rank}"])
        else:
            print(f"note: {path} was saved by {meta.get('world_size')} rank(s), resuming on {world}: the random "
                  f"streams (dropout) restart from the seed, so this run will not be bit-identical to an "
                  f"uninterrupted one")
        state.grad_norms = tensors["grad_norms"].tolist()
    except (KeyError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"{opt_path}: does not match this model's optimizer ({str(e).splitlines()[0]})") from None
    return state


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
