"""The demo's results.json: the records plus what is needed to trust or reproduce them.

Layout (one JSON object):
    {"task", "test_size", "checkpoints", "training", "device", "rcd_ext_version",
     "torch_version", "records": [{"method", "init", "steps", "threshold",
     "tokens_per_step", "forwards", "accuracy", "n"}, ...]}

`checkpoints` is "shipped", {"reference"|"seqd"|"rcd": absolute path}, or "trained in this
run, not kept"; `training` is null for loaded checkpoints, else the recipe's budget.
On a user's JSONL test file (`rcd_ext.demo.own_data`) the document also has "data" (the files
and settings) and every record "token_accuracy".
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from rcd_ext.atomic_files import write_json_atomic

DIGITS = 4  # 500 problems resolve 0.002; more digits would be float noise (0.29199999...)
ROUNDED = ("tokens_per_step", "forwards", "accuracy", "token_accuracy")


def rounded_record(record: dict[str, Any]) -> dict[str, Any]:
    """The record with its float measurements rounded to `DIGITS` decimals."""
    return {key: round(value, DIGITS) if key in ROUNDED else value
            for key, value in record.items()}


def device_of(model: nn.Module) -> str:
    """The device the model's weights are on, i.e. where decoding actually ran ("cpu")."""
    parameter = next(model.parameters(), None)
    return "cpu" if parameter is None else str(parameter.device)


def checkpoints_used(source: Path | None, shipped: Path, kept: bool) -> str | dict[str, str]:
    """ "shipped", each checkpoint's absolute path, or a note that they were not kept."""
    from rcd_ext.demo.checkpoints import NAMES

    if source is None or not kept:
        return "trained in this run, not kept"
    if source.resolve() == shipped.resolve():
        return "shipped"
    return {name: str((source / name).resolve()) for name in NAMES}


def results_document(records: list[dict[str, Any]], *, task: str, test_size: int,
                     checkpoints: str | dict[str, str], training: dict[str, int] | None,
                     device: str) -> dict[str, Any]:
    """The whole results.json payload (see the module docstring)."""
    from rcd_ext import __version__

    return {"task": task, "test_size": test_size, "checkpoints": checkpoints,
            "training": training, "device": device, "rcd_ext_version": __version__,
            "torch_version": torch.__version__,
            "records": [rounded_record(record) for record in records]}


def write_results(path: Path, document: dict[str, Any]) -> Path:
    """Write results.json whole or not at all (a full disk leaves the previous one)."""
    return write_json_atomic(path, document, indent=1)
