"""The run directory before training writes it: refusing an output that is a file, in use or (without
--overwrite) not empty, creating and locking it, and clearing a previous run's files from it."""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

from moe_core.common.errors import MoeError, os_reason
from moe_core.run_layout import (
    CONFIG_FILE,
    LOCK_FILE,
    METRICS_FILE,
    PLOTS_DIR,
    STATE_DIR,
    TENSORBOARD_DIR,
    TOKENIZER_FILE,
    WEIGHTS_FILE,
)

from .distributed import Dist
from .rundir_lock import RunDirLock, check_not_in_use


def check_run_dir(out: Path, overwrite: bool) -> None:
    """Refuse an output that is a file, that another moe process is writing, or that holds something (unless
    overwrite) — before any work is done, and changing nothing."""
    if out.exists() and not out.is_dir():
        raise MoeError(f"{out}: exists and is not a directory")
    if out.is_dir():
        check_not_in_use(out)
        _check_empty(out, overwrite)


def _check_empty(out: Path, overwrite: bool) -> None:
    if not overwrite and any(p.name != LOCK_FILE for p in out.iterdir()):  # a lock file alone is no run
        raise MoeError(f"{out}: directory exists and is not empty (pass --overwrite to replace the run)")


def claim_run_dir(out: Path, overwrite: bool, lock: RunDirLock) -> None:
    """Create `out` if needed and take its lock; then, holding it, refuse `out` again if it filled up since
    check_run_dir (another process wrote a run there meanwhile)."""
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise MoeError(f"{out}: cannot create the output directory ({os_reason(e)})") from None
    lock.acquire()
    _check_empty(out, overwrite)


def prepare_run_dir(out: Path, overwrite: bool, lock: RunDirLock) -> None:
    """Create and lock `out`, clear a previous run's files from it; fail with the path if it is not writable."""
    claim_run_dir(out, overwrite, lock)
    for name in (CONFIG_FILE, WEIGHTS_FILE, TOKENIZER_FILE, METRICS_FILE):
        (out / name).unlink(missing_ok=True)
    shutil.rmtree(out / STATE_DIR, ignore_errors=True)
    shutil.rmtree(out / PLOTS_DIR, ignore_errors=True)
    shutil.rmtree(out / TENSORBOARD_DIR, ignore_errors=True)
    try:
        probe = out / ".write-test"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise MoeError(f"{out}: output directory is not writable ({e.strerror or e})") from None


def lock_on_rank0(lock: RunDirLock, dist: Dist, device: torch.device) -> None:
    """Rank 0 takes the run directory's lock (it is the one that writes the directory's files); if it cannot,
    every rank stops, rank 0 with the reason and the others pointing at it."""
    error = None
    if dist.is_main:
        try:
            lock.acquire()
        except MoeError as e:
            error = e
    if dist.any(error is not None, device):
        if error is not None:
            raise error
        raise MoeError(f"rank {dist.rank}: stopping, rank 0 could not lock {lock.run_dir} (its error is above)")
