"""`rcd demo`: SeqD vs RCD on held-out problems, with a table, a plot and a plain verdict.

    rcd demo                    # the shipped checkpoints, < 30 s on 2 CPU cores
    rcd demo --train            # train the three models first (< 3 min on 2 CPU cores)
    rcd demo --out DIR          # DIR/results.json and DIR/demo.png (default ./rcd-demo)
    rcd demo --task pointer_chasing   # another synthetic task (trains its models first)
    rcd demo --data train.jsonl --test test.jsonl [--size tiny|small|medium]
                                # your own data: trains the three models on it, judges them on
                                # every test row (docs/your-own-data.md)

Every argument is checked before a model loads or trains (`check_arguments`): a wrong one is
one line on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from rcd_ext.commands._task_names import check_task_name
from rcd_ext.commands._usage import (
    UsageError,
    check_input_file,
    check_output_dir,
    positive_int,
    probability,
)

DATA_SIZES = ("tiny", "small", "medium")  # rcd_ext.demo.own_data.SIZES, not imported
TOKEN_UNITS = ("words", "chars")  # rcd_ext.models.tiny_tokenizer.TOKEN_UNITS, not imported


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register `rcd demo`."""
    parser = subparsers.add_parser(
        "demo", help="SeqD vs RCD on held-out problems: table, plot and verdict",
        description="Decode held-out problems of a synthetic task with SeqD and RCD (warm "
                    "and cold) across step budgets and confidence thresholds.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--out", default="rcd-demo", help="directory for results.json, demo.png")
    parser.add_argument("--task", default="coupled_choices",
                        help="synthetic task (rcd_ext.tasks); the shipped checkpoints know "
                             "only coupled_choices, another task trains its models first")
    parser.add_argument("--train", action="store_true",
                        help="train the models with the recipe instead of loading the shipped")
    parser.add_argument("--checkpoints", default=None,
                        help="load reference/, seqd/, rcd/ from this directory")
    parser.add_argument("--save-checkpoints", default=None,
                        help="with --train: keep the trained models here")
    parser.add_argument("--test-size", type=positive_int, default=500)
    parser.add_argument("--steps", type=positive_int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--thresholds", type=probability, nargs="+", default=[0.5, 0.7, 0.9])
    parser.add_argument("--stage1-steps", type=positive_int, default=1000)
    parser.add_argument("--stage2-steps", type=positive_int, default=500)
    parser.add_argument("--batch-size", type=positive_int, default=128)
    parser.add_argument("--threads", type=positive_int, default=1,
                        help="torch threads (a model this small gains nothing from more)")
    own = parser.add_argument_group("your own data (--data, --test)")
    own.add_argument("--data", default=None,
                     help="training .jsonl ({\"prompt\", \"response\"} rows): train the three "
                          "models on it instead of a synthetic task")
    own.add_argument("--test", default=None, help="test .jsonl: every row is decoded")
    own.add_argument("--size", choices=DATA_SIZES, default="small",
                     help="model and training budget (small: the built-in demo's recipe)")
    own.add_argument("--tokenize", choices=TOKEN_UNITS, default="words",
                     help="tokens are whitespace words or characters")
    parser.set_defaults(func=run)
    return parser


def check_steps(args: argparse.Namespace) -> None:
    """UsageError unless every --steps fits the answer of --task (imports the tasks: last)."""
    from rcd_ext.tasks import get_task

    answer_length = get_task(args.task).answer_length
    too_many = [steps for steps in args.steps if steps > answer_length]
    if too_many:
        raise UsageError(f"--steps {too_many[0]}: {args.task} answers have {answer_length} "
                         f"tokens and each step unmasks at least one (use --steps from 1 to "
                         f"{answer_length})")


CHECKPOINT_NAMES = ("reference", "seqd", "rcd")  # rcd_ext.demo.checkpoints.NAMES, not imported


def check_checkpoints(args: argparse.Namespace) -> None:
    """UsageError for a --checkpoints folder that cannot be loaded, or flags that contradict."""
    if args.train and args.checkpoints:
        raise UsageError("--checkpoints loads models and --train makes them (give one; to keep "
                         "the trained models use --save-checkpoints)")
    if args.save_checkpoints:
        check_output_dir("--save-checkpoints", args.save_checkpoints)
    if not args.checkpoints:
        return
    folder = Path(args.checkpoints).expanduser()
    if not folder.is_dir():
        raise UsageError(f"--checkpoints {args.checkpoints}: no such directory (give a folder "
                         f"holding {', '.join(CHECKPOINT_NAMES)}, or use --train)")
    missing = [name for name in CHECKPOINT_NAMES if not (folder / name / "config.json").is_file()]
    if missing:
        raise UsageError(f"--checkpoints {args.checkpoints}: no {', '.join(missing)} checkpoint "
                         f"in it (each of {', '.join(CHECKPOINT_NAMES)} must be a "
                         "save_pretrained folder; use --train to make them)")


def check_data_files(args: argparse.Namespace) -> None:
    """UsageError for --data / --test that are missing, unreadable or have a bad row."""
    from rcd_ext.training.jsonl_rows import DataError, read_text_rows

    if not args.test:
        raise UsageError("--data needs --test (a .jsonl file of held-out rows to judge on)")
    if args.train or args.checkpoints:
        raise UsageError("--data trains the three models on your data (drop --train and "
                         "--checkpoints; --save-checkpoints keeps them)")
    for option in ("--data", "--test"):
        path = getattr(args, option[2:])
        check_input_file(option, path)
        try:
            read_text_rows(path)
        except DataError as error:
            raise UsageError(str(error)) from None


def check_arguments(args: argparse.Namespace) -> None:
    """Every check that needs no model; the numbers are checked by argparse already."""
    if args.data or args.test:
        if not args.data:
            raise UsageError("--test needs --data (the training .jsonl)")
        check_output_dir("--out", args.out)
        if args.save_checkpoints:
            check_output_dir("--save-checkpoints", args.save_checkpoints)
        check_data_files(args)
        return
    check_task_name("--task", args.task, args.task)
    check_output_dir("--out", args.out)
    check_checkpoints(args)
    check_steps(args)


def run(args: argparse.Namespace) -> int:
    check_arguments(args)
    if args.data:
        from rcd_ext.demo.own_data import run_data_demo

        run_data_demo(args.out, args.data, args.test, size=args.size, unit=args.tokenize,
                      steps=tuple(args.steps), thresholds=tuple(args.thresholds),
                      threads=args.threads, save_checkpoints=args.save_checkpoints)
        return 0
    from rcd_ext.demo import run_demo

    run_demo(args.out, train=args.train, checkpoint_dir=args.checkpoints,
             save_checkpoints=args.save_checkpoints, test_size=args.test_size,
             steps=tuple(args.steps), thresholds=tuple(args.thresholds),
             stage1=args.stage1_steps, stage2=args.stage2_steps, batch_size=args.batch_size,
             threads=args.threads, task=args.task)
    return 0
