"""`RCD`: Residual Context Diffusion as an SGLang dLLM decoding algorithm.

SGLang's `LowConfidence` decides what to commit (this class reuses its `step` unchanged, so with
alpha 0 it commits the same tokens); RCD adds what the next forward sees: every position of the
block that is still masked gets `(1 - alpha) E[MASK] + alpha softmax(z) @ E` from the logits of
the forward just run, fed through `forward_batch.input_embeds`. A new block starts from plain
[MASK] embeddings ("cold") or from Dirichlet draws, as `rcd_ext`'s own decoding with scope
"block".

State: one `RCDRequestState` per request, created by `init_step_state` for each block and held
only in the `states` list SGLang passes around (in `--dllm-fdfo` mode carried between scheduler
rounds in `req.dllm_algo_state`). The algorithm keeps no registry of requests: a finished block's
state is dropped by `step` and SGLang, an aborted request's state goes with its `Req`.

Tensor parallelism: SGLang's logits processor hands every rank the full [B * block, V] logits;
each rank takes its columns and its shard of the `VocabParallelEmbedding` table and
`rcd_ext.vocab_parallel` merges the partials (small all-reduces of row statistics, one of [N, D]).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from sglang.srt.dllm.algorithm.low_confidence import LowConfidence
from sglang.srt.dllm.config import DllmConfig
from sglang.srt.model_executor.forward_batch_info import ForwardBatch

from rcd_ext.integrations.sglang.config import RCDServingConfig
from rcd_ext.ops import residual_context
from rcd_ext.residual import dirichlet_logits
from rcd_ext.vocab_parallel import residual_context_vocab_parallel

if TYPE_CHECKING:
    from sglang.srt.managers.schedule_batch import Req
    from sglang.srt.server_args import ServerArgs

from rcd_ext.integrations.sglang.server_args import SUPPORTED_ARCHITECTURES


@dataclass
class RCDRequestState:
    """One request's residuals inside its current block.

    residual: [block, D] embeddings for the positions in `has` (None before the first forward of
        a cold block). has: [block] bool, the positions masked when the residual was computed.
    """

    residual: torch.Tensor | None = None
    has: torch.Tensor | None = None


@dataclass
class _VocabShard:
    """This rank's part of the input-embedding table: rows [start, end) of the real vocabulary."""

    weight: torch.Tensor  # [end - start, D]
    start: int
    end: int
    group: Any  # the TP process group; None with one rank


