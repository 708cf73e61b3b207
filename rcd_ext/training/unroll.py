"""Residual source "unroll": the target's own decoding loop, run from the noisy input.

The other sources give the training step a residual that inference never feeds: the reference's
(inference feeds the target's own), or one computed from plain [M] inputs (inference's
residuals come from forwards that themselves had residual inputs). Here the target, without
gradients and in eval mode, decodes the noisy input's masked set M for k steps exactly as
`rcd_ext.decoding` does: the first step gets the init residual (`unroll_init`, as inference's
`init`), every step commits its most confident tokens (greedy, the mask token never a
candidate, `select_commits`), and the positions left masked carry the residual of that step's
logits (entropy alpha, t_res 1, the op inference uses). The training step is step k + 1: it sees
the loop's state and its residual, and is scored on the positions still masked.

Commits (`unroll_commits`): "model" puts the target's own tokens in place, as inference does,
wrong ones included; the loss still asks for the true tokens next to them, which teaches the
model to distrust committed context. "truth" keeps the target's choice of *which* positions
to commit (its confidence order) but puts the true tokens there: the residuals are still the
target's own, from its own loop, and the context stays consistent with the targets.

The schedule: decoding M in k + 1 steps leaves ceil(|M| / (k + 1)) positions for the last step;
the k unrolled steps split the rest evenly (`transfer_schedule`), so the training step always
has a position to learn from. k ~ U{0..K} on a share `unroll_fraction` of the training steps,
else k = 0; k = 0 is the loop's first step (the init residual on the noisy input, no extra
forward), which inference always runs and so must be trained too.
Rows drawn into `no_residual_fraction` are not unrolled and keep plain [M] inputs.

Weighting: a row's masked positions after the loop are chosen by confidence, not at random, so
the 1/t weight becomes 1/t_k with t_k = |M_k| / |response| (each row's masked cross-entropy
averaged over its own masked positions), which keeps the loss on the scale of the other stages.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from rcd_ext.decoding.remasking import select_commits, transfer_schedule
from rcd_ext.residual import dirichlet_logits

__all__ = ["UnrolledState", "as_noise_fields", "draw_unroll_steps", "unroll"]

# logits for the residual rows at `positions`: the [B, L, V] logits of the last step, or a
# function of V for the init (called inside the forward, where the table's rows give V)
ResidualLogits = torch.Tensor | Callable[[int], torch.Tensor] | None


@dataclass
class UnrolledState:
    """Where the loop stands after k steps.

    input_ids: [B, L] the noisy input with the loop's commits; masked: [B, L] bool, still
    masked; positions: [B, L] bool, where the residual goes (masked, rows with a residual);
    residual_logits: see `ResidualLogits` (None: no residual, a cold first step);
    t: [B] the rows' masking rate for the loss's 1/t weight; steps: k (also the no-grad
    forwards the loop made).
    """

    input_ids: torch.Tensor
    masked: torch.Tensor
    positions: torch.Tensor
    residual_logits: ResidualLogits
    t: torch.Tensor
    steps: int


def draw_unroll_steps(max_steps: int, fraction: float) -> int:
    """k for one training step: 0 with probability 1 - fraction, else U{0..max_steps} (k = 0
    trains the loop's first step, which inference always runs on the init residual).

    Both numbers are drawn every time from the global RNG (which `transformers.Trainer`
    checkpoints), so a resumed run unrolls the same k.
    """
    unrolls = bool(torch.rand(()) < fraction)
    k = int(torch.randint(0, max_steps + 1, ()))
    return k if unrolls else 0


def _init_logits(init: str, count: int, concentration: float,
                 device: torch.device) -> ResidualLogits:
    if init == "cold":
        return None

    def logits(vocab: int) -> torch.Tensor:
        return dirichlet_logits(count, vocab, concentration, device=device)
    return logits


@contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    # inference runs in eval mode (no dropout); the training step after it must not
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def unroll(model: nn.Module, noisy: torch.Tensor, masked: torch.Tensor, residual_rows: torch.Tensor,
           response_mask: torch.Tensor, steps: int, *, mask_id: int, init: str,
           concentration: float, attention_mask: torch.Tensor | None,
           truth: torch.Tensor | None = None,
           forward: Callable[..., torch.Tensor],
           inject: Callable[..., object]) -> UnrolledState:
    """Run `steps` decoding steps of `model` from `noisy` (see the module docstring).

    Args:
        noisy: [B, L] the training step's noisy input; masked: [B, L] bool, its masked set;
        residual_rows: [B] bool, rows that get residuals (the others are left as they are);
        response_mask: [B, L] bool; init: "cold" or "dirichlet";
        truth: [B, L] the clean tokens, for commits "truth" (None: the target's own tokens);
        forward: `objective.model_logits`; inject: `objective.injected_residual` (passed in so
            this module does not import the objective that imports it).
    """
    ids, still = noisy.clone(), masked.clone()
    positions = still & residual_rows[:, None]
    residual = _init_logits(init, int(positions.sum()), concentration, noisy.device)
    if steps:
        # the training step (k + 1 of k + 1) keeps ceil(|M| / (k + 1)) positions
        count = (still & residual_rows[:, None]).sum(1)
        kept = torch.div(count + steps, steps + 1, rounding_mode="floor")
        schedule = transfer_schedule(count - kept, steps)
        with torch.no_grad(), _eval_mode(model):
            for step in range(steps):
                logits = _step_logits(model, ids, positions, residual, mask_id, attention_mask,
                                      forward, inject)
                chosen, tokens = _commit_most_confident(logits, still, schedule[:, step],
                                                        mask_id)
                ids[chosen] = (tokens if truth is None else truth)[chosen]
                still &= ~chosen
                positions = still & residual_rows[:, None]
                residual = logits
    lengths = response_mask.sum(1).clamp(min=1)
    t = (still.sum(1).clamp(min=1) / lengths).to(torch.float32)
    return UnrolledState(input_ids=ids, masked=still, positions=positions,
                         residual_logits=residual, t=t, steps=steps)


def _step_logits(model: nn.Module, ids: torch.Tensor, positions: torch.Tensor,
                 residual: ResidualLogits, mask_id: int, attention_mask: torch.Tensor | None,
                 forward: Callable[..., torch.Tensor],
                 inject: Callable[..., object]) -> torch.Tensor:
    """[B, L, V] float logits of one unrolled step (residual injected when there is one)."""
    if residual is None:
        return forward(model, ids, attention_mask).float()
    with inject(model, positions, residual, mask_id):
        return forward(model, ids, attention_mask).float()


def _commit_most_confident(logits: torch.Tensor, still: torch.Tensor, count: torch.Tensor,
                           mask_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(chosen [B, L] bool, tokens [B, L]): each row's `count` most confident still-masked
    positions and the greedy tokens, as the decoding loops pick them (plain softmax, the mask
    token never a candidate)."""
    if mask_id < logits.shape[-1]:
        logits = logits.index_fill(-1, torch.tensor([mask_id], device=logits.device),
                                   float("-inf"))
    confidence, tokens = torch.softmax(logits, dim=-1).max(-1)
    return select_commits(confidence, still, count), tokens


def as_noise_fields(state: UnrolledState, noise_t: torch.Tensor,
                    residual_rows: torch.Tensor) -> dict[str, torch.Tensor]:
    """The `Noise` fields the loss reads after the loop: the still-masked set, and 1/t_k for
    unrolled rows (1/t for rows left as they were)."""
    if state.steps == 0:
        return {"masked": state.masked, "t": noise_t}
    t = torch.where(residual_rows, state.t.to(noise_t.dtype), noise_t)
    return {"masked": state.masked, "t": t}

