"""Decode a task's held-out problems with SeqD or RCD through `rcd_ext.decoding.generate`.

One call decodes the whole test set as one batch. Costs are reported per problem: with the
threshold policy a batch runs until its slowest row is done, so each row's own step count is
read from the step trace (a row takes part in a step iff it still had a masked position).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from rcd_ext.decoding import generate
from rcd_ext.demo.data_task import JsonlTestSet, merge_records
from rcd_ext.tasks import Task

# RCD's first residual: the reference's forward (warm), none (cold), or Dirichlet draws
INITS = ("warm", "cold", "dirichlet")


def decode_record(model: nn.Module, task: Task, test: list[tuple[torch.Tensor, torch.Tensor]], *,
                  method: str, init: str | None = None, steps: int | None = None,
                  threshold: float | None = None, reference: nn.Module | None = None,
                  seed: int = 0, **residual: Any) -> dict[str, Any]:
    """Accuracy and cost of one decoding setting on `test` (list of (prompt [P], answer [A])).

    Args:
        method: "seqd" (residuals off) or "rcd".
        init: for "rcd", "warm" (one reference forward gives the first residual), "cold" or
            "dirichlet" (Dirichlet draws seeded by `seed`).
        steps: denoising steps for the answer (fixed policy); None with `threshold`.
        threshold: confidence threshold (at least one token per step); None for fixed.
        **residual: further `ResidualConfig` options for "rcd" (t_res=..., strategy=...).

    Returns the record {"method", "init", "steps", "threshold", "tokens_per_step",
    "forwards" (mean forward passes per problem, the reference's included), "accuracy", "n"},
    plus "token_accuracy" when `task` has a `token_accuracy(predicted)` (a JSONL test set).
    """
    if (steps is None) == (threshold is None):
        raise ValueError("give exactly one of steps (fixed policy) and threshold")
    if method == "rcd" and init not in INITS:
        raise ValueError(f"rcd needs init one of {INITS}, got {init!r}")
    if method == "rcd" and init == "warm" and reference is None:
        raise ValueError("init 'warm' needs the reference model")
    prompts = torch.stack([prompt for prompt, _ in test])
    length = task.answer_length
    out = generate(model, prompts, gen_length=length, block_length=length,
                   steps=length if steps is None else steps,
                   remasking="fixed" if threshold is None else "threshold",
                   threshold=threshold, rcd=method == "rcd",
                   ref_model=reference if init == "warm" else None,
                   init="reference" if init == "warm" else (init or "cold"),
                   stop_at_eos=False, trace=threshold is not None, seed=seed,
                   **(residual if method == "rcd" else {}))
    rows = len(test)
    if threshold is None:
        row_steps = float(out.stats.denoising_steps)
        target_forwards = float(out.stats.forward_passes)
    else:
        active = torch.stack([step.committed.any(1) for step in out.trace])  # [steps, B]
        row_steps = active.sum(0).float().mean().item()
        # the semi-AR loop without a cache makes one target forward per step
        target_forwards = row_steps + out.stats.forward_passes - out.stats.denoising_steps
    record = {
        "method": method,
        "init": init if method == "rcd" else None,
        "steps": steps,
        "threshold": threshold,
        "tokens_per_step": length / row_steps,
        "forwards": target_forwards + out.stats.reference_forwards,
        "accuracy": task.score(out.tokens, prompts),
        "n": rows,
    }
    if method == "rcd":
        record.update(residual)  # the options a sweep varied, e.g. "t_res"
    if hasattr(task, "token_accuracy"):
        record["token_accuracy"] = task.token_accuracy(out.tokens)
    return record


VARIANTS = [("seqd", None), ("rcd", "warm"), ("rcd", "cold")]


def sweep(models: dict[str, nn.Module], task: Task, test: list, *, steps: list[int],
          thresholds: list[float], reference: nn.Module | None) -> list[dict[str, Any]]:
    """Records for SeqD (`models["seqd"]`) and RCD warm/cold (`models["rcd"]`) at every step
    budget and threshold."""
    records = []
    for method, init in VARIANTS:
        model = models[method]
        for budget in steps:
            records.append(decode_record(model, task, test, method=method, init=init,
                                         steps=budget, reference=reference))
        for tau in thresholds:
            records.append(decode_record(model, task, test, method=method, init=init,
                                         threshold=tau, reference=reference))
    return records


def sweep_test_set(models: dict[str, nn.Module], test_set: JsonlTestSet, *, steps: list[int],
                   thresholds: list[float], reference: nn.Module | None,
                   variants: list[tuple[str, str | None]] | None = None
                   ) -> list[dict[str, Any]]:
    """`sweep` over a JSONL test set: each group of equal-length rows is one batch, a step
    budget above a group's answer length decodes it one token per step, and the groups'
    records merge into one per variant and setting (`variants`: default SeqD, RCD warm and
    cold)."""
    settings = [(budget, None) for budget in steps] + [(None, tau) for tau in thresholds]
    records = []
    for method, init in variants or VARIANTS:
        for budget, tau in settings:
            parts = [(group, decode_record(
                models[method], group, group.problems, method=method, init=init,
                steps=None if budget is None else min(budget, group.answer_length),
                threshold=tau, reference=reference)) for group in test_set.groups]
            records.append(merge_records(parts, budget))
    return records
