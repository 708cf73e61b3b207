"""Your own JSONL data (issue 16): every data problem is one `file:line: what (fix)` line that
the user sees before any training; the tiny tokenizer and context come from the data; the
demo's per-group records merge like a plain computation over all rows."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch
from test_cli_errors import forbid, no_heavy_work  # noqa: F401  the guard, extended below

import rcd_ext.demo.own_data as own_data_module
import rcd_ext.training as training_package
from rcd_ext.cli import main
from rcd_ext.commands import demo as demo_command
from rcd_ext.demo.data_task import RowGroup, build_test_set, merge_records
from rcd_ext.models.tiny_tokenizer import UnknownWordsWarning, tokenizer_from_texts
from rcd_ext.training.data import load_jsonl
from rcd_ext.training.jsonl_rows import DataError, read_text_rows
from rcd_ext.training.own_data import context_length, tiny_model_for_rows

GOOD = json.dumps({"prompt": "flip zub kel", "response": "kel zub"})


@pytest.fixture
def own_data_guard(no_heavy_work, monkeypatch):  # noqa: F811  pytest injects the fixture
    """test_cli_errors' guard (no model load, training or decoding), and the own-data runs."""
    monkeypatch.setattr(own_data_module, "run_data_demo", forbid)
    monkeypatch.setattr(own_data_module, "evaluate_data", forbid)


def write(path: Path, second_line: bytes) -> Path:
    path.write_bytes(GOOD.encode() + b"\n" + second_line + b"\n")
    return path


BAD_ROWS = {  # second line -> what the user reads after "rcd <cmd>: FILE:2: "
    b'{"prompt": "flip zub", "response": "zub\xff"}':
        "byte 0xff at column 40 is not UTF-8 (save the file as UTF-8)",
    b'{"prompt": "flip zub", "response": }':
        "not valid JSON (Expecting value at column 36; each line must be one JSON object)",
    b'{"prompt": "flip zub", "response": ""}':
        "'response' is empty (give its text, or drop the row)",
    b'{"prompt": "flip zub", "response": "  "}':
        "'response' is empty (give its text, or drop the row)",
    b'{"prompt": "flip zub", "response": 42}':
        "'response' is a number, expected a string (write it in quotes, e.g. "
        "\"response\": \"42\")",
    b'{"prompt": ["flip"], "response": "zub"}':
        "'prompt' is a list, expected a string (write it in quotes, e.g. "
        "\"prompt\": \"['flip']\")",
    b'{"prompt": "", "response": "zub"}': "'prompt' is empty (give its text, or drop the row)",
    b'{"response": "zub"}':
        "no 'prompt' (expected keys 'prompt' and 'response' (strings) or 'messages', "
        "got keys ['response'])",
    b'"flip zub"':
        "expected a JSON object (expected keys 'prompt' and 'response' (strings) or "
        "'messages'), got str",
}


@pytest.mark.parametrize(("line", "message"), list(BAD_ROWS.items()))
def test_each_bad_row_is_one_line_before_training(tmp_path, capsys, own_data_guard, line,
                                                   message):
    data = write(tmp_path / "train.jsonl", line)
    argv = ["train", "--stage", "seqd", "--model", "tiny", "--data", str(data),
            "--output-dir", str(tmp_path / "out")]
    assert main(argv) == 2
    assert capsys.readouterr().err == f"rcd train: {data}:2: {message}\n"
    # the same file as a demo's test file, and as an evaluation's
    test = write(tmp_path / "test.jsonl", line)
    good = tmp_path / "good.jsonl"
    good.write_text(GOOD + "\n")
    assert main(["demo", "--data", str(good), "--test", str(test),
                 "--out", str(tmp_path / "demo")]) == 2
    assert capsys.readouterr().err == f"rcd demo: {test}:2: {message}\n"
    assert main(["eval", "--data", str(test), "--model", str(tmp_path),
                 "--out", str(tmp_path / "eval")]) == 2
    assert capsys.readouterr().err == f"rcd eval: {test}:2: {message}\n"
    assert not (tmp_path / "out").exists()


def test_empty_file_and_missing_test_are_refused(tmp_path, capsys, own_data_guard):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n  \n")
    assert main(["train", "--stage", "seqd", "--model", "tiny", "--data", str(empty),
                 "--output-dir", str(tmp_path / "out")]) == 2
    assert capsys.readouterr().err == (f"rcd train: {empty}: no rows (expected one JSON object "
                                       "per line)\n")
    assert main(["demo", "--data", str(empty), "--out", str(tmp_path / "o")]) == 2
    assert capsys.readouterr().err == ("rcd demo: --data needs --test (a .jsonl file of "
                                       "held-out rows to judge on)\n")


