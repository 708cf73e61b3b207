"""`rcd demo`: the results.json schema, the verdict's honesty, the shipped checkpoints."""

from __future__ import annotations

import json

import pytest

from rcd_ext.cli import main
from rcd_ext.demo import checkpoints, report

KEYS = {"method", "init", "steps", "threshold", "tokens_per_step", "forwards", "accuracy", "n"}


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
    records = json.loads((out / "results.json").read_text())
    check_schema(records, 16)
    assert len(records) == 3 * 3  # (SeqD, RCD warm, RCD cold) x (s1, s8, tau 0.9)
    assert (out / "demo.png").stat().st_size > 0
    printed = capsys.readouterr().out
    assert "Most parallel common setting (1 step" in printed and "RCD warm" in printed
    assert checkpoints.shipped_available(tmp_path / "ckpt")
    assert not list((tmp_path / "ckpt").glob("*/checkpoint-*"))


@pytest.mark.skipif(not checkpoints.shipped_available(), reason="no shipped checkpoints")
def test_shipped_checkpoints_load_and_are_small(tmp_path):
    for name in checkpoints.NAMES:
        for path in (checkpoints.SHIPPED / name).iterdir():
            assert path.stat().st_size < 1_000_000, path
    out = tmp_path / "out"
    assert main(["demo", "--test-size", "24", "--steps", "1", "--thresholds", "0.9",
                 "--out", str(out)]) == 0
    check_schema(json.loads((out / "results.json").read_text()), 24)


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
    check_schema(json.loads((out / "results.json").read_text()), 8)
    with pytest.raises(ValueError, match="unknown task 'chess'; known: .*pointer_chasing"):
        main(["demo", "--task", "chess", "--out", str(out)])
