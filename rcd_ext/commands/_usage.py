"""Checks of command-line values that run before any model load, training or decoding.

Two kinds:
- argparse `type=` functions (`positive_int`, `probability`, ...) for one value; argparse reports
  their `ArgumentTypeError` as ``rcd <cmd>: argument --x: <why> ...`` (see rcd_ext.cli).
- `check_*` functions for paths and for values that depend on each other; they raise
  `UsageError`, which rcd_ext.cli prints as one line ``rcd <cmd>: <message>`` with exit code 2.
"""

from __future__ import annotations

import argparse
import tempfile
from collections.abc import Iterable
from pathlib import Path

__all__ = [
    "UsageError",
    "check_input_file",
    "check_output_dir",
    "check_output_file",
    "fraction",
    "nonnegative_float",
    "nonnegative_int",
    "positive_float",
    "positive_int",
    "probability",
]


class UsageError(ValueError):
    """A value the user gave is wrong; the message names it and the fix, on one line."""


def _number(text: str, cast: type, kind: str) -> int | float:
    try:
        return cast(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {kind}, got {text!r}") from None


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    value = _number(text, int, "an integer >= 1")
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text}")
    return value


def nonnegative_int(text: str) -> int:
    """argparse type: an integer >= 0."""
    value = _number(text, int, "an integer >= 0")
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text}")
    return value


def positive_float(text: str) -> float:
    """argparse type: a finite number > 0."""
    value = _number(text, float, "a number > 0")
    if not 0.0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"expected a finite number > 0, got {text}")
    return value


def nonnegative_float(text: str) -> float:
    """argparse type: a finite number >= 0."""
    value = _number(text, float, "a number >= 0")
    if not 0.0 <= value < float("inf"):
        raise argparse.ArgumentTypeError(f"expected a finite number >= 0, got {text}")
    return value


def probability(text: str) -> float:
    """argparse type: a number in (0, 1] (confidence thresholds, top-p)."""
    value = _number(text, float, "a number in (0, 1]")
    if not 0.0 < value <= 1.0:
        raise argparse.ArgumentTypeError(f"expected a number in (0, 1], got {text}")
    return value


def fraction(text: str) -> float:
    """argparse type: a number in [0, 1] (shares of rows)."""
    value = _number(text, float, "a number in [0, 1]")
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1], got {text}")
    return value


def check_input_file(option: str, path: str) -> Path:
    """`path` as a readable regular file, or UsageError naming `option`."""
    file = Path(path).expanduser()
    if not file.exists():
        raise UsageError(f"{option} {path}: no such file (check the path)")
    if not file.is_file():
        raise UsageError(f"{option} {path}: not a regular file (give a file)")
    return file


def _nearest_existing(path: Path) -> Path:
    for candidate in (path, *path.parents):
        if candidate.exists():
            return candidate
    return Path.cwd()


def _check_can_create_in(option: str, shown: str, directory: Path) -> None:
    """UsageError unless a file can be created in the existing `directory`."""
    if not directory.is_dir():
        raise UsageError(f"{option} {shown}: {directory} is not a directory "
                         "(choose a path inside a directory)")
    try:
        # a real probe, not os.access: root, ACLs and read-only mounts all answer truthfully
        with tempfile.TemporaryFile(dir=directory, prefix=".rcd-write-check-"):
            pass
    except OSError as error:
        raise UsageError(f"{option} {shown}: cannot write in {directory} "
                         f"({error.strerror or error}; choose a writable location)") from None


def check_output_dir(option: str, path: str) -> Path:
    """`path` as a directory that exists and is writable or can be created (nothing is made)."""
    directory = Path(path).expanduser()
    if directory.exists() and not directory.is_dir():
        raise UsageError(f"{option} {path}: exists and is not a directory (choose a directory)")
    _check_can_create_in(option, path, _nearest_existing(directory))
    return directory


def check_output_file(option: str, path: str, suffixes: Iterable[str] | None = None) -> Path:
    """`path` as a file that can be written: an allowed suffix, a writable existing folder."""
    file = Path(path).expanduser()
    allowed = tuple(suffixes or ())
    if allowed and file.suffix.lower() not in allowed:
        raise UsageError(f"{option} {path}: unknown file type {file.suffix or '(none)'!r} "
                         f"(use one of {', '.join(allowed)})")
    if file.is_dir():
        raise UsageError(f"{option} {path}: is a directory (give a file name)")
    if not file.parent.exists():
        raise UsageError(f"{option} {path}: folder {file.parent} does not exist "
                         "(create it first)")
    _check_can_create_in(option, path, file.parent)
    return file
