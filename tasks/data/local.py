"""Where real datasets live on disk: `root=` argument or the L2O_DATA variable.

Nothing is ever downloaded.  When files are missing the error says exactly
which files to put in which directory.
"""
from __future__ import annotations

import os
from pathlib import Path

ENV_VAR = "L2O_DATA"


class DatasetNotFoundError(FileNotFoundError):
    """A real dataset's files are not in the data directory."""


class DatasetFormatError(ValueError):
    """A real dataset's file is there but unreadable or inconsistent (corrupt,
    truncated, images and labels of different counts); the message names the file."""


def data_root(root: str | os.PathLike | None = None) -> Path:
    if root is None:
        root = os.environ.get(ENV_VAR)
    if not root:
        raise DatasetNotFoundError(
            f"no data directory: pass root=... or set {ENV_VAR}=/path/to/data "
            "(datasets are never downloaded; see tasks/README.md for the layout)")
    path = Path(root).expanduser()
    if not path.is_dir():
        raise DatasetNotFoundError(f"data directory {path} does not exist ({ENV_VAR} or root=)")
    return path


def find_file(directories: list[Path], filename: str) -> Path | None:
    """First of `filename` or `filename.gz` found in the candidate directories."""
    for directory in directories:
        for candidate in (directory / filename, directory / (filename + ".gz")):
            if candidate.is_file():
                return candidate
    return None
