"""RCD for D2F's vLLM-style serving engine `d2f_vllm` (zhijie-group/Discrete-Diffusion-Forcing,
MIT License, Copyright (c) 2025 DENG Lab @ SJTU).

Conventions this adapter depends on (read at the d2f_vllm core as imported unchanged by the
fork moeleak/Discrete-Diffusion-Forcing, commit e878728; no code of it is used here):

- `LLMEngine.step` calls `model_runner.call("run", seqs, is_prefill)`; `run` builds one flat
  batch (`prepare_prefill` / `prepare_decode`), then `logits = self.run_model(input_ids,
  positions, is_prefill)` and hands exactly those logits to `self.sampler(logits, temps)`.
- Per scheduled sequence the flat batch holds `seq.token_ids[seq.cached_num_tokens:]`, in the
  order of `seqs`: the prompt plus the first (all-mask) diffusion block at prefill, then every
  block not yet in the K/V cache (blocks being cached and several active blocks, a new one
  appended fully masked when the last reaches `add_new_block_threshold`).
- The diffusion LM head keeps every token: logits are [N, V] in the order of the flat ids.
- Dream's sampler splits the logits per sequence and shifts them by one inside each slice:
  token i is scored by row i - 1, and the first token of a slice by a constant row
  (`cached_or_caching_last_token_id`, a token count, broadcast over the vocabulary).
- A sequence finishes in `scheduler.postprocess`, after the forward (status FINISHED).

What the patch does, per `run`:
1. forgets the residuals of sequences that finished (or were dropped) since the last step,
   and of sequences being prefilled again (a preempted request starts over);
2. gives each scheduled `seq_id` a stable slot (`SequenceSlots`) and announces the flat ids,
   their token index in the sequence (the absolute position) and their slot to an
   `EmbeddingHookRCD` on `model.model.embed_tokens` before the forward;
3. after the forward, stores residuals for the masked tokens from the logits the sampler reads,
   after the same shift. The first token of a slice has no real logits (the constant row is
   not a distribution the model produced), so it keeps no residual and is fed plain [MASK].

    from d2f_vllm import LLM
    from rcd_ext.integrations.d2f_vllm import patch_d2f_vllm
    llm = LLM(model_path, tensor_parallel_size=1, enforce_eager=True, ...)
    patch = patch_d2f_vllm(llm, t_res=0.92)      # rcd=False: the engine untouched
    outputs = llm.generate(prompts, sampling_params)
    patch.undo()
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from rcd_ext.integrations.embedding_hook import input_embedding, refuse_unhookable_runner
from rcd_ext.integrations.engine_patching import RCDOptions
from rcd_ext.integrations.runner_patch import RunnerPatch

D2F_VLLM_MASK_ID = 151666  # the engine's Config.mask_token_id default (Dream)
_WRAPPED = ("run", "run_verbose", "run_model")


@dataclass
class D2FVLLMPatch(RunnerPatch):
    """What `patch_d2f_vllm` changed; `undo()` restores the runner exactly.

    Attributes (besides `RunnerPatch`'s `runner`, `mask_id`, `slots` (seq_id -> row) and
    `hook` (`hook.injected` counts injections)): `shift_logits` whether logits are shifted as
    Dream's sampler does. With rcd=False nothing is patched: `runner` and `hook` are None.
    """

    shift_logits: bool = False
    _batch: dict[str, Any] = field(default_factory=dict, repr=False)

    def _admit(self, seqs: Sequence[Any], is_prefill: bool) -> list[int]:
        """Free the slots of requests gone since the last step; returns the rows of `seqs`."""
        freed = self.slots.release_finished()
        if is_prefill:
            # a prefill (re)starts a request: a preempted one comes back through here
            freed += [row for row in (self.slots.release(seq.seq_id) for seq in seqs)
                      if row is not None]
        if freed:
            self.hook.release(freed)
        return self.slots.track(seqs)

    def _run(self, original: Callable[..., Any], seqs: list[Any], is_prefill: bool,
             *args: Any, **kwargs: Any) -> Any:
        # bookkeeping needs no autograd graph, like the runner's own forward
        with torch.inference_mode():
            rows = self._admit(seqs, is_prefill)
        self._batch["seqs"], self._batch["rows"] = seqs, rows
        try:
            return original(seqs, is_prefill, *args, **kwargs)
        finally:
            self._batch.clear()

    def _run_model(self, original: Callable[..., Any], input_ids: torch.Tensor,
                   positions: torch.Tensor, is_prefill: bool, *args: Any,
                   **kwargs: Any) -> torch.Tensor:
        """input_ids, positions [N] (flat); returns the runner's logits [N, V] unchanged."""
        if "seqs" not in self._batch:  # a forward outside run() (nothing to key residuals by)
            return original(input_ids, positions, is_prefill, *args, **kwargs)
        hook = self.hook
        with torch.inference_mode():
            layout = flat_layout(self._batch["seqs"], self._batch["rows"], input_ids)
            hook.prepare(input_ids, layout.positions, layout.rows)
        logits = original(input_ids, positions, is_prefill, *args, **kwargs)
        with torch.inference_mode():
            masked = input_ids == self.mask_id
            token_index, logit_row = shift_rows(layout, masked, self.shift_logits)
            hook.update(logits[logit_row], token_index=token_index)
            if self.shift_logits:
                opening = masked & layout.first
                hook.forget(layout.rows[opening], layout.positions[opening])
        return logits


@dataclass
class FlatLayout:
    """Where each token of a flat batch belongs. All tensors [N] on the batch's device."""

    positions: torch.Tensor  # long: index of the token in its sequence (absolute position)
    rows: torch.Tensor  # long: residual-state slot of the token's sequence
    first: torch.Tensor  # bool: the token opens its sequence's slice


