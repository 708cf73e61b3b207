"""`rcd demo`: the results.json schema, the verdict's honesty, the shipped checkpoints,
bad inputs, a missing matplotlib and result files that a failing disk cannot tear."""

from __future__ import annotations

import errno
import json
import sys

import pytest
import torch

import rcd_ext
from rcd_ext import atomic_files
from rcd_ext.cli import main
from rcd_ext.demo import checkpoints, report, run_demo

KEYS = {"method", "init", "steps", "threshold", "tokens_per_step", "forwards", "accuracy", "n"}


DOCUMENT_KEYS = {"task", "test_size", "checkpoints", "training", "device", "rcd_ext_version",
                 "torch_version", "records"}
shipped_only = pytest.mark.skipif(not checkpoints.shipped_available(),
                                  reason="no shipped checkpoints")


def check_document(document, n, task="coupled_choices"):
    """results.json: provenance keys, then the records."""
    assert set(document) == DOCUMENT_KEYS
    assert (document["task"], document["test_size"]) == (task, n)
    assert document["device"] == "cpu"  # where the weights were, not a default like cuda:0
    assert document["rcd_ext_version"] == rcd_ext.__version__
    assert document["torch_version"] == torch.__version__
    check_schema(document["records"], n)
    return document["records"]


def check_schema(records, n):
    assert isinstance(records, list) and records
    for r in records:
        assert set(r) == KEYS
        assert r["method"] in ("seqd", "rcd")
        assert r["init"] in (("warm", "cold") if r["method"] == "rcd" else (None,))
        assert (r["steps"] is None) != (r["threshold"] is None)
        assert r["steps"] is None or isinstance(r["steps"], int)
        assert r["threshold"] is None or isinstance(r["threshold"], float)
        assert isinstance(r["tokens_per_step"], float) and r["tokens_per_step"] > 0
        assert isinstance(r["forwards"], float) and r["forwards"] >= 1
        assert isinstance(r["accuracy"], float) and 0.0 <= r["accuracy"] <= 1.0
        for key in ("tokens_per_step", "forwards", "accuracy"):
            assert round(r[key], 4) == r[key], (key, r[key])  # not 0.2919999957084656
        assert r["n"] == n
        # the warm start's reference forward is counted
        if r["init"] == "warm" and r["steps"] is not None:
            assert r["forwards"] == r["steps"] + 1


def test_demo_train_tiny_budget_writes_results(tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["demo", "--train", "--stage1-steps", "2", "--stage2-steps", "1",
                 "--batch-size", "4", "--test-size", "16", "--steps", "1", "8",
                 "--thresholds", "0.9", "--out", str(out),
                 "--save-checkpoints", str(tmp_path / "ckpt")]) == 0
    document = json.loads((out / "results.json").read_text())
    records = check_document(document, 16)
    assert document["checkpoints"] == {name: str((tmp_path / "ckpt" / name).resolve())
                                       for name in checkpoints.NAMES}
    assert document["training"] == {"stage1_steps": 2, "stage2_steps": 1, "batch_size": 4}
    assert len(records) == 3 * 3  # (SeqD, RCD warm, RCD cold) x (s1, s8, tau 0.9)
    assert (out / "demo.png").stat().st_size > 0
    printed = capsys.readouterr().out
    assert "Most parallel common setting (1 step" in printed and "RCD warm" in printed
    assert f"wrote {out / 'results.json'} and {out / 'demo.png'} (" in printed
    assert checkpoints.shipped_available(tmp_path / "ckpt")
    assert not list((tmp_path / "ckpt").glob("*/checkpoint-*"))


@shipped_only
def test_shipped_checkpoints_load_and_are_small(tmp_path):
    for name in checkpoints.NAMES:
        for path in (checkpoints.SHIPPED / name).iterdir():
            assert path.stat().st_size < 1_000_000, path
    out = tmp_path / "out"
    assert main(["demo", "--test-size", "24", "--steps", "1", "--thresholds", "0.9",
                 "--out", str(out)]) == 0
    document = json.loads((out / "results.json").read_text())
    check_document(document, 24)
    assert document["checkpoints"] == "shipped" and document["training"] is None


def test_verdict_says_when_rcd_is_not_ahead():
    def record(method, init, steps, accuracy, forwards):
        return {"method": method, "init": init, "steps": steps, "threshold": None,
                "tokens_per_step": 8.0 / steps, "forwards": forwards, "accuracy": accuracy,
                "n": 100}

    records = [record("seqd", None, 1, 0.30, 1.0), record("seqd", None, 2, 0.50, 2.0),
               record("rcd", "warm", 1, 0.20, 2.0), record("rcd", "warm", 2, 0.60, 3.0),
               record("rcd", "cold", 1, 0.10, 1.0), record("rcd", "cold", 2, 0.40, 2.0)]
    lines = report.verdict(records)
    assert "NOT ahead of SeqD 0.300" in lines[0]
    assert "not ahead of SeqD with 2 steps" in lines[1]
    assert "RCD warm ahead at: 2 steps" in lines[2]
    assert "RCD warm behind at: 1 step" in lines[3]
    assert "1 step" in report.table(records)


