"""`rcd_ext.atomic_files`: a result file is replaced whole or left as it was, never torn."""

from __future__ import annotations

import errno
import json
import os
import stat

import pytest

from rcd_ext import atomic_files
from rcd_ext.atomic_files import (
    atomic_path,
    save_figure_atomic,
    write_json_atomic,
    write_text_atomic,
)

PREVIOUS = '{"good": "previous results"}\n'


def full_disk(path, text: str) -> None:
    """A writer that gets half of `text` onto the disk, then runs out of space."""
    with open(path, "w", encoding="utf-8") as handle:
        handle.write(text[: len(text) // 2])
        handle.flush()
        raise OSError(errno.ENOSPC, "No space left on device")


@pytest.fixture
def target(tmp_path):
    path = tmp_path / "results.json"
    path.write_text(PREVIOUS)
    return path


def test_writes_text_and_json_and_creates_the_directory(tmp_path):
    path = tmp_path / "new" / "deeper" / "results.json"
    assert write_json_atomic(path, {"accuracy": 0.5, "n": 3}) == path
    assert json.loads(path.read_text()) == {"accuracy": 0.5, "n": 3}
    assert path.read_text().endswith("\n")
    write_text_atomic(path, "replaced")
    assert path.read_text() == "replaced"
    assert sorted(p.name for p in path.parent.iterdir()) == ["results.json"]


def test_full_disk_mid_write_keeps_the_previous_file(target):
    with pytest.raises(OSError, match="No space left") as raised:
        with atomic_path(target) as temporary:
            full_disk(temporary, '{"new": "' + "x" * 1000 + '"}')
    assert raised.value.errno == errno.ENOSPC
    assert target.read_text() == PREVIOUS
    assert list(target.parent.iterdir()) == [target]  # no temporary file left behind


@pytest.mark.parametrize("failing", ["replace", "fsync"])
def test_failing_rename_or_fsync_keeps_the_previous_file(target, monkeypatch, failing):
    def refuse(*args, **kwargs):
        raise OSError(errno.EIO, f"{failing} failed")

    monkeypatch.setattr(atomic_files.os, failing, refuse)
    with pytest.raises(OSError, match=f"{failing} failed"):
        write_text_atomic(target, "new text that must not land")
    monkeypatch.undo()
    assert target.read_text() == PREVIOUS
    assert list(target.parent.iterdir()) == [target]


def test_unserialisable_json_touches_nothing(target):
    with pytest.raises(TypeError, match="not JSON serializable"):
        write_json_atomic(target, {"value": object()})
    assert target.read_text() == PREVIOUS
    assert list(target.parent.iterdir()) == [target]


def test_new_file_gets_the_umask_mode_and_an_existing_one_keeps_its_mode(tmp_path):
    previous_umask = os.umask(0o027)
    try:
        fresh = write_text_atomic(tmp_path / "fresh.txt", "x")
    finally:
        os.umask(previous_umask)
    assert stat.S_IMODE(fresh.stat().st_mode) == 0o640  # not mkstemp's 0600
    kept = tmp_path / "kept.txt"
    kept.write_text("old")
    kept.chmod(0o604)
    write_text_atomic(kept, "new")
    assert stat.S_IMODE(kept.stat().st_mode) == 0o604


class HalfWritingFigure:
    """A figure double whose savefig dies half-way through, like matplotlib on a full disk."""

    def __init__(self) -> None:
        self.saved_to = None

    def savefig(self, path, **kwargs) -> None:
        self.saved_to = path
        full_disk(path, "\x89PNG" + "p" * 100)


def test_figure_failing_half_way_keeps_the_previous_png(tmp_path):
    png = tmp_path / "demo.png"
    png.write_bytes(b"\x89PNG previous")
    figure = HalfWritingFigure()
    with pytest.raises(OSError, match="No space left"):
        save_figure_atomic(figure, png, dpi=100)
    assert str(figure.saved_to).endswith(".png")  # savefig picks its format from the suffix
    assert png.read_bytes() == b"\x89PNG previous"
    assert list(tmp_path.iterdir()) == [png]


def test_real_figure_is_a_whole_png(tmp_path):
    matplotlib = pytest.importorskip("matplotlib")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots()
    axis.plot([0, 1], [1, 0])
    png = save_figure_atomic(figure, tmp_path / "plot.png", dpi=50)
    plt.close(figure)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert list(tmp_path.iterdir()) == [png]
