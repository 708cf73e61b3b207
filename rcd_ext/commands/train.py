"""`rcd train`: stage 1 (SeqD SFT, the reference) or stage 2 (RCD) on the stock HF Trainer.

    rcd train --stage seqd --model tiny --data task:pointer_chasing --output-dir ref/
    rcd train --stage rcd --reference ref/ --data task:pointer_chasing --output-dir rcd/
    rcd train --stage rcd --model base/ --reference ref/ --data train.jsonl --output-dir out/ \
              --residual-source previous-step --bf16 --gradient-accumulation-steps 4
    rcd train --stage seqd --model tiny --data train.jsonl --test test.jsonl --output-dir ref/
              # a tiny dLLM whose tokenizer and context come from your data (docs/your-own-data.md)

Multi-GPU: `accelerate launch -m rcd_ext train ...` or
`torchrun --nproc_per_node 8 -m rcd_ext train ... --fsdp "full_shard auto_wrap"`.

Every argument is checked before a model loads or trains (`check_arguments`): a wrong one is
one line on stderr and exit code 2; so is every problem of a JSONL file (`file:line: what`),
found before any training.
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings
from pathlib import Path
from typing import Any

from rcd_ext.commands._model_source import resolve_model_source
from rcd_ext.commands._task_names import check_task_name
from rcd_ext.commands._usage import (
    UsageError,
    check_input_file,
    check_output_dir,
    nonnegative_float,
    nonnegative_int,
    positive_float,
    positive_int,
)
from rcd_ext.options import DiffusionArguments, add_arguments, needs_reference_model, values_of


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register `rcd train`."""
    parser = subparsers.add_parser(
        "train", help="train a SeqD reference (stage seqd) or an RCD target (stage rcd)",
        description="Two-stage RCD training (Algorithm 1) on transformers.Trainer.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--model", default=None,
                        help="checkpoint to train; 'tiny' builds a fresh built-in tiny dLLM for "
                             "task:NAME or a .jsonl file (default for stage rcd: the reference)")
    parser.add_argument("--reference", default=None,
                        help="frozen reference checkpoint (stage rcd)")
    parser.add_argument("--data", required=True,
                        help="a .jsonl file, a saved HF dataset directory, or task:NAME[:k=v,..]")
    parser.add_argument("--output-dir", required=True)
    parser.add_argument("--no-eos", action="store_true",
                        help="do not append EOS to JSONL/dataset responses")
    parser.add_argument("--trust-remote-code", action="store_true")
    objective = parser.add_argument_group("objective (DiffusionArguments)")
    add_arguments(objective, DiffusionArguments,
                  overrides={"stage": {"required": True, "default": argparse.SUPPRESS}})
    tiny = parser.add_argument_group("fresh tiny model (--model tiny)")
    tiny.add_argument("--hidden-size", type=positive_int, default=64)
    tiny.add_argument("--layers", type=positive_int, default=2)
    tiny.add_argument("--heads", type=positive_int, default=4)
    tiny.add_argument("--tokenize", choices=TOKEN_UNITS, default="words",
                      help="with a .jsonl file: tokens are whitespace words or characters")
    tiny.add_argument("--test", default=None,
                      help="a test .jsonl file: its tokens the model will never see are "
                           "reported, its longest row counts for the context")
    hf = parser.add_argument_group("Trainer (transformers.TrainingArguments)")
    hf.add_argument("--max-steps", type=positive_int, default=1000)
    hf.add_argument("--batch-size", type=positive_int, default=128, help="per device")
    hf.add_argument("--gradient-accumulation-steps", type=positive_int, default=1)
    hf.add_argument("--learning-rate", type=positive_float, default=3e-3)
    hf.add_argument("--warmup-steps", type=nonnegative_int, default=100)
    hf.add_argument("--lr-scheduler", default="constant_with_warmup")
    hf.add_argument("--weight-decay", type=nonnegative_float, default=0.01)
    hf.add_argument("--save-steps", type=positive_int, default=500)
    hf.add_argument("--logging-steps", type=positive_int, default=50)
    hf.add_argument("--seed", type=int, default=0)
    hf.add_argument("--bf16", action="store_true")
    hf.add_argument("--fsdp", default="", help="TrainingArguments.fsdp, e.g. 'full_shard "
                                               "auto_wrap'")
    hf.add_argument("--fsdp-config", default=None, help="TrainingArguments.fsdp_config (JSON)")
    hf.add_argument("--resume", nargs="?", const=True, default=None,
                    help="resume from the last checkpoint in --output-dir, or from PATH")
    hf.add_argument("--progress", action="store_true", help="tqdm bar (logs always print)")
    hf.add_argument("--threads", type=positive_int, default=None,
                    help="torch CPU threads (default: the cores idle now, at least 1; measured "
                         "in docs/your-own-data.md)")
    parser.set_defaults(func=run)
    return parser


