"""The demo, end to end: models -> decoding sweep -> table, plot, verdict, results.json."""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from rcd_ext.demo import checkpoints, report
from rcd_ext.demo.evaluate import sweep

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
    """
    previous_threads = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        return _run(Path(out_dir), train, checkpoint_dir, save_checkpoints, test_size, steps,
                    thresholds, stage1, stage2, batch_size, task)
    finally:
        torch.set_num_threads(previous_threads)


def _run(out: Path, train: bool, checkpoint_dir: str | Path | None,
         save_checkpoints: str | Path | None, test_size: int, steps: tuple[int, ...],
         thresholds: tuple[float, ...], stage1: int, stage2: int,
         batch_size: int, task_name: str) -> list[dict[str, Any]]:
    from rcd_ext.tasks import get_task, task_names

    if task_name not in task_names():
        raise ValueError(f"unknown task {task_name!r}; known: {', '.join(task_names())}")
    if task_name != SHIPPED_TASK and not checkpoint_dir and not train:
        print(f"the shipped checkpoints were trained on {SHIPPED_TASK}: training for "
              f"{task_name}")
        train = True
    began = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    source = Path(checkpoint_dir) if checkpoint_dir else checkpoints.SHIPPED
    scratch = None
    if checkpoint_dir and not train and not checkpoints.shipped_available(source):
        raise FileNotFoundError(f"{source} lacks one of {checkpoints.NAMES} (each a "
                                "save_pretrained directory); use --train to make them")
    if train or not checkpoints.shipped_available(source):
        if not train:
            print(f"no checkpoints in {source}: training them (about 2 minutes on 2 cores)")
        target = Path(save_checkpoints) if save_checkpoints else Path(
            scratch := tempfile.mkdtemp(prefix="rcd-demo-"))
        print(f"training: stage 1 {stage1} steps, stage 2 {stage2} steps (SeqD and RCD), "
              f"batch {batch_size}")
        checkpoints.train_checkpoints(target, f"task:{task_name}", stage1, stage2, batch_size)
        for leftover in target.glob("*/training_args.bin"):
            leftover.unlink()  # a pickle of TrainingArguments; nothing here needs it
        source = target
    models = checkpoints.load_checkpoints(source)
    task = get_task(task_name)
    test = task.test_set(test_size, seed=0)
    print(f"decoding {len(test)} held-out {task_name} problems (answer of {task.answer_length} "
          f"tokens, one block) with SeqD and RCD (warm: one reference forward first; cold: [M])")
    records = sweep({"seqd": models["seqd"], "rcd": models["rcd"]}, task, test,
                    steps=list(steps), thresholds=list(thresholds),
                    reference=models["reference"])
    (out / "results.json").write_text(json.dumps(records, indent=1) + "\n")
    print(report.table(records))
    print()
    for line in report.verdict(records):
        print(line)
    try:
        report.plot(records, out / "demo.png",
                    f"{task_name}: {len(test)} held-out problems, equal training budget")
    except ImportError:  # matplotlib is an extra: the table and results.json still stand
        print("matplotlib is not installed (pip install 'rcd-ext[plot]'): no demo.png")
    if scratch:
        shutil.rmtree(scratch, ignore_errors=True)
    print(f"\nwrote {out / 'results.json'} and {out / 'demo.png'} "
          f"({time.perf_counter() - began:.0f}s)")
    return records
