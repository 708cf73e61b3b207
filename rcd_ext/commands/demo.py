"""`rcd demo`: SeqD vs RCD on held-out problems, with a table, a plot and a plain verdict.

    rcd demo                    # the shipped checkpoints, < 30 s on 2 CPU cores
    rcd demo --train            # train the three models first (< 3 min on 2 CPU cores)
    rcd demo --out DIR          # DIR/results.json and DIR/demo.png (default ./rcd-demo)
    rcd demo --task pointer_chasing   # another synthetic task (trains its models first)
"""

from __future__ import annotations

import argparse


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
    parser.add_argument("--test-size", type=int, default=500)
    parser.add_argument("--steps", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--thresholds", type=float, nargs="+", default=[0.5, 0.7, 0.9])
    parser.add_argument("--stage1-steps", type=int, default=1000)
    parser.add_argument("--stage2-steps", type=int, default=500)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (a model this small gains nothing from more)")
    parser.set_defaults(func=run)
    return parser


def run(args: argparse.Namespace) -> int:
    from rcd_ext.demo import run_demo

    run_demo(args.out, train=args.train, checkpoint_dir=args.checkpoints,
             save_checkpoints=args.save_checkpoints, test_size=args.test_size,
             steps=tuple(args.steps), thresholds=tuple(args.thresholds),
             stage1=args.stage1_steps, stage2=args.stage2_steps, batch_size=args.batch_size,
             threads=args.threads, task=args.task)
    return 0