def test_demo_on_another_task_trains_for_it_and_unknown_tasks_are_refused(tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["demo", "--task", "pointer_chasing", "--stage1-steps", "2",
                 "--stage2-steps", "1", "--batch-size", "4", "--test-size", "8", "--steps", "8",
                 "--thresholds", "0.9", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "trained on coupled_choices: training for pointer_chasing" in printed
    assert "held-out pointer_chasing problems" in printed
    document = json.loads((out / "results.json").read_text())
    check_document(document, 8, task="pointer_chasing")
    assert document["checkpoints"] == "trained in this run, not kept"
    assert main(["demo", "--task", "chess", "--out", str(out)]) == 2
    error = capsys.readouterr().err
    assert "'chess'" in error and "pointer_chasing" in error and error.count("\n") == 1


SMALL = dict(test_size=8, steps=(1,), thresholds=(0.9,), threads=1)


def no_model_loads(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded or trained before the input was checked")

    monkeypatch.setattr(checkpoints, "load_checkpoints", refuse)
    monkeypatch.setattr(checkpoints, "train_checkpoints", refuse)


@pytest.mark.parametrize(("bad", "message"), [
    (dict(test_size=0), "test_size must be a positive integer, got 0"),
    (dict(test_size=2.5), "test_size must be a positive integer, got 2.5"),
    (dict(steps=(1, 0)), "steps must be a positive integer, got 0"),
    (dict(steps=(1, 16)), r"steps \[16\] exceed the 8-token answer of task 'coupled_choices'"),
    (dict(steps=(), thresholds=()), "steps and thresholds are both empty"),
    (dict(thresholds=(0.0,)), r"thresholds must be in \(0, 1\], got 0.0"),
    (dict(thresholds=(1.5,)), r"thresholds must be in \(0, 1\], got 1.5"),
    (dict(batch_size=0, train=True), "batch_size must be a positive integer, got 0"),
    (dict(stage1=-1, train=True), "stage1 must be a positive integer, got -1"),
    (dict(threads=0), "threads must be a positive integer, got 0"),
    (dict(task="bogus"), "unknown task 'bogus'; known: "),
])
def test_bad_inputs_name_the_parameter_before_any_model_loads(tmp_path, monkeypatch, bad,
                                                              message):
    no_model_loads(monkeypatch)
    with pytest.raises(ValueError, match=message):
        run_demo(tmp_path / "out", **{**SMALL, **bad})


def test_unwritable_out_dir_is_refused_before_any_model_loads(tmp_path, monkeypatch):
    no_model_loads(monkeypatch)
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    with pytest.raises(ValueError, match="out_dir '.*a-file/out' cannot be created"):
        run_demo(blocker / "out", **SMALL)


@shipped_only
def test_without_matplotlib_only_results_json_is_reported(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` raises
    out = tmp_path / "out"
    run_demo(out, **SMALL)
    printed = capsys.readouterr().out
    assert "matplotlib is not installed (pip install matplotlib): no demo.png written" in printed
    assert f"wrote {out / 'results.json'} (" in printed
    assert "demo.png (" not in printed and "and" not in printed.splitlines()[-1]
    assert sorted(p.name for p in out.iterdir()) == ["results.json"]
    check_document(json.loads((out / "results.json").read_text()), 8)


@shipped_only
def test_full_disk_at_results_json_keeps_the_previous_one(tmp_path, monkeypatch):
    out = tmp_path / "out"
    out.mkdir()
    (out / "results.json").write_text('{"previous": true}\n')

    def no_space(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(atomic_files.os, "replace", no_space)
    with pytest.raises(OSError, match="No space left"):
        run_demo(out, **SMALL)
    monkeypatch.undo()
    assert json.loads((out / "results.json").read_text()) == {"previous": True}
    assert sorted(p.name for p in out.iterdir()) == ["results.json"]


@shipped_only
def test_plot_failing_half_way_keeps_the_previous_png(tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")
    from matplotlib.figure import Figure

    out = tmp_path / "out"
    out.mkdir()
    (out / "demo.png").write_bytes(b"previous png")

    def half_then_full(figure, path, **kwargs):
        with open(path, "wb") as handle:
            handle.write(b"\x89PNG half")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Figure, "savefig", half_then_full)
    with pytest.raises(OSError, match="No space left"):
        run_demo(out, **SMALL)
    assert (out / "demo.png").read_bytes() == b"previous png"
    assert sorted(p.name for p in out.iterdir()) == ["demo.png", "results.json"]
    check_document(json.loads((out / "results.json").read_text()), 8)


@shipped_only
def test_decode_record_with_a_dirichlet_init_is_seeded_and_names_the_options_it_varied():
    from rcd_ext.demo.evaluate import decode_record
    from rcd_ext.models.adapters import load_model
    from rcd_ext.tasks import get_task

    model, _ = load_model(str(checkpoints.SHIPPED / "rcd"))
    model.eval()
    task = get_task("coupled_choices")
    test = task.test_set(64, seed=0)
    first, again, other = (decode_record(model, task, test, method="rcd", init="dirichlet",
                                         steps=2, seed=seed, t_res=0.5) for seed in (0, 0, 1))
    assert first == again and first["init"] == "dirichlet" and first["t_res"] == 0.5
    assert first["forwards"] == 2.0  # Dirichlet draws cost no forward
    cold = decode_record(model, task, test, method="rcd", init="cold", steps=2)
    assert "t_res" not in cold
    # the draws reach the decode: two seeds (or no draws at all) give other answers somewhere
    assert {first["accuracy"], other["accuracy"], cold["accuracy"]} != {first["accuracy"]}
    with pytest.raises(ValueError, match="rcd needs init one of"):
        decode_record(model, task, test, method="rcd", init="reference", steps=2)
