"""The two denoising loops. Both are plain samplers: they call `runner(ids, **kwargs)` like a
model and know nothing of residuals. RCD happens when `runner` is an `rcd_ext.wrap`-ped model.

- `semi_autoregressive`: bidirectional models (LLaDA, Dream, tiny bidirectional). Blocks of
  `block_length` after the prompt, left to right; cache "none" (every step forwards the whole
  sequence), "prefix" (the block start forwards everything and keeps the prefix's K/V; later
  steps forward x[:, block_start:]) or "dual" (later steps forward only the block, with the
  prefix and suffix K/V of the block start).
- `block_diffusion`: block-causal models (SDAR, tiny block_causal). Blocks aligned to absolute
  multiples of `block_length` (the first may hold the prompt's tail); whole prompt blocks are
  prefilled into the KV cache, each step forwards only the current block, and the finished
  block is committed to the cache by one more forward with its token ids (plain embeddings).
  Rows may start generating at different columns (prompts of different lengths, padded by
  whole blocks): a block holding one row's prompt tail and another's masks is decoded for the
  rows that have masks and committed to the cache for all.

Left padding never shows here: the loops index absolute columns of the padded batch, and the
adapter adds the attention mask and position ids to every call (`ModelAdapter.with_padding`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from rcd_ext.decoding.remasking import sample_tokens, select_commits, transfer_schedule
from rcd_ext.models.adapters import ModelAdapter


@dataclass
class Sampling:
    """How each step picks and commits tokens."""

    policy: str = "fixed"
    threshold: float | None = None
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    generator: torch.Generator | None = None


@dataclass
class LoopCounters:
    """What a loop did: target forwards it made, denoising steps, tokens it committed."""

    forwards: int = 0
    steps: int = 0
    committed: int = 0
    blocks: int = 0
    stopped_early: bool = False
    per_step_committed: list[int] = field(default_factory=list)


# on_step(block_index, step_index, start, end, committed [B, end-start] bool)
StepCallback = Callable[[int, int, int, int, torch.Tensor], None]


def _commit(x: torch.Tensor, start: int, end: int, logits: torch.Tensor, mask_id: int,
            step: int, schedule: torch.Tensor, sampling: Sampling) -> torch.Tensor:
    """One denoising step on x[:, start:end] given that block's logits [B, n, V]. In place.

    Returns the bool [B, n] positions committed.
    """
    block = x[:, start:end]
    candidates = block == mask_id
    if mask_id < logits.shape[-1]:
        # A committed [MASK] would leave the position masked and the block could never finish
        # (untrained models do predict it): the mask token is never a candidate.
        logits = logits.float().index_fill(-1, torch.tensor([mask_id], device=logits.device),
                                           float("-inf"))
    tokens, confidence = sample_tokens(logits, temperature=sampling.temperature,
                                       top_p=sampling.top_p, top_k=sampling.top_k,
                                       generator=sampling.generator)
    if step < schedule.shape[1]:
        count = schedule[:, step]
    else:  # the schedule is spent (cannot happen with its minimum): finish the block
        count = candidates.sum(1)
    chosen = select_commits(confidence, candidates, count, policy=sampling.policy,
                            threshold=sampling.threshold)
    block[chosen] = tokens[chosen]
    return chosen


def _read_counts(chosen: torch.Tensor, block: torch.Tensor, mask_id: int) -> tuple[int, int]:
    """(positions committed by the step, positions of the block still masked): one read back
    to the host per step instead of one per number."""
    committed, remaining = torch.stack([chosen.sum(), (block == mask_id).sum()]).tolist()
    return committed, remaining


def _all_rows_done(x: torch.Tensor, gen_start: int | torch.Tensor, end: int,
                   eos_id: int | None) -> bool:
    """Whether every row holds EOS in its generated columns gen_start..end-1 (gen_start: one
    column for all rows, or [B] per row)."""
    if eos_id is None:
        return False
    if isinstance(gen_start, int):
        return bool((x[:, gen_start:end] == eos_id).any(1).all())
    columns = torch.arange(end, device=x.device)
    generated = columns[None, :] >= gen_start.to(x.device)[:, None]
    return bool(((x[:, :end] == eos_id) & generated).any(1).all())


def semi_autoregressive(
    runner: Callable[..., Any],
    adapter: ModelAdapter,
    x: torch.Tensor,
    prompt_length: int,
    block_length: int,
    steps_per_block: int,
    sampling: Sampling,
    *,
    cache: str = "none",
    stop_at_eos: bool = True,
    on_step: StepCallback | None = None,
) -> LoopCounters:
    """Decode the masked tail of x [B, T] (prompt first) in place, block by block.

    prompt_length: columns before the generation, the same for every row (a batch with prompts
    of different lengths is left-padded to the longest).
    """
    counters = LoopCounters()
    mask_id, total, batch = adapter.mask_id, x.shape[1], x.shape[0]
    num_blocks = (total - prompt_length) // block_length
    for block_index in range(num_blocks):
        start = prompt_length + block_index * block_length
        end = start + block_length
        masked = (x[:, start:end] == mask_id).sum(1)
        schedule = transfer_schedule(masked, steps_per_block)
        step, kept_cache, remaining = 0, None, int(masked.sum())
        while remaining:
            if cache == "none" or step == 0:
                output = runner(x, **adapter.full_forward_kwargs(cache))
                logits = adapter.logits(output)[:, start:end]
                if cache == "prefix":
                    kept_cache = adapter.crop_cache(output.past_key_values, start)
                elif cache == "dual":
                    kept_cache = output.past_key_values
            elif cache == "prefix":
                output = runner(x[:, start:], **adapter.prefix_step_kwargs(kept_cache))
                logits = adapter.logits(output)[:, :block_length]
            else:
                kwargs = adapter.dual_step_kwargs(kept_cache, start, end, total, batch)
                output = runner(x[:, start:end], **kwargs)
                logits = adapter.logits(output)
            counters.forwards += 1
            chosen = _commit(x, start, end, logits, mask_id, step, schedule, sampling)
            counters.steps += 1
            if on_step is not None:
                on_step(block_index, step, start, end, chosen)
            committed, remaining = _read_counts(chosen, x[:, start:end], mask_id)
            counters.committed += committed
            counters.per_step_committed.append(committed)
            step += 1
        counters.blocks += 1
        if stop_at_eos and _all_rows_done(x, prompt_length, end, adapter.eos_id):
            counters.stopped_early = block_index + 1 < num_blocks
            break
    return counters


def block_diffusion(
    runner: Callable[..., Any],
    adapter: ModelAdapter,
    x: torch.Tensor,
    gen_start: int | torch.Tensor,
    block_length: int,
    steps_per_block: int,
    sampling: Sampling,
    *,
    stop_at_eos: bool = True,
    on_step: StepCallback | None = None,
) -> LoopCounters:
    """Decode the masked tail of x [B, T] in place; T must be a multiple of block_length.

    gen_start: the column where generation starts, one int for every row or [B] long per row
    (a batch of prompts of different lengths is padded by whole blocks only, so its rows start
    generating at different columns: `generation.batch_layout`); decoding starts at the block
    of the earliest.
    """
    counters = LoopCounters()
    mask_id, total = adapter.mask_id, x.shape[1]
    earliest = gen_start if isinstance(gen_start, int) else int(gen_start.min())
    first_block = earliest // block_length
    num_blocks = total // block_length
    cache = None
    if first_block > 0:
        cache = adapter.prefill(runner, x[:, :first_block * block_length], None, block_length)
        counters.forwards += 1
    for block_index in range(first_block, num_blocks):
        start, end = block_index * block_length, (block_index + 1) * block_length
        masked = (x[:, start:end] == mask_id).sum(1)
        schedule = transfer_schedule(masked, steps_per_block)
        step, remaining = 0, int(masked.sum())
        while remaining:
            output = runner(x[:, start:end], **adapter.denoise_kwargs(cache, start, end))
            counters.forwards += 1
            chosen = _commit(x, start, end, adapter.logits(output), mask_id, step, schedule,
                             sampling)
            counters.steps += 1
            if on_step is not None:
                on_step(block_index - first_block, step, start, end, chosen)
            committed, remaining = _read_counts(chosen, x[:, start:end], mask_id)
            counters.committed += committed
            counters.per_step_committed.append(committed)
            step += 1
        counters.blocks += 1
        last = block_index + 1 == num_blocks
        if stop_at_eos and _all_rows_done(x, gen_start, end, adapter.eos_id):
            counters.stopped_early = not last
            break
        if not last:
            cache = adapter.prefill(runner, x[:, start:end], cache, block_length)
            counters.forwards += 1
    return counters
