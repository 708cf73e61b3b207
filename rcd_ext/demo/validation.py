"""`run_demo`'s inputs checked before any model is loaded or trained.

Each error is a ValueError naming the parameter, the value and what was expected, so the
CLI can print it as one line.
"""

from __future__ import annotations

from collections.abc import Sequence
from numbers import Integral, Real
from typing import Any


def _positive_int(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, Integral) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")


def check_run_inputs(*, test_size: Any, steps: Sequence[Any], thresholds: Sequence[Any],
                     stage1: Any, stage2: Any, batch_size: Any, threads: Any) -> None:
    """Raise ValueError for the first bad value; task-dependent limits are in
    `check_against_task`."""
    for name, value in (("test_size", test_size), ("stage1", stage1), ("stage2", stage2),
                        ("batch_size", batch_size)):
        _positive_int(name, value)
    if threads is not None:
        _positive_int("threads", threads)
    if not steps and not thresholds:
        raise ValueError("steps and thresholds are both empty: give at least one step budget "
                         "or confidence threshold")
    for budget in steps:
        _positive_int("steps", budget)
    for tau in thresholds:
        if isinstance(tau, bool) or not isinstance(tau, Real) or not 0.0 < tau <= 1.0:
            raise ValueError(f"thresholds must be in (0, 1], got {tau!r}")


def check_against_task(task: Any, steps: Sequence[int]) -> None:
    """A step commits at least one answer token, so no budget may exceed the answer length."""
    too_many = [budget for budget in steps if budget > task.answer_length]
    if too_many:
        raise ValueError(f"steps {too_many} exceed the {task.answer_length}-token answer of "
                         f"task {task.name!r} (use at most {task.answer_length})")
