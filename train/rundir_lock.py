"""One writer per run directory: an advisory lock on RUN_DIR/.lock.

Every command that writes a run directory — `moe train` (a new run and `--resume`; rank 0 under torchrun) and
`moe ablate` (its output directory and each variant's run) — holds an exclusive `flock` on RUN_DIR/.lock while
it writes. A second writer is refused with one line naming the holder's pid, before it changes anything in the
directory. The lock belongs to the open file, not to the disk: the kernel drops it when its holder exits in any
way (SIGKILL included), so a killed run never leaves a stale lock — only, at worst, an unlocked lock file, which
the next writer takes over. A writer that finishes removes the file. It is not part of the run: readers (plot,
eval, export, serve) neither take nor read it.

A lock only counts while the file it is on is still the one at RUN_DIR/.lock: a writer checks that after
locking (and locks the current file if it was replaced), which is what makes removing the file safe.
"""

from __future__ import annotations

import errno
import fcntl
import os
import stat
from pathlib import Path

from moe_core.common.errors import MoeError, os_reason
from moe_core.run_layout import LOCK_FILE

# The lock file is opened, never followed: a symlink planted at RUN_DIR/.lock would make the writer truncate and
# write whatever file it points to (O_NOFOLLOW refuses it), and a FIFO there would block the open (O_NONBLOCK).
OPEN_FLAGS = os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NONBLOCK


def not_a_lock(path: Path, what: str) -> MoeError:
    return MoeError(f"{path}: {what}; expected the lock file moe writes there (a regular file): remove it, then run "
                    "this again")


def in_use_error(run_dir: Path, pid: str) -> MoeError:
    return MoeError(f"{run_dir}: in use by another moe process (pid {pid}); wait for it to finish or stop it, "
                    f"then run this again")


def _holder(fd: int) -> str:
    """The pid the holder wrote into the lock file ("unknown" while it is still writing it)."""
    try:
        text = os.pread(fd, 32, 0).decode("ascii", errors="replace").strip()
    except OSError:
        return "unknown"
    return text if text.isdigit() else "unknown"


def _try_lock(fd: int) -> bool:
    """Take the exclusive lock on `fd` without waiting: False when another open file holds it."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
            return False
        raise
    return True


def check_not_in_use(run_dir: Path) -> None:
    """Refuse a directory another process holds, without creating or changing anything in it (a check before
    any work; the writer takes the lock itself with RunDirLock before its first write)."""
    path = Path(run_dir) / LOCK_FILE
    try:
        fd = os.open(path, os.O_RDONLY | OPEN_FLAGS)  # flock works on a read-only descriptor too
    except OSError:
        return  # no lock file: no holder (a symlink or an unreadable one is reported by the writer when it locks)
    try:
        if not _try_lock(fd):
            raise in_use_error(Path(run_dir), _holder(fd))
    except OSError:
        pass  # a filesystem without flock: RunDirLock.acquire reports it
    finally:
        os.close(fd)  # closing drops the probe's lock at once


class RunDirLock:
    """The exclusive lock on one run directory, held from `acquire` until `release` (or the process's end,
    however it ends).

    Use as a context manager around the work: `with RunDirLock(run_dir) as lock: ... lock.acquire() ...`;
    leaving the block releases it if it was taken. `acquire` is idempotent."""

    _RETRIES = 10

    def __init__(self, run_dir: str | os.PathLike) -> None:
        self.run_dir = Path(run_dir)
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self) -> None:
        """Lock RUN_DIR/.lock (created if absent; the directory must exist) and write this process's pid into it;
        a one-line MoeError when another process holds it or the directory cannot take the file."""
        if self._fd is not None:
            return
        path = self.run_dir / LOCK_FILE
        for _ in range(self._RETRIES):
            try:
                fd = os.open(path, os.O_RDWR | os.O_CREAT | OPEN_FLAGS, 0o644)
            except OSError as e:
                if path.is_symlink():
                    raise not_a_lock(path, "a symbolic link") from None
                raise MoeError(f"{self.run_dir}: cannot lock the run directory ({os_reason(e)})") from None
            try:
                if not stat.S_ISREG(os.fstat(fd).st_mode):
                    raise not_a_lock(path, "not a regular file")
                if not _try_lock(fd):
                    raise in_use_error(self.run_dir, _holder(fd))
                # Between open and flock the file may have been deleted (its run directory removed and made
                # again): a lock on a file no longer at `path` guards nothing, so lock the one that is there.
                try:
                    current = os.stat(path)
                except FileNotFoundError:
                    current = None
                mine = os.fstat(fd)
                if current is not None and (current.st_ino, current.st_dev) == (mine.st_ino, mine.st_dev):
                    break
            except OSError as e:
                os.close(fd)
                raise MoeError(f"{self.run_dir}: cannot lock the run directory ({os_reason(e)})") from None
            except BaseException:
                os.close(fd)
                raise
            os.close(fd)
        else:
            raise MoeError(f"{self.run_dir}: cannot lock the run directory (its lock file keeps being replaced)")
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode("ascii"), 0)
        except OSError:
            pass  # the pid only names the holder in a refusal; the lock holds without it
        self._fd = fd

    def release(self) -> None:
        """Remove the lock file (if it is still this lock's) and drop the lock, in that order: a writer that
        opened the file just before it was removed finds it gone after locking, and locks a new one."""
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        try:
            path = self.run_dir / LOCK_FILE
            mine, current = os.fstat(fd), os.stat(path)
            if (current.st_ino, current.st_dev) == (mine.st_ino, mine.st_dev):
                path.unlink()
        except OSError:
            pass  # already gone (the run directory removed), or not removable: an unlocked file is no lock
        finally:
            os.close(fd)

    def __enter__(self) -> RunDirLock:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()
