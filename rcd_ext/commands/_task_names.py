"""Names of the synthetic tasks, known without importing them (they import torch and
transformers, seconds on a small machine), so that `--task bogus` is refused at once.

tests/test_cli_errors.py checks that this list equals `rcd_ext.tasks.task_names()`.
"""

from __future__ import annotations

from rcd_ext.commands._usage import UsageError

__all__ = ["TASK_NAMES", "check_task_name"]

TASK_NAMES: tuple[str, ...] = ("branching_walk", "coupled_choices", "pointer_chasing",
                               "switching_chase")


def check_task_name(option: str, shown: str, name: str) -> None:
    """UsageError naming `option` (given as `shown`) unless `name` is a synthetic task."""
    if name not in TASK_NAMES:
        raise UsageError(f"{option} {shown}: unknown task {name!r} (use one of: "
                         f"{', '.join(TASK_NAMES)})")
