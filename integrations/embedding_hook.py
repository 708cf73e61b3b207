"""RCD for engines whose forward never takes `inputs_embeds`: a forward hook on the
input-embedding module, plus stable batch rows for continuously batched requests.

Serving engines (JetEngine, the D2F vLLM engine) and Fast-dLLM v2's `batch_sample` feed token
ids only, often as one flat tensor packing several requests. `EmbeddingHookRCD` replaces the
embedding rows of masked tokens by their stored residuals; the engine adapter tells it, per
forward, which request and absolute position each flat token belongs to (`prepare`) and hands
it the logits the sampler reads (`update`). The hook itself is
`rcd_ext.embedding_rewrite.EmbeddingRewrite`, the same mechanism as
`RCDModel(injection="hook")`. `SequenceSlots` turns the engine's request ids into small
stable row indices of the residual state: requests join and leave between steps and their
order in a batch changes, while residuals must stay with their request.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from rcd_ext.embedding_rewrite import EmbeddingRewrite
from rcd_ext.integrations.engine_patching import RCDOptions
from rcd_ext.residual import ResidualState


class EmbeddingHookRCD:
    """Residual injection through a forward hook on the input-embedding module.

    Per forward: `prepare(token_ids, positions, rows)` ([N] flat or [B, l]; positions absolute
    per request; `rows` [N] the request's slot, default 0 for flat and the batch index for
    [B, l]), the engine's forward (masked tokens with a stored residual get it instead of
    E[M]), then `update(logits)` with the logits of the same tokens ([N, V] or [B, l, V]), or
    of a subset of them (`token_index`). `release(rows)` when requests finish, `reset()`
    between independent batches, `remove()` to detach.

    Args:
        embedding: the model's input-embedding module (its weight is the residual table: with
            a vocabulary-sharded embedding under tensor parallelism it is not, and the
            adapters refuse that).
        mask_id: the mask token id.
        options: `RCDOptions` (init "cold" only: the hook cannot run extra forwards).
    """

    def __init__(self, embedding: nn.Module, mask_id: int, options: RCDOptions | None = None):
        options = options or RCDOptions()
        init = options.residual.init
        if init != "cold":
            raise ValueError(f"init={init!r} needs extra forwards the embedding hook cannot "
                             "make; use init='cold' (the paper's SDAR setting)")
        weight = getattr(embedding, "weight", None)
        if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
            raise TypeError(f"{type(embedding).__name__} has no [V, D] `weight`: the embedding "
                            "hook needs the module that maps token ids to embeddings")
        self.state = ResidualState(weight, mask_id, options.residual_config("all"))
        self.mask_id = int(mask_id)
        self.enabled = options.rcd
        self.injected = 0  # masked tokens that received a residual, over the hook's life
        # the announced (ids, positions, rows) [N] of the coming forward, kept until update()
        self._rewrite = EmbeddingRewrite(embedding, self._inject)
        self.handle = self._rewrite.handle

    def reset(self, batch: int = 1) -> None:
        """Forget every residual (a new, independent batch of requests)."""
        self.state.reset(batch)
        self._rewrite.cancel()

    def release(self, rows: torch.Tensor | list[int]) -> None:
        """Forget every residual of the slots `rows` (their requests finished)."""
        self.state.clear_rows(rows)

    def forget(self, rows: torch.Tensor, positions: torch.Tensor) -> None:
        """Drop the residuals at (rows [N], absolute positions [N]): masked tokens whose new
        logits are unusable (e.g. a logit shift leaves a slice's first token without any)."""
        self.state.forget(rows, positions)

    def prepare(self, token_ids: torch.Tensor, positions: torch.Tensor,
                rows: torch.Tensor | None = None) -> None:
        """Announce the tokens of the next forward: ids and absolute positions, [N] or [B, l];
        `rows` [N] the slot of each flat token (default 0)."""
        if token_ids.shape != positions.shape:
            raise ValueError(f"token_ids {tuple(token_ids.shape)} and positions "
                             f"{tuple(positions.shape)} must have the same shape")
        if token_ids.dim() == 1:
            rows = torch.zeros_like(token_ids) if rows is None else rows
        else:
            rows = torch.arange(token_ids.shape[0], device=token_ids.device)[:, None] \
                .expand_as(token_ids)
        if rows.shape != token_ids.shape:
            raise ValueError(f"rows {tuple(rows.shape)} must match token_ids "
                             f"{tuple(token_ids.shape)}")
        self._rewrite.announce((token_ids.reshape(-1), positions.reshape(-1).long(),
                                rows.reshape(-1).long()))

    def cancel(self) -> None:
        """Drop the announcement of a forward that did not complete (it raised before
        `update`), so that it cannot be applied to the next forward."""
        self._rewrite.cancel()

    def _inject(self, pending: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
                inputs: tuple[Any, ...], output: torch.Tensor) -> torch.Tensor | None:
        if not self.enabled:
            return None
        ids, positions, rows = pending
        flat = output.reshape(-1, output.shape[-1])
        if flat.shape[0] != ids.shape[0]:
            raise ValueError(f"prepare() announced {ids.shape[0]} tokens but the embedding "
                             f"module embedded {flat.shape[0]}")
        masked = ids == self.mask_id
        if not bool(masked.any()):
            return None
        have = self.state.stored(rows, positions) & masked
        if not bool(have.any()):
            return None
        flat = flat.clone()
        flat[have] = self.state.residuals_at(rows[have], positions[have]).to(flat.dtype)
        self.injected += int(have.sum())
        return flat.view_as(output)

    def update(self, logits: torch.Tensor, token_index: torch.Tensor | None = None) -> None:
        """Store this forward's residuals and forget those of committed tokens.

        logits: [N, V] / [B, l, V] for every token of the last `prepare`, or [M, V] for the
            announced tokens `token_index` [M] (engines whose head keeps only some rows);
            announced masked tokens without logits keep what they had.
        """
        pending = self._rewrite.pending
        if not self.enabled or pending is None:
            return
        ids, positions, rows = pending
        self._rewrite.cancel()
        logits = logits.reshape(-1, logits.shape[-1])
        if token_index is None:
            if logits.shape[0] != ids.shape[0]:
                raise ValueError(f"got logits for {logits.shape[0]} tokens, prepare() announced "
                                 f"{ids.shape[0]}: pass token_index for a subset")
            token_index = torch.arange(ids.shape[0], device=ids.device)
        elif token_index.shape[0] != logits.shape[0]:
            raise ValueError(f"token_index selects {token_index.shape[0]} tokens but logits "
                             f"has {logits.shape[0]} rows")
        masked = ids == self.mask_id
        # a token that is real now never needs its old residual again
        self.state.forget(rows[~masked], positions[~masked])
        write = masked[token_index]
        if bool(write.any()):
            chosen = token_index[write]
            self.state.write(rows[chosen], positions[chosen], logits[write])

    def remove(self) -> None:
        """Detach the hook."""
        self._rewrite.remove()


def input_embedding(model: nn.Module) -> nn.Module:
    """The module mapping token ids to input embeddings: `model.model.embed_tokens` (the
    nano-vllm-style engines' models) or, failing that, `model.get_input_embeddings()`."""
    embedding = getattr(getattr(model, "model", None), "embed_tokens", None)
    if embedding is None and callable(getattr(model, "get_input_embeddings", None)):
        embedding = model.get_input_embeddings()
    if not isinstance(embedding, nn.Module):
        raise TypeError(f"{type(model).__name__} has neither model.embed_tokens nor "
                        "get_input_embeddings(): RCD needs the input-embedding module")
    return embedding


def refuse_unhookable_runner(runner: Any, embedding: nn.Module | None = None, *,
                             tensor_parallel_fix: str, eager_fix: str) -> None:
    """Raise ValueError for the settings of a nano-vllm-style model runner (JetEngine, the D2F
    vLLM engine) under which a Python embedding hook cannot do RCD.

    - tensor parallelism: each rank's `VocabParallelEmbedding` holds a vocabulary shard (its
      output all-reduced), so no process holds the residual table;
    - CUDA graphs (`enforce_eager=False`): a graph replay runs no Python hooks, so nothing
      would ever be injected.
    The `*_fix` texts end each message with the engine's own remedy.
    """
    config = getattr(runner, "config", None)
    tensor_parallel = max(int(getattr(config, "tensor_parallel_size", 1) or 1),
                          int(getattr(runner, "world_size", 1) or 1),
                          int(getattr(embedding, "tp_size", 1) or 1))
    if tensor_parallel > 1:
        raise ValueError(f"tensor_parallel_size={tensor_parallel}: each rank's embedding then "
                         "holds a vocabulary shard, not the residual table; "
                         f"{tensor_parallel_fix}")
    if not getattr(runner, "enforce_eager", getattr(config, "enforce_eager", False)):
        raise ValueError("enforce_eager=False: steps would replay captured CUDA graphs, which "
                         f"run no Python forward hooks; {eager_fix}")


class SequenceSlots:
    """Stable residual-state rows for engine requests.

    `rows_for(ids)` gives each request id the row it already has or the lowest free one;
    `release(id)` frees it. Rows are reused, so the adapter must `EmbeddingHookRCD.release` a
    freed row before a new request can take it (`release` returns it for that).
    `track(seqs)` does `rows_for` for an engine's sequence objects (`seq.seq_id`) and remembers
    each by weak reference; `release_finished()` then frees the rows of those that report
    `is_finished` or that the engine dropped (garbage-collected) — engines mark a request
    finished after the step that finished it, so this runs at the start of the next step,
    before any new request can take the row.
    """

    def __init__(self) -> None:
        self.active: dict[Any, int] = {}
        self._free: list[int] = []
        self._next = 0
        self._tracked: dict[Any, Callable[[], Any]] = {}

    def rows_for(self, request_ids: list[Any]) -> list[int]:
        """The row of each request id (new ids get a free row)."""
        rows = []
        for request_id in request_ids:
            row = self.active.get(request_id)
            if row is None:
                if self._free:
                    self._free.sort()
                    row = self._free.pop(0)
                else:
                    row, self._next = self._next, self._next + 1
                self.active[request_id] = row
            rows.append(row)
        return rows

    def release(self, request_id: Any) -> int | None:
        """Free the row of `request_id`; returns it (None for an unknown id)."""
        self._tracked.pop(request_id, None)
        row = self.active.pop(request_id, None)
        if row is not None:
            self._free.append(row)
        return row

    def track(self, seqs: Sequence[Any]) -> list[int]:
        """The rows of engine sequences (keyed by `seq.seq_id`), remembered for
        `release_finished`."""
        for seq in seqs:
            if seq.seq_id not in self._tracked:
                try:
                    self._tracked[seq.seq_id] = weakref.ref(seq)
                except TypeError:  # no weak references: held until it reports finished
                    self._tracked[seq.seq_id] = (lambda kept=seq: kept)
        return self.rows_for([seq.seq_id for seq in seqs])

    def release_finished(self) -> list[int]:
        """Free the rows of tracked sequences that finished (`is_finished`) or were dropped;
        returns the freed rows."""
        gone = [seq_id for seq_id, reference in self._tracked.items()
                if (seq := reference()) is None or bool(getattr(seq, "is_finished", False))]
        return [row for row in (self.release(seq_id) for seq_id in gone) if row is not None]
