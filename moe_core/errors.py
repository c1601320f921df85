"""User-facing errors: every command turns these into one line on stderr and exit code 2."""


class MoeError(Exception):
    """An error the user can act on. The message names the file / field / value and what was expected."""


class ConfigError(MoeError):
    """A config value (from TOML, JSON, --set or code) is unknown, mistyped or inconsistent."""


class CheckpointError(MoeError):
    """A run directory or its files are missing, corrupt or do not match each other."""
