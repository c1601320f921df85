"""User-facing errors: every command turns these into one line on stderr and exit code 2."""

from __future__ import annotations

import os
import re
import signal


class MoeError(Exception):
    """An error the user can act on. The message names the file / field / value and what was expected."""


class ConfigError(MoeError):
    """A config value (from TOML, JSON, --set or code) is unknown, mistyped or inconsistent."""


class CheckpointError(MoeError):
    """A run directory or its files are missing, corrupt or do not match each other."""


_RUST_OS_ERROR = re.compile(r"\(os error (\d+)\)")


def os_reason(e: BaseException) -> str:
    """What went wrong in an I/O error, in a few words: "No space left on device", "Read-only file system", ...

    Also for the errors of Rust writers (safetensors), which carry the OS error only as "(os error 28)"."""
    if isinstance(e, OSError) and e.strerror:
        return e.strerror
    m = _RUST_OS_ERROR.search(str(e))
    if m:
        return os.strerror(int(m.group(1)))
    return str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__


def is_io_error(e: BaseException) -> bool:
    """An OSError, or a Rust library's error that wraps one ("... I/O error: ... (os error N)")."""
    return isinstance(e, OSError) or bool(_RUST_OS_ERROR.search(str(e)))


class Interrupted(BaseException):
    """SIGINT / SIGTERM arrived while a command ran (moe_core.cli): a BaseException, so that no `except Exception`
    swallows it and every cleanup on the way out (atomic_write's temp files) runs."""

    def __init__(self, signum: int) -> None:
        self.signum = signum
        self.name = signal.Signals(signum).name
        super().__init__(f"interrupted by {self.name}")