class RCD(LowConfidence):
    """Residual Context Diffusion on SGLang's dLLM loops (sync and `--dllm-fdfo`)."""

    supported_architectures = SUPPORTED_ARCHITECTURES

    def __init__(self, config: DllmConfig):
        super().__init__(config)
        self.options = RCDServingConfig.from_mapping(config.algorithm_config)
        self.threshold = self.options.threshold
        self.embed_tokens: torch.nn.Module | None = None
        self.shard: _VocabShard | None = None

    # ---- launch time and per request -------------------------------------------------------

    @classmethod
    def configure_server_args(cls, server_args: ServerArgs) -> None:
        from rcd_ext.integrations.sglang.server_args import configure_rcd_server_args

        configure_rcd_server_args(cls.__name__, server_args)

    @classmethod
    def validate_request(cls, req: Req) -> str | None:
        from rcd_ext.integrations.sglang.server_args import unsupported_request_features

        unsupported = unsupported_request_features(req)
        if not unsupported:
            return None
        return ("RCD does not support request-level " + ", ".join(unsupported)
                + ": every forward's inputs are residual embeddings of full-vocabulary logits")

    # ---- the loops -------------------------------------------------------------------------

    def run(self, model_runner, forward_batch: ForwardBatch, algo_states=None):
        self._bind(model_runner)
        return super().run(model_runner, forward_batch, algo_states)

    def _bind(self, model_runner) -> None:
        """Find the input embedding table (and this rank's shard of it) once."""
        if self.embed_tokens is not None:
            return
        embed = model_runner.model.get_input_embeddings()
        tp_size = getattr(embed, "tp_size", 1)
        if tp_size > 1:
            indices = embed.shard_indices
            start, end = indices.org_vocab_start_index, indices.org_vocab_end_index
            self.shard = _VocabShard(embed.weight[: end - start], start, end, _tp_group(embed))
        else:
            self.shard = _VocabShard(embed.weight, 0, embed.weight.shape[0], None)
        self.embed_tokens = embed

    def init_step_state(self, forward_batch: ForwardBatch) -> list[RCDRequestState]:
        states = [RCDRequestState() for _ in range(forward_batch.batch_size)]
        if self.options.init == "dirichlet" and self.options.alpha_scale > 0:
            self._prime_dirichlet(forward_batch, states)
        return states

    def prepare_inputs(self, model_runner, forward_batch: ForwardBatch,
                       states: list[RCDRequestState]) -> None:
        """Token embeddings with the stored residuals at the still-masked positions, or plain ids
        (input_embeds None) while no request holds a residual."""
        if all(state.residual is None for state in states):
            forward_batch.input_embeds = None
            return
        batch_size = forward_batch.batch_size
        ids = forward_batch.input_ids.view(batch_size, self.block_size)
        embeds = self.embed_tokens(forward_batch.input_ids)
        embeds = embeds.view(batch_size, self.block_size, -1).clone()
        for index, state in enumerate(states):
            if state.residual is None:
                continue
            use = (ids[index] == self.mask_id) & state.has
            embeds[index][use] = state.residual[use].to(embeds.dtype)
        forward_batch.input_embeds = embeds.view(batch_size * self.block_size, -1)

    def step(self, forward_batch: ForwardBatch, full_logits: torch.Tensor,
             states: list[RCDRequestState]) -> list[bool]:
        """LowConfidence's commit, then residuals for the positions that stay masked."""
        done = super().step(forward_batch, full_logits, states)
        batch_size = forward_batch.batch_size
        masked = self._masked(forward_batch)
        for index in range(batch_size):
            if done[index] or not bool(masked[index].any()):
                states[index].residual = states[index].has = None  # free it now
        live = torch.tensor([not finished for finished in done], device=masked.device)
        rows = masked & live[:, None]
        if not bool(rows.any()):
            return done
        logits = full_logits.view(batch_size, self.block_size, -1)[rows]
        embeds, _ = self.residual_embeddings(logits)
        self._store(states, rows, embeds)
        return done

    # ---- residuals ---------------------------------------------------------------------------

    def residual_embeddings(self, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Residual embeddings [N, D] and alpha [N] from full-vocabulary logits [N, V]."""
        options, shard = self.options, self.shard
        kwargs = {"t_res": options.t_res, "temper_delta": options.temper_delta,
                  "strategy": options.strategy, "alpha_scale": options.alpha_scale}
        if shard.group is None:
            vocab = min(logits.shape[-1], shard.weight.shape[0])
            return residual_context(logits[:, :vocab], shard.weight, shard.weight[self.mask_id],
                                    residual_top_k=options.residual_top_k, **kwargs)
        return residual_context_vocab_parallel(
            logits[:, shard.start:shard.end], shard.weight, vocab_start=shard.start,
            mask_id=self.mask_id, residual_top_k=options.residual_top_k, group=shard.group,
            **kwargs)

    def _masked(self, forward_batch: ForwardBatch) -> torch.Tensor:
        """[B, block] positions holding the mask token outside the prompt."""
        ids = forward_batch.input_ids.view(forward_batch.batch_size, self.block_size)
        masked = ids == self.mask_id
        if forward_batch.dllm_prompt_mask is not None:
            masked &= ~forward_batch.dllm_prompt_mask
        return masked

    def _store(self, states: list[RCDRequestState], rows: torch.Tensor,
               embeds: torch.Tensor) -> None:
        """Write embeds [N, D] (rows of `rows` [B, block] in row-major order) into the states."""
        counts = rows.sum(1).tolist()
        offset = 0
        for index, count in enumerate(counts):
            if count == 0:
                continue
            residual = embeds.new_zeros((self.block_size, embeds.shape[1]))
            residual[rows[index]] = embeds[offset:offset + count]
            states[index].residual, states[index].has = residual, rows[index].clone()
            offset += count

    def _prime_dirichlet(self, forward_batch: ForwardBatch,
                         states: list[RCDRequestState]) -> None:
        """Residuals from log p0, p0 ~ Dirichlet(c), for the masked positions of fresh blocks,
        seeded per (request, block) so every TP rank and every rerun draws the same."""
        masked = self._masked(forward_batch)
        vocab = self.shard.end if self.shard.group is None else None
        if vocab is None:
            vocab = self.embed_tokens.org_vocab_size
        device = forward_batch.input_ids.device
        for index in range(forward_batch.batch_size):
            count = int(masked[index].sum())
            if count == 0:
                continue
            generator = torch.Generator(device=device)
            generator.manual_seed(self._seed(forward_batch, index))
            logits = dirichlet_logits(count, vocab, self.options.dirichlet_concentration,
                                      generator=generator, device=device)
            embeds, _ = self.residual_embeddings(logits)
            one = masked[index:index + 1]
            self._store(states[index:index + 1], one, embeds)

    def _seed(self, forward_batch: ForwardBatch, index: int) -> int:
        rid = forward_batch.rids[index] if forward_batch.rids else str(index)
        position = int(forward_batch.seq_lens[index]) if forward_batch.seq_lens is not None else 0
        key = f"{self.options.dirichlet_seed}:{rid}:{position}".encode()
        return int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "little") >> 1


def _tp_group(embed: torch.nn.Module) -> Any:
    """The torch process group the table is sharded over: the embedding's own (the attention TP
    group under DP attention), else SGLang's TP group."""
    group = getattr(getattr(embed, "tp_group", None), "device_group", None)
    if group is not None:
        return group
    from sglang.srt.distributed import get_tp_group

    return get_tp_group().device_group


Algorithm = RCD