def find_runner(target: Any) -> Any:
    """The model runner of an `LLM` / `LLMEngine` (or `target` itself when it is a runner)."""
    config = getattr(target, "config", None)
    data_parallel = int(getattr(config, "data_parallel_size", 1) or 1)
    if data_parallel > 1 or hasattr(target, "conns"):
        raise ValueError(
            f"data_parallel_size={data_parallel}: the DP engine runs each replica's "
            "LLMEngine in a child process, which a patch in this process cannot reach; "
            "use data_parallel_size=1 (one patched engine per process)")
    runner = getattr(target, "model_runner", target)
    if not (callable(getattr(runner, "run", None)) and callable(getattr(runner, "run_model",
                                                                        None))):
        raise TypeError(f"{type(target).__name__} is neither a d2f_vllm LLM/LLMEngine nor its "
                        "model runner (no run / run_model)")
    return runner


def check_runner(runner: Any) -> None:
    """Refuse the settings under which a Python embedding hook cannot do RCD correctly."""
    if any(callable(getattr(vars(runner).get(name), "__rcd_original__", None))
           for name in _WRAPPED):
        raise ValueError("this model runner is patched already: undo() the earlier patch first")
    config = runner.config
    model_type = getattr(config, "model_type", "diffusion_lm")
    if model_type != "diffusion_lm":
        raise ValueError(f"model_type={model_type!r}: RCD needs the diffusion runner "
                         "(model_type='diffusion_lm'); a causal LM has no masked tokens")
    refuse_unhookable_runner(
        runner,
        tensor_parallel_fix="ranks > 0 run in other processes; pass tensor_parallel_size=1 "
                            "(d2f_vllm's Config defaults to 2)",
        eager_fix="pass enforce_eager=True")


def shift_rows(layout: FlatLayout, masked: torch.Tensor,
               shift: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(token_index [M], logit_row [M]): the masked tokens that have logits, and the row of
    the runner's logits [N, V] that scores each (i - 1 with Dream's shift, else i)."""
    if not shift:
        token_index = masked.nonzero()[:, 0]
        return token_index, token_index
    token_index = (masked & ~layout.first).nonzero()[:, 0]
    return token_index, token_index - 1


def flat_layout(seqs: Sequence[Any], rows: Sequence[int], input_ids: torch.Tensor) -> FlatLayout:
    """Rebuild the runner's flat batch from the sequences and check it against `input_ids` [N].

    Raises RuntimeError when the engine packed something else (an engine version with another
    layout would otherwise get residuals at the wrong tokens)."""
    positions: list[int] = []
    slot_rows: list[int] = []
    starts: list[int] = []
    tokens: list[int] = []
    for seq, row in zip(seqs, rows, strict=True):
        begin, end = int(seq.cached_num_tokens), len(seq)
        starts.append(len(positions))
        positions.extend(range(begin, end))
        slot_rows.extend([row] * (end - begin))
        tokens.extend(seq.token_ids[begin:end])
    device = input_ids.device
    expected = torch.tensor(tokens, dtype=input_ids.dtype).to(device)
    if expected.shape != input_ids.shape or not torch.equal(expected, input_ids):
        raise RuntimeError(
            f"d2f_vllm packed {tuple(input_ids.shape)} tokens that are not "
            "token_ids[cached_num_tokens:] of the scheduled sequences in order "
            f"({len(tokens)} expected): this engine version lays batches out differently, "
            "undo the RCD patch")
    first = torch.zeros(len(positions), dtype=torch.bool)
    first[[s for s, seq in zip(starts, seqs, strict=True) if len(seq) > seq.cached_num_tokens]] \
        = True
    return FlatLayout(torch.tensor(positions, dtype=torch.long).to(device),
                      torch.tensor(slot_rows, dtype=torch.long).to(device), first.to(device))


def patch_d2f_vllm(target: Any, *, embedding: nn.Module | None = None,
                   shift_logits: bool | None = None, **options: Any) -> D2FVLLMPatch:
    """Decode with residual context in a d2f_vllm engine (in place on its model runner,
    reversible with `undo()`).

    target: the `LLM(...)` / `LLMEngine` object, or its `model_runner`. The engine must run
        with tensor_parallel_size=1, data_parallel_size=1 and enforce_eager=True (else
        ValueError naming the setting).
    embedding: the input-embedding module (default `runner.model.model.embed_tokens`).
    shift_logits: whether token i is scored by logits row i - 1 of its slice (default: when
        the runner's sampler shifts, as Dream's `_shift_logits` does).
    **options: `RCDOptions` (rcd, t_res, strategy, alpha_scale, ...; init must be "cold", no
        ref_model). rcd=False patches nothing: the engine stays bit-identical.
    """
    rcd_options = RCDOptions().updated(options)
    patch = D2FVLLMPatch(options=rcd_options)
    if not rcd_options.rcd:
        return patch
    if rcd_options.ref_model is not None:
        raise ValueError("ref_model: a warm start needs extra forwards the engine never makes; "
                         "the d2f_vllm adapter supports init='cold' only")
    runner = find_runner(target)
    check_runner(runner)
    embedding = embedding if embedding is not None else input_embedding(runner.model)
    mask_id = int(getattr(runner, "mask_token_id", None) or runner.config.mask_token_id)
    if shift_logits is None:
        shift_logits = callable(getattr(getattr(runner, "sampler", None), "_shift_logits", None))
    patch.runner, patch.shift_logits, patch.mask_id = runner, bool(shift_logits), mask_id
    patch.attach(embedding)
    patch.wrap("run", patch._run)
    if callable(getattr(runner, "run_verbose", None)):
        patch.wrap("run_verbose", patch._run)
    patch.wrap("run_model", patch._run_model)
    return patch