TOKEN_UNITS = ("words", "chars")  # rcd_ext.models.tiny_tokenizer.TOKEN_UNITS, not imported


def idle_cores() -> int:
    """The default --threads: cores minus the 1-minute load average, at least 1.

    Measured (docs/your-own-data.md, "Threads"): on an idle 2-core machine 2 threads trained
    the tiny model 1.4x faster than 1; with the cores loaded by other processes 2 threads were
    up to 10x slower (OpenMP workers waiting for each other), so busy cores are left alone.
    """
    cores = os.cpu_count() or 1
    try:
        busy = os.getloadavg()[0]
    except OSError:  # not on this platform
        return 1
    return max(1, min(cores, cores - round(busy)))


def check_data(spec: str) -> None:
    """UsageError unless --data is task:KNOWN_NAME[...] or an existing file or folder."""
    if spec.startswith("task:"):
        check_task_name("--data", spec, spec.split(":", 2)[1])
        return
    if not Path(spec).expanduser().exists():
        raise UsageError(f"--data {spec}: no such file or directory (give a .jsonl file, a "
                         "saved HF dataset folder or task:NAME)")


def check_numbers(args: argparse.Namespace) -> None:
    """UsageError for numbers argparse cannot judge one at a time."""
    if args.model == "tiny" and args.hidden_size % args.heads:
        raise UsageError(f"--hidden-size {args.hidden_size} is not a multiple of --heads "
                         f"{args.heads} (choose sizes that divide)")


def check_scheduler(name: str) -> None:
    """UsageError unless transformers knows the --lr-scheduler `name`."""
    from transformers.trainer_utils import SchedulerType

    known = [kind.value for kind in SchedulerType]
    if name not in known:
        raise UsageError(f"--lr-scheduler {name}: unknown schedule (use one of "
                         f"{', '.join(known)})")


def check_arguments(args: argparse.Namespace) -> tuple[str, str | None]:
    """Every check that needs no model: (model source or 'tiny', reference source or None)."""
    if needs_reference_model(args.stage, args.residual_source) and not args.reference:
        raise UsageError(f"--stage rcd --residual-source {args.residual_source} needs "
                         "--reference (give the stage-1 checkpoint, or --residual-source self, "
                         "dirichlet or unroll)")
    model = args.model or (args.reference if args.stage == "rcd" else None)
    if model is None:
        raise UsageError("--model is required (a checkpoint, or 'tiny' with --data task:NAME "
                         "or a .jsonl file)")
    check_data(args.data)
    if model == "tiny" and not args.data.startswith("task:") and Path(args.data).is_dir():
        raise UsageError(f"--model tiny --data {args.data}: a fresh tiny model builds its "
                         "vocabulary from a .jsonl file or task:NAME, not a dataset folder "
                         "(export it as JSONL)")
    if args.test and args.data.startswith("task:"):
        raise UsageError("--test reports the tokens of a .jsonl test file that --data lacks; "
                         "a task:NAME keeps its own test split (drop --test)")
    check_numbers(args)
    check_output_dir("--output-dir", args.output_dir)
    if isinstance(args.resume, str) and not Path(args.resume).expanduser().is_dir():
        raise UsageError(f"--resume {args.resume}: no such checkpoint folder (give a "
                         "checkpoint-N folder, or --resume alone for the last in --output-dir)")
    option = "--model" if args.model else "--reference"
    model_source = model if model == "tiny" else resolve_model_source(option, model)
    reference_source = None
    if args.reference and args.stage == "rcd":
        reference_source = resolve_model_source("--reference", args.reference)
    check_scheduler(args.lr_scheduler)  # it imports transformers
    if args.resume:  # a torn or missing checkpoint is named before the model loads
        from rcd_ext.training.checkpoint_integrity import resolve_resume

        try:
            resolve_resume(args.resume, args.output_dir, say=False)
        except ValueError as error:
            raise UsageError(f"--resume: {error}") from None
    return model_source, reference_source


def read_rows(option: str, path: str) -> list[Any]:
    """The checked rows of a JSONL file, or UsageError `file:line: what (fix)`."""
    from rcd_ext.training.jsonl_rows import DataError, read_text_rows

    check_input_file(option, path)
    try:
        return read_text_rows(Path(path).expanduser())
    except DataError as error:
        raise UsageError(str(error)) from None


