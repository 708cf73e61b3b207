"""`rcd` refuses wrong input with one line on stderr and exit code 2, before any heavy work.

Each command's loaders and trainers are replaced by functions that fail the test if called,
so a refusal that happens only after a model load (or training, or decoding) fails here.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import requests
from huggingface_hub.errors import RepositoryNotFoundError
from test_decoding_doubles import tiny_model

import rcd_ext.decoding.generation as generation_module
import rcd_ext.demo as demo_package
import rcd_ext.models.adapters as adapters_module
from rcd_ext.cli import main, one_line
from rcd_ext.commands import _model_source
from rcd_ext.commands import generate as generate_command
from rcd_ext.commands._model_source import looks_like_path, resolve_model_source
from rcd_ext.commands._usage import UsageError
from rcd_ext.models import build_tiny_tokenizer
from rcd_ext.models.tiny_tokenizer import (
    UnknownWordsWarning,
    check_known_words,
    describe_unknown_words,
    unknown_words,
)

SYMBOLS = [chr(ord("a") + i) for i in range(11)]


def forbid(*args, **kwargs):
    raise AssertionError("heavy work ran before the arguments were checked")


@pytest.fixture
def no_heavy_work(monkeypatch):
    """Fail the test if a model loads, trains, or decodes."""
    import rcd_ext.training as training_package
    import rcd_ext.training.trainer as trainer_module

    monkeypatch.setattr(adapters_module, "load_model", forbid)
    monkeypatch.setattr(generation_module, "generate", forbid)
    monkeypatch.setattr(demo_package, "run_demo", forbid)
    monkeypatch.setattr(training_package, "train", forbid)
    monkeypatch.setattr(training_package, "build_tiny_model", forbid)
    monkeypatch.setattr(trainer_module, "load_trainable", forbid)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> str:
    folder = tmp_path_factory.mktemp("target")
    tiny_model(seed=0).save_pretrained(folder)
    build_tiny_tokenizer(SYMBOLS).save_pretrained(folder)
    return str(folder)


@pytest.fixture
def blocker(tmp_path) -> Path:
    """A regular file: any path below it cannot be created, even by root."""
    path = tmp_path / "a-file"
    path.write_text("not a directory\n")
    return path


def refusal(argv: list[str], capsys) -> str:
    """Run `rcd argv`; assert exit code 2 and one stderr line naming the command; return it."""
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.endswith("\n"), err
    assert err.startswith(f"rcd {argv[0]}: "), err
    return err


# --- rcd generate ------------------------------------------------------------------------------

GENERATE_CASES = [
    (["--model", "/nonexistent/ckpt"], "--model /nonexistent/ckpt: no such directory"),
    (["--model", "./missing-ckpt"], "--model ./missing-ckpt: no such directory"),
    (["--model", "CKPT", "--ref-model", "/nonexistent/ref"],
     "--ref-model /nonexistent/ref: no such directory"),
    (["--model", "EMPTY"], "no config.json in this directory"),
    (["--model", "CKPT", "--device", "bogus"], "--device bogus: not a device name"),
    (["--model", "CKPT", "--prompt-file", "MISSING"], "no such file (check the path)"),
    (["--model", "CKPT", "--steps-out", "BLOCKED/steps.json"], "a-file is not a directory"),
    (["--model", "CKPT", "--steps-out", "steps.csv"],
     "--steps-out steps.csv: unknown file type '.csv' (use one of .json, .png, .txt)"),
    (["--model", "CKPT", "--gen-length", "8", "--steps", "100"],
     "--steps 100 > --gen-length 8: each step unmasks at least one token, so at most 8 steps "
     "run (use --steps 8 or fewer)"),
    (["--model", "CKPT", "--gen-length", "6", "--block-length", "4"],
     "--gen-length 6 is not a multiple of --block-length 4"),
    (["--model", "CKPT", "--gen-length", "8", "--block-length", "4", "--steps", "3"],
     "--steps 3 is not a multiple of the 2 blocks"),
    (["--model", "CKPT", "--threshold", "1.5"],
     "argument --threshold: expected a number in (0, 1], got 1.5"),
    (["--model", "CKPT", "--gen-length", "0"], "argument --gen-length: expected an integer >= 1"),
    (["--model", "CKPT", "--t-res", "1e-39"], "1 / t_res overflows float32"),
    (["--model", "CKPT", "--t-res", "two"], "argument --t-res: expected a number > 0, got 'two'"),
    (["--model", "CKPT", "--init", "reference"], "--init reference needs --ref-model"),
    (["--model", "CKPT", "--unknown-words", "maybe"], "argument --unknown-words: invalid choice"),
]


@pytest.mark.parametrize("extra, message", GENERATE_CASES,
                         ids=[" ".join(extra)[:50] for extra, _ in GENERATE_CASES])
def test_generate_refuses_before_loading(checkpoint, tmp_path, blocker, capsys, no_heavy_work,
                                         extra, message):
    (tmp_path / "empty").mkdir()
    places = {"CKPT": checkpoint, "EMPTY": str(tmp_path / "empty"),
              "MISSING": str(tmp_path / "prompts.txt"), "BLOCKED": str(blocker)}
    extra = [places.get(item, item.replace("BLOCKED", str(blocker))) for item in extra]
    assert message in refusal(["generate", "--prompt", "a b", *extra], capsys)


def test_generate_needs_a_prompt(checkpoint, tmp_path, capsys, no_heavy_work):
    assert "no prompt (give --prompt TEXT or --prompt-file FILE)" in refusal(
        ["generate", "--model", checkpoint], capsys)
    empty = tmp_path / "prompts.txt"
    empty.write_text("\n  \n")
    assert "no non-empty line" in refusal(
        ["generate", "--model", checkpoint, "--prompt-file", str(empty)], capsys)


def test_generate_refuses_a_steps_file_in_a_missing_folder(checkpoint, tmp_path, capsys,
                                                            no_heavy_work):
    path = tmp_path / "no-folder" / "steps.json"
    err = refusal(["generate", "--model", checkpoint, "--prompt", "a", "--steps-out", str(path)],
                  capsys)
    assert f"--steps-out {path}: folder {path.parent} does not exist (create it first)" in err


def test_generate_refuses_a_png_without_matplotlib(checkpoint, tmp_path, monkeypatch, capsys,
                                                   no_heavy_work):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # find_spec then finds nothing
    err = refusal(["generate", "--model", checkpoint, "--prompt", "a", "--steps-out",
                   str(tmp_path / "steps.png")], capsys)
    assert "a PNG needs matplotlib (pip install matplotlib, or use .json or .txt)" in err


def test_unwritable_folder_is_found_by_a_real_write(checkpoint, tmp_path, monkeypatch, capsys,
                                                    no_heavy_work):
    import tempfile

    def read_only(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(tempfile, "TemporaryFile", read_only)
    err = refusal(["generate", "--model", checkpoint, "--prompt", "a", "--steps-out",
                   str(tmp_path / "steps.txt")], capsys)
    assert f"cannot write in {tmp_path} (Permission denied; choose a writable location)" in err


@pytest.mark.parametrize("cuda_build, count, spec, message", [
    (None, 0, "cuda", "--device cuda: this torch .* is built without CUDA \\(use --device cpu"),
    ("12.4", 0, "cuda", "--device cuda: no CUDA device is visible"),
    ("12.4", 2, "cuda:5", "--device cuda:5: only 2 CUDA device\\(s\\) are visible"),
])
def test_generate_refuses_a_cuda_device_this_torch_cannot_use(
        checkpoint, monkeypatch, capsys, no_heavy_work, cuda_build, count, spec, message):
    import re

    import torch

    monkeypatch.setattr(torch.version, "cuda", cuda_build)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)
    err = refusal(["generate", "--model", checkpoint, "--prompt", "a", "--device", spec], capsys)
    assert re.search(message, err), err


def test_generate_accepts_cpu_and_checks_everything_before_the_load(checkpoint, monkeypatch):
    loaded = []

    def record_load(source, **kwargs):
        loaded.append((source, kwargs["device"]))
        raise KeyboardInterrupt  # stop here: only the order of checks and load matters

    monkeypatch.setattr(adapters_module, "load_model", record_load)
    assert main(["generate", "--model", checkpoint, "--prompt", "a", "--device", "cpu"]) == 130
    assert loaded == [(checkpoint, "cpu")]


# --- hub ids ----------------------------------------------------------------------------------

@pytest.mark.parametrize("value, is_path", [
    ("/nonexistent", True), ("./model", True), ("../model", True), ("~/model", True),
    ("a/b/c", True), ("org/name", False), ("gpt2", False), ("GSAI-ML/LLaDA-8B-Instruct", False),
    ("org/na me", True), ("org/../x", True),
])
def test_paths_and_hub_ids_are_told_apart(value, is_path):
    assert looks_like_path(value) is is_path


def hub(monkeypatch, *, offline=False, cached=None, probe_error=None):
    """Stand-ins for the cache lookup, the offline flag and the hub request."""
    monkeypatch.setattr(_model_source, "_hub_offline", lambda: offline)
    monkeypatch.setattr(_model_source, "_cached_snapshot", lambda repo_id: cached)

    def probe(repo_id):
        if probe_error is not None:
            raise probe_error

    monkeypatch.setattr(_model_source, "_probe_hub", probe)


def test_an_uncached_hub_id_offline_is_refused(monkeypatch):
    hub(monkeypatch, offline=True)
    with pytest.raises(UsageError, match="org/name: not in the local Hugging Face cache and "
                                         "HF_HUB_OFFLINE is set"):
        resolve_model_source("--model", "org/name")


def test_a_cached_hub_id_offline_loads_by_its_id(monkeypatch, tmp_path):
    hub(monkeypatch, offline=True, cached=str(tmp_path), probe_error=AssertionError("probed"))
    assert resolve_model_source("--model", "org/name") == "org/name"


def test_an_unreachable_hub_refuses_an_uncached_id_at_once(monkeypatch):
    hub(monkeypatch, probe_error=requests.ConnectionError("Name or service not known"))
    with pytest.raises(UsageError, match="org/name: no such local directory, and as a hub id: "
                                         "the Hugging Face hub cannot be reached "
                                         r"\(ConnectionError\) and the model is not cached"):
        resolve_model_source("--model", "org/name")


def test_an_unreachable_hub_loads_a_cached_id_from_its_folder(monkeypatch, tmp_path, capsys):
    hub(monkeypatch, cached=str(tmp_path), probe_error=requests.Timeout("timed out"))
    assert resolve_model_source("--model", "org/name") == str(tmp_path)
    assert "loads from the cache at" in capsys.readouterr().err


def test_a_missing_hub_model_is_refused(monkeypatch):
    hub(monkeypatch, probe_error=RepositoryNotFoundError("404 Client Error"))
    with pytest.raises(UsageError, match="no such model on the Hugging Face hub"):
        resolve_model_source("--model", "org/name")


def test_a_reachable_hub_id_passes_through(monkeypatch):
    hub(monkeypatch)
    assert resolve_model_source("--model", "org/name") == "org/name"


def test_the_cache_lookup_finds_a_snapshot_with_a_config(monkeypatch, tmp_path):
    from huggingface_hub import constants

    repo = tmp_path / "models--org--name"
    (repo / "snapshots" / "abc").mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("abc")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    assert _model_source._cached_snapshot("org/name") is None  # no config.json yet
    (repo / "snapshots" / "abc" / "config.json").write_text("{}")
    assert _model_source._cached_snapshot("org/name") == str(repo / "snapshots" / "abc")
    assert _model_source._cached_snapshot("org/other") is None


def test_generate_with_an_unreachable_hub_is_one_line(monkeypatch, capsys, no_heavy_work):
    hub(monkeypatch, probe_error=requests.ConnectionError("no network"))
    err = refusal(["generate", "--model", "org/name", "--prompt", "a"], capsys)
    assert "--model org/name: no such local directory, and as a hub id: the Hugging Face hub " \
        "cannot be reached" in err


# --- rcd demo ---------------------------------------------------------------------------------

DEMO_CASES = [
    (["--task", "bogus"], "--task bogus: unknown task 'bogus' (use one of: branching_walk, "
                          "coupled_choices, pointer_chasing, switching_chase)"),
    (["--test-size", "0"], "argument --test-size: expected an integer >= 1, got 0"),
    (["--steps", "1", "0"], "argument --steps: expected an integer >= 1, got 0"),
    (["--steps", "-2"], "argument --steps: expected an integer >= 1, got -2"),
    (["--steps", "4", "16"], "--steps 16: coupled_choices answers have 8 tokens"),
    (["--task", "branching_walk", "--steps", "8"], "--steps 8: branching_walk answers have 6"),
    (["--thresholds", "0"], "argument --thresholds: expected a number in (0, 1], got 0"),
    (["--thresholds", "0.5", "1.5"], "expected a number in (0, 1], got 1.5"),
    (["--batch-size", "0"], "argument --batch-size: expected an integer >= 1, got 0"),
    (["--stage1-steps", "-1"], "argument --stage1-steps: expected an integer >= 1, got -1"),
    (["--threads", "0"], "argument --threads: expected an integer >= 1, got 0"),
    (["--out", "BLOCKED/out"], "is not a directory (choose a path inside a directory)"),
    (["--out", "BLOCKED"], "exists and is not a directory"),
    (["--checkpoints", "MISSING"], "no such directory (give a folder holding reference, seqd, "
                                   "rcd, or use --train)"),
    (["--checkpoints", "PARTIAL"], "no rcd checkpoint in it"),
    (["--checkpoints", "PARTIAL", "--train"], "--checkpoints loads models and --train makes"),
    (["--save-checkpoints", "BLOCKED/keep", "--train"], "--save-checkpoints"),
]


@pytest.mark.parametrize("extra, message", DEMO_CASES,
                         ids=[" ".join(extra)[:50] for extra, _ in DEMO_CASES])
def test_demo_refuses_before_loading(tmp_path, blocker, capsys, no_heavy_work, extra, message):
    partial = tmp_path / "partial"
    for name in ("reference", "seqd"):
        (partial / name).mkdir(parents=True)
        (partial / name / "config.json").write_text("{}")
    places = {"MISSING": str(tmp_path / "none"), "PARTIAL": str(partial), "BLOCKED": str(blocker)}
    extra = [places.get(item, item.replace("BLOCKED", str(blocker))) for item in extra]
    argv = ["demo", *(["--out", str(tmp_path / "out")] if "--out" not in extra else []), *extra]
    assert message in refusal(argv, capsys)
    assert not (tmp_path / "out").exists()


def test_the_commands_know_the_task_and_checkpoint_names_without_importing_them():
    from rcd_ext.commands import demo as demo_command
    from rcd_ext.commands._task_names import TASK_NAMES
    from rcd_ext.demo.checkpoints import NAMES
    from rcd_ext.tasks import task_names

    assert list(TASK_NAMES) == task_names()
    assert demo_command.CHECKPOINT_NAMES == NAMES


# --- rcd train --------------------------------------------------------------------------------

TRAIN_CASES = [
    (["--output-dir", "BLOCKED/out"], "--output-dir BLOCKED/out: BLOCKED is not a directory"),
    (["--batch-size", "0"], "argument --batch-size: expected an integer >= 1, got 0"),
    (["--max-steps", "0"], "argument --max-steps: expected an integer >= 1, got 0"),
    (["--gradient-accumulation-steps", "0"], "argument --gradient-accumulation-steps"),
    (["--learning-rate", "0"], "argument --learning-rate: expected a finite number > 0"),
    (["--learning-rate", "nan"], "argument --learning-rate: expected a finite number > 0"),
    (["--warmup-steps", "-1"], "argument --warmup-steps: expected an integer >= 0, got -1"),
    (["--weight-decay", "-0.1"], "argument --weight-decay: expected a finite number >= 0"),
    (["--save-steps", "0"], "argument --save-steps"),
    (["--logging-steps", "0"], "argument --logging-steps"),
    (["--no-residual-fraction", "1.5"], "argument --no-residual-fraction: expected a number in "
                                        "[0, 1], got 1.5"),
    (["--eps", "1"], "argument --eps: expected a number in (0, 1), got 1"),
    (["--hidden-size", "30", "--heads", "4"], "--hidden-size 30 is not a multiple of --heads 4"),
    (["--heads", "0"], "argument --heads: expected an integer >= 1, got 0"),
    (["--lr-scheduler", "bogus"], "--lr-scheduler bogus: unknown schedule (use one of linear,"),
    (["--data", "MISSING"], "no such file or directory (give a .jsonl file"),
    (["--data", "task:bogus"], "--data task:bogus: unknown task 'bogus'"),
    (["--model", "/nonexistent/base"], "--model /nonexistent/base: no such directory"),
    (["--resume", "MISSING"], "no such checkpoint folder"),
    (["--model", "/some/base", "--data", "train.jsonl"], "--data train.jsonl: no such file"),
]


@pytest.mark.parametrize("extra, message", TRAIN_CASES,
                         ids=[" ".join(extra)[:50] for extra, _ in TRAIN_CASES])
def test_train_refuses_before_training(tmp_path, blocker, capsys, no_heavy_work, extra,
                                       message):
    places = {"MISSING": str(tmp_path / "none"), "BLOCKED": str(blocker)}
    extra = [places.get(item, item.replace("BLOCKED", str(blocker))) for item in extra]
    message = message.replace("BLOCKED", str(blocker))
    defaults = {"--model": "tiny", "--data": "task:coupled_choices",
                "--output-dir": str(tmp_path / "out")}
    given = {**defaults, **dict(zip(extra[::2], extra[1::2], strict=False))}
    argv = ["train", "--stage", "seqd", *[part for pair in given.items() for part in pair],
            *[item for item in extra if item not in given and item not in given.values()]]
    assert message in refusal(argv, capsys)
    assert not (tmp_path / "out").exists()


def test_train_rcd_without_a_reference_is_refused(tmp_path, capsys, no_heavy_work):
    err = refusal(["train", "--stage", "rcd", "--model", "tiny", "--data",
                   "task:coupled_choices", "--output-dir", str(tmp_path)], capsys)
    assert "--stage rcd --residual-source previous-step needs --reference" in err


def test_train_tiny_on_a_bad_jsonl_is_refused_before_training(tmp_path, capsys, no_heavy_work):
    # --model tiny builds its vocabulary from a .jsonl file too (issue 16): a bad row is refused
    data = tmp_path / "train.jsonl"
    data.write_text("{}\n")
    err = refusal(["train", "--stage", "seqd", "--model", "tiny", "--data", str(data),
                   "--output-dir", str(tmp_path / "out")], capsys)
    assert err.startswith(f"rcd train: {data}:1: no 'prompt' (expected keys 'prompt' and ")


# --- unknown words ----------------------------------------------------------------------------

def test_unknown_words_are_found_in_order_once_each():
    tokenizer = build_tiny_tokenizer(SYMBOLS)
    assert unknown_words(tokenizer, ["a zz b qq", "zz c x"]) == ["zz", "qq", "x"]
    assert unknown_words(tokenizer, ["a b c"]) == []


def test_unknown_words_warn_once_naming_a_few_and_the_count():
    tokenizer = build_tiny_tokenizer(SYMBOLS)
    words = [f"w{i}" for i in range(7)]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert check_known_words(tokenizer, ["a " + " ".join(words)]) == words
    assert len(caught) == 1 and caught[0].category is UnknownWordsWarning
    assert str(caught[0].message) == (
        "7 words are not in the tokenizer's vocabulary and become [UNK]: 'w0', 'w1', 'w2', "
        "'w3', 'w4' and 2 more")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert check_known_words(tokenizer, ["a b"]) == []  # nothing unknown: no warning


def test_unknown_words_can_be_refused():
    tokenizer = build_tiny_tokenizer(SYMBOLS)
    with pytest.raises(ValueError, match="1 word is not in the tokenizer's vocabulary and "
                                         "becomes"):
        check_known_words(tokenizer, ["a hello"], refuse=True)
    assert describe_unknown_words(["x"], None) == (
        "1 word is not in the tokenizer's vocabulary and becomes the unknown token: 'x'")


def test_generate_warns_about_unknown_prompt_words(checkpoint, capsys):
    assert main(["generate", "--model", checkpoint, "--prompt", "a hello b", "--gen-length", "4",
                 "--quiet"]) == 0
    err = capsys.readouterr().err
    assert ("rcd generate: warning: 1 word is not in the tokenizer's vocabulary and becomes "
            "[UNK]: 'hello'") in err


def test_generate_can_refuse_unknown_prompt_words(checkpoint, monkeypatch, capsys):
    monkeypatch.setattr(generation_module, "generate", forbid)
    err = refusal(["generate", "--model", checkpoint, "--prompt", "a hello", "--unknown-words",
                   "refuse"], capsys)
    assert "--prompt: 1 word is not in the tokenizer's vocabulary" in err
    assert "(use words of the model's vocabulary, or --unknown-words warn)" in err


# --- the safety net ---------------------------------------------------------------------------

@pytest.mark.parametrize("error, shown", [
    (ValueError("gen_length 7\n is odd"), "rcd generate: gen_length 7 is odd (RCD_DEBUG=1 "
                                          "shows the traceback)"),
    (FileNotFoundError(2, "No such file or directory", "/x/y"),
     "rcd generate: No such file or directory: /x/y (RCD_DEBUG=1 shows the traceback)"),
    (UsageError("--x 3: too big (use 2)"), "rcd generate: --x 3: too big (use 2)"),
])
def test_user_errors_become_one_line(monkeypatch, capsys, error, shown):
    def fail(args):
        raise error

    monkeypatch.setattr(generate_command, "run", fail)
    assert main(["generate", "--model", "m", "--prompt", "p"]) == 2
    assert capsys.readouterr().err == shown + "\n"


def test_bugs_keep_their_traceback_and_debug_shows_user_errors_too(monkeypatch):
    def bug(args):
        raise RuntimeError("a bug")

    monkeypatch.setattr(generate_command, "run", bug)
    with pytest.raises(RuntimeError, match="a bug"):
        main(["generate", "--model", "m", "--prompt", "p"])

    def wrong(args):
        raise ValueError("wrong value")

    monkeypatch.setattr(generate_command, "run", wrong)
    monkeypatch.setenv("RCD_DEBUG", "1")
    with pytest.raises(ValueError, match="wrong value"):
        main(["generate", "--model", "m", "--prompt", "p"])


def test_argparse_errors_are_one_line(capsys):
    assert main(["generate", "--prompt", "a"]) == 2
    assert capsys.readouterr().err == ("rcd generate: the following arguments are required: "
                                       "--model (see `rcd generate --help`)\n")
    assert main(["nonsense"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("rcd: argument COMMAND: invalid choice: 'nonsense'") and \
        err.count("\n") == 1


def test_help_exits_zero(capsys):
    assert main(["--help"]) == 0
    assert "generate" in capsys.readouterr().out


def test_one_line_of_an_os_error_names_the_path():
    assert one_line(PermissionError(13, "Permission denied", "/root/x")) == \
        "Permission denied: /root/x"
    assert one_line(FileNotFoundError("training data 'x': no such file")) == \
        "training data 'x': no such file"


# --- real processes ---------------------------------------------------------------------------

def rcd_script() -> str:
    beside = Path(sys.executable).with_name("rcd")
    found = str(beside) if beside.exists() else shutil.which("rcd")
    if found is None:
        pytest.skip("the rcd console script is not installed")
    return found


def test_help_imports_neither_torch_nor_transformers():
    code = ("import sys; from rcd_ext.cli import build_parser; build_parser().format_help(); "
            "print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120, check=True).stdout
    assert out.strip() == "[]"


def test_console_script_refusals_are_one_line_and_exit_2(tmp_path, blocker):
    """One real `rcd` process per command, started together (each imports torch)."""
    environment = {**os.environ, "HF_HUB_OFFLINE": "1"}
    commands = {
        "generate": (["generate", "--model", "/nonexistent", "--prompt", "a"],
                     "rcd generate: --model /nonexistent: no such directory"),
        "demo": (["demo", "--task", "bogus", "--out", str(tmp_path / "demo")],
                 "rcd demo: --task bogus: unknown task 'bogus'"),
        "train": (["train", "--stage", "seqd", "--model", "tiny", "--data",
                   "task:coupled_choices", "--output-dir", str(blocker / "out")],
                  f"rcd train: --output-dir {blocker / 'out'}: {blocker} is not a directory"),
    }
    script = rcd_script()
    processes = {name: subprocess.Popen([script, *argv], stdout=subprocess.PIPE,
                                        stderr=subprocess.PIPE, text=True, env=environment,
                                        cwd=tmp_path)
                 for name, (argv, _) in commands.items()}
    for name, process in processes.items():
        out, err = process.communicate(timeout=300)
        assert process.returncode == 2, (name, err)
        assert err.count("\n") == 1 and err.startswith(commands[name][1]), (name, err)
        assert out == ""
