"""File format versions: what every file moe writes for another command to read declares.

Compatibility: every such file (a run's config.json, a shard index, the exported model's metadata) carries
`format_version`, an integer bumped on any change a reader of the previous format would misread. A reader accepts
exactly its own FORMAT_VERSION and refuses any other, naming both versions; files written before the field existed
are format 1. Within a format, config.json must hold every model key.
"""

from __future__ import annotations

import os
from typing import Any

from .. import __version__
from .errors import CheckpointError

FORMAT_VERSION = 1


def check_format(version: Any, written_by: Any, where: str | os.PathLike) -> None:
    """Refuse a file of another format version than this moe's, naming both (see the module docstring)."""
    if isinstance(version, bool) or not isinstance(version, int):
        raise CheckpointError(f"{where}: format_version: expected an integer, got {str(version)[:40]!r}")
    if version != FORMAT_VERSION:
        advice = ("upgrade moe to read it" if version > FORMAT_VERSION
                  else "retrain or re-export it with this version")
        raise CheckpointError(f"{where}: written by moe {str(written_by)[:40]} in format {version}; this moe "
                              f"{__version__} reads format {FORMAT_VERSION} only ({advice})")

