"""RCD for JetEngine (Labman42/JetEngine, MIT License, Copyright (c) 2025 Yihan Bian), the
nano-vllm-style serving engine for SDAR block-diffusion models.

Every forward of JetEngine goes through `ModelRunner.run(seqs, run_type)`: `prepare_prefill` /
`prepare_denoise` build one flat token batch for all scheduled requests, `run_model(input_ids,
positions)` returns `model.compute_logits(model(input_ids, positions))`, and `LLMEngine.step`
hands the logits to `Scheduler.postprocess`, which samples and commits. DENOISE batches are
request-major, `block_length` tokens per request (its `intermediate_block_tokens`), at absolute
positions `len(seq) + arange(block_length)` (`len(seq)` = committed, cached tokens).

The model takes token ids only, so RCD goes in through `EmbeddingHookRCD` on
`model.model.embed_tokens`. `patch_jetengine(llm)` replaces, on the engine's runner instance,
- `run`: frees the residual rows of requests that finished since the last call, and for
  DENOISE batches gives each request its stable row (`SequenceSlots`, keyed by `seq.seq_id`);
- `run_model`: announces the exact `input_ids` / `positions` JetEngine built to the hook,
  runs the forward (the hook swaps in residuals at masked tokens), and stores this step's
  residuals from the logits before `Scheduler.postprocess` reads them (they are not changed).
PREFILL batches hold committed prompt blocks only (no masks) and their LM head keeps one row
per request, so nothing is announced there. Init: cold (the paper's SDAR setting).

    from jetengine import LLM, SamplingParams
    from rcd_ext.integrations.jetengine import patch_jetengine

    llm = LLM(path, enforce_eager=True, tensor_parallel_size=1, mask_token_id=151669,
              block_length=4)
    patch = patch_jetengine(llm, t_res=0.92)        # rcd=False: JetEngine's own behaviour
    outputs = llm.generate_streaming(prompts, SamplingParams(...), max_active=128)
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

_PATCH_ATTRIBUTE = "_rcd_jetengine_patch"


def _is_denoise(run_type: Any) -> bool:
    # compared by name: rcd_ext never imports jetengine (it needs CUDA, Triton and flashinfer)
    return getattr(run_type, "name", run_type) == "DENOISE"


def _runner_of(target: Any) -> Any:
    if isinstance(target, type):
        raise TypeError(
            f"patch_jetengine takes an engine instance, not the class {target.__name__}: "
            "LLM(...) builds its ModelRunner (weights, KV cache, warm-up) in its constructor; "
            "call patch_jetengine(llm) after building it")
    runner = getattr(target, "model_runner", target)
    if not (callable(getattr(runner, "run", None)) and callable(getattr(runner, "run_model", None))
            and hasattr(runner, "model")):
        raise TypeError(f"{type(target).__name__} is neither a JetEngine LLM/LLMEngine nor its "
                        "ModelRunner (no model_runner, or no run / run_model / model)")
    return runner


def check_runner(runner: Any, embedding: nn.Module) -> None:
    """Raise `ValueError` for JetEngine settings under which the embedding hook cannot work."""
    refuse_unhookable_runner(
        runner, embedding,
        tensor_parallel_fix="only rank 0 gets logits. Build the engine with "
                            "tensor_parallel_size=1 (data parallel through `accelerate launch`, "
                            "one engine per GPU, works)",
        eager_fix="build the engine with LLM(..., enforce_eager=True) (JetEngine's default is "
                  "False)")


def _mask_id_of(runner: Any, mask_id: int | None) -> int:
    if mask_id is None:
        mask_id = getattr(getattr(runner, "config", None), "mask_token_id", None)
    if mask_id is None or int(mask_id) < 0:
        raise ValueError("no mask id: build the engine with LLM(..., mask_token_id=...) (SDAR: "
                         "151669) or pass patch_jetengine(..., mask_id=...)")
    return int(mask_id)


@dataclass
class JetEnginePatch(RunnerPatch):
    """What `patch_jetengine` changed on one `ModelRunner`; `undo()` restores it.

    Attributes (`RunnerPatch`'s): `runner` the patched `ModelRunner`; `mask_id`; `slots`:
    `seq.seq_id` -> residual row of every request that has been in a DENOISE batch and has
    not finished (`slots.active`); `hook`: the `EmbeddingHookRCD` on
    `model.model.embed_tokens` (None with rcd=False).
    """

    _rows: torch.Tensor | None = field(default=None, repr=False)

    def _follow_model(self) -> None:
        # `reinit_model` / `reload_from_hf_model` build a new model: residuals of the old table
        # are meaningless and the old hook sits on a module nobody calls any more
        embedding = input_embedding(self.runner.model)
        if embedding is not self._embedding:
            check_runner(self.runner, embedding)
            self.attach(embedding)

    def release_finished(self) -> list[int]:
        """Free the rows (and residuals) of requests that finished or were dropped; returns
        the freed rows. Runs at the start of every `run`; call it after `generate` returns to
        give the memory of the last finished requests back before the next call."""
        # JetEngine marks a request finished in Scheduler.postprocess (status FINISHED, after
        # `run` returned) and never schedules it again, so checking the Sequence objects this
        # runner was given, at the start of the next `run`, frees a row before any new request
        # can take it. Not "absent from this batch": a live request skips DENOISE batches while
        # it prefills or when the scheduler finds no free KV block for it, and must keep its
        # residuals. Not a scheduler hook: `reload_from_hf_model` replaces LLMEngine.scheduler
        # and `postprocess_loop` returns nothing. Weak references also free the row of a
        # request the engine dropped without finishing (a replaced scheduler).
        rows = self.slots.release_finished()
        if rows and self.last_hook is not None:
            with torch.inference_mode():
                self.last_hook.release(rows)
        return rows

    def _rows_of(self, seqs: Sequence[Any]) -> torch.Tensor:
        """[N] long: the residual row of every token of a DENOISE batch (request-major)."""
        rows = torch.tensor(self.slots.track(seqs), dtype=torch.long)
        lengths = torch.tensor([int(seq.intermediate_block_tokens.numel()) for seq in seqs])
        return rows.repeat_interleave(lengths)

    def _run(self, original: Callable[[Any, Any], Any], seqs: Sequence[Any],
             run_type: Any) -> Any:
        self._follow_model()
        self.release_finished()
        if _is_denoise(run_type) and len(seqs) > 0:
            check_runner(self.runner, self._embedding)  # enforce_eager flipped after patching
            self._rows = self._rows_of(seqs)
        try:
            return original(seqs, run_type)
        finally:
            self._rows = None
            if self.last_hook is not None:
                # a forward that raised between prepare and update must not leave its
                # announcement for the next (PREFILL) forward
                self.last_hook.cancel()

    def _run_model(self, original: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
                   input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        rows, hook = self._rows, self.last_hook
        if rows is None or hook is None:
            return original(input_ids, positions)
        if rows.numel() != input_ids.numel():
            raise ValueError(f"JetEngine's DENOISE batch has {input_ids.numel()} tokens, its "
                             f"sequences' blocks hold {rows.numel()}")
        # bookkeeping needs no autograd graph, like JetEngine's own forward
        with torch.inference_mode():
            hook.prepare(input_ids, positions, rows.to(input_ids.device))
        logits = original(input_ids, positions)
        with torch.inference_mode():
            hook.update(logits)
        return logits


def patch_jetengine(target: Any, *, rcd: bool = True, mask_id: int | None = None,
                    **options: Any) -> JetEnginePatch:
    """Give a built JetEngine engine RCD (in place on its runner instance, reversible).

    Args:
        target: `jetengine.LLM` / `LLMEngine` instance (its `model_runner` is patched) or a
            `ModelRunner` instance.
        rcd: False installs a `run` that only calls the original (bit for bit JetEngine), no
            hook, no checks.
        mask_id: the mask token id (default: the engine's `config.mask_token_id`).
        **options: residual options of `RCDOptions` (t_res, temper_delta, strategy,
            alpha_scale; init must stay "cold").
    Raises ValueError for tensor_parallel_size > 1 or enforce_eager=False (rcd=True only).
    Returns a `JetEnginePatch` (`.hook`, `.slots`, `.undo()`).
    """
    runner = _runner_of(target)
    previous = runner.__dict__.get(_PATCH_ATTRIBUTE)
    if previous is not None:
        previous.undo()  # re-patching starts from the unpatched runner
    patch = JetEnginePatch(options=RCDOptions().updated({"rcd": rcd, **options}), runner=runner)
    if not patch.options.rcd:
        patch.originals["run_model"] = runner.run_model
        patch.wrap("run", _call_original)
    else:
        embedding = input_embedding(runner.model)
        check_runner(runner, embedding)
        patch.mask_id = _mask_id_of(runner, mask_id)
        patch.attach(embedding)
        patch.wrap("run", patch._run)
        patch.wrap("run_model", patch._run_model)
    patch.replace(runner, _PATCH_ATTRIBUTE, patch)
    return patch


def _call_original(original: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    return original(*args, **kwargs)