def test_words_tokenizer_is_the_sorted_vocabulary_of_the_data():
    tokenizer = tokenizer_from_texts(["flip zub kel", "kel zub", "mox"])
    assert [tokenizer.convert_ids_to_tokens(i) for i in range(5, len(tokenizer))] == [
        "flip", "kel", "mox", "zub"]
    assert tokenizer("zub mox", add_special_tokens=False)["input_ids"] == [8, 7]
    with pytest.raises(ValueError, match=r"the data uses \[MASK\]"):
        tokenizer_from_texts(["a [MASK] b"])


def test_chars_tokenizer_keeps_spaces_and_round_trips(tmp_path):
    tokenizer = tokenizer_from_texts(["ab c"], unit="chars")
    ids = tokenizer("cab a", add_special_tokens=False)["input_ids"]
    assert ids == [8, 6, 7, 5, 6]  # " " 5, "a" 6, "b" 7, "c" 8 (sorted after the 5 specials)
    assert tokenizer.decode(ids) == "cab a"
    tokenizer.save_pretrained(tmp_path)
    from transformers import AutoTokenizer

    again = AutoTokenizer.from_pretrained(tmp_path)
    assert again("cab a", add_special_tokens=False)["input_ids"] == ids
    assert again.decode(ids) == "cab a"


