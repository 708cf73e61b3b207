"""Helpers for the optional tests on a real engine checkout (never part of the default run).

`engine_imports(directory)` puts one engine directory first on sys.path and removes the
top-level modules engines name generically (`generate`, `model`, ...) before and after, so
that two layouts (Fast-dLLM `llada/` and `v1/llada/`) can be imported in one session.
`CallRecorder` hooks a real model and records each call as a `Call` (positions derived from
its cache / replace_position arguments exactly as the engine's attention does).
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator
from pathlib import Path

import torch

from tests.engine_doubles.models import Call

GENERIC_NAMES = ("generate", "model", "eval_llada", "chat")


def _drop_generic_modules() -> None:
    for name in list(sys.modules):
        if name.split(".")[0] in GENERIC_NAMES:
            del sys.modules[name]


@contextlib.contextmanager
def engine_imports(directory: Path) -> Iterator[None]:
    _drop_generic_modules()
    sys.path.insert(0, str(directory))
    try:
        yield
    finally:
        sys.path.remove(str(directory))
        _drop_generic_modules()


class CallRecorder:
    """Records (positions, embeddings, logits) of every call of a real model."""

    def __init__(self, model: torch.nn.Module, cache_length_dim: int = -2,
                 embeds_only: bool = False):
        # embeds_only: record only calls made with inputs_embeds (with a swapped forward the
        # hooks also see the outer call with token ids)
        self.calls: list[Call] = []
        self._pending: list[tuple[torch.Tensor, torch.Tensor, dict] | None] = []
        self.cache_length_dim = cache_length_dim
        self.embeds_only = embeds_only
        self.handles = [model.register_forward_pre_hook(self._before, with_kwargs=True),
                        model.register_forward_hook(self._after)]
        self.embedding = model.get_input_embeddings()

    def _before(self, module, args, kwargs):
        embeds = kwargs.get("inputs_embeds")
        if embeds is None and self.embeds_only:
            self._pending.append(None)
            return
        if embeds is None:
            ids = args[0] if args else kwargs["input_ids"]
            embeds = self.embedding(ids)
        batch, length = embeds.shape[:2]
        replace = kwargs.get("replace_position")
        past = kwargs.get("past_key_values")
        if replace is not None:
            positions = replace[0].nonzero()[:, 0][None].expand(batch, length)
        else:
            empty = past is None or (hasattr(past, "__len__") and len(past) == 0)
            start = 0 if empty else past[0][0].shape[self.cache_length_dim]
            positions = (start + torch.arange(length))[None].expand(batch, length)
        self._pending.append((positions.clone(), embeds.detach().clone(),
                              {"update_kvcache": kwargs.get("update_kvcache")}))

    def _after(self, module, args, output):
        pending = self._pending.pop()
        if pending is None:
            return
        positions, embeds, extra = pending
        self.calls.append(Call(positions, None, embeds, output.logits.detach().float().clone(),
                               extra))

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
