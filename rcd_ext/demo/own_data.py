"""The demo on a user's JSONL data: `rcd demo --data` (trains) and `rcd eval --data` (loads).

`run_data_demo` trains the demo's three models with the recipe of `rcd_ext.demo.checkpoints`
on the training file (a fresh tiny dLLM whose tokenizer and context come from the data, at a
`SIZES` preset), then decodes every row of the test file with SeqD and RCD (warm and cold) at
every step budget and threshold. `evaluate_data` decodes the test file with models the user
already has. Both print the built-in demo's table and verdict plus a per-token accuracy table,
and write results.json (with a "data" entry and per-record "token_accuracy") and demo.png.
"""

from __future__ import annotations

import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from rcd_ext.demo import checkpoints, report
from rcd_ext.demo.data_task import build_test_set
from rcd_ext.demo.evaluate import VARIANTS, sweep_test_set
from rcd_ext.demo.results import device_of, results_document, write_results
from rcd_ext.demo.run import _plot, _writable_directory, _written_line
from rcd_ext.training.jsonl_rows import TextRow, read_text_rows

__all__ = ["SIZES", "evaluate_data", "run_data_demo"]

# model and training budget per --size; "small" is the built-in demo's recipe
SIZES: dict[str, dict[str, int]] = {
    "tiny": dict(hidden_size=32, layers=1, heads=2, stage1=60, stage2=30, batch_size=32),
    "small": dict(hidden_size=64, layers=2, heads=4, stage1=1000, stage2=500, batch_size=128),
    "medium": dict(hidden_size=128, layers=4, heads=4, stage1=3000, stage2=1500,
                   batch_size=128),
}


def _with_threads(threads: int | None, work: Any) -> Any:
    previous = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        return work()
    finally:
        torch.set_num_threads(previous)


def run_data_demo(out_dir: str | Path, train_file: str | Path, test_file: str | Path, *,
                  size: str = "small", unit: str = "words", steps: tuple[int, ...] = (1, 2, 4, 8),
                  thresholds: tuple[float, ...] = (0.5, 0.7, 0.9), threads: int | None = 1,
                  save_checkpoints: str | Path | None = None) -> list[dict[str, Any]]:
    """Train reference, SeqD and RCD on `train_file` and judge them on `test_file`.

    Raises DataError (`file:line: ...`) for a bad row of either file before any training.
    """
    if size not in SIZES:
        raise ValueError(f"size {size!r}: expected one of {', '.join(SIZES)}")
    read_text_rows(train_file)  # a bad training row is named now, not after minutes
    test_rows = read_text_rows(test_file)
    out = Path(out_dir)
    _writable_directory(out)
    return _with_threads(threads, lambda: _train_and_judge(
        out, Path(train_file), Path(test_file), test_rows, SIZES[size], unit, steps,
        thresholds, threads, save_checkpoints))


def _train_and_judge(out: Path, train_file: Path, test_file: Path, test_rows: list[TextRow],
                     budget: dict[str, int], unit: str, steps: tuple[int, ...],
                     thresholds: tuple[float, ...], threads: int | None,
                     save_checkpoints: str | Path | None) -> list[dict[str, Any]]:
    began = time.perf_counter()
    target = Path(save_checkpoints) if save_checkpoints else Path(
        tempfile.mkdtemp(prefix="rcd-demo-"))
    sizes = ["--hidden-size", str(budget["hidden_size"]), "--layers", str(budget["layers"]),
             "--heads", str(budget["heads"])]
    print(f"training on {train_file}: stage 1 {budget['stage1']} steps, stage 2 "
          f"{budget['stage2']} steps (SeqD and RCD), batch {budget['batch_size']}, tiny dLLM "
          f"d={budget['hidden_size']}, {budget['layers']} layers", flush=True)
    try:
        checkpoints.train_checkpoints(
            target, str(train_file), budget["stage1"], budget["stage2"], budget["batch_size"],
            tiny_options=(*sizes, "--tokenize", unit, "--test", str(test_file)), threads=threads)
        for leftover in target.glob("*/training_args.bin"):
            leftover.unlink()  # a pickle of TrainingArguments; nothing here needs it
        models = checkpoints.load_checkpoints(target)
        tokenizer = _tokenizer(target / "reference")
    finally:
        if not save_checkpoints:
            shutil.rmtree(target, ignore_errors=True)
    kept = {name: str((target / name).resolve()) for name in checkpoints.NAMES}
    data = {"train": str(train_file.resolve()), "test": str(test_file.resolve()),
            "tokenize": unit, "size": budget}
    return judge(models, models["reference"], tokenizer, test_rows, out,
                 steps=steps, thresholds=thresholds, data=data, began=began,
                 checkpoints_note=kept if save_checkpoints else "trained in this run, not kept",
                 training=dict(stage1_steps=budget["stage1"], stage2_steps=budget["stage2"],
                               batch_size=budget["batch_size"]))