def test_context_is_the_longest_row_with_eos(tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_text(GOOD + "\n" + json.dumps({"prompt": "flip a b c", "response": "c b a"})
                    + "\n")
    rows = read_text_rows(path)
    test = [*read_text_rows(path)[:1]]
    model, tokenizer = tiny_model_for_rows(rows, extra_rows=test, hidden_size=8, heads=2)
    assert model.config.max_position_embeddings == 4 + 3 + 1
    assert context_length(rows, tokenizer, append_eos=False) == 7
    assert len(tokenizer) == 5 + len({"flip", "zub", "kel", "a", "b", "c"})


def test_over_long_row_names_line_and_sizes(tmp_path):
    path = write(tmp_path / "train.jsonl",
                 json.dumps({"prompt": "flip zub kel zub", "response": "zub kel zub"}).encode())
    tokenizer = tokenizer_from_texts(["flip zub kel"])
    with pytest.raises(DataError) as error:
        load_jsonl(path, tokenizer, max_length=7)
    assert str(error.value) == (f"{path}:2: 8 tokens (prompt 4 + response 3 + EOS) > the "
                                "model's context of 7 (shorten the row, or train a model with "
                                "a longer context)")
    with pytest.raises(DataError, match=rf"^{path}:2: 8 tokens \(prompt 4 \+ response 3 \+ "
                                        r"EOS\) > the model's context of 7"):
        build_test_set(read_text_rows(path), tokenizer, "t", max_length=7)


def test_unknown_tokens_are_warned_with_counts_not_mapped_silently(tmp_path):
    path = write(tmp_path / "train.jsonl",
                 json.dumps({"prompt": "flip qq zub", "response": "zub qq qq ww"}).encode())
    tokenizer = tokenizer_from_texts(["flip zub kel"])
    with pytest.warns(UnknownWordsWarning) as caught:
        load_jsonl(path, tokenizer)
    assert str(caught[0].message) == (
        f"{path}: 2 distinct tokens (4 occurrences) not in the model's vocabulary, which the "
        "model reads as [UNK] and can never write: 'qq' x3, 'ww' x1")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_jsonl(write(tmp_path / "known.jsonl", GOOD.encode()), tokenizer)


def test_train_reports_test_tokens_it_will_never_see(tmp_path, capsys, monkeypatch):
    calls = []
    monkeypatch.setattr(training_package, "train", lambda **kw: calls.append(kw) or _Done())
    data = write(tmp_path / "train.jsonl", GOOD.encode())
    test = write(tmp_path / "test.jsonl",
                 json.dumps({"prompt": "flip qq", "response": "qq"}).encode())
    assert main(["train", "--stage", "seqd", "--model", "tiny", "--data", str(data), "--test",
                 str(test), "--output-dir", str(tmp_path / "out")]) == 0
    captured = capsys.readouterr()
    assert captured.err == (f"rcd train: warning: {test}: 1 distinct token (2 occurrences) not "
                            "in the model's vocabulary, which the model reads as [UNK] and can "
                            "never write: 'qq' x2\n")
    assert (f"tiny dLLM for {data}: 3 words + 5 special tokens, context 6 tokens"
            in captured.out)
    model, tokenizer = calls[0]["model"], calls[0]["tokenizer"]
    assert model.config.max_position_embeddings == 6 == tokenizer.model_max_length
    assert model.config.vocab_size == len(tokenizer) == 8


class _Done:
    """What `rcd train` reads of a finished trainer."""

    class state:  # noqa: N801
        log_history: list = []
        global_step = 0

    @staticmethod
    def is_world_process_zero() -> bool:
        return True


def test_merged_record_equals_a_plain_computation_over_all_rows():
    short, long = RowGroup("a", answer_length=3), RowGroup("b", answer_length=5)
    parts = [(short, {"method": "rcd", "init": "cold", "steps": 2, "threshold": None,
                      "tokens_per_step": 1.5, "forwards": 2.0, "accuracy": 0.5,
                      "token_accuracy": 0.75, "n": 4}),
             (long, {"method": "rcd", "init": "cold", "steps": 4, "threshold": None,
                     "tokens_per_step": 1.25, "forwards": 4.0, "accuracy": 0.25,
                     "token_accuracy": 0.5, "n": 12})]
    merged = merge_records(parts, steps=4)
    # 16 rows: 4 with 3 decoded tokens in 2 steps, 12 with 5 in 4 steps
    assert merged["n"] == 16 and merged["steps"] == 4
    assert merged["accuracy"] == pytest.approx((4 * 0.5 + 12 * 0.25) / 16)
    assert merged["forwards"] == pytest.approx((4 * 2 + 12 * 4) / 16)
    assert merged["tokens_per_step"] == pytest.approx((4 * 3 + 12 * 5) / (4 * 2 + 12 * 4))
    # response tokens (EOS excluded): 2 per short row, 4 per long row
    assert merged["token_accuracy"] == pytest.approx((4 * 2 * 0.75 + 12 * 4 * 0.5) / (8 + 48))


def test_group_scores_response_tokens_not_eos():
    group = RowGroup("g", answer_length=3, problems=[
        (torch.tensor([5]), torch.tensor([6, 7, 2])), (torch.tensor([5]), torch.tensor([7, 7, 2]))])
    predicted = torch.tensor([[6, 7, 1], [7, 6, 2]])  # row 0 right but no EOS; row 1 one wrong
    assert group.score(predicted, None) == 0.5
    assert group.token_accuracy(predicted) == 0.75


def test_cli_size_names_match_the_library():
    assert demo_command.DATA_SIZES == tuple(own_data_module.SIZES)


def test_eval_data_needs_a_model(tmp_path, capsys, own_data_guard):
    good = write(tmp_path / "test.jsonl", GOOD.encode())
    assert main(["eval", "--data", str(good)]) == 2
    assert capsys.readouterr().err == ("rcd eval: --data needs --model (the checkpoint to "
                                       "evaluate)\n")


@pytest.mark.slow
def test_training_a_checkpoint_checks_its_context_and_vocabulary(tmp_path, capfd):
    data = write(tmp_path / "train.jsonl", GOOD.encode())  # rows of 3 + 2 + EOS = 6 tokens
    common = ["--max-steps", "1", "--batch-size", "2", "--save-steps", "100"]
    assert main(["train", "--stage", "seqd", "--model", "tiny", "--data", str(data),
                 "--output-dir", str(tmp_path / "ckpt"), *common]) == 0
    long = write(tmp_path / "long.jsonl",
                 json.dumps({"prompt": "flip zub kel", "response": "kel zub kel"}).encode())
    capfd.readouterr()
    assert main(["train", "--stage", "seqd", "--model", str(tmp_path / "ckpt"), "--data",
                 str(long), "--output-dir", str(tmp_path / "out"), *common]) == 2
    assert capfd.readouterr().err == (
        f"rcd train: {long}:2: 7 tokens (prompt 3 + response 3 + EOS) > the model's context "
        "of 6 (shorten the row, or train a model with a longer context)\n")
    unknown = write(tmp_path / "unknown.jsonl",
                    json.dumps({"prompt": "flip qq", "response": "qq"}).encode())
    assert main(["train", "--stage", "seqd", "--model", str(tmp_path / "ckpt"), "--data",
                 str(unknown), "--output-dir", str(tmp_path / "out"), *common]) == 0
    assert (f"rcd train: warning: {unknown}: 1 distinct token (2 occurrences) not in the "
            "model's vocabulary" in capfd.readouterr().err)


@pytest.mark.parametrize(("cores", "load", "threads"), [
    (2, 0.1, 2), (2, 0.6, 1), (2, 1.2, 1), (2, 12.0, 1), (16, 3.4, 13)])
def test_default_threads_are_the_idle_cores(monkeypatch, cores, load, threads):
    from rcd_ext.commands import train as train_command

    monkeypatch.setattr(train_command.os, "cpu_count", lambda: cores)
    monkeypatch.setattr(train_command.os, "getloadavg", lambda: (load, load, load))
    assert train_command.idle_cores() == threads


def test_default_threads_without_a_load_average_is_one(monkeypatch):
    from rcd_ext.commands import train as train_command

    def unavailable():
        raise OSError("no load average here")

    monkeypatch.setattr(train_command.os, "getloadavg", unavailable)
    assert train_command.idle_cores() == 1
