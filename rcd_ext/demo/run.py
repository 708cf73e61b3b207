"""The demo, end to end: models -> decoding sweep -> table, plot, verdict, results.json."""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from rcd_ext.demo import checkpoints, report
from rcd_ext.demo.evaluate import sweep
from rcd_ext.demo.results import checkpoints_used, device_of, results_document, write_results
from rcd_ext.demo.validation import check_against_task, check_run_inputs

SHIPPED_TASK = "coupled_choices"  # the task the shipped checkpoints were trained on


def run_demo(out_dir: str | Path, *, train: bool = False, checkpoint_dir: str | Path | None = None,
             save_checkpoints: str | Path | None = None, test_size: int = 500,
             steps: tuple[int, ...] = (1, 2, 4, 8), thresholds: tuple[float, ...] = (0.5, 0.7, 0.9),
             stage1: int = 1000, stage2: int = 500, batch_size: int = 128,
             threads: int | None = None, task: str = SHIPPED_TASK) -> list[dict[str, Any]]:
    """Run the demo and return its records (also written to `out_dir`/results.json).

    Args:
        train: train the three models with the recipe instead of loading checkpoints
            (`stage1`, `stage2` steps, `batch_size`); also done when none are shipped.
        checkpoint_dir: load the models from here instead of the shipped ones.
        save_checkpoints: keep the freshly trained models here.
        test_size: held-out problems decoded (the task's fixed test split, seed 0).
        task: a synthetic task (`rcd_ext.tasks.task_names()`); the shipped checkpoints know
            only coupled_choices, so another task trains (or loads `checkpoint_dir`).

    Raises ValueError naming the parameter for a bad input, before any model loads or trains.
    """
    from rcd_ext.tasks import task_names

    check_run_inputs(test_size=test_size, steps=steps, thresholds=thresholds, stage1=stage1,
                     stage2=stage2, batch_size=batch_size, threads=threads)
    if task not in task_names():
        raise ValueError(f"unknown task {task!r}; known: {', '.join(task_names())}")
    previous_threads = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        return _run(Path(out_dir), train, checkpoint_dir, save_checkpoints, test_size, steps,
                    thresholds, stage1, stage2, batch_size, task)
    finally:
        torch.set_num_threads(previous_threads)


def _test_problems(task_name: str, test_size: int, steps: tuple[int, ...]) -> tuple[Any, list]:
    """(task, held-out problems): cheap, so bad sizes surface before any training."""
    from rcd_ext.tasks import get_task

    task = get_task(task_name)
    check_against_task(task, steps)
    try:
        return task, task.test_set(test_size, seed=0)
    except ValueError as error:
        raise ValueError(f"test_size {test_size} is too large: {error}") from None


def _run(out: Path, train: bool, checkpoint_dir: str | Path | None,
         save_checkpoints: str | Path | None, test_size: int, steps: tuple[int, ...],
         thresholds: tuple[float, ...], stage1: int, stage2: int,
         batch_size: int, task_name: str) -> list[dict[str, Any]]:
    task, test = _test_problems(task_name, test_size, steps)
    if task_name != SHIPPED_TASK and not checkpoint_dir and not train:
        print(f"the shipped checkpoints were trained on {SHIPPED_TASK}: training for "
              f"{task_name}")
        train = True
    began = time.perf_counter()
    source = Path(checkpoint_dir) if checkpoint_dir else checkpoints.SHIPPED
    if checkpoint_dir and not train and not checkpoints.shipped_available(source):
        raise FileNotFoundError(f"{source} lacks one of {checkpoints.NAMES} (each a "
                                "save_pretrained directory); use --train to make them")
    _writable_directory(out)
    asked_to_train, train = train, train or not checkpoints.shipped_available(source)
    scratch = None if save_checkpoints or not train else Path(
        tempfile.mkdtemp(prefix="rcd-demo-"))
    try:
        if train:
            source = _train(Path(save_checkpoints) if save_checkpoints else scratch, source,
                            task_name, stage1, stage2, batch_size, asked_to_train)
        models = checkpoints.load_checkpoints(source)
    finally:
        if scratch:
            shutil.rmtree(scratch, ignore_errors=True)
    print(f"decoding {len(test)} held-out {task_name} problems (answer of {task.answer_length} "
          f"tokens, one block) with SeqD and RCD (warm: one reference forward first; cold: [M])")
    records = sweep({"seqd": models["seqd"], "rcd": models["rcd"]}, task, test,
                    steps=list(steps), thresholds=list(thresholds),
                    reference=models["reference"])
    document = results_document(
        records, task=task_name, test_size=len(test),
        checkpoints=checkpoints_used(source, checkpoints.SHIPPED, kept=scratch is None),
        training=dict(stage1_steps=stage1, stage2_steps=stage2, batch_size=batch_size)
        if train else None, device=device_of(models["rcd"]))
    written = [write_results(out / "results.json", document)]
    print(report.table(records))
    print()
    for line in report.verdict(records):
        print(line)
    written_png = _plot(records, out / "demo.png",
                        f"{task_name}: {len(test)} held-out problems, equal training budget")
    print(f"\n{_written_line(written + [written_png] if written_png else written)} "
          f"({time.perf_counter() - began:.0f}s)")
    return records


def _writable_directory(out: Path) -> None:
    """Make `out` or raise ValueError now, not after minutes of training and decoding."""
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise ValueError(f"out_dir {str(out)!r} cannot be created: {error.strerror}") from None
    if not os.access(out, os.W_OK | os.X_OK):
        raise ValueError(f"out_dir {str(out)!r} is not writable (pick another directory)")


def _train(target: Path, source: Path, task_name: str, stage1: int, stage2: int,
           batch_size: int, asked: bool) -> Path:
    """Train the three checkpoints into `target` and return it."""
    if not asked and not checkpoints.shipped_available(source):
        print(f"no checkpoints in {source}: training them (about 2 minutes on 2 cores)")
    print(f"training: stage 1 {stage1} steps, stage 2 {stage2} steps (SeqD and RCD), "
          f"batch {batch_size}")
    checkpoints.train_checkpoints(target, f"task:{task_name}", stage1, stage2, batch_size)
    for leftover in target.glob("*/training_args.bin"):
        leftover.unlink()  # a pickle of TrainingArguments; nothing here needs it
    return target


def _plot(records: list[dict[str, Any]], path: Path, title: str) -> Path | None:
    """The PNG's path, or None (said on stdout) when matplotlib, an optional extra, is missing."""
    try:
        report.plot(records, path, title)
    except ImportError:
        stale = f"; the {path.name} there is from an earlier run" if path.exists() else ""
        print(f"matplotlib is not installed (pip install matplotlib): no {path.name} "
              f"written{stale}")
        return None
    return path


def _written_line(paths: list[Path]) -> str:
    """'wrote A and B', naming exactly the files this run wrote."""
    return "wrote " + " and ".join(str(path) for path in paths)
