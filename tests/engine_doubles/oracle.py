"""An independent account of where RCD must inject, to check what a model double received.

Replays the calls a double recorded: keeps the last residual per absolute position (from the
logits of the last call that saw the position masked inside the current scope), and says which
embeddings each call should have received. Uses `rcd_ext.ops.residual_context` for the
residual itself (its math is tested elsewhere) and nothing of the wrapper.
"""

from __future__ import annotations

import torch

from rcd_ext.ops import residual_context


def shift_own_first(logits: torch.Tensor) -> torch.Tensor:
    """Fast-dLLM Dream's shift: position i takes row i-1; the first keeps its own row."""
    return torch.cat([logits[:, :1], logits[:, :-1]], 1)


@torch.no_grad()
def d2f_dream_shift(calls):
    """D2F Dream's `_shift_logits` replayed over recorded calls (each with its
    `update_kvcache`): the first row takes row update_kvcache - 1 of the last updating call,
    constant logits before any. Returns a function for `check_injection(shift=...)`."""
    updates = iter([int(call.kwargs.get("update_kvcache") or 0) for call in calls])
    state = {"last": None}

    def shift(logits: torch.Tensor) -> torch.Tensor:
        update = next(updates)
        if update > 0:
            state["last"] = logits[:, update - 1:update]
        first = state["last"] if state["last"] is not None else torch.ones_like(logits[:, :1])
        return torch.cat([first, logits[:, :-1]], 1)

    return shift


@torch.no_grad()
def check_injection(calls, input_ids, embed: torch.Tensor, mask_id: int, gen_start: int,
                    block_length: int | None, shift=None, atol: float = 1e-5) -> int:
    """Assert every recorded call got the expected embeddings; returns how many rows were
    injected (so a test can also assert that RCD did something).

    calls: `Call`s of a model double (positions, embeddings, logits as the model saw them).
    input_ids: [B, l] token ids the sampler passed for each call (the model itself only sees
    embeddings once RCD is on). embed: [V, D] input table. block_length None: every
    masked position is in scope (D2F); else only the earliest block holding a mask.
    shift: maps call logits [B, l, V] to logits aligned with the positions (None: as is).
    """
    mask_embed = embed[mask_id]
    stored: dict[tuple[int, int], torch.Tensor] = {}
    sequence: dict[tuple[int, int], int] = {}
    injected = 0
    for number, (call, ids) in enumerate(zip(calls, input_ids, strict=True)):
        positions = call.positions
        batch, length = ids.shape
        for b in range(batch):
            for j in range(length):
                sequence[(b, int(positions[b, j]))] = int(ids[b, j])
        in_scope = torch.ones_like(ids, dtype=torch.bool)
        if block_length is not None:
            masked_at = [p for (b, p), t in sequence.items() if t == mask_id and p >= gen_start]
            current = min((p - gen_start) // block_length for p in masked_at) if masked_at \
                else -1
            in_scope = ((positions - gen_start) // block_length == current) & \
                (positions >= gen_start)
        expected = embed[ids].clone()
        for b in range(batch):
            for j in range(length):
                key = (b, int(positions[b, j]))
                if ids[b, j] == mask_id and in_scope[b, j] and key in stored:
                    expected[b, j] = stored[key]
                    injected += 1
        assert torch.allclose(call.embeds, expected, atol=atol), (
            f"call {number}: embeddings differ at "
            f"{(call.embeds - expected).abs().amax(-1).nonzero().tolist()}")
        logits = call.logits if shift is None else shift(call.logits)
        for b in range(batch):
            for j in range(length):
                key = (b, int(positions[b, j]))
                if ids[b, j] != mask_id:
                    stored.pop(key, None)
                elif in_scope[b, j]:
                    residual, _ = residual_context(logits[b, j][None].float(), embed, mask_embed)
                    stored[key] = residual[0]
    return injected


class SamplerIds:
    """Records the token ids every `RCDModel` call receives (install with `install`)."""

    def __init__(self) -> None:
        self.ids: list[torch.Tensor] = []

    def install(self, monkeypatch) -> SamplerIds:
        from rcd_ext.wrapper import RCDModel

        original = RCDModel.__call__
        record = self.ids

        def call(self, *args, **kwargs):
            ids = args[0] if args else kwargs["input_ids"]
            record.append(ids.clone())
            return original(self, *args, **kwargs)

        monkeypatch.setattr(RCDModel, "__call__", call)
        return self
