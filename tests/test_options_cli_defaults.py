"""`rcd generate` takes its length defaults from the checkpoint (config.json, rcd_training.json)
when the flags are not given, and refuses a --gen-length the context cannot hold, in one line."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

from rcd_ext.commands import generate as generate_command
from rcd_ext.commands._usage import UsageError

DEMO = str(Path(generate_command.__file__).resolve().parents[1] / "demo" / "checkpoints" / "rcd")


def parse(*argv: str) -> argparse.Namespace:
    subparsers = argparse.ArgumentParser(prog="rcd").add_subparsers()
    return generate_command.add_parser(subparsers).parse_args(["--model", "m", *argv])


def checkpoint(folder: Path, **config) -> str:
    folder.mkdir(exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config))
    return str(folder)


def test_defaults_come_from_the_training_task():
    args = parse()
    generate_command.fit_lengths_to_model(args, DEMO)  # coupled_choices: 16 + 8 in 24
    assert (args.gen_length, args.block_length) == (8, 8)


def test_given_lengths_are_kept_when_they_fit():
    args = parse("--gen-length", "4", "--block-length", "2")
    generate_command.fit_lengths_to_model(args, DEMO)
    assert (args.gen_length, args.block_length) == (4, 2)


def test_a_gen_length_the_context_cannot_hold_is_refused():
    args = parse("--gen-length", "16")
    with pytest.raises(UsageError) as caught:
        generate_command.fit_lengths_to_model(args, DEMO)
    assert str(caught.value) == (
        "--gen-length 16 does not fit: the model's context is 24 tokens and its training "
        "prompts (coupled_choices) take 16 (give --gen-length <= 8, a multiple of "
        "--block-length 16)")


def test_without_a_task_the_default_is_cut_to_whole_blocks_of_the_context(tmp_path):
    small = checkpoint(tmp_path / "small", max_position_embeddings=19)
    args = parse()
    generate_command.fit_lengths_to_model(args, small)
    assert (args.gen_length, args.block_length) == (18, 18)
    args = parse("--block-length", "4")
    generate_command.fit_lengths_to_model(args, small)
    assert (args.gen_length, args.block_length) == (16, 4)


def test_block_causal_models_bring_their_block(tmp_path):
    blocky = checkpoint(tmp_path / "blocky", max_position_embeddings=64,
                        attention="block_causal", block_length=4)
    args = parse()
    generate_command.fit_lengths_to_model(args, blocky)
    # 64 positions - (block - 1) alignment slack - 1 prompt token = 60
    assert (args.gen_length, args.block_length) == (60, 4)


def test_unknown_context_keeps_the_python_defaults(tmp_path):
    args = parse()
    generate_command.fit_lengths_to_model(args, str(tmp_path / "nothing-here"))
    assert (args.gen_length, args.block_length) == (64, 32)
