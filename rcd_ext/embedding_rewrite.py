"""The one mechanism that puts residuals into a model whose forward is called with token ids:
a forward hook on its input-embedding module that rewrites the output of an announced forward.

Both users announce what the next forward holds, let the engine (or model) embed the ids
itself, and swap residual rows into the embedding output:
- `RCDModel(injection="hook")` (rcd_ext.wrapper): announces (ids, positions, scope, length)
  of the call it forwards and consumes the announcement when the hook sees those ids;
- `EmbeddingHookRCD` (rcd_ext.integrations.embedding_hook): the serving engines' flat
  batches, announced per forward by the engine adapter and kept until its logits arrive.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

# rewrite(announcement, the embedding module's positional inputs, its output [..., D]) ->
# the output to use instead, or None to keep it
Rewrite = Callable[[Any, tuple[Any, ...], torch.Tensor], torch.Tensor | None]


class EmbeddingRewrite:
    """A forward hook on `embedding` that calls `rewrite` while an announcement is pending.

    `announce(pending)` before the forward, `cancel()` to drop it (the rewrite may call it to
    consume the announcement), `remove()` to detach the hook. Nothing is rewritten while no
    announcement is pending (the model's other forwards, e.g. an init or reference forward).
    """

    def __init__(self, embedding: nn.Module, rewrite: Rewrite):
        self.pending: Any = None
        self._rewrite = rewrite
        self.handle = embedding.register_forward_hook(self._hook)

    def announce(self, pending: Any) -> None:
        """What the next forward holds (passed to `rewrite` as its first argument)."""
        self.pending = pending

    def cancel(self) -> None:
        """Drop the announcement: later forwards are left alone."""
        self.pending = None

    def _hook(self, module: nn.Module, inputs: tuple[Any, ...],
              output: torch.Tensor) -> torch.Tensor | None:
        if self.pending is None:
            return None
        return self._rewrite(self.pending, inputs, output)

    def remove(self) -> None:
        """Detach the hook (idempotent)."""
        self.handle.remove()
