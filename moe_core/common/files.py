"""Files a command writes: outputs checked before any work, never aliasing an input, written atomically.

Torch-free (serve writes its outputs through it without the model code): moe_core.checkpoint builds the run
directory on it.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import signal
import tempfile
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import TypeVar

from .errors import MoeError, is_io_error, os_reason

T = TypeVar("T")

# The process's umask (read once: os.umask can only be read by setting it): what a file or directory made by
# mkstemp / mkdtemp (0600 / 0700) is opened up to before it is moved into place.
UMASK = os.umask(0)
os.umask(UMASK)


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


@contextlib.contextmanager
def updating_input(path: str | os.PathLike) -> Iterator[None]:
    """Within the block, the running command may replace `path` although it read it: for a command whose purpose is
    to update that one file in place (`moe eval --calibrate-halting` rewrites the run's weights). Every other input
    stays protected."""
    global _command_inputs
    saved = _command_inputs
    if saved is not None:
        resolved, ident = _identity(Path(path))
        _command_inputs = [(p, what) for p, what in saved
                           if not (_identity(p)[0] == resolved or (ident is not None and _identity(p)[1] == ident))]
    try:
        yield
    finally:
        _command_inputs = saved


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


def atomic_write(path: str | os.PathLike, write: Callable[[str], T], overwrite: bool = True) -> T:
    """Call write(tmp_path) on a temp file beside `path`, fsync it, then move it to `path`: over an existing file
    with `overwrite`, else only if `path` still does not exist (see _commit). Returns what `write` returned.

    A reader sees the old file or the complete new one, never a torn one; on failure (an interrupting signal
    included) nothing is left. An I/O error (a full disk, a read-only directory) becomes a one-line MoeError
    naming `path` and the reason. Within a command, a `path` that aliases a file the command read is refused.
    """
    with atomic_output(path, overwrite) as tmp:
        return write(tmp)


@contextlib.contextmanager
def atomic_output(path: str | os.PathLike, overwrite: bool = True) -> Iterator[str]:
    """atomic_write as a `with` block: the block writes the temp file it is given, which is fsynced and moved to
    `path` when the block ends normally and removed when it raises (the same checks and errors as atomic_write)."""
    path = Path(path)
    if not path.parent.is_dir():
        raise MoeError(f"{path.parent}: output directory does not exist")
    check_not_inputs([path])
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.close(fd)
        yield tmp
        os.chmod(tmp, 0o666 & ~UMASK)  # mkstemp makes 0600 (and some writers recreate the file)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        check_not_inputs([path])
        # The move is not interrupted half-way by SIGINT / SIGTERM: their handlers run after it.
        with signals_deferred():
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
def atomic_outputs(paths: Sequence[str | os.PathLike], overwrite: bool | Sequence[bool] = True
                   ) -> Iterator[list[str]]:
    """atomic_output for files that belong together (an export's graphs and tokenizer; calibrated weights and their
    record): the block writes one temp file per path (yielded in order); when it ends normally, all of them are
    published, in the order given, or none is (publish). When it raises, or publishing fails, every file that
    existed is as it was and no new one is left. `overwrite`: for all paths, or one flag per path. The same checks and
    errors as atomic_write, naming the file being handled (the last, main one of the set when none is)."""
    outs = [Path(p) for p in paths]
    flags = [overwrite] * len(outs) if isinstance(overwrite, bool) else list(overwrite)
    for path in outs:
        if not path.parent.is_dir():
            raise MoeError(f"{path.parent}: output directory does not exist")
    check_not_inputs(outs)
    tmps: dict[int, str] = {}
    current = outs[-1]  # the file an I/O error is reported on: the one being handled, else the set's last (main)
    try:
        for i in reversed(range(len(outs))):
            current = outs[i]
            fd, tmps[i] = tempfile.mkstemp(prefix=f".{outs[i].name}.", suffix=".tmp", dir=outs[i].parent)
            os.close(fd)
        current = outs[-1]
        yield [tmps[i] for i in range(len(outs))]
        for i, path in enumerate(outs):
            current = path
            os.chmod(tmps[i], 0o666 & ~UMASK)
            with open(tmps[i], "rb") as f:
                os.fsync(f.fileno())
        current = outs[-1]
        check_not_inputs(outs)
        with signals_deferred():
            publish([(tmps[i], path, flags[i]) for i, path in enumerate(outs)])
            tmps = {}
    except BaseException as e:
        for tmp in tmps.values():
            with contextlib.suppress(OSError):
                os.unlink(tmp)
        if isinstance(e, Exception) and not isinstance(e, MoeError) and is_io_error(e):
            where = next((p for p in outs if str(p) == getattr(e, "filename", None)), current)
            raise MoeError(f"{where}: cannot write ({os_reason(e)}); nothing was written") from None
        raise


def publish(moves: list[tuple[str, Path, bool]]) -> None:
    """Move each finished temp file to its path (with its overwrite flag: see _commit), in order, all or none. A
    file that exists is first hard-linked to a backup beside it (.NAME.*.old), so that replacing it keeps a path that
    always names a complete file and a failure can put it back; when anything fails, the files replaced so far get
    their backups back and the new ones are removed, then the error is raised. The backups go once every file is in
    place. A process killed half-way (SIGKILL, power loss) may leave part of a set published, never an old file
    lost: its backup stays."""
    done: list[tuple[Path, str | None]] = []  # (path, its backup; None: the path was new)
    try:
        for tmp, path, overwrite in moves:
            backup = None
            if overwrite and (path.exists() or path.is_symlink()):
                backup = _backup(path)
            try:
                _commit(tmp, path, overwrite)
            except BaseException:
                if backup is not None:  # `path` itself is unchanged
                    with contextlib.suppress(OSError):
                        os.unlink(backup)
                raise
            done.append((path, backup))
    except BaseException:
        for path, backup in reversed(done):
            with contextlib.suppress(OSError):
                if backup is not None:
                    os.replace(backup, path)
                else:
                    path.unlink()
        raise  # the temp files not yet moved are the caller's to remove
    for _, backup in done:
        if backup is not None:
            with contextlib.suppress(OSError):
                os.unlink(backup)
    for parent in {path.parent for _, path, _ in moves}:
        fsync_dir(parent)


def _backup(path: Path) -> str:
    """A hard link to `path` under a new name beside it (a copy where the filesystem has no hard links)."""
    fd, backup = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".old", dir=path.parent)
    os.close(fd)
    os.unlink(backup)
    try:
        os.link(path, backup, follow_symlinks=False)
    except OSError as e:
        if e.errno not in (errno.EPERM, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EMLINK, errno.EXDEV):
            raise
        shutil.copy2(path, backup, follow_symlinks=False)
    return backup


def fsync_dir(path: str | os.PathLike) -> None:
    """Flush a directory's entries (a rename into it) to disk, where the filesystem allows it: some refuse fsync on
    a directory, and the rename is atomic without it."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def signals_deferred() -> Iterator[None]:
    """SIGINT / SIGTERM that arrive within the block are handled after it: a move into place is never cut short."""
    blocked = {signal.SIGINT, signal.SIGTERM}
    old = signal.pthread_sigmask(signal.SIG_BLOCK, blocked) if hasattr(signal, "pthread_sigmask") else None
    try:
        yield
    finally:
        if old is not None:
            signal.pthread_sigmask(signal.SIG_SETMASK, old)


def atomic_write_text(path: str | os.PathLike, text: str, overwrite: bool = True) -> None:
    atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"), overwrite)