def _tokenizer(path: Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path))


def evaluate_data(out_dir: str | Path, test_file: str | Path, model: str, *,
                  seqd_model: str | None = None, ref_model: str | None = None,
                  steps: tuple[int, ...] = (1, 2, 4, 8),
                  thresholds: tuple[float, ...] = (0.5, 0.7, 0.9), threads: int | None = 1
                  ) -> list[dict[str, Any]]:
    """Decode `test_file` with checkpoints the user has: RCD with `model` (warm only with
    `ref_model`), SeqD with `seqd_model` (default: `model` with residuals off)."""
    from rcd_ext.models.adapters import load_model

    test_rows = read_text_rows(test_file)
    out = Path(out_dir)
    _writable_directory(out)

    def work() -> list[dict[str, Any]]:
        began = time.perf_counter()
        rcd, tokenizer = load_model(model)
        models = {"rcd": rcd, "seqd": load_model(seqd_model)[0] if seqd_model else rcd}
        reference = load_model(ref_model)[0] if ref_model else None
        data = {"test": str(Path(test_file).resolve()), "model": model,
                "seqd_model": seqd_model or model, "ref_model": ref_model}
        return judge(models, reference, tokenizer, test_rows, out, steps=steps,
                     thresholds=thresholds, data=data, began=began, checkpoints_note=data,
                     training=None)

    return _with_threads(threads, work)


def judge(models: dict[str, nn.Module], reference: nn.Module | None, tokenizer: Any,
          test_rows: list[TextRow], out: Path, *, steps: tuple[int, ...],
          thresholds: tuple[float, ...], data: dict[str, Any], began: float,
          checkpoints_note: Any, training: dict[str, int] | None) -> list[dict[str, Any]]:
    """Decode, print the tables and the verdict, write results.json and demo.png."""
    from rcd_ext.training.own_data import unseen_test_tokens

    name = Path(data["test"]).name
    _, unseen = unseen_test_tokens(tokenizer, test_rows, data["test"])
    if unseen:  # such a row can still be decoded; its answer can never be right
        print(f"warning: {unseen}", file=sys.stderr, flush=True)
    context = getattr(models["rcd"].config, "max_position_embeddings", None)
    test_set = build_test_set(test_rows, tokenizer, name, max_length=context)
    variants = VARIANTS if reference is not None else [v for v in VARIANTS if v[1] != "warm"]
    print(f"decoding {test_set.size} rows of {name} ({len(test_set.groups)} groups of equal "
          f"lengths; each response then EOS) with SeqD and RCD"
          + (" (warm: one reference forward first; cold: [M])" if reference is not None
             else " cold (no reference model given: no warm start)"), flush=True)
    records = sweep_test_set(models, test_set, steps=list(steps), thresholds=list(thresholds),
                             reference=reference, variants=variants)
    document = results_document(records, task=f"jsonl:{name}", test_size=test_set.size,
                                checkpoints=checkpoints_note, training=training,
                                device=device_of(models["rcd"]))
    document["data"] = data
    written = [write_results(out / "results.json", document)]
    print(report.table(records), report.token_table(records), sep="\n\n")
    print()
    for line in report.verdict(records, init="warm" if reference is not None else "cold"):
        print(line)
    png = _plot(records, out / "demo.png", f"{name}: {test_set.size} held-out rows")
    print(f"\n{_written_line(written + [png] if png else written)} "
          f"({time.perf_counter() - began:.0f}s)")
    return records
