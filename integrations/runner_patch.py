"""The base of the serving-engine adapters (JetEngine, the D2F vLLM engine): a patch on one
nano-vllm-style model runner *instance*.

Such a runner builds one flat token batch per step in `run(seqs, ...)` and calls
`run_model(input_ids, positions, ...)` for the logits; its model takes token ids only. An
adapter subclasses `RunnerPatch` and writes two methods, `_run(original, seqs, ...)` (key the
batch's requests to residual rows) and `_run_model(original, input_ids, positions, ...)`
(announce the flat batch to the embedding hook, run the forward, store residuals from the
logits); `wrap` installs them on the runner through `patch_attribute`, so `undo()` leaves the
runner's `__dict__` exactly as it was and detaches the hook.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from rcd_ext.integrations.embedding_hook import EmbeddingHookRCD, SequenceSlots
from rcd_ext.integrations.engine_patching import SamplerPatch


@dataclass
class RunnerPatch(SamplerPatch):
    """What an adapter changed on one model runner; `undo()` restores it.

    Attributes (beyond `SamplerPatch`):
        runner: the patched model runner.
        mask_id: the mask token id the hook looks for.
        slots: request id -> residual row of every request seen and not finished
            (`slots.active`).
        hook: the `EmbeddingHookRCD` on the input embedding (None while none is attached,
            e.g. with rcd=False); `hook.injected` counts the masked tokens given a residual.
    """

    runner: Any = None
    mask_id: int = -1
    slots: SequenceSlots = field(default_factory=SequenceSlots)
    _embedding: nn.Module | None = field(default=None, repr=False)

    @property
    def hook(self) -> EmbeddingHookRCD | None:
        return self.last_hook

    def attach(self, embedding: nn.Module) -> EmbeddingHookRCD:
        """Put a fresh hook on `embedding` (replacing this patch's earlier one) and forget
        every request's row."""
        if self.last_hook is not None:
            self.last_hook.remove()
        self.last_hook = EmbeddingHookRCD(embedding, self.mask_id, self.options)
        self._embedding = embedding
        self.slots = SequenceSlots()
        return self.last_hook

    def wrap(self, name: str, through: Callable[..., Any]) -> None:
        """Replace the runner's method `name` by `through(original, *args, **kwargs)` until
        `undo()`; `originals[name]` is the method that was there."""
        original = getattr(self.runner, name)

        @functools.wraps(original)
        def wrapped(*args: Any, **kwargs: Any) -> Any:
            return through(original, *args, **kwargs)

        wrapped.__rcd_original__ = original  # type: ignore[attr-defined]
        self.replace(self.runner, name, wrapped, original)

    def undo(self) -> None:
        """Put the runner's methods back and detach the hook."""
        super().undo()
        if self.last_hook is not None:
            self.last_hook.remove()
        self.slots = SequenceSlots()
