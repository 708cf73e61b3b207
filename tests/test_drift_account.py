"""benchmarks/drift.py's step account: the first-error hazard and the residual weight per step,
checked on a hand-made three-step trace."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

from rcd_ext.decoding.generation import StepTrace

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def drift():
    spec = importlib.util.spec_from_file_location("drift", ROOT / "benchmarks" / "drift.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    yield module
    del sys.modules[spec.name]


def step(tokens, committed, alpha):
    tokens = torch.tensor(tokens)
    return StepTrace(block=0, step=0, start=0, tokens=tokens,
                     committed=torch.tensor(committed, dtype=torch.bool),
                     alpha_in=torch.tensor(alpha),
                     alpha=torch.zeros_like(tokens, dtype=torch.float32))


def test_hazard_counts_first_errors_among_rows_still_right(drift):
    answers = torch.tensor([[1, 2, 3], [4, 5, 6], [7, 8, 9]])
    m = 0  # mask id
    trace = [
        # step 1: row 0 right, row 1 wrong (its first error), row 2 right
        step([[1, m, m], [9, m, m], [7, m, m]], [[1, 0, 0], [1, 0, 0], [1, 0, 0]],
             [[.5, .5, .5], [.4, .4, .4], [.3, .3, .3]]),
        # step 2: row 0 wrong (first), row 1 wrong again (knock-on, not counted), row 2 right
        step([[1, 0, m], [9, 0, m], [7, 8, m]], [[0, 1, 0], [0, 1, 0], [0, 1, 0]],
             [[0, .2, .2], [0, .2, .2], [0, .2, .2]]),
        # step 3: row 2 wrong (first); 1 of the 1 rows still right
        step([[1, 0, 3], [9, 0, 6], [7, 8, 0]], [[0, 0, 1], [0, 0, 1], [0, 0, 1]],
             [[0, 0, .1], [0, 0, .1], [0, 0, .1]]),
    ]
    account = drift.step_account(trace, answers)
    assert [a["first_errors"] for a in account] == [1, 1, 1]
    assert [a["hazard"] for a in account] == pytest.approx([1 / 3, 1 / 2, 1.0])
    assert [a["error_rate"] for a in account] == pytest.approx([1 / 3, 2 / 3, 1 / 3])
    assert [a["alpha_in"] for a in account] == pytest.approx([0.4, 0.2, 0.1])
