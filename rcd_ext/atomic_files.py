"""Result files written whole or not at all.

A killed process or a full disk must never leave a truncated results.json or PNG where a
previous good one stood: every writer goes to a temporary file in the same directory, flushes
and fsyncs it, then renames it over the target (rename is atomic within one filesystem).
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, *, suffix: str | None = None) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success it replaces `path`, on error it vanishes.

    `suffix` defaults to the target's own suffix, so writers that pick a format from the file
    name (matplotlib's `savefig`) still see ".png".
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(
        dir=target.parent, prefix=f".{target.name}.", suffix=target.suffix if suffix is None
        else suffix)
    os.close(handle)
    temporary_path = Path(temporary)
    try:
        yield temporary_path
        # mkstemp makes the file 0600; a result file should get the mode a plain open() gives
        os.chmod(temporary_path, _plain_file_mode(target))
        with open(temporary_path, "rb+") as written:
            os.fsync(written.fileno())
        os.replace(temporary_path, target)
        _fsync_directory(target.parent)  # the rename itself survives a power cut
    finally:
        temporary_path.unlink(missing_ok=True)


def _plain_file_mode(target: Path) -> int:
    """The target's current mode if it exists, else 0o666 minus the process umask."""
    try:
        return target.stat().st_mode & 0o7777
    except FileNotFoundError:
        umask = os.umask(0)
        os.umask(umask)
        return 0o666 & ~umask


def _fsync_directory(directory: Path) -> None:
    """Flush a directory entry change; a no-op where directories cannot be opened (Windows)."""
    try:
        descriptor = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(descriptor)
    except OSError:
        pass  # some filesystems refuse fsync on directories; the data itself is synced
    finally:
        os.close(descriptor)


def write_text_atomic(path: str | os.PathLike, text: str, *, encoding: str = "utf-8") -> Path:
    """Write `text` to `path` atomically; returns the path written."""
    with atomic_path(path) as temporary:
        temporary.write_text(text, encoding=encoding)
    return Path(path)


def write_json_atomic(path: str | os.PathLike, payload: Any, *, indent: int | None = 2) -> Path:
    """Serialise `payload` first (a serialisation error touches no file), then write atomically."""
    text = json.dumps(payload, indent=indent) + "\n"
    return write_text_atomic(path, text)


def save_figure_atomic(figure: Any, path: str | os.PathLike, **savefig_kwargs: Any) -> Path:
    """`figure.savefig` through a temporary file of the same suffix."""
    with atomic_path(path) as temporary:
        figure.savefig(temporary, **savefig_kwargs)
    return Path(path)
