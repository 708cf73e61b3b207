"""`rcd generate` on a saved tiny checkpoint: output matches the Python API, steps views, errors."""

from __future__ import annotations

import json

import pytest
import torch
from test_decoding_doubles import tiny_model

from rcd_ext.cli import main
from rcd_ext.decoding.generation import generate
from rcd_ext.models import build_tiny_tokenizer

SYMBOLS = [chr(ord("a") + i) for i in range(11)]
ARGS = ["--gen-length", "8", "--block-length", "4", "--steps", "4", "--quiet"]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("checkpoints")
    tokenizer = build_tiny_tokenizer(SYMBOLS)
    paths = {}
    for name, model in (("target", tiny_model(seed=0)), ("reference", tiny_model(seed=5)),
                        ("wide", tiny_model(vocab_size=20))):
        model.save_pretrained(root / name)
        tokenizer.save_pretrained(root / name)
        paths[name] = str(root / name)
    return paths


@pytest.mark.parametrize("seqd", [False, True])
def test_cli_text_matches_the_python_api(checkpoints, capsys, seqd):
    argv = ["generate", "--model", checkpoints["target"], "--prompt", "a b c", *ARGS, "--json"]
    assert main(argv + (["--seqd"] if seqd else [])) == 0
    printed = json.loads(capsys.readouterr().out)
    expected = generate(tiny_model(seed=0), "a b c", tokenizer=build_tiny_tokenizer(SYMBOLS),
                        gen_length=8, block_length=4, steps=4, rcd=not seqd)
    assert printed["text"] == expected.text
    assert printed["tokens"] == expected.tokens.tolist()
    assert printed["stats"]["denoising_steps"] == 4


def test_cli_reference_init_summary_and_steps(checkpoints, capsys, tmp_path):
    steps_json = tmp_path / "steps.json"
    argv = ["generate", "--model", checkpoints["target"], "--ref-model", checkpoints["reference"],
            "--prompt", "a b c", "--prompt", "d e f", *ARGS, "--show-steps",
            "--steps-out", str(steps_json)]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "[1] 'd e f' ->" in out and "block 1  positions 7..10" in out
    summary = out.strip().splitlines()[-1]
    assert summary.startswith("RCD (init reference):") and "+ 2 reference" in summary
    steps = json.loads(steps_json.read_text())["steps"]
    assert len(steps) == 4 and len(steps[0]["alpha"]) == 2
    masked = torch.tensor(steps[0]["tokens"]) == 1
    assert (torch.tensor(steps[0]["alpha"])[masked] > 0).all()


def test_cli_writes_a_png(checkpoints, tmp_path, capsys):
    png = tmp_path / "steps.png"
    argv = ["generate", "--model", checkpoints["target"], "--prompt", "a b", *ARGS,
            "--steps-out", str(png)]
    assert main(argv) == 0
    assert png.read_bytes()[:4] == b"\x89PNG"


def test_cli_short_generation_needs_no_block_length_and_writes_text_steps(checkpoints, capsys,
                                                                          tmp_path):
    steps_txt = tmp_path / "steps.txt"
    argv = ["generate", "--model", checkpoints["target"], "--prompt", "a b", "--gen-length", "4",
            "--quiet", "--json", "--steps-out", str(steps_txt)]
    assert main(argv) == 0  # --block-length defaults to --gen-length when that is below 32
    printed = json.loads(capsys.readouterr().out)
    assert printed["stats"]["denoising_steps"] == 4 and len(printed["tokens"][0]) == 4
    assert steps_txt.read_text().startswith("block 0  positions 2..5")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["steps.txt"]  # no temporary left


@pytest.mark.parametrize("extra, message", [
    (["--gen-length", "6"], "--gen-length 6 is not a multiple of --block-length 4"),
    (["--init", "reference", "--ref-model", "WIDE"], "reference vocab 20 != target vocab 16"),
])
def test_cli_reports_bad_input(checkpoints, capsys, extra, message):
    extra = [checkpoints["wide"] if item == "WIDE" else item for item in extra]
    argv = ["generate", "--model", checkpoints["target"], "--prompt", "a b", *ARGS, *extra]
    assert main(argv) == 2
    assert message in capsys.readouterr().err


def test_python_generate_names_unknown_prompt_words(checkpoints):
    from rcd_ext.models.adapters import load_model
    from rcd_ext.models.tiny_tokenizer import UnknownWordsWarning

    model, tokenizer = load_model(checkpoints["target"])
    with pytest.warns(UnknownWordsWarning, match="'zebra'"):
        generate(model, ["a b zebra"], tokenizer=tokenizer, gen_length=4, block_length=4,
                 steps=4, progress=False)
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error", UnknownWordsWarning)  # known words: no warning
        generate(model, ["a b c"], tokenizer=tokenizer, gen_length=4, block_length=4, steps=4,
                 progress=False)


def test_cli_warns_about_unknown_words_once(checkpoints, capsys):
    assert main(["generate", "--model", checkpoints["target"], "--prompt", "a zebra", *ARGS]) == 0
    err = capsys.readouterr().err
    assert err.count("'zebra'") == 1