def check_data_rows(args: argparse.Namespace) -> tuple[list[Any] | None, list[Any]]:
    """(training rows of a .jsonl --data or None, --test rows or []): bad lines end here."""
    is_jsonl = not args.data.startswith("task:") and Path(args.data).expanduser().is_file()
    rows = read_rows("--data", args.data) if is_jsonl else None
    return rows, read_rows("--test", args.test) if args.test else []


def say_warning(message: Any, *_: Any, **__: Any) -> None:
    """`warnings.showwarning` for the CLI: one line `rcd train: warning: ...`."""
    print(f"rcd train: warning: {message}", file=sys.stderr)


def tiny_for_rows(args: argparse.Namespace, rows: list[Any], test_rows: list[Any]
                  ) -> tuple[Any, Any]:
    """A fresh tiny dLLM for the JSONL rows, its sizes said on stdout."""
    from rcd_ext.training.own_data import tiny_model_for_rows, unseen_test_tokens

    model, tokenizer = tiny_model_for_rows(
        rows, args.tokenize, extra_rows=test_rows, hidden_size=args.hidden_size,
        layers=args.layers, heads=args.heads, seed=args.seed, append_eos=not args.no_eos)
    print(f"tiny dLLM for {args.data}: {len(tokenizer) - 5} {args.tokenize} + 5 special "
          f"tokens, context {model.config.max_position_embeddings} tokens (the longest row)")
    if test_rows:
        _, report = unseen_test_tokens(tokenizer, test_rows, args.test)
        say_warning(report) if report else print(f"every token of {args.test} is in the "
                                                 "vocabulary")
    return model, tokenizer


def run(args: argparse.Namespace) -> int:
    model_source, reference_source = check_arguments(args)
    rows, test_rows = check_data_rows(args)
    import torch

    from rcd_ext.training import build_tiny_model
    from rcd_ext.training.trainer import load_trainable

    threads = args.threads or idle_cores()
    torch.set_num_threads(threads)
    if not args.threads:
        print(f"training with {threads} thread{'s' if threads > 1 else ''} (the idle cores; "
              "--threads sets it)")
    diffusion = DiffusionArguments(**values_of(args, DiffusionArguments))
    if model_source == "tiny" and rows is not None:
        model, tokenizer = tiny_for_rows(args, rows, test_rows)
    elif model_source == "tiny":
        model, tokenizer = build_tiny_model(args.data, args.hidden_size, args.layers, args.heads,
                                            seed=args.seed)
    else:
        model, tokenizer = load_trainable(model_source, args.trust_remote_code)
    if test_rows and model_source != "tiny":
        from rcd_ext.training.own_data import unseen_test_tokens

        _, report = unseen_test_tokens(tokenizer, test_rows, args.test)
        if report:
            say_warning(report)
    reference = None
    if reference_source:
        reference, reference_tokenizer = load_trainable(reference_source, args.trust_remote_code)
        from rcd_ext.training import check_same_tokenizer

        check_same_tokenizer(model, reference, tokenizer, reference_tokenizer)
    trainer = train_reporting_data_errors(
        data=args.data, output_dir=args.output_dir, diffusion=diffusion, model=model,
        tokenizer=tokenizer, reference=reference, resume_from_checkpoint=args.resume,
        append_eos=not args.no_eos, max_steps=args.max_steps,
        per_device_train_batch_size=args.batch_size,
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        learning_rate=args.learning_rate, warmup_steps=args.warmup_steps,
        lr_scheduler_type=args.lr_scheduler, weight_decay=args.weight_decay,
        save_steps=args.save_steps, logging_steps=args.logging_steps, seed=args.seed,
        bf16=args.bf16, fsdp=args.fsdp, fsdp_config=args.fsdp_config,
        disable_tqdm=not args.progress)
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    if trainer.is_world_process_zero():
        last = f", last logged loss {losses[-1]:.4f}" if losses else ""
        print(f"saved {args.stage} model to {args.output_dir} after "
              f"{trainer.state.global_step} steps{last}")
    return 0


def train_reporting_data_errors(**arguments: Any) -> Any:
    """`rcd_ext.training.train`, with a row too long for the model as a one-line UsageError and
    unknown tokens as one warning line (both found before the first training step)."""
    from rcd_ext.models.tiny_tokenizer import UnknownWordsWarning
    from rcd_ext.training import train
    from rcd_ext.training.jsonl_rows import DataError

    with warnings.catch_warnings():
        warnings.simplefilter("always", UnknownWordsWarning)
        warnings.showwarning = say_warning
        try:
            return train(**arguments)
        except DataError as error:
            raise UsageError(str(error)) from None
