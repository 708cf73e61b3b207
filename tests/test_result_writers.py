"""Result files other than the demo's (task JSONL export, step-view PNG, benchmark outputs)
are written whole or not at all: a full disk mid-write keeps the previous file, leaves no
temporary file and raises."""

from __future__ import annotations

import ast
import errno
from pathlib import Path

import pytest
import torch

from rcd_ext.decoding.generation import StepTrace
from rcd_ext.tasks import get_task

ROOT = Path(__file__).resolve().parents[1]
# Every module that writes a result file; each must go through rcd_ext/atomic_files.py.
WRITERS = sorted([*ROOT.glob("benchmarks/*.py"), *ROOT.glob("rcd_ext/demo/*.py"),
                  *ROOT.glob("rcd_ext/training/*.py"), ROOT / "rcd_ext/decoding/step_view.py",
                  ROOT / "rcd_ext/tasks/task.py"])


def write_half_then_fill_the_disk(monkeypatch):
    """Path.write_text and Figure.savefig get half their bytes out, then hit ENOSPC."""
    def text(self, data, *args, **kwargs):
        with open(self, "w", encoding="utf-8") as handle:
            handle.write(data[: len(data) // 2])
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Path, "write_text", text)
    matplotlib = pytest.importorskip("matplotlib")
    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    def figure(self, path, **kwargs):
        with open(path, "wb") as handle:
            handle.write(b"\x89PNG half")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Figure, "savefig", figure)


def test_task_jsonl_export_keeps_the_previous_file_on_a_full_disk(tmp_path, monkeypatch):
    task = get_task("pointer_chasing")
    path = tmp_path / "test.jsonl"
    task.to_jsonl(path, 5)
    previous = path.read_text()
    assert len(previous.splitlines()) == 5
    write_half_then_fill_the_disk(monkeypatch)
    with pytest.raises(OSError, match="No space left"):
        task.to_jsonl(path, 40, seed=3)
    monkeypatch.undo()
    assert path.read_text() == previous
    assert list(tmp_path.iterdir()) == [path]


def a_trace() -> list[StepTrace]:
    """Two steps of a 3-token block at position 4 (mask id 0)."""
    tokens = [torch.tensor([[0, 7, 0]]), torch.tensor([[5, 7, 6]])]
    committed = [torch.tensor([[False, True, False]]), torch.tensor([[True, False, True]])]
    alpha = torch.tensor([[0.5, 0.0, 0.25]])
    return [StepTrace(block=0, step=i, start=4, tokens=tokens[i], committed=committed[i],
                      alpha_in=alpha, alpha=alpha) for i in range(2)]


def test_step_view_png_keeps_the_previous_file_on_a_full_disk(tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")
    from rcd_ext.decoding.step_view import plot_steps

    png = plot_steps(a_trace(), 0, tmp_path / "steps.png")
    previous = png.read_bytes()
    assert previous[:8] == b"\x89PNG\r\n\x1a\n"
    write_half_then_fill_the_disk(monkeypatch)
    with pytest.raises(OSError, match="No space left"):
        plot_steps(a_trace(), 0, png, title="second")
    monkeypatch.undo()
    assert png.read_bytes() == previous
    assert list(tmp_path.iterdir()) == [png]


# (file, function) that write files which are not results, with the reason
NOT_RESULTS = {
    ("decode_before_after.py", "snapshot"): "copies source files into a scratch package",
}


def _calls_by_function(tree: ast.AST) -> list[tuple[str, ast.Call]]:
    """(name of the innermost enclosing function or "<module>", call) for every call."""
    found = []

    def visit(node: ast.AST, function: str) -> None:
        for child in ast.iter_child_nodes(node):
            inner = child.name if isinstance(child, (ast.FunctionDef,
                                                     ast.AsyncFunctionDef)) else function
            if isinstance(child, ast.Call):
                found.append((inner, child))
            visit(child, inner)

    visit(tree, "<module>")
    return found


def plain_writes(path: Path) -> list[str]:
    """Calls in `path` that write a file in place: .write_text/.write_bytes/.savefig/
    json.dump, and open() in a writing mode (outside the `NOT_RESULTS` functions)."""
    found = []
    for function, node in _calls_by_function(ast.parse(path.read_text(), str(path))):
        if (path.name, function) in NOT_RESULTS:
            continue
        function = node.func
        name = function.attr if isinstance(function, ast.Attribute) else getattr(
            function, "id", "")
        if name in ("write_text", "write_bytes", "savefig", "dump"):
            found.append(f"{path.name}:{node.lineno} {name}")
        if name == "open":
            modes = [arg.value for arg in node.args[1:2] + [k.value for k in node.keywords
                                                           if k.arg == "mode"]
                     if isinstance(arg, ast.Constant)]
            if any(set(str(mode)) & set("wax+") for mode in modes):
                found.append(f"{path.name}:{node.lineno} open {modes}")
    return found


def test_no_result_writer_bypasses_atomic_files():
    assert len(WRITERS) >= 12
    offenders = [hit for path in WRITERS for hit in plain_writes(path)]
    assert offenders == []


def test_the_scan_finds_a_plain_write(tmp_path):
    sample = tmp_path / "sample.py"
    sample.write_text("import json\nPath('a').write_text('x')\nopen('b', 'w')\n"
                      "fig.savefig('c.png')\nopen('d')\njson.dump({}, f)\n")
    assert [hit.split()[1] for hit in plain_writes(sample)] == [
        "write_text", "open", "savefig", "dump"]
    exempt = tmp_path / "decode_before_after.py"
    exempt.write_text("def snapshot():\n    Path('a').write_text('x')\n"
                      "def report():\n    Path('b').write_text('y')\n")
    assert plain_writes(exempt) == ["decode_before_after.py:4 write_text"]
