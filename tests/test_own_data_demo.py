"""`rcd demo --data` end to end on a small generated JSONL task with a vocabulary the project
has never seen, then `rcd eval --data` on the models it kept (issue 16)."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch

import rcd_ext
from rcd_ext.cli import main
from rcd_ext.models.tiny_tokenizer import SPECIAL_TOKENS

pytestmark = pytest.mark.slow  # three short trainings: ~25 s of CPU on 2 idle cores

WORDS = [a + b for a in ("zu", "ke", "mo", "pi") for b in ("b", "l", "x")]
DOCUMENT_KEYS = {"task", "test_size", "checkpoints", "training", "device", "rcd_ext_version",
                 "torch_version", "records", "data"}
RECORD_KEYS = {"method", "init", "steps", "threshold", "tokens_per_step", "forwards",
               "accuracy", "token_accuracy", "n"}


def flip_rows(count: int, seed: int) -> list[dict[str, str]]:
    """'flip w1 .. wk' -> the words reversed, k of 3 or 4 (two answer lengths)."""
    generator = random.Random(seed)
    rows = []
    for _ in range(count):
        words = [generator.choice(WORDS) for _ in range(generator.choice((3, 4)))]
        rows.append({"prompt": "flip " + " ".join(words), "response": " ".join(words[::-1])})
    return rows


def write_jsonl(path: Path, rows: list[dict[str, str]]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    folder = tmp_path_factory.mktemp("own-data")
    train = write_jsonl(folder / "train.jsonl", flip_rows(300, seed=0))
    test_rows = flip_rows(30, seed=1) + [{"prompt": "flip qq zub", "response": "zub qq"}]
    test = write_jsonl(folder / "test.jsonl", test_rows)
    out, kept = folder / "out", folder / "models"
    assert main(["demo", "--data", str(train), "--test", str(test), "--size", "tiny",
                 "--steps", "1", "4", "--thresholds", "0.9", "--out", str(out),
                 "--save-checkpoints", str(kept)]) == 0
    return folder, test, out, kept


def test_demo_on_own_data_writes_results_plot_and_verdict(demo_run, capsys):
    folder, test, out, kept = demo_run
    document = json.loads((out / "results.json").read_text())
    assert set(document) == DOCUMENT_KEYS
    assert (document["task"], document["test_size"]) == ("jsonl:test.jsonl", 31)
    assert document["data"]["test"] == str(test.resolve())
    assert document["data"]["tokenize"] == "words"
    assert document["training"] == {"stage1_steps": 60, "stage2_steps": 30, "batch_size": 32}
    assert document["checkpoints"]["rcd"] == str((kept / "rcd").resolve())
    assert document["rcd_ext_version"] == rcd_ext.__version__
    records = document["records"]
    decoded = sum(len(json.loads(line)["response"].split()) + 1
                  for line in test.read_text().splitlines())
    assert len(records) == 3 * 3  # (SeqD, RCD warm, RCD cold) x (1 step, 4 steps, tau 0.9)
    for record in records:
        assert set(record) == RECORD_KEYS and record["n"] == 31
        assert 0.0 <= record["accuracy"] <= record["token_accuracy"] + 1e-9 <= 1.0 + 1e-9
        if record["steps"] == 1:  # each answer and its EOS in one step
            assert record["tokens_per_step"] == pytest.approx(decoded / 31, abs=1e-4)
            assert record["forwards"] == (2.0 if record["init"] == "warm" else 1.0)
    assert (out / "demo.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_demo_on_own_data_prints_tables_warning_and_verdict(demo_run, capfd):
    # the module fixture's output is gone; rerun only the cheap evaluation of the kept models
    folder, test, out, kept = demo_run
    assert main(["eval", "--data", str(test), "--model", str(kept / "rcd"), "--ref-model",
                 str(kept / "reference"), "--seqd-model", str(kept / "seqd"), "--steps", "1",
                 "4", "--thresholds", "0.9", "--out", str(folder / "eval")]) == 0
    captured = capfd.readouterr()
    assert f"warning: {test}: 1 distinct token (2 occurrences)" in captured.err
    assert "'qq' x2" in captured.err
    assert "Most parallel common setting (1 step for the answer): RCD warm" in captured.out
    assert "per-token accuracy (response tokens right, position by position)" in captured.out
    assert "Best accuracy: SeqD" in captured.out
    # the same models decode the same rows the same way: eval reproduces the demo's records
    demo = json.loads((out / "results.json").read_text())["records"]
    again = json.loads((folder / "eval" / "results.json").read_text())["records"]
    assert again == demo


def test_kept_models_carry_the_data_tokenizer_and_context(demo_run):
    from transformers import AutoTokenizer

    from rcd_ext.models.adapters import load_model

    folder, test, out, kept = demo_run
    model, tokenizer = load_model(str(kept / "rcd"))
    assert set(tokenizer.get_vocab()) == {*WORDS, "flip", *SPECIAL_TOKENS}
    assert model.config.max_position_embeddings == 1 + 4 + 4 + 1  # flip, 4 words, 4, EOS
    assert AutoTokenizer.from_pretrained(kept / "reference").get_vocab() == \
        tokenizer.get_vocab()
    ids = tokenizer("flip zub kel", add_special_tokens=False)["input_ids"]
    assert tokenizer.unk_token_id not in ids and torch.tensor(ids).max() < len(tokenizer)
